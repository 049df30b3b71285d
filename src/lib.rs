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
//! # Ok::<(), std::io::Error>(())
//! ```
#![warn(missing_docs)]

pub mod admission;
mod app;
mod audit;
mod cluster;
pub mod config;

mod event_loop;
mod handle;
mod io;
mod listener;
pub mod metrics;
pub mod origin;
pub mod protocol;
mod reason;
pub mod sys;
pub mod timer_wheel;
mod watchdog;
mod write;

pub use app::{
    CloseReason, ConnId, Decision, Handler, Message, SendStatus, UpgradeRequest, WebSocket,
};
pub use cluster::{Budget, Cluster};
pub use config::{BackpressurePolicy, Config, ConfigError};
pub use event_loop::{Server, Stats, ACCEPT_ERRNO_LABELS};
pub use handle::{Ctx, LoopHandle, QueueError, QueueStats};
pub use protocol::close::CloseCode;

/// The README's examples, compiled as doc tests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
