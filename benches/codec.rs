//! Criterion micro-benchmarks of the per-message and per-handshake hot path:
//! frame header parse, unmasking (bytes/s), UTF-8 validation (bytes/s), the handshake request
//! parse (and validation, and the accept key), one whole frame through `Session::read`, and the
//! timer wheel's insert / extend / fire at 10^5 entries.
//!
//! `cargo bench --bench codec` (all), `cargo bench --bench codec -- unmask` (a group).
//! `cargo test` does not run it (harness = false bench targets are only built by `cargo bench`).
// Benchmark code (see Cargo.toml's [lints]): it stops on the first error, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]
#![allow(clippy::unreachable)] // `unreachable!()` marks what a check has ruled out

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use wsloop::protocol::frame::{apply_mask, FrameHeader, OpCode};
use wsloop::protocol::handshake::{self, Limits, Parsed};
use wsloop::protocol::session::{Head, Session};
use wsloop::protocol::utf8::Utf8Validator;
use wsloop::timer_wheel::TimerWheel;

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const SIZES: [usize; 4] = [20, 1024, 16 * 1024, 64 * 1024];

/// A masked client frame header for a payload of `len` bytes.
fn masked_header(len: usize) -> Vec<u8> {
    let h = FrameHeader {
        fin: true,
        rsv: 0,
        opcode: OpCode::Binary,
        mask: Some(KEY),
        payload_len: len as u64,
    };
    let mut out = [0u8; wsloop::protocol::frame::MAX_HEADER_LEN];
    let n = h.encode(&mut out);
    out[..n].to_vec()
}

fn frame_header(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_header_parse");
    for (name, len) in [("7bit", 20usize), ("16bit", 1024), ("64bit", 100_000)] {
        let bytes = masked_header(len);
        g.bench_function(name, |b| {
            b.iter(|| FrameHeader::parse(black_box(&bytes)).expect("valid"))
        });
    }
    g.finish();
}

fn unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for size in SIZES {
        let mut buf: Vec<u8> = (0..size).map(|i| i as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), KEY, 0))
        });
        // An odd offset: the mask phase rotated, as for a payload split across reads.
        g.bench_with_input(BenchmarkId::new("offset3", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), KEY, 3))
        });
    }
    g.finish();
}

fn utf8(c: &mut Criterion) {
    let mut g = c.benchmark_group("utf8_validate");
    let ascii: Vec<u8> = (0..16 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    // Mixed 1-4 byte code points ("aé€😀" repeated), cut to a code point boundary.
    let mixed: Vec<u8> = "aé€😀".repeat(16 * 1024 / 10).into_bytes();
    for (name, data) in [("ascii_16k", &ascii), ("mixed_16k", &mixed)] {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                v.feed(black_box(data)).expect("valid");
                v.finish().expect("complete")
            })
        });
        // The same bytes in 1 KiB pieces that split code points (a message over many reads).
        g.bench_function(format!("{name}_pieces_1000"), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                for piece in black_box(data).chunks(1000) {
                    v.feed(piece).expect("valid");
                }
                v.finish().expect("complete")
            })
        });
    }
    g.finish();
}

/// A browser-like upgrade request (Chrome's headers, about 500 bytes).
const REQUEST: &[u8] = b"GET /chat?room=1 HTTP/1.1\r\n\
Host: 127.0.0.1:9001\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: http://127.0.0.1:9001\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";

fn handshake_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    let limits = Limits::default();
    g.throughput(Throughput::Bytes(REQUEST.len() as u64));
    g.bench_function("parse", |b| {
        b.iter(|| match handshake::parse(black_box(REQUEST), &limits) {
            Ok(Parsed::Complete { head_len, .. }) => head_len,
            _ => unreachable!("valid request"),
        })
    });
    g.bench_function("parse_validate", |b| {
        b.iter(|| match handshake::parse(black_box(REQUEST), &limits) {
            Ok(Parsed::Complete { request, .. }) => handshake::validate_upgrade(&request)
                .expect("valid")
                .key()
                .len(),
            _ => unreachable!("valid request"),
        })
    });
    g.bench_function("accept_key", |b| {
        b.iter(|| handshake::accept_key(black_box(b"dGhlIHNhbXBsZSBub25jZQ==")))
    });
    // Everything the protocol core does for one upgrade: parse, validate, write the 101.
    let mut out = Vec::with_capacity(256);
    g.bench_function("parse_validate_write_101", |b| {
        b.iter(|| {
            out.clear();
            match handshake::parse(black_box(REQUEST), &limits) {
                Ok(Parsed::Complete { request, .. }) => {
                    let up = handshake::validate_upgrade(&request).expect("valid");
                    handshake::write_accept(&mut out, up.key(), None);
                    out.len()
                }
                _ => unreachable!("valid request"),
            }
        })
    });
    g.finish();
}

/// An open session (handshake done).
fn open_session() -> Session {
    let mut s = Session::new();
    let head_len = match s.feed_head(REQUEST, &Limits::default()) {
        Ok(Head::Complete { head_len, .. }) => head_len,
        _ => unreachable!("valid request"),
    };
    let _ = s.finish_handshake(head_len, false);
    s
}

/// One whole masked binary frame through `Session::read`: header, checks, in-place unmask,
/// event (the protocol core's share of one echoed message on the server).
fn session_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("session_read_frame");
    for size in [20usize, 1024, 16 * 1024] {
        let mut frame = masked_header(size);
        frame.extend((0..size).map(|i| i as u8));
        let mut session = open_session();
        let (mut out, mut spill) = (Vec::new(), Vec::new());
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| {
                // Unmasking in place toggles the payload; binary payloads may be anything.
                let (used, event) = session
                    .read(black_box(&mut frame), &mut spill, 1 << 20, &mut out)
                    .expect("valid frame");
                assert!(event.is_some());
                used
            })
        });
    }
    g.finish();
}

const TIMERS: usize = 100_000;

/// Deadlines spread over 0..600 s in ms, as idle timeouts of many connections would be.
fn deadlines() -> Vec<u64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..TIMERS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1 + x % 600_000
        })
        .collect()
}

fn timer_wheel(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer_wheel_1e5");
    g.sample_size(20);
    g.throughput(Throughput::Elements(TIMERS as u64));
    let ds = deadlines();
    g.bench_function("insert", |b| {
        b.iter_batched(
            || TimerWheel::<u32>::with_capacity(0, TIMERS),
            |mut w| {
                for (i, &d) in ds.iter().enumerate() {
                    w.insert(d, i as u32);
                }
                w
            },
            BatchSize::LargeInput,
        )
    });
    let filled = || {
        let mut w = TimerWheel::<u32>::with_capacity(0, TIMERS);
        let keys: Vec<_> = ds
            .iter()
            .enumerate()
            .map(|(i, &d)| w.insert(d, i as u32))
            .collect();
        (w, keys)
    };
    // Extend every timer later (what a message does to its connection's idle deadline).
    g.bench_function("extend", |b| {
        b.iter_batched(
            filled,
            |(mut w, keys)| {
                for (k, &d) in keys.iter().zip(&ds) {
                    w.extend(*k, d + 60_000);
                }
                (w, keys)
            },
            BatchSize::LargeInput,
        )
    });
    // Fire every timer: advance past the last deadline and pop them all.
    g.bench_function("fire", |b| {
        b.iter_batched(
            filled,
            |(mut w, keys)| {
                let mut n = 0;
                while w.poll(700_000).is_some() {
                    n += 1;
                }
                assert_eq!(n, TIMERS);
                (w, keys)
            },
            BatchSize::LargeInput,
        )
    });
    // Cancel every timer (connections closing).
    g.bench_function("cancel", |b| {
        b.iter_batched(
            filled,
            |(mut w, keys)| {
                for k in &keys {
                    w.cancel(*k);
                }
                (w, keys)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    frame_header,
    unmask,
    utf8,
    handshake_parse,
    session_read,
    timer_wheel
);
criterion_main!(benches);
