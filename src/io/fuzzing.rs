//! The server side of a TLS connection exactly as [`Transport`](super::transport::Transport)
//! drives it (the same rustls configuration, handshake, records, read loop, sealed writes and
//! `close_notify`), over bytes in memory instead of a socket: for the `tls` fuzz target
//! (`fuzz/checks/tls.rs`), reached through the crate's hidden `fuzzing` module. Not part of
//! the API.

use super::tls_session::{Tls, TLS_CHUNK, TLS_VERSIONS, WRITE_MAX};
use crate::config::{Config, ConfigError, TlsConfig};
use std::cell::{Cell, RefCell};
use std::io::{self, ErrorKind, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// The most plaintext one TLS record carries.
pub const CHUNK: usize = TLS_CHUNK;

/// The most plaintext one write seals before writing: what is held for a full socket.
pub const WRITE_LIMIT: usize = WRITE_MAX;

/// The smallest read buffer the transport reads into.
pub const MIN_READ_BUFFER: usize = super::tls_session::MIN_READ_BUFFER;

/// The bytes of the loop thread's sealing buffer (shared by all its TLS connections, kept
/// between writes): a memory measure of one connection leaves its growth out.
pub fn scratch_capacity() -> usize {
    super::tls_session::scratch_capacity()
}

/// The server's rustls configuration, made from PEM files as the server makes it.
#[derive(Clone)]
pub struct TlsServerConfig(Arc<rustls::ServerConfig>);

impl TlsServerConfig {
    /// The configuration `--tls-cert cert --tls-key key` gives the server (errors as at
    /// start-up).
    pub fn load(cert: &Path, key: &Path) -> Result<TlsServerConfig, ConfigError> {
        let config = Config {
            tls: Some(TlsConfig::new(cert, key)),
            ..Config::default()
        };
        match super::tls::setup(&config)? {
            Some(setup) => Ok(TlsServerConfig(setup.config)),
            None => Err(ConfigError {
                field: "tls_cert",
                reason: "no TLS configuration".into(),
            }),
        }
    }
}

/// What stands for the socket: the bytes the peer sent that the server has not read, and room
/// for what the server writes (a kernel send buffer of `room` bytes, emptied by
/// [`TlsServer::take_sent`]).
struct Wire {
    input: RefCell<Vec<u8>>,
    /// Where the unread input starts.
    at: Cell<usize>,
    /// The peer's FIN comes after the input.
    eof: Cell<bool>,
    output: RefCell<Vec<u8>>,
    room: Cell<usize>,
}

impl Read for &Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let input = self.input.borrow();
        let rest = &input[self.at.get()..];
        if rest.is_empty() {
            return match self.eof.get() {
                true => Ok(0),
                false => Err(ErrorKind::WouldBlock.into()),
            };
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.at.set(self.at.get() + n);
        Ok(n)
    }
}

impl Write for &Wire {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut output = self.output.borrow_mut();
        let n = bytes.len().min(self.room.get() - output.len());
        if n == 0 && !bytes.is_empty() {
            return Err(ErrorKind::WouldBlock.into());
        }
        output.extend_from_slice(&bytes[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One server-side TLS connection over bytes in memory.
pub struct TlsServer {
    tls: Tls,
    wire: Wire,
}

impl TlsServer {
    /// A new connection of `config` whose socket takes up to `room` bytes before it would
    /// block (its input and output buffers are allocated here, once).
    pub fn new(config: &TlsServerConfig, room: usize) -> io::Result<TlsServer> {
        Ok(TlsServer {
            tls: Tls::new(config.0.clone())?,
            wire: Wire {
                input: RefCell::new(Vec::with_capacity(64 * 1024)),
                at: Cell::new(0),
                eof: Cell::new(false),
                output: RefCell::new(Vec::with_capacity(room)),
                room: Cell::new(room),
            },
        })
    }

    /// The peer's bytes arrive (in the socket's receive buffer).
    pub fn receive(&mut self, bytes: &[u8]) {
        let mut input = self.wire.input.borrow_mut();
        let at = self.wire.at.replace(0);
        input.drain(..at);
        input.extend_from_slice(bytes);
    }

    /// The peer's FIN arrives, after what it sent.
    pub fn receive_eof(&mut self) {
        self.wire.eof.set(true);
    }

    /// [`Transport::read`](super::transport::Transport::read) under TLS; the peer's FIN, once
    /// it arrived, is the event's read-closed flag.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tls.read(&self.wire, buf, self.wire.eof.get())
    }

    /// [`Transport::write_vectored`](super::transport::Transport::write_vectored) under TLS:
    /// the plaintext taken from `parts`.
    pub fn write(&mut self, parts: &[&[u8]]) -> io::Result<usize> {
        self.tls.write(&self.wire, parts)
    }

    /// [`Transport::flush`](super::transport::Transport::flush) under TLS.
    pub fn flush(&mut self) -> io::Result<()> {
        self.tls.flush(&self.wire).map(|_| ())
    }

    /// rustls holds ciphertext the socket did not take.
    pub fn holds(&self) -> bool {
        self.tls.holds()
    }

    /// Our `close_notify`, as before a FIN.
    pub fn close_notify(&mut self) {
        self.tls.close_notify(&self.wire);
    }

    /// The handshake completed: the TLS version ("1.2" or "1.3").
    pub fn version(&self) -> Option<&'static str> {
        self.tls.kind().map(|k| TLS_VERSIONS[k.version])
    }

    /// The socket's send buffer now takes up to `room` bytes.
    pub fn set_room(&mut self, room: usize) {
        let mut output = self.wire.output.borrow_mut();
        let held = output.len();
        let room = room.max(held);
        // Allocated now, not while the server writes.
        output.reserve(room - held);
        self.wire.room.set(room);
    }

    /// Append what the server wrote to the socket to `out` (the peer reads it), making room
    /// again.
    pub fn take_sent(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.wire.output.borrow_mut());
    }
}
