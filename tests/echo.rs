//! Echo over real loopback sockets: sizes across every length encoding, messages spanning many
//! reads and partial writes, fragmented messages from a raw client, control frames inside them,
//! frames arriving with the handshake, and IPv6.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod child_support;
mod common;

use common::*;
use std::io::Write;
use std::net::SocketAddr;
use tungstenite::Message as TMsg;
use wsloop::{CloseReason, Config};

const MIB: usize = 1 << 20;

fn roundtrip(ws: &mut Ws, msg: TMsg) {
    let what = format!(
        "{} bytes {}",
        msg.len(),
        if msg.is_text() { "text" } else { "binary" }
    );
    ws.send(msg.clone()).unwrap();
    let back = ws.read().unwrap_or_else(|e| panic!("echo of {what}: {e}"));
    if back != msg {
        let got = match &back {
            TMsg::Close(c) => format!("close {c:?}"),
            m => format!("{} bytes", m.len()),
        };
        panic!("echo of {what} differs: got {got}");
    }
}

#[test]
fn echo_text_and_binary_at_every_length_boundary() {
    let server = TestServer::start(Config {
        max_message_size: MIB,
        ..config()
    });
    let mut ws = ws(server.addr);
    for (i, len) in [0, 1, 125, 126, 127, 65535, 65536, 65537, MIB]
        .into_iter()
        .enumerate()
    {
        roundtrip(&mut ws, TMsg::text(text(len, i as u64)));
        roundtrip(&mut ws, TMsg::binary(bytes(len, i as u64)));
    }
    close_client(&mut ws);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn large_messages_pipelined_span_reads_and_partial_writes() {
    // 24 messages of 1 MiB sent before any echo is read: the server reads each in many pieces
    // and cannot write the echoes at once (the client is not reading, and loopback buffers
    // absorb only a few MiB: tcp_wmem caps the send buffer at 4 MiB by default), so they go
    // through the connection's pending queue and writable events, which end in on_drain.
    let server = TestServer::start(Config {
        max_message_size: MIB,
        max_backpressure: 64 * MIB, // this test is about partial writes, not the limit
        ..config()
    });
    let mut ws = ws(server.addr);
    let msgs: Vec<TMsg> = (0..24)
        .map(|i| {
            if i % 2 == 0 {
                TMsg::binary(bytes(MIB, 100 + i))
            } else {
                TMsg::text(text(MIB, 100 + i))
            }
        })
        .collect();
    for m in &msgs {
        ws.send(m.clone()).unwrap();
    }
    for (i, m) in msgs.iter().enumerate() {
        let back = ws.read().unwrap();
        assert!(&back == m, "message {i} echoed wrong");
    }
    // on_drain runs just after the last queued byte is written: wait for it.
    server.wait_rec("on_drain (proof of a partial write)", |r| r.drains >= 1);
    close_client(&mut ws);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn multibyte_text_split_across_reads_is_valid() {
    // Code points straddle read boundaries (64 KiB receive buffer) and frame boundaries.
    let server = TestServer::start(Config {
        max_message_size: MIB,
        ..config()
    });
    let mut ws = ws(server.addr);
    let s: String = "κόσμε€𝄞a".repeat(300_000 / 16);
    roundtrip(&mut ws, TMsg::text(s.clone()));
    let mut raw = raw_ws(server.addr);
    let b = s.as_bytes();
    // Fragments cut inside code points.
    let cuts = [0, 1, 5, 70_001, b.len()];
    for w in cuts.windows(2) {
        let op = if w[0] == 0 { OP_TEXT } else { OP_CONT };
        raw.write_all(&frame(w[1] == b.len(), op, &b[w[0]..w[1]]))
            .unwrap();
    }
    assert_eq!(expect_frame(&mut raw, OP_TEXT), b);
    raw.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut raw), (1000, String::new()));
    expect_clean_eof(&mut raw);
    close_client(&mut ws);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 2)]);
}

#[test]
fn fragmented_messages_echo_as_one() {
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    // Text in three fragments, one of them empty-bodied continuation in the middle.
    s.write_all(&frame(false, OP_TEXT, b"Hel")).unwrap();
    s.write_all(&frame(false, OP_CONT, b"lo, ")).unwrap();
    s.write_all(&frame(true, OP_CONT, b"world")).unwrap();
    assert_eq!(expect_frame(&mut s, OP_TEXT), b"Hello, world");
    // Binary fragments, all in one write.
    let data = bytes(3000, 7);
    let mut w = frame(false, OP_BINARY, &data[..1000]);
    w.extend(frame(false, OP_CONT, &[]));
    w.extend(frame(false, OP_CONT, &data[1000..2999]));
    w.extend(frame(true, OP_CONT, &data[2999..]));
    s.write_all(&w).unwrap();
    assert_eq!(expect_frame(&mut s, OP_BINARY), data);
    // A UTF-8 character split between fragments.
    let e = "é".as_bytes();
    s.write_all(&frame(false, OP_TEXT, &[b'x', e[0]])).unwrap();
    s.write_all(&frame(true, OP_CONT, &[e[1], b'y'])).unwrap();
    assert_eq!(expect_frame(&mut s, OP_TEXT), "xéy".as_bytes());
    s.write_all(&close_frame(1000, "done")).unwrap();
    assert_eq!(expect_close(&mut s).0, 1000);
    expect_clean_eof(&mut s);
    server.wait_closes(1);
    assert_eq!(server.rec().messages, 3);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn ping_inside_fragmented_message_gets_pong() {
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    s.write_all(&frame(false, OP_TEXT, b"ab")).unwrap();
    s.write_all(&frame(true, OP_PING, b"p!")).unwrap();
    // The pong comes before the message is complete.
    assert_eq!(expect_frame(&mut s, OP_PONG), b"p!");
    s.write_all(&frame(true, OP_CONT, b"cd")).unwrap();
    assert_eq!(expect_frame(&mut s, OP_TEXT), b"abcd");
    // A ping and an unsolicited pong between fragments, all in one write.
    let mut w = frame(false, OP_BINARY, b"12");
    w.extend(frame(true, OP_PING, b""));
    w.extend(frame(true, OP_PONG, b"unsolicited"));
    w.extend(frame(true, OP_CONT, b"34"));
    s.write_all(&w).unwrap();
    // The pong answers the pings of a whole read once that read is done: after the echo.
    assert_eq!(expect_frame(&mut s, OP_BINARY), b"1234");
    assert_eq!(expect_frame(&mut s, OP_PONG), b"");
    s.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut s).0, 1000);
    expect_clean_eof(&mut s);
    server.wait_closes(1);
    {
        let r = server.rec();
        assert_eq!((r.pings, r.pongs, r.messages), (2, 1, 2));
    }
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn frames_trickled_byte_by_byte() {
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    let payload = bytes(300, 3); // 16-bit length: header split at every byte
    let f = frame(true, OP_BINARY, &payload);
    for b in &f {
        s.write_all(std::slice::from_ref(b)).unwrap();
        s.flush().unwrap();
    }
    assert_eq!(expect_frame(&mut s, OP_BINARY), payload);
    for b in frame(true, OP_PING, b"tiny") {
        s.write_all(&[b]).unwrap();
    }
    assert_eq!(expect_frame(&mut s, OP_PONG), b"tiny");
    s.write_all(&close_frame(1000, "")).unwrap();
    expect_close(&mut s);
    expect_clean_eof(&mut s);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn frames_sent_with_the_request_are_not_lost() {
    let server = TestServer::start(config());
    // The request head and two frames in one write.
    let mut s = tcp(server.addr);
    let mut w = upgrade_request(server.addr).into_bytes();
    w.extend(frame(true, OP_TEXT, b"early"));
    w.extend(frame(true, OP_BINARY, b"bird"));
    s.write_all(&w).unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 101 "));
    assert_eq!(expect_frame(&mut s, OP_TEXT), b"early");
    assert_eq!(expect_frame(&mut s, OP_BINARY), b"bird");
    s.write_all(&close_frame(1000, "")).unwrap();
    expect_close(&mut s);
    expect_clean_eof(&mut s);

    // The head trickled over several writes, the last one carrying a frame as well.
    let mut s = tcp(server.addr);
    s.set_nodelay(true).unwrap();
    let req = upgrade_request(server.addr).into_bytes();
    let (a, b) = req.split_at(20);
    s.write_all(a).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut w = b.to_vec();
    w.extend(frame(true, OP_TEXT, b"late"));
    s.write_all(&w).unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 101 "));
    assert_eq!(expect_frame(&mut s, OP_TEXT), b"late");
    s.write_all(&close_frame(1000, "")).unwrap();
    expect_close(&mut s);
    expect_clean_eof(&mut s);

    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 2)]);
}

#[test]
fn ipv6_echo() {
    let listen: SocketAddr = "[::1]:0".parse().unwrap();
    let server = match TestServer::start_full(config(), Opts::default(), listen, Drive::Run) {
        Ok(s) => s,
        Err(e) => {
            // A note and a skip where the machine has no IPv6 loopback; under CI an error.
            child_support::missing(
                "ipv6",
                "IPv6 loopback",
                &format!("cannot listen on [::1]: {e}"),
                "enable IPv6 on lo: sysctl net.ipv6.conf.lo.disable_ipv6=0",
            );
            return;
        }
    };
    assert!(server.addr.is_ipv6());
    let mut ws = ws(server.addr);
    roundtrip(&mut ws, TMsg::text("over IPv6"));
    roundtrip(&mut ws, TMsg::binary(bytes(60_000, 6)));
    close_client(&mut ws);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
}

/// The length on the wire of a server frame with a `len`-byte payload.
fn server_frame_len(len: usize) -> usize {
    len + match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Large payloads (4 KiB and more) are written from the receive buffer with one `writev` of the
/// cork, the header and the payload when nothing is queued and theirs is the last message of a
/// read; what the socket does not take is queued and drained by writable events. Small frames
/// in between must keep their place, every byte must arrive as sent, and the byte and message
/// counters must stay exact.
#[test]
fn large_echoes_interleaved_with_small_ones_keep_order_through_partial_writes() {
    let server = TestServer::start(Config {
        max_message_size: MIB,
        max_backpressure: 64 * MIB, // about order and partial writes, not the limit
        ..config()
    });
    let mut s = tcp_rcvbuf(server.addr, 4096);
    s.set_nodelay(true).unwrap();
    s.write_all(upgrade_request(server.addr).as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head:?}");
    let mut expected_bytes = head.len();
    let mut messages = 0u64;
    let sizes = [
        16 * 1024,
        64 * 1024,
        MIB,
        4095,
        4096,
        16 * 1024 + 1,
        65536 + 5,
    ];
    // (opcode, payload) of message pair `i`: a small text naming it, then a large one (binary
    // and text in turn), whose echo goes out with the small one's from the cork.
    let message = |i: usize| -> [(u8, Vec<u8>); 2] {
        let len = sizes[i % sizes.len()];
        let large = match i % 2 {
            0 => (OP_BINARY, bytes(len, i as u64)),
            _ => (OP_TEXT, text(len, i as u64).into_bytes()),
        };
        [(OP_TEXT, format!("before {i}").into_bytes()), large]
    };
    // In lock step: every echo written at once (complete direct writes).
    for i in 0..sizes.len() {
        let pair = message(i);
        for (op, payload) in &pair {
            s.write_all(&frame(true, *op, payload)).unwrap();
        }
        for (op, payload) in &pair {
            assert!(expect_frame(&mut s, *op) == *payload, "echo {i} differs");
            expected_bytes += server_frame_len(payload.len());
            messages += 1;
        }
    }
    // Then rounds in which the client writes everything before it reads anything and waits a
    // while: the echoes (~7 MiB a round, more than loopback socket buffers hold: tcp_wmem caps
    // the send buffer at 4 MiB by default) fill the socket, a write is cut short, and the rest
    // queues. In odd rounds the client pauses after each pair, so that most pairs arrive in
    // reads of their own and their large echoes are written directly until the socket is full;
    // in even rounds the echoes of pairs read together share the cork's writes.
    let mut next = sizes.len();
    for round in 0..4 {
        let batch: Vec<[(u8, Vec<u8>); 2]> = (next..next + 6 * sizes.len()).map(message).collect();
        for pair in &batch {
            for (op, payload) in pair {
                s.write_all(&frame(true, *op, payload)).unwrap();
            }
            if round % 2 == 1 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        for (j, (op, payload)) in batch.iter().flatten().enumerate() {
            let got = expect_frame(&mut s, *op);
            assert!(
                got == *payload,
                "round {round}: frame {j} differs ({} bytes, expected {})",
                got.len(),
                payload.len()
            );
            expected_bytes += server_frame_len(payload.len());
            messages += 1;
        }
        next += batch.len();
    }
    server.wait_rec("on_drain (proof of a partial write)", |r| r.drains >= 1);
    let stats = server.stats();
    assert_eq!(stats.messages_received, messages);
    assert_eq!(stats.messages_sent, messages);
    assert_eq!(stats.bytes_sent, expected_bytes as u64);
    s.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut s).0, 1000);
    expect_clean_eof(&mut s);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
}

/// Sends from other threads (`LoopHandle`, run by the loop as posted commands) take the same
/// path: large ones directly to the socket while nothing is queued, small ones through the cork,
/// in order, while the client is not reading.
#[test]
fn large_sends_from_a_loop_handle_keep_order_while_the_client_does_not_read() {
    let server = TestServer::start(Config {
        max_message_size: MIB,
        max_backpressure: 64 * MIB,
        ..config()
    });
    let mut s = tcp_rcvbuf(server.addr, 4096);
    s.write_all(upgrade_request(server.addr).as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head:?}");
    let id = server.wait_open(1);
    let sizes = [256 * 1024, 4096, 16 * 1024, MIB];
    let mut sent = Vec::new();
    for i in 0..24 {
        let large = bytes(sizes[i % sizes.len()], 1000 + i as u64);
        server.handle.try_send_binary(id, large.clone()).unwrap();
        server
            .handle
            .try_send_text(id, format!("small {i}"))
            .unwrap();
        sent.push((OP_BINARY, large));
        sent.push((OP_TEXT, format!("small {i}").into_bytes()));
    }
    // Every command has run once the stats come back (commands run in order).
    let before = server.stats();
    assert_eq!(before.messages_sent, sent.len() as u64);
    std::thread::sleep(std::time::Duration::from_millis(200));
    for (j, (op, payload)) in sent.iter().enumerate() {
        let got = expect_frame(&mut s, *op);
        assert!(got == *payload, "frame {j} differs");
    }
    server.wait_rec("on_drain (proof of a partial write)", |r| r.drains >= 1);
    let total: usize = sent.iter().map(|(_, p)| server_frame_len(p.len())).sum();
    assert_eq!(server.stats().bytes_sent, (head.len() + total) as u64);
    s.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut s).0, 1000);
    expect_clean_eof(&mut s);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
}
