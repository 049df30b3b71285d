//! What moves a connection's bytes: the [`transport`](transport) under it, and its
//! [`out`](out)put (the loop's cork, direct writes of large payloads, the per-connection queue).

pub(crate) mod out;
pub(crate) mod transport;
