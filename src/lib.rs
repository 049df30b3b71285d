//! # wsloop
//!
//! A WebSocket server on a single-threaded epoll event loop (mio), in the style of
//! uWebSockets, built to never leak or run out of file descriptors.
//!
//! - [`Server`] owns the loop: listeners, connections in a slab with generation-tagged tokens, a
//!   hierarchical [timer wheel](timer_wheel) for every deadline, and one close path.
//! - An application implements [`Handler`]: an upgrade hook that accepts (with per-connection
//!   data) or rejects, and callbacks for open, message, drain and close. Callbacks receive a
//!   [`WebSocket`] through which they send and close.
//! - Other threads reach the loop through a [`LoopHandle`].
//! - [`protocol`] is the sans-IO core (handshake, frames, messages, close codes): no sockets,
//!   no clock, driven directly by tests and fuzzers.
//!
//! ```no_run
//! use wsloop::{Config, Decision, Handler, Message, Server, UpgradeRequest, WebSocket};
//!
//! struct Echo;
//! impl Handler for Echo {
//!     type Data = ();
//!     fn upgrade(&mut self, _req: &UpgradeRequest<'_>) -> Decision<()> {
//!         Decision::accept(())
//!     }
//!     fn on_message(&mut self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
//!         ws.send(msg);
//!     }
//! }
//!
//! let mut server = Server::new(Config::default(), Echo)?;
//! let addr = server.listen("127.0.0.1:9001".parse().unwrap())?;
//! println!("echo on ws://{addr}");
//! server.run()?;
//! # Ok::<(), wsloop::Error>(())
//! ```
//!
//! ## Layers
//!
//! Each module imports only from its own layer or those below (`tests/layers.rs` checks it):
//!
//! ```text
//! 7  lib, main                      re-exports; the wsloop binary
//! 6  cluster                        N loops on one port (SO_REUSEPORT)
//! 5  server/                        the event loop: conn, core, ws, close, write, timers,
//!                                   accept, report, ctx, handle, event_loop, read, http
//! 4  metrics, ledger, audit,        counters and rendering; what loops share and the fd
//!    watchdog                       budget; the fd audit thread; the stall watchdog
//! 3  app                            Handler, WebSocket, Message, Decision, ConnId
//! 2  io/                            transport (the byte stream), out (cork, writev, queue)
//! 1  protocol/, reason              the sans-IO core; why connections end, in one table
//! 0  sys, config, error,            libc and unsafe; limits; errors; timers; per-address
//!    timer_wheel, admission, origin admission; the origin policy
//! ```
#![deny(missing_docs)]
// `unsafe` only in `sys` (allowed below, on that module alone): the compiler refuses it anywhere
// else. Cargo.toml's `[lints]` denies it in every other target too, and the lints that keep
// descriptors and panics in their place are explained there.
#![deny(unsafe_code)]

// Layer 0: no wsloop imports.
pub mod admission;
pub mod config;
mod error;
pub mod memory;
pub mod origin;
// The libc wrapper: every `unsafe` block of the crate, each with a `// SAFETY:` comment. Private:
// a WebSocket library does not export system calls.
#[allow(unsafe_code)]
mod sys;
pub mod timer_wheel;
pub mod topics;
// Layer 1: the sans-IO protocol core.
pub mod protocol;
mod reason;
// Layer 2: moving a connection's bytes.
mod io;
// Layer 3: the application's API.
mod app;
// Layer 4: what the loops report and share.
mod audit;
mod bridge;
mod broker;
mod ledger;
pub mod metrics;
mod watchdog;
// Layer 5: the event loop.
mod server;
// Layer 6: N loops on one port.
mod cluster;

/// For the fuzz targets only (`fuzz/checks/tls.rs`): the server side of a TLS connection as
/// the transport drives it, over bytes in memory. Not part of the API: no stability promise.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::io::fuzzing::*;
}

pub use app::{
    CloseReason, ConnId, Decision, Handler, Message, SendStatus, UpgradeRequest, WebSocket,
};
pub use cluster::Cluster;
pub use config::{
    BackpressurePolicy, Compression, Config, ConfigError, RedisConfig, SniCertificate, TlsConfig,
};
pub use error::Error;
pub use ledger::{set_fd_limit, Budget};
pub use metrics::{Stats, ACCEPT_ERRNO_LABELS};
pub use protocol::close::CloseCode;
pub use server::{Ctx, LoopHandle, QueueError, QueueStats, Server};

/// The README's examples, compiled as doc tests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
