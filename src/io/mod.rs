//! What moves a connection's bytes: the [`transport`](transport) under it (plain TCP or TLS:
//! the connection [`tls_session`](tls_session), its [`records`](records), and the
//! configuration [`tls`](tls) makes), and its [`out`](out)put (the loop's cork, direct
//! writes of large payloads, the per-connection queue); and, for the `tls` fuzz target, the
//! TLS transport over bytes in memory ([`fuzzing`](fuzzing)).

pub(crate) mod fuzzing;
pub(crate) mod out;
pub(crate) mod records;
pub(crate) mod tls;
pub(crate) mod tls_session;
pub(crate) mod transport;
