//! permessage-deflate (RFC 7692), shared profile, over real sockets with a raw client: what the
//! 101 answers to each kind of offer (and the 400 for a malformed header), compressed messages
//! echoed both ways (RSV1 on the server's frames at or above the threshold, clear below it),
//! fragmented compressed messages, the RSV1 errors, and the zip bomb closed with 1009; and the
//! `wsloop` binary under a flood of zip bombs, its peak memory bounded by the limit.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[allow(dead_code)]
mod attack_support;
mod child_support;
mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use wsloop::protocol::deflate::{Agreement, Dedicated, Deflater, Inflater};
use wsloop::{CloseReason, Compression, Config};

const RSV1: u8 = 0x40;
const FIN: u8 = 0x80;
const MASK: [u8; 4] = [1, 2, 3, 4];

fn shared() -> Config {
    Config {
        compression: Compression::Shared,
        compression_threshold: 100,
        ..config()
    }
}

fn extension_of(head: &str) -> Option<String> {
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, v)| v.trim().to_string())
}

fn deflated(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Deflater::new(15).compress(data, &mut out);
    out
}

fn inflated(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Inflater::new().inflate(data, &mut out, 1 << 24).unwrap();
    out
}

fn json(n: usize) -> String {
    let items: Vec<String> = (0..n)
        .map(|i| format!("{{\"id\":{i},\"user\":\"user{}\",\"online\":true}}", i % 9))
        .collect();
    format!("{{\"type\":\"presence\",\"items\":[{}]}}", items.join(","))
}

const SHARED_ANSWER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[test]
fn the_101_answers_each_offer_as_the_rfc_requires() {
    let server = TestServer::start(shared());
    let cases: &[(&[&str], Option<&str>)] = &[
        // Browsers, Python websockets and Node ws offer this.
        (
            &["permessage-deflate; client_max_window_bits"],
            Some(SHARED_ANSWER),
        ),
        (&["permessage-deflate"], Some(SHARED_ANSWER)),
        (
            &["permessage-deflate; server_max_window_bits=10"],
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"),
        ),
        // 8 bits cannot be honoured: declined, the next offer taken.
        (
            &["permessage-deflate; server_max_window_bits=8, permessage-deflate"],
            Some(SHARED_ANSWER),
        ),
        (&["permessage-deflate; server_max_window_bits=8"], None),
        (&["permessage-deflate; unknown=1"], None),
        (&["x-webkit-deflate-frame"], None),
        (&[], None),
        // Offers on several lines.
        (
            &["foo", "permessage-deflate; client_no_context_takeover"],
            Some(SHARED_ANSWER),
        ),
    ];
    for (offers, want) in cases {
        let (mut s, head) = upgrade_offering(server.addr, offers);
        assert!(head.starts_with("HTTP/1.1 101 "), "{offers:?}: {head}");
        assert_eq!(extension_of(&head).as_deref(), *want, "{offers:?}");
        s.write_all(&close_frame(1000, "")).unwrap();
        expect_close(&mut s);
    }
    // A malformed header fails the handshake with 400 and the reason.
    let (_, head) = upgrade_offering(server.addr, &["permessage-deflate; a=\"unterminated"]);
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    let mut s = tcp(server.addr);
    let mut req = upgrade_request(server.addr);
    req.truncate(req.len() - 2);
    req.push_str("Sec-WebSocket-Extensions: permessage-deflate;;\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 400);
    assert!(
        r.body.starts_with("malformed Sec-WebSocket-Extensions"),
        "{r:?}"
    );
    server.finish();

    // With compression off the header is not read at all: no extension, even when malformed.
    let server = TestServer::start(config());
    for offers in [
        &["permessage-deflate; client_max_window_bits"][..],
        &["permessage-deflate;;"],
    ] {
        let (mut s, head) = upgrade_offering(server.addr, offers);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert_eq!(extension_of(&head), None);
        // RSV1 is a protocol error without the extension.
        s.write_all(&frame_raw(
            FIN | RSV1 | OP_TEXT,
            &deflated(b"hi"),
            Some(MASK),
        ))
        .unwrap();
        assert_eq!(expect_close(&mut s).0, 1002);
    }
    server.finish();
}

#[test]
fn compressed_messages_are_echoed_compressed_and_small_ones_plain() {
    let server = TestServer::start(shared());
    let (mut s, head) =
        upgrade_offering(server.addr, &["permessage-deflate; client_max_window_bits"]);
    assert_eq!(extension_of(&head).as_deref(), Some(SHARED_ANSWER));
    let big = json(40);
    assert!(big.len() > 1000);
    // A compressed text message at least the threshold: echoed compressed.
    let z = deflated(big.as_bytes());
    assert!(z.len() < big.len() / 3, "{} -> {}", big.len(), z.len());
    s.write_all(&frame_raw(FIN | RSV1 | OP_TEXT, &z, Some(MASK)))
        .unwrap();
    let f = read_frame(&mut s);
    assert_eq!((f.fin, f.rsv, f.opcode), (true, 4, OP_TEXT), "{f:?}");
    assert!(f.payload.len() < big.len() / 3);
    assert_eq!(inflated(&f.payload), big.as_bytes());
    // A plain (uncompressed) message from the client: the echo is compressed all the same.
    s.write_all(&frame(true, OP_BINARY, big.as_bytes()))
        .unwrap();
    let f = read_frame(&mut s);
    assert_eq!((f.rsv, f.opcode), (4, OP_BINARY));
    assert_eq!(inflated(&f.payload), big.as_bytes());
    // Below the threshold (100 here): sent as it is, RSV1 clear, even if it came compressed.
    s.write_all(&frame_raw(
        FIN | RSV1 | OP_TEXT,
        &deflated(b"short"),
        Some(MASK),
    ))
    .unwrap();
    let f = read_frame(&mut s);
    assert_eq!(
        (f.rsv, f.opcode, &f.payload[..]),
        (0, OP_TEXT, &b"short"[..])
    );
    // An empty compressed message (RFC 7692 section 7.2.3.6: one 0x00 byte).
    s.write_all(&frame_raw(FIN | RSV1 | OP_BINARY, &[0x00], Some(MASK)))
        .unwrap();
    let f = read_frame(&mut s);
    assert_eq!((f.rsv, f.opcode, f.payload.len()), (0, OP_BINARY, 0));
    // A compressed message in three fragments, RSV1 on the first only, a ping between.
    let z = deflated(big.as_bytes());
    let (a, rest) = z.split_at(z.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut bytes = frame_raw(RSV1 | OP_TEXT, a, Some(MASK));
    bytes.extend(frame(false, OP_CONT, b));
    bytes.extend(frame(true, OP_PING, b"p"));
    bytes.extend(frame(true, OP_CONT, c));
    for chunk in bytes.chunks(7) {
        s.write_all(chunk).unwrap();
    }
    // The pong and the echo, in whichever order the reads made (a pong follows the answers
    // to the messages of its read).
    let (x, y) = (read_frame(&mut s), read_frame(&mut s));
    let (pong, f) = if x.opcode == OP_PONG { (x, y) } else { (y, x) };
    assert_eq!(
        (pong.rsv, pong.opcode),
        (0, OP_PONG),
        "control frames never compressed"
    );
    assert_eq!((f.rsv, f.opcode), (4, OP_TEXT));
    assert_eq!(inflated(&f.payload), big.as_bytes());
    s.write_all(&close_frame(1000, "")).unwrap();
    let close = read_frame(&mut s);
    assert_eq!((close.rsv, close.opcode), (0, OP_CLOSE));
    let stats = server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
    // Received compressed: the first, the short one, the empty one and the fragmented one.
    assert_eq!(stats.compressed_messages, [4, 3]);
}

/// Compression work is metered per connection and turn, as reads are: 24 compressed 4 KiB
/// messages that arrive in one read (about 10 KB on the wire) are inflated and echoed compressed
/// over several turns (8 KiB of work each; past 32 KiB in a turn the rest waits), every one
/// intact and in order. Unmetered, they were all handled in the one turn, however many there
/// were: 32 clients sending hard-to-compress messages held the loop for seconds.
#[test]
fn compression_work_is_metered_per_turn_as_reads_are() {
    const N: usize = 24;
    let server = TestServer::start(shared());
    let (mut s, head) = upgrade_offering(server.addr, &["permessage-deflate"]);
    assert_eq!(extension_of(&head).as_deref(), Some(SHARED_ANSWER));
    let messages: Vec<String> = (0..N)
        .map(|i| {
            let mut m = format!("{i:03}{}", json(120));
            m.truncate(4096);
            m
        })
        .collect();
    let mut burst = Vec::new();
    let mut wire_in = 0;
    for m in &messages {
        let z = deflated(m.as_bytes());
        wire_in += z.len() as u64;
        burst.extend(frame_raw(FIN | RSV1 | OP_TEXT, &z, Some(MASK)));
    }
    assert!(burst.len() < 32 * 1024, "{} bytes: one read", burst.len());
    let before = server.stats().read_yields;
    assert_eq!(before, 0);
    s.write_all(&burst).unwrap();
    let mut wire_out = 0;
    for (i, m) in messages.iter().enumerate() {
        let f = read_frame(&mut s);
        assert_eq!((f.rsv, f.opcode), (4, OP_TEXT), "echo {i}");
        assert_eq!(inflated(&f.payload), m.as_bytes(), "echo {i}");
        wire_out += f.payload.len() as u64;
    }
    let stats = server.stats();
    // The bytes before and after compression, both ways.
    let plain = (N * 4096) as u64;
    assert_eq!(stats.compression_bytes, [wire_in, plain, plain, wire_out]);
    assert!(wire_out < plain / 3, "{wire_out} of {plain}");
    // 24 x 8 KiB of work at 32 KiB a turn: a yield every 4 messages (and after the last).
    assert!(
        stats.read_yields >= (N / 4) as u64 - 1,
        "{} yields for {N} messages in one read",
        stats.read_yields
    );
    assert_eq!(stats.compressed_messages, [N as u64, N as u64]);
    s.write_all(&close_frame(1000, "")).unwrap();
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

/// Compressed input is metered whatever it inflates to: one empty dynamic-Huffman block
/// (its code tables built, then only an end-of-block code) and the flush's empty stored block,
/// 28 bytes that inflate to nothing, cost the server far more than an empty message. 300 of
/// them in one read are handled over several turns (found by an attack review: metered by
/// their output alone they cost nothing, and 32 clients sending them held the loop for 1.5 s).
#[test]
fn input_that_inflates_to_nothing_is_metered_too() {
    const EMPTY_DYNAMIC_BLOCK: &str = "04200428feffffffffffffffffffffffffffffffffffffffff49ff00";
    const N: usize = 300;
    let block: Vec<u8> = (0..EMPTY_DYNAMIC_BLOCK.len() / 2)
        .map(|i| u8::from_str_radix(&EMPTY_DYNAMIC_BLOCK[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert_eq!(inflated(&block), b"");
    let server = TestServer::start(shared());
    let (mut s, head) = upgrade_offering(server.addr, &["permessage-deflate"]);
    assert_eq!(extension_of(&head).as_deref(), Some(SHARED_ANSWER));
    let one = frame_raw(FIN | RSV1 | OP_BINARY, &block, Some(MASK));
    s.write_all(&one.repeat(N)).unwrap();
    for i in 0..N {
        let f = read_frame(&mut s);
        assert_eq!((f.opcode, f.payload.len()), (OP_BINARY, 0), "echo {i}");
    }
    let stats = server.stats();
    // 300 x 28 bytes taken, each counting as 8 bytes of work: 67,200 against 32 KiB a turn.
    assert!(stats.read_yields >= 2, "{} yields", stats.read_yields);
    assert_eq!(stats.compression_bytes[..2], [(N * block.len()) as u64, 0]);
    s.write_all(&close_frame(1000, "")).unwrap();
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn a_zip_bomb_is_closed_with_1009_and_rsv1_misuse_with_1002() {
    let config = Config {
        max_message_size: 16 * 1024,
        ..shared()
    };
    let server = TestServer::start(config);
    let offer = ["permessage-deflate; client_max_window_bits"];
    // 15 MB of zeros in a frame under the 16 KiB limit.
    let bomb = deflated(&vec![0u8; 15 << 20]);
    assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
    let (mut s, _) = upgrade_offering(server.addr, &offer);
    s.write_all(&frame_raw(FIN | RSV1 | OP_BINARY, &bomb, Some(MASK)))
        .unwrap();
    assert_eq!(expect_close(&mut s).0, 1009);
    // Fragmented: the compressed size passes the limit first (1009 before inflating).
    let (mut s, _) = upgrade_offering(server.addr, &offer);
    let mut bytes = frame_raw(RSV1 | OP_BINARY, &bomb, Some(MASK));
    bytes.extend(frame(true, OP_CONT, &bomb));
    s.write_all(&bytes).unwrap();
    assert_eq!(expect_close(&mut s).0, 1009);
    // Invalid deflate data: 1007. Invalid UTF-8 once inflated: 1007.
    for payload in [vec![0xff, 0xff, 0xff], deflated(b"abc \xc3\x28 def")] {
        let (mut s, _) = upgrade_offering(server.addr, &offer);
        s.write_all(&frame_raw(FIN | RSV1 | OP_TEXT, &payload, Some(MASK)))
            .unwrap();
        assert_eq!(expect_close(&mut s).0, 1007);
    }
    // RSV1 on a control frame, on a continuation frame: 1002.
    let z = deflated(b"0123456789");
    let mut continued = frame_raw(RSV1 | OP_TEXT, &z[..3], Some(MASK));
    continued.extend(frame_raw(FIN | RSV1 | OP_CONT, &z[3..], Some(MASK)));
    for bytes in [
        frame_raw(FIN | RSV1 | OP_PING, b"", Some(MASK)),
        frame_raw(FIN | RSV1 | OP_CLOSE, &[3, 232], Some(MASK)),
        continued,
    ] {
        let (mut s, _) = upgrade_offering(server.addr, &offer);
        s.write_all(&bytes).unwrap();
        assert_eq!(expect_close(&mut s).0, 1002);
    }
    let stats = server.wait_quiet();
    // The loop's compression state: a decompressor, nothing else (nothing was compressed).
    assert_eq!(stats.memory_bytes[3], Inflater::HEAP_BYTES, "{stats:?}");
    server.finish();
}

/// The peak resident memory of process `pid` (VmHWM), in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The binary with `--compression shared` and a 1 MiB message limit: 40 connections each send
/// a zip bomb (15 MB of zeros in a 15 KB frame) at once. Each is closed with 1009, and the
/// server's peak memory grows by less than 8 MiB (the bound is one message of 1 MiB at a time,
/// inflated on the loop's one decompressor); inflating a single bomb unbounded would add 15 MB.
#[test]
fn a_flood_of_zip_bombs_costs_the_binary_no_more_than_the_limit() {
    let w = attack_support::Wsloop::spawn(
        "bombs",
        &["--compression", "shared", "--max-message-size", "1048576"],
    );
    let offer = ["permessage-deflate; client_max_window_bits"];
    // Warm up: one compressed echo, so that the compressor and decompressor exist.
    let (mut s, head) = upgrade_offering(w.addr, &offer);
    assert_eq!(extension_of(&head).as_deref(), Some(SHARED_ANSWER));
    let big = json(100);
    s.write_all(&frame_raw(
        FIN | RSV1 | OP_TEXT,
        &deflated(big.as_bytes()),
        Some(MASK),
    ))
    .unwrap();
    let f = read_frame(&mut s);
    assert_eq!((f.rsv, inflated(&f.payload)), (4, big.into_bytes()));
    let before = peak_kib(w.pid);
    let bomb = frame_raw(
        FIN | RSV1 | OP_BINARY,
        &deflated(&vec![0u8; 15 << 20]),
        Some(MASK),
    );
    assert!(bomb.len() < 16 << 10, "{}", bomb.len());
    let mut bombers: Vec<TcpStream> = (0..40)
        .map(|_| upgrade_offering(w.addr, &offer).0)
        .collect();
    for b in &mut bombers {
        b.write_all(&bomb).unwrap();
    }
    for b in &mut bombers {
        assert_eq!(expect_close(b).0, 1009);
    }
    let grown = peak_kib(w.pid).saturating_sub(before);
    assert!(grown < 8 << 10, "peak memory grew by {grown} KiB");
    // The legitimate client is still served.
    s.write_all(&frame(true, OP_TEXT, b"still here")).unwrap();
    assert_eq!(read_frame(&mut s).payload, b"still here");
    s.write_all(&close_frame(1000, "")).unwrap();
    expect_close(&mut s);
    drop(bombers);
    let m = w.wait_quiet();
    assert_eq!(
        m.get("wsloop_compressed_messages_total{direction=\"received\"}"),
        41.0
    );
    assert_eq!(
        m.get("wsloop_connections_closed_total{reason=\"protocol_error\"}"),
        40.0
    );
    // Its compression state: the 15-bit compressor, the decompressor, the buffer.
    let state = m.get("wsloop_memory_bytes{kind=\"compression\"}") as usize;
    assert!(
        state >= Deflater::heap_bytes(15) + Inflater::HEAP_BYTES,
        "{state}"
    );
    w.stop();
}

/// Compressed output goes through the connection's one send path: a client that sends
/// incompressible data compressed and never reads gets its echoes compressed until its queue
/// passes `max_backpressure`; it is then closed for backpressure (1008 when the server reads one
/// more message in the turn that filled the queue, else a reset when the paused connection has
/// not drained by the write-stall deadline, here 1 s); the queue never held more than the limit
/// and one (compressed) message.
#[test]
fn compressed_echoes_count_against_the_backpressure_limit() {
    const LIMIT: usize = 64 * 1024;
    const MSG: usize = 8 * 1024;
    let server = TestServer::start(Config {
        max_backpressure: LIMIT,
        socket_send_buffer: 16 * 1024,
        write_stall_timeout: std::time::Duration::from_secs(1),
        ..shared()
    });
    let mut s = tcp_rcvbuf(server.addr, 4096);
    let mut req = upgrade_request(server.addr);
    req.truncate(req.len() - 2);
    req.push_str("Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert_eq!(extension_of(&head).as_deref(), Some(SHARED_ANSWER));
    // Incompressible: deflate makes it a few bytes longer, never shorter.
    let noise = bytes(MSG, 11);
    let z = deflated(&noise);
    assert!(z.len() >= MSG, "{}", z.len());
    let one = frame_raw(FIN | RSV1 | OP_BINARY, &z, Some(MASK));
    s.set_write_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let mut sent = 0;
    // The server stops reading once its queue is over the limit: our writes then stall.
    while sent < 2000 && s.write_all(&one).is_ok() {
        sent += 1;
    }
    // The connection ends with the 1008 (counted as `backpressure`); what arrived before
    // (the server resets a connection that does not read, so the tail may be lost) is the
    // echoes, compressed and intact.
    let stats = server.wait_stats("the backpressure close", |st| {
        st.closed[CloseReason::Backpressure.index()] == 1
    });
    assert!(
        stats.queue_peak <= LIMIT + z.len() + 16,
        "queue peaked at {} bytes",
        stats.queue_peak
    );
    let echoed = stats.compressed_messages[1];
    assert!(
        echoed > 0 && echoed < sent,
        "{echoed} of {sent} echoed compressed"
    );
    let mut echoes = 0;
    let mut header = [0u8; 4];
    while s.read_exact(&mut header[..2]).is_ok() && header[0] & 0x0f == OP_BINARY {
        assert_eq!(header[0] & 0x70, 0x40, "echo {echoes} not compressed");
        assert_eq!(header[1], 126, "an 8 KiB frame");
        if s.read_exact(&mut header[2..4]).is_err() {
            break;
        }
        let mut payload = vec![0u8; u16::from_be_bytes([header[2], header[3]]) as usize];
        if s.read_exact(&mut payload).is_err() {
            break;
        }
        assert!(inflated(&payload) == noise, "echo {echoes} differs");
        echoes += 1;
    }
    assert!(echoes as u64 <= echoed);
    drop(s);
    server.finish();
}

/// The dedicated profile within its budget: each connection gets its own compressor and
/// decompressor (context taken over both ways: two messages that repeat each other are echoed
/// intact, the second far smaller on the wire) while the compression budget has room for its
/// state; the next one is answered with the shared profile instead (a downgrade, counted) and
/// works as well; a connection that ends gives its bytes back, and the next one gets its own
/// again. The budget is never passed.
#[test]
fn the_dedicated_profile_downgrades_to_shared_when_its_budget_is_full() {
    let each = dedicated_state_bytes();
    let server = TestServer::start(Config {
        compression: Compression::Dedicated,
        compression_threshold: 100,
        compression_budget: 2 * each + each / 2,
        ..config()
    });
    // Two repetitive messages, compressed with context taken over, as a dedicated client does.
    let message = |i: usize| format!("{i} {}", json(30));
    let talk = |s: &mut TcpStream, takeover: bool| {
        let mut d = Deflater::with(15, 8, takeover);
        let mut i = Inflater::with_window(15, takeover);
        let mut sizes = Vec::new();
        for n in 0..2 {
            let m = message(n);
            let mut z = Vec::new();
            d.compress(m.as_bytes(), &mut z);
            s.write_all(&frame_raw(FIN | RSV1 | OP_TEXT, &z, Some(MASK)))
                .unwrap();
            let f = read_frame(s);
            assert_eq!((f.rsv, f.opcode), (4, OP_TEXT));
            let mut out = Vec::new();
            i.inflate(&f.payload, &mut out, 1 << 20).unwrap();
            assert_eq!(out, m.as_bytes());
            sizes.push(f.payload.len());
        }
        sizes
    };
    let dedicated_answer = Some("permessage-deflate");
    let mut conns = Vec::new();
    for _ in 0..2 {
        let (mut s, head) = upgrade_offering(server.addr, &["permessage-deflate"]);
        assert_eq!(extension_of(&head).as_deref(), dedicated_answer);
        let sizes = talk(&mut s, true);
        assert!(sizes[1] < sizes[0] / 3, "context taken over: {sizes:?}");
        conns.push(s);
    }
    let st = server.stats();
    assert_eq!(st.compression_budget, [2 * each + each / 2, 2 * each]);
    assert_eq!(
        (st.compression_connections, st.compression_downgrades),
        ([0, 2], 0)
    );
    assert!(st.memory_bytes[3] >= 2 * each, "{:?}", st.memory_bytes);
    // The third does not fit: the shared profile, and it works.
    let (mut third, head) = upgrade_offering(server.addr, &["permessage-deflate"]);
    assert_eq!(extension_of(&head).as_deref(), Some(SHARED_ANSWER));
    let sizes = talk(&mut third, false);
    assert!(sizes[1] > sizes[0] / 2, "each on its own: {sizes:?}");
    let st = server.stats();
    assert_eq!(
        (st.compression_connections, st.compression_downgrades),
        ([1, 2], 1)
    );
    assert_eq!(st.compression_budget[1], 2 * each, "never over the budget");
    // One dedicated connection leaves: its bytes come back, and the next one has its own.
    let mut first = conns.remove(0);
    first.write_all(&close_frame(1000, "")).unwrap();
    expect_close(&mut first);
    server.wait_stats("the first to end", |st| st.compression_budget[1] == each);
    let (mut fourth, head) = upgrade_offering(server.addr, &["permessage-deflate"]);
    assert_eq!(extension_of(&head).as_deref(), dedicated_answer);
    talk(&mut fourth, true);
    let st = server.stats();
    assert_eq!(
        (st.compression_connections, st.compression_downgrades),
        ([1, 2], 1)
    );
    drop((conns, third, fourth, first));
    let st = server.wait_stats("every connection to end", |st| st.connections == 0);
    assert_eq!(st.compression_connections, [0, 0]);
    assert_eq!(st.compression_budget[1], 0, "every reservation given back");
    server.finish();
}

/// The compression budget is at most half the memory budget (the state counts in the memory
/// budget too, and shedding cannot reduce it): configured above that, it is cut to half, and
/// the dedicated connections hold no more; an offer without context takeover either way is
/// served by the loop's shared compressor, reserving nothing.
#[test]
fn the_compression_budget_is_at_most_half_the_memory_budget() {
    let each = dedicated_state_bytes();
    let server = TestServer::start(Config {
        compression: Compression::Dedicated,
        memory_budget: 16 << 20,
        compression_budget: 64 << 20,
        ..config()
    });
    assert_eq!(server.stats().compression_budget, [8 << 20, 0]);
    let (mut free, head) = upgrade_offering(
        server.addr,
        &["permessage-deflate; server_no_context_takeover; client_no_context_takeover"],
    );
    assert_eq!(extension_of(&head).as_deref(), Some(SHARED_ANSWER));
    assert_eq!(
        server.stats().compression_connections,
        [1, 0],
        "no state reserved"
    );
    let mut held = Vec::new();
    let dedicated = loop {
        let (s, head) = upgrade_offering(server.addr, &["permessage-deflate"]);
        held.push(s);
        if extension_of(&head).as_deref() == Some(SHARED_ANSWER) {
            break held.len() - 1;
        }
        assert!(held.len() < 100, "no downgrade");
    };
    assert_eq!(dedicated, (8 << 20) / each);
    let st = server.stats();
    assert_eq!(st.compression_budget[1], dedicated * each);
    assert_eq!(st.compression_connections, [2, dedicated]);
    free.write_all(&close_frame(1000, "")).unwrap();
    expect_close(&mut free);
    drop(held);
    server.wait_stats("every connection to end", |st| st.connections == 0);
    server.finish();
}

/// What one connection's own state costs at the default window and memory level, for a plain
/// `permessage-deflate` offer (context takeover both ways).
fn dedicated_state_bytes() -> usize {
    let plain_offer = Agreement {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: None,
        client_max_window_bits: None,
    };
    Dedicated::heap_bytes(&plain_offer, 15, 8)
}
