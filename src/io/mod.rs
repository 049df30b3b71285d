//! What moves a connection's bytes: the [`transport`](transport) under it (plain TCP or TLS,
//! whose configuration [`tls`](tls) makes), and its [`out`](out)put (the loop's cork, direct
//! writes of large payloads, the per-connection queue).

pub(crate) mod out;
pub(crate) mod tls;
pub(crate) mod transport;
