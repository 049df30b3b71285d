//! The tokio-tungstenite peer of `benches/compare.sh`: a WebSocket echo server on tokio's
//! single-threaded (current_thread) runtime, written the way its documentation shows (one task
//! per connection, `next()` then `send()`), so that wsloop is compared with idiomatic async
//! Rust. Binary and text messages come back as they came; pings are answered by tungstenite.
//!
//! `tokio_echo --listen 127.0.0.1:9001 [--max-message-size BYTES] [--read-buffer BYTES]
//! [--tls-cert FILE --tls-key FILE]`.
//! `--read-buffer` is tungstenite's `read_buffer_size` (default 128 KiB, which tungstenite
//! zero-fills before every read call). With `--tls-cert` and `--tls-key` (PEM) it serves wss://
//! through tokio-rustls (the peer of `benches/tls.sh`), configured as wsloop's own TLS is
//! (src/io/tls.rs): rustls with the `ring` provider, TLS 1.3 and 1.2, ALPN `http/1.1`, no
//! client certificates, rustls's other defaults. Run by `cargo bench` (with `--bench`), it does
//! nothing and exits.
// Benchmark code (see Cargo.toml's [lints]): it stops on the first error, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[path = "../tests/rlimit_support/mod.rs"]
mod rlimit_support;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--bench") {
        println!("tokio_echo: nothing to do under `cargo bench`; benches/compare.sh runs it");
        return Ok(());
    }
    let mut listen: SocketAddr = "127.0.0.1:9001".parse().expect("address");
    let mut max_message = 64 * 1024;
    let mut read_buffer = WebSocketConfig::default().read_buffer_size;
    let (mut cert, mut key) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it.next();
        match (a.as_str(), value) {
            ("--listen", Some(v)) => listen = v.parse().expect("--listen ADDR:PORT"),
            ("--max-message-size", Some(v)) => {
                max_message = v.parse().expect("--max-message-size N")
            }
            ("--read-buffer", Some(v)) => read_buffer = v.parse().expect("--read-buffer N"),
            ("--tls-cert", Some(v)) => cert = Some(v.clone()),
            ("--tls-key", Some(v)) => key = Some(v.clone()),
            _ => usage(),
        }
    }
    let tls = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(TlsAcceptor::from(tls_config(&cert, &key))),
        _ => usage(),
    };
    raise_nofile_limit();
    let opts = Opts {
        max_message,
        read_buffer,
        tls,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?
        .block_on(serve(listen, opts))
}

fn usage() -> ! {
    eprintln!(
        "usage: tokio_echo --listen ADDR:PORT [--max-message-size BYTES] [--read-buffer BYTES] [--tls-cert FILE --tls-key FILE]"
    );
    std::process::exit(2);
}

/// What every connection is served with.
#[derive(Clone)]
struct Opts {
    max_message: usize,
    read_buffer: usize,
    /// wss://: the TLS handshake first.
    tls: Option<TlsAcceptor>,
}

/// The server's TLS configuration from a PEM certificate chain and key, as wsloop makes its own.
fn tls_config(cert: &str, key: &str) -> Arc<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .unwrap_or_else(|e| panic!("--tls-cert {cert}: {e}"));
    let key = PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("--tls-key {key}: {e}"));
    // ring, as wsloop's (rustls deprecates it for its lack of post-quantum key exchange).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Take the hard descriptor limit as the soft one (10000 connections need more than 1024).
fn raise_nofile_limit() {
    if let Err(e) = rlimit_support::raise_nofile_limit() {
        eprintln!("tokio_echo: cannot raise RLIMIT_NOFILE: {e}");
    }
}

async fn serve(listen: SocketAddr, opts: Opts) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let scheme = if opts.tls.is_some() { "wss" } else { "ws" };
    eprintln!(
        "tokio_echo listening on {scheme}://{}",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or similar: back off briefly instead of spinning.
                eprintln!("tokio_echo: accept: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        tokio::spawn(accept(stream, opts.clone()));
    }
}

/// A new connection: its TLS handshake (wss://), then the WebSocket echo.
async fn accept(stream: TcpStream, opts: Opts) {
    let _ = stream.set_nodelay(true);
    let Opts {
        max_message,
        read_buffer,
        tls,
    } = opts;
    match tls {
        None => connection(stream, max_message, read_buffer).await,
        Some(acceptor) => {
            if let Ok(stream) = acceptor.accept(stream).await {
                connection(stream, max_message, read_buffer).await;
            }
        }
    }
}

async fn connection<S>(stream: S, max_message: usize, read_buffer: usize)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .read_buffer_size(read_buffer);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        // Pings are answered and closes replied to inside tungstenite; other frames are only
        // read, until the stream ends, so that the close reply is flushed.
        let data = matches!(msg, Message::Text(_) | Message::Binary(_));
        if data && ws.send(msg).await.is_err() {
            return;
        }
    }
}
