//! Every RFC 6455 violation from a raw client is answered with a close frame carrying its code,
//! then the server closes the TCP connection; `on_close` gets that code exactly once and the
//! close is counted as a protocol error.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};
use wsloop::{CloseCode, CloseReason, Config};

const MAX: usize = 1024;

/// Upgrade, send `bytes` (possibly several frames), expect a close frame with `code`, then EOF.
fn violation(bytes: &[u8], code: u16) {
    violation_in_writes(&[bytes], code);
}

fn violation_in_writes(writes: &[&[u8]], code: u16) {
    let server = TestServer::start(Config {
        max_message_size: MAX,
        ..config()
    });
    let mut s = raw_ws(server.addr);
    let id = server.wait_open(1);
    for w in writes {
        s.write_all(w).unwrap();
    }
    let f = read_frame(&mut s);
    let (got, reason) = f.close().expect("close frame with a code");
    assert_eq!(got, code, "close code (reason {reason:?})");
    assert!(f.fin && !f.masked);
    expect_clean_eof(&mut s);
    drop(s);
    server.wait_closes(1);
    {
        let r = server.rec();
        let closes = r.closes_of(id);
        assert_eq!(closes.len(), 1, "{r:?}");
        assert_eq!(closes[0].code, code);
        assert_eq!(r.messages, 0, "no message may be delivered");
    }
    server.finish_closed(&[(CloseReason::Protocol(CloseCode(code)), 1)]);
}

#[test]
fn unmasked_frame_is_1002() {
    violation(&frame_raw(0x81, b"hi", None), 1002);
}

#[test]
fn rsv_bits_are_1002() {
    for rsv in [0x40, 0x20, 0x10] {
        violation(
            &frame_raw(0x80 | rsv | OP_TEXT, b"hi", Some([1, 2, 3, 4])),
            1002,
        );
    }
}

#[test]
fn reserved_opcodes_are_1002() {
    for op in [0x3, 0x7, 0xB, 0xF] {
        violation(&frame(true, op, b"x"), 1002);
    }
}

#[test]
fn continuation_without_start_is_1002() {
    violation(&frame(true, OP_CONT, b"orphan"), 1002);
}

#[test]
fn new_data_frame_inside_fragments_is_1002() {
    violation(
        &frames(&[(false, OP_TEXT, b"start"), (true, OP_TEXT, b"again")]),
        1002,
    );
    violation(
        &frames(&[(false, OP_BINARY, b"start"), (false, OP_BINARY, b"again")]),
        1002,
    );
}

#[test]
fn control_frame_over_125_bytes_is_1002() {
    violation(&frame(true, OP_PING, &[b'p'; 126]), 1002);
    violation(&frame(true, OP_PONG, &[b'p'; 200]), 1002);
}

#[test]
fn fragmented_ping_is_1002() {
    violation(&frame(false, OP_PING, b"half"), 1002);
}

#[test]
fn invalid_utf8_text_is_1007() {
    violation(&frame(true, OP_TEXT, b"ok \xff no"), 1007);
    // Overlong encoding and a surrogate.
    violation(&frame(true, OP_TEXT, b"\xc0\xaf"), 1007);
    violation(&frame(true, OP_TEXT, b"\xed\xa0\x80"), 1007);
}

#[test]
fn invalid_utf8_across_fragments_is_1007() {
    violation(
        &frames(&[(false, OP_TEXT, b"ok \xce"), (true, OP_CONT, b"\xff")]),
        1007,
    );
    // Truncated code point at the end of the message.
    violation(
        &frames(&[(false, OP_TEXT, b"ok"), (true, OP_CONT, b"\xe2\x82")]),
        1007,
    );
}

#[test]
fn message_over_max_size_is_1009() {
    violation(&frame(true, OP_BINARY, &bytes(MAX + 1, 1)), 1009);
    violation(&frame(true, OP_TEXT, text(MAX + 1, 1).as_bytes()), 1009);
    // Fragments that add up to more than the limit.
    let parts = frames(&[
        (false, OP_BINARY, &bytes(MAX / 2, 2)),
        (false, OP_CONT, &bytes(MAX / 2, 3)),
        (true, OP_CONT, b"!"),
    ]);
    violation(&parts, 1009);
}

#[test]
fn huge_announced_length_is_1009() {
    // A header announcing 2^63-1 bytes; no payload follows.
    let mut h = vec![0x82, 0x80 | 127];
    h.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
    h.extend_from_slice(&[9, 8, 7, 6]);
    violation(&h, 1009);
    // The header split across writes.
    violation_in_writes(&[&h[..5], &h[5..]], 1009);
}

#[test]
fn invalid_close_codes_are_1002() {
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
        violation(&close_frame(code, ""), 1002);
    }
    // A one-byte close payload.
    violation(&frame(true, OP_CLOSE, &[3]), 1002);
}

#[test]
fn invalid_utf8_close_reason_is_1002() {
    let mut p = 1000u16.to_be_bytes().to_vec();
    p.extend_from_slice(b"\xff");
    violation(&frame(true, OP_CLOSE, &p), 1002);
}

#[test]
fn violation_after_valid_messages_still_closes_once() {
    // Messages are echoed, then a violation in the same write as a valid message.
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    s.write_all(&frame(true, OP_TEXT, b"fine")).unwrap();
    assert_eq!(expect_frame(&mut s, OP_TEXT), b"fine");
    let mut w = frame(true, OP_TEXT, b"also fine");
    w.extend(frame_raw(0x81, b"bad", None));
    w.extend(frame(true, OP_TEXT, b"never seen"));
    s.write_all(&w).unwrap();
    assert_eq!(expect_frame(&mut s, OP_TEXT), b"also fine");
    assert_eq!(expect_close(&mut s).0, 1002);
    expect_clean_eof(&mut s);
    drop(s);
    server.wait_closes(1);
    assert_eq!(server.rec().messages, 2);
    assert_eq!(server.rec().closes[0].code, 1002);
    server.finish_closed(&[(CloseReason::Protocol(CloseCode(1002)), 1)]);
}

#[test]
fn oversized_message_with_payload_in_flight_still_gets_1009() {
    // The client is still sending a 4 MiB message when the server fails the connection after
    // its header: the close frame must reach the client, followed by an orderly EOF, not a
    // reset that destroys it.
    let server = TestServer::start(Config {
        max_message_size: MAX,
        // Long enough to drain the rest on a loaded machine: the connection ends at our EOF.
        close_timeout: Duration::from_secs(20),
        ..config()
    });
    let mut s = raw_ws(server.addr);
    let mut writer = s.try_clone().unwrap();
    let big = frame(true, OP_BINARY, &bytes(4 << 20, 9));
    // The server reads and discards the rest of the frame until our EOF: the write completes.
    let t = std::thread::spawn(move || writer.write_all(&big));
    let f = read_frame(&mut s);
    assert_eq!(f.close().map(|c| c.0), Some(1009));
    expect_clean_eof(&mut s);
    t.join()
        .expect("the writing thread")
        .expect("the rest of the message, drained by the server");
    drop(s);
    server.wait_close_code(1009);
    server.finish_closed(&[(CloseReason::Protocol(CloseCode(1009)), 1)]);
}

#[test]
fn violation_with_unread_input_ends_with_fin_not_reset() {
    // 200 KB are already on their way when the header fails the connection. Closing a socket
    // with unread input makes the kernel send a reset (which also discards any of our bytes
    // not yet transmitted); the server must instead send its close frame and an orderly EOF.
    let server = TestServer::start(Config {
        max_message_size: MAX,
        ..config()
    });
    let mut s = raw_ws(server.addr);
    s.write_all(&frame(true, OP_BINARY, &bytes(200_000, 9)))
        .unwrap();
    assert_eq!(expect_close(&mut s).0, 1009);
    expect_clean_eof(&mut s);
    drop(s);
    server.wait_close_code(1009);
    server.finish_closed(&[(CloseReason::Protocol(CloseCode(1009)), 1)]);
}

#[test]
fn violation_followed_by_client_fin_ends_promptly() {
    // The bad frame and the client's FIN arrive together: the connection must end on that EOF,
    // not linger until the (here very long) close timeout.
    let server = TestServer::start(Config {
        close_timeout: Duration::from_secs(60),
        ..config()
    });
    let mut s = raw_ws(server.addr);
    let id = server.wait_open(1);
    s.write_all(&frame_raw(0x81, b"unmasked", None)).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(expect_close(&mut s).0, 1002);
    expect_clean_eof(&mut s);
    server.wait_closes(1);
    assert_eq!(server.rec().closes_of(id)[0].code, 1002);
    drop(s);
    server.finish_closed(&[(CloseReason::Protocol(CloseCode(1002)), 1)]);
}

#[test]
fn after_a_violation_input_is_drained_until_the_close_timeout_when_the_client_never_ends() {
    // The client breaks the protocol and then keeps its side open, and keeps sending. The
    // server answers with its close frame and shuts its side down (FIN) at once, then reads
    // and discards whatever comes (so that closing never turns into a reset that destroys the
    // close frame), until the client's EOF or the close timeout, whichever is first: here the
    // timeout, which bounds the lingering.
    let close_timeout = Duration::from_millis(800);
    let server = TestServer::start(Config {
        close_timeout,
        ..config()
    });
    let mut s = raw_ws(server.addr);
    let start = Instant::now();
    s.write_all(&frame_raw(0x81, b"unmasked", None)).unwrap();
    assert_eq!(expect_close(&mut s).0, 1002);
    expect_clean_eof(&mut s);
    assert!(start.elapsed() < LATE, "our close frame and FIN came late");
    // Held and drained: what we send now is read and discarded, not refused with a reset.
    let mut sent = 0;
    while start.elapsed() < close_timeout / 2 {
        s.write_all(&frame(true, OP_TEXT, &[b'x'; 1000]))
            .expect("the server drains input while it lingers");
        sent += 1;
        thread::sleep(Duration::from_millis(10));
    }
    let held = server.stats();
    assert_eq!(held.connections, 1, "{held:?}");
    server.wait_stats("the lingering connection closed", |s| s.connections == 0);
    assert_deadline("the end of the lingering", start.elapsed(), close_timeout);
    server.wait_closes(1);
    assert_eq!(
        server.rec().messages,
        0,
        "{sent} messages after the violation delivered"
    );
    drop(s);
    server.finish_closed(&[(CloseReason::Protocol(CloseCode(1002)), 1)]);
}

#[test]
fn malformed_lengths_are_1002() {
    // A 5-byte payload announced with the 16-bit and the 64-bit encodings (not minimal).
    let mut h = vec![0x81, 0x80 | 126, 0, 5, 1, 2, 3, 4];
    h.extend_from_slice(b"hello");
    violation(&h, 1002);
    let mut h = vec![0x81, 0x80 | 127];
    h.extend_from_slice(&5u64.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    h.extend_from_slice(b"hello");
    violation(&h, 1002);
    // A 64-bit length with its most significant bit set.
    let mut h = vec![0x82, 0x80 | 127];
    h.extend_from_slice(&(1u64 << 63).to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    violation(&h, 1002);
}
