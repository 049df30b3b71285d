//! TLS (wss://): the server with `Config::tls` (or the binary with `--tls-cert` and
//! `--tls-key`) against real clients and attacks. A test CA, a server certificate for
//! `localhost` and 127.0.0.1, a key that belongs to no certificate and an expired certificate
//! are made at test time with the `openssl` CLI in a temporary folder (no key is committed).
//!
//! - Python's `websockets` verifies the server against the test CA and echoes text and binary
//!   (larger than a TLS record); `openssl s_client` negotiates ALPN `http/1.1` over TLS 1.2
//!   and 1.3 and gets an HTTP answer through TLS; tungstenite over rustls echoes messages up
//!   to 1 MiB.
//! - `close_notify` both ways: the server sends it before closing (after a close handshake,
//!   and before its FIN after an answered request), and reads the client's as the end of the
//!   stream.
//! - Attacks on the binary as a child process: half a ClientHello is closed at the handshake
//!   deadline (no 408 can be sent), garbage and cleartext HTTP are closed at once with an
//!   alert, connections that never start a handshake are closed at the deadline; each counted
//!   by reason, and the descriptor count back at its exact baseline after each.
//! - A slow reader over TLS is closed at the backpressure limit (1008), its queue never more
//!   than the limit plus one message plus one TLS chunk.
//! - Start-up errors name the file: unreadable, no certificate, no key, key not matching,
//!   expired, an SNI certificate not valid for its name; the binary says it with the flag.
//! - SNI chooses the certificate by name (the default for other names and for none);
//!   `LoopHandle::reload_tls` and the binary's SIGHUP change the certificate of new
//!   connections only, and a wrong new file keeps the old one.
//! - Each TLS connection's state counts in the memory budget; past half of it new TLS
//!   connections are closed at once.
//!
//! A missing tool (openssl, python3 with websockets) skips its test with a note, unless `CI`
//! is set: then the test fails (`.ci/run` installs them).
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[allow(dead_code)]
mod attack_support;
mod child_support;
mod common;
#[allow(dead_code)]
mod tls_support;

use attack_support::{localhost, Wsloop};
use child_support::run_bounded;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, StreamOwned};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tls_support::*;
use wsloop::{CloseReason, Config, Server, TlsConfig};

const PYTHON_INSTALL: &str = "python3 -m pip install websockets==17.4";
/// The most plaintext one TLS record carries (src/io/tls_session.rs, `TLS_CHUNK`).
const TLS_CHUNK: usize = 16 * 1024;
/// The most plaintext one write seals, whose ciphertext the server may hold for a full socket
/// (src/io/tls_session.rs, `WRITE_MAX`).
const WRITE_MAX: usize = 2 * TLS_CHUNK;

/// The test suite's server config, with TLS.
fn tls_config(certs: &Certs) -> Config {
    Config {
        max_message_size: 1 << 20,
        tls: Some(certs.tls()),
        ..config()
    }
}

// ---------------------------------------------------------------------------------------------
// Real clients

#[test]
fn python_websockets_verifies_the_certificate_and_echoes_over_wss() {
    let Some(certs) = certs() else { return };
    let python = std::env::var_os("WSLOOP_PYTHON").unwrap_or_else(|| "python3".into());
    let probe = run_bounded(
        Command::new(&python)
            .args(["-c", "import websockets"])
            .stdin(Stdio::null()),
        TOOL_BOUND,
    );
    if !probe
        .as_ref()
        .is_ok_and(|r| r.status.is_some_and(|s| s.success()))
    {
        let why = probe.map_or_else(|e| e.to_string(), |r| r.stderr.trim().to_string());
        child_support::missing("tls", "python3 with websockets", &why, PYTHON_INSTALL);
        return;
    }
    let server = TestServer::start(tls_config(&certs));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/python_wss.py");
    let url = format!("wss://localhost:{}/", server.addr.port());
    let run = run_bounded(
        Command::new(&python)
            .arg(&script)
            .arg(&url)
            .arg(&certs.ca)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null()),
        TOOL_BOUND,
    )
    .unwrap();
    let report = run.stdout.trim();
    assert!(
        run.status.is_some_and(|s| s.success()),
        "python client failed: {report}\n{}",
        run.stderr
    );
    for want in [
        r#""version": "TLSv1.3""#,
        r#""alpn": "http/1.1""#,
        r#""text": "h\u00e9llo over wss""#,
        r#""binary_len": 102400"#,
        r#""binary_ok": true"#,
        r#""close": 1000"#,
    ] {
        assert!(report.contains(want), "{want} not in {report}");
    }
    let stats = server.wait_stats("the close", |s| s.closed_total() == 1);
    assert_eq!(stats.tls_handshakes_ok, 1);
    assert_eq!(stats.messages_received, 2);
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
    println!("python websockets over wss: {report}");
}

#[test]
fn openssl_s_client_negotiates_alpn_http_1_1_over_tls_1_2_and_1_3() {
    let Some(certs) = certs() else { return };
    let server = TestServer::start(tls_config(&certs));
    let request = certs.ca.with_file_name("request.txt");
    // A plain HTTP request: answered (426) through TLS, and the server ends the stream.
    std::fs::write(&request, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let addr = server.addr.to_string();
    for (flag, version) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let run = run_bounded(
            Command::new("openssl")
                .args(["s_client", "-connect", &addr, "-servername", "localhost"])
                .args([
                    "-alpn",
                    "http/1.1",
                    "-verify_return_error",
                    "-ign_eof",
                    flag,
                ])
                .arg("-CAfile")
                .arg(&certs.ca)
                .stdin(std::fs::File::open(&request).unwrap()),
            TOOL_BOUND,
        )
        .unwrap();
        let out = &run.stdout;
        assert!(run.status.is_some(), "s_client did not finish: {out}");
        for want in [
            "ALPN protocol: http/1.1",
            &format!("Protocol  : {version}"),
            "Verify return code: 0 (ok)",
            "HTTP/1.1 426 ",
        ] {
            assert!(out.contains(want), "{flag}: {want:?} not in:\n{out}");
        }
    }
    let stats = server.wait_stats("two closes", |s| s.closed_total() == 2);
    assert_eq!(stats.tls_handshakes_ok, 2);
    assert_eq!(stats.tls_connections, [0, 0]);
    server.finish_closed(&[(CloseReason::HttpAnswered, 2)]);
}

#[test]
fn tungstenite_over_rustls_echoes_and_the_server_ends_with_close_notify() {
    let Some(certs) = certs() else { return };
    // A small kernel send buffer: large echoes fill the socket again and again, so that rustls
    // is often left holding ciphertext that only a writable edge can flush.
    let server = TestServer::start(Config {
        socket_send_buffer: 4096,
        ..tls_config(&certs)
    });
    let mut ws = wss(server.addr, &certs);
    let stats = server.wait_stats("a TLS connection", |s| s.tls_connections[1] == 1);
    assert_eq!((stats.tls_handshakes_ok, stats.tls_handshaking), (1, 0));
    for len in [
        0,
        1,
        100,
        TLS_CHUNK - 1,
        TLS_CHUNK,
        TLS_CHUNK + 1,
        300_000,
        1 << 20,
    ] {
        let payload = bytes(len, len as u64);
        ws.send(tungstenite::Message::binary(payload.clone()))
            .unwrap();
        let got = ws.read().unwrap();
        assert!(got.into_data() == payload, "echo of {len} bytes differs");
    }
    ws.send(tungstenite::Message::text("done")).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap(), "done");
    // The close handshake; then the server closes with close_notify, not a bare FIN.
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    assert_eq!(read_to_tls_end(ws.get_mut()), Ok(Vec::new()));
    let stats = server.wait_stats("the close", |s| s.closed_total() == 1);
    assert_eq!(stats.tls_connections, [0, 0]);
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

/// After a failure (here a plain HTTP request answered 426) the server shuts its side down
/// after its answer: `close_notify`, then FIN.
#[test]
fn an_answered_request_ends_with_close_notify_before_the_fin() {
    let Some(certs) = certs() else { return };
    let server = TestServer::start(tls_config(&certs));
    let mut s = tls_connect(server.addr, &certs);
    s.write_all(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    let answer = read_to_tls_end(&mut s).expect("a clean end (close_notify)");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 426 "), "{answer}");
    // Our end: close_notify and FIN.
    s.conn.send_close_notify();
    s.flush().unwrap();
    s.sock.shutdown(std::net::Shutdown::Write).unwrap();
    server.finish_closed(&[(CloseReason::HttpAnswered, 1)]);
}

/// The client's `close_notify` (TCP left open) is the end of its stream: the server ends the
/// connection at once (no close handshake: `abnormal`), with its own `close_notify`.
#[test]
fn the_clients_close_notify_reads_as_the_end_of_its_stream() {
    let Some(certs) = certs() else { return };
    let server = TestServer::start(tls_config(&certs));
    let mut ws = wss(server.addr, &certs);
    ws.send(tungstenite::Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap(), "hi");
    let s = ws.get_mut();
    s.conn.send_close_notify();
    s.flush().unwrap();
    let stats = server.wait_stats("the close", |s| s.closed_total() == 1);
    assert_eq!(stats.closed_by(CloseReason::Abnormal), 1);
    assert_eq!(read_to_tls_end(ws.get_mut()), Ok(Vec::new()));
    server.finish_closed(&[(CloseReason::Abnormal, 1)]);
}

// ---------------------------------------------------------------------------------------------
// Certificates by name (SNI), and reloaded while the server runs

/// The DER of the first certificate in the PEM file `path`.
fn leaf(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .expect("a certificate")
        .unwrap()
        .to_vec()
}

/// The certificate the server at `addr` presents to a client asking for the server `name`
/// (verified for that name against the test CA).
fn presented(addr: SocketAddr, certs: &Certs, name: &str) -> Vec<u8> {
    let s = tls_named(tcp(addr), certs, rustls::DEFAULT_VERSIONS, name);
    s.conn.peer_certificates().expect("a certificate")[0].to_vec()
}

/// With `--tls-sni`, a client naming a listed server gets that server's certificate (in any
/// case); a client naming another, or none, gets the default; both echo. The cipher gauge
/// counts each connection under the suite it negotiated.
#[test]
fn sni_chooses_the_certificate_by_the_name_the_client_asks_for() {
    let Some(certs) = certs() else { return };
    let d = certs.dir.path();
    issue(d, "sni.test", "DNS:sni.test", "sni.pem", "sni.key");
    issue(d, "two.test", "DNS:two.test", "two.pem", "two.key");
    let tls = certs
        .tls()
        .with_sni("sni.test", d.join("sni.pem"), d.join("sni.key"))
        .with_sni("TWO.test", d.join("two.pem"), d.join("two.key"));
    let server = TestServer::start(Config {
        tls: Some(tls),
        ..config()
    });
    let addr = server.addr;
    assert_eq!(
        presented(addr, &certs, "sni.test"),
        leaf(&d.join("sni.pem"))
    );
    assert_eq!(
        presented(addr, &certs, "two.test"),
        leaf(&d.join("two.pem"))
    );
    assert_eq!(presented(addr, &certs, "localhost"), leaf(&certs.cert));
    // An IP address: no SNI at all.
    assert_eq!(presented(addr, &certs, "127.0.0.1"), leaf(&certs.cert));
    // A name with no certificate of its own gets the default (which the client then refuses:
    // it is not valid for that name).
    let mut s = StreamOwned::new(
        ClientConnection::new(
            client_config(&certs, rustls::DEFAULT_VERSIONS),
            ServerName::try_from("other.test").unwrap(),
        )
        .unwrap(),
        tcp(addr),
    );
    let refused = loop {
        match s.conn.complete_io(&mut s.sock) {
            Ok(_) if s.conn.is_handshaking() => continue,
            Ok(_) => panic!("the default certificate passed for other.test"),
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        refused.contains("not valid for name \"other.test\""),
        "{refused}"
    );
    // Connections by name are served, and counted by cipher suite.
    let mut ws = tungstenite::client::client(
        format!("wss://sni.test:{}/", addr.port()),
        tls_named(tcp(addr), &certs, &[&rustls::version::TLS13], "sni.test"),
    )
    .unwrap()
    .0;
    ws.send(tungstenite::Message::text("by name")).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap(), "by name");
    let stats = server.wait_stats("one TLS 1.3 connection", |s| s.tls_connections == [0, 1]);
    assert_eq!(stats.tls_ciphers.iter().sum::<usize>(), 1);
    let metrics = server.handle.metrics().unwrap();
    let suite = ws.get_ref().conn.negotiated_cipher_suite().unwrap().suite();
    let line = format!(
        "wsloop_tls_cipher_connections{{cipher=\"{}\"}} 1\n",
        suite.as_str().unwrap()
    );
    assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    close_client_over(ws);
    server.wait_stats("the close", |s| s.tls_ciphers == [0; 10]);
}

/// Close handshake, then the client's close_notify.
fn close_client_over(mut ws: tungstenite::WebSocket<Tls>) {
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
}

/// `LoopHandle::reload_tls` reads the files again: new handshakes get the new certificate, a
/// connection made before keeps working; a wrong file (not matching, expired, unreadable)
/// is an error naming it and the certificate served stays; a server without TLS has nothing
/// to reload. Counted in `wsloop_tls_reloads_total`.
#[test]
fn reload_tls_changes_the_certificate_of_new_connections_only() {
    let Some(certs) = certs() else { return };
    let d = certs.dir.path();
    // The server reads its certificate from files of its own, which the test replaces.
    let (cert, key) = (d.join("live.pem"), d.join("live.key"));
    std::fs::copy(&certs.cert, &cert).unwrap();
    std::fs::copy(&certs.key, &key).unwrap();
    let server = TestServer::start(Config {
        tls: Some(TlsConfig::new(&cert, &key)),
        ..config()
    });
    let addr = server.addr;
    let old = leaf(&certs.cert);
    assert_eq!(presented(addr, &certs, "localhost"), old);
    let mut before = wss(addr, &certs);
    before.send(tungstenite::Message::text("one")).unwrap();
    assert_eq!(before.read().unwrap().into_text().unwrap(), "one");

    issue(d, "localhost", "DNS:localhost", "live.pem", "live.key");
    let new = leaf(&cert);
    assert_ne!(new, old);
    server.handle.reload_tls().expect("the new files are good");
    assert_eq!(presented(addr, &certs, "localhost"), new);
    // The connection made before the reload goes on.
    before.send(tungstenite::Message::text("two")).unwrap();
    assert_eq!(before.read().unwrap().into_text().unwrap(), "two");
    assert_eq!(
        before.get_ref().conn.peer_certificates().unwrap()[0].to_vec(),
        old
    );

    // Wrong files: each an error naming the file; the new certificate is still served.
    std::fs::copy(&certs.other_key, &key).unwrap();
    let e = server.handle.reload_tls().unwrap_err();
    assert_eq!(e.field, "tls_key", "{e}");
    assert!(e.reason.contains("does not match"), "{e}");
    assert!(e.reason.contains(&key.display().to_string()), "{e}");
    issue(d, "localhost", "DNS:localhost", "live.pem", "live.key");
    std::fs::copy(&certs.expired, &cert).unwrap();
    let e = server.handle.reload_tls().unwrap_err();
    assert!(e.reason.contains("expired on 2020-01-02"), "{e}");
    std::fs::remove_file(&cert).unwrap();
    let e = server.handle.reload_tls().unwrap_err();
    assert!(e.reason.contains("cannot read"), "{e}");
    assert_eq!(presented(addr, &certs, "localhost"), new);
    let stats = server.handle.stats().unwrap();
    assert_eq!(stats.tls_reloads, [1, 3]);
    let metrics = server.handle.metrics().unwrap();
    for line in [
        "wsloop_tls_reloads_total{result=\"ok\"} 1\n",
        "wsloop_tls_reloads_total{result=\"failed\"} 3\n",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    close_client_over(before);
    server.wait_stats("the closes", |s| s.connections == 0);

    // Without TLS there is nothing to reload.
    let plain = TestServer::start(config());
    let e = plain.handle.reload_tls().unwrap_err();
    assert_eq!(e.field, "tls_cert");
}

/// Files that are wrong in ways a parser of PEM alone would let through: a chain whose
/// intermediate is not a certificate (every handshake would fail) is refused at start and on a
/// reload; a path naming a FIFO with no writer, or /dev/zero, is refused at once (no read that
/// blocks the reloading thread, no allocation without end); the certificate served stays.
#[test]
fn a_broken_chain_or_a_path_that_is_no_file_is_refused_at_start_and_on_reload() {
    let Some(certs) = certs() else { return };
    let d = certs.dir.path();
    let broken = d.join("broken-chain.pem");
    let mut chain = std::fs::read_to_string(&certs.cert).unwrap();
    chain.push_str("-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n-----END CERTIFICATE-----\n");
    std::fs::write(&broken, chain).unwrap();
    let start = |cert: &Path| {
        let config = Config {
            tls: Some(TlsConfig::new(cert, &certs.key)),
            ..config()
        };
        Server::new(config, Noop).err().expect("started")
    };
    let e = start(&broken).to_string();
    assert!(
        e.contains("certificate 2 of the chain is not a DER X.509 certificate"),
        "{e}"
    );
    assert!(e.contains(&broken.display().to_string()), "{e}");
    let e = start(Path::new("/dev/zero")).to_string();
    assert!(e.contains("not a regular file"), "{e}");
    // On a reload, through files the test swaps.
    let (cert, key) = (d.join("live.pem"), d.join("live.key"));
    std::fs::copy(&certs.cert, &cert).unwrap();
    std::fs::copy(&certs.key, &key).unwrap();
    let server = TestServer::start(Config {
        tls: Some(TlsConfig::new(&cert, &key)),
        ..config()
    });
    std::fs::copy(&broken, &cert).unwrap();
    let e = server.handle.reload_tls().unwrap_err();
    assert!(e.reason.contains("certificate 2 of the chain"), "{e}");
    std::fs::remove_file(&cert).unwrap();
    let fifo = Command::new("mkfifo").arg(&cert).status().unwrap();
    assert!(fifo.success());
    let took = Instant::now();
    let e = server.handle.reload_tls().unwrap_err();
    assert!(e.reason.contains("not a regular file"), "{e}");
    assert!(
        took.elapsed() < Duration::from_secs(5),
        "{:?}",
        took.elapsed()
    );
    std::fs::remove_file(&cert).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &cert).unwrap();
    let e = server.handle.reload_tls().unwrap_err();
    assert!(e.reason.contains("not a regular file"), "{e}");
    assert_eq!(
        presented(server.addr, &certs, "localhost"),
        leaf(&certs.cert)
    );
    assert_eq!(server.handle.stats().unwrap().tls_reloads, [0, 3]);
}

/// The binary reloads on SIGHUP: new connections get the new certificate, the connection
/// made before keeps being served, a bad file leaves the certificate served as it was (and is
/// logged), and the process never stops.
#[test]
fn sighup_reloads_the_binarys_certificates() {
    let Some(certs) = certs() else { return };
    let d = certs.dir.path();
    let (cert, key) = (d.join("hup.pem"), d.join("hup.key"));
    std::fs::copy(&certs.cert, &cert).unwrap();
    std::fs::copy(&certs.key, &key).unwrap();
    issue(d, "sni.test", "DNS:sni.test", "sni.pem", "sni.key");
    let sni = format!(
        "sni.test={},{}",
        d.join("sni.pem").display(),
        d.join("sni.key").display()
    );
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let server = Wsloop::spawn_with_fd_limit(
        "tls-sighup",
        512,
        &[
            "--tls-cert",
            &c,
            "--tls-key",
            &k,
            "--tls-sni",
            &sni,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let addr = server.addr;
    let old = leaf(&certs.cert);
    assert_eq!(presented(addr, &certs, "localhost"), old);
    assert_eq!(
        presented(addr, &certs, "sni.test"),
        leaf(&d.join("sni.pem"))
    );
    let mut before = wss(addr, &certs);

    // New certificates for both names, then SIGHUP.
    issue(d, "localhost", "DNS:localhost", "hup.pem", "hup.key");
    issue(d, "sni.test", "DNS:sni.test", "sni.pem", "sni.key");
    server.hangup();
    server.wait_until("the reload", |m| {
        m.get("wsloop_tls_reloads_total{result=\"ok\"}") == 1.0
    });
    let new = leaf(&cert);
    assert_ne!(new, old);
    assert_eq!(presented(addr, &certs, "localhost"), new);
    assert_eq!(
        presented(addr, &certs, "sni.test"),
        leaf(&d.join("sni.pem"))
    );
    before
        .send(tungstenite::Message::text("still here"))
        .unwrap();
    assert_eq!(before.read().unwrap().into_text().unwrap(), "still here");

    // A bad file: logged, counted, and the certificate served stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    server.hangup();
    server.wait_until("the failed reload", |m| {
        m.get("wsloop_tls_reloads_total{result=\"failed\"}") == 1.0
    });
    assert_eq!(presented(addr, &certs, "localhost"), new);
    assert!(
        server
            .log()
            .contains("TLS reload failed, the certificates served are unchanged"),
        "{}",
        server.log_tail(20)
    );
    close_client_over(before);
    server.wait_baseline();
    server.stop();
}

#[test]
fn half_a_client_hello_is_closed_at_the_handshake_deadline() {
    let Some(certs) = certs() else { return };
    let w = tls_child(&certs, "tls-half-hello", &[]);
    let m0 = w.metrics();
    w.wait_baseline();
    // A ClientHello record announcing 512 bytes, of which 100 are sent; and connections that
    // send nothing at all.
    let half: Vec<u8> = [
        &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ][..],
        &[7u8; 89],
    ]
    .concat();
    let start = Instant::now();
    let mut clients: Vec<TcpStream> = (0..40)
        .map(|i| {
            let mut s = tcp(w.addr);
            if i % 2 == 0 {
                s.write_all(&half).unwrap();
            }
            s
        })
        .collect();
    let m = w.wait_until("40 handshakes in progress", |m| {
        m.get("wsloop_tls_handshakes_in_progress") == 40.0
    });
    assert_eq!(handshakes(&m, "ok"), 0);
    for s in &mut clients {
        let (got, took) = until_closed(s, start);
        // No 408: nothing a client without keys could read; a plain close.
        assert!(got.is_empty(), "the server sent {got:?}");
        // The loop's clock has a resolution of one tick (`TICK`).
        assert!(
            took + TICK >= Duration::from_secs(1),
            "closed after {took:?}, before the deadline"
        );
        assert!(took < Duration::from_secs(8), "closed after {took:?}");
    }
    drop(clients);
    w.wait_baseline();
    let m1 = w.wait_quiet();
    assert_eq!(
        handshakes(&m1, "handshake_timeout") - handshakes(&m0, "handshake_timeout"),
        40
    );
    assert_eq!(m1.get("wsloop_tls_handshakes_in_progress"), 0.0);
    assert_eq!(
        m1.closed("handshake_timeout") - m0.closed("handshake_timeout"),
        40
    );
    assert_eq!(w.audited(&m1).get("wsloop_fd_audit_difference"), 0.0);
    w.stop();
}

#[test]
fn garbage_and_cleartext_http_to_a_tls_port_are_closed_at_once_and_counted() {
    let Some(certs) = certs() else { return };
    let w = tls_child(&certs, "tls-garbage", &[]);
    let m0 = w.metrics();
    w.wait_baseline();
    let inputs: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n",
        b"\x00\x01\x02 garbage garbage garbage garbage garbage",
        // A handshake record whose message is not a ClientHello.
        &[0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00],
        // A record longer than TLS allows.
        &[0x16, 0x03, 0x03, 0xff, 0xff, 0x01],
    ];
    for input in inputs {
        let mut s = tcp(w.addr);
        let start = Instant::now();
        s.write_all(input).unwrap();
        let (got, took) = until_closed(&mut s, start);
        // A fatal alert record (content type 21, level 2), then the close; well before the
        // 1 s handshake deadline.
        assert!(
            got.len() == 7 && got[0] == 0x15 && got[5] == 2,
            "{input:?}: the server sent {got:?}"
        );
        assert!(
            took < Duration::from_millis(900),
            "{input:?}: closed after {took:?}"
        );
    }
    w.wait_baseline();
    let m1 = w.wait_quiet();
    assert_eq!(
        handshakes(&m1, "tls_error") - handshakes(&m0, "tls_error"),
        4
    );
    assert_eq!(m1.closed("tls_error") - m0.closed("tls_error"), 4);
    assert_eq!(w.audited(&m1).get("wsloop_fd_audit_difference"), 0.0);
    // The server still serves: a real client completes its handshake and upgrade.
    let mut s = tls_connect(w.addr, &certs);
    assert!(upgrade_over(&mut s, w.addr).starts_with("HTTP/1.1 101 "));
    drop(s);
    w.wait_baseline();
    let m2 = w.wait_quiet();
    assert_eq!(handshakes(&m2, "ok") - handshakes(&m0, "ok"), 1);
    w.stop();
}

/// A flood of connections that never finish their handshake: beyond `--tls-max-handshakes`
/// in progress, new connections are closed at once (no handshake, nothing sent) and counted;
/// an established connection is served throughout; once the held ones reach their deadline,
/// new clients are served again.
#[test]
fn handshakes_in_progress_are_capped_and_established_clients_are_served() {
    let Some(certs) = certs() else { return };
    let w = tls_child(&certs, "tls-cap", &["--tls-max-handshakes", "10"]);
    let m0 = w.metrics();
    w.wait_baseline();
    let mut ws = wss(w.addr, &certs);
    let start = Instant::now();
    // From ten addresses: one address may hold a sixteenth of the cap (here 1).
    let held: Vec<TcpStream> = (0..10)
        .map(|i| attack_support::connect(w.addr, &localhost(2 + i).into()).unwrap())
        .collect();
    w.wait_until("10 handshakes in progress", |m| {
        m.get("wsloop_tls_handshakes_in_progress") == 10.0
    });
    for i in 0..20 {
        let mut s = tcp(w.addr);
        let (got, took) = until_closed(&mut s, Instant::now());
        assert!(got.is_empty(), "capped connection {i} got {got:?}");
        assert!(
            took < Duration::from_millis(500),
            "capped connection {i} closed after {took:?}"
        );
        ws.send(tungstenite::Message::text(format!("during {i}")))
            .unwrap();
        assert_eq!(
            ws.read().unwrap().into_text().unwrap(),
            format!("during {i}")
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the held ones timed out meanwhile"
    );
    let m = w.metrics();
    assert_eq!(
        m.get("wsloop_tls_handshakes_capped_total") - m0.get("wsloop_tls_handshakes_capped_total"),
        20.0
    );
    drop(held);
    // The held ones end (their EOF, or the deadline): handshakes are taken again.
    w.wait_until("no handshake in progress", |m| {
        m.get("wsloop_tls_handshakes_in_progress") == 0.0
    });
    let mut s = tls_connect(w.addr, &certs);
    assert!(upgrade_over(&mut s, w.addr).starts_with("HTTP/1.1 101 "));
    drop((s, ws));
    w.wait_baseline();
    let m1 = w.wait_quiet();
    let since = m1.closed_since(&m0);
    assert_eq!(since.get("refused"), Some(&20), "{since:?}");
    assert_eq!(handshakes(&m1, "ok") - handshakes(&m0, "ok"), 2);
    assert_eq!(w.audited(&m1).get("wsloop_fd_audit_difference"), 0.0);
    w.stop();
}

/// `--threads 2`: the TLS configuration is made once and every loop serves it; the totals add
/// up over the loops.
#[test]
fn every_loop_of_a_cluster_serves_tls() {
    let Some(certs) = certs() else { return };
    let w = tls_child(&certs, "tls-cluster", &["--threads", "2"]);
    let m0 = w.metrics();
    w.wait_baseline();
    let mut clients: Vec<_> = (0..16).map(|_| wss(w.addr, &certs)).collect();
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(tungstenite::Message::text(format!("client {i}")))
            .unwrap();
        assert_eq!(
            ws.read().unwrap().into_text().unwrap(),
            format!("client {i}")
        );
    }
    let m = w.wait_until("16 TLS 1.3 connections over the loops", |m| {
        m.get("wsloop_tls_connections{version=\"1.3\"}") == 16.0
    });
    assert_eq!(handshakes(&m, "ok") - handshakes(&m0, "ok"), 16);
    for mut ws in clients {
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    w.wait_baseline();
    let m1 = w.wait_quiet();
    assert_eq!(m1.closed_since(&m0).get("peer_closed"), Some(&16));
    w.stop();
}

/// A client refused at admission (here: over `--max-connections-per-ip`) on a TLS port gets no
/// cleartext 503 it could not read, and costs no handshake: it is closed at once, and counted.
#[test]
fn a_refused_client_on_a_tls_port_is_closed_without_a_cleartext_answer() {
    let Some(certs) = certs() else { return };
    let w = tls_child(&certs, "tls-refused", &["--max-connections-per-ip", "1"]);
    let m0 = w.metrics();
    w.wait_baseline();
    let mut first = tls_connect(w.addr, &certs);
    assert!(upgrade_over(&mut first, w.addr).starts_with("HTTP/1.1 101 "));
    let mut second = tcp(w.addr);
    let (got, took) = until_closed(&mut second, Instant::now());
    assert!(got.is_empty(), "the refused client got {got:?}");
    assert!(took < Duration::from_millis(900), "closed after {took:?}");
    drop((first, second));
    w.wait_baseline();
    let m1 = w.wait_quiet();
    let since = m1.closed_since(&m0);
    assert_eq!(since.get("refused"), Some(&1), "{since:?}");
    assert_eq!(
        m1.admission("max_connections_per_ip") - m0.admission("max_connections_per_ip"),
        1
    );
    assert_eq!(handshakes(&m1, "ok") - handshakes(&m0, "ok"), 1);
    w.stop();
}

/// Each TLS connection's state counts in the memory budget (`wsloop_memory_bytes{kind="tls"}`,
/// 4 KiB each, from accept to close); past half the budget a new TLS connection is closed at
/// once, before any handshake work, and counted as a memory refusal, while the established
/// ones are served; when they leave, the count is back at 0 and the descriptors at the
/// baseline.
#[test]
fn tls_state_counts_in_the_memory_budget_and_fills_at_most_half_of_it() {
    let Some(certs) = certs() else { return };
    let per = wsloop::memory::TLS_CONNECTION_BYTES;
    let budget = 1 << 20; // the least --memory-budget takes
    let n = budget / 2 / per;
    let w = tls_child(
        &certs,
        "tls-memory",
        &["--memory-budget", &budget.to_string()],
    );
    let m0 = w.metrics();
    w.wait_baseline();
    let mut ws = wss(w.addr, &certs);
    let mut held: Vec<Tls> = (1..n).map(|_| tls_connect(w.addr, &certs)).collect();
    let m = w.wait_until("the TLS connections counted", |m| {
        m.get("wsloop_tls_connections{version=\"1.3\"}") == n as f64
    });
    assert_eq!(m.get("wsloop_memory_bytes{kind=\"tls\"}"), (n * per) as f64);
    assert_eq!(m.get("wsloop_memory_shedding"), 0.0);
    // Half the budget is taken: the next is closed at once, nothing sent.
    let mut refused = tcp(w.addr);
    let (got, took) = until_closed(&mut refused, Instant::now());
    assert!(got.is_empty(), "the refused client got {got:?}");
    assert!(took < Duration::from_millis(900), "closed after {took:?}");
    ws.send(tungstenite::Message::text("served")).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap(), "served");
    let m1 = w.metrics();
    assert_eq!(
        m1.admission("memory_budget") - m0.admission("memory_budget"),
        1
    );
    assert_eq!(handshakes(&m1, "ok") - handshakes(&m0, "ok"), n as u64);
    // One leaves: room for one more.
    held.pop();
    w.wait_until("one TLS connection fewer", |m| {
        m.get("wsloop_memory_bytes{kind=\"tls\"}") == ((n - 1) * per) as f64
    });
    held.push(tls_connect(w.addr, &certs));
    close_client_over(ws);
    drop((held, refused));
    w.wait_baseline();
    let m2 = w.wait_quiet();
    assert_eq!(m2.get("wsloop_memory_bytes{kind=\"tls\"}"), 0.0);
    w.stop();
}

/// A client over TLS that sends 16 KiB messages and never reads their echoes: closed for
/// backpressure (1008 reported; a send over the limit closes it, or, once reading paused over
/// the limit, the queue not drained to half of it within the 1 s write-stall timeout drops
/// it), its queue never more than the limit plus one message plus one TLS chunk.
#[test]
fn a_slow_reader_over_tls_is_closed_at_the_backpressure_limit() {
    let Some(certs) = certs() else { return };
    const LIMIT: usize = 64 * 1024;
    const MSG: usize = 16 * 1024;
    let server = TestServer::start(Config {
        max_backpressure: LIMIT,
        close_timeout: Duration::from_secs(2),
        write_stall_timeout: Duration::from_secs(1),
        // What the client sends while the server does not read it waits in small kernel
        // buffers: its writes block soon.
        socket_receive_buffer: 16 * 1024,
        ..tls_config(&certs)
    });
    let mut s = tls_over(
        tcp_rcvbuf(server.addr, 4096),
        &certs,
        rustls::DEFAULT_VERSIONS,
    );
    assert!(upgrade_over(&mut s, server.addr).starts_with("HTTP/1.1 101 "));
    let msg = frame(true, OP_BINARY, &bytes(MSG, 3));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    while Instant::now() < deadline && sent < 2000 {
        if s.write_all(&msg).and_then(|()| s.flush()).is_err() {
            break; // the server stopped reading (paused, or closed)
        }
        sent += 1;
        if sent % 8 == 0 && server.stats().closed_by(CloseReason::Backpressure) > 0 {
            break;
        }
    }
    let stats = server.wait_stats("the backpressure close", |s| {
        s.closed_by(CloseReason::Backpressure) == 1
    });
    let bound = LIMIT + MSG + 4 + WRITE_MAX;
    assert!(stats.queue_peak > 0, "the server never had to queue");
    assert!(
        stats.queue_peak <= bound,
        "queue peaked at {} (bound {bound})",
        stats.queue_peak
    );
    assert_eq!(server.rec().closes[0].code, 1008);
    drop(s);
    println!(
        "slow reader over TLS: {sent} x 16 KiB sent; queue peak {}",
        stats.queue_peak
    );
    server.finish_closed(&[(CloseReason::Backpressure, 1)]);
}

// ---------------------------------------------------------------------------------------------
// Start-up errors

#[test]
fn startup_errors_name_the_file() {
    let Some(certs) = certs() else { return };
    let missing = certs.ca.with_file_name("missing.pem");
    let cases = [
        (
            TlsConfig::new(&missing, &certs.key),
            "tls_cert",
            "cannot read",
            &missing,
        ),
        (
            TlsConfig::new(&certs.cert, &missing),
            "tls_key",
            "cannot read",
            &missing,
        ),
        (
            TlsConfig::new(&certs.key, &certs.key),
            "tls_cert",
            "no certificate",
            &certs.key,
        ),
        (
            TlsConfig::new(&certs.cert, &certs.cert),
            "tls_key",
            "no private key",
            &certs.cert,
        ),
        (
            TlsConfig::new(&certs.cert, &certs.other_key),
            "tls_key",
            "does not match",
            &certs.other_key,
        ),
        (
            TlsConfig::new(&certs.expired, &certs.key),
            "tls_cert",
            "expired on 2020-01-02 00:00:00 UTC",
            &certs.expired,
        ),
    ];
    for (tls, field, what, file) in cases {
        let config = Config {
            tls: Some(tls.clone()),
            ..config()
        };
        let e = match Server::new(config.clone(), Noop) {
            Err(wsloop::Error::Config(e)) => e,
            Err(e) => panic!("{tls:?}: {e}"),
            Ok(_) => panic!("{tls:?}: the server started"),
        };
        assert_eq!(e.field, field, "{tls:?}: {e}");
        assert!(e.reason.contains(what), "{tls:?}: {e}");
        assert!(
            e.reason.contains(&file.display().to_string()),
            "{tls:?}: {e}"
        );
        // A cluster checks the same, before any loop starts.
        let e = wsloop::Cluster::start(config, &["127.0.0.1:0".parse().unwrap()], None, |_| Noop)
            .err()
            .expect("the cluster started");
        assert!(e.to_string().contains(what), "{e}");
    }
    // The mismatch names both files.
    let e = Server::new(
        Config {
            tls: Some(TlsConfig::new(&certs.cert, &certs.other_key)),
            ..config()
        },
        Noop,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains(&certs.cert.display().to_string()), "{e}");
    // The binary says it with the flag, and exits before listening.
    let run = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_wsloop"))
            .args(["--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(&certs.cert)
            .arg("--tls-key")
            .arg(&certs.other_key)
            .stdin(Stdio::null()),
        TOOL_BOUND,
    )
    .unwrap();
    assert!(run.status.is_some_and(|s| !s.success()), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "wsloop: invalid --tls-key: {} does not match the certificate in {}",
            certs.other_key.display(),
            certs.cert.display()
        )),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("listening"), "{}", run.stderr);
}

/// An SNI certificate that is not valid for its name, or a name given twice, is a start-up
/// error naming it; the binary says it with `--tls-sni`.
#[test]
fn sni_startup_errors_name_the_certificate() {
    let Some(certs) = certs() else { return };
    let start = |tls: TlsConfig| {
        let config = Config {
            tls: Some(tls),
            ..config()
        };
        match Server::new(config, Noop) {
            Err(wsloop::Error::Config(e)) => e,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("the server started"),
        }
    };
    // The localhost certificate offered for another name.
    let e = start(certs.tls().with_sni("sni.test", &certs.cert, &certs.key));
    assert_eq!(e.field, "tls_sni", "{e}");
    assert!(e.reason.contains(&certs.cert.display().to_string()), "{e}");
    assert!(
        e.reason.contains("not a certificate for \"sni.test\""),
        "{e}"
    );
    let e = start(
        certs
            .tls()
            .with_sni("localhost", &certs.cert, &certs.key)
            .with_sni("LOCALHOST", &certs.cert, &certs.key),
    );
    assert_eq!(e.field, "tls_sni", "{e}");
    assert!(e.reason.contains("named twice"), "{e}");
    let e = start(
        certs
            .tls()
            .with_sni("localhost", &certs.cert, &certs.other_key),
    );
    assert_eq!(e.field, "tls_sni", "{e}");
    assert!(e.reason.contains("does not match"), "{e}");
    let run = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_wsloop"))
            .args(["--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(&certs.cert)
            .arg("--tls-key")
            .arg(&certs.key)
            .arg("--tls-sni")
            .arg(format!(
                "sni.test={},{}",
                certs.cert.display(),
                certs.key.display()
            ))
            .stdin(Stdio::null()),
        TOOL_BOUND,
    )
    .unwrap();
    assert!(run.status.is_some_and(|s| !s.success()), "{}", run.stderr);
    assert!(
        run.stderr.contains("wsloop: invalid --tls-sni: "),
        "{}",
        run.stderr
    );
    let run = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_wsloop"))
            .args([
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
                "--tls-sni",
                "name-only",
            ])
            .stdin(Stdio::null()),
        TOOL_BOUND,
    )
    .unwrap();
    assert!(
        run.stderr.contains("expected NAME=CERT,KEY"),
        "{}",
        run.stderr
    );
}
