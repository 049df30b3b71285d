//! [`Error`]: why a [`Server`](crate::Server) or [`Cluster`](crate::Cluster) could not start
//! or stopped running, typed: an invalid configuration names its field, a failed listen names
//! its address.

use crate::config::ConfigError;
use std::fmt;
use std::io;
use std::net::SocketAddr;

/// Why a server or cluster could not start, or its loop stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid, or does not fit the process (its descriptor limit): which
    /// field, and what is wrong with it.
    Config(ConfigError),
    /// Listening on this address failed (in use, not a local address, no permission).
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        source: io::Error,
    },
    /// A system call the loop needs failed (epoll, an eventfd, a thread, a descriptor count).
    Io(io::Error),
    /// A loop of a cluster panicked (with [`Config::catch_panics`](crate::Config::catch_panics)
    /// off, a handler's panic ends its loop), or ended while starting.
    LoopFailed {
        /// The loop's index.
        loop_index: usize,
        /// What happened.
        what: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => e.fmt(f),
            Error::Listen { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Io(e) => e.fmt(f),
            Error::LoopFailed { loop_index, what } => write!(f, "loop {loop_index} {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(e) => Some(e),
            Error::Listen { source, .. } => Some(source),
            Error::Io(e) => Some(e),
            Error::LoopFailed { .. } => None,
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// So that `?` works in a function returning `io::Result`: a configuration error becomes
/// `InvalidInput` (with the [`ConfigError`] inside), a listen error keeps its kind.
impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Config(c) => io::Error::new(io::ErrorKind::InvalidInput, c),
            Error::Listen { addr, source } => {
                io::Error::new(source.kind(), format!("cannot listen on {addr}: {source}"))
            }
            Error::Io(e) => e,
            failed @ Error::LoopFailed { .. } => io::Error::other(failed.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_and_keep_their_kind_as_io_errors() {
        let config = Error::Config(ConfigError {
            field: "max_connections",
            reason: "must be at least 1".into(),
        });
        assert_eq!(
            config.to_string(),
            "invalid max_connections: must be at least 1"
        );
        let io: io::Error = config.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
        let inner = io.get_ref().and_then(|e| e.downcast_ref::<ConfigError>());
        assert_eq!(inner.map(|c| c.field), Some("max_connections"));
        let listen = Error::Listen {
            addr: "127.0.0.1:80".parse().unwrap(),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        assert!(listen
            .to_string()
            .starts_with("cannot listen on 127.0.0.1:80: "));
        assert_eq!(io::Error::from(listen).kind(), io::ErrorKind::AddrInUse);
    }
}
