//! The byte stream under a connection: today a plain TCP socket (TLS adds a variant). The loop
//! reads, writes and shuts down through this type only, so that what lies under a connection can
//! change without the loop knowing. It owns the connection's descriptor: dropping it closes the
//! descriptor.

// The one owner of a connection's socket (Cargo.toml's [lints]): it closes when the
// connection's slot is freed on the close path, which counts it out of the fd ledger.
#![allow(clippy::disallowed_types)]

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use std::io::{self, ErrorKind, IoSlice, Read, Write};

/// One connection's byte stream (non-blocking).
pub(crate) struct Transport {
    stream: TcpStream,
}

impl Transport {
    /// A transport over an accepted TCP connection (Nagle's algorithm off: the loop corks),
    /// with a kernel send buffer of `send_buffer` bytes (0: the kernel's auto-tuning).
    pub(crate) fn tcp(stream: TcpStream, send_buffer: usize) -> Transport {
        let _ = stream.set_nodelay(true);
        if send_buffer > 0 {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(send_buffer);
        }
        Transport { stream }
    }

    /// The peer is being given up on (it did not read in time): if the kernel still holds bytes
    /// for it, the close that follows resets the connection instead of leaving the socket
    /// orphaned with them until the kernel's retries give up (minutes, and memory all along).
    pub(crate) fn abandon(&self) {
        use std::os::fd::AsFd;
        if crate::sys::unsent_bytes(self.stream.as_fd()).is_ok_and(|n| n > 0) {
            self.reset_on_close();
        }
    }

    /// The close that follows resets the connection (`SO_LINGER` 0): whatever the kernel holds
    /// for the peer is discarded at once.
    pub(crate) fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(std::time::Duration::ZERO));
    }

    /// One `recv` into `buf`: `Ok(0)` at the peer's EOF; `WouldBlock` when nothing is there.
    #[inline]
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.stream).read(buf)
    }

    /// One `send` of `bytes`; `Ok(0)` when the socket would block.
    #[inline]
    pub(crate) fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        loop {
            match (&self.stream).write(bytes) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// One `writev` of `parts` (at most `MAX` of them: the rest are not written), in order;
    /// `Ok(0)` when the socket would block.
    pub(crate) fn write_vectored<const MAX: usize>(&self, parts: &[&[u8]]) -> io::Result<usize> {
        debug_assert!(parts.len() <= MAX);
        let mut slices = [IoSlice::new(&[]); MAX];
        let n = parts.len().min(MAX);
        for (slot, part) in slices.iter_mut().zip(parts) {
            *slot = IoSlice::new(part);
        }
        loop {
            match (&self.stream).write_vectored(&slices[..n]) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Shut down the sending side (a FIN after what is already written). Returns whether it
    /// took effect.
    pub(crate) fn shutdown_write(&self) -> bool {
        self.stream.shutdown(std::net::Shutdown::Write).is_ok()
    }
}

impl Source for Transport {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.stream.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.stream.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.stream.deregister(registry)
    }
}
