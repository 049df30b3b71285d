//! wss:// for the load generator (`--tls-ca FILE`): rustls's client connection (the `ring`
//! provider, as the server's), driven sans-IO over the same non-blocking mio socket as plain
//! connections. A connection branches once per read or write call on whether it has TLS (see
//! `Client` in loadgen.rs); nothing here runs for plain connections.
//!
//! Every connection makes a full handshake (session resumption is off) with an X25519 key
//! share, so that the handshake mode measures what a new browser-like client costs the server.
//! The reads keep loadgen's contract: fewer bytes than the buffer holds means the socket is
//! drained for now (edge-triggered polling).

use super::Common;
use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::io::{self, ErrorKind, Read, Write};
use std::sync::Arc;

/// Plaintext handed to rustls per write call at most: one full TLS record.
const CHUNK: usize = 16 * 1024;

/// What every TLS connection of a run shares: the configuration and the server's name.
pub struct Tls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Tls {
    /// The TLS set-up `c` asks for (`None`: plain ws://).
    pub fn of(c: &Common) -> Result<Option<Tls>, String> {
        let Some(ca) = &c.tls_ca else {
            return Ok(None);
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("--tls-ca {}: no certificate in it", ca.display()));
        }
        // ring, as the server's provider (rustls deprecates it for its lack of post-quantum
        // key exchange; the benchmark compares servers that both use it). Key exchange: X25519
        // first, as browsers, curl and openssl offer it (their key share); ring's default
        // order in rustls 0.23.48 puts secp384r1 first, which a rustls server then takes, and
        // ring's P-384 costs the server about 3 times the CPU of a whole X25519 handshake.
        #[allow(deprecated)]
        let provider = {
            use rustls::crypto::ring::{default_provider, kx_group};
            let mut p = default_provider();
            p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
            Arc::new(p)
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // A full handshake every time: the handshake rate is that of new clients.
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(c.tls_name.clone())
            .map_err(|e| format!("--tls-name {}: {e}", c.tls_name))?;
        Ok(Some(Tls {
            config: Arc::new(config),
            name,
        }))
    }

    /// A new client connection (its ClientHello queued, to go out once TCP connects).
    pub fn connection(&self) -> io::Result<Box<ClientConnection>> {
        ClientConnection::new(self.config.clone(), self.name.clone())
            .map(Box::new)
            .map_err(invalid)
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e)
}

/// The TLS version `conn` negotiated, as RESULT lines name it.
pub fn version(conn: &ClientConnection) -> Option<&'static str> {
    match conn.protocol_version()? {
        rustls::ProtocolVersion::TLSv1_2 => Some("1.2"),
        rustls::ProtocolVersion::TLSv1_3 => Some("1.3"),
        _ => Some("other"),
    }
}

/// The socket as rustls reads it, noting a read shorter than asked for (drained for now).
struct Probe<'a> {
    sock: &'a mut TcpStream,
    short: bool,
}

impl Read for Probe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.sock.read(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(n) => {
                    self.short = n < buf.len();
                    return Ok(n);
                }
            }
        }
    }
}

/// Decrypted bytes into `buf`, as loadgen's `read_some`: `Ok(None)` when nothing is there,
/// `Ok(Some(0))` at the end of the stream (the server's `close_notify` or TCP's EOF), fewer
/// bytes than `buf` holds only once the socket is drained. Writes what the handshake owes.
pub fn read(
    conn: &mut ClientConnection,
    sock: &mut TcpStream,
    buf: &mut [u8],
) -> io::Result<Option<usize>> {
    let mut filled = 0;
    let mut drained = false;
    loop {
        while filled < buf.len() {
            match conn.reader().read(&mut buf[filled..]) {
                Ok(0) => return Ok(Some(filled)), // close_notify
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(Some(filled)),
                Err(e) => return Err(e),
            }
        }
        if filled == buf.len() {
            return Ok(Some(filled));
        }
        if drained {
            return Ok((filled > 0).then_some(filled));
        }
        let mut probe = Probe { sock, short: false };
        match conn.read_tls(&mut probe) {
            Ok(0) => drained = true, // TCP's EOF: the reader says it next
            Ok(_) => drained = probe.short,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Ok((filled > 0).then_some(filled))
            }
            Err(e) => return Err(e),
        }
        if let Err(e) = conn.process_new_packets() {
            let _ = conn.write_tls(sock); // rustls's alert, one try
            return Err(invalid(e));
        }
        flush(conn, sock)?;
    }
}

/// Plaintext from `bytes` (one record's worth at most) into rustls, once what it held has gone
/// to the socket; returns the bytes taken (`Ok(0)`: the socket is full). Before the handshake
/// completes rustls keeps the plaintext and sends it after.
pub fn write(conn: &mut ClientConnection, sock: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    if !flush(conn, sock)? {
        return Ok(0);
    }
    let n = conn.writer().write(&bytes[..bytes.len().min(CHUNK)])?;
    flush(conn, sock)?;
    Ok(n)
}

/// Write what rustls holds: true when it holds nothing more, false when the socket is full.
pub fn flush(conn: &mut ClientConnection, sock: &mut TcpStream) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Our `close_notify`, one try, if the handshake completed (as a well-behaved client does
/// before closing).
pub fn close_notify(conn: &mut ClientConnection, sock: &mut TcpStream) {
    if !conn.is_handshaking() {
        conn.send_close_notify();
        let _ = flush(conn, sock);
    }
}
