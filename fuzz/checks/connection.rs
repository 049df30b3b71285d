//! `connection`: a whole sans-IO connection (`Session`) driven the way the event loop drives it
//! — `feed_head`, `validate_upgrade`, the application's decision, the 101 or a refusal,
//! `finish_handshake`, then `read` until each chunk is used up — fed arbitrary
//! bytes in arbitrary chunks with timer firings and application calls in between.
//!
//! Properties: nothing panics; buffered bytes stay within the limits (the head within
//! `max_header_bytes`, a message within `max_message` plus a control frame); every `read` makes
//! progress; every ending carries a sendable close code or a 4xx/5xx status; no event is
//! delivered after `Event::Close` or an error, and only the peer's close while our close is
//! pending; everything written is one HTTP response, or a 101 followed by valid unmasked server
//! frames with at most one close frame and no data or control frame after it; a close started
//! by the peer is answered with its code. What one read of client bytes makes the session write
//! is bounded whatever the bytes: each `read` call writes at most one close frame, and the pong
//! written after the read (as the loop does) is one frame answering the most recent ping, so a
//! ping flood cannot make the server write more than it reads. And the outcome does not depend
//! on how the bytes were cut into reads: the same operations with the bytes between them
//! delivered in one read give the same events and the same output, frame for frame, except for
//! how many pongs there are (one per read at most).
//!
//! Input: `[flags, max_message, max_header, n_ops]`, then `n_ops` operations of 4 bytes, then
//! the client's bytes (see [`decode`]). flags bit 0 puts a valid upgrade request in front of the
//! client's bytes; bit 1 makes the application refuse the upgrade; bit 2 makes it pick the
//! first offered subprotocol.

use wsloop::protocol::close::{parse_close_payload, CloseCode};
use wsloop::protocol::frame::{write_frame, OpCode, MAX_HEADER_LEN};
use wsloop::protocol::handshake::{self, validate_upgrade, Limits, Rejection};
use wsloop::protocol::session::{Event, Head, ProtocolError, Session, State};

use super::util::{check_refusal, parse_server_frames, Reader};

/// A valid upgrade request, put in front of the stream by flags bit 0.
pub const CANNED_REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\n\
Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// `max_message` choices (indexed by the second input byte).
const MAX_MESSAGE: [usize; 16] = [
    1, 2, 5, 16, 64, 124, 125, 126, 127, 128, 200, 1000, 4096, 16384, 65535, 65536,
];

/// Close reasons for application closes: short, exactly 123 bytes, and long with multi-byte
/// characters around the cut.
const REASONS: [&str; 4] = [
    "",
    "bye",
    "0123456789012345678901234567890123456789012345678901234567890123456789\
     01234567890123456789012345678901234567890123456789012",
    "ééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé€€",
];

/// Extra buffered bytes allowed beyond `max_message`: one control frame's payload.
const SLACK: usize = 125;

/// The longest control frame the server writes: a 2-byte header and 125 bytes of payload.
const MAX_CONTROL_FRAME: usize = 2 + 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Deliver the next `n` client bytes in one read.
    Data(usize),
    /// The connection's timer fires: handshake timeout, idle ping, idle timeout or close
    /// timeout, depending on the state (as `timer_fired` in the loop).
    Timer,
    /// Server shutdown: close with 1001 if open (as `begin_shutdown`).
    Shutdown,
    /// The application closes with this code and one of [`REASONS`].
    Close(u16, u8),
    /// The application sends a text (true) or binary message of this length.
    Send(bool, u16),
    /// The application pings with a payload of this length (cut to 125 by the session).
    Ping(u8),
    /// `Session::fail` with this code.
    Fail(u16),
    /// The application sends a text (true) or binary message of this length the way the loop
    /// sends a large payload: the session encodes the header (`Session::header`), the payload
    /// follows from the application's buffer.
    SendDirect(bool, u16),
}

pub struct Input {
    pub refuse: bool,
    pub pick_subprotocol: bool,
    pub max_message: usize,
    pub limits: Limits,
    pub ops: Vec<Op>,
    pub stream: Vec<u8>,
}

pub fn decode(data: &[u8]) -> Input {
    let mut r = Reader::new(data);
    let (flags, mm, mh, n) = (r.u8(), r.u8(), r.u8(), r.u8());
    let mut ops = Vec::new();
    for _ in 0..n {
        let [kind, a, b, c] = [r.u8(), r.u8(), r.u8(), r.u8()];
        let wide = u16::from_le_bytes([b, c]);
        ops.push(match kind % 10 {
            0..=2 => Op::Data(usize::from(u16::from_le_bytes([a, b]))),
            3 => Op::Timer,
            4 => Op::Shutdown,
            5 => Op::Close(wide, a),
            6 => Op::Send(a & 1 != 0, wide),
            7 => Op::Ping(a),
            8 => Op::Fail(wide),
            _ => Op::SendDirect(a & 1 != 0, wide),
        });
    }
    let mut stream = if flags & 1 != 0 {
        CANNED_REQUEST.to_vec()
    } else {
        Vec::new()
    };
    stream.extend_from_slice(r.rest());
    Input {
        refuse: flags & 2 != 0,
        pick_subprotocol: flags & 4 != 0,
        max_message: MAX_MESSAGE[usize::from(mm % 16)],
        limits: Limits {
            max_header_bytes: 64 + usize::from(mh) * 32,
            max_headers: 64,
        },
        ops,
        stream,
    }
}

pub fn run(data: &[u8]) {
    check(&decode(data));
}

pub fn check(input: &Input) {
    let chunked = Driver::run(input, &input.ops);
    // The same operations, with the bytes between two non-data operations in one read.
    let mut merged: Vec<Op> = Vec::new();
    for &op in &input.ops {
        match (op, merged.last_mut()) {
            (Op::Data(n), Some(Op::Data(m))) => *m += n,
            _ => merged.push(op),
        }
    }
    let single = Driver::run(input, &merged);
    if std::env::var_os("WSLOOP_FUZZ_DEBUG").is_some() {
        eprintln!("{:?}\nin small reads: {chunked:#?}", input.ops);
    }
    compare(&chunked, &single);
}

/// What one run produced.
#[derive(Debug)]
struct Outcome {
    /// Everything observable, in order, with the number of non-data operations done before it.
    trace: Vec<(usize, String)>,
    out: Vec<u8>,
    /// The length of the 101 response at the start of `out`, when the upgrade was accepted.
    head: Option<usize>,
    /// How the handshake ended: (non-data operations before, accepted or status).
    handshake: Option<(usize, Result<(), u16>)>,
}

/// A refused handshake may end later when the bytes trickle in: the session parses a buffered
/// head only once it has ended (or outgrown the limit), so a malformed head, or one with too
/// many fields, that is still open is "partial" in small reads. Apart from that, the cut into
/// reads changes nothing.
fn compare(chunked: &Outcome, single: &Outcome) {
    match (chunked.handshake, single.handshake) {
        (a, b) if a == b => {
            assert_eq!(chunked.trace, single.trace, "events depend on the reads");
            assert_eq!(
                without_pongs(chunked),
                without_pongs(single),
                "output depends on the reads"
            );
        }
        (None | Some((_, Err(_))), Some((_, Err(400 | 431)))) => {}
        (a, b) => panic!("handshake in small reads {a:?}, in one read {b:?}"),
    }
}

/// A server frame as compared: opcode, fin, payload.
type FrameParts = (u8, bool, Vec<u8>);

/// The output with the pongs left out (one per read at most, so their number depends on the
/// reads): the response head, then every other frame.
fn without_pongs(o: &Outcome) -> (Vec<u8>, Vec<FrameParts>) {
    let Some(head) = o.head else {
        return (o.out.clone(), Vec::new());
    };
    let frames = parse_server_frames(&o.out[head..]).unwrap_or_else(|e| panic!("{e}"));
    let kept = frames.into_iter().filter(|f| f.opcode != 10);
    let kept = kept.map(|f| (f.opcode, f.fin, f.payload)).collect();
    (o.out[..head].to_vec(), kept)
}

/// Where the connection is, from the loop's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    /// Upgraded; the session drives itself until it is Closed.
    Upgraded,
    /// The session finished (refused, failed or closed): it must stay silent.
    SessionClosed,
    /// The loop dropped the connection (a timeout ended it): nothing more is fed.
    Dropped,
}

struct Driver<'i> {
    input: &'i Input,
    session: Session,
    out: Vec<u8>,
    phase: Phase,
    /// The idle ping went out and no data arrived since.
    pinged: bool,
    /// The 101 response: accepted key and subprotocol, and the head's length in `out`.
    accepted: Option<(Vec<u8>, Option<String>, usize)>,
    /// The peer's close code when it started the close (we must echo it).
    peer_close: Option<CloseCode>,
    /// Our close frame went out before the peer's close arrived.
    we_closed: bool,
    ops_done: usize,
    /// The largest read fed during the handshake.
    max_chunk: usize,
    /// The payload of the most recent ping delivered: what an owed pong must carry.
    last_ping: Option<Vec<u8>>,
    result: Outcome,
}

impl<'i> Driver<'i> {
    fn run(input: &'i Input, ops: &[Op]) -> Outcome {
        let mut d = Driver {
            input,
            session: Session::new(),
            out: Vec::new(),
            phase: Phase::Handshake,
            pinged: false,
            accepted: None,
            peer_close: None,
            we_closed: false,
            ops_done: 0,
            max_chunk: 0,
            last_ping: None,
            result: Outcome {
                trace: Vec::new(),
                out: Vec::new(),
                head: None,
                handshake: None,
            },
        };
        let mut at = 0;
        for &op in ops {
            if let Op::Data(n) = op {
                let end = (at + n).min(input.stream.len());
                d.data(&input.stream[at..end]);
                at = end;
            } else {
                d.op(op);
                d.ops_done += 1;
            }
            d.check_bounds();
        }
        d.data(&input.stream[at..]);
        d.check_bounds();
        d.finish()
    }

    fn note(&mut self, what: String) {
        self.result.trace.push((self.ops_done, what));
    }

    fn check_bounds(&self) {
        let (len, cap) = (
            self.session.buffered_len(),
            self.session.buffered_capacity(),
        );
        match self.session.state() {
            State::Handshake => {
                let limit = self.input.limits.max_header_bytes;
                assert!(len <= limit, "head buffer {len} > {limit}");
                let chunk = self.max_chunk;
                assert!(
                    cap <= limit + chunk,
                    "head capacity {cap}, limit {limit}, chunk {chunk}"
                );
            }
            State::Open | State::CloseSent => {
                let limit = self.input.max_message + SLACK;
                assert!(len <= limit, "buffered {len} > {limit}");
                assert!(cap <= limit, "capacity {cap} > {limit}");
            }
            State::Closed => assert!(len <= self.input.max_message + SLACK),
        }
    }

    /// One read's worth of client bytes.
    fn data(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        match self.phase {
            Phase::Dropped => {}
            Phase::SessionClosed => {
                let before = self.out.len();
                let mut buf = chunk.to_vec();
                let mut spill = Vec::new();
                let max = self.input.max_message;
                let got = self.session.read(&mut buf, &mut spill, max, &mut self.out);
                assert!(matches!(got, Ok((n, None)) if n == chunk.len()), "{got:?}");
                assert_eq!(self.out.len(), before, "wrote after the end");
            }
            Phase::Handshake => {
                self.head(chunk);
                self.pong();
            }
            Phase::Upgraded => {
                if self.session.state() == State::Open {
                    self.pinged = false;
                }
                let before = self.out.len();
                let mut buf = chunk.to_vec();
                self.frames(&mut buf);
                self.pong();
                // One read's bytes, however many frames they hold, make the session write at
                // most a close frame and a pong.
                let wrote = self.out.len() - before;
                assert!(
                    wrote <= 2 * MAX_CONTROL_FRAME,
                    "one read wrote {wrote} bytes"
                );
            }
        }
    }

    /// After a read, as the loop does: write the pong owed for this read's pings, if any; it
    /// answers the most recent ping, and only while the session is open.
    fn pong(&mut self) {
        let owed = self.session.pong_owed();
        let before = self.out.len();
        assert_eq!(self.session.write_pong(&mut self.out), owed);
        assert!(!self.session.pong_owed());
        if !owed {
            assert_eq!(self.out.len(), before);
            return;
        }
        assert_eq!(self.session.state(), State::Open, "pong owed while closing");
        let frames = parse_server_frames(&self.out[before..]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].opcode, 10);
        assert_eq!(Some(&frames[0].payload), self.last_ping.as_ref());
    }

    fn refuse(&mut self, status: u16, what: &str) {
        self.session.finish_rejected();
        assert_eq!(self.session.state(), State::Closed);
        assert_eq!(self.session.buffered_capacity(), 0);
        assert!((400..=599).contains(&status), "{status}");
        self.note(format!("refused {status} ({what})"));
        self.result.handshake = Some((self.ops_done, Err(status)));
        self.phase = Phase::SessionClosed;
    }

    fn head(&mut self, chunk: &[u8]) {
        let limits = self.input.limits;
        self.max_chunk = self.max_chunk.max(chunk.len());
        let got = self.session.feed_head(chunk, &limits);
        let (head_len, buffered, key, sub) = match got {
            Ok(Head::Partial) => return self.check_bounds(),
            Err(rej) => {
                handshake::write_rejection(&mut self.out, &rej);
                return self.refuse(rej.status(), "parse");
            }
            Ok(Head::Complete {
                request,
                head_len,
                buffered,
            }) => {
                if !request.is_upgrade() {
                    handshake::write_response(
                        &mut self.out,
                        426,
                        "this is a WebSocket endpoint",
                        &[("Upgrade", "websocket")],
                        b"this is a WebSocket endpoint\n",
                    );
                    return self.refuse(426, "not an upgrade");
                }
                let up = match validate_upgrade(&request) {
                    Ok(up) => up,
                    Err(rej) => {
                        handshake::write_rejection(&mut self.out, &rej);
                        return self.refuse(rej.status(), "validate");
                    }
                };
                if self.input.refuse {
                    let rej = Rejection::custom(403, "refused by the application");
                    handshake::write_rejection(&mut self.out, &rej);
                    return self.refuse(rej.status(), "application");
                }
                let sub = if self.input.pick_subprotocol {
                    up.subprotocols().next().map(str::to_owned)
                } else {
                    None
                };
                handshake::write_accept(&mut self.out, up.key(), sub.as_deref());
                (head_len, buffered, up.key().to_vec(), sub)
            }
        };
        let head = self.out.len();
        self.accepted = Some((key, sub, head));
        self.result.head = Some(head);
        self.result.handshake = Some((self.ops_done, Ok(())));
        self.note("open".into());
        let mut rest = self.session.finish_handshake(head_len, buffered);
        assert_eq!(self.session.state(), State::Open);
        self.phase = Phase::Upgraded;
        if buffered {
            assert!(head_len <= chunk.len() + self.input.limits.max_header_bytes);
            self.frames(&mut rest);
        } else {
            assert!(rest.is_empty());
            let mut after = chunk[head_len..].to_vec();
            self.frames(&mut after);
        }
    }

    /// `frames()` in the loop: read until the chunk is used up.
    fn frames(&mut self, buf: &mut [u8]) {
        let max = self.input.max_message;
        let mut off = 0;
        while off < buf.len() {
            let before = self.session.state();
            let remaining = buf.len() - off;
            let written = self.out.len();
            let mut spill = Vec::new();
            let got = self
                .session
                .read(&mut buf[off..], &mut spill, max, &mut self.out);
            let wrote = self.out.len() - written;
            assert!(
                wrote <= MAX_CONTROL_FRAME,
                "one read call wrote {wrote} bytes"
            );
            let (used, event) = match got {
                Ok((used, event)) => (used, event.map(owned)),
                Err(e) => return self.failed(e, before),
            };
            assert!(
                used >= 1 && used <= remaining,
                "read used {used} of {remaining}"
            );
            off += used;
            self.check_bounds();
            let Some(event) = event else { continue };
            match before {
                State::Open => {}
                State::CloseSent => assert!(
                    matches!(event, Owned::Close(..)),
                    "{event:?} delivered after our close"
                ),
                s => panic!("{event:?} delivered in state {s:?}"),
            }
            self.note(format!("{event:?}"));
            if let Owned::Ping(p) = &event {
                self.last_ping = Some(p.clone());
            }
            if let Owned::Close(code, _) = event {
                let code = CloseCode(code);
                assert!(code.is_sendable() || code == CloseCode::NO_STATUS, "{code}");
                assert_eq!(self.session.state(), State::Closed);
                if before == State::Open {
                    self.peer_close = Some(code);
                }
                self.phase = Phase::SessionClosed;
                return;
            }
        }
    }

    fn failed(&mut self, e: ProtocolError, before: State) {
        assert!(e.code.is_sendable(), "error code {}", e.code);
        assert_eq!(self.session.state(), State::Closed);
        assert_eq!(self.session.buffered_capacity(), 0);
        self.note(format!("error {} ({})", e.code, e.reason));
        if before == State::Open {
            // Our close frame carries the error's code.
            let frames = self.frames_written();
            let last = frames.last().expect("close frame written");
            assert_eq!(last.opcode, 8);
            assert_eq!(last.payload[..2], e.code.0.to_be_bytes());
        }
        self.phase = Phase::SessionClosed;
    }

    fn frames_written(&self) -> Vec<super::util::Frame> {
        let head = self.accepted.as_ref().map_or(0, |a| a.2);
        parse_server_frames(&self.out[head..]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn op(&mut self, op: Op) {
        if self.phase == Phase::Dropped {
            return;
        }
        let state = self.session.state();
        let before = self.out.len();
        let open = state == State::Open;
        match op {
            Op::Data(_) => unreachable!(),
            Op::Timer => match state {
                State::Handshake => {
                    handshake::write_response(
                        &mut self.out,
                        408,
                        "handshake timeout",
                        &[],
                        b"handshake timeout\n",
                    );
                    self.refuse(408, "handshake timeout");
                    self.phase = Phase::Dropped;
                }
                State::Open if !self.pinged => {
                    self.pinged = true;
                    assert!(self.session.ping(b"", &mut self.out));
                    self.note("idle ping".into());
                }
                State::Open => {
                    assert!(self.session.close(
                        CloseCode::GOING_AWAY,
                        "idle timeout",
                        &mut self.out
                    ));
                    self.we_closed = true;
                    self.note("idle timeout".into());
                    self.phase = Phase::Dropped;
                }
                State::CloseSent | State::Closed => {
                    self.note("timeout: dropped".into());
                    self.phase = Phase::Dropped;
                }
            },
            Op::Shutdown => match state {
                State::Open => {
                    assert!(self.session.close(
                        CloseCode::GOING_AWAY,
                        "server shutdown",
                        &mut self.out
                    ));
                    self.we_closed = true;
                    self.note("shutdown".into());
                }
                State::CloseSent => {}
                _ => {
                    self.note("shutdown: dropped".into());
                    self.phase = Phase::Dropped;
                }
            },
            Op::Close(code, reason) => {
                let reason = REASONS[usize::from(reason) % REASONS.len()];
                let closed = state != State::Handshake
                    && self.session.close(CloseCode(code), reason, &mut self.out);
                assert_eq!(closed, open);
                if closed {
                    assert_eq!(self.session.state(), State::CloseSent);
                    self.we_closed = true;
                    self.note(format!("close {code}"));
                }
            }
            Op::Send(text, len) => {
                let (op, payload) = message(text, len);
                let sent =
                    state != State::Handshake && self.session.send(op, &payload, &mut self.out);
                assert_eq!(sent, open);
            }
            Op::SendDirect(text, len) => {
                let (op, payload) = message(text, len);
                let mut head = [0u8; MAX_HEADER_LEN];
                let header = match state {
                    State::Handshake => None,
                    _ => self.session.header(op, payload.len(), &mut head),
                };
                assert_eq!(header.is_some(), open);
                if let Some(n) = header {
                    // The same bytes as a frame encoded in one piece.
                    let mut whole = Vec::new();
                    write_frame(&mut whole, true, op, &payload);
                    assert_eq!(whole[..n], head[..n]);
                    self.out.extend_from_slice(&head[..n]);
                    self.out.extend_from_slice(&payload);
                }
            }
            Op::Ping(len) => {
                let payload: Vec<u8> = (0..len).collect();
                let sent = state != State::Handshake && self.session.ping(&payload, &mut self.out);
                assert_eq!(sent, open);
            }
            Op::Fail(code) => {
                if state == State::Handshake {
                    return; // the loop never fails a session that has not opened
                }
                let err = ProtocolError {
                    code: CloseCode(code),
                    reason: "failed by the fuzzer",
                };
                self.session.fail(err, &mut self.out);
                assert_eq!(self.session.state(), State::Closed);
                self.note(format!("fail {code}"));
                if self.phase == Phase::Upgraded {
                    self.phase = Phase::SessionClosed;
                }
            }
        }
        if !open && state != State::Handshake {
            assert_eq!(self.out.len(), before, "{op:?} wrote in state {state:?}");
        }
    }

    /// Final checks on everything written.
    fn finish(mut self) -> Outcome {
        let out = std::mem::take(&mut self.out);
        let Some((key, sub, head)) = &self.accepted else {
            match self.result.handshake {
                Some((_, Err(status))) => {
                    check_refusal(&out, Some(status));
                }
                None => assert!(out.is_empty(), "wrote before the handshake ended"),
                Some((_, Ok(()))) => unreachable!(),
            }
            self.result.out = out;
            return self.result;
        };
        assert_eq!(
            super::handshake::check_accept(&out, key, sub.as_deref()),
            *head
        );
        let frames = parse_server_frames(&out[*head..]).unwrap_or_else(|e| panic!("{e}"));
        let mut closed = false;
        for f in &frames {
            match f.opcode {
                1 | 2 => {
                    assert!(!closed, "data frame after our close frame");
                    assert!(f.fin, "the session sends whole messages");
                    if f.opcode == 1 {
                        assert!(std::str::from_utf8(&f.payload).is_ok());
                    }
                }
                0 => panic!("continuation frame written"),
                8 => {
                    assert!(!closed, "two close frames");
                    closed = true;
                    if let Err(e) = parse_close_payload(&f.payload) {
                        panic!("invalid close payload {:?}: {e}", f.payload);
                    }
                }
                9 => assert!(!closed, "ping after our close frame"),
                _ => assert!(!closed, "pong after a close frame"),
            }
        }
        if let Some(code) = self.peer_close {
            if !self.we_closed {
                // The reply to the peer's close is the last frame and echoes its code.
                let last = frames.last().expect("close reply");
                assert_eq!(last.opcode, 8);
                match code {
                    CloseCode::NO_STATUS => assert!(last.payload.is_empty()),
                    c => assert_eq!(last.payload, c.0.to_be_bytes()),
                }
            }
        }
        self.result.out = out;
        self.result
    }
}

/// A text (valid UTF-8, cut at a character boundary) or binary payload of `len` bytes.
fn message(text: bool, len: u16) -> (OpCode, Vec<u8>) {
    if text {
        let s = "aé€😀".repeat(usize::from(len) / 10 + 1);
        let mut end = usize::from(len).min(s.len());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        (OpCode::Text, s.as_bytes()[..end].to_vec())
    } else {
        (OpCode::Binary, (0..len).map(|i| i as u8).collect())
    }
}

/// An owned copy of an event, so that the session can be used again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, String),
}

fn owned(e: Event<'_>) -> Owned {
    match e {
        Event::Text(s) => Owned::Text(s.to_owned()),
        Event::Binary(b) => Owned::Binary(b.to_vec()),
        Event::Ping(p) => Owned::Ping(p.to_vec()),
        Event::Pong(p) => Owned::Pong(p.to_vec()),
        Event::Close { code, reason } => Owned::Close(code.0, reason.to_owned()),
    }
}
