//! `resp`: the parser of what a subscribed Redis connection sends (`wsloop::protocol::resp`),
//! which the Redis bridge's subscriber runs over everything Redis (or whatever answers in its
//! place) writes to it.
//!
//! Input: `[flags, limit, n]`, then `n % 16` chunk sizes (two bytes each), then the body. flags
//! bit 0: the body is raw bytes (any stream at all); else it is a list of frames to encode,
//! each `[selector, ...]` (see [`frames`]), encoded by code written here, independently of the
//! parser. `limit` (0 ... 255) is the reader's limit for an array's last element.
//!
//! Properties:
//! - Nothing panics; every read is given at most the room offered; the bytes held never pass
//!   `Reader::max_buffered(limit)` (plus the read just given) and the buffer never grows past
//!   that plus two reads' room.
//! - The cut into reads changes nothing: the frames (and the error that ends the stream, if
//!   any) are the same whether the bytes come in one read or in the chunks.
//! - Encoded frames parse back to exactly what was encoded, an array's last bulk string over
//!   the limit as `TooLarge(its length)`, and the stream then goes on with the next frame; a
//!   bulk string over `MAX_LINE` before an array's last element is `Malformed` and nothing after
//!   it is returned.

use super::util::Reader as Input;
use wsloop::protocol::resp::{Elem, Frame, Malformed, Reader, MAX_ELEMENTS, MAX_LINE, READ_CHUNK};

/// A frame as owned data, to compare frames across readers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owned {
    Array(bool, Vec<Item>),
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Item {
    Bulk(Vec<u8>),
    Null,
    Int(i64),
    Simple(Vec<u8>),
    TooLarge(u64),
}

fn owned(f: &Frame<'_>) -> Owned {
    match f {
        Frame::Array { push, .. } => Owned::Array(
            *push,
            f.items()
                .iter()
                .map(|e| match e {
                    Elem::Bulk(b) => Item::Bulk(b.to_vec()),
                    Elem::Null => Item::Null,
                    Elem::Int(n) => Item::Int(*n),
                    Elem::Simple(s) => Item::Simple(s.to_vec()),
                    Elem::TooLarge(n) => Item::TooLarge(*n),
                })
                .collect(),
        ),
        Frame::Simple(s) => Owned::Simple(s.to_vec()),
        Frame::Error(e) => Owned::Error(e.to_vec()),
        Frame::Int(n) => Owned::Int(*n),
    }
}

/// Feed `bytes` in reads of the sizes in `cuts` (cycled; 0 means as much as there is room
/// for): the frames, and the error that ended the stream.
fn feed(bytes: &[u8], limit: usize, cuts: &[usize]) -> (Vec<Owned>, Option<Malformed>) {
    let mut r = Reader::new(limit);
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let room = r.spare();
        assert!(room.len() >= READ_CHUNK, "room for a read: {}", room.len());
        let want = cuts.get(i % cuts.len().max(1)).copied().unwrap_or(0);
        i += 1;
        let n = match want {
            0 => room.len(),
            w => w.min(room.len()),
        }
        .min(rest.len());
        room[..n].copy_from_slice(&rest[..n]);
        r.filled(n);
        rest = &rest[n..];
        loop {
            match r.next_frame() {
                Ok(Some(f)) => out.push(owned(&f)),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        assert!(
            r.buffered() <= Reader::max_buffered(limit),
            "{} bytes held, bound {}",
            r.buffered(),
            Reader::max_buffered(limit)
        );
        assert!(
            r.capacity() <= Reader::max_buffered(limit) + 2 * READ_CHUNK,
            "buffer of {} bytes",
            r.capacity()
        );
    }
    (out, None)
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let limit = input.u8() as usize;
    let n = input.u8() as usize % 16;
    let cuts: Vec<usize> = (0..n).map(|_| input.u16() as usize).collect();
    let (bytes, expected) = match flags & 1 {
        1 => (input.rest().to_vec(), None),
        _ => {
            let (bytes, frames, fails) = frames(&mut input, limit);
            (bytes, Some((frames, fails)))
        }
    };
    let whole = feed(&bytes, limit, &[]);
    let cut = feed(&bytes, limit, &cuts);
    assert_eq!(whole, cut, "the cut into reads changed the frames");
    let one_by_one = feed(&bytes[..bytes.len().min(4096)], limit, &[1]);
    let prefix = feed(&bytes[..bytes.len().min(4096)], limit, &[]);
    assert_eq!(one_by_one, prefix, "byte by byte");
    if let Some((frames, fails)) = expected {
        assert_eq!(whole.0, frames, "encoded frames did not parse back");
        assert_eq!(whole.1.is_some(), fails, "{:?}", whole.1);
    }
}

/// Frames encoded from the input, each `[selector, ...]`: selector % 8 picks a simple string,
/// an error, an integer, or an array (or, bit 3, a RESP3 push) of 0 to 4 elements whose kinds
/// come from the next byte (two bits each: bulk, null, integer, simple string) and whose bulk
/// lengths from a byte each (`4 * byte`: some over the limit; or, for the first element of
/// selector 7, `MAX_LINE + 1`, which must fail). Returns the bytes, the frames expected, and
/// whether the stream must end in `Malformed`.
fn frames(input: &mut Input<'_>, limit: usize) -> (Vec<u8>, Vec<Owned>, bool) {
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    while !input.is_empty() {
        let sel = input.u8();
        match sel % 8 {
            0 => want.push(Owned::Simple(line(input, b'+', &mut bytes))),
            1 => want.push(Owned::Error(line(input, b'-', &mut bytes))),
            2 => {
                let n = input.u64() as i64;
                bytes.extend_from_slice(format!(":{n}\r\n").as_bytes());
                want.push(Owned::Int(n));
            }
            _ => {
                let push = sel & 8 != 0;
                let len = (sel as usize >> 4) % (MAX_ELEMENTS + 1);
                let kinds = input.u8();
                bytes.extend_from_slice(
                    format!("{}{len}\r\n", if push { '>' } else { '*' }).as_bytes(),
                );
                let mut items = Vec::new();
                for i in 0..len {
                    let last = i + 1 == len;
                    match (kinds >> (2 * i)) & 3 {
                        0 => {
                            let n = match (sel % 8 == 7, i) {
                                (true, 0) if !last => MAX_LINE + 1,
                                _ => 4 * input.u8() as usize,
                            };
                            bytes.extend_from_slice(format!("${n}\r\n").as_bytes());
                            let body: Vec<u8> = (0..n).map(|k| (k * 7 + i) as u8).collect();
                            bytes.extend_from_slice(&body);
                            bytes.extend_from_slice(b"\r\n");
                            if !last && n > MAX_LINE {
                                // Malformed: nothing from here on is returned.
                                return (bytes, want, true);
                            }
                            items.push(match last && n > limit {
                                true => Item::TooLarge(n as u64),
                                false => Item::Bulk(body),
                            });
                        }
                        1 => {
                            bytes.extend_from_slice(b"$-1\r\n");
                            items.push(Item::Null);
                        }
                        2 => {
                            let n = i64::from(input.u16() as i16);
                            bytes.extend_from_slice(format!(":{n}\r\n").as_bytes());
                            items.push(Item::Int(n));
                        }
                        _ => items.push(Item::Simple(line(input, b'+', &mut bytes))),
                    }
                }
                want.push(Owned::Array(push, items));
            }
        }
    }
    (bytes, want, false)
}

/// A simple string or error (`kind`) from the input, up to 31 bytes without CR or LF, encoded
/// into `bytes`: its text.
fn line(input: &mut Input<'_>, kind: u8, bytes: &mut Vec<u8>) -> Vec<u8> {
    let n = input.u8() as usize % 32;
    let text: Vec<u8> = input
        .bytes(n)
        .iter()
        .map(|&b| if b == b'\r' || b == b'\n' { b'.' } else { b })
        .collect();
    bytes.push(kind);
    bytes.extend_from_slice(&text);
    bytes.extend_from_slice(b"\r\n");
    text
}
