//! permessage-deflate (RFC 7692), sans-IO: the negotiation of the extension in the opening
//! handshake, and the compressor and decompressor of the *shared* profile (no context takeover
//! in either direction: each message is compressed and inflated on its own, so one compressor
//! and one decompressor serve every connection of a loop, and an idle connection holds no
//! compression state).
//!
//! Negotiation ([`negotiate`]): every `Sec-WebSocket-Extensions` header line is parsed as an
//! extension list (RFC 6455 section 9.1: tokens, `;` parameters, values as tokens or quoted
//! strings); a line that does not parse is a malformed header ([`Malformed`], answered 400).
//! Then the first acceptable `permessage-deflate` offer is taken; an offer with an unknown
//! parameter, a duplicate, a value where none belongs or an invalid window size is declined
//! (RFC 7692 section 5.1), as is one asking for `server_max_window_bits=8` (below).
//!
//! Window bits 8: zlib (and zlib-rs) cannot deflate with a 256-byte window and silently use 512
//! bytes when asked for 8, so a stream it makes may refer 512 bytes back, which a peer that
//! asked for `server_max_window_bits=8` may reject. The server must not answer a larger value
//! than offered (RFC 7692 section 7.1.2.1), so such an offer is declined. An offer of
//! `client_max_window_bits=8` is accepted: the server inflates with a 32 KiB window, and an
//! inflate window at least as large as the sender's reads every stream (the 9-bit ones zlib
//! makes when asked for 8 included).
//!
//! Inflating is bounded exactly ([`Inflater::inflate`]): the output grows geometrically but
//! never beyond the limit plus one byte, and the moment it holds more than the limit the
//! message is refused, so a zip bomb costs the limit, not what it would inflate to.

use flate2::{Decompress, FlushDecompress, Status};
use std::fmt;

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const NAME: &str = "permessage-deflate";

/// The bytes a sender strips from the end of each compressed message and the receiver appends
/// before inflating (an empty stored block, RFC 7692 section 7.2.1).
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The largest LZ77 window, in bits (32 KiB), used when the peer asks for no smaller one.
pub const MAX_WINDOW_BITS: u8 = 15;

/// The smallest window the server deflates with (see the module's documentation on 8).
pub const MIN_DEFLATE_WINDOW_BITS: u8 = 9;

/// A `Sec-WebSocket-Extensions` header line that is not an extension list (RFC 6455 section
/// 9.1): the handshake fails with 400 and this reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Malformed {}

/// What the server answers to an accepted permessage-deflate offer, and so how both sides
/// compress. For the shared profile both `no_context_takeover`s are always set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreement {
    /// The server resets its compressor after each message (answered always by the shared
    /// profile, RFC 7692 section 7.1.1.1 allows it unasked).
    pub server_no_context_takeover: bool,
    /// The client must reset its compressor after each message (answered always by the shared
    /// profile, whose one decompressor per loop starts afresh for each message).
    pub client_no_context_takeover: bool,
    /// The window the server deflates with, answered when the client offered a limit (never
    /// above it); `None`: not offered, the server uses [`MAX_WINDOW_BITS`].
    pub server_max_window_bits: Option<u8>,
    /// The window limit answered for the client's compressor; only ever answered when offered.
    /// The shared profile answers none: it inflates with the largest window, which reads any.
    pub client_max_window_bits: Option<u8>,
}

impl Agreement {
    /// The window the server deflates with, in bits (9 to 15).
    pub fn deflate_window_bits(&self) -> u8 {
        self.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS)
    }

    /// Append the `Sec-WebSocket-Extensions` response header line (with its CRLF).
    pub fn write_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"Sec-WebSocket-Extensions: ");
        out.extend_from_slice(NAME.as_bytes());
        if self.server_no_context_takeover {
            out.extend_from_slice(b"; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.extend_from_slice(b"; client_no_context_takeover");
        }
        for (name, bits) in [
            ("server_max_window_bits", self.server_max_window_bits),
            ("client_max_window_bits", self.client_max_window_bits),
        ] {
            if let Some(bits) = bits {
                out.extend_from_slice(b"; ");
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                if bits >= 10 {
                    out.push(b'1');
                }
                out.push(b'0' + bits % 10);
            }
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// How connections compress: what [`negotiate`] answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// No context takeover either way: the loop's one compressor and decompressor serve all.
    Shared,
    /// Each connection its own compressor and decompressor, with context takeover unless the
    /// client asks for none; the server deflates with at most `window_bits`.
    Dedicated {
        /// The largest window the server compresses with (9 to 15).
        window_bits: u8,
    },
}

/// Negotiate permessage-deflate for `profile` from the values of every
/// `Sec-WebSocket-Extensions` header line, in order.
///
/// `Err` if a line is not an extension list (the handshake fails with 400); `Ok(None)` if no
/// offer is acceptable (the 101 names no extension); else the first acceptable offer's answer.
/// Linear in the header's length; allocates nothing.
pub fn negotiate<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    profile: Profile,
) -> Result<Option<Agreement>, Malformed> {
    let mut chosen = None;
    for value in values {
        parse_list(value, |name, params| {
            if chosen.is_none() && name.eq_ignore_ascii_case(NAME.as_bytes()) {
                chosen = accept(params, profile);
            }
        })?;
    }
    Ok(chosen)
}

/// The parameters of one offer as parsed: name and raw value (a token, or a quoted string with
/// its quotes and escapes), at most [`MAX_PARAMS`] of them looked at.
type Params<'a> = [(&'a [u8], Option<&'a [u8]>)];

/// Parameters beyond this many in one offer make it unacceptable (permessage-deflate defines
/// four, each allowed once).
const MAX_PARAMS: usize = 8;

/// The answer to one permessage-deflate offer, or `None` to decline it.
///
/// The shared profile always answers both `no_context_takeover`s (RFC 7692 section 7.1.1
/// allows the server to), so every message stands alone. The dedicated profile takes over its
/// context both ways unless the offer asks for none: it answers `server_no_context_takeover`
/// only when offered, and `client_no_context_takeover` when offered (it then resets its
/// decompressor per message, as the client promised). Both answer `server_max_window_bits`
/// only when offered, never above it (the dedicated profile at most its own window, which it
/// also uses unannounced when not offered: a smaller window is read by any decoder), and never
/// `client_max_window_bits` (the decompressor holds a 32 KiB window whatever the client uses).
fn accept(params: &Params<'_>, profile: Profile) -> Option<Agreement> {
    let mut seen = [false; 4];
    let shared = profile == Profile::Shared;
    let mut agreement = Agreement {
        server_no_context_takeover: shared,
        client_no_context_takeover: shared,
        server_max_window_bits: None,
        client_max_window_bits: None,
    };
    for &(name, value) in params {
        let which = [
            "server_no_context_takeover",
            "client_no_context_takeover",
            "server_max_window_bits",
            "client_max_window_bits",
        ]
        .iter()
        .position(|p| name.eq_ignore_ascii_case(p.as_bytes()))?;
        if std::mem::replace(&mut seen[which], true) {
            return None; // a duplicate parameter
        }
        match which {
            0 | 1 if value.is_some() => return None,
            0 => agreement.server_no_context_takeover = true,
            1 => agreement.client_no_context_takeover = true,
            2 => {
                // The server must deflate with at most this window, and answer it.
                let bits = window_bits(value?)?;
                if bits < MIN_DEFLATE_WINDOW_BITS {
                    return None;
                }
                agreement.server_max_window_bits = Some(match profile {
                    Profile::Shared => bits,
                    Profile::Dedicated { window_bits } => bits.min(window_bits),
                });
            }
            _ => {
                // A hint (or permission to limit the client): inflating with the largest
                // window reads any; the value must still be valid.
                if let Some(v) = value {
                    window_bits(v)?;
                }
            }
        }
    }
    Some(agreement)
}

/// A window-bits value (RFC 7692 section 7.1.2.1: a decimal integer from 8 to 15 without
/// leading zeroes), as a token or a quoted string.
fn window_bits(raw: &[u8]) -> Option<u8> {
    let mut buf = [0u8; 2];
    let v = unquote(raw, &mut buf)?;
    match v {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// The value of a token or quoted string, unescaped into `buf`; `None` if it does not fit.
fn unquote<'b>(raw: &'b [u8], buf: &'b mut [u8; 2]) -> Option<&'b [u8]> {
    let Some(inner) = raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")) else {
        return Some(raw);
    };
    let mut n = 0;
    let mut escaped = false;
    for &c in inner {
        if !escaped && c == b'\\' {
            escaped = true;
            continue;
        }
        escaped = false;
        *buf.get_mut(n)? = c;
        n += 1;
    }
    Some(&buf[..n])
}

/// RFC 7230 `tchar`.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// A cursor over one header value.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn skip_ws(&mut self) {
        while matches!(self.s.get(self.i), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn token(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        match self.i > start {
            true => Ok(&self.s[start..self.i]),
            false => Err(Malformed(what)),
        }
    }

    /// A quoted string (RFC 7230 section 3.2.6) whose unescaped value is a token (RFC 6455
    /// section 9.1), returned with its quotes.
    fn quoted(&mut self) -> Result<&'a [u8], Malformed> {
        const BAD: Malformed =
            Malformed("malformed Sec-WebSocket-Extensions: invalid quoted string");
        let start = self.i;
        self.i += 1;
        let mut len = 0;
        loop {
            let c = self.peek().ok_or(BAD)?;
            self.i += 1;
            match c {
                b'"' if len > 0 => return Ok(&self.s[start..self.i]),
                b'\\' => {
                    self.peek().filter(|&e| is_tchar(e)).ok_or(BAD)?;
                    self.i += 1;
                }
                c if is_tchar(c) => {}
                _ => return Err(BAD),
            }
            len += 1;
        }
    }
}

/// Parse one header value as an extension list, calling `offer` with each extension's name and
/// its first [`MAX_PARAMS`] parameters (more make the offer's parameter list end with an entry
/// no extension defines, so that it is declined).
fn parse_list<'a>(
    value: &'a [u8],
    mut offer: impl FnMut(&'a [u8], &Params<'a>),
) -> Result<(), Malformed> {
    const EXTRA: (&[u8], Option<&[u8]>) = (b"(too many parameters)", None);
    let mut c = Cursor { s: value, i: 0 };
    loop {
        c.skip_ws();
        match c.peek() {
            None => return Ok(()),
            Some(b',') => {
                c.i += 1; // an empty list element (RFC 7230 section 7)
                continue;
            }
            Some(_) => {}
        }
        let name = c.token("malformed Sec-WebSocket-Extensions: extension name is not a token")?;
        let mut params = [(&b""[..], None); MAX_PARAMS + 1];
        let mut n = 0;
        loop {
            c.skip_ws();
            match c.peek() {
                None | Some(b',') => break,
                Some(b';') => c.i += 1,
                Some(_) => {
                    return Err(Malformed(
                        "malformed Sec-WebSocket-Extensions: expected ';' or ','",
                    ))
                }
            }
            c.skip_ws();
            let pname =
                c.token("malformed Sec-WebSocket-Extensions: parameter name is not a token")?;
            c.skip_ws();
            let pvalue = if c.peek() == Some(b'=') {
                c.i += 1;
                c.skip_ws();
                Some(match c.peek() {
                    Some(b'"') => c.quoted()?,
                    _ => c.token(
                        "malformed Sec-WebSocket-Extensions: parameter value is not a token",
                    )?,
                })
            } else {
                None
            };
            if n < MAX_PARAMS {
                params[n] = (pname, pvalue);
                n += 1;
            } else {
                params[MAX_PARAMS] = EXTRA;
                n = MAX_PARAMS + 1;
            }
        }
        offer(name, &params[..n]);
    }
}

/// Why a compressed message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit (close 1009).
    TooBig,
    /// It is not valid deflate data (close 1007).
    Invalid,
}

/// The least the output grows by at a time while inflating; from there it doubles, and it is
/// never given more than the limit plus one byte of capacity.
const INFLATE_STEP: usize = 16 * 1024;

/// A raw-deflate decompressor: with the largest window (32 KiB), reset for each message (no
/// context takeover), one serves every connection of a loop; the dedicated profile gives each
/// connection its own, which may keep its window from one message to the next.
pub struct Inflater {
    d: Decompress,
    bits: u8,
    /// Context takeover: each message may refer to those before it.
    takeover: bool,
    /// Messages inflated (or refused while inflating).
    messages: u64,
    /// Bytes inflated, those of refused messages included: the work done.
    produced: u64,
    /// Compressed bytes given to inflate (without the tail).
    taken: u64,
}

impl fmt::Debug for Inflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Inflater({} bits)", self.bits)
    }
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    /// Heap bytes a decompressor holds once it has inflated, as the memory budget counts it:
    /// 47,552 bytes measured with a counting allocator (`tests/compression_memory.rs`; zlib-rs
    /// 0.6.9 through flate2 1.1.11: the 32 KiB window and the decoding state and tables, the
    /// same for every window size, since zlib-rs allocates the largest window whatever it is
    /// asked for), rounded up to 48 KiB.
    pub const HEAP_BYTES: usize = 48 * 1024;

    /// A decompressor with a 32 KiB window, reset for each message.
    pub fn new() -> Self {
        Self::with_window(MAX_WINDOW_BITS, false)
    }

    /// A decompressor with a window of `bits` (8 to 15; a sender asked for 8 may use 9, so 8
    /// is read as 9), keeping it from one message to the next with `takeover`.
    pub fn with_window(bits: u8, takeover: bool) -> Self {
        let bits = bits.clamp(MIN_DEFLATE_WINDOW_BITS, MAX_WINDOW_BITS);
        Inflater {
            d: Decompress::new_with_window_bits(false, bits),
            bits,
            takeover,
            messages: 0,
            produced: 0,
            taken: 0,
        }
    }

    /// Inflate one whole message (`compressed`, without the 4-byte tail the sender stripped),
    /// appending the result to `out`.
    ///
    /// Bounded exactly: `out` grows geometrically, but never beyond `limit + 1` bytes of
    /// capacity (unless it had more already), and the moment it holds more than `limit` bytes
    /// the message fails with [`InflateError::TooBig`], so a message that would inflate to
    /// gigabytes costs at most the limit plus one byte of output. `out` may hold a partial
    /// result after an error. A stream cut short, or bytes after a final block other than the
    /// one zero byte of a flush, are [`InflateError::Invalid`].
    pub fn inflate(
        &mut self,
        compressed: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        self.messages += 1;
        if !self.takeover {
            // Reset before each message (not after: once is enough), so that whatever the
            // previous one left, an error midway included, does not count.
            self.d.reset(false);
        }
        let start = out.len();
        let r = self.run(compressed, out, limit);
        self.produced += (out.len() - start) as u64;
        self.taken += compressed.len() as u64;
        r
    }

    fn run(
        &mut self,
        compressed: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        if compressed.is_empty() {
            return Ok(()); // nothing to be cut short (a sender should send 0x00, 7.2.3.6)
        }
        for (n, part) in [compressed, &TAIL[..]].into_iter().enumerate() {
            let mut pos = 0;
            loop {
                if out.len() == out.capacity() {
                    if out.len() > limit {
                        return Err(InflateError::TooBig);
                    }
                    // Geometric growth (amortized linear copying), capped at `limit + 1`.
                    let room = limit.saturating_add(1) - out.len();
                    let grow = out.len().max(INFLATE_STEP).min(room);
                    out.reserve_exact(grow);
                }
                let (in0, out0) = (self.d.total_in(), out.len());
                let status = self
                    .d
                    .decompress_vec(&part[pos..], out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Invalid)?;
                pos += (self.d.total_in() - in0) as usize;
                if out.len() > limit {
                    return Err(InflateError::TooBig);
                }
                if status == Status::StreamEnd {
                    // A final block (BFINAL) ended the message. RFC 7692 allows it (section
                    // 7.2.3.4's example); what may follow is the first byte of the empty
                    // stored block the sender flushed with (its other four are the stripped
                    // tail). Anything else, or a final block that needed the tail's bytes to
                    // end, is not what the sender compressed.
                    let rest = &part[pos..];
                    if !(n == 0 && rest.len() <= 1 && rest.iter().all(|&b| b == 0)) {
                        return Err(InflateError::Invalid);
                    }
                    if self.takeover {
                        // The stream ended: the next message begins a new one.
                        self.d.reset(false);
                    }
                    return Ok(());
                }
                let progress = self.d.total_in() > in0 || out.len() > out0;
                if pos == part.len() && out.len() < out.capacity() {
                    break; // all input taken, and room left: everything it holds is out
                }
                if !progress && out.len() < out.capacity() {
                    return Err(InflateError::Invalid); // stuck: not a deflate stream
                }
            }
        }
        match self.takeover {
            // The stream goes on into the next message: it cannot be ended to check it. A
            // stream cut short leaves the decoder mid-block, and the next message then decodes
            // as garbage or fails.
            true => Ok(()),
            false => self.ended(out),
        }
    }

    /// After the message and the tail: the stream must stand at a block boundary, as the empty
    /// stored block the tail ends leaves it. A stream cut short (a stored block claiming more
    /// bytes than it carries, a Huffman block without its end code) took the tail as data and
    /// does not: fed a final empty block (fixed codes, `03 00`), it must end at once and
    /// produce nothing.
    fn ended(&mut self, out: &mut Vec<u8>) -> Result<(), InflateError> {
        const FINAL_EMPTY_BLOCK: [u8; 2] = [0x03, 0x00];
        if out.len() == out.capacity() {
            out.reserve_exact(1); // room to show output, if it (wrongly) makes any
        }
        let before = out.len();
        let status = self
            .d
            .decompress_vec(&FINAL_EMPTY_BLOCK, out, FlushDecompress::Finish)
            .map_err(|_| InflateError::Invalid)?;
        match status == Status::StreamEnd && out.len() == before {
            true => Ok(()),
            false => Err(InflateError::Invalid),
        }
    }
}

/// A raw-deflate compressor with a chosen window (9 to 15 bits), reset for each message.
pub struct Deflater {
    c: zlib_rs::Deflate,
    bits: u8,
    mem_level: u8,
    /// Context takeover: the window carries over from one message to the next (the dedicated
    /// profile), instead of a reset before each.
    takeover: bool,
}

impl fmt::Debug for Deflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Deflater({} bits, memory level {})",
            self.bits, self.mem_level
        )
    }
}

/// zlib's default memory level (its hash table and its buffer of pending symbols).
pub const DEFAULT_MEM_LEVEL: u8 = 8;

impl Deflater {
    /// A compressor at zlib's default level (6) with a window of `bits` (clamped to 9..=15)
    /// and the default memory level, reset for each message (the shared profile).
    pub fn new(bits: u8) -> Self {
        Self::with(bits, DEFAULT_MEM_LEVEL, false)
    }

    /// A compressor at zlib's default level (6) with a window of `bits` (clamped to 9..=15),
    /// a memory level of `mem_level` (clamped to 1..=9), and, with `takeover`, the window kept
    /// from one message to the next (context takeover).
    pub fn with(bits: u8, mem_level: u8, takeover: bool) -> Self {
        let bits = bits.clamp(MIN_DEFLATE_WINDOW_BITS, MAX_WINDOW_BITS);
        let mem_level = mem_level.clamp(1, 9);
        let config = zlib_rs::DeflateConfig {
            level: 6,
            method: zlib_rs::Method::Deflated,
            window_bits: -i32::from(bits), // raw deflate: no zlib header
            mem_level: i32::from(mem_level),
            strategy: zlib_rs::Strategy::Default,
        };
        Deflater {
            c: zlib_rs::Deflate::new_with_config(config),
            bits,
            mem_level,
            takeover,
        }
    }

    /// Heap bytes a compressor with a window of `bits` and the default memory level holds.
    pub fn heap_bytes(bits: u8) -> usize {
        Self::heap_bytes_with(bits, DEFAULT_MEM_LEVEL)
    }

    /// Heap bytes a compressor with a window of `bits` and memory level `mem_level` holds, as
    /// the memory budget counts it. Measured with a counting allocator for every window and
    /// level (`tests/compression_memory.rs`, zlib-rs 0.6.9): `4 << bits` (the window and its
    /// chain), `448 << mem_level` (the buffer of pending symbols), and 134,272 bytes that do not
    /// change (the hash table, which zlib-rs sizes at 64 Ki entries whatever the memory level,
    /// and the state): from 137,216 bytes (9 bits, level 1) to 494,720 (15 bits, level 9);
    /// 380,032 at 15 bits and the default level 8. Counted with the constant rounded up to
    /// 135 KiB.
    pub fn heap_bytes_with(bits: u8, mem_level: u8) -> usize {
        let bits = bits.clamp(MIN_DEFLATE_WINDOW_BITS, MAX_WINDOW_BITS);
        let mem = mem_level.clamp(1, 9);
        (4 << bits) + (448 << mem) + 135 * 1024
    }

    /// Compress one message (`payload`), appending the compressed bytes to `out` without the
    /// 4-byte tail (RFC 7692 section 7.2.1). Without context takeover the message is
    /// compressed on its own. An empty payload on its own gives one byte, `0x00`.
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        if !self.takeover {
            // Once per message, before it: what earlier messages left in the window is not
            // referred to.
            self.c.reset();
        }
        let start = out.len();
        // Deflate never grows data by more than a few bytes per 16 KiB (stored blocks).
        let mut end = start;
        let mut pos = 0;
        let mut room = payload.len() + payload.len() / 1024 + 64;
        loop {
            out.resize(end + room, 0);
            let (in0, out0) = (self.c.total_in(), self.c.total_out());
            let r = self.c.compress(
                &payload[pos..],
                &mut out[end..],
                zlib_rs::DeflateFlush::SyncFlush,
            );
            pos += (self.c.total_in() - in0) as usize;
            end += (self.c.total_out() - out0) as usize;
            // Done once every byte is in and the flush left room unused (nothing more pending).
            if r.is_err() || (pos == payload.len() && end < out.len()) {
                break;
            }
            room = room.max(64) * 2;
        }
        out.truncate(end);
        if out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
    }
}

/// The shared profile's state for one loop: a compressor per window size asked for (made when
/// first needed; clients that offer no limit all share the 15-bit one), one decompressor, and
/// the buffer a message is compressed into before it is framed. No connection holds any of it:
/// every message is compressed and inflated on its own (no context takeover).
#[derive(Debug)]
pub struct SharedCodec {
    deflaters: [Option<Box<Deflater>>; 7],
    inflater: Option<Box<Inflater>>,
    scratch: Vec<u8>,
    threshold: usize,
    /// Messages compressed, the bytes compressed (the work done), and what they were
    /// compressed to (without the tails).
    sent: [u64; 3],
    /// The counts of connections' own decompressors ([`SharedCodec::absorb`]): messages,
    /// bytes taken and bytes inflated.
    absorbed: [u64; 3],
    /// Heap bytes held by connections' own state ([`Dedicated`]) on this loop.
    dedicated: usize,
    /// [`SharedCodec::heap_bytes`], kept up to date where it changes.
    heap: usize,
}

/// The dedicated profile's state for one connection: its own compressor and decompressor,
/// each keeping its window from one message to the next unless the agreement says not to.
#[derive(Debug)]
pub struct Dedicated {
    /// Compresses what the server sends.
    pub deflater: Deflater,
    /// Inflates what the client sends.
    pub inflater: Inflater,
    /// The heap bytes both hold ([`Dedicated::heap_bytes`]).
    pub bytes: usize,
}

impl Dedicated {
    /// The state for `agreement`, deflating with at most `window_bits` at `mem_level`.
    pub fn new(agreement: &Agreement, window_bits: u8, mem_level: u8) -> Self {
        let bits = agreement.deflate_window_bits().min(window_bits);
        Dedicated {
            deflater: Deflater::with(bits, mem_level, !agreement.server_no_context_takeover),
            inflater: Inflater::with_window(MAX_WINDOW_BITS, !agreement.client_no_context_takeover),
            bytes: Self::heap_bytes(agreement, window_bits, mem_level),
        }
    }

    /// Heap bytes one connection's state holds for `agreement`, `window_bits` and `mem_level`,
    /// as the memory budget and the compression budget count it.
    pub fn heap_bytes(agreement: &Agreement, window_bits: u8, mem_level: u8) -> usize {
        let bits = agreement.deflate_window_bits().min(window_bits);
        Deflater::heap_bytes_with(bits, mem_level) + Inflater::HEAP_BYTES
    }
}

/// What one compressed byte taken counts for in [`SharedCodec::work`], against one byte
/// inflated or compressed: decoding adversarial input (empty blocks, each with its own code
/// tables) costs about five times more per input byte than inflating ordinary text per output
/// byte; eight keeps a margin.
pub const INPUT_WEIGHT: u64 = 8;

/// The compression buffer is shrunk back to this after a large message passed through it.
const SCRATCH_KEEP: usize = 64 * 1024;

impl SharedCodec {
    /// Nothing allocated yet. Messages shorter than `threshold` bytes are not compressed.
    pub fn new(threshold: usize) -> Self {
        SharedCodec {
            deflaters: Default::default(),
            inflater: None,
            scratch: Vec::new(),
            threshold,
            sent: [0; 3],
            absorbed: [0; 3],
            dedicated: 0,
            heap: 0,
        }
    }

    /// Whether a message of `len` bytes is compressed (at least the threshold).
    #[inline]
    pub fn compressible(&self, len: usize) -> bool {
        len >= self.threshold
    }

    /// The decompressor (made on first use).
    pub fn inflater(&mut self) -> &mut Inflater {
        if self.inflater.is_none() {
            self.heap += Inflater::HEAP_BYTES;
        }
        self.inflater.get_or_insert_with(Box::default)
    }

    /// Compress `payload` on its own with a window of `bits` (9 to 15): the frame's payload,
    /// without the 4-byte tail, valid until the next call.
    pub fn compress(&mut self, bits: u8, payload: &[u8]) -> &[u8] {
        let bits = bits.clamp(MIN_DEFLATE_WINDOW_BITS, MAX_WINDOW_BITS);
        let slot = &mut self.deflaters[usize::from(bits - MIN_DEFLATE_WINDOW_BITS)];
        if slot.is_none() {
            self.heap += Deflater::heap_bytes(bits);
        }
        let deflater = slot.get_or_insert_with(|| Box::new(Deflater::new(bits)));
        Self::deflate_into(
            &mut self.scratch,
            &mut self.heap,
            &mut self.sent,
            deflater,
            payload,
        )
    }

    /// Compress `payload` with a connection's own compressor `deflater` (its context taken over
    /// or not): the frame's payload, without the 4-byte tail, valid until the next call. Counted
    /// with the loop's own.
    pub fn compress_with(&mut self, deflater: &mut Deflater, payload: &[u8]) -> &[u8] {
        Self::deflate_into(
            &mut self.scratch,
            &mut self.heap,
            &mut self.sent,
            deflater,
            payload,
        )
    }

    /// Compress `payload` with `deflater` into the buffer `scratch` (shrunk first if a large
    /// message grew it), counting it in `sent` and its capacity in `heap`.
    fn deflate_into<'s>(
        scratch: &'s mut Vec<u8>,
        heap: &mut usize,
        sent: &mut [u64; 3],
        deflater: &mut Deflater,
        payload: &[u8],
    ) -> &'s [u8] {
        *heap -= scratch.capacity();
        if scratch.capacity() > SCRATCH_KEEP {
            *scratch = Vec::new();
        }
        scratch.clear();
        deflater.compress(payload, scratch);
        sent[0] += 1;
        sent[1] += payload.len() as u64;
        sent[2] += scratch.len() as u64;
        *heap += scratch.capacity();
        scratch
    }

    /// Add what a connection's own decompressor counted since last time to the loop's counts
    /// (its counts start again from zero).
    pub fn absorb(&mut self, inflater: &mut Inflater) {
        let counts = [inflater.messages, inflater.taken, inflater.produced];
        for (sum, n) in self.absorbed.iter_mut().zip(counts) {
            *sum += n;
        }
        (inflater.messages, inflater.taken, inflater.produced) = (0, 0, 0);
    }

    /// A connection of this loop made its own state ([`Dedicated`], `bytes` of heap): counted
    /// in [`SharedCodec::heap_bytes`] until [`SharedCodec::forget_dedicated`].
    pub fn adopt_dedicated(&mut self, bytes: usize) {
        self.dedicated += bytes;
        self.heap += bytes;
    }

    /// Heap bytes held by this loop's connections' own state.
    pub fn dedicated_bytes(&self) -> usize {
        self.dedicated
    }

    /// A connection with its own state of `bytes` ended.
    pub fn forget_dedicated(&mut self, bytes: usize) {
        self.dedicated -= bytes;
        self.heap -= bytes;
    }

    /// Messages inflated and messages compressed so far.
    pub fn messages(&self) -> [u64; 2] {
        let inflated = self.inflater.as_ref().map_or(0, |i| i.messages);
        [inflated + self.absorbed[0], self.sent[0]]
    }

    /// Bytes so far: received compressed and what they inflated to; compressed to send and what
    /// they were compressed to (without the 4-byte tails), in that order. A publication is
    /// compressed once for all its subscribers, and counted once.
    pub fn bytes(&self) -> [u64; 4] {
        let (taken, produced) = self
            .inflater
            .as_ref()
            .map_or((0, 0), |i| (i.taken, i.produced));
        let [_, t, p] = self.absorbed;
        [taken + t, produced + p, self.sent[1], self.sent[2]]
    }

    /// The work done so far, in bytes: those inflated plus those compressed, plus
    /// [`INPUT_WEIGHT`] per compressed byte taken. All cost far more CPU per byte than framing
    /// (deflating at zlib's level 6, about a hundred times more), so the loop meters a
    /// connection's turn by it as well as by the bytes it reads. The input counts on its own
    /// because decoding it costs CPU whatever it inflates to: a stream of empty dynamic-Huffman
    /// blocks inflates to nothing at about 94 ns per byte of input (an attack review's
    /// measurement), against about 20 ns per byte inflated or compressed of ordinary text.
    #[inline]
    pub fn work(&self) -> u64 {
        let (taken, produced) = self
            .inflater
            .as_ref()
            .map_or((0, 0), |i| (i.taken, i.produced));
        let [_, t, p] = self.absorbed;
        self.sent[1] + p + produced + INPUT_WEIGHT * (t + taken)
    }

    /// Heap bytes held: each compressor and the decompressor made so far (zlib's figures, see
    /// [`Deflater::heap_bytes`], [`Inflater::HEAP_BYTES`]), the compression buffer, and the
    /// state of this loop's connections with their own ([`Dedicated`]).
    #[inline]
    pub fn heap_bytes(&self) -> usize {
        debug_assert_eq!(
            self.heap,
            self.deflaters
                .iter()
                .flatten()
                .map(|d| Deflater::heap_bytes(d.bits))
                .sum::<usize>()
                + self.inflater.as_ref().map_or(0, |_| Inflater::HEAP_BYTES)
                + self.scratch.capacity()
                + self.dedicated
        );
        self.heap
    }
}

#[cfg(test)]
#[path = "deflate_tests.rs"]
mod tests;
