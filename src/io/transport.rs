//! The byte stream under a connection: a plain TCP socket, or TLS over one
//! ([`Tls`](super::tls_session::Tls): rustls's handshake, then wsloop's own records). The loop
//! reads, writes and shuts down through this type only, so that what lies under a connection can
//! change without the loop knowing. It owns the connection's descriptor: dropping it closes the
//! descriptor.
//!
//! Under TLS the loop's view stays the same: [`Transport::read`] returns decrypted bytes
//! (`WouldBlock` when none), [`Transport::write`] and [`Transport::write_vectored`] take plaintext
//! and return how much they took. The ciphertext held for the socket stays bounded: new plaintext
//! is taken only once what is held has gone to the socket, and a write holds at most
//! [`WRITE_MAX`](super::tls_session::WRITE_MAX) bytes of plaintext sealed. What is held when the
//! socket is full ([`Transport::holds`]) goes out on the next writable edge ([`Transport::flush`]),
//! which the loop calls even when its own queue is empty. Handshake messages owed in answer to what
//! was read are written from the read path. A TLS failure (garbage, cleartext instead of a
//! ClientHello, a bad record, an alert) is an `InvalidData` error, which
//! [`CloseReason::of_io_error`](crate::reason::CloseReason::of_io_error) maps to `tls_error`; the
//! alert that answers it is tried once before. The peer's `close_notify` reads as EOF; ours goes
//! out before our FIN ([`Transport::shutdown_write`]) and, when the connection is closed without
//! one, once before the descriptor closes ([`Transport::close_notify`]).

// The one owner of a connection's socket (Cargo.toml's [lints]): it closes when the
// connection's slot is freed on the close path, which counts it out of the fd ledger.
#![allow(clippy::disallowed_types)]

use super::tls_session::{Tls, TlsKind, MAX_HANDSHAKE_INPUT};
use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::ServerConfig;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::sync::Arc;

/// One connection's byte stream (non-blocking).
pub(crate) struct Transport {
    stream: TcpStream,
    /// TLS state, boxed: a plain connection pays one pointer for it.
    tls: Option<Box<Tls>>,
}

impl Transport {
    /// A transport over an accepted TCP connection (Nagle's algorithm off: the loop corks),
    /// with a kernel send buffer of `send_buffer` bytes (0: the kernel's auto-tuning).
    pub(crate) fn tcp(stream: TcpStream, send_buffer: usize) -> Transport {
        let _ = stream.set_nodelay(true);
        if send_buffer > 0 {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(send_buffer);
        }
        Transport { stream, tls: None }
    }

    /// A TLS transport over an accepted TCP connection (see [`Transport::tcp`]), serving
    /// `config`. Fails only if rustls cannot make a connection of that configuration.
    pub(crate) fn tls(
        stream: TcpStream,
        send_buffer: usize,
        config: Arc<ServerConfig>,
    ) -> io::Result<Transport> {
        let tls = Tls::new(config)?;
        let mut t = Transport::tcp(stream, send_buffer);
        t.tls = Some(Box::new(tls));
        Ok(t)
    }

    /// TLS from a trusted proxy that starts each connection with a PROXY header, in cleartext
    /// before the ClientHello: until [`Transport::start_tls`] the transport reads and writes
    /// bytes as they are (the header, or a refusal of it), and the TLS handshake waits.
    pub(crate) fn expect_proxy_header(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.raw = true;
        }
    }

    /// The PROXY header has been read: what follows is the TLS stream, `rest` its start (the
    /// bytes of the last read after the header), which rustls reads before the socket. Returns
    /// whether such bytes wait: then the caller must read again without waiting for an edge
    /// (the socket may be drained). Nothing for plain TCP (`rest` is the caller's to parse).
    pub(crate) fn start_tls(&mut self, rest: &[u8]) -> bool {
        match self.tls.as_deref_mut() {
            Some(tls) if tls.raw => {
                tls.raw = false;
                // More than the handshake may take fails it anyway: one byte over is enough.
                let keep = rest.len().min(MAX_HANDSHAKE_INPUT + 1);
                tls.early = rest[..keep].to_vec();
                !rest.is_empty()
            }
            _ => false,
        }
    }

    /// The peer is being given up on (it did not read in time): if the kernel (or TLS) still
    /// holds bytes for it, the close that follows resets the connection instead of
    /// leaving the socket orphaned with them until the kernel's retries give up (minutes, and
    /// memory all along).
    pub(crate) fn abandon(&mut self) {
        use std::os::fd::AsFd;
        if self.holds() || crate::sys::unsent_bytes(self.stream.as_fd()).is_ok_and(|n| n > 0) {
            self.reset_on_close();
        }
    }

    /// The close that follows resets the connection (`SO_LINGER` 0): whatever the kernel holds
    /// for the peer is discarded at once.
    pub(crate) fn reset_on_close(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.reset = true;
        }
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(std::time::Duration::ZERO));
    }

    /// Read into `buf`: `Ok(0)` at the peer's EOF; `WouldBlock` when nothing is there. Fewer
    /// bytes than `buf` holds means the socket is drained for now (edge-triggered: new data
    /// raises a new edge). Plain TCP: one `recv`. TLS: the decrypted bytes, reading the socket
    /// until `buf` is full or the socket is drained, and writing what the handshake owes;
    /// `closed` (the event said the peer's FIN or reset is queued, which raises no edge of its
    /// own) makes it read the socket until it says so, instead of stopping at a short read.
    #[inline]
    pub(crate) fn read(&mut self, buf: &mut [u8], closed: bool) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            Some(tls) if !tls.raw => tls.read(&self.stream, buf, closed),
            // Plain TCP, or TLS before its PROXY header is read.
            _ => (&self.stream).read(buf),
        }
    }

    /// Write `bytes`; `Ok(0)` when the socket would block. Plain TCP: one `send`.
    #[inline]
    pub(crate) fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if let Some(tls) = self.tls.as_deref_mut().filter(|t| !t.raw) {
            return tls.write(&self.stream, &[bytes]);
        }
        loop {
            match (&self.stream).write(bytes) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write `parts` (at most `MAX` of them: the rest are not written), in order; `Ok(0)` when
    /// the socket would block. Plain TCP: one `writev`.
    pub(crate) fn write_vectored<const MAX: usize>(
        &mut self,
        parts: &[&[u8]],
    ) -> io::Result<usize> {
        debug_assert!(parts.len() <= MAX);
        let n = parts.len().min(MAX);
        if let Some(tls) = self.tls.as_deref_mut().filter(|t| !t.raw) {
            return tls.write(&self.stream, &parts[..n]);
        }
        let mut slices = [IoSlice::new(&[]); MAX];
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

    /// TLS: ciphertext is held that the socket has not taken yet (it goes out on a writable
    /// edge, through [`Transport::flush`]). Always false for plain TCP.
    #[inline]
    pub(crate) fn holds(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.holds())
    }

    /// What TLS holds of the connection's output (the plaintext of the write whose ciphertext
    /// is held, while any is): counted in the send queue's bytes, against the backpressure
    /// limit and in the memory budget. 0 for plain TCP.
    #[inline]
    pub(crate) fn tls_held(&self) -> usize {
        match self.tls.as_deref() {
            Some(t) if t.holds() => t.chunk,
            _ => 0,
        }
    }

    /// Whether the connection is TLS.
    #[inline]
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// What TLS holds of the connection's input: the ciphertext of a record not complete yet
    /// (less than one record), or in the handshake its input not processed yet (at most
    /// [`MAX_HANDSHAKE_INPUT`]). Counted with the connection's partial messages in the memory
    /// budget. 0 for plain TCP.
    #[inline]
    pub(crate) fn tls_pending(&self) -> usize {
        self.tls.as_deref().map_or(0, |t| t.pending())
    }

    /// Whether the last read stopped before the socket drained (TLS: it read
    /// [`TLS_READ_MAX`](super::tls_session::TLS_READ_MAX) bytes, or the read buffer had no room
    /// for the rest of a record): the loop reads the connection again next turn, since no new
    /// edge will come for what is already there. Cleared by asking.
    #[inline]
    pub(crate) fn take_more(&mut self) -> bool {
        self.tls
            .as_deref_mut()
            .is_some_and(|t| std::mem::take(&mut t.more))
    }

    /// Whether TLS holds anything of the connection's (output to send, or input not complete
    /// yet): false for plain TCP.
    #[inline]
    pub(crate) fn tls_holds(&self) -> bool {
        self.tls
            .as_deref()
            .is_some_and(|t| t.pending() > 0 || t.holds())
    }

    /// Write what TLS holds (see [`Transport::holds`]), as far as the socket takes it.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        match self.tls.as_deref_mut() {
            None => Ok(()),
            Some(tls) => tls.flush(&self.stream).map(|_| ()),
        }
    }

    /// Shut down the sending side (a FIN after what is already written; under TLS, after our
    /// `close_notify`). Returns whether it took effect.
    pub(crate) fn shutdown_write(&mut self) -> bool {
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.close_notify(&self.stream);
        }
        self.stream.shutdown(std::net::Shutdown::Write).is_ok()
    }

    /// TLS: before the descriptor closes, tell the peer the stream ended cleanly
    /// (`close_notify`, one try), unless it was sent already, the handshake never completed,
    /// rustls failed, or the connection is being reset. Nothing for plain TCP.
    pub(crate) fn close_notify(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            if tls.reported && !tls.reset {
                tls.close_notify(&self.stream);
            }
        }
    }

    /// A TLS connection whose handshake has not completed (or not been reported complete by
    /// [`Transport::take_established`] yet).
    #[inline]
    pub(crate) fn handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| !t.reported)
    }

    /// TLS: the handshake has completed since the last call: its version and cipher suite,
    /// once.
    #[inline]
    pub(crate) fn take_established(&mut self) -> Option<TlsKind> {
        let tls = self.tls.as_deref_mut()?;
        if tls.reported {
            return None;
        }
        let kind = tls.kind()?;
        tls.reported = true;
        Some(kind)
    }

    /// TLS, handshake completed: its version and cipher suite.
    pub(crate) fn tls_kind(&self) -> Option<TlsKind> {
        self.tls.as_ref().filter(|t| t.reported)?.kind()
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

#[cfg(test)]
mod tests {
    // A loopback pair, the openssl CLI and a scratch folder for the test's certificates.
    #![allow(clippy::disallowed_methods, clippy::disallowed_types)]
    use super::Transport;
    use crate::io::tls_session::{MIN_READ_BUFFER, WRITE_MAX};
    use std::io::{ErrorKind, Read, Write};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A scratch folder, removed when dropped (a failing test too).
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA and a server certificate for localhost, made with the openssl CLI in a fresh
    /// folder; `None` (with a note) without openssl, a failure under CI.
    fn pki() -> Option<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "wsloop-transport-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = Scratch(dir);
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        let steps = [
            format!("req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=ca"),
            format!("req -new {ec} -keyout key.pem -out s.csr -subj /CN=localhost"),
            "x509 -req -in s.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem \
             -days 2 -extfile s.ext"
                .to_string(),
        ];
        std::fs::write(
            dir.join("s.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        for step in steps {
            let out = Command::new("openssl")
                .args(step.split(' '))
                .current_dir(&*dir)
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                _ if std::env::var("CI")
                    .is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false")) =>
                {
                    panic!("openssl {step} failed ({out:?}) and CI is set")
                }
                _ => {
                    eprintln!("note: openssl is not available; skipping this transport test");
                    return None;
                }
            }
        }
        Some(dir)
    }

    fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        #[allow(deprecated)] // ring's provider, as the server's
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// The server side of a TLS connection over loopback, with a small send buffer, past its
    /// handshake; and the client, which reads nothing unless told.
    fn established(
        dir: &Path,
    ) -> (
        Transport,
        rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    ) {
        established_with(dir, client_config(dir))
    }

    /// [`established`] with this client configuration.
    fn established_with(
        dir: &Path,
        config: Arc<rustls::ClientConfig>,
    ) -> (
        Transport,
        rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    ) {
        let setup = crate::io::tls::load(
            &crate::config::TlsConfig::new(dir.join("cert.pem"), dir.join("key.pem")),
            0,
        )
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut t = Transport::tls(
            mio::net::TcpStream::from_std(server),
            16 * 1024,
            setup.config,
        )
        .unwrap();
        // The client's handshake in a thread; the server's driven here, as the loop would.
        let hs = std::thread::spawn(move || {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let conn = rustls::ClientConnection::new(config, name).unwrap();
            let mut s = rustls::StreamOwned::new(conn, client);
            s.sock
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).unwrap();
            }
            s
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; MIN_READ_BUFFER];
        while t.take_established().is_none() {
            match t.read(&mut buf, false) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => panic!("{other:?}"),
            }
            let _ = t.flush();
            assert!(Instant::now() < deadline, "no handshake");
            std::thread::sleep(Duration::from_millis(1));
        }
        (t, hs.join().unwrap())
    }

    /// A peer that does not read: the transport takes plaintext only while nothing is held,
    /// at most one write's worth sealed at a time, so it never holds more than that (plus its
    /// records' overhead), however much the caller offers; then it takes nothing until a flush.
    #[test]
    fn tls_holds_at_most_one_write_for_a_peer_that_does_not_read() {
        let Some(dir) = pki() else { return };
        let (mut t, mut client) = established(&dir);
        let offer = vec![7u8; 8 << 20];
        let mut taken = 0;
        for _ in 0..1000 {
            let n = t
                .write_vectored::<2>(&[&offer[..1000], &offer[1000..]])
                .unwrap();
            taken += n;
            if n == 0 {
                break;
            }
        }
        assert!(t.holds(), "the socket never filled ({taken} bytes taken)");
        assert_eq!(t.write(&offer).unwrap(), 0, "took more while some was held");
        let held = t.tls.as_deref().unwrap().held_len();
        assert!(held > 0 && held <= WRITE_MAX + 64, "held {held} bytes");
        // What the socket got arrives, in order, once the client reads (what is held never
        // leaves: the test stops at what the socket got).
        client
            .sock
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&b| b == 7));
                    got += n;
                }
                Err(_) => break,
            }
        }
        assert!(got > 0 && got < taken, "got {got} of {taken}");
    }

    /// A read hands out every decrypted byte, into a buffer of the smallest size allowed or
    /// larger than everything sent (a smaller one is refused: a record is opened where it is
    /// read); the client's close_notify is the end (`Ok(0)`), repeatedly.
    #[test]
    fn reads_return_the_plaintext_and_the_peers_close_notify_as_eof() {
        let Some(dir) = pki() else { return };
        let (mut t, mut client) = established(&dir);
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        client.write_all(&sent).unwrap();
        client.conn.send_close_notify();
        client.flush().unwrap();
        let small = t.read(&mut [0u8; 1000], false).unwrap_err();
        assert_eq!(small.kind(), ErrorKind::InvalidInput);
        let sizes = [MIN_READ_BUFFER, MIN_READ_BUFFER + 7, 100_000];
        let got = read_all(&mut t, usize::MAX, &sizes);
        assert!(got == sent, "{} bytes read, differing", got.len());
        assert_eq!(t.read(&mut [0u8; 16], false).unwrap(), 0);
    }

    /// A close_notify that comes in the same read as data: the read returns the data and asks
    /// the loop to read again (no edge will come for the end), and that read is the end.
    #[test]
    fn a_close_notify_read_with_data_asks_for_another_read() {
        let Some(dir) = pki() else { return };
        let (mut t, mut client) = established(&dir);
        client.write_all(b"last words").unwrap();
        client.conn.send_close_notify();
        client.flush().unwrap(); // one write: the data record, then the close_notify
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = vec![0u8; MIN_READ_BUFFER];
        assert_eq!(t.read(&mut buf, false).unwrap(), 10);
        assert_eq!(&buf[..10], b"last words");
        assert!(t.take_more(), "the end waits for an edge that never comes");
        assert_eq!(t.read(&mut buf, false).unwrap(), 0);
    }

    /// Read from the server's transport until `want` bytes came (or the end), as the loop
    /// would, into buffers of these sizes in turn: on each WouldBlock, a short wait.
    fn read_all(t: &mut Transport, want: usize, sizes: &[usize]) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        for &size in sizes.iter().cycle() {
            if got.len() >= want {
                break;
            }
            let mut buf = vec![0u8; size];
            match t.read(&mut buf, false) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
            assert!(Instant::now() < deadline, "{} of {want} bytes", got.len());
        }
        got
    }

    /// Every suite the server offers, with TLS 1.3 and 1.2: data both ways in records of every
    /// size, the client's key updates (asking for the server's too) in between, and the
    /// client's close_notify as the end.
    #[test]
    fn every_suite_carries_data_both_ways_through_key_updates() {
        use rustls::crypto::ring::cipher_suite as cs;
        let Some(dir) = pki() else { return };
        let suites = [
            (cs::TLS13_AES_128_GCM_SHA256, &rustls::version::TLS13),
            (cs::TLS13_AES_256_GCM_SHA384, &rustls::version::TLS13),
            (cs::TLS13_CHACHA20_POLY1305_SHA256, &rustls::version::TLS13),
            (
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                &rustls::version::TLS12,
            ),
            (
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                &rustls::version::TLS12,
            ),
            (
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                &rustls::version::TLS12,
            ),
        ];
        for (suite, version) in suites {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            #[allow(deprecated)] // ring's provider, as the server's
            let provider = rustls::crypto::CryptoProvider {
                cipher_suites: vec![suite],
                ..rustls::crypto::ring::default_provider()
            };
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let (mut t, mut client) = established_with(&dir, Arc::new(config));
            let name = suite.suite().as_str().unwrap();
            let kind = t.tls_kind().unwrap();
            assert_eq!(crate::io::tls_session::TLS_CIPHERS[kind.cipher], name);
            let tls13 = version.version == rustls::ProtocolVersion::TLSv1_3;
            assert_eq!(kind.version, usize::from(tls13));
            client
                .sock
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            for (i, size) in [0usize, 1, 100, 16 * 1024, 16 * 1024 + 1, 100_000]
                .into_iter()
                .enumerate()
            {
                let data: Vec<u8> = (0..size).map(|j| (j * 13 + i) as u8).collect();
                // Client to server, a key update first (TLS 1.3).
                if tls13 {
                    client.conn.refresh_traffic_keys().unwrap();
                }
                client.write_all(&data).unwrap();
                client.flush().unwrap();
                assert!(
                    read_all(&mut t, size, &[MIN_READ_BUFFER]) == data,
                    "{name}: {size} bytes in"
                );
                // Server to client.
                let mut at = 0;
                while at < size {
                    match t.write(&data[at..]).unwrap() {
                        0 => {
                            t.flush().unwrap();
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        n => at += n,
                    }
                }
                while t.holds() {
                    t.flush().unwrap();
                }
                let mut back = vec![0u8; size];
                client.read_exact(&mut back).unwrap();
                assert!(back == data, "{name}: {size} bytes out");
            }
            client.conn.send_close_notify();
            client.flush().unwrap();
            assert!(
                read_all(&mut t, usize::MAX, &[MIN_READ_BUFFER]).is_empty(),
                "{name}: the end"
            );
            assert_eq!(t.read(&mut vec![0u8; MIN_READ_BUFFER], false).unwrap(), 0);
        }
    }

    /// Key updates that ask for ours while the server is silent get one, before its next
    /// data (RFC 8446 §4.6.3): 33 requests (data between them, so that the server takes them
    /// all) would otherwise make 33 answers, which a rustls client refuses past 32 without
    /// application data between them, and which would give the peer a record back for each.
    #[test]
    fn requested_key_updates_get_one_answer_before_the_next_data() {
        let Some(dir) = pki() else { return };
        let (mut t, mut client) = established(&dir);
        client
            .sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The server's session tickets and a first message read: the socket is empty.
        assert_eq!(t.write(b"hi").unwrap(), 2);
        let mut hi = [0u8; 2];
        client.read_exact(&mut hi).unwrap();
        for round in 0..3 {
            for _ in 0..11 {
                client.conn.refresh_traffic_keys().unwrap();
            }
            client.write_all(&[round]).unwrap();
            client.flush().unwrap();
            assert_eq!(read_all(&mut t, 1, &[MIN_READ_BUFFER]), [round]);
        }
        assert!(!t.holds());
        // Nothing was written in answer yet: the socket holds nothing for the client.
        client.sock.set_nonblocking(true).unwrap();
        let mut probe = [0u8; 1];
        let pending = std::io::Read::read(&mut client.sock, &mut probe);
        assert!(
            matches!(&pending, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "the server wrote before its data: {pending:?}"
        );
        client.sock.set_nonblocking(false).unwrap();
        assert_eq!(t.write(b"after").unwrap(), 5);
        let mut back = [0u8; 5];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"after");
        // The client and the server agree on the keys: more data both ways.
        client.write_all(b"again").unwrap();
        client.flush().unwrap();
        assert_eq!(read_all(&mut t, 5, &[MIN_READ_BUFFER]), b"again");
        assert_eq!(t.write(b"more").unwrap(), 4);
        let mut back = [0u8; 4];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"more");
    }
}
