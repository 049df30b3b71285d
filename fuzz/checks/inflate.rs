//! `inflate`: compressed messages through a `Session` that negotiated permessage-deflate, read
//! with `read_with` and one `Inflater` shared by every message (as the loop shares one per
//! loop), the bytes cut into arbitrary reads.
//!
//! Properties: nothing panics; memory stays bounded whatever the compressed bytes say: after
//! every `read` the message handed over (`spill`) has a capacity of at most `max_message + 1`
//! bytes and holds at most `max_message` (or a control frame's 125 bytes), and the session
//! holds at most `max_message` plus a control frame; a message compressed by `Deflater` comes back intact when it fits the limit
//! and fails with 1009 when it does not; an error is 1002 (RSV misuse), 1007 (invalid data or
//! UTF-8) or 1009, and nothing is delivered after it.
//!
//! With bit 7 of the first byte, both sides take over their context (the dedicated profile):
//! the messages are compressed by one `Deflater` that keeps its window, and read by an
//! `Inflater` that keeps its own; once an arbitrary or corrupted compressed message has entered
//! the reader's window, what follows may read as anything.
//!
//! Input: `[max_message index and takeover, n_messages]`, then per message `[kind, fragments, len u16]` and
//! `len` bytes; then the read sizes (see [`decode`]). `kind` bit 0: text; bit 1: the bytes are
//! the payload as they are (arbitrary "compressed" data) rather than compressed by `Deflater`;
//! bit 2: RSV1 clear (an uncompressed message); bit 3: RSV1 on every fragment; bit 4: a ping
//! before the last fragment; bits 5-6: flip a byte of the compressed payload.

use wsloop::protocol::deflate::{Deflater, Inflater};
use wsloop::protocol::session::{Event, Session};

use super::util::Reader;

const MAX_MESSAGE: [usize; 8] = [0, 1, 5, 100, 1000, 4096, 16384, 65536];
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const SLACK: usize = 125;

/// What one message should give, if the frames reach it.
#[derive(Debug, PartialEq)]
pub enum Want {
    /// Exactly these bytes (a message compressed by `Deflater`, or sent plain, within the
    /// limit).
    Bytes(Vec<u8>),
    /// Close 1009 (its plain or inflated size passes the limit).
    TooBig,
    /// Anything allowed (arbitrary or corrupted compressed data, RSV misuse).
    Any,
}

#[derive(Debug)]
pub struct Case {
    pub max: usize,
    pub stream: Vec<u8>,
    wants: Vec<Want>,
    pub reads: Vec<usize>,
    /// Context takeover both ways.
    pub takeover: bool,
}

fn frame(out: &mut Vec<u8>, fin: bool, rsv1: bool, op: u8, payload: &[u8]) {
    out.push(u8::from(fin) << 7 | u8::from(rsv1) << 6 | op);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

pub fn decode(data: &[u8]) -> Case {
    let mut r = Reader::new(data);
    let first = r.u8();
    let max = MAX_MESSAGE[usize::from(first % 8)];
    let takeover = first & 0x80 != 0;
    let n = r.u8() % 8;
    let mut stream = Vec::new();
    let mut wants = Vec::new();
    let mut deflater = Deflater::with(15, 8, takeover);
    // With takeover: the reader's window no longer matches the writer's.
    let mut poisoned = false;
    for _ in 0..n {
        let kind = r.u8();
        let fragments = usize::from(r.u8() % 4) + 1;
        let len = usize::from(r.u16() % 4096);
        let mut body = r.bytes(len).to_vec();
        let text = kind & 1 != 0;
        if text && kind & 2 == 0 {
            // Text that Deflater compresses: keep it valid UTF-8.
            body = String::from_utf8_lossy(&body).into_owned().into_bytes();
            if kind & 0x80 != 0 {
                // A bomb: the same bytes many times over.
                body = body.repeat(64);
            }
        }
        let plain = kind & 4 != 0;
        let payload = if plain || kind & 2 != 0 {
            body.clone()
        } else {
            let mut z = Vec::new();
            deflater.compress(&body, &mut z);
            z
        };
        let mut payload = payload;
        let flip = (kind >> 5) & 3;
        if flip != 0 && !payload.is_empty() && !plain {
            let i = usize::from(flip) * 7 % payload.len();
            payload[i] ^= 0xa5;
        }
        let arbitrary = kind & 2 != 0 || (flip != 0 && !plain);
        let misuse = kind & 8 != 0 && fragments > 1 && !plain;
        let was_poisoned = poisoned;
        poisoned |= takeover && (arbitrary || misuse);
        wants.push(
            if was_poisoned
                || misuse
                || arbitrary
                || (plain && text && std::str::from_utf8(&body).is_err())
            {
                Want::Any
            } else if body.len() > max || payload.len() > max {
                Want::TooBig
            } else {
                Want::Bytes(body.clone())
            },
        );
        let op = if text { 1 } else { 2 };
        let step = payload.len().div_ceil(fragments).max(1);
        let pieces: Vec<&[u8]> = if payload.is_empty() {
            vec![&[]]
        } else {
            payload.chunks(step).collect()
        };
        let last = pieces.len() - 1;
        for (i, piece) in pieces.iter().enumerate() {
            if i == last && kind & 16 != 0 {
                frame(&mut stream, true, false, 9, b"ping");
            }
            let rsv1 = !plain && (i == 0 || kind & 8 != 0);
            frame(
                &mut stream,
                i == last,
                rsv1,
                if i == 0 { op } else { 0 },
                piece,
            );
        }
    }
    let mut reads = Vec::new();
    while !r.is_empty() && reads.len() < 64 {
        reads.push(usize::from(r.u16()) + 1);
    }
    Case {
        max,
        stream,
        wants,
        reads,
        takeover,
    }
}

pub fn run(data: &[u8]) {
    let case = decode(data);
    let mut session = Session::new();
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let limits = wsloop::protocol::handshake::Limits::default();
    match session.feed_head(head, &limits) {
        Ok(wsloop::protocol::session::Head::Complete { head_len, .. }) => {
            session.finish_handshake(head_len, false);
        }
        other => panic!("canned request: {other:?}"),
    }
    session.enable_deflate(15);
    let mut inflater = Inflater::with_window(15, case.takeover);
    let mut got: Vec<Result<Vec<u8>, u16>> = Vec::new();
    let mut out = Vec::new();
    let mut rest = &case.stream[..];
    let mut sizes = case.reads.iter().copied().cycle();
    let mut failed = false;
    while !rest.is_empty() && !failed {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        let mut chunk = rest[..n].to_vec();
        rest = &rest[n..];
        let mut off = 0;
        while off < chunk.len() {
            let mut spill = Vec::new();
            let r = session.read_with(
                &mut chunk[off..],
                &mut spill,
                case.max,
                &mut out,
                Some(&mut inflater),
            );
            match r {
                Ok((used, event)) => {
                    assert!(used > 0 || event.is_some(), "no progress");
                    off += used;
                    match event {
                        Some(Event::Text(t)) => got.push(Ok(t.as_bytes().to_vec())),
                        Some(Event::Binary(b)) => got.push(Ok(b.to_vec())),
                        Some(Event::Ping(_)) | Some(Event::Pong(_)) => {}
                        Some(Event::Close { .. }) => panic!("no close frame was sent"),
                        None => {}
                    }
                }
                Err(e) => {
                    assert!([1002, 1007, 1009].contains(&e.code.0), "{e}");
                    got.push(Err(e.code.0));
                    failed = true;
                }
            }
            // A message, or a control frame's payload split across reads (up to 125 bytes).
            let bound = case.max.max(SLACK);
            assert!(spill.len() <= bound, "{} > {bound}", spill.len());
            assert!(
                spill.capacity() <= bound + 1,
                "spill capacity {}",
                spill.capacity()
            );
            assert!(session.buffered_capacity() <= case.max + SLACK);
            if failed {
                break;
            }
        }
    }
    // Messages delivered in order, each as wanted, until the first error.
    for (i, g) in got.iter().enumerate() {
        match (&case.wants[i], g) {
            (Want::Any, _) => {}
            (Want::Bytes(b), Ok(m)) => assert_eq!(b, m, "message {i}"),
            (Want::TooBig, Err(1009)) => {}
            (want, g) => panic!("message {i}: wanted {want:?}, got {g:?}"),
        }
    }
    if !failed {
        assert_eq!(got.len(), case.wants.len(), "a message was lost");
    }
}
