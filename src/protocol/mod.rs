//! The sans-IO protocol core: RFC 6455 from bytes to events and back. Nothing here owns a
//! socket or reads a clock, so every part is deterministic and can be driven by unit tests and
//! fuzzers directly.
//!
//! - [`handshake`]: the HTTP/1.1 upgrade request (RFC 6455 section 4.2) and the responses.
//! - [`frame`]: frame headers, masking (section 5).
//! - [`utf8`]: incremental UTF-8 validation for text messages split across frames.
//! - [`close`]: close codes and payloads (sections 5.5.1 and 7.4).
//! - [`deflate`]: permessage-deflate (RFC 7692): negotiation, bounded inflate, deflate.
//! - [`resp`]: the replies and messages a subscribed Redis connection sends (the Redis
//!   bridge's subscriber), parsed in place and bounded.
//! - [`session`]: one connection's state machine, tying the above together.

pub mod close;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod proxy;
pub mod resp;
pub mod session;
pub mod utf8;
