//! The tokio-tungstenite peer of `benches/compare.sh`: a WebSocket echo server on tokio's
//! single-threaded (current_thread) runtime, written the way its documentation shows (one task
//! per connection, `next()` then `send()`), so that wsloop is compared with idiomatic async
//! Rust. Binary and text messages come back as they came; pings are answered by tungstenite.
//!
//! `tokio_echo --listen 127.0.0.1:9001 [--max-message-size BYTES] [--read-buffer BYTES]`.
//! `--read-buffer` is tungstenite's `read_buffer_size` (default 128 KiB, which tungstenite
//! zero-fills before every read call). Run by `cargo bench` (with `--bench`), it does nothing
//! and exits.
// Benchmark code (see Cargo.toml's [lints]): it stops on the first error, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[path = "../tests/rlimit_support/mod.rs"]
mod rlimit_support;

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
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
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it.next();
        match (a.as_str(), value) {
            ("--listen", Some(v)) => listen = v.parse().expect("--listen ADDR:PORT"),
            ("--max-message-size", Some(v)) => {
                max_message = v.parse().expect("--max-message-size N")
            }
            ("--read-buffer", Some(v)) => read_buffer = v.parse().expect("--read-buffer N"),
            _ => {
                eprintln!(
                    "usage: tokio_echo --listen ADDR:PORT [--max-message-size BYTES] [--read-buffer BYTES]"
                );
                std::process::exit(2);
            }
        }
    }
    raise_nofile_limit();
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?
        .block_on(serve(listen, max_message, read_buffer))
}

/// Take the hard descriptor limit as the soft one (10000 connections need more than 1024).
fn raise_nofile_limit() {
    if let Err(e) = rlimit_support::raise_nofile_limit() {
        eprintln!("tokio_echo: cannot raise RLIMIT_NOFILE: {e}");
    }
}

async fn serve(listen: SocketAddr, max_message: usize, read_buffer: usize) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("tokio_echo listening on ws://{}", listener.local_addr()?);
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
        tokio::spawn(connection(stream, max_message, read_buffer));
    }
}

async fn connection(stream: TcpStream, max_message: usize, read_buffer: usize) {
    let _ = stream.set_nodelay(true);
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
