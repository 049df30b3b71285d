//! The `wsloop` binary: an echo server with every limit on the command line.

use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use wsloop::{Config, Decision, Handler, Message, Server, UpgradeRequest, WebSocket};

/// wsloop: a WebSocket echo server on a single-threaded epoll loop.
///
/// Every message a client sends comes back to it. Durations are in seconds (fractions allowed);
/// 0 disables a timeout where noted. Logging goes to stderr, filtered by RUST_LOG
/// (for example RUST_LOG=debug). SIGINT or SIGTERM start a graceful shutdown.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address to listen on (repeat for several, e.g. IPv4 and IPv6).
    #[arg(long = "listen", short = 'l', default_value = "127.0.0.1:9001")]
    listen: Vec<SocketAddr>,
    /// Largest message accepted from a client, in bytes (bigger: close 1009).
    #[arg(long, default_value_t = Config::default().max_message_size)]
    max_message_size: usize,
    /// Largest HTTP request head, in bytes (bigger: 431).
    #[arg(long, default_value_t = Config::default().max_header_bytes)]
    max_header_bytes: usize,
    /// Most header lines in a request head (more: 431).
    #[arg(long, default_value_t = Config::default().max_headers)]
    max_headers: usize,
    /// Seconds from accept to a complete upgrade request (absolute; not 0).
    #[arg(long, value_parser = seconds, default_value = "10")]
    handshake_timeout: Duration,
    /// Seconds of silence before an open connection is closed; a ping goes out half-way (0: never).
    #[arg(long, value_parser = seconds, default_value = "120")]
    idle_timeout: Duration,
    /// Seconds to wait for the client's answer to our close frame (not 0).
    #[arg(long, value_parser = seconds, default_value = "5")]
    close_timeout: Duration,
    /// Seconds a graceful shutdown waits for clients to finish closing.
    #[arg(long, value_parser = seconds, default_value = "5")]
    shutdown_timeout: Duration,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(v).map_err(|_| format!("{s:?} is not a valid duration"))
}

struct Echo;

impl Handler for Echo {
    type Data = ();
    fn upgrade(&mut self, _req: &UpgradeRequest<'_>) -> Decision<()> {
        Decision::accept(())
    }
    fn on_message(&mut self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let config = Config {
        max_message_size: args.max_message_size,
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        handshake_timeout: args.handshake_timeout,
        idle_timeout: args.idle_timeout,
        close_timeout: args.close_timeout,
        shutdown_timeout: args.shutdown_timeout,
        ..Config::default()
    };
    match serve(config, &args.listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsloop: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config, listen: &[SocketAddr]) -> std::io::Result<()> {
    let mut server = Server::new(config, Echo)?;
    for addr in listen {
        let bound = server
            .listen(*addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        log::info!("echo server listening on ws://{bound}");
    }
    let handle = server.handle();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let signals_handle = signals.handle();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: shutting down");
            handle.shutdown();
        }
    });
    let result = server.run();
    signals_handle.close();
    log::info!("stopped");
    result
}
