//! What one server TLS connection (the transport's, over bytes in memory: `wsloop::fuzzing`)
//! holds on the heap between the loop's turns, measured with a counting allocator, against what
//! the memory budget counts for it ([`TLS_CONNECTION_BYTES`]): new, in the handshake after the
//! server's first flight, and established after small and full-size records and their echo,
//! with TLS 1.3 and 1.2. Each is at most the
//! figure counted, and the largest within 1 KiB of it. Run with `--nocapture` for the figures.
//! (One test: the counting allocator sees every thread's allocations.)
// Test code (see Cargo.toml's [lints]): it fails by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use wsloop::fuzzing::{scratch_capacity, TlsServer, TlsServerConfig};
use wsloop::memory::TLS_CONNECTION_BYTES;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes `f` leaves held.
fn held_by<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let region = Region::new(GLOBAL);
    let t = f();
    let c = region.change();
    // A realloc's growth (or shrinking) is in bytes_allocated (bytes_deallocated) already.
    let held = c.bytes_allocated as isize - c.bytes_deallocated as isize;
    (t, held)
}

mod child_support;

/// A self-signed P-256 certificate for localhost and its key, made with the openssl CLI; `None`
/// (after a note; a failure under CI) without it.
fn certificate(dir: &Path) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let run = child_support::run_bounded(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args([
                "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2",
            ])
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .current_dir(dir)
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    match run {
        Ok(run) if run.status.is_some_and(|s| s.success()) => {}
        Ok(run) => {
            let why = run.stderr.trim().to_string();
            child_support::missing("tls_memory", "openssl", &why, "apt-get install -y openssl");
            return None;
        }
        Err(e) => {
            let why = e.to_string();
            child_support::missing("tls_memory", "openssl", &why, "apt-get install -y openssl");
            return None;
        }
    }
    let certs = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    Some((
        certs,
        PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap(),
    ))
}

/// The socket's send buffer in these measures: larger than any flight, so that nothing is held.
const ROOM: usize = 256 * 1024;

/// The capacity of the in-memory socket's input (`wsloop::fuzzing`'s `Wire`), allocated with
/// the server: not the connection's.
const WIRE_INPUT: usize = 64 * 1024;

/// The server side of one turn as the loop does it: `wire` in, the plaintext read out, the
/// answer written to the socket (returned). What the connection holds after it, with what it
/// held before, is measured; the loop thread's sealing buffer (shared by its connections) is
/// not the connection's.
fn server_turn(
    server: &mut TlsServer,
    wire: &[u8],
    plain: &mut Vec<u8>,
    held: &mut isize,
) -> Vec<u8> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(ROOM);
    let scratch = scratch_capacity() as isize;
    let ((), change) = held_by(|| {
        server.receive(wire);
        loop {
            match server.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        server.take_sent(&mut out);
    });
    *held += change - (scratch_capacity() as isize - scratch);
    out
}

#[test]
fn tls_state_is_counted_as_the_budget_counts_it() {
    let dir = child_support::TempDir::new("tls_memory");
    let Some((certs, _)) = certificate(dir.path()) else {
        return;
    };
    let config =
        TlsServerConfig::load(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();
    #[allow(deprecated)] // ring's provider, as the server's (src/io/tls.rs)
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs[0].clone()).unwrap();
    let counted = TLS_CONNECTION_BYTES as isize;
    let mut most = 0;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut cc = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        cc.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(Arc::new(cc), name).unwrap();
        let (mut server, held) = held_by(|| TlsServer::new(&config, ROOM).unwrap());
        let mut held = held - (WIRE_INPUT + ROOM) as isize;
        println!("{version:?}, new: {held} bytes held");
        most = most.max(held);
        // The client's flights and records, each taken by the server in one turn, and an echo
        // of what it read.
        let mut plain = Vec::with_capacity(64 * 1024); // no growth inside a measure
        let sends: [&[u8]; 5] = [b"", b"", b"GET / HTTP/1.1\r\n\r\n", &[7; 16 * 1024], b"x"];
        let mut established = 0;
        let mut echoed = Vec::new();
        for (i, send) in sends.into_iter().enumerate() {
            client.writer().write_all(send).unwrap();
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            let from = plain.len();
            let mut answer = server_turn(&mut server, &wire, &mut plain, &mut held);
            if server.version().is_some() && plain.len() > from {
                let echo = plain[from..].to_vec();
                let scratch = scratch_capacity() as isize;
                let (taken, change) = held_by(|| server.write(&[&echo]).unwrap());
                assert_eq!(taken, echo.len());
                held += change - (scratch_capacity() as isize - scratch);
                server.take_sent(&mut answer);
            }
            let mut rd = &answer[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().unwrap();
                let _ = client.reader().read_to_end(&mut echoed); // WouldBlock at the end
            }
            println!("{version:?}, after turn {i}: {held} bytes held");
            assert!(
                held <= counted,
                "{version:?}, turn {i}: {held} held, {counted} counted"
            );
            most = most.max(held);
            if server.version().is_some() {
                established = held;
            }
        }
        assert!(!client.is_handshaking() && server.version().is_some());
        assert_eq!(&plain[..18], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(plain.len(), 18 + 16 * 1024 + 1);
        assert_eq!(echoed, plain, "{version:?}: the echo");
        println!("{version:?}: {established} bytes held by an established connection");
    }
    assert!(
        counted - most <= 1024,
        "at most {most} held, {counted} counted"
    );
}
