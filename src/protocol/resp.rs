//! The replies and messages a subscribed Redis connection sends (RESP2, and RESP3's push
//! arrays), parsed in place over one read buffer: the Redis bridge's subscriber reads its
//! socket in large reads and takes every frame of a read out of the same buffer, with no
//! allocation per frame.
//!
//! What a subscribed connection receives is small and regular: arrays (`*`, or `>` in RESP3)
//! of at most [`MAX_ELEMENTS`] bulk strings, integers or simple strings (`message`, the channel,
//! the payload; `subscribe`, the channel, the count), and simple strings and errors (`+OK` to
//! `AUTH`, `-MOVED ...`). Anything else (a nested array, a RESP3 map or double, a bulk string
//! at the top level, a length that is not a number) is [`Malformed`]: the bridge then drops the
//! connection and connects again.
//!
//! Memory is bounded whatever Redis sends. An array's last element (the payload of a message)
//! longer than the reader's `limit` is not kept: the frame is returned with
//! [`Elem::TooLarge`], and its bytes are dropped as they arrive. Any other element, and any
//! simple string or error, may be at most [`MAX_LINE`] bytes. So the reader never holds more
//! than [`Reader::max_buffered`] bytes, and its buffer never grows past that plus one read.

use std::fmt;

/// The most elements of an array (a pattern message, the longest, has four).
pub const MAX_ELEMENTS: usize = 4;
/// The longest line holding a simple string or an error (with its type byte and CRLF), and
/// the longest bulk string that is not an array's last element (a channel's name, a reply's
/// kind).
pub const MAX_LINE: usize = 4096;
/// The room the reader offers for each read, at least (its buffer starts at twice this).
pub const READ_CHUNK: usize = 64 * 1024;
/// The longest line holding a number: a type byte, a sign, 19 digits (any `i64`), CRLF.
const NUMBER_LINE: usize = 1 + 1 + 19 + 2;

/// An element of an array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem<'a> {
    /// A bulk string.
    Bulk(&'a [u8]),
    /// A null bulk string (`$-1`).
    Null,
    /// An integer.
    Int(i64),
    /// A simple string.
    Simple(&'a [u8]),
    /// The last element, a bulk string of this many bytes, over the reader's limit: not kept
    /// (its bytes are dropped as they arrive).
    TooLarge(u64),
}

/// A frame: one reply or message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// An array (`*`) or a RESP3 push (`>`, then `push` is true).
    Array {
        /// A RESP3 push (`>`), not an array.
        push: bool,
        /// The elements (the first `len`).
        items: [Elem<'a>; MAX_ELEMENTS],
        /// How many elements it has.
        len: usize,
    },
    /// A simple string (`+OK`).
    Simple(&'a [u8]),
    /// An error (`-ERR ...`), without its `-`.
    Error(&'a [u8]),
    /// An integer.
    Int(i64),
}

impl<'a> Frame<'a> {
    /// An array's (or push's) elements; none for any other frame.
    pub fn items(&self) -> &[Elem<'a>] {
        match self {
            Frame::Array { items, len, .. } => &items[..*len],
            _ => &[],
        }
    }
}

/// Not a frame a subscribed connection sends: the connection's stream cannot be trusted past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed reply from Redis: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// A read buffer and the frames in it (see the module docs). Read into [`Reader::spare`], say
/// how much with [`Reader::filled`], then take frames with [`Reader::next_frame`] until it returns
/// `Ok(None)` (the rest of the bytes are an incomplete frame, kept for the next read).
pub struct Reader {
    buf: Vec<u8>,
    /// The bytes not parsed yet: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes of a bulk string over the limit still to drop, and then its CRLF to check.
    skip: u64,
    crlf: bool,
    /// The longest last element kept.
    limit: usize,
}

impl Reader {
    /// A reader keeping arrays' last elements of at most `limit` bytes.
    pub fn new(limit: usize) -> Reader {
        Reader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            skip: 0,
            crlf: false,
            limit,
        }
    }

    /// The most bytes of an incomplete frame the reader holds with this `limit`.
    pub fn max_buffered(limit: usize) -> usize {
        let headers = NUMBER_LINE * (1 + MAX_ELEMENTS);
        headers + (MAX_ELEMENTS - 1) * (MAX_LINE + 2) + limit.max(MAX_LINE) + 2
    }

    /// Room for the next read: at least [`READ_CHUNK`] bytes. The bytes not parsed yet move to
    /// the front of the buffer first; it grows only while they and a read do not fit.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.buf.len() - self.end < READ_CHUNK && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < READ_CHUNK {
            self.buf
                .resize((self.end + READ_CHUNK).max(2 * READ_CHUNK), 0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`Reader::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The bytes held and not parsed yet.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The buffer's size.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if there is none yet, or why the stream is not one.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, Malformed> {
        if self.skip > 0 {
            let n = self.skip.min((self.end - self.start) as u64);
            self.start += n as usize;
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        if self.crlf {
            match self.buf[self.start..self.end] {
                [b'\r', b'\n', ..] => {
                    self.start += 2;
                    self.crlf = false;
                }
                [] | [b'\r'] => return Ok(None),
                _ => return Err(Malformed("a bulk string longer than its length")),
            }
        }
        let data = &self.buf[self.start..self.end];
        let Some((frame, used, skip)) = parse(data, self.limit)? else {
            if data.len() > Reader::max_buffered(self.limit) {
                return Err(Malformed("a frame over the reader's bound"));
            }
            return Ok(None);
        };
        self.start += used;
        if skip > 0 {
            self.skip = skip;
            self.crlf = true;
        }
        Ok(Some(frame))
    }
}

/// A frame at the start of `data`: the frame, the bytes it took, and the bytes of an oversized
/// last element still to drop after them; `None` if `data` holds only part of one.
type Parsed<'a> = Option<(Frame<'a>, usize, u64)>;

fn parse(data: &[u8], limit: usize) -> Result<Parsed<'_>, Malformed> {
    let Some((&kind, _)) = data.split_first() else {
        return Ok(None);
    };
    let max = match kind {
        b'+' | b'-' => MAX_LINE,
        b':' | b'*' | b'>' => NUMBER_LINE,
        _ => return Err(Malformed("not a reply a subscribed connection gets")),
    };
    let Some((head, mut at)) = line(data, 0, max)? else {
        return Ok(None);
    };
    let push = match kind {
        b'+' => return Ok(Some((Frame::Simple(head), at, 0))),
        b'-' => return Ok(Some((Frame::Error(head), at, 0))),
        b':' => return Ok(Some((Frame::Int(number(head)?), at, 0))),
        b'*' => false,
        b'>' => true,
        _ => return Err(Malformed("not a reply a subscribed connection gets")),
    };
    let len = usize::try_from(number(head)?)
        .ok()
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or(Malformed("an array of too many elements, or a null one"))?;
    let mut items = [Elem::Null; MAX_ELEMENTS];
    let mut skip = 0;
    for (i, item) in items.iter_mut().enumerate().take(len) {
        let last = i + 1 == len;
        let Some(&kind) = data.get(at) else {
            return Ok(None);
        };
        let max = match kind {
            b'+' => MAX_LINE,
            b':' | b'$' => NUMBER_LINE,
            _ => {
                return Err(Malformed(
                    "an element of a type a subscribed connection never gets",
                ))
            }
        };
        let Some((text, next)) = line(data, at, max)? else {
            return Ok(None);
        };
        at = next;
        *item = match kind {
            b'+' => Elem::Simple(text),
            b':' => Elem::Int(number(text)?),
            b'$' => match number(text)? {
                -1 => Elem::Null,
                n if n < 0 => return Err(Malformed("a negative length")),
                n if n as u64 > (if last { limit } else { MAX_LINE }) as u64 => {
                    if !last {
                        return Err(Malformed("a long bulk string before the last element"));
                    }
                    // Its bytes are dropped as they come (the last element: the frame ends).
                    skip = n as u64;
                    Elem::TooLarge(skip)
                }
                n => {
                    let n = n as usize;
                    if data.len() < at + n + 2 {
                        return Ok(None);
                    }
                    if &data[at + n..at + n + 2] != b"\r\n" {
                        return Err(Malformed("a bulk string longer than its length"));
                    }
                    let bulk = &data[at..at + n];
                    at += n + 2;
                    Elem::Bulk(bulk)
                }
            },
            _ => {
                return Err(Malformed(
                    "an element of a type a subscribed connection never gets",
                ))
            }
        };
    }
    Ok(Some((Frame::Array { push, items, len }, at, skip)))
}

/// The line starting at `data[at]` after its type byte, ending with CRLF, at most `max` bytes
/// with both: its bytes and where the next begins; `None` if not all of it is there yet.
fn line(data: &[u8], at: usize, max: usize) -> Result<Option<(&[u8], usize)>, Malformed> {
    let window = &data[at..data.len().min(at + max)];
    match window.iter().position(|&b| b == b'\n') {
        Some(nl) if nl >= 2 && window[nl - 1] == b'\r' => {
            Ok(Some((&window[1..nl - 1], at + nl + 1)))
        }
        Some(_) => Err(Malformed("a line feed without its carriage return")),
        None if window.len() < max => Ok(None),
        None => Err(Malformed("a line too long")),
    }
}

/// A decimal `i64`: an optional minus, then 1 to 19 digits.
fn number(line: &[u8]) -> Result<i64, Malformed> {
    let bad = Malformed("not a number");
    let (negative, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(bad);
    }
    // Accumulated with its sign, so that `i64::MIN` is a number too.
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(bad);
        }
        let d = i64::from(d - b'0');
        n = n
            .checked_mul(10)
            .and_then(|n| match negative {
                true => n.checked_sub(d),
                false => n.checked_add(d),
            })
            .ok_or(bad)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame in `bytes`, fed to a reader `step` bytes at a time: the frames (as owned
    /// debug text) and the error that ended it, if any.
    fn feed(bytes: &[u8], limit: usize, step: usize) -> (Vec<String>, Option<Malformed>) {
        let mut r = Reader::new(limit);
        let mut out = Vec::new();
        for chunk in bytes.chunks(step.max(1)) {
            let room = r.spare();
            room[..chunk.len()].copy_from_slice(chunk);
            r.filled(chunk.len());
            loop {
                match r.next_frame() {
                    Ok(Some(f)) => out.push(format!("{f:?}")),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
            assert!(r.buffered() <= Reader::max_buffered(limit) + step);
        }
        (out, None)
    }

    fn message(chan: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut m = format!("*3\r\n$7\r\nmessage\r\n${}\r\n", chan.len()).into_bytes();
        m.extend_from_slice(chan);
        m.extend_from_slice(format!("\r\n${}\r\n", payload.len()).as_bytes());
        m.extend_from_slice(payload);
        m.extend_from_slice(b"\r\n");
        m
    }

    /// An array frame's debug text.
    fn array(push: bool, elems: &[Elem<'_>]) -> String {
        let mut items = [Elem::Null; MAX_ELEMENTS];
        items[..elems.len()].copy_from_slice(elems);
        let len = elems.len();
        format!("{:?}", Frame::Array { push, items, len })
    }

    #[test]
    fn messages_replies_and_pushes_parse_in_place_in_one_read_or_byte_by_byte() {
        let mut s = message(b"wsloop:/a", b"hello\r\nworld");
        s.extend_from_slice(b"*3\r\n$9\r\nsubscribe\r\n$9\r\nwsloop:/b\r\n:2\r\n");
        s.extend_from_slice(b"+OK\r\n-ERR no\r\n:-42\r\n");
        s.extend_from_slice(b">3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$0\r\n\r\n");
        s.extend_from_slice(b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n*0\r\n");
        let want = vec![
            array(
                false,
                &[
                    Elem::Bulk(b"message"),
                    Elem::Bulk(b"wsloop:/a"),
                    Elem::Bulk(b"hello\r\nworld"),
                ],
            ),
            array(
                false,
                &[
                    Elem::Bulk(b"subscribe"),
                    Elem::Bulk(b"wsloop:/b"),
                    Elem::Int(2),
                ],
            ),
            format!("{:?}", Frame::Simple(b"OK")),
            format!("{:?}", Frame::Error(b"ERR no")),
            format!("{:?}", Frame::Int(-42)),
            array(
                true,
                &[Elem::Bulk(b"smessage"), Elem::Bulk(b"c"), Elem::Bulk(b"")],
            ),
            array(
                false,
                &[Elem::Bulk(b"unsubscribe"), Elem::Null, Elem::Int(0)],
            ),
            array(false, &[]),
        ];
        for step in [1, 2, 3, 7, 64, s.len()] {
            assert_eq!(feed(&s, 64, step), (want.clone(), None), "step {step}");
        }
        let mut r = Reader::new(64);
        r.spare()[..s.len()].copy_from_slice(&s);
        r.filled(s.len());
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(f.items().len(), 3);
        assert_eq!(f.items()[2], Elem::Bulk(b"hello\r\nworld"));
        assert!(Frame::Int(1).items().is_empty());
    }

    #[test]
    fn a_payload_over_the_limit_is_dropped_as_it_arrives_and_the_next_frame_read() {
        let limit = 100;
        let big = vec![b'x'; 1_000_000];
        let mut s = message(b"ch", &big);
        s.extend(message(b"ch", b"after"));
        let at_limit = vec![b'y'; limit];
        s.extend(message(b"ch", &at_limit));
        let too_large = array(
            false,
            &[
                Elem::Bulk(b"message"),
                Elem::Bulk(b"ch"),
                Elem::TooLarge(1_000_000),
            ],
        );
        for step in [1, 5, 4096, READ_CHUNK, s.len()] {
            let mut r = Reader::new(limit);
            let mut frames = Vec::new();
            let mut rest = &s[..];
            while !rest.is_empty() {
                // A read never takes more than the room offered.
                let room = r.spare();
                assert!(room.len() >= READ_CHUNK);
                let n = step.min(room.len()).min(rest.len());
                room[..n].copy_from_slice(&rest[..n]);
                r.filled(n);
                rest = &rest[n..];
                while let Some(f) = r.next_frame().unwrap() {
                    frames.push(format!("{f:?}"));
                }
                assert!(r.buffered() <= Reader::max_buffered(limit));
            }
            assert_eq!(frames.len(), 3, "step {step}");
            assert_eq!(frames[0], too_large);
            assert!(
                frames[1].contains("[97, 102, 116, 101, 114]"),
                "{}",
                frames[1]
            );
            assert!(frames[2].contains("Bulk([121, 121"), "{}", frames[2]);
            // The buffer never held the big payload: one read's room and a frame at most.
            assert!(
                r.capacity() <= 2 * READ_CHUNK,
                "step {step}: {}",
                r.capacity()
            );
        }
    }

    #[test]
    fn what_a_subscribed_connection_never_sends_is_malformed_never_a_panic() {
        let long_line = format!("+{}\r\n", "a".repeat(MAX_LINE));
        let long_chan = message(&vec![b'c'; MAX_LINE + 1], b"x");
        let cases: &[(&[u8], &str)] = &[
            (b"$5\r\nhello\r\n", "not a reply"),
            (b"%1\r\n", "not a reply"),
            (b"*5\r\n", "too many"),
            (b"*-1\r\n", "null one"),
            (b"*1\r\n*1\r\n:1\r\n", "of a type"),
            (b"*1\r\n-ERR\r\n", "of a type"),
            (b"*1\r\n$-2\r\n", "negative"),
            (b"*1\r\n$3\r\nabcd\r\n", "longer than its length"),
            (b"*1\r\n$x\r\n", "not a number"),
            (b"*1\r\n$\r\n", "not a number"),
            (b":99999999999999999999\r\n", "not a number"),
            (b":9223372036854775808\r\n", "not a number"),
            (b":1\n", "line feed"),
            (b"*100000000000000000000000\r\n", "too long"),
            (long_line.as_bytes(), "too long"),
            (&long_chan, "before the last"),
        ];
        for (bytes, why) in cases {
            for step in [1, bytes.len()] {
                let (frames, err) = feed(bytes, 4, step);
                assert!(frames.is_empty(), "{bytes:?}");
                let err = err.unwrap_or_else(|| panic!("{:?} accepted", bytes.escape_ascii()));
                assert!(err.0.contains(why), "{}: {err}", bytes.escape_ascii());
            }
        }
        // An oversized payload not followed by CRLF.
        let mut s = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$10\r\n0123456789".to_vec();
        s.extend_from_slice(b"xx");
        let (frames, err) = feed(&s, 4, 3);
        assert_eq!(frames.len(), 1);
        assert_eq!(err, Some(Malformed("a bulk string longer than its length")));
        // i64's extremes are numbers.
        assert_eq!(number(b"9223372036854775807"), Ok(i64::MAX));
        assert_eq!(number(b"-9223372036854775807"), Ok(-i64::MAX));
        assert_eq!(number(b"-9223372036854775808"), Ok(i64::MIN));
        assert!(number(b"-9223372036854775809").is_err());
        assert!(number(b"-").is_err());
    }

    #[test]
    fn an_incomplete_frame_waits_for_more_and_compaction_keeps_it() {
        let mut r = Reader::new(16);
        let first = message(b"a", b"1");
        let second = message(b"bb", b"22");
        let room = r.spare().len();
        // Fill the buffer to within a few bytes of its end, then split a frame across reads.
        let filler = message(b"f", &[]);
        let mut s = Vec::new();
        let mut frames = 2;
        while s.len() + filler.len() < room - 10 {
            s.extend_from_slice(&filler);
            frames += 1;
        }
        s.extend_from_slice(&first);
        s.extend_from_slice(&second);
        let split = room - 3;
        r.spare()[..split].copy_from_slice(&s[..split]);
        r.filled(split);
        let mut n = 0;
        while r.next_frame().unwrap().is_some() {
            n += 1;
        }
        assert!(r.buffered() > 0 && r.buffered() < first.len() + second.len());
        assert_eq!(r.next_frame(), Ok(None));
        let rest = &s[split..];
        r.spare()[..rest.len()].copy_from_slice(rest);
        r.filled(rest.len());
        let mut last = String::new();
        while let Some(f) = r.next_frame().unwrap() {
            last = format!("{:?}", f.items()[2]);
            n += 1;
        }
        assert_eq!(n, frames);
        assert_eq!(last, format!("{:?}", Elem::Bulk(b"22")));
        assert_eq!(r.buffered(), 0);
        assert_eq!(r.capacity(), room, "moved to the front, not grown");
    }
}
