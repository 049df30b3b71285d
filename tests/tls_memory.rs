//! What rustls holds on the heap for one server connection between the loop's turns, measured
//! with a counting allocator, against what the memory budget counts for it
//! ([`TLS_CONNECTION_BYTES`]): in the handshake after the server's first flight, and
//! established after small and full-size records, with TLS 1.3 and 1.2. Each is at most the
//! figure counted, and the largest within 1 KiB of it. Run with `--nocapture` for the figures.
//! (One test: the counting allocator sees every thread's allocations.)
// Test code (see Cargo.toml's [lints]): it fails by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use wsloop::memory::TLS_CONNECTION_BYTES;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes `f` leaves held.
fn held_by<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let region = Region::new(GLOBAL);
    let t = f();
    let c = region.change();
    let held = c.bytes_allocated as isize - c.bytes_deallocated as isize + c.bytes_reallocated;
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

/// A socket with nothing more to read (the server's transport ends each read with one, so
/// that rustls sizes its input buffer down).
struct Dry;

impl Read for Dry {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
}

/// The server side of one read as the transport does it: `wire` in, the plaintext out, the
/// dry read, the answer written (returned). What the server's connection holds after it, with
/// what it held before, is measured.
fn server_turn(server: &mut ServerConnection, wire: &[u8], held: &mut isize) -> Vec<u8> {
    let (out, change) = held_by(|| {
        let mut rd = wire;
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().unwrap();
        }
        let mut plain = [0u8; 32 * 1024];
        while let Ok(n) = server.reader().read(&mut plain) {
            if n == 0 {
                break;
            }
        }
        let _ = server.read_tls(&mut Dry);
        let mut out = Vec::with_capacity(64 * 1024);
        while server.wants_write() {
            server.write_tls(&mut out).unwrap();
        }
        out
    });
    *held += change - out.capacity() as isize;
    out
}

#[test]
fn tls_state_is_counted_as_the_budget_counts_it() {
    let dir = child_support::TempDir::new("tls_memory");
    let Some((certs, key)) = certificate(dir.path()) else {
        return;
    };
    #[allow(deprecated)] // ring's provider, as the server's (src/io/tls.rs)
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key)
        .unwrap();
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    let sc = Arc::new(sc);
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
        let (mut server, mut held) = held_by(|| {
            let mut s = Box::new(ServerConnection::new(sc.clone()).unwrap());
            s.set_buffer_limit(Some(17 * 1024));
            s
        });
        most = most.max(held);
        // The client's flights and records, each taken by the server in one turn.
        let sends: [&[u8]; 5] = [b"", b"", b"GET / HTTP/1.1\r\n\r\n", &[7; 16 * 1024], b"x"];
        for (i, send) in sends.into_iter().enumerate() {
            client.writer().write_all(send).unwrap();
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            let answer = server_turn(&mut server, &wire, &mut held);
            let mut rd = &answer[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().unwrap();
            }
            println!("{version:?}, after turn {i}: {held} bytes held");
            assert!(
                held <= counted,
                "{version:?}, turn {i}: {held} held, {counted} counted"
            );
            most = most.max(held);
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
    }
    assert!(
        counted - most <= 1024,
        "at most {most} held, {counted} counted"
    );
}
