//! The `wsloop` binary: an echo server with every limit on the command line.

use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use wsloop::{
    BackpressurePolicy, Cluster, Compression, Config, ConfigError, Decision, Handler, Message,
    RedisConfig, SniCertificate, TlsConfig, UpgradeRequest, WebSocket,
};

/// wsloop: a WebSocket echo server on epoll loops, one per thread (one by default).
///
/// Every message a client sends comes back to it; with --pubsub, to every client in its room. Durations are in seconds (fractions allowed);
/// 0 disables a timeout where noted. Logging goes to stderr, filtered by RUST_LOG
/// (for example RUST_LOG=debug). SIGINT or SIGTERM start a graceful shutdown; SIGHUP reloads
/// the TLS certificates.
#[derive(Parser, Debug)]
#[command(version)]
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
    /// Most connections held at once; more get 503 (0: derived from the fd limit).
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// Most connections from one IP address; more get 503 (0: unlimited).
    #[arg(long, default_value_t = 0)]
    max_connections_per_ip: u32,
    /// New connections per second from one IP address; more get 429 (0: unlimited).
    #[arg(long, default_value_t = 0)]
    connection_rate_per_ip: u32,
    /// Burst size for --connection-rate-per-ip (0: equal to the rate).
    #[arg(long, default_value_t = 0)]
    connection_burst_per_ip: u32,
    /// Leading bits of an IPv6 client address that make its "IP" for the per-IP limits (64: a
    /// /64 counts as one client; 128: each address).
    #[arg(long, default_value_t = Config::default().ipv6_prefix_len)]
    ipv6_prefix: u8,
    /// File descriptors left for the rest of the process when deriving --max-connections.
    #[arg(long, default_value_t = Config::default().fd_headroom)]
    fd_headroom: usize,
    /// Set the soft RLIMIT_NOFILE to this instead of raising it to the hard limit.
    #[arg(long)]
    fd_limit: Option<u64>,
    /// Listen backlog (capped by net.core.somaxconn).
    #[arg(long, default_value_t = Config::default().listen_backlog)]
    listen_backlog: u32,
    /// Most connections accepted per listener per loop turn.
    #[arg(long, default_value_t = Config::default().accepts_per_turn)]
    accepts_per_turn: usize,
    /// Most bytes queued for a slow reader before sends are refused and the connection is no
    /// longer read (until half of it is left).
    #[arg(long, default_value_t = Config::default().max_backpressure)]
    max_backpressure: usize,
    /// Each connection's kernel send buffer (SO_SNDBUF) in bytes, bounding what a slow reader
    /// holds in the kernel (0: the kernel's auto-tuning, up to net.ipv4.tcp_wmem's maximum).
    #[arg(long, default_value_t = Config::default().socket_send_buffer)]
    socket_send_buffer: usize,
    /// Each connection's kernel receive buffer (SO_RCVBUF) in bytes, bounding what a client the
    /// server is not reading holds in the kernel (0: the kernel's auto-tuning, up to
    /// net.ipv4.tcp_rmem's maximum).
    #[arg(long, default_value_t = Config::default().socket_receive_buffer)]
    socket_receive_buffer: usize,
    /// What a send over --max-backpressure does: close the connection (1008) or drop the message.
    #[arg(long, value_enum, default_value = "close")]
    backpressure_policy: Policy,
    /// permessage-deflate: off; shared (no context takeover: one compressor and one
    /// decompressor per loop, nothing held by an idle connection); or dedicated (context
    /// takeover: each connection its own, within --compression-budget).
    #[arg(long, value_enum, default_value = "off")]
    compression: CompressionArg,
    /// Messages shorter than this many bytes are sent uncompressed.
    #[arg(long, default_value_t = Config::default().compression_threshold)]
    compression_threshold: usize,
    /// dedicated: the largest window the server compresses with, in bits (9 to 15).
    #[arg(long, default_value_t = Config::default().compression_window_bits)]
    compression_window_bits: u8,
    /// dedicated: zlib's memory level for each connection's compressor (1 to 9).
    #[arg(long, default_value_t = Config::default().compression_mem_level)]
    compression_mem_level: u8,
    /// dedicated: the most bytes all connections' own compression state may hold; past it new
    /// connections get the shared profile (0: a quarter of the memory budget).
    #[arg(long, default_value_t = 0)]
    compression_budget: usize,
    /// Seconds a connection may have unsent bytes that the socket does not take before it is
    /// dropped; also how long a queue over --max-backpressure has to get under half of it.
    #[arg(long, value_parser = seconds, default_value = "30")]
    write_stall_timeout: Duration,
    /// Seconds after which an open connection is closed with 1001 (0: never).
    #[arg(long, value_parser = seconds, default_value = "0")]
    max_lifetime: Duration,
    /// Event loops, one per thread, sharing the port through SO_REUSEPORT (each with its share
    /// of the fd budget and of --max-connections).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Serve GET /metrics and GET /healthz on this address (operators only).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Also answer /metrics and /healthz on the WebSocket address (off by default: they tell
    /// strangers the server's limits and load; prefer --metrics-listen).
    #[arg(long, conflicts_with = "no_metrics_on_ws")]
    metrics_on_ws: bool,
    /// The default (kept so that older command lines still start).
    #[arg(long, hide = true)]
    no_metrics_on_ws: bool,
    /// Requests a second /metrics and /healthz answer together, per loop, on the WebSocket
    /// address and on the metrics address each (beyond it: 429; 0: no limit).
    #[arg(long, default_value_t = Config::default().endpoint_rate)]
    endpoint_rate: u32,
    /// Seconds between fd audits (/proc/self/fd against accounted descriptors; 0: off).
    #[arg(long, value_parser = seconds, default_value = "10")]
    audit_interval: Duration,
    /// An origin allowed to open WebSockets (repeat for several): exact, like
    /// https://app.example.com, or any subdomain, like https://*.example.com. Others get 403.
    /// Without this flag every origin is allowed.
    #[arg(long = "allowed-origin")]
    allowed_origins: Vec<String>,
    /// With --allowed-origin: refuse requests that carry no Origin header (non-browser clients).
    #[arg(long)]
    require_origin: bool,
    /// Seconds a loop turn may run before the watchdog reports a stall (0: no watchdog).
    #[arg(long, value_parser = seconds, default_value = "0.1")]
    stall_threshold: Duration,
    /// A proxy whose word on the client address is taken (repeat for several): an address or a
    /// network, like 10.0.0.0/8. Per-IP limits then apply to the client it reports
    /// (PROXY header, or X-Forwarded-For / Forwarded); such headers from others are ignored.
    #[arg(long = "trusted-proxy")]
    trusted_proxies: Vec<String>,
    /// Connections from trusted proxies start with a PROXY protocol header (v1 or v2).
    #[arg(long)]
    proxy_protocol: bool,
    /// The header the trusted proxies name the client in (only that one is read).
    #[arg(long, value_enum, default_value = "x-forwarded-for")]
    forwarded_header: Forwarded,
    /// The memory budget in bytes: what the buffers that grow with what clients send or do not
    /// read may hold in all (partial messages, send queues, publications). Near it new
    /// connections get 503 and connections that grow past their share are closed with 1013
    /// (0: half the cgroup's memory limit, else a quarter of the RAM).
    #[arg(long, default_value_t = Config::default().memory_budget)]
    memory_budget: usize,
    /// A topic server instead of the echo server: a client's request path (without the query)
    /// is its topic, and every message it sends is published to every subscriber of that topic,
    /// itself included. Paths longer than 256 bytes get 414.
    #[arg(long)]
    pubsub: bool,
    /// With --pubsub: share the topics with every other instance connected to this Redis
    /// (redis://HOST:PORT/): a message published here reaches their subscribers too. Redis may
    /// be down at start or go away: local delivery goes on, and the bridge reconnects.
    #[arg(long, value_name = "URL", requires = "pubsub")]
    redis: Option<String>,
    /// Prepended to each topic to make its Redis channel.
    #[arg(long, default_value_t = RedisConfig::default().prefix, requires = "redis")]
    redis_prefix: String,
    /// Serve wss:// (TLS 1.2 and 1.3) with this certificate chain (PEM: the server's
    /// certificate first, then intermediates); needs --tls-key. --metrics-listen stays plain.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert's certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Serve this certificate chain and key (PEM files) to clients that ask for the server
    /// NAME (SNI; exact name, any case); --tls-cert's to the others. Repeatable. SIGHUP reads
    /// every certificate and key again (new handshakes use them; a bad file keeps the old).
    #[arg(long, value_name = "NAME=CERT,KEY", requires = "tls_cert", value_parser = parse_sni)]
    tls_sni: Vec<SniCertificate>,
    /// With TLS: the most TLS handshakes in progress at once (split over the threads); new
    /// connections beyond it are closed at once, without a handshake (0: no cap).
    #[arg(long, default_value_t = Config::default().tls_max_handshakes)]
    tls_max_handshakes: usize,
    /// Sharded pub/sub (Redis 7: SPUBLISH, SSUBSCRIBE): with a Redis Cluster (--redis names
    /// any node), each topic goes through the primary that serves its channel's slot only.
    #[arg(long, requires = "redis")]
    redis_sharded: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Forwarded {
    XForwardedFor,
    Forwarded,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Policy {
    Close,
    Drop,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CompressionArg {
    Off,
    Shared,
    Dedicated,
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

/// `--pubsub`: each connection is in the room its request path names.
struct Rooms;

impl Handler for Rooms {
    /// The connection's topic.
    type Data = Box<[u8]>;
    fn upgrade(&mut self, req: &UpgradeRequest<'_>) -> Decision<Box<[u8]>> {
        let topic = req.path().as_bytes();
        if topic.len() > wsloop::topics::MAX_TOPIC_LEN {
            return Decision::Reject {
                status: 414,
                reason: "request path (the topic) longer than 256 bytes",
            };
        }
        Decision::accept(topic.into())
    }
    fn on_open(&mut self, ws: &mut WebSocket<'_, Box<[u8]>>) {
        let topic = std::mem::take(ws.data_mut());
        if let Err(e) = ws.subscribe(&topic) {
            // Not for a path the upgrade accepted; closed rather than left out of its room.
            ws.close(wsloop::CloseCode::INTERNAL_ERROR, &e.to_string());
        }
        *ws.data_mut() = topic;
    }
    fn on_message(&mut self, ws: &mut WebSocket<'_, Box<[u8]>>, msg: Message<'_>) {
        // To the others, then to the sender: everyone in the room (on this loop) sees the
        // messages in the order they were published.
        let topic = std::mem::take(ws.data_mut());
        let _ = ws.publish(&topic, msg);
        *ws.data_mut() = topic;
        ws.send(msg);
    }
}

/// The configuration fields the binary sets, and the flag that sets each (for errors).
const FLAGS: &[(&str, &str)] = &[
    ("max_message_size", "--max-message-size"),
    ("max_header_bytes", "--max-header-bytes"),
    ("max_headers", "--max-headers"),
    ("handshake_timeout", "--handshake-timeout"),
    ("idle_timeout", "--idle-timeout"),
    ("close_timeout", "--close-timeout"),
    ("shutdown_timeout", "--shutdown-timeout"),
    ("max_connections", "--max-connections"),
    ("max_connections_per_ip", "--max-connections-per-ip"),
    ("connection_rate_per_ip", "--connection-rate-per-ip"),
    ("connection_burst_per_ip", "--connection-burst-per-ip"),
    ("ipv6_prefix_len", "--ipv6-prefix"),
    ("socket_send_buffer", "--socket-send-buffer"),
    ("socket_receive_buffer", "--socket-receive-buffer"),
    ("fd_headroom", "--fd-headroom"),
    (wsloop::config::FD_LIMIT, "--fd-limit"),
    ("raise_fd_limit", "--fd-limit"),
    ("listen_backlog", "--listen-backlog"),
    ("accepts_per_turn", "--accepts-per-turn"),
    ("max_backpressure", "--max-backpressure"),
    ("backpressure_policy", "--backpressure-policy"),
    ("write_stall_timeout", "--write-stall-timeout"),
    ("max_lifetime", "--max-lifetime"),
    ("threads", "--threads"),
    ("serve_metrics", "--no-metrics-on-ws"),
    ("audit_interval", "--audit-interval"),
    ("allowed_origins", "--allowed-origin"),
    ("allow_missing_origin", "--require-origin"),
    ("stall_threshold", "--stall-threshold"),
    ("trusted_proxies", "--trusted-proxy"),
    ("proxy_protocol", "--proxy-protocol"),
    ("forwarded_header", "--forwarded-header"),
    ("memory_budget", "--memory-budget"),
    ("compression", "--compression"),
    ("compression_threshold", "--compression-threshold"),
    ("compression_window_bits", "--compression-window-bits"),
    ("compression_mem_level", "--compression-mem-level"),
    ("compression_budget", "--compression-budget"),
    ("redis", "--redis"),
    ("redis_prefix", "--redis-prefix"),
    ("tls_cert", "--tls-cert"),
    ("tls_key", "--tls-key"),
    ("tls_sni", "--tls-sni"),
    ("tls_max_handshakes", "--tls-max-handshakes"),
];

/// `--tls-sni NAME=CERT,KEY`.
fn parse_sni(s: &str) -> Result<SniCertificate, String> {
    let form = "expected NAME=CERT,KEY (a server name, its certificate chain and its key)";
    let (name, files) = s.split_once('=').ok_or(form)?;
    let (cert, key) = files.rsplit_once(',').ok_or(form)?;
    if name.is_empty() || cert.is_empty() || key.is_empty() {
        return Err(form.into());
    }
    Ok(SniCertificate {
        name: name.into(),
        cert_chain: cert.into(),
        private_key: key.into(),
    })
}

fn flag_of(field: &str) -> Option<&'static str> {
    FLAGS
        .iter()
        .find(|(f, _)| *f == field)
        .map(|(_, flag)| *flag)
}

/// A configuration error as the binary's user sees it: the flags named instead of the fields
/// (in the reason too, where it names another one), and where the descriptor limit came from.
fn explain(e: &ConfigError, fd_limit: Option<u64>) -> String {
    let mut reason = String::new();
    let mut word = String::new();
    for c in e.reason.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        // Only words with an underscore: `threads` in prose stays a word.
        match flag_of(&word).filter(|_| word.contains('_')) {
            Some(flag) => reason.push_str(flag),
            None => reason.push_str(&word),
        }
        word.clear();
        reason.push(c);
    }
    reason.pop();
    let what = flag_of(e.field).unwrap_or(e.field);
    let mut text = format!("invalid {what}: {reason}");
    if let Some(limit) = fd_limit.filter(|_| e.reason.contains("RLIMIT_NOFILE")) {
        text.push_str(&format!(" (the limit was set by --fd-limit {limit})"));
    }
    text
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let config = config_of(&args);
    // Every flag is checked before anything is opened or the descriptor limit is changed.
    if let Err(e) = config.validate() {
        eprintln!("wsloop: {}", explain(&e, None));
        return ExitCode::FAILURE;
    }
    // Before the loops start, so that the fd audit counts its descriptors as the process's;
    // and before the limit is lowered, so that a low --fd-limit is reported as such below
    // rather than failing here with "Too many open files".
    #[allow(clippy::disallowed_methods)] // open before any loop: the ledger counts it as the base
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]);
    let signals = match signals {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsloop: cannot handle SIGINT, SIGTERM and SIGHUP: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(limit) = args.fd_limit {
        match wsloop::set_fd_limit(limit) {
            Ok(n) => log::info!("soft RLIMIT_NOFILE set to {n}"),
            Err(e) => {
                eprintln!("wsloop: invalid --fd-limit: cannot set RLIMIT_NOFILE to {limit}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let served = match args.pubsub {
        false => serve(config, &args, signals, "echo server", |_| Echo),
        true => serve(config, &args, signals, "topic server", |_| Rooms),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(wsloop::Error::Config(c)) => {
            eprintln!("wsloop: {}", explain(&c, args.fd_limit));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wsloop: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config_of(args: &Args) -> Config {
    Config {
        max_message_size: args.max_message_size,
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        handshake_timeout: args.handshake_timeout,
        idle_timeout: args.idle_timeout,
        close_timeout: args.close_timeout,
        shutdown_timeout: args.shutdown_timeout,
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        connection_rate_per_ip: args.connection_rate_per_ip,
        connection_burst_per_ip: args.connection_burst_per_ip,
        ipv6_prefix_len: args.ipv6_prefix,
        socket_send_buffer: args.socket_send_buffer,
        socket_receive_buffer: args.socket_receive_buffer,
        fd_headroom: args.fd_headroom,
        raise_fd_limit: args.fd_limit.is_none(),
        listen_backlog: args.listen_backlog,
        accepts_per_turn: args.accepts_per_turn,
        max_backpressure: args.max_backpressure,
        backpressure_policy: match args.backpressure_policy {
            Policy::Close => BackpressurePolicy::Close,
            Policy::Drop => BackpressurePolicy::Drop,
        },
        write_stall_timeout: args.write_stall_timeout,
        max_lifetime: args.max_lifetime,
        serve_metrics: args.metrics_on_ws,
        endpoint_rate: args.endpoint_rate,
        audit_interval: args.audit_interval,
        allowed_origins: args.allowed_origins.clone(),
        allow_missing_origin: !args.require_origin,
        stall_threshold: args.stall_threshold,
        trusted_proxies: args.trusted_proxies.clone(),
        proxy_protocol: args.proxy_protocol,
        forwarded_header: match args.forwarded_header {
            Forwarded::XForwardedFor => wsloop::config::ForwardedHeader::XForwardedFor,
            Forwarded::Forwarded => wsloop::config::ForwardedHeader::Forwarded,
        },
        threads: args.threads,
        memory_budget: args.memory_budget,
        compression: match args.compression {
            CompressionArg::Off => Compression::Off,
            CompressionArg::Shared => Compression::Shared,
            CompressionArg::Dedicated => Compression::Dedicated,
        },
        compression_threshold: args.compression_threshold,
        compression_window_bits: args.compression_window_bits,
        compression_mem_level: args.compression_mem_level,
        compression_budget: args.compression_budget,
        redis: args.redis.as_ref().map(|url| RedisConfig {
            prefix: args.redis_prefix.clone(),
            sharded: args.redis_sharded,
            ..RedisConfig::new(url.clone())
        }),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                sni: args.tls_sni.clone(),
                ..TlsConfig::new(cert, key)
            }),
            _ => None,
        },
        tls_max_handshakes: args.tls_max_handshakes,
        ..Config::default()
    }
}

/// Run the server `make` makes on each loop (`what` it is, for the log) until a signal.
fn serve<H: Handler>(
    config: Config,
    args: &Args,
    mut signals: signal_hook::iterator::Signals,
    what: &str,
    make: impl Fn(usize) -> H + Send + Sync + 'static,
) -> Result<(), wsloop::Error> {
    let on_ws = config.serve_metrics;
    let scheme = match config.tls {
        Some(_) => "wss",
        None => "ws",
    };
    let threads = config.threads;
    let cluster = Cluster::start(config, &args.listen, args.metrics_listen, make)?;
    for bound in cluster.local_addrs() {
        log::info!("{what} listening on {scheme}://{bound}");
        if on_ws {
            let http = if scheme == "wss" { "https" } else { "http" };
            log::info!("metrics on {http}://{bound}/metrics, health on {http}://{bound}/healthz");
        }
    }
    if let Some(bound) = cluster.metrics_addr() {
        log::info!("metrics on http://{bound}/metrics, health on http://{bound}/healthz");
    }
    let plural = if threads == 1 { "" } else { "s" };
    log::info!("{} ({threads} thread{plural})", cluster.budget());
    let handles = cluster.handles().to_vec();
    let signals_handle = signals.handle();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                // Every loop shares the certificates: one reload (logged by itself).
                if let Some(Err(e)) = handles.first().map(|h| h.reload_tls()) {
                    log::warn!("SIGHUP: {e}");
                }
                continue;
            }
            log::info!("signal {sig}: shutting down");
            for h in &handles {
                let _ = h.shutdown(); // `Err(Closed)`: that loop has ended already
            }
            break;
        }
    });
    let result = cluster.join();
    signals_handle.close();
    log::info!("stopped");
    result
}
