//! Unit tests of [`Session`]: the RFC 6455 message-level rules (fragmentation, control frames,
//! UTF-8, size limits, the close handshake), zero-copy delivery, memory release, and independence
//! from how the byte stream is split into reads.

use super::*;
use crate::protocol::handshake::{validate_upgrade, Limits};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const KEY2: [u8; 4] = [0x01, 0x80, 0xfe, 0x7f];
const BIG: usize = 1 << 20;

const REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\n\
Host: server.example.com\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// Frame builders
// ---------------------------------------------------------------------------------------------

/// How the payload length is encoded.
#[derive(Clone, Copy, Debug)]
enum Len {
    /// The shortest form (what a conforming client sends).
    Minimal,
    /// Always the 16-bit form (126 + u16), whatever the length.
    Ext16,
    /// Always the 64-bit form (127 + u64), whatever the length.
    Ext64,
}

/// A frame header with an arbitrary announced length. `op` is the low seven bits of the first
/// byte: the opcode in bits 0-3 and the RSV bits in bits 4-6 (RSV1 = 0x40, RSV2 = 0x20,
/// RSV3 = 0x10).
fn frame_header(fin: bool, op: u8, len: u64, form: Len, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut v = vec![(u8::from(fin) << 7) | (op & 0x7f)];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match form {
        Len::Minimal if len < 126 => v.push(m | len as u8),
        Len::Minimal if len <= 0xffff => {
            v.push(m | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        }
        Len::Minimal | Len::Ext64 => {
            v.push(m | 127);
            v.extend_from_slice(&len.to_be_bytes());
        }
        Len::Ext16 => {
            v.push(m | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        }
    }
    if let Some(k) = mask {
        v.extend_from_slice(&k);
    }
    v
}

/// A complete client frame; see [`frame_header`] for `op`. `mask: None` sends it unmasked.
fn client_frame_len(
    fin: bool,
    op: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    form: Len,
) -> Vec<u8> {
    let mut v = frame_header(fin, op, payload.len() as u64, form, mask);
    let start = v.len();
    v.extend_from_slice(payload);
    if let Some(k) = mask {
        for (i, b) in v[start..].iter_mut().enumerate() {
            *b ^= k[i % 4];
        }
    }
    v
}

/// A complete client frame with the minimal length encoding.
fn client_frame(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    client_frame_len(fin, op, payload, mask, Len::Minimal)
}

fn text(s: &str) -> Vec<u8> {
    client_frame(true, 1, s.as_bytes(), Some(KEY))
}
fn binary(b: &[u8]) -> Vec<u8> {
    client_frame(true, 2, b, Some(KEY2))
}
fn ping(p: &[u8]) -> Vec<u8> {
    client_frame(true, 9, p, Some(KEY))
}
fn pong(p: &[u8]) -> Vec<u8> {
    client_frame(true, 10, p, Some(KEY2))
}
fn frag(fin: bool, op: u8, p: &[u8]) -> Vec<u8> {
    client_frame(fin, op, p, Some(KEY))
}
fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    [&code.to_be_bytes()[..], reason].concat()
}
fn client_close(code: u16, reason: &str) -> Vec<u8> {
    client_frame(true, 8, &close_payload(code, reason.as_bytes()), Some(KEY))
}

/// The exact bytes of an unmasked server control frame with a short payload.
fn server_control(op: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= 125);
    [&[0x80 | op, payload.len() as u8][..], payload].concat()
}
fn server_close(code: u16, reason: &str) -> Vec<u8> {
    server_control(8, &close_payload(code, reason.as_bytes()))
}

/// Decode the server frames in `out`: each must be complete, final, unmasked, RSV clear.
fn server_frames(out: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
    let mut rest = out;
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let (h, n) = FrameHeader::parse(rest)
            .expect("valid server frame")
            .expect("complete server frame header");
        assert!(h.fin && h.rsv == 0 && h.mask.is_none(), "{h:?}");
        let len = h.payload_len as usize;
        frames.push((h.opcode, rest[n..n + len].to_vec()));
        rest = &rest[n + len..];
    }
    frames
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `n` bytes of valid UTF-8 made of 1- to 4-byte characters.
fn utf8_of_len(n: usize) -> String {
    let mut s = String::new();
    for c in "aé€😀κόσμε".chars().cycle() {
        if s.len() + c.len_utf8() > n {
            break;
        }
        s.push(c);
    }
    while s.len() < n {
        s.push('z');
    }
    s
}

fn bytes_of_len(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// Driving a session
// ---------------------------------------------------------------------------------------------

/// An owned [`Event`], or the code of a [`ProtocolError`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, String),
    Error(u16),
}

fn own(e: Event<'_>) -> Ev {
    match e {
        Event::Text(s) => Ev::Text(s.to_owned()),
        Event::Binary(b) => Ev::Binary(b.to_vec()),
        Event::Ping(p) => Ev::Ping(p.to_vec()),
        Event::Pong(p) => Ev::Pong(p.to_vec()),
        Event::Close { code, reason } => Ev::Close(code.0, reason.to_owned()),
    }
}

/// What feeding a stream produced.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Run {
    events: Vec<Ev>,
    /// Everything the session wrote except pongs.
    out: Vec<u8>,
    /// The payload of the last pong written (after some read). Pongs are written once per read
    /// at most, so how many there are depends on the reads; which ping the last one answers
    /// does not.
    pong: Option<Vec<u8>>,
}

/// A session in [`State::Open`], reached through the real handshake path.
fn open() -> Session {
    let mut s = Session::new();
    let head_len = match s.feed_head(REQUEST, &Limits::default()) {
        Ok(Head::Complete {
            request,
            head_len,
            buffered,
        }) => {
            assert!(!buffered);
            validate_upgrade(&request).expect("valid upgrade");
            head_len
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(head_len, REQUEST.len());
    assert!(s.finish_handshake(head_len, false).is_empty());
    assert_eq!(s.state(), State::Open);
    assert_eq!(s.buffered_capacity(), 0);
    s
}

/// Feed one read's worth of bytes: copy `chunk` into a mutable buffer and call `read` until it
/// is used up (or an error ends the read). Events and errors are appended to `events`.
fn read_chunk(s: &mut Session, chunk: &[u8], max: usize, out: &mut Vec<u8>, events: &mut Vec<Ev>) {
    let mut buf = chunk.to_vec();
    let mut off = 0;
    while off < buf.len() {
        let mut spill = Vec::new();
        match s.read(&mut buf[off..], &mut spill, max, out) {
            Ok((used, ev)) => {
                let got = ev.map(own);
                assert!(used > 0 || got.is_some(), "read made no progress");
                assert!(off + used <= buf.len());
                off += used;
                events.extend(got);
            }
            Err(e) => {
                events.push(Ev::Error(e.code.0));
                return;
            }
        }
    }
}

/// Feed `pieces` as successive reads to `s`, writing the owed pong after each read as the loop
/// does. Checks that `read` writes no pong itself, and that each pong answers the most recent
/// ping delivered.
fn feed(s: &mut Session, pieces: &[&[u8]], max: usize) -> Run {
    let mut run = Run {
        events: Vec::new(),
        out: Vec::new(),
        pong: None,
    };
    for p in pieces {
        let mut out = Vec::new();
        read_chunk(s, p, max, &mut out, &mut run.events);
        assert!(
            server_frames(&out).iter().all(|f| f.0 != OpCode::Pong),
            "read wrote a pong"
        );
        run.out.extend(out);
        let owed = s.pong_owed();
        let mut pong = Vec::new();
        assert_eq!(s.write_pong(&mut pong), owed);
        assert!(!s.pong_owed());
        if owed {
            let frames = server_frames(&pong);
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].0, OpCode::Pong);
            let latest = run.events.iter().rev().find_map(|e| match e {
                Ev::Ping(p) => Some(p.clone()),
                _ => None,
            });
            assert_eq!(Some(&frames[0].1), latest.as_ref(), "not the latest ping");
            run.pong = Some(frames[0].1.clone());
        } else {
            assert!(pong.is_empty());
        }
    }
    run
}

/// Cut `stream` into chunks of the given sizes (cycled; the last chunk is whatever remains).
fn chunks<'a>(stream: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut v = Vec::new();
    let mut rest = stream;
    for &n in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (a, b) = rest.split_at(n.clamp(1, rest.len()));
        v.push(a);
        rest = b;
    }
    v
}

/// Feed `stream` to a fresh open session in one read.
fn run_whole(stream: &[u8], max: usize) -> Run {
    feed(&mut open(), &[stream], max)
}

/// Feed `stream` to a fresh open session in chunks of `sizes`.
fn run_sizes(stream: &[u8], sizes: &[usize], max: usize) -> Run {
    feed(&mut open(), &chunks(stream, sizes), max)
}

/// Tiny deterministic xorshift64 PRNG.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Feed `stream` whole and check it ends in protocol error `code`: the error is the last
/// event, exactly one close frame carrying `code` was written (and is the last frame), and
/// the session is closed. Returns the run.
#[track_caller]
fn assert_fails(stream: &[u8], max: usize, code: u16) -> Run {
    let mut s = open();
    let run = feed(&mut s, &[stream], max);
    assert_eq!(run.events.last(), Some(&Ev::Error(code)), "{run:?}");
    assert_eq!(
        run.events
            .iter()
            .filter(|e| matches!(e, Ev::Error(_)))
            .count(),
        1
    );
    assert_eq!(s.state(), State::Closed);
    let frames = server_frames(&run.out);
    let closes: Vec<_> = frames.iter().filter(|f| f.0 == OpCode::Close).collect();
    assert_eq!(closes.len(), 1, "exactly one close frame: {frames:?}");
    assert_eq!(
        frames.last().unwrap().0,
        OpCode::Close,
        "close frame is last"
    );
    assert_eq!(closes[0].1[..2], code.to_be_bytes(), "close code in out");
    // Further input is ignored.
    let later = feed(&mut s, &[&text("after")], max);
    assert_eq!(later.events, []);
    assert_eq!(later.out, []);
    run
}

// ---------------------------------------------------------------------------------------------
// 1. Single-frame messages
// ---------------------------------------------------------------------------------------------

#[test]
fn single_frame_text_and_binary_at_length_boundaries() {
    for n in [0, 1, 125, 126, 65535, 65536] {
        let s = utf8_of_len(n);
        assert_eq!(s.len(), n);
        let b = bytes_of_len(n);
        let stream = cat(&[&text(&s), &binary(&b)]);
        let mut session = open();
        let run = feed(&mut session, &[&stream], BIG);
        assert_eq!(run.events, [Ev::Text(s), Ev::Binary(b)], "length {n}");
        assert_eq!(run.out, [], "no reply to data");
        assert_eq!(session.state(), State::Open);
        assert_eq!(session.buffered_capacity(), 0);
    }
}

#[test]
fn rfc_6455_5_7_masked_hello() {
    let frame = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(frame.to_vec(), text("Hello"));
    let mut s = open();
    let mut input = frame;
    let mut out = Vec::new();
    let mut spill = Vec::new();
    let (used, ev) = s.read(&mut input, &mut spill, 125, &mut out).unwrap();
    assert_eq!(used, frame.len());
    assert_eq!(ev, Some(Event::Text("Hello")));
    assert_eq!(out, []);
}

// ---------------------------------------------------------------------------------------------
// 2. Zero-copy
// ---------------------------------------------------------------------------------------------

/// Read one event from `input[off..]`; returns (used, owned event, payload address range
/// relative to `input`'s start if the payload points into `input`).
fn read_locate(
    s: &mut Session,
    input: &mut [u8],
    off: usize,
) -> (usize, Option<Ev>, Option<(usize, usize)>) {
    let base = input.as_ptr() as usize;
    let end = base + input.len();
    let (mut out, mut spill) = (Vec::new(), Vec::new());
    let (used, ev) = s
        .read(&mut input[off..], &mut spill, BIG, &mut out)
        .unwrap();
    let slice: Option<&[u8]> = match &ev {
        Some(Event::Text(t)) => Some(t.as_bytes()),
        Some(Event::Binary(b)) => Some(b),
        _ => None,
    };
    let inside = slice.and_then(|p| {
        let start = p.as_ptr() as usize;
        (start >= base && start + p.len() <= end).then(|| (start - base, start - base + p.len()))
    });
    (used, ev.map(own), inside)
}

#[test]
fn single_frame_message_is_delivered_from_the_input_without_copy() {
    let hello = "zero-copy κόσμε";
    let blob = bytes_of_len(300);
    let t = text(hello);
    let b = binary(&blob);
    let mut input = cat(&[&t, &b]);
    let mut s = open();

    let (used, ev, at) = read_locate(&mut s, &mut input, 0);
    assert_eq!(used, t.len());
    assert_eq!(ev, Some(Ev::Text(hello.into())));
    assert_eq!(
        at,
        Some((t.len() - hello.len(), t.len())),
        "text points into input"
    );
    assert_eq!(s.buffered_capacity(), 0);

    let (used, ev, at) = read_locate(&mut s, &mut input, t.len());
    assert_eq!(used, b.len());
    assert_eq!(ev, Some(Ev::Binary(blob.clone())));
    assert_eq!(
        at,
        Some((input.len() - 300, input.len())),
        "binary points into input"
    );
    assert_eq!(s.buffered_capacity(), 0);

    // A header split across reads is carried inline; the payload, all in the next input, is
    // still delivered from that input.
    let mut first = b[..3].to_vec();
    let (used, ev, _) = read_locate(&mut s, &mut first, 0);
    assert_eq!((used, ev), (3, None));
    let mut second = b[3..].to_vec();
    let (used, ev, at) = read_locate(&mut s, &mut second, 0);
    assert_eq!(used, b.len() - 3);
    assert_eq!(ev, Some(Ev::Binary(blob)));
    assert_eq!(at, Some((second.len() - 300, second.len())));
    assert_eq!(s.buffered_capacity(), 0);
}

// ---------------------------------------------------------------------------------------------
// 3. Fragmentation
// ---------------------------------------------------------------------------------------------

#[test]
fn text_in_three_fragments_is_reassembled() {
    let stream = cat(&[
        &frag(false, 1, b"Hel"),
        &frag(false, 0, b"lo, "),
        &frag(true, 0, "wörld".as_bytes()),
    ]);
    let mut s = open();
    let run = feed(&mut s, &[&stream], BIG);
    assert_eq!(run.events, [Ev::Text("Hello, wörld".into())]);
    assert_eq!(run.out, []);
    assert_eq!(s.state(), State::Open);

    // Each fragment is consumed by its own call, which returns no event and leaves the rest.
    let mut s = open();
    let mut input = stream.clone();
    let (mut out, mut spill) = (Vec::new(), Vec::new());
    let (used, ev) = s.read(&mut input, &mut spill, BIG, &mut out).unwrap();
    assert_eq!((used, ev), (9, None));
    let (used, ev) = s.read(&mut input[9..], &mut spill, BIG, &mut out).unwrap();
    assert_eq!((used, ev), (10, None));
    let (used, ev) = s.read(&mut input[19..], &mut spill, BIG, &mut out).unwrap();
    assert_eq!(
        (used, ev),
        (stream.len() - 19, Some(Event::Text("Hello, wörld")))
    );
}

#[test]
fn binary_fragments_are_reassembled() {
    let blob = bytes_of_len(1000);
    let stream = cat(&[
        &frag(false, 2, &blob[..1]),
        &frag(false, 0, &[]),
        &frag(false, 0, &blob[1..400]),
        &frag(true, 0, &blob[400..]),
        &binary(b"next"),
    ]);
    let run = run_whole(&stream, BIG);
    assert_eq!(run.events, [Ev::Binary(blob), Ev::Binary(b"next".to_vec())]);
}

#[test]
fn continuation_without_a_message_is_1002() {
    assert_fails(&frag(true, 0, b"orphan"), BIG, 1002);
    assert_fails(&frag(false, 0, b"orphan"), BIG, 1002);
    // Also right after a complete message.
    let run = assert_fails(&cat(&[&text("done"), &frag(true, 0, b"x")]), BIG, 1002);
    assert_eq!(run.events, [Ev::Text("done".into()), Ev::Error(1002)]);
}

#[test]
fn new_data_frame_inside_a_fragmented_message_is_1002() {
    for (first, second) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
        for fin in [true, false] {
            let stream = cat(&[&frag(false, first, b"a"), &frag(fin, second, b"b")]);
            let run = assert_fails(&stream, BIG, 1002);
            assert_eq!(run.events, [Ev::Error(1002)]);
        }
    }
}

#[test]
fn control_frames_between_fragments_are_delivered_and_answered() {
    let stream = cat(&[
        &frag(false, 1, b"Hel"),
        &ping(b"are you there"),
        &frag(false, 0, b"lo "),
        &pong(b"yes"),
        &ping(b""),
        &frag(true, 0, b"world"),
    ]);
    let mut s = open();
    let run = feed(&mut s, &[&stream], BIG);
    assert_eq!(
        run.events,
        [
            Ev::Ping(b"are you there".to_vec()),
            Ev::Pong(b"yes".to_vec()),
            Ev::Ping(vec![]),
            Ev::Text("Hello world".into()),
        ]
    );
    assert_eq!(run.out, [], "no reply but the pong");
    assert_eq!(run.pong, Some(vec![]), "one pong, for the most recent ping");
    assert_eq!(s.state(), State::Open);
    // In separate reads, each ping gets its own pong.
    let mut s = open();
    let run = feed(&mut s, &[&ping(b"one")], BIG);
    assert_eq!(run.pong, Some(b"one".to_vec()));
    let run = feed(&mut s, &[&ping(b"two")], BIG);
    assert_eq!(run.pong, Some(b"two".to_vec()));
}

/// However many pings one read holds, the session writes nothing while reading them and owes
/// one pong: a ping flood costs the server at most one control frame per read.
#[test]
fn a_read_full_of_pings_owes_one_pong_and_writes_nothing() {
    let mut stream = Vec::new();
    for i in 0..2000u32 {
        stream.extend(ping(&[(i % 251) as u8; 125]));
    }
    let mut s = open();
    let mut out = Vec::new();
    let mut events = Vec::new();
    read_chunk(&mut s, &stream, BIG, &mut out, &mut events);
    assert_eq!(events.len(), 2000);
    assert_eq!(out, [], "read wrote while parsing pings");
    assert!(s.pong_owed());
    assert!(
        std::mem::size_of::<Session>() <= 96,
        "the owed pong is boxed"
    );
    let mut pong = Vec::new();
    assert!(s.write_pong(&mut pong));
    assert_eq!(pong, server_control(10, &[(1999 % 251) as u8; 125]));
    assert!(!s.write_pong(&mut pong), "one pong only");
    // An owed pong is dropped by our close: a closing connection answers no pings.
    read_chunk(&mut s, &ping(b"x"), BIG, &mut out, &mut events);
    assert!(s.pong_owed());
    assert!(s.close(CloseCode::NORMAL, "", &mut out));
    assert!(!s.pong_owed());
}

// ---------------------------------------------------------------------------------------------
// 4. Control frames and header rules
// ---------------------------------------------------------------------------------------------

#[test]
fn ping_with_125_bytes_gets_an_identical_pong() {
    let payload = bytes_of_len(125);
    let run = run_whole(&ping(&payload), BIG);
    assert_eq!(run.events, [Ev::Ping(payload.clone())]);
    assert_eq!(run.out, []);
    assert_eq!(run.pong, Some(payload));
}

#[test]
fn control_frame_longer_than_125_is_1002() {
    for op in [8, 9, 10] {
        let payload = bytes_of_len(126);
        assert_fails(&client_frame(true, op, &payload, Some(KEY)), BIG, 1002);
        // Fail-fast: the second header byte alone decides it.
        let mut s = open();
        let run = feed(&mut s, &[&[0x80 | op, 0x80 | 126]], BIG);
        assert_eq!(run.events, [Ev::Error(1002)]);
        let run = assert_fails(&[0x80 | op, 0x80 | 127], BIG, 1002);
        assert_eq!(run.events, [Ev::Error(1002)]);
    }
}

#[test]
fn fragmented_control_frame_is_1002() {
    for op in [8, 9, 10] {
        assert_fails(&client_frame(false, op, b"", Some(KEY)), BIG, 1002);
        // Between data fragments too.
        let stream = cat(&[
            &frag(false, 1, b"a"),
            &client_frame(false, op, b"x", Some(KEY)),
        ]);
        assert_fails(&stream, BIG, 1002);
    }
}

#[test]
fn reserved_opcodes_are_1002() {
    for op in (3..=7).chain(11..=15) {
        for fin in [true, false] {
            let run = assert_fails(&client_frame(fin, op, b"abc", Some(KEY)), BIG, 1002);
            assert_eq!(run.events, [Ev::Error(1002)]);
        }
    }
}

#[test]
fn rsv_bits_are_1002() {
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        for op in [1, 2, 9, 10, 8] {
            assert_fails(&client_frame(true, rsv | op, b"", Some(KEY)), BIG, 1002);
        }
        let stream = cat(&[&frag(false, 1, b"a"), &frag(true, rsv, b"b")]);
        assert_fails(&stream, BIG, 1002);
    }
}

#[test]
fn unmasked_client_frame_is_1002() {
    for op in [1, 2, 8, 9, 10] {
        let run = assert_fails(&client_frame(true, op, b"", None), BIG, 1002);
        assert_eq!(run.events, [Ev::Error(1002)]);
    }
    let stream = cat(&[&frag(false, 1, b"a"), &client_frame(true, 0, b"b", None)]);
    assert_fails(&stream, BIG, 1002);
}

#[test]
fn non_minimal_length_encodings_are_1002() {
    for op in [1, 2] {
        for n in [0, 1, 125] {
            let f = client_frame_len(true, op, &bytes_of_len(n), Some(KEY), Len::Ext16);
            assert_fails(&f, BIG, 1002);
        }
        for n in [0, 125, 126, 65535] {
            let f = client_frame_len(true, op, &bytes_of_len(n), Some(KEY), Len::Ext64);
            assert_fails(&f, BIG, 1002);
        }
    }
    // The minimal forms of the boundary lengths are accepted.
    for n in [125, 126, 65535, 65536] {
        let f = client_frame_len(true, 2, &bytes_of_len(n), Some(KEY), Len::Minimal);
        assert_eq!(run_whole(&f, BIG).events, [Ev::Binary(bytes_of_len(n))]);
    }
}

#[test]
fn length_with_msb_set_is_1002_not_1009() {
    for len in [1u64 << 63, u64::MAX, (1 << 63) | 5] {
        for op in [1, 2, 0] {
            let mut stream = if op == 0 {
                frag(false, 1, b"a")
            } else {
                vec![]
            };
            stream.extend(frame_header(true, op, len, Len::Ext64, Some(KEY)));
            let run = assert_fails(&stream, 100, 1002);
            assert_eq!(run.events, [Ev::Error(1002)]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. UTF-8
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_utf8_in_a_single_frame_is_1007() {
    for bad in [
        &b"\xff"[..],
        b"abc\xc0\xafdef",
        b"\xed\xa0\x80",          // surrogate
        b"\xf4\x90\x80\x80",      // above U+10FFFF
        b"caf\xc3",               // truncated at the end
        b"\xe2\x82\x28 trailing", // bad continuation
    ] {
        let f = client_frame(true, 1, bad, Some(KEY));
        let run = assert_fails(&f, BIG, 1007);
        assert_eq!(run.events, [Ev::Error(1007)], "{bad:02x?}");
        // The same bytes as binary are fine.
        let f = client_frame(true, 2, bad, Some(KEY));
        assert_eq!(run_whole(&f, BIG).events, [Ev::Binary(bad.to_vec())]);
    }
}

/// Feed each frame as its own read; returns the index of the frame whose read produced the
/// first error, and the events.
fn error_at_frame(frames: &[Vec<u8>]) -> (Option<usize>, Vec<Ev>) {
    error_at_frame_max(frames, BIG)
}

/// [`error_at_frame`] with a given `max_message`.
fn error_at_frame_max(frames: &[Vec<u8>], max: usize) -> (Option<usize>, Vec<Ev>) {
    let mut s = open();
    let mut out = Vec::new();
    let mut events = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        read_chunk(&mut s, f, max, &mut out, &mut events);
        if matches!(events.last(), Some(Ev::Error(_))) {
            return (Some(i), events);
        }
    }
    (None, events)
}

#[test]
fn invalid_utf8_fails_at_the_fragment_with_the_bad_byte() {
    // (fragments, index of the fragment holding the first invalid byte)
    let cases: [(&[&[u8]], usize); 5] = [
        (&[b"abc", b"de\xff", b"fgh", b"ijk"], 1),
        // € is E2 82 AC: the sequence is broken across the fragment boundary.
        (&[b"ab\xe2\x82", b"\x28", b"end"], 1),
        (&[b"ab\xe2", b"", b"\x82", b"\x28", b"end"], 3),
        // 4-byte lead, two good continuations, then a non-continuation.
        (&[b"\xf0", b"\x9f\x98", b"A", b"end"], 2),
        // A lead byte that can never start a sequence.
        (&[b"ok", b"\xf8", b"end"], 1),
    ];
    for (pieces, bad) in cases {
        let last = pieces.len() - 1;
        let frames: Vec<Vec<u8>> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| frag(i == last, if i == 0 { 1 } else { 0 }, p))
            .collect();
        assert!(bad < last, "the error must come before the final fragment");
        let (at, events) = error_at_frame(&frames);
        assert_eq!(at, Some(bad), "{pieces:02x?}");
        assert_eq!(events, [Ev::Error(1007)]);
    }

    // Within one frame split across reads: the error comes before the frame's end arrives.
    let f = client_frame(true, 1, b"good start \xc3\x28 and more after it", Some(KEY));
    let (at, events) = error_at_frame(&[f[..20].to_vec(), f[20..].to_vec()]);
    assert_eq!((at, events), (Some(0), vec![Ev::Error(1007)]));
}

#[test]
fn valid_multibyte_chars_split_across_fragments_pass() {
    let s = "κόσμε€😀a\u{10ffff}";
    let b = s.as_bytes();
    for i in 0..=b.len() {
        for j in i..=b.len() {
            let stream = cat(&[
                &frag(false, 1, &b[..i]),
                &ping(b"between"),
                &frag(false, 0, &b[i..j]),
                &frag(true, 0, &b[j..]),
            ]);
            let run = run_whole(&stream, BIG);
            assert_eq!(
                run.events,
                [Ev::Ping(b"between".to_vec()), Ev::Text(s.into())],
                "split {i} {j}"
            );
        }
    }
}

#[test]
fn truncated_code_point_at_the_end_of_the_message_is_1007() {
    // Single frame.
    assert_fails(
        &client_frame(true, 1, b"abc\xf0\x9f\x98", Some(KEY)),
        BIG,
        1007,
    );
    // Fragmented: each fragment is a valid prefix; only the end of the message is wrong.
    let frames = [
        frag(false, 1, b"abc"),
        frag(false, 0, b"\xf0\x9f"),
        frag(true, 0, b"\x98"),
    ];
    let (at, events) = error_at_frame(&frames);
    assert_eq!((at, events), (Some(2), vec![Ev::Error(1007)]));
    // Final fragment empty, the previous one left a code point open.
    let frames = [frag(false, 1, b"abc\xe2\x82"), frag(true, 0, b"")];
    let (at, events) = error_at_frame(&frames);
    assert_eq!((at, events), (Some(1), vec![Ev::Error(1007)]));
    // A single frame split across reads, truncated at its end.
    let f = client_frame(true, 1, b"abcdef\xc3", Some(KEY));
    let (at, events) = error_at_frame(&[f[..8].to_vec(), f[8..].to_vec()]);
    assert_eq!((at, events), (Some(1), vec![Ev::Error(1007)]));
}

#[test]
fn invalid_utf8_in_a_close_reason_is_1002() {
    let f = client_frame(true, 8, &close_payload(1000, b"bad \xff reason"), Some(KEY));
    let run = assert_fails(&f, BIG, 1002);
    assert_eq!(run.events, [Ev::Error(1002)]);
    // Split across reads (the control payload is buffered) gives the same.
    let mut s = open();
    let run = feed(&mut s, &[&f[..9], &f[9..]], BIG);
    assert_eq!(run.events, [Ev::Error(1002)]);
    assert_eq!(server_frames(&run.out)[0].1[..2], 1002u16.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// 6. Maximum message size
// ---------------------------------------------------------------------------------------------

#[test]
fn header_announcing_more_than_max_is_1009_before_any_payload() {
    let max = 1000;
    for (op, len) in [(1, 1001u64), (2, 1001), (1, 65536), (2, 70000)] {
        let header = frame_header(true, op, len, Len::Minimal, Some(KEY));
        let mut s = open();
        let run = feed(&mut s, &[&header], max);
        assert_eq!(run.events, [Ev::Error(1009)], "op {op} len {len}");
        assert_eq!(s.buffered_len(), 0);
        assert_eq!(s.buffered_capacity(), 0);
        assert_eq!(server_frames(&run.out)[0].1[..2], 1009u16.to_be_bytes());
        assert_eq!(s.state(), State::Closed);
        // Also with FIN clear (a first fragment).
        let header = frame_header(false, op, len, Len::Minimal, Some(KEY));
        let mut s = open();
        assert_eq!(feed(&mut s, &[&header], max).events, [Ev::Error(1009)]);
        assert_eq!(s.buffered_len(), 0);
    }
    // Header bytes trickled in one at a time: the error comes with the last header byte.
    let header = frame_header(true, 2, 5000, Len::Minimal, Some(KEY));
    let mut s = open();
    let pieces: Vec<&[u8]> = header.chunks(1).collect();
    let (init, last) = pieces.split_at(pieces.len() - 1);
    assert_eq!(feed(&mut s, init, max).events, []);
    assert_eq!(feed(&mut s, last, max).events, [Ev::Error(1009)]);
    assert_eq!(s.buffered_len(), 0);
}

#[test]
fn fragments_whose_sum_exceeds_max_are_1009_at_the_crossing_fragment() {
    let max = 100;
    let frames = [
        frag(false, 2, &[1; 40]),
        frag(false, 0, &[2; 40]),
        frag(false, 0, &[3; 21]),
        frag(true, 0, &[4; 1]),
    ];
    let (at, events) = error_at_frame_max(&frames, max);
    assert_eq!(at, Some(2));
    assert_eq!(events, [Ev::Error(1009)]);
    // Only the crossing fragment's header is needed.
    let mut s = open();
    let head = frame_header(false, 0, 21, Len::Minimal, Some(KEY));
    let run = feed(&mut s, &[&frames[0], &frames[1], &head], max);
    assert_eq!(run.events, [Ev::Error(1009)]);
    // Text too, with interleaved control frames not counting toward the size.
    let frames = [
        frag(false, 1, &[b'a'; 100]),
        ping(&[0; 125]),
        frag(true, 0, b"b"),
    ];
    let (at, events) = error_at_frame_max(&frames, max);
    assert_eq!(at, Some(2));
    assert_eq!(events, [Ev::Ping(vec![0; 125]), Ev::Error(1009)]);
}

#[test]
fn message_of_exactly_max_bytes_is_accepted() {
    let max = 100;
    let blob = bytes_of_len(max);
    assert_eq!(
        run_whole(&binary(&blob), max).events,
        [Ev::Binary(blob.clone())]
    );
    let t = utf8_of_len(max);
    assert_eq!(run_whole(&text(&t), max).events, [Ev::Text(t.clone())]);
    let stream = cat(&[
        &frag(false, 2, &blob[..40]),
        &ping(b"p"),
        &frag(false, 0, &blob[40..80]),
        &frag(true, 0, &blob[80..]),
        // And the limit applies per message: the next one starts from zero.
        &frag(false, 1, &t.as_bytes()[..50]),
        &frag(true, 0, &t.as_bytes()[50..]),
    ]);
    let run = run_sizes(&stream, &[7], max);
    assert_eq!(
        run.events,
        [Ev::Ping(b"p".to_vec()), Ev::Binary(blob), Ev::Text(t)]
    );
}

#[test]
fn huge_64_bit_lengths_are_1009_without_allocating() {
    for len in [1u64 << 32, 1 << 62, (1 << 63) - 1] {
        for op in [1, 2] {
            let mut s = open();
            let header = frame_header(true, op, len, Len::Ext64, Some(KEY));
            let run = feed(&mut s, &[&header, &[0u8; 64]], 1 << 16);
            assert_eq!(run.events, [Ev::Error(1009)]);
            assert_eq!(s.buffered_capacity(), 0);
        }
        // As a continuation of a message in progress.
        let mut s = open();
        let header = frame_header(true, 0, len, Len::Ext64, Some(KEY));
        let run = feed(&mut s, &[&frag(false, 2, b"abc"), &header], 1 << 16);
        assert_eq!(run.events, [Ev::Error(1009)]);
        assert!(s.buffered_capacity() < 1 << 16);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Close handshake
// ---------------------------------------------------------------------------------------------

#[test]
fn peer_close_with_code_and_reason() {
    let mut s = open();
    let stream = cat(&[
        &client_close(1000, "bye κόσμε"),
        &text("too late"),
        &ping(b"x"),
    ]);
    let run = feed(&mut s, &[&stream], BIG);
    assert_eq!(run.events, [Ev::Close(1000, "bye κόσμε".into())]);
    assert_eq!(run.out, server_close(1000, ""), "reply echoes the code");
    assert_eq!(s.state(), State::Closed);
    // Later reads are ignored too.
    let later = feed(&mut s, &[&text("later"), &client_close(1000, "")], BIG);
    assert_eq!(
        later,
        Run {
            events: vec![],
            out: vec![],
            pong: None,
        }
    );
    let mut out = Vec::new();
    assert!(!s.send(OpCode::Text, b"x", &mut out));
    assert!(!s.ping(b"x", &mut out));
    assert!(!s.close(CloseCode::NORMAL, "", &mut out));
    assert_eq!(out, []);
}

#[test]
fn peer_close_with_empty_payload_is_1005_with_an_empty_reply() {
    let mut s = open();
    let run = feed(&mut s, &[&client_frame(true, 8, b"", Some(KEY))], BIG);
    assert_eq!(run.events, [Ev::Close(1005, String::new())]);
    assert_eq!(run.out, [0x88, 0x00]);
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn one_byte_close_payload_is_1002() {
    let run = assert_fails(&client_frame(true, 8, &[0x03], Some(KEY)), BIG, 1002);
    assert_eq!(run.events, [Ev::Error(1002)]);
}

#[test]
fn invalid_close_codes_are_1002() {
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        let run = assert_fails(&client_close(code, ""), BIG, 1002);
        assert_eq!(run.events, [Ev::Error(1002)], "code {code}");
        let run = assert_fails(&client_close(code, "why"), BIG, 1002);
        assert_eq!(run.events, [Ev::Error(1002)], "code {code}");
    }
}

#[test]
fn valid_close_codes_are_accepted_and_echoed() {
    let codes = (1000..=1003)
        .chain(1007..=1014)
        .chain([3000, 3999, 4000, 4999]);
    for code in codes {
        let mut s = open();
        let run = feed(&mut s, &[&client_close(code, "r")], BIG);
        assert_eq!(run.events, [Ev::Close(code, "r".into())]);
        assert_eq!(run.out, server_close(code, ""));
        assert_eq!(s.state(), State::Closed);
    }
}

#[test]
fn server_initiated_close_handshake() {
    let mut s = open();
    let mut out = Vec::new();
    assert!(s.close(CloseCode::NORMAL, "bye", &mut out));
    assert_eq!(out, server_close(1000, "bye"));
    assert_eq!(s.state(), State::CloseSent);

    let mut more = Vec::new();
    assert!(!s.send(OpCode::Text, b"nope", &mut more));
    assert!(!s.send(OpCode::Binary, b"nope", &mut more));
    assert!(!s.ping(b"nope", &mut more));
    assert!(!s.close(CloseCode::NORMAL, "again", &mut more));
    assert_eq!(more, []);
    assert_eq!(s.state(), State::CloseSent);

    // Whatever the peer sends before its close is parsed but not delivered, and pings are no
    // longer answered: the connection is ending (RFC 6455 section 5.5.2 would owe a pong until
    // the peer's close arrives; wsloop writes nothing more, so pings cannot make it write).
    let stream = cat(&[
        &text("in flight"),
        &binary(&bytes_of_len(300)),
        &frag(false, 1, b"frag"),
        &ping(b"ping"),
        &frag(true, 0, b"mented"),
        &pong(b"pong"),
    ]);
    let run = feed(&mut s, &chunks(&stream, &[5]), BIG);
    assert_eq!(
        run,
        Run {
            events: vec![],
            out: vec![],
            pong: None,
        }
    );
    assert_eq!(s.state(), State::CloseSent);

    let run = feed(&mut s, &[&client_close(1000, "ok")], BIG);
    assert_eq!(run.events, [Ev::Close(1000, "ok".into())]);
    assert_eq!(run.out, [], "no second close frame");
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn server_close_with_unsendable_code_sends_no_status() {
    let mut s = open();
    let mut out = Vec::new();
    assert!(s.close(CloseCode::NO_STATUS, "ignored", &mut out));
    assert_eq!(out, [0x88, 0x00]);
    // The reason is cut to fit a control frame.
    let mut s = open();
    let mut out = Vec::new();
    assert!(s.close(CloseCode::GOING_AWAY, &"é".repeat(100), &mut out));
    let frames = server_frames(&out);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].1.len(), 2 + 122);
}

// ---------------------------------------------------------------------------------------------
// 8. Failing the connection
// ---------------------------------------------------------------------------------------------

/// Streams that end in a protocol error, each preceded by valid traffic, with the error code.
fn failing_streams() -> Vec<(&'static str, Vec<u8>, u16)> {
    let prefix = cat(&[
        &text("before"),
        &ping(b"p"),
        &frag(false, 1, "κό".as_bytes()),
        &pong(b""),
        &frag(false, 0, "σμ".as_bytes()),
    ]);
    let fin_msg = frag(true, 0, "ε".as_bytes());
    let with = |bad: &[u8]| cat(&[&prefix, bad, &ping(b"after")]);
    let done = |bad: &[u8]| cat(&[&prefix, &fin_msg, bad, &ping(b"after")]);
    vec![
        (
            "reserved opcode",
            with(&client_frame(true, 3, b"x", Some(KEY))),
            1002,
        ),
        (
            "reserved control opcode",
            done(&client_frame(true, 11, b"", Some(KEY))),
            1002,
        ),
        (
            "rsv1",
            with(&client_frame(true, 0x40 | 9, b"x", Some(KEY))),
            1002,
        ),
        ("unmasked", done(&client_frame(true, 2, b"abc", None)), 1002),
        (
            "non-minimal 16",
            done(&client_frame_len(true, 2, b"abc", Some(KEY), Len::Ext16)),
            1002,
        ),
        (
            "non-minimal 64",
            done(&client_frame_len(true, 2, &[7; 300], Some(KEY), Len::Ext64)),
            1002,
        ),
        (
            "msb set",
            done(&frame_header(true, 2, 1 << 63, Len::Ext64, Some(KEY))),
            1002,
        ),
        ("control too long", with(&[0x89, 0x80 | 126, 0, 126]), 1002),
        (
            "fragmented control",
            with(&client_frame(false, 9, b"x", Some(KEY))),
            1002,
        ),
        ("orphan continuation", done(&frag(true, 0, b"x")), 1002),
        ("nested message", with(&frag(true, 2, b"x")), 1002),
        (
            "one-byte close",
            with(&client_frame(true, 8, &[3], Some(KEY))),
            1002,
        ),
        ("close code 1005", done(&client_close(1005, "")), 1002),
        (
            "close reason utf-8",
            done(&client_frame(
                true,
                8,
                &close_payload(1000, b"\xc3("),
                Some(KEY),
            )),
            1002,
        ),
        (
            "invalid utf-8 single frame",
            done(&client_frame(true, 1, b"abc\xed\xa0\x80def", Some(KEY))),
            1007,
        ),
        (
            "invalid utf-8 fragment",
            with(&frag(false, 0, b"ok\xff")),
            1007,
        ),
        ("truncated utf-8", with(&frag(true, 0, b"\xce")), 1007),
        (
            "too big single",
            done(&frame_header(true, 1, 5000, Len::Minimal, Some(KEY))),
            1009,
        ),
        (
            "too big fragments",
            with(&frag(true, 0, &[b'a'; 1005])),
            1009,
        ),
    ]
}

const SPLIT_MAX: usize = 1010;

#[test]
fn protocol_error_writes_exactly_one_close_frame_and_closes() {
    for (name, stream, code) in failing_streams() {
        let run = assert_fails(&stream, SPLIT_MAX, code);
        let frames = server_frames(&run.out);
        let close = frames.last().unwrap();
        assert_eq!(close.0, OpCode::Close, "{name}");
        assert_eq!(close.1[..2], code.to_be_bytes(), "{name}");
        assert!(std::str::from_utf8(&close.1[2..]).is_ok(), "{name}");
    }
}

#[test]
fn protocol_error_after_our_close_writes_no_second_close_frame() {
    for (name, stream, code) in failing_streams() {
        let mut s = closing();
        let run = feed(&mut s, &[&stream], SPLIT_MAX);
        // Nothing is delivered in CloseSent, but the violation still fails the connection,
        // with the same code as when open.
        assert_eq!(run.events, [Ev::Error(code)], "{name}");
        // Nothing: no pong after our close, never a second close frame.
        assert_eq!(run.out, [], "{name}");
        assert_eq!(run.pong, None, "{name}");
        assert_eq!(s.state(), State::Closed);
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Independence from read boundaries
// ---------------------------------------------------------------------------------------------

/// A stream exercising every successful path, ending with a close and trailing ignored bytes,
/// and the events it must produce.
fn valid_stream() -> (Vec<u8>, Vec<Ev>) {
    let t200 = utf8_of_len(200);
    let b300 = bytes_of_len(300);
    let mixed = "κόσμε 😀 €uro";
    let mb = mixed.as_bytes();
    let stream = cat(&[
        &text("Hello"),
        &RFC_HELLO,
        &binary(&b300),
        &ping(b"p1"),
        &text(""),
        &binary(b""),
        &ping(b""),
        &frag(false, 1, &mb[..1]),
        &pong(b"unsolicited"),
        &frag(false, 0, &mb[1..4]),
        &ping(&[0xaa; 125]),
        &frag(false, 0, b""),
        &frag(true, 0, &mb[4..]),
        &frag(false, 2, &b300[..100]),
        &frag(true, 0, &b300[100..]),
        &client_frame(true, 1, t200.as_bytes(), Some([0, 0, 0, 0])),
        &frag(false, 1, b""),
        &frag(true, 0, b""),
        &client_close(1001, "going away"),
        &text("ignored"),
        &[0xff, 0xff, 0xff],
    ]);
    let events = vec![
        Ev::Text("Hello".into()),
        Ev::Text("Hello".into()),
        Ev::Binary(b300.clone()),
        Ev::Ping(b"p1".to_vec()),
        Ev::Text(String::new()),
        Ev::Binary(vec![]),
        Ev::Ping(vec![]),
        Ev::Pong(b"unsolicited".to_vec()),
        Ev::Ping(vec![0xaa; 125]),
        Ev::Text(mixed.into()),
        Ev::Binary(b300),
        Ev::Text(t200),
        Ev::Text(String::new()),
        Ev::Close(1001, "going away".into()),
    ];
    (stream, events)
}

const RFC_HELLO: [u8; 11] = [
    0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
];

impl Run {
    /// What must not depend on the reads: the events and everything written but pongs (how
    /// many pongs there are, and whether one went out before a close in a later read, does;
    /// `feed` checks that each answers the most recent ping).
    fn split_independent(&self) -> (&[Ev], &[u8]) {
        (&self.events, &self.out)
    }
}

/// Every two-chunk split, byte by byte, and random chunk sizes give the same run as `whole`
/// (see [`Run::split_independent`]), each on a fresh session made by `new`.
fn assert_split_independent(
    new: fn() -> Session,
    name: &str,
    stream: &[u8],
    whole: &Run,
    max: usize,
) {
    for at in 0..=stream.len() {
        let (a, b) = stream.split_at(at);
        let run = feed(&mut new(), &[a, b], max);
        assert_eq!(
            run.split_independent(),
            whole.split_independent(),
            "{name}: split at {at}"
        );
    }
    let run = feed(&mut new(), &chunks(stream, &[1]), max);
    assert_eq!(
        run.split_independent(),
        whole.split_independent(),
        "{name}: byte by byte"
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..200 {
        let top = [3, 16, 64, 300][round % 4];
        let sizes: Vec<usize> = (0..64).map(|_| 1 + rng.below(top) as usize).collect();
        let run = feed(&mut new(), &chunks(stream, &sizes), max);
        assert_eq!(
            run.split_independent(),
            whole.split_independent(),
            "{name}: random sizes {sizes:?}"
        );
    }
}

/// An open session after our `close(1001)`, in [`State::CloseSent`].
fn closing() -> Session {
    let mut s = open();
    let mut out = Vec::new();
    assert!(s.close(CloseCode::GOING_AWAY, "shutdown", &mut out));
    assert_eq!(s.state(), State::CloseSent);
    s
}

#[test]
fn valid_stream_gives_the_same_result_however_it_is_split() {
    let (stream, events) = valid_stream();
    let mut s = open();
    let whole = feed(&mut s, &[&stream], BIG);
    assert_eq!(whole.events, events);
    assert_eq!(whole.out, server_close(1001, ""));
    // The pings came before the peer's close, in the same read: the pong owed for the last
    // one was dropped when the close ended the session.
    assert_eq!(whole.pong, None);
    assert_eq!(s.state(), State::Closed);
    assert_split_independent(open, "valid", &stream, &whole, BIG);
}

#[test]
fn large_frames_give_the_same_result_byte_by_byte_and_in_random_chunks() {
    let big = bytes_of_len(70_000);
    let big_text = utf8_of_len(65_536);
    let stream = cat(&[
        &binary(&big),
        &text(&big_text),
        &frag(false, 1, &big_text.as_bytes()[..40_001]),
        &ping(b"mid"),
        &frag(true, 0, &big_text.as_bytes()[40_001..]),
        &client_close(1000, ""),
    ]);
    let whole = run_whole(&stream, BIG);
    assert_eq!(
        whole.events,
        [
            Ev::Binary(big),
            Ev::Text(big_text.clone()),
            Ev::Ping(b"mid".to_vec()),
            Ev::Text(big_text),
            Ev::Close(1000, String::new()),
        ]
    );
    assert_eq!(
        run_sizes(&stream, &[1], BIG).split_independent(),
        whole.split_independent(),
        "byte by byte"
    );
    let mut rng = Rng(12345);
    for round in 0..30 {
        let top = [7, 100, 5000][round % 3];
        let sizes: Vec<usize> = (0..256).map(|_| 1 + rng.below(top) as usize).collect();
        let run = run_sizes(&stream, &sizes, BIG);
        assert_eq!(
            run.split_independent(),
            whole.split_independent(),
            "sizes {sizes:?}"
        );
    }
}

#[test]
fn failing_streams_give_the_same_error_however_they_are_split() {
    for (name, stream, code) in failing_streams() {
        let whole = run_whole(&stream, SPLIT_MAX);
        assert_eq!(whole.events.last(), Some(&Ev::Error(code)), "{name}");
        assert_split_independent(open, name, &stream, &whole, SPLIT_MAX);
    }
}

#[test]
fn close_sent_outcome_does_not_depend_on_read_boundaries() {
    let (stream, _) = valid_stream();
    let whole = feed(&mut closing(), &[&stream], BIG);
    assert_eq!(whole.events, [Ev::Close(1001, "going away".into())]);
    assert_eq!(whole.out, [], "no pong and no second close after ours");
    assert_eq!(whole.pong, None);
    assert_split_independent(closing, "valid after close", &stream, &whole, BIG);
    for (name, stream, code) in failing_streams() {
        let whole = feed(&mut closing(), &[&stream], SPLIT_MAX);
        assert_eq!(whole.events, [Ev::Error(code)], "{name}");
        assert_split_independent(closing, name, &stream, &whole, SPLIT_MAX);
    }
}

// ---------------------------------------------------------------------------------------------
// 10. The handshake through the session
// ---------------------------------------------------------------------------------------------

/// Feed `pieces` of a request head (plus possibly pipelined frames) and complete the handshake;
/// returns the session, whether the head was buffered, and the frame bytes that followed it.
fn handshake(pieces: &[&[u8]], limits: &Limits) -> (Session, bool, Vec<u8>) {
    let mut s = Session::new();
    for (i, p) in pieces.iter().enumerate() {
        let done = match s.feed_head(p, limits).expect("accepted") {
            Head::Partial => None,
            Head::Complete {
                request,
                head_len,
                buffered,
            } => {
                validate_upgrade(&request).expect("valid upgrade");
                assert_eq!(request.path(), "/chat");
                Some((head_len, buffered))
            }
        };
        if let Some((head_len, buffered)) = done {
            let mut rest = s.finish_handshake(head_len, buffered);
            if buffered {
                assert_eq!(s.buffered_capacity(), 0);
            } else {
                assert_eq!(rest, []);
                rest = p[head_len..].to_vec();
            }
            for later in &pieces[i + 1..] {
                rest.extend_from_slice(later);
            }
            assert_eq!(s.state(), State::Open);
            return (s, buffered, rest);
        }
        assert_eq!(s.state(), State::Handshake);
    }
    panic!("head never completed");
}

#[test]
fn request_head_in_pieces_completes_at_every_split() {
    let limits = Limits::default();
    let (_, buffered, rest) = handshake(&[REQUEST], &limits);
    assert!(!buffered);
    assert_eq!(rest, []);
    for at in 1..REQUEST.len() {
        let (a, b) = REQUEST.split_at(at);
        let (_, buffered, rest) = handshake(&[a, b], &limits);
        assert!(buffered, "split at {at}");
        assert_eq!(rest, [], "split at {at}");
    }
    let singles: Vec<&[u8]> = REQUEST.chunks(1).collect();
    let (_, buffered, _) = handshake(&singles, &limits);
    assert!(buffered);
    // An empty first read changes nothing.
    let (_, buffered, _) = handshake(&[b"", REQUEST], &limits);
    assert!(!buffered);
}

#[test]
fn frames_pipelined_after_the_head_are_parsed() {
    let frames = cat(&[
        &text("early"),
        &ping(b"p"),
        &frag(false, 2, b"ab"),
        &frag(true, 0, b"c"),
    ]);
    let want = vec![
        Ev::Text("early".into()),
        Ev::Ping(b"p".to_vec()),
        Ev::Binary(b"abc".to_vec()),
    ];
    let all = cat(&[REQUEST, &frames]);
    for at in 0..=all.len() {
        let (a, b) = all.split_at(at);
        let (mut s, buffered, rest) = handshake(&[a, b], &Limits::default());
        assert_eq!(buffered, at > 0 && at < REQUEST.len(), "split at {at}");
        assert_eq!(rest, frames, "split at {at}");
        let run = feed(&mut s, &[&rest], BIG);
        assert_eq!(run.events, want, "split at {at}");
        assert_eq!(run.out, []);
        assert_eq!(run.pong, Some(b"p".to_vec()));
    }
}

#[test]
fn oversized_head_is_431_as_soon_as_the_limit_is_passed() {
    let limits = Limits {
        max_header_bytes: 100,
        max_headers: 64,
    };
    let mut head = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nX-Padding: ".to_vec();
    head.resize(300, b'a');

    // Byte by byte: partial up to the limit, 431 at the first byte past it.
    let mut s = Session::new();
    let mut rejected_at = None;
    for (i, b) in head.iter().enumerate() {
        match s.feed_head(std::slice::from_ref(b), &limits) {
            Ok(Head::Partial) => {}
            Err(r) => {
                assert_eq!(r, Rejection::HeadersTooLarge);
                assert_eq!(r.status(), 431);
                rejected_at = Some(i);
                break;
            }
            Ok(Head::Complete { .. }) => panic!("no blank line was sent"),
        }
    }
    assert_eq!(rejected_at, Some(100), "rejected with the 101st byte");
    s.finish_rejected();
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.buffered_capacity(), 0);

    // One read of exactly the limit is partial; one more byte is rejected.
    let mut s = Session::new();
    assert!(matches!(
        s.feed_head(&head[..100], &limits),
        Ok(Head::Partial)
    ));
    let r = s.feed_head(&head[100..101], &limits).unwrap_err();
    assert_eq!(r.status(), 431);
    // A single read past the limit.
    let mut s = Session::new();
    let r = s.feed_head(&head[..101], &limits).unwrap_err();
    assert_eq!(r.status(), 431);
    // Two reads, the second crossing the limit.
    let mut s = Session::new();
    assert!(matches!(
        s.feed_head(&head[..10], &limits),
        Ok(Head::Partial)
    ));
    let r = s.feed_head(&head[10..150], &limits).unwrap_err();
    assert_eq!(r.status(), 431);
}

#[test]
fn head_ended_by_bare_lf_is_recognised() {
    let lf: Vec<u8> = String::from_utf8(REQUEST.to_vec())
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes();
    assert!(lf.ends_with(b"\n\n"));
    let all = cat(&[&lf, &text("x")]);
    for at in 0..=all.len() {
        let (a, b) = all.split_at(at);
        let (mut s, buffered, rest) = handshake(&[a, b], &Limits::default());
        assert_eq!(buffered, at > 0 && at < lf.len(), "split at {at}");
        assert_eq!(rest, text("x"));
        assert_eq!(feed(&mut s, &[&rest], BIG).events, [Ev::Text("x".into())]);
    }
    let singles: Vec<&[u8]> = lf.chunks(1).collect();
    let (_, buffered, rest) = handshake(&singles, &Limits::default());
    assert!(buffered);
    assert_eq!(rest, []);
    // Mixed endings: CRLF lines, then a bare LF blank line, and the reverse.
    let mixed = cat(&[&REQUEST[..REQUEST.len() - 2], b"\n"]);
    let singles: Vec<&[u8]> = mixed.chunks(1).collect();
    assert!(handshake(&singles, &Limits::default()).1);
    let mixed = cat(&[&lf[..lf.len() - 1], b"\r\n"]);
    let singles: Vec<&[u8]> = mixed.chunks(1).collect();
    assert!(handshake(&singles, &Limits::default()).1);
}

// ---------------------------------------------------------------------------------------------
// 11. Memory
// ---------------------------------------------------------------------------------------------

/// A message or control frame the session reassembled is handed over in the caller's spill
/// buffer when it is delivered: the session keeps no buffer once it has delivered it.
#[test]
fn delivery_hands_the_reassembled_buffer_over() {
    let mut s = open();
    let mut out = Vec::new();
    let mut events = Vec::new();

    // A single frame spanning three reads.
    let payload = utf8_of_len(3000);
    let f = text(&payload);
    read_chunk(&mut s, &f[..1000], BIG, &mut out, &mut events);
    read_chunk(&mut s, &f[1000..2000], BIG, &mut out, &mut events);
    assert!(s.buffered_len() > 0);
    let mut last = f[2000..].to_vec();
    let mut spill = Vec::new();
    let (_, ev) = s.read(&mut last, &mut spill, BIG, &mut out).unwrap();
    assert_eq!(ev, Some(Event::Text(&payload)));
    assert_eq!(s.buffered_capacity(), 0);
    assert_eq!(spill.len(), 3000, "the message is in the spill buffer");

    // A fragmented message, each fragment in its own read.
    events.clear();
    for f in [
        frag(false, 2, &[1; 500]),
        frag(false, 0, &[2; 500]),
        frag(true, 0, &[3; 1]),
    ] {
        read_chunk(&mut s, &f, BIG, &mut out, &mut events);
    }
    assert_eq!(events.len(), 1);
    assert_eq!(s.buffered_capacity(), 0);

    // A control frame split across reads.
    events.clear();
    let p = ping(&[9; 100]);
    read_chunk(&mut s, &p[..50], BIG, &mut out, &mut events);
    assert!(s.buffered_capacity() > 0);
    read_chunk(&mut s, &p[50..], BIG, &mut out, &mut events);
    assert_eq!(events, [Ev::Ping(vec![9; 100])]);
    assert_eq!(s.buffered_capacity(), 0);
    assert_eq!(s.state(), State::Open);
}

#[test]
fn ending_mid_message_releases_the_half_built_message() {
    // A protocol error in the middle of a fragmented message.
    let mut s = open();
    let (mut out, mut events) = (Vec::new(), Vec::new());
    read_chunk(
        &mut s,
        &frag(false, 2, &[7; 4000]),
        BIG,
        &mut out,
        &mut events,
    );
    assert!(s.buffered_capacity() >= 4000);
    let mut bad = binary(b"x");
    let mut spill = Vec::new();
    let got = s.read(&mut bad, &mut spill, BIG, &mut out);
    assert_eq!(
        got.map(|(n, e)| (n, e.is_some())),
        Err(ProtocolError::new(
            CloseCode::PROTOCOL_ERROR,
            "new message inside a fragmented one"
        ))
    );
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.buffered_capacity(), 0);

    // The peer's close in the middle of a fragmented message.
    let mut s = open();
    read_chunk(
        &mut s,
        &frag(false, 2, &[7; 4000]),
        BIG,
        &mut out,
        &mut events,
    );
    read_chunk(&mut s, &client_close(1000, ""), BIG, &mut out, &mut events);
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.buffered_capacity(), 0);
}

// ---------------------------------------------------------------------------------------------
// permessage-deflate (RFC 7692)
// ---------------------------------------------------------------------------------------------

use crate::protocol::deflate::{Deflater, Inflater};

const RSV1: u8 = 0x40;

/// An open session that negotiated permessage-deflate.
fn open_z() -> Session {
    let mut s = open();
    s.enable_deflate(15);
    s
}

fn deflated(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Deflater::new(15).compress(data, &mut out);
    out
}

/// Feed `pieces` as successive reads through `read_with` with one shared inflater.
fn feed_z(s: &mut Session, pieces: &[&[u8]], max: usize) -> (Vec<Ev>, Vec<u8>) {
    let mut inflater = Inflater::new();
    let (mut events, mut out) = (Vec::new(), Vec::new());
    'reads: for p in pieces {
        let mut buf = p.to_vec();
        let mut off = 0;
        while off < buf.len() {
            let mut spill = Vec::new();
            match s.read_with(
                &mut buf[off..],
                &mut spill,
                max,
                &mut out,
                Some(&mut inflater),
            ) {
                Ok((used, ev)) => {
                    off += used;
                    events.extend(ev.map(own));
                }
                Err(e) => {
                    events.push(Ev::Error(e.code.0));
                    break 'reads;
                }
            }
        }
    }
    (events, out)
}

#[test]
fn deflate_compressed_messages_are_inflated_whole_and_split_anyhow() {
    let json =
        r#"{"type":"update","items":[1,2,3,4,5,6,7,8,9,10],"note":"aaaaaaaaaaaaaaaaaaaaaaaa"}"#;
    let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]; // RFC 7692 section 7.2.3.1
    let stream = cat(&[
        &client_frame(true, RSV1 | 1, &hello, Some(KEY)),
        &client_frame(true, RSV1 | 2, &deflated(&[7u8; 3000]), Some(KEY2)),
        &text("plain"), // RSV1 clear: not compressed, even with the extension
        &client_frame(true, RSV1 | 1, &deflated(json.as_bytes()), Some(KEY)),
        &client_frame(true, RSV1 | 1, &[0x00], Some(KEY)), // an empty message (7.2.3.6)
    ]);
    let want = vec![
        Ev::Text("Hello".into()),
        Ev::Binary(vec![7u8; 3000]),
        Ev::Text("plain".into()),
        Ev::Text(json.into()),
        Ev::Text(String::new()),
    ];
    for sizes in [&[usize::MAX][..], &[1], &[2, 3], &[7, 100, 1]] {
        let mut s = open_z();
        let (events, out) = feed_z(&mut s, &chunks(&stream, sizes), BIG);
        assert_eq!(events, want, "{sizes:?}");
        assert!(out.is_empty());
        assert_eq!(s.buffered_capacity(), 0, "nothing held after the messages");
    }
}

#[test]
fn deflate_fragmented_compressed_message_rsv1_on_the_first_frame_only() {
    let data: Vec<u8> = (0..5000u32).flat_map(|i| (i % 50).to_le_bytes()).collect();
    let z = deflated(&data);
    let (a, rest) = z.split_at(z.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let stream = cat(&[
        &client_frame(false, RSV1 | 2, a, Some(KEY)),
        &client_frame(false, 0, b, Some(KEY2)),
        &ping(b"between"),
        &client_frame(true, 0, c, Some(KEY)),
    ]);
    for sizes in [&[usize::MAX][..], &[1], &[5, 13]] {
        let (events, _) = feed_z(&mut open_z(), &chunks(&stream, sizes), BIG);
        assert_eq!(
            events,
            vec![Ev::Ping(b"between".to_vec()), Ev::Binary(data.clone())],
            "{sizes:?}"
        );
    }
    // Text split inside a multi-byte character, compressed: validated after inflating.
    let t = "héllo wörld ".repeat(200);
    let z = deflated(t.as_bytes());
    let stream = cat(&[
        &client_frame(false, RSV1 | 1, &z[..3], Some(KEY)),
        &client_frame(true, 0, &z[3..], Some(KEY)),
    ]);
    assert_eq!(feed_z(&mut open_z(), &[&stream], BIG).0, vec![Ev::Text(t)]);
}

#[test]
fn deflate_rsv1_errors_are_1002() {
    let z = deflated(b"hello hello hello");
    // Without the extension negotiated.
    let (events, out) = feed_z(
        &mut open(),
        &[&client_frame(true, RSV1 | 1, &z, Some(KEY))],
        BIG,
    );
    assert_eq!(events, vec![Ev::Error(1002)]);
    assert_eq!(server_frames(&out)[0].1[..2], 1002u16.to_be_bytes());
    for bad in [
        // On control frames.
        client_frame(true, RSV1 | 9, b"", Some(KEY)),
        client_frame(true, RSV1 | 10, b"", Some(KEY)),
        client_frame(true, RSV1 | 8, &close_payload(1000, b""), Some(KEY)),
        // On a continuation frame.
        cat(&[
            &client_frame(false, RSV1 | 1, &z[..2], Some(KEY)),
            &client_frame(true, RSV1, &z[2..], Some(KEY)),
        ]),
        // RSV2 and RSV3 stay reserved.
        client_frame(true, 0x20 | 1, b"x", Some(KEY)),
        client_frame(true, 0x10 | 1, b"x", Some(KEY)),
        client_frame(true, RSV1 | 0x20 | 1, &z, Some(KEY)),
    ] {
        let (events, _) = feed_z(&mut open_z(), &[&bad], BIG);
        assert_eq!(events.last(), Some(&Ev::Error(1002)), "{bad:02x?}");
    }
}

#[test]
fn deflate_bomb_invalid_data_and_bad_utf8() {
    // A zip bomb: 15 MB of zeros in a ~15 KB frame; the limit is 16 KiB.
    let bomb = deflated(&vec![0u8; 15 << 20]);
    assert!(bomb.len() < 16 << 10, "{}", bomb.len());
    let frame = client_frame(true, RSV1 | 2, &bomb, Some(KEY));
    let mut s = open_z();
    let (events, out) = feed_z(&mut s, &[&frame], 16 << 10);
    assert_eq!(events, vec![Ev::Error(1009)]);
    assert_eq!(server_frames(&out)[0].1[..2], 1009u16.to_be_bytes());
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.buffered_capacity(), 0);
    // The same, fragmented across reads (buffered path).
    let (events, _) = feed_z(&mut open_z(), &chunks(&frame, &[1000]), 16 << 10);
    assert_eq!(events, vec![Ev::Error(1009)]);
    // At the limit exactly it is delivered; one byte more is 1009.
    let z = deflated(&[1u8; 4096]);
    let f = client_frame(true, RSV1 | 2, &z, Some(KEY));
    assert_eq!(
        feed_z(&mut open_z(), &[&f], 4096).0,
        vec![Ev::Binary(vec![1; 4096])]
    );
    assert_eq!(feed_z(&mut open_z(), &[&f], 4095).0, vec![Ev::Error(1009)]);
    // Invalid deflate data.
    let f = client_frame(true, RSV1 | 2, &[0xff, 0xff, 0xff], Some(KEY));
    assert_eq!(feed_z(&mut open_z(), &[&f], BIG).0, vec![Ev::Error(1007)]);
    // Invalid UTF-8 once inflated (the compressed bytes themselves are not text).
    let f = client_frame(true, RSV1 | 1, &deflated(b"ok \xff\xfe"), Some(KEY));
    assert_eq!(feed_z(&mut open_z(), &[&f], BIG).0, vec![Ev::Error(1007)]);
    // The plain `read` has no decompressor: a compressed message is refused, never passed on.
    let f = client_frame(true, RSV1 | 1, &deflated(b"hi"), Some(KEY));
    let mut s = open_z();
    let mut buf = f.clone();
    let mut spill = Vec::new();
    let r = s.read(&mut buf, &mut spill, BIG, &mut Vec::new());
    assert_eq!(r.err().map(|e| e.code.0), Some(1011));
}

#[test]
fn deflate_compressed_frames_out_carry_rsv1_only_when_negotiated() {
    let z = deflated(b"Hello");
    let mut out = Vec::new();
    assert!(
        !open().send_compressed(OpCode::Text, &z, &mut out),
        "not negotiated"
    );
    assert!(out.is_empty());
    let mut s = open_z();
    assert!(s.send_compressed(OpCode::Text, &z, &mut out));
    // RFC 7692 section 7.2.3.1's frame: c1 07 f2 48 cd c9 c9 07 00.
    assert_eq!(out, [0xc1, 0x07, 0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
    let mut head = [0u8; MAX_HEADER_LEN];
    assert_eq!(s.header_compressed(OpCode::Binary, 300, &mut head), Some(4));
    assert_eq!(head[..4], [0xc2, 126, 1, 44]);
    s.close(CloseCode::NORMAL, "", &mut out);
    assert!(!s.send_compressed(OpCode::Text, &z, &mut out), "closing");
}
