//! The event loop, in files of one job each (each imports only from the files above it in this
//! list, and from the layers below `server`):
//!
//! - [`conn`]: one connection's state, id and timer entry;
//! - [`core`]: the loop's state, clock, start-up and descriptor accounting;
//! - [`ws`]: frames and the application's callbacks after the upgrade;
//! - [`close`]: THE close path, the only code that frees a slab slot;
//! - [`write`], [`timers`], [`accept`], [`report`], [`ctx`], [`handle`]: the write path, the
//!   deadlines, accepting, metrics and health, and reaching the loop;
//! - [`event_loop`]: [`Server`], the turn and dispatch;
//! - [`read`], [`http`]: the read path, and the HTTP phase before the upgrade.

mod accept;
mod budget;
mod close;
mod conn;
mod core;
mod ctx;
mod deliver;
mod event_loop;
mod handle;
mod http;
mod read;
mod report;
mod timers;
mod topics;
mod write;
mod ws;

pub use ctx::Ctx;
pub use event_loop::Server;
pub use handle::{LoopHandle, QueueError, QueueStats};
