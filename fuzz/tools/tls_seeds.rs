//! Writes the `tls` target's seeds into the folder named by its argument (`fuzz/seeds/tls`):
//! real ClientHellos captured from rustls's client (TLS 1.3 and 1.2), cut, fragmented into
//! tiny records, repeated or followed by garbage; alerts, ChangeCipherSpec and empty records
//! before a ClientHello; handshake messages announcing 64 KiB and more; cleartext and SSLv2;
//! and client-mode runs (a real client's upgrade request, key updates, close_notify then
//! data, the server writing to a small socket). Built in a throwaway crate that depends on
//! `rustls = { version = "0.23.48", default-features = false, features = ["std", "tls12",
//! "ring"] }` (as fuzz/Cargo.toml): `cargo run --offline -- fuzz/seeds/tls`. The input format
//! is `fuzz/checks/tls.rs`'s `decode`.
use std::sync::Arc;

/// `[flags, room, buf, n_ops]`, the operations `(kind, n)`, the stream.
fn seed(flags: u8, room: u8, buf: u8, ops: &[(u8, u16)], stream: &[u8]) -> Vec<u8> {
    let mut v = vec![flags, room, buf, ops.len() as u8];
    for (kind, n) in ops {
        v.push(*kind);
        v.extend(n.to_le_bytes());
    }
    v.extend_from_slice(stream);
    v
}

/// The operation kinds of `decode` (kind % 10).
const DATA: u8 = 0;
const RAW: u8 = 3;
const SERVER_WRITE: u8 = 4;
const ROOM: u8 = 5;
const KEY_UPDATE: u8 = 6;
const CLOSE_NOTIFY: u8 = 7;
const SERVER_CLOSE_NOTIFY: u8 = 8;
const EOF: u8 = 9;

fn hello(versions: &[&'static rustls::SupportedProtocolVersion]) -> Vec<u8> {
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out
}

/// `message` (a handshake message) in records of `size` bytes of payload each.
fn records(content_type: u8, message: &[u8], size: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for part in message.chunks(size.max(1)) {
        v.extend([content_type, 3, 3]);
        v.extend((part.len() as u16).to_be_bytes());
        v.extend_from_slice(part);
    }
    v
}

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("the seeds folder"));
    let h13 = hello(rustls::DEFAULT_VERSIONS);
    let h12 = hello(&[&rustls::version::TLS12]);
    let all = |s: &[u8]| vec![(DATA, s.len() as u16)];
    let message = &h13[5..]; // the ClientHello without its record header
    let alert = [0x15, 3, 3, 0, 2, 1, 0];
    let ccs = [0x14, 3, 3, 0, 1, 1];
    let big = |len: u32| {
        let mut m = vec![1, (len >> 16) as u8, (len >> 8) as u8, len as u8];
        m.extend(std::iter::repeat_n(0x41, 3 * 16384));
        records(0x16, &m, 16384)
    };
    let request = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\n\
Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let req = request.len() as u16;
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        ("raw_hello_tls13", seed(0, 255, 3, &all(&h13), &h13)),
        ("raw_hello_tls12", seed(0, 255, 3, &all(&h12), &h12)),
        (
            "raw_hello_split",
            seed(0, 255, 2, &[(DATA, 1), (DATA, 4), (DATA, 60), (DATA, 2000)], &h13),
        ),
        (
            "raw_half_hello_then_eof",
            seed(0, 255, 3, &[(DATA, 100), (EOF, 0)], &h13),
        ),
        (
            "raw_hello_then_garbage",
            seed(0, 255, 3, &[(DATA, 4000)], &[&h13[..], &[0x5a; 200]].concat()),
        ),
        (
            "raw_hello_twice",
            seed(0, 255, 3, &[(DATA, 4000)], &[&h13[..], &h13[..]].concat()),
        ),
        (
            "raw_hello_in_one_byte_records",
            seed(0, 255, 3, &[(DATA, 60000)], &records(0x16, message, 1)),
        ),
        (
            "raw_alerts_then_hello",
            seed(0, 255, 3, &[(DATA, 60000)], &[&alert.repeat(50)[..], &h13].concat()),
        ),
        (
            "raw_ccs_then_hello",
            seed(0, 255, 3, &[(DATA, 60000)], &[&ccs.repeat(100)[..], &h13].concat()),
        ),
        (
            "raw_empty_records_then_hello",
            seed(0, 255, 3, &[(DATA, 60000)], &[&[0x16, 3, 3, 0, 0].repeat(100)[..], &h13].concat()),
        ),
        (
            "raw_handshake_of_64k",
            seed(0, 255, 3, &[(DATA, 60000), (DATA, 60000)], &big(0xffff)),
        ),
        (
            "raw_handshake_over_64k",
            seed(0, 255, 3, &[(DATA, 60000), (DATA, 60000)], &big(0x10_0000)),
        ),
        (
            "raw_cleartext_http",
            seed(0, 255, 3, &all(request), request),
        ),
        (
            "raw_sslv2_hello",
            seed(0, 255, 3, &[(DATA, 64)], &[0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0, 0, 0, 0x10, 0x07, 0x00, 0xc0, 0x03, 0x00, 0x80, 0x01, 0x00, 0x80, 0x06, 0x00, 0x40]),
        ),
        ("client_upgrade_tls13", seed(1, 255, 3, &[(DATA, req)], request)),
        ("client_upgrade_tls12_small_records", seed(7, 255, 3, &[(DATA, req)], request)),
        (
            "client_upgrade_one_byte_reads",
            seed(1, 255, 0, &[(DATA, 10), (DATA, req)], request),
        ),
        (
            "client_key_update_flood",
            seed(
                1,
                255,
                3,
                &[&[(DATA, 20)][..], &[(KEY_UPDATE, 0); 40], &[(DATA, req)]].concat(),
                request,
            ),
        ),
        (
            "client_close_notify_then_data",
            seed(1, 255, 3, &[(DATA, 50), (CLOSE_NOTIFY, 0), (DATA, req)], request),
        ),
        (
            "client_raw_bytes_between_records",
            seed(1, 255, 3, &[(DATA, 50), (RAW, 3), (DATA, req)], &[&request[..50], b"\x17\x03\x03", &request[50..]].concat()),
        ),
        (
            "client_eof_mid_request",
            seed(3, 255, 2, &[(DATA, 30), (EOF, 0), (DATA, 30)], request),
        ),
        (
            "server_writes_to_a_small_socket",
            seed(
                1,
                0,
                3,
                &[(DATA, req), (SERVER_WRITE, 40000), (ROOM, 0), (SERVER_WRITE, 100), (ROOM, 10), (ROOM, 255), (SERVER_WRITE, 20000)],
                request,
            ),
        ),
        (
            "server_writes_64k_to_a_full_socket",
            seed(
                1,
                0,
                3,
                &[(DATA, req), (SERVER_WRITE, 65535), (SERVER_WRITE, 65535), (ROOM, 0), (SERVER_WRITE, 65535)],
                request,
            ),
        ),
        (
            "server_close_notify_then_write",
            seed(3, 255, 3, &[(DATA, req), (SERVER_WRITE, 300), (SERVER_CLOSE_NOTIFY, 0), (SERVER_WRITE, 300), (ROOM, 255)], request),
        ),
    ];
    seeds.sort();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
