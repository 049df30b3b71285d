//! `frame`: the frame header decoder against tungstenite's `FrameHeader::parse` and against the
//! RFC 6455 section 5.2 rules computed from the raw bytes; `apply_mask` against a naive loop for
//! every length, memory alignment and mask phase; `write_frame` and `encode` round trips.
//!
//! Input: the raw bytes are the frame (header, then payload); nothing is decoded from them
//! otherwise, so a seed is simply a frame as a client sends it.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::OpCode as TOp;
use tungstenite::protocol::frame::FrameHeader as THeader;
use wsloop::protocol::frame::{
    apply_mask, write_frame, FrameError, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};

/// The decoded input: the bytes as given.
pub struct Input<'a> {
    pub bytes: &'a [u8],
}

pub fn decode(data: &[u8]) -> Input<'_> {
    Input { bytes: data }
}

pub fn run(data: &[u8]) {
    check(&decode(data));
}

pub fn check(input: &Input<'_>) {
    let bytes = input.bytes;
    let parsed = FrameHeader::parse(bytes);
    check_against_rules(bytes, &parsed);
    check_against_tungstenite(bytes, &parsed);
    check_prefixes(bytes, &parsed);
    if let Ok(Some((h, n))) = parsed {
        check_encode(bytes, &h, n);
    }
    let (key, payload) = match parsed {
        Ok(Some((FrameHeader { mask: Some(k), .. }, n))) => (k, &bytes[n..]),
        _ => {
            let mut k = [0u8; 4];
            let head = &bytes[..bytes.len().min(4)];
            k[..head.len()].copy_from_slice(head);
            (k, bytes)
        }
    };
    check_mask(payload, key);
    check_write_frame(bytes);
}

/// Every outcome follows from the rules applied to the raw bytes, in the documented order.
fn check_against_rules(bytes: &[u8], parsed: &Result<Option<(FrameHeader, usize)>, FrameError>) {
    let Some(&b0) = bytes.first() else {
        assert_eq!(*parsed, Ok(None));
        return;
    };
    let (fin, op) = (b0 & 0x80 != 0, b0 & 0x0f);
    if matches!(op, 3..=7 | 11..=15) {
        assert_eq!(*parsed, Err(FrameError::ReservedOpcode(op)));
        return;
    }
    let control = op >= 8;
    if control && !fin {
        assert_eq!(*parsed, Err(FrameError::ControlFragmented));
        return;
    }
    let Some(&b1) = bytes.get(1) else {
        assert_eq!(*parsed, Ok(None));
        return;
    };
    let len7 = b1 & 0x7f;
    if control && len7 > 125 {
        assert_eq!(*parsed, Err(FrameError::ControlTooLong));
        return;
    }
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    if bytes.len() < 2 + ext {
        assert_eq!(*parsed, Ok(None));
        return;
    }
    let mut len = u64::from(len7);
    if ext > 0 {
        len = bytes[2..2 + ext]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    }
    if ext == 8 && len >> 63 != 0 {
        assert_eq!(*parsed, Err(FrameError::LengthMsbSet));
        return;
    }
    if (ext == 2 && len < 126) || (ext == 8 && len < 0x1_0000) {
        assert_eq!(*parsed, Err(FrameError::NonMinimalLength));
        return;
    }
    let masked = b1 & 0x80 != 0;
    let hlen = 2 + ext + if masked { 4 } else { 0 };
    if bytes.len() < hlen {
        assert_eq!(*parsed, Ok(None));
        return;
    }
    let mask = masked.then(|| bytes[2 + ext..hlen].try_into().unwrap());
    let want = FrameHeader {
        fin,
        rsv: (b0 >> 4) & 7,
        opcode: OpCode::from_u8(op).unwrap(),
        mask,
        payload_len: len,
    };
    assert_eq!(*parsed, Ok(Some((want, hlen))));
}

/// Differential against tungstenite (which checks only the opcode): where both accept, they
/// agree on every field and on the header length; wsloop never accepts what tungstenite refuses
/// and never asks for more bytes when tungstenite has a header.
fn check_against_tungstenite(
    bytes: &[u8],
    parsed: &Result<Option<(FrameHeader, usize)>, FrameError>,
) {
    let mut cursor = Cursor::new(bytes);
    let theirs = THeader::parse(&mut cursor);
    match (parsed, &theirs) {
        (Ok(Some((h, n))), Ok(Some((t, tlen)))) => {
            let op: u8 = t.opcode.into();
            let rsv = (u8::from(t.rsv1) << 2) | (u8::from(t.rsv2) << 1) | u8::from(t.rsv3);
            assert_eq!(h.opcode as u8, op);
            assert!(matches!(t.opcode, TOp::Data(_) | TOp::Control(_)));
            assert_eq!((h.fin, h.rsv, h.mask), (t.is_final, rsv, t.mask));
            assert_eq!(h.payload_len, *tlen);
            assert_eq!(*n as u64, cursor.position());
        }
        (Ok(Some(_)), other) => panic!("wsloop accepts, tungstenite says {other:?}"),
        (Ok(None), Ok(None)) => {}
        (Ok(None), other) => panic!("wsloop needs more bytes, tungstenite says {other:?}"),
        // The rules tungstenite does not check, or a reserved opcode that tungstenite reports
        // only once the whole header is there.
        (Err(e), Ok(Some(_))) => assert!(!matches!(e, FrameError::ReservedOpcode(_)), "{e:?}"),
        (Err(_), _) => {}
    }
}

/// A header is reported as incomplete for each of its proper prefixes, and an error is either
/// reported early (fail-fast) or preceded only by "incomplete".
fn check_prefixes(bytes: &[u8], parsed: &Result<Option<(FrameHeader, usize)>, FrameError>) {
    let upto = match parsed {
        Ok(Some((_, n))) => *n,
        _ => bytes.len().min(MAX_HEADER_LEN),
    };
    for i in 0..upto {
        let p = FrameHeader::parse(&bytes[..i]);
        match parsed {
            Ok(_) => assert_eq!(p, Ok(None), "prefix {i}"),
            Err(e) => assert!(p == Ok(None) || p == Err(*e), "prefix {i}: {p:?}"),
        }
    }
}

/// `encode` reproduces the accepted header bytes exactly (minimal encoding means one form).
fn check_encode(bytes: &[u8], h: &FrameHeader, n: usize) {
    assert_eq!(h.len(), n);
    let mut out = [0u8; MAX_HEADER_LEN];
    let m = h.encode(&mut out);
    assert_eq!(&out[..m], &bytes[..n]);
}

/// `apply_mask` equals the naive loop for every length up to 24 and around the 8-byte steps
/// (and the whole payload), every start alignment 0..8 in memory and every phase (plus large
/// offsets); applying it in two pieces with the running offset equals applying it at once;
/// applying it twice restores the input.
fn check_mask(payload: &[u8], key: [u8; 4]) {
    let naive = |buf: &mut [u8], offset: usize| {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[offset.wrapping_add(i) % 4];
        }
    };
    let n = payload.len();
    let mut lengths: Vec<usize> = (0..=24).chain([31, 32, 33, 63, 64, 65]).collect();
    lengths.extend([n / 2, n.saturating_sub(1), n]);
    lengths.retain(|&l| l <= n);
    let offsets = [0, 1, 2, 3, usize::MAX, n];
    let mut buf = vec![0u8; n + 8];
    let mut want = vec![0u8; n];
    for &len in &lengths {
        let data = &payload[..len];
        for &offset in &offsets {
            let want = &mut want[..len];
            want.copy_from_slice(data);
            naive(want, offset);
            for align in 0..8 {
                let got = &mut buf[align..align + len];
                got.copy_from_slice(data);
                apply_mask(got, key, offset);
                assert_eq!(got, &want[..], "len {len} align {align} offset {offset}");
                apply_mask(got, key, offset);
                assert_eq!(got, data, "involution: len {len} align {align}");
            }
        }
    }
    // In two pieces at every split point of a short payload, and at a few of a long one.
    let mut whole = payload.to_vec();
    apply_mask(&mut whole, key, 0);
    let splits: Vec<usize> = if n <= 24 {
        (0..=n).collect()
    } else {
        vec![1, 3, 7, 8, 9, n / 2, n - 1]
    };
    for split in splits {
        let mut pieces = payload.to_vec();
        let (a, b) = pieces.split_at_mut(split);
        apply_mask(a, key, 0);
        apply_mask(b, key, split);
        assert_eq!(pieces, whole, "split at {split}");
    }
}

/// Frames written by `write_frame` parse back, in wsloop and in tungstenite, to what was written.
fn check_write_frame(bytes: &[u8]) {
    let (b0, payload) = match bytes.split_first() {
        Some((&b, rest)) => (b, rest),
        None => (0x82, bytes),
    };
    let opcode = OpCode::from_u8(b0 & 0x0f).unwrap_or(OpCode::Binary);
    let (fin, payload) = if opcode.is_control() {
        (true, &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)])
    } else {
        (b0 & 0x80 != 0, payload)
    };
    let mut out = vec![0xEE; usize::from(b0 % 3)];
    let before = out.len();
    write_frame(&mut out, fin, opcode, payload);
    let frame = &out[before..];
    let (h, n) = FrameHeader::parse(frame).unwrap().unwrap();
    let want = FrameHeader {
        fin,
        rsv: 0,
        opcode,
        mask: None,
        payload_len: payload.len() as u64,
    };
    assert_eq!(h, want);
    assert_eq!(&frame[n..], payload);
    let frames = super::util::parse_server_frames(frame).unwrap();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].payload, payload);
}
