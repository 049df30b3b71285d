//! One server-side WebSocket connection as a sans-IO state machine.
//!
//! A [`Session`] takes the bytes a socket produced and returns events plus the bytes to send;
//! it owns no socket and reads no clock. The event loop is a thin adapter around it, and the
//! fuzzers drive it directly.
//!
//! Lifecycle: [`Session::feed_head`] until the HTTP request head is complete; the caller then
//! validates it ([`handshake::validate_upgrade`]), asks the application, writes the 101 or a
//! rejection with the [`handshake`] writers and calls [`Session::finish_handshake`] or
//! [`Session::finish_rejected`]. From then on [`Session::read`] turns frames into
//! [`Event`]s one at a time, answering the peer's close by itself; a ping leaves a pong owed,
//! which the caller writes with [`Session::write_pong`] when it next writes, so that pings
//! arriving faster than the peer reads are answered by one pong, not one each.
//!
//! Memory: a session owns heap buffers only while it holds a partial request head, a message that
//! spans several reads or fragments, a control frame split across reads, or an owed pong; a
//! message or control frame is handed to the caller when it is delivered (in the caller's
//! `spill` buffer), and a pong's buffer is released when it is written.
//!
//! Output: everything the server writes to a connection after the 101 is encoded here:
//! [`Session::send`] (a data frame), [`Session::header`] (the header of a data frame whose
//! payload the caller writes itself, straight from its buffer), [`Session::ping`],
//! [`Session::write_pong`], [`Session::close`] and the replies [`Session::read`] writes. So the
//! state machine decides what may still be sent (nothing after our close frame), and the
//! fuzzers drive the same encoder the server runs. A single-frame message whose bytes are all in the input is
//! unmasked in place and delivered as a slice of the input, without a copy.

use super::close::{parse_close_payload, truncate_reason, CloseCode};
use super::deflate::{InflateError, Inflater};
use super::frame::{
    apply_mask, write_frame, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};
use super::handshake::{self, Rejection, Request};
use super::utf8::Utf8Validator;
use std::fmt;

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Reading the HTTP upgrade request.
    Handshake,
    /// Upgraded; messages flow both ways.
    Open,
    /// We sent a close frame and wait for the peer's.
    CloseSent,
    /// Finished: the close handshake completed, failed, or the request was rejected. The transport
    /// may be closed now; further input is ignored.
    Closed,
}

/// A violation of RFC 6455 by the peer, with the close code it earns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtocolError {
    /// The code sent in our close frame.
    pub code: CloseCode,
    /// A short description, also sent as the close reason.
    pub reason: &'static str,
}

impl ProtocolError {
    const fn new(code: CloseCode, reason: &'static str) -> Self {
        ProtocolError { code, reason }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

impl std::error::Error for ProtocolError {}

/// What one call to [`Session::read`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete, valid UTF-8 text message.
    Text(&'a str),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A ping. The pong is owed, not written: the caller sends it with [`Session::write_pong`]
    /// once it is ready to write (a later ping replaces an owed pong's payload).
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// The peer's close frame. If it started the close, our reply was already written to `out`.
    /// Either way the session is now [`State::Closed`] and the transport may be closed (the
    /// server closes the TCP connection first, RFC 6455 section 7.1.1).
    Close {
        /// The code the peer sent, or 1005 when it sent none.
        code: CloseCode,
        /// The peer's reason (valid UTF-8, possibly empty).
        reason: &'a str,
    },
}

/// The result of feeding request-head bytes. (The request lives on the stack: about 4 KiB,
/// cheaper than a heap allocation per handshake.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Head<'a> {
    /// More bytes are needed.
    Partial,
    /// The head is complete. `head_len` bytes of the head's source belong to it; any bytes
    /// after them belong to the WebSocket stream. `buffered` says whether the head came from the
    /// session's own buffer (bytes trickled over several reads) or directly from the input.
    Complete {
        /// The parsed request.
        request: Request<'a>,
        /// Length of the request head in its source.
        head_len: usize,
        /// Whether the source is the session's buffer rather than the last input.
        buffered: bool,
    },
}

/// Where the bytes of a ready event lie, computed before any borrow is handed out.
enum Found {
    Nothing,
    Input {
        start: usize,
        end: usize,
        op: OpCode,
    },
    Buffer {
        text: bool,
    },
    /// A compressed message (RSV1 on its first frame) whole in the input.
    Inflate {
        start: usize,
        end: usize,
        text: bool,
    },
    /// A compressed message in the session's buffer.
    InflateBuffer {
        text: bool,
    },
    Control {
        op: OpCode,
    },
}

/// One server-side WebSocket connection's protocol state. About a hundred bytes when idle.
#[derive(Debug)]
pub struct Session {
    state: State,
    /// Partial frame header carried over between reads.
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: u8,
    /// Inside a frame's payload.
    in_payload: bool,
    frame_op: OpCode,
    frame_fin: bool,
    mask: [u8; 4],
    /// Offset of the next payload byte within its frame, modulo 4 (the mask phase).
    phase: u8,
    remaining: u64,
    /// The opcode (Text or Binary) of the data message being assembled, if any.
    msg_op: Option<OpCode>,
    /// The message being assembled is compressed (RSV1 on its first frame).
    msg_z: bool,
    /// permessage-deflate was negotiated: the window the server deflates with (9 to 15 bits);
    /// 0: not negotiated (RSV1 is then a protocol error).
    deflate: u8,
    utf8: Utf8Validator,
    /// What a partial head, message or control frame holds between reads; none on an idle
    /// session.
    held: Option<Box<Held>>,
    /// The payload of the pong owed for the most recent ping, until [`Session::write_pong`]
    /// writes it. Boxed: a session owes a pong only between a ping and the next write.
    pong: Option<Box<Pong>>,
}

/// The buffers a session holds between reads, boxed so that an idle session spends one
/// pointer on them.
#[derive(Debug, Default)]
struct Held {
    /// The request head while it trickles in; afterwards the message being assembled.
    buf: Vec<u8>,
    /// A control frame's payload split across reads.
    ctrl: Vec<u8>,
}

/// The payload of an owed pong (at most a control frame's 125 bytes).
#[derive(Debug)]
struct Pong {
    len: u8,
    payload: [u8; MAX_CONTROL_PAYLOAD],
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A session waiting for its request head. Allocates nothing.
    pub fn new() -> Self {
        Session {
            state: State::Handshake,
            hdr: [0; MAX_HEADER_LEN],
            hdr_len: 0,
            in_payload: false,
            frame_op: OpCode::Continuation,
            frame_fin: false,
            mask: [0; 4],
            phase: 0,
            remaining: 0,
            msg_op: None,
            msg_z: false,
            deflate: 0,
            utf8: Utf8Validator::new(),
            held: None,
            pong: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the session holds a buffer (a request head, a partial message or control frame).
    #[inline]
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// Bytes of heap this session holds right now (buffer capacities), for memory accounting
    /// and for checking that buffered bytes stay within the configured limits.
    pub fn buffered_capacity(&self) -> usize {
        self.held
            .as_deref()
            .map_or(0, |h| h.buf.capacity() + h.ctrl.capacity())
    }

    /// Bytes of request head or partial message held right now.
    pub fn buffered_len(&self) -> usize {
        self.held
            .as_deref()
            .map_or(0, |h| h.buf.len() + h.ctrl.len())
    }

    /// Feed bytes of the HTTP request head (state [`State::Handshake`]).
    ///
    /// When nothing is buffered and `input` holds a whole head, the request is parsed straight
    /// from `input` (no copy). Otherwise the bytes are appended to the session's buffer, which is
    /// parsed only once an empty line may have arrived, so a client trickling bytes costs O(n)
    /// in total. A head longer than `limits.max_header_bytes` is rejected (431) as soon as it
    /// is seen, without waiting for its end. On `Err` the caller writes the rejection and
    /// calls [`Session::finish_rejected`].
    pub fn feed_head<'a>(
        &'a mut self,
        input: &'a [u8],
        limits: &handshake::Limits,
    ) -> Result<Head<'a>, Rejection> {
        debug_assert_eq!(self.state, State::Handshake);
        if self.buf().is_empty() {
            match handshake::parse(input, limits)? {
                handshake::Parsed::Complete { request, head_len } => {
                    return Ok(Head::Complete {
                        request,
                        head_len,
                        buffered: false,
                    })
                }
                handshake::Parsed::Partial => {
                    append_capped(self.buf_mut(), input, limits.max_header_bytes);
                    return Ok(Head::Partial);
                }
            }
        }
        let old = self.buf().len();
        append_capped(self.buf_mut(), input, limits.max_header_bytes);
        let buf = self.buf();
        // An empty line ends the head: look for "\n\n" or "\n\r\n" ending in the new bytes.
        let from = old.saturating_sub(2);
        let ended = buf[from..]
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && ends_head(&buf[..from + i + 1]));
        if !ended {
            if buf.len() > limits.max_header_bytes {
                return Err(handshake::parse(buf, limits)
                    .err()
                    .unwrap_or(Rejection::HeadersTooLarge));
            }
            return Ok(Head::Partial);
        }
        match handshake::parse(buf, limits)? {
            handshake::Parsed::Complete { request, head_len } => Ok(Head::Complete {
                request,
                head_len,
                buffered: true,
            }),
            handshake::Parsed::Partial => Ok(Head::Partial),
        }
    }

    /// The upgrade was accepted and the 101 response written: the session is now
    /// [`State::Open`]. When the head was `buffered`, returns the bytes that followed it in the
    /// session's buffer (frames the client sent without waiting for the 101), which the caller
    /// passes to [`Session::read`]; otherwise those bytes are `input[head_len..]` of the last
    /// call to [`Session::feed_head`] and the returned vector is empty.
    pub fn finish_handshake(&mut self, head_len: usize, buffered: bool) -> Vec<u8> {
        self.state = State::Open;
        let mut rest = self.take_buf();
        if buffered {
            rest.drain(..head_len.min(rest.len()));
            rest
        } else {
            Vec::new()
        }
    }

    /// permessage-deflate was negotiated in the 101 (see [`super::deflate::negotiate`]), with
    /// the server deflating with a window of `window_bits` (9 to 15): from now on RSV1 on the
    /// first frame of a data message marks it compressed, inflated by [`Session::read_with`],
    /// and [`Session::send_compressed`] may be used.
    pub fn enable_deflate(&mut self, window_bits: u8) {
        self.deflate = window_bits.clamp(9, 15);
    }

    /// The window the server deflates with if permessage-deflate was negotiated, else 0.
    #[inline]
    pub fn deflate_bits(&self) -> u8 {
        self.deflate
    }

    /// The request was rejected (or was a plain HTTP request that got its answer): the session is
    /// [`State::Closed`] and its buffers are released.
    pub fn finish_rejected(&mut self) {
        self.state = State::Closed;
        self.held = None;
    }

    /// Parse the next frame bytes of `input` (state [`State::Open`] or [`State::CloseSent`]).
    ///
    /// Returns how many bytes of `input` were used and at most one event. Call again with the
    /// rest of the input until it is used up: each call uses at least one byte (partial frames
    /// are buffered in the session), so each call makes progress; a call may return no event
    /// without using all of `input` (after a non-final fragment, or a frame not delivered in
    /// [`State::CloseSent`]). Payloads are unmasked in place in `input`, and an event delivers
    /// them as a slice of it; a message that spanned several reads or fragments, or a control
    /// frame split across reads, is handed over in `spill` instead (the session's buffer is
    /// moved there, so the session keeps none: the caller drops or reuses it). The reply to the peer's
    /// close is appended to `out`; a ping's pong is only owed (see [`Session::write_pong`]), so
    /// one call appends at most one close frame to `out` whatever the input.
    ///
    /// On `Err` the peer broke the protocol: a close frame with the error's code was appended to
    /// `out` (unless we had already sent one), the session is [`State::Closed`], and the
    /// transport should be closed once `out` is flushed. In [`State::Closed`] all input is
    /// ignored; in [`State::CloseSent`] data messages and pings are parsed but not delivered.
    /// Messages longer than `max_message` bytes fail with 1009 as soon as a frame header
    /// announces it, before any of it is buffered.
    pub fn read<'a>(
        &mut self,
        input: &'a mut [u8],
        spill: &'a mut Vec<u8>,
        max_message: usize,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<Event<'a>>), ProtocolError> {
        self.read_with(input, spill, max_message, out, None)
    }

    /// [`Session::read`] on a session that may have negotiated permessage-deflate: a compressed
    /// message is inflated by `inflater` into `spill` (it holds no state between messages, so
    /// one serves every connection of a loop) and delivered from there; without an inflater a
    /// compressed message fails the session (1011). Its compressed size and its inflated size
    /// are each held to `max_message`: the inflated size is checked while inflating, which
    /// stops the moment it passes the limit (1009), so a zip bomb costs at most
    /// `max_message + 1` bytes of output, released at once. Invalid deflate data is 1007, and
    /// so is invalid UTF-8 in the inflated text.
    pub fn read_with<'a>(
        &mut self,
        input: &'a mut [u8],
        spill: &'a mut Vec<u8>,
        max_message: usize,
        out: &mut Vec<u8>,
        inflater: Option<&mut Inflater>,
    ) -> Result<(usize, Option<Event<'a>>), ProtocolError> {
        if self.state == State::Closed || self.state == State::Handshake || input.is_empty() {
            return Ok((input.len(), None));
        }
        let (used, ready) = match self.step(input, max_message, out) {
            Ok(r) => r,
            Err(e) => {
                self.fail(e, out);
                return Err(e);
            }
        };
        let event = match ready {
            Found::Nothing => None,
            Found::Inflate { start, end, text } => {
                Some(self.inflated(inflater, &input[start..end], text, spill, max_message, out)?)
            }
            Found::InflateBuffer { text } => {
                let compressed = self.take_buf();
                Some(self.inflated(inflater, &compressed, text, spill, max_message, out)?)
            }
            Found::Input { start, end, op } => {
                let bytes = &input[start..end];
                match op {
                    OpCode::Text => match std::str::from_utf8(bytes) {
                        Ok(s) => Some(Event::Text(s)),
                        Err(_) => {
                            let e = ProtocolError::new(
                                CloseCode::INVALID_PAYLOAD,
                                "invalid UTF-8 in text message",
                            );
                            self.fail(e, out);
                            return Err(e);
                        }
                    },
                    OpCode::Binary => Some(Event::Binary(bytes)),
                    OpCode::Ping => Some(Event::Ping(bytes)),
                    OpCode::Pong => Some(Event::Pong(bytes)),
                    _ => Some(close_event(bytes)),
                }
            }
            Found::Buffer { text } => {
                *spill = self.take_buf();
                let bytes = &spill[..];
                if text {
                    // Validated piece by piece as it arrived.
                    let s = std::str::from_utf8(bytes).unwrap_or_default();
                    debug_assert_eq!(s.len(), bytes.len());
                    Some(Event::Text(s))
                } else {
                    Some(Event::Binary(bytes))
                }
            }
            Found::Control { op } => {
                *spill = self.take_ctrl();
                let bytes = &spill[..];
                match op {
                    OpCode::Ping => Some(Event::Ping(bytes)),
                    OpCode::Pong => Some(Event::Pong(bytes)),
                    _ => Some(close_event(bytes)),
                }
            }
        };
        Ok((used, event))
    }

    /// Inflate a compressed message into `spill` and make its event; on an error (too big,
    /// invalid data, invalid UTF-8) fail the session, releasing what was inflated. Out of line:
    /// the uncompressed path through [`Session::read`] stays short.
    #[inline(never)]
    fn inflated<'a>(
        &mut self,
        inflater: Option<&mut Inflater>,
        compressed: &[u8],
        text: bool,
        spill: &'a mut Vec<u8>,
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Event<'a>, ProtocolError> {
        spill.clear();
        if let Err(e) = inflate(inflater, compressed, spill, max) {
            *spill = Vec::new();
            self.fail(e, out);
            return Err(e);
        }
        let spill: &'a Vec<u8> = spill;
        data_event(text, spill).inspect_err(|&e| self.fail(e, out))
    }

    /// Append a data frame (`Text` or `Binary`) carrying `payload` to `out`.
    /// Returns false, writing nothing, unless the session is [`State::Open`].
    #[inline]
    pub fn send(&mut self, op: OpCode, payload: &[u8], out: &mut Vec<u8>) -> bool {
        debug_assert!(op.is_data() && op != OpCode::Continuation);
        if self.state != State::Open {
            return false;
        }
        write_frame(out, true, op, payload);
        true
    }

    /// Append a compressed data frame (`Text` or `Binary`, RSV1 set) whose payload is
    /// `compressed`, a message deflated on its own without its 4-byte tail
    /// ([`super::deflate::Deflater::compress`]). Returns false, writing nothing, unless the
    /// session is [`State::Open`] and negotiated permessage-deflate.
    pub fn send_compressed(&mut self, op: OpCode, compressed: &[u8], out: &mut Vec<u8>) -> bool {
        let mut head = [0u8; MAX_HEADER_LEN];
        let Some(n) = self.header_compressed(op, compressed.len(), &mut head) else {
            return false;
        };
        out.reserve(n + compressed.len());
        out.extend_from_slice(&head[..n]);
        out.extend_from_slice(compressed);
        true
    }

    /// [`Session::header`] for a compressed data frame (RSV1 set); `None` unless the session is
    /// [`State::Open`] and negotiated permessage-deflate.
    pub fn header_compressed(
        &mut self,
        op: OpCode,
        len: usize,
        head: &mut [u8; MAX_HEADER_LEN],
    ) -> Option<usize> {
        if self.deflate == 0 {
            return None;
        }
        self.data_header(op, len, RSV1, head)
    }

    /// The header of a data frame (`Text` or `Binary`) of `len` payload bytes, written into
    /// `head`; returns its length. For a caller that writes the payload itself (one `writev` of
    /// the header and the caller's buffer instead of a copy): the bytes are exactly those
    /// [`Session::send`] would append. `None`, writing nothing, unless the session is
    /// [`State::Open`].
    pub fn header(
        &mut self,
        op: OpCode,
        len: usize,
        head: &mut [u8; MAX_HEADER_LEN],
    ) -> Option<usize> {
        self.data_header(op, len, 0, head)
    }

    fn data_header(
        &mut self,
        op: OpCode,
        len: usize,
        rsv: u8,
        head: &mut [u8; MAX_HEADER_LEN],
    ) -> Option<usize> {
        debug_assert!(op.is_data() && op != OpCode::Continuation);
        if self.state != State::Open {
            return None;
        }
        let header = FrameHeader {
            fin: true,
            rsv,
            opcode: op,
            mask: None,
            payload_len: len as u64,
        };
        Some(header.encode(head))
    }

    /// Append a ping (payload cut to 125 bytes) to `out`. Returns false unless [`State::Open`].
    pub fn ping(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        if self.state != State::Open {
            return false;
        }
        write_frame(out, true, OpCode::Ping, &payload[..payload.len().min(125)]);
        true
    }

    /// Whether a pong is owed (a ping arrived while open and its pong is not written yet).
    pub fn pong_owed(&self) -> bool {
        self.pong.is_some()
    }

    /// Write the pong owed for the most recent ping, if any, and owe nothing more. Pings are
    /// answered this way rather than one pong each as they are parsed (RFC 6455 section 5.5.3
    /// allows answering only the most recent): the caller calls this when it is ready to write,
    /// so however many pings arrive between two writes, one pong answers them. Returns whether
    /// a pong was written.
    pub fn write_pong(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(pong) = self.pong.take() else {
            return false;
        };
        write_frame(
            out,
            true,
            OpCode::Pong,
            &pong.payload[..usize::from(pong.len)],
        );
        true
    }

    /// Start the close handshake: append a close frame to `out` and enter [`State::CloseSent`].
    /// A code that may not be sent (see [`CloseCode::is_sendable`]) is replaced by an empty
    /// payload ("no status"); the reason is cut to fit a control frame. Returns false, writing
    /// nothing, unless the session is [`State::Open`].
    pub fn close(&mut self, code: CloseCode, reason: &str, out: &mut Vec<u8>) -> bool {
        if self.state != State::Open {
            return false;
        }
        write_close(out, code, reason);
        self.state = State::CloseSent;
        // Once our close is out the connection is ending: pings are no longer answered.
        self.pong = None;
        true
    }

    /// Fail the connection because the peer broke the protocol: [`Session::abort`] with the
    /// error's code and reason.
    pub fn fail(&mut self, err: ProtocolError, out: &mut Vec<u8>) {
        self.abort(err.code, err.reason, out);
    }

    /// End the connection from our side at once, for a reason of the server's own (an
    /// application callback that panicked, say): append a close frame with `code` and `reason`
    /// unless one was sent already, and enter [`State::Closed`] without waiting for the peer's.
    pub fn abort(&mut self, code: CloseCode, reason: &str, out: &mut Vec<u8>) {
        if self.state == State::Open {
            write_close(out, code, reason);
        }
        self.state = State::Closed;
        self.release();
    }

    /// Drop every buffer: the session is closed and will deliver nothing more.
    fn release(&mut self) {
        self.held = None;
        self.pong = None;
    }

    /// The request head or message held so far (empty if none).
    fn buf(&self) -> &[u8] {
        self.held.as_deref().map_or(&[], |h| &h.buf)
    }

    fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.held.get_or_insert_with(Box::default).buf
    }

    fn ctrl_mut(&mut self) -> &mut Vec<u8> {
        &mut self.held.get_or_insert_with(Box::default).ctrl
    }

    /// Hand over the head or message held (releasing the box once nothing is held).
    fn take_buf(&mut self) -> Vec<u8> {
        let buf = self.held.as_mut().map(|h| std::mem::take(&mut h.buf));
        self.tidy();
        buf.unwrap_or_default()
    }

    /// Hand over the control frame held (releasing the box once nothing is held).
    fn take_ctrl(&mut self) -> Vec<u8> {
        let ctrl = self.held.as_mut().map(|h| std::mem::take(&mut h.ctrl));
        self.tidy();
        ctrl.unwrap_or_default()
    }

    fn tidy(&mut self) {
        if self
            .held
            .as_deref()
            .is_some_and(|h| h.buf.capacity() == 0 && h.ctrl.capacity() == 0)
        {
            self.held = None;
        }
    }

    /// Parse at most one frame's worth of `input`; see [`Session::read`].
    fn step(
        &mut self,
        input: &mut [u8],
        max_message: usize,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Found), ProtocolError> {
        let mut used = 0;
        let fresh = !self.in_payload;
        if fresh {
            let header = if self.hdr_len == 0 {
                match FrameHeader::parse(input).map_err(frame_error)? {
                    Some((h, n)) => {
                        used = n;
                        h
                    }
                    None => {
                        self.hdr[..input.len()].copy_from_slice(input);
                        self.hdr_len = input.len() as u8;
                        return Ok((input.len(), Found::Nothing));
                    }
                }
            } else {
                let have = self.hdr_len as usize;
                let take = (MAX_HEADER_LEN - have).min(input.len());
                self.hdr[have..have + take].copy_from_slice(&input[..take]);
                match FrameHeader::parse(&self.hdr[..have + take]).map_err(frame_error)? {
                    Some((h, n)) => {
                        self.hdr_len = 0;
                        used = n - have;
                        h
                    }
                    None => {
                        self.hdr_len = (have + take) as u8;
                        return Ok((take, Found::Nothing));
                    }
                }
            };
            self.begin_frame(&header, max_message)?;
        }

        let avail = input.len() - used;
        let op = self.frame_op;
        if fresh
            && (avail as u64) >= self.remaining
            && (op.is_control() || (self.frame_fin && op != OpCode::Continuation))
        {
            // The whole frame is in the input: unmask in place and hand out a slice of it.
            let end = used + self.remaining as usize;
            apply_mask(&mut input[used..end], self.mask, 0);
            let start = used;
            self.in_payload = false;
            self.remaining = 0;
            if op.is_data() {
                self.msg_op = None;
                let z = self.msg_z;
                if z {
                    self.msg_z = false;
                }
                if self.state != State::Open {
                    // Not delivered, but validated as on the buffered path, so that the outcome
                    // does not depend on how the frame was split into reads (a compressed
                    // message is not inflated only to be dropped).
                    if op == OpCode::Text && !z && std::str::from_utf8(&input[start..end]).is_err()
                    {
                        return Err(ProtocolError::new(
                            CloseCode::INVALID_PAYLOAD,
                            "invalid UTF-8 in text message",
                        ));
                    }
                    return Ok((end, Found::Nothing));
                }
                if z {
                    let text = op == OpCode::Text;
                    return Ok((end, Found::Inflate { start, end, text }));
                }
            } else if !self.control(op, &input[start..end], out)? {
                return Ok((end, Found::Nothing));
            }
            return Ok((end, Found::Input { start, end, op }));
        }

        // Part of a frame, or a fragment: unmask what is here and append it to a buffer.
        let n = (avail as u64).min(self.remaining) as usize;
        let piece = &mut input[used..used + n];
        apply_mask(piece, self.mask, self.phase as usize);
        self.phase = ((self.phase as usize + n) % 4) as u8;
        self.remaining -= n as u64;
        used += n;
        if op.is_control() {
            append_capped(self.ctrl_mut(), piece, MAX_CONTROL_PAYLOAD);
            if self.remaining > 0 {
                return Ok((used, Found::Nothing));
            }
            self.in_payload = false;
            let payload = self.take_ctrl();
            if !self.control(op, &payload, out)? {
                return Ok((used, Found::Nothing)); // the payload is released
            }
            *self.ctrl_mut() = payload;
            return Ok((used, Found::Control { op }));
        }
        let text = self.msg_op == Some(OpCode::Text);
        let z = self.msg_z;
        if text && !z && self.utf8.feed(piece).is_err() {
            return Err(ProtocolError::new(
                CloseCode::INVALID_PAYLOAD,
                "invalid UTF-8 in text message",
            ));
        }
        append_capped(self.buf_mut(), piece, max_message);
        if self.remaining > 0 {
            return Ok((used, Found::Nothing));
        }
        self.in_payload = false;
        if !self.frame_fin {
            return Ok((used, Found::Nothing));
        }
        self.msg_op = None;
        self.msg_z = false;
        if text && !z && self.utf8.finish().is_err() {
            return Err(ProtocolError::new(
                CloseCode::INVALID_PAYLOAD,
                "invalid UTF-8 in text message",
            ));
        }
        if self.state != State::Open {
            self.take_buf();
            return Ok((used, Found::Nothing));
        }
        if z {
            return Ok((used, Found::InflateBuffer { text }));
        }
        Ok((used, Found::Buffer { text }))
    }

    /// Check a new frame's header against the connection's state and enter its payload.
    fn begin_frame(&mut self, h: &FrameHeader, max_message: usize) -> Result<(), ProtocolError> {
        if h.rsv != 0 {
            self.check_rsv(h)?;
        }
        let Some(mask) = h.mask else {
            return Err(ProtocolError::new(
                CloseCode::PROTOCOL_ERROR,
                "client frame not masked",
            ));
        };
        match h.opcode {
            OpCode::Continuation => {
                if self.msg_op.is_none() {
                    return Err(ProtocolError::new(
                        CloseCode::PROTOCOL_ERROR,
                        "continuation without a message",
                    ));
                }
                if h.payload_len > (max_message - self.buf().len().min(max_message)) as u64 {
                    return Err(too_big());
                }
            }
            OpCode::Text | OpCode::Binary => {
                if self.msg_op.is_some() {
                    return Err(ProtocolError::new(
                        CloseCode::PROTOCOL_ERROR,
                        "new message inside a fragmented one",
                    ));
                }
                if h.payload_len > max_message as u64 {
                    return Err(too_big());
                }
                self.msg_op = Some(h.opcode);
            }
            _ => {}
        }
        self.in_payload = true;
        self.frame_op = h.opcode;
        self.frame_fin = h.fin;
        self.mask = mask;
        self.phase = 0;
        self.remaining = h.payload_len;
        Ok(())
    }

    /// RSV bits on a frame: only RSV1, only with permessage-deflate, only on the first frame of
    /// a data message (RFC 7692 section 6); else 1002.
    /// Marks the message compressed when they say so (kept off the common path: a frame
    /// without RSV bits does not touch `msg_z`, which is cleared when the message completes).
    #[cold]
    #[inline(never)]
    fn check_rsv(&mut self, h: &FrameHeader) -> Result<(), ProtocolError> {
        let reason = if h.rsv != RSV1 || self.deflate == 0 {
            "reserved bits set"
        } else if h.opcode.is_control() {
            "compressed control frame"
        } else if h.opcode == OpCode::Continuation {
            "RSV1 on a continuation frame"
        } else if self.msg_op.is_some() {
            "new message inside a fragmented one"
        } else {
            self.msg_z = true;
            return Ok(());
        };
        Err(ProtocolError::new(CloseCode::PROTOCOL_ERROR, reason))
    }

    /// Act on a complete control frame; returns whether it is delivered as an event.
    fn control(
        &mut self,
        op: OpCode,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<bool, ProtocolError> {
        match op {
            OpCode::Ping => {
                // Only while open: once our close frame is out, no more pongs (RFC 6455 section
                // 5.5.2 owes one until the peer's close arrives, but a connection we are closing
                // answers nothing, so that pings after our close cannot make us write).
                if self.state != State::Open {
                    return Ok(false);
                }
                let pong = self.pong.get_or_insert_with(|| {
                    Box::new(Pong {
                        len: 0,
                        payload: [0; MAX_CONTROL_PAYLOAD],
                    })
                });
                pong.len = payload.len() as u8;
                pong.payload[..payload.len()].copy_from_slice(payload);
                Ok(true)
            }
            OpCode::Pong => Ok(self.state == State::Open),
            _ => {
                let (code, _) = parse_close_payload(payload).map_err(|_| {
                    ProtocolError::new(CloseCode::PROTOCOL_ERROR, "invalid close payload")
                })?;
                if self.state == State::Open {
                    // Echo the peer's code (RFC 6455 section 5.5.1); none if it sent none.
                    write_close(out, code, "");
                }
                self.state = State::Closed;
                self.pong = None;
                // A half-built message will never be delivered: give its buffer back.
                self.take_buf();
                Ok(true)
            }
        }
    }
}

/// Appends `bytes` to `buf`, growing it geometrically as `Vec` does but never beyond `limit`
/// (or beyond exactly what is needed, if that is more), so that a buffer's capacity stays
/// within the limit its contents are held to instead of reaching twice that.
fn append_capped(buf: &mut Vec<u8>, bytes: &[u8], limit: usize) {
    let need = buf.len() + bytes.len();
    if need > buf.capacity() {
        let target = (buf.capacity() * 2).min(limit).max(need);
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(bytes);
}

/// Whether `head` ends with an empty line ("\n\n" or "\n\r\n").
fn ends_head(head: &[u8]) -> bool {
    head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n")
}

fn close_event(payload: &[u8]) -> Event<'_> {
    // Validated by `Session::control` before the event was made.
    let (code, reason) = parse_close_payload(payload).unwrap_or((CloseCode::NO_STATUS, ""));
    Event::Close { code, reason }
}

fn write_close(out: &mut Vec<u8>, code: CloseCode, reason: &str) {
    if !code.is_sendable() {
        write_frame(out, true, OpCode::Close, &[]);
        return;
    }
    let reason = truncate_reason(reason);
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.0.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    write_frame(out, true, OpCode::Close, &payload[..2 + reason.len()]);
}

/// The RSV1 bit in [`FrameHeader::rsv`]: a compressed message (RFC 7692 section 6).
const RSV1: u8 = 0b100;

/// Inflate a whole compressed message into `spill`, held to `max` bytes.
fn inflate(
    inflater: Option<&mut Inflater>,
    compressed: &[u8],
    spill: &mut Vec<u8>,
    max: usize,
) -> Result<(), ProtocolError> {
    let Some(inflater) = inflater else {
        // `read` on a session that negotiated deflate: the caller has no decompressor.
        return Err(ProtocolError::new(
            CloseCode::INTERNAL_ERROR,
            "compressed message without a decompressor",
        ));
    };
    inflater
        .inflate(compressed, spill, max)
        .map_err(|e| match e {
            InflateError::TooBig => too_big(),
            InflateError::Invalid => {
                ProtocolError::new(CloseCode::INVALID_PAYLOAD, "invalid compressed data")
            }
        })
}

/// The event for an inflated data message in `bytes` (text validated as UTF-8 here).
fn data_event(text: bool, bytes: &[u8]) -> Result<Event<'_>, ProtocolError> {
    if !text {
        return Ok(Event::Binary(bytes));
    }
    std::str::from_utf8(bytes).map(Event::Text).map_err(|_| {
        ProtocolError::new(CloseCode::INVALID_PAYLOAD, "invalid UTF-8 in text message")
    })
}

fn too_big() -> ProtocolError {
    ProtocolError::new(CloseCode::MESSAGE_TOO_BIG, "message too big")
}

fn frame_error(e: super::frame::FrameError) -> ProtocolError {
    use super::frame::FrameError as F;
    let reason = match e {
        F::ReservedOpcode(_) => "reserved opcode",
        F::NonMinimalLength => "non-minimal payload length",
        F::LengthMsbSet => "payload length with most significant bit set",
        F::ControlTooLong => "control frame longer than 125 bytes",
        F::ControlFragmented => "fragmented control frame",
    };
    ProtocolError::new(CloseCode::PROTOCOL_ERROR, reason)
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
