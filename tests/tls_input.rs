//! What a client sends under TLS that rustls buffers before anything comes of it, sealed by hand
//! (TLS 1.3 records with the traffic secrets rustls's client gives up), since no TLS library
//! would send it:
//!
//! - half of a record on an open connection is counted with the connection's partial messages
//!   in the memory budget while rustls holds it, and no longer once the rest has come;
//! - a handshake message joined across records after the handshake (rustls would buffer up to
//!   64 KiB of it) fails the connection (`tls_error`) once more than one record's worth of
//!   ciphertext has come to nothing, before rustls holds more;
//! - a burst of replayed ClientHellos is spread over turns (the turn's handshake time runs out),
//!   and every one is answered in the end;
//! - records of one byte each (much ciphertext, little plaintext) are read over several turns,
//!   at most 256 KiB of ciphertext a read.
//!
//! Certificates come from `tests/tls_support` (the openssl CLI); without it the tests skip
//! with a note, unless `CI` is set.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[allow(dead_code)]
mod attack_support;
mod child_support;
mod common;
#[allow(dead_code)]
mod tls_support;

use common::{config, tcp, TestServer};
use ring::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ConnectionTrafficSecrets, StreamOwned};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tls_support::*;
use wsloop::{CloseReason, Config};

/// An upgraded TLS 1.3 connection whose client side is given up for its secrets: the socket,
/// and a sealer for the records the client sends next.
struct Raw {
    sock: TcpStream,
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Raw {
    fn open(addr: std::net::SocketAddr, certs: &Certs) -> Raw {
        let mut cc = (*client_config(certs, &[&rustls::version::TLS13])).clone();
        cc.enable_secret_extraction = true;
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(Arc::new(cc), name).unwrap();
        let mut s = StreamOwned::new(conn, tcp(addr));
        let head = upgrade_over(&mut s, addr);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let StreamOwned { conn, sock } = s;
        let secrets = conn.dangerous_extract_secrets().unwrap();
        let (seq, secret) = secrets.tx;
        let (alg, key, iv) = match secret {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => panic!("an unexpected cipher suite"),
        };
        Raw {
            sock,
            key: LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).unwrap()),
            iv: iv.as_ref().try_into().unwrap(),
            seq,
        }
    }

    /// One TLS 1.3 record of content type `kind` carrying `payload`, sealed.
    fn record(&mut self, kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut inner = payload.to_vec();
        inner.push(kind);
        let len = inner.len() + 16;
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut inner,
            )
            .unwrap();
        [&header[..], &inner].concat()
    }
}

fn tls_config(certs: &Certs) -> Config {
    Config {
        tls: Some(certs.tls()),
        ..config()
    }
}

/// Wait (bounded) until `cond` holds on the server's counters.
fn until(server: &TestServer, what: &str, cond: impl Fn(&wsloop::Stats) -> bool) -> wsloop::Stats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = server.handle.stats().unwrap();
        if cond(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn half_a_record_counts_as_a_partial_message_until_the_rest_comes() {
    let Some(certs) = certs() else { return };
    let server = TestServer::start(tls_config(&certs));
    let mut raw = Raw::open(server.addr, &certs);
    until(&server, "an idle connection", |s| s.memory_bytes[0] == 0);
    // A binary message of 16,000 bytes in one frame, masked with zeros, in one record.
    let mut frame = vec![
        0x82,
        0xfe,
        (16_000u16 >> 8) as u8,
        16_000u16 as u8,
        0,
        0,
        0,
        0,
    ];
    frame.extend(std::iter::repeat_n(7u8, 16_000));
    let record = raw.record(23, &frame);
    raw.sock.write_all(&record[..10_000]).unwrap();
    let st = until(&server, "the half record counted", |s| {
        s.memory_bytes[0] >= 10_000
    });
    assert!(st.memory_bytes[0] < 10_000 + 4096, "{:?}", st.memory_bytes);
    raw.sock.write_all(&record[10_000..]).unwrap();
    let st = until(&server, "the message", |s| s.messages_received == 1);
    assert_eq!(st.closed_total(), 0);
    until(&server, "nothing partial held", |s| s.memory_bytes[0] == 0);
}

#[test]
fn a_handshake_message_joined_after_the_handshake_fails_before_rustls_holds_64_kib() {
    let Some(certs) = certs() else { return };
    let server = TestServer::start(tls_config(&certs));
    let mut raw = Raw::open(server.addr, &certs);
    // A KeyUpdate (type 24) announcing 65,000 bytes, sent in full records but one byte short.
    let mut msg = vec![24, 0, (65_000u32 >> 8) as u8, 65_000u32 as u8];
    msg.resize(4 + 65_000 - 1, 0);
    let wire: Vec<u8> = msg
        .chunks(16 * 1024)
        .flat_map(|c| raw.record(22, c))
        .collect();
    raw.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The server may close while this is still being written.
    let _ = raw.sock.write_all(&wire);
    let st = until(&server, "the close", |s| s.closed_total() == 1);
    assert_eq!(st.closed_by(CloseReason::TlsError), 1, "{st:?}");
    // Closed: an alert then EOF, or a reset; never a hang until the idle timeout.
    let mut buf = [0u8; 4096];
    loop {
        match raw.sock.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("not closed: {e}"),
        }
    }
    assert_eq!(server.handle.stats().unwrap().memory_bytes[0], 0);
}

/// A burst of replayed ClientHellos (which cost the client nothing and the server a signature
/// each) is not answered in one turn: the turn's handshake time runs out and the rest wait for
/// the next turns (`read_yields`), so that established connections are served between; every
/// one is answered in the end. The test drives the loop's turns itself.
#[test]
fn a_burst_of_client_hellos_is_spread_over_turns() {
    let Some(certs) = certs() else { return };
    // All from one address, which may hold a sixteenth of the handshakes in progress.
    let config = Config {
        tls_max_handshakes: 16 * 128,
        ..tls_config(&certs)
    };
    let mut server = wsloop::Server::new(config, Noop).unwrap();
    let addr = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    // One client's first flight, replayed on every connection.
    let name = ServerName::try_from("localhost").unwrap();
    let mut client =
        ClientConnection::new(client_config(&certs, rustls::ALL_VERSIONS), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    const N: usize = 100;
    let mut socks: Vec<TcpStream> = (0..N).map(|_| tcp(addr)).collect();
    // Accepted (turns until all are in), then every hello sent at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.stats().connections < N {
        assert!(Instant::now() < deadline, "not all accepted");
        server.turn(Some(Duration::from_millis(10))).unwrap();
    }
    for s in &mut socks {
        s.write_all(&hello).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200)); // all of them in the server's sockets
    let before = server.stats().read_yields;
    server.turn(Some(Duration::from_millis(10))).unwrap();
    let yielded = server.stats().read_yields - before;
    assert!(yielded > 0, "every ClientHello answered in one turn");
    // Every client gets its ServerHello in the end, none failed.
    for s in &socks {
        s.set_nonblocking(true).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        server.turn(Some(Duration::from_millis(1))).unwrap();
        let answered = socks
            .iter()
            .filter(|s| matches!(s.peek(&mut [0u8; 1]), Ok(1)))
            .count();
        if answered == N {
            break;
        }
        assert!(Instant::now() < deadline, "{answered} of {N} answered");
    }
    let st = server.stats();
    assert_eq!(st.tls_handshakes_failed.iter().sum::<u64>(), 0, "{st:?}");
    assert_eq!(st.tls_handshaking, N);
}

/// Records that each carry one byte of plaintext (a client can send a message that way, or
/// key updates between them) make little plaintext of a lot of ciphertext: one read hands
/// rustls at most 256 KiB of it and the rest is read next turn (a yield), so that such a
/// client cannot keep one read going until its socket drains; the message arrives whole.
#[test]
fn records_of_one_byte_are_read_over_several_turns() {
    let Some(certs) = certs() else { return };
    // A receive buffer that holds them all, so that the server finds them there at once.
    let server = TestServer::start(Config {
        socket_receive_buffer: 2 << 20,
        ..tls_config(&certs)
    });
    let mut raw = Raw::open(server.addr, &certs);
    let before = server.handle.stats().unwrap().read_yields;
    const LEN: usize = 40_000;
    let mut frame = vec![0x81, 0xfe, (LEN >> 8) as u8, LEN as u8, 0, 0, 0, 0];
    frame.extend(std::iter::repeat_n(b'a', LEN));
    let wire: Vec<u8> = frame.iter().flat_map(|b| raw.record(23, &[*b])).collect();
    assert!(wire.len() > 2 * 256 * 1024, "{}", wire.len());
    raw.sock.write_all(&wire).unwrap();
    let st = until(&server, "the message", |s| s.messages_received == 1);
    assert!(st.read_yields > before, "read in one go: {st:?}");
    assert_eq!(st.closed_total(), 0);
}
