//! RFC 6455 section 5 frame codec: header parsing and encoding, payload masking.
//!
//! Sans-IO and allocation-free (except [`write_frame`], which appends to a caller's `Vec`).
//! [`FrameHeader::parse`] enforces every rule that the header bytes alone decide (opcode,
//! minimal length encoding, control-frame limits); the rules that depend on the connection
//! (RSV bits vs. negotiated extensions, masked vs. unmasked for the peer's role, continuation
//! sequencing, message size limits) are left to the caller.

use std::fmt;

/// Frame opcode (RFC 6455 section 5.2). The reserved values 3-7 and 11-15 have no variant:
/// [`OpCode::from_u8`] returns `None` for them and [`FrameHeader::parse`] rejects them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    /// `0x0`: a continuation frame of a fragmented data message.
    Continuation = 0,
    /// `0x1`: first frame of a text message (payload must be UTF-8 once complete).
    Text = 1,
    /// `0x2`: first frame of a binary message.
    Binary = 2,
    /// `0x8`: connection close (control).
    Close = 8,
    /// `0x9`: ping (control).
    Ping = 9,
    /// `0xA`: pong (control).
    Pong = 10,
}

impl OpCode {
    /// The opcode for the low nibble value `v`, or `None` if `v` is reserved or above 15.
    #[inline]
    pub fn from_u8(v: u8) -> Option<OpCode> {
        match v {
            0 => Some(OpCode::Continuation),
            1 => Some(OpCode::Text),
            2 => Some(OpCode::Binary),
            8 => Some(OpCode::Close),
            9 => Some(OpCode::Ping),
            10 => Some(OpCode::Pong),
            _ => None,
        }
    }

    /// True for Close, Ping and Pong (opcode MSB set): payload at most
    /// [`MAX_CONTROL_PAYLOAD`] bytes, never fragmented, allowed between data fragments.
    #[inline]
    pub fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }

    /// True for Continuation, Text and Binary (opcode MSB clear). Exactly `!is_control()`.
    #[inline]
    pub fn is_data(self) -> bool {
        !self.is_control()
    }
}

/// Longest possible encoded header: 2 + 8 (64-bit length) + 4 (masking key).
pub const MAX_HEADER_LEN: usize = 14;

/// Largest payload a control frame may carry (RFC 6455 section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN: this is the final fragment of a message.
    pub fin: bool,
    /// The three RSV bits as a value in `0..=7`: RSV1 = `0b100`, RSV2 = `0b010`, RSV3 = `0b001`.
    /// [`encode`](FrameHeader::encode) uses only the low three bits.
    pub rsv: u8,
    /// The frame's opcode.
    pub opcode: OpCode,
    /// The masking key, present iff the MASK bit is set (client-to-server frames).
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes. Always below 2^63 when produced by [`parse`](FrameHeader::parse).
    pub payload_len: u64,
}

/// A header that violates RFC 6455 section 5. Every variant calls for closing the connection
/// with status 1002 (protocol error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Opcode 3-7 or 11-15 (the value is carried).
    ReservedOpcode(u8),
    /// A 16-bit length below 126 or a 64-bit length below 65536 (section 5.2 demands the
    /// minimal number of bytes).
    NonMinimalLength,
    /// A 64-bit length with its most significant bit set.
    LengthMsbSet,
    /// A control frame announcing more than 125 payload bytes.
    ControlTooLong,
    /// A control frame without FIN.
    ControlFragmented,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            FrameError::NonMinimalLength => f.write_str("payload length not minimally encoded"),
            FrameError::LengthMsbSet => f.write_str("64-bit payload length has its MSB set"),
            FrameError::ControlTooLong => f.write_str("control frame payload longer than 125"),
            FrameError::ControlFragmented => f.write_str("fragmented control frame"),
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameHeader {
    /// Parse the header at the start of `buf` (bytes after the header are ignored).
    ///
    /// * `Ok(None)`: `buf` is too short to hold the whole header; retry with more bytes. Never
    ///   an error for a prefix of a valid header.
    /// * `Ok(Some((header, header_len)))`: the payload starts at `buf[header_len]`;
    ///   `header_len == header.len()`.
    /// * `Err(_)`: reserved opcode (3-7, 11-15); non-minimal 16-bit (< 126) or 64-bit
    ///   (< 65536) length; 64-bit length with the MSB set; control frame with a payload above
    ///   125 (including the 7-bit values 126 and 127) or without FIN. Errors decided by the
    ///   first two bytes are reported as soon as those bytes are present (fail-fast), length
    ///   errors once the extended length is complete. Checked in that order.
    ///
    /// RSV bits and masked/unmasked policy are *not* checked: the caller knows the negotiated
    /// extensions and its role. Constant time, no loops, no panics, no allocation.
    #[inline]
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
        let Some(&b0) = buf.first() else {
            return Ok(None);
        };
        let fin = b0 & 0x80 != 0;
        let Some(opcode) = OpCode::from_u8(b0 & 0x0F) else {
            return Err(FrameError::ReservedOpcode(b0 & 0x0F));
        };
        let control = opcode.is_control();
        if control && !fin {
            return Err(FrameError::ControlFragmented);
        }
        let Some(&b1) = buf.get(1) else {
            return Ok(None);
        };
        let len7 = b1 & 0x7F;
        if control && len7 > MAX_CONTROL_PAYLOAD as u8 {
            return Err(FrameError::ControlTooLong);
        }
        let (payload_len, mut header_len) = match len7 {
            126 => {
                let Some(ext) = bytes_at::<2>(buf, 2) else {
                    return Ok(None);
                };
                let len = u16::from_be_bytes(*ext);
                if len < 126 {
                    return Err(FrameError::NonMinimalLength);
                }
                (u64::from(len), 4)
            }
            127 => {
                let Some(ext) = bytes_at::<8>(buf, 2) else {
                    return Ok(None);
                };
                let len = u64::from_be_bytes(*ext);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthMsbSet);
                }
                if len < 0x1_0000 {
                    return Err(FrameError::NonMinimalLength);
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if b1 & 0x80 != 0 {
            let Some(key) = bytes_at::<4>(buf, header_len) else {
                return Ok(None);
            };
            header_len += 4;
            Some(*key)
        } else {
            None
        };
        let header = FrameHeader {
            fin,
            rsv: (b0 >> 4) & 0x7,
            opcode,
            mask,
            payload_len,
        };
        Ok(Some((header, header_len)))
    }

    /// Encoded length of this header: 2, 4 (16-bit length) or 10 (64-bit length) bytes,
    /// plus 4 with a masking key. Always equals what [`encode`](FrameHeader::encode) writes.
    #[inline]
    #[allow(clippy::len_without_is_empty)] // a header is never empty
    pub fn len(&self) -> usize {
        let base = match self.payload_len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        base + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Write the header to `out` with the minimal length encoding; returns the number of bytes
    /// written (`self.len()`). Only the low three bits of `rsv` are used. No validation: the
    /// caller keeps `payload_len < 2^63` and control frames final with at most 125 bytes
    /// (`parse` rejects anything else).
    #[inline]
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        out[0] = (u8::from(self.fin) << 7) | ((self.rsv & 0x7) << 4) | self.opcode as u8;
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.payload_len;
        let mut n = if len < 126 {
            out[1] = mask_bit | len as u8;
            2
        } else if len <= 0xFFFF {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        } else {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&len.to_be_bytes());
            10
        };
        if let Some(key) = self.mask {
            out[n..n + 4].copy_from_slice(&key);
            n += 4;
        }
        n
    }
}

/// The `N` bytes at `buf[at..]`, if present (no panic path, unlike slicing).
#[inline(always)]
fn bytes_at<const N: usize>(buf: &[u8], at: usize) -> Option<&[u8; N]> {
    buf.get(at..)?.first_chunk()
}

/// Append one complete unmasked (server-to-client) frame to `out`: header (RSV bits clear,
/// minimal length encoding) followed by `payload`. Reserves the exact space once.
///
/// Contract: a control `opcode` needs `fin` and at most [`MAX_CONTROL_PAYLOAD`] bytes
/// (checked by `debug_assert!` only; the peer would reject such a frame).
pub fn write_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8]) {
    debug_assert!(
        !opcode.is_control() || (fin && payload.len() <= MAX_CONTROL_PAYLOAD),
        "invalid control frame"
    );
    write_frame_rsv(out, fin, 0, opcode, payload);
}

/// Append one complete unmasked data message compressed with permessage-deflate (RFC 7692): a
/// final frame with RSV1 set, its payload `compressed` (without the 4-byte tail).
pub fn write_compressed_frame(out: &mut Vec<u8>, opcode: OpCode, compressed: &[u8]) {
    debug_assert!(!opcode.is_control(), "control frames are never compressed");
    write_frame_rsv(out, true, 0b100, opcode, compressed);
}

fn write_frame_rsv(out: &mut Vec<u8>, fin: bool, rsv: u8, opcode: OpCode, payload: &[u8]) {
    let header = FrameHeader {
        fin,
        rsv,
        opcode,
        mask: None,
        payload_len: payload.len() as u64,
    };
    let mut head = [0u8; MAX_HEADER_LEN];
    let n = header.encode(&mut head);
    out.reserve(n + payload.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
}

/// XOR `buf` in place with the masking `key` (RFC 6455 section 5.3), where `buf[0]` is byte
/// `offset` of the frame's payload. A payload may thus be (un)masked in pieces as it arrives by
/// passing the running offset; only `offset % 4` matters. Applying it twice restores the input.
///
/// Processes 8 bytes per step with the key widened to a `u64` (the compiler vectorizes the
/// loop); only the last `buf.len() % 8` bytes are handled one at a time.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let r = offset % 4;
    let key = [key[r], key[(r + 1) % 4], key[(r + 2) % 4], key[(r + 3) % 4]];
    // The key repeated in memory order, so byte order does not matter.
    let wide = u64::from(u32::from_ne_bytes(key)) * 0x1_0000_0001;
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        #[allow(clippy::expect_used)] // chunks_exact_mut(8) yields 8 bytes at a time
        let chunk: &mut [u8; 8] = chunk.try_into().expect("chunk of 8");
        *chunk = (u64::from_ne_bytes(*chunk) ^ wide).to_ne_bytes();
    }
    // Chunks are whole multiples of 4, so the remainder starts at key[0].
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::FrameError::*;
    use super::OpCode::*;
    use super::*;

    const RESERVED: [u8; 10] = [3, 4, 5, 6, 7, 11, 12, 13, 14, 15];
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn parse(bytes: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
        FrameHeader::parse(bytes)
    }

    fn hdr(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload_len: u64) -> FrameHeader {
        let rsv = 0;
        FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            payload_len,
        }
    }

    fn encoded(h: &FrameHeader) -> Vec<u8> {
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = h.encode(&mut out);
        out[..n].to_vec()
    }

    /// `b0`, then the 64-bit length form with `len`.
    fn len64(b0: u8, len: u64) -> Vec<u8> {
        [&[b0, 0x7F][..], &len.to_be_bytes()].concat()
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

    fn naive_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[(offset + i) % 4];
        }
    }

    /// Parse a whole frame, unmask it, and check that encode/write_frame reproduce the bytes.
    fn check_rfc(bytes: &[u8], want: FrameHeader, payload: &[u8]) {
        let (h, n) = parse(bytes).unwrap().unwrap();
        assert_eq!((h, n), (want, h.len()));
        let mut body = bytes[n..].to_vec();
        if let Some(key) = h.mask {
            apply_mask(&mut body, key, 0);
        }
        assert_eq!(body, payload);
        assert_eq!(encoded(&h), &bytes[..n]);
        if h.mask.is_none() {
            let mut out = vec![0xAA];
            write_frame(&mut out, h.fin, h.opcode, payload);
            assert_eq!(&out[1..], bytes);
        }
    }

    #[test]
    fn opcode_values_and_classes() {
        for v in 0..=255u8 {
            match OpCode::from_u8(v) {
                Some(op) => {
                    assert_eq!(op as u8, v);
                    assert_eq!((op.is_control(), op.is_data()), (v >= 8, v < 8));
                }
                None => assert!(RESERVED.contains(&v) || v > 15, "{v}"),
            }
        }
    }

    #[test]
    fn rfc_single_frame_unmasked_hello() {
        let bytes = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        check_rfc(&bytes, hdr(true, Text, None, 5), b"Hello");
    }

    #[test]
    fn rfc_single_frame_masked_hello() {
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        check_rfc(&bytes, hdr(true, Text, Some(KEY), 5), b"Hello");
    }

    #[test]
    fn rfc_fragmented_hello() {
        let first = [0x01, 0x03, 0x48, 0x65, 0x6c];
        check_rfc(&first, hdr(false, Text, None, 3), b"Hel");
        check_rfc(
            &[0x80, 0x02, 0x6c, 0x6f],
            hdr(true, Continuation, None, 2),
            b"lo",
        );
    }

    #[test]
    fn rfc_unmasked_ping_and_masked_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        check_rfc(&ping, hdr(true, Ping, None, 5), b"Hello");
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        check_rfc(&pong, hdr(true, Pong, Some(KEY), 5), b"Hello");
    }

    #[test]
    fn rfc_256_bytes_binary() {
        let payload: Vec<u8> = (0..=255u8).collect();
        let mut bytes = vec![0x82, 0x7E, 0x01, 0x00];
        bytes.extend_from_slice(&payload);
        check_rfc(&bytes, hdr(true, Binary, None, 256), &payload);
    }

    #[test]
    fn rfc_64k_binary() {
        let payload = vec![0x5Au8; 65536];
        let mut bytes = vec![0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0];
        bytes.extend_from_slice(&payload);
        check_rfc(&bytes, hdr(true, Binary, None, 65536), &payload);
    }

    #[test]
    fn length_boundaries_round_trip() {
        let lens = [0u64, 1, 125, 126, 127, 65535, 65536, 1 << 32, u64::MAX >> 1];
        let sizes = [2usize, 2, 2, 4, 4, 4, 10, 10, 10];
        for (len, size) in lens.into_iter().zip(sizes) {
            for mask in [None, Some(KEY)] {
                for rsv in 0..=7 {
                    let mut h = hdr(rsv % 2 == 0, Binary, mask, len);
                    h.rsv = rsv;
                    let bytes = encoded(&h);
                    let want = size + if mask.is_some() { 4 } else { 0 };
                    assert_eq!((bytes.len(), h.len()), (want, want), "len {len}");
                    assert_eq!(parse(&bytes), Ok(Some((h, want))), "len {len}");
                }
            }
        }
    }

    #[test]
    fn non_minimal_16_bit_rejected() {
        for len in [0u16, 1, 125] {
            let [a, b] = len.to_be_bytes();
            assert_eq!(parse(&[0x82, 0x7E, a, b]), Err(NonMinimalLength));
        }
        assert!(parse(&[0x82, 0x7E, 0, 126]).unwrap().is_some());
    }

    #[test]
    fn non_minimal_64_bit_rejected() {
        for len in [0u64, 125, 126, 65535] {
            let mut bytes = len64(0x82, len);
            bytes[1] |= 0x80;
            bytes.extend_from_slice(&KEY);
            assert_eq!(parse(&bytes), Err(NonMinimalLength), "{len}");
        }
        assert!(parse(&len64(0x82, 65536)).unwrap().is_some());
    }

    #[test]
    fn length_msb_set_rejected() {
        for len in [1u64 << 63, u64::MAX, (1 << 63) | 5] {
            assert_eq!(parse(&len64(0x02, len)), Err(LengthMsbSet));
        }
    }

    #[test]
    fn reserved_opcodes_rejected() {
        for op in RESERVED {
            for fin in [0x00, 0x80] {
                // Fail-fast on the first byte, and with a complete header.
                assert_eq!(parse(&[fin | op]), Err(ReservedOpcode(op)));
                let full = [fin | 0x70 | op, 0x80, 1, 2, 3, 4];
                assert_eq!(parse(&full), Err(ReservedOpcode(op)));
            }
        }
    }

    #[test]
    fn control_frame_too_long_rejected() {
        for op in [Close, Ping, Pong] {
            let b0 = 0x80 | op as u8;
            // The 7-bit values 126 and 127 fail on the second byte already.
            for b1 in [0x7E, 0x7F, 0xFE, 0xFF] {
                assert_eq!(parse(&[b0, b1]), Err(ControlTooLong));
            }
            assert_eq!(parse(&[b0, 0x7E, 0, 126]), Err(ControlTooLong));
            assert_eq!(parse(&len64(b0, 1 << 20)), Err(ControlTooLong));
            assert_eq!(parse(&[b0, 0x7D]), Ok(Some((hdr(true, op, None, 125), 2))));
        }
    }

    #[test]
    fn control_frame_without_fin_rejected() {
        for op in [Close, Ping, Pong] {
            assert_eq!(parse(&[op as u8]), Err(ControlFragmented));
            assert_eq!(parse(&[op as u8, 0x00]), Err(ControlFragmented));
        }
        // Data frames may be fragmented.
        assert!(parse(&[0x01, 0x00]).unwrap().is_some());
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        for op in [Continuation, Text, Binary, Close, Ping, Pong] {
            let lens: &[u64] = match op.is_control() {
                true => &[0, 125],
                false => &[0, 125, 126, 65535, 65536, u64::MAX >> 1],
            };
            for &len in lens {
                for mask in [None, Some(KEY)] {
                    let mut h = hdr(true, op, mask, len);
                    h.rsv = 0b101;
                    let bytes = encoded(&h);
                    for k in 0..bytes.len() {
                        assert_eq!(parse(&bytes[..k]), Ok(None), "{h:?} prefix {k}");
                    }
                    assert_eq!(parse(&bytes), Ok(Some((h, bytes.len()))));
                }
            }
        }
    }

    #[test]
    fn agrees_with_tungstenite() {
        use tungstenite::protocol::frame::FrameHeader as Theirs;
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut both, mut only_ours_rejected) = (0, 0);
        let mut seen = [false; 5];
        for _ in 0..100_000 {
            let masked = rng.below(2) as u8;
            // Half the headers use the 16- or 64-bit length forms.
            let len7 = [126 + rng.below(2), rng.below(126)][rng.below(2) as usize] as u8;
            let mut bytes = vec![rng.next() as u8, (masked << 7) | len7];
            let ext = [0, 2, 8][usize::from(len7 >= 126) + usize::from(len7 == 127)];
            // A third of the lengths small (only the last two bytes random), so that
            // non-minimal encodings occur; the rest random, so the MSB is often set.
            let small = rng.below(3) == 0;
            for i in 0..ext {
                let byte = if small && i + 2 < ext { 0 } else { rng.next() };
                bytes.push(byte as u8);
            }
            for _ in 0..4 * masked + rng.below(3) as u8 {
                bytes.push(rng.next() as u8);
            }
            let mut cursor = std::io::Cursor::new(&bytes);
            match (parse(&bytes), Theirs::parse(&mut cursor)) {
                (Ok(Some((h, n))), Ok(Some((t, len)))) => {
                    both += 1;
                    let rsv = [t.rsv1, t.rsv2, t.rsv3].map(u8::from);
                    assert_eq!(h.rsv, (rsv[0] << 2) | (rsv[1] << 1) | rsv[2]);
                    assert_eq!((h.fin, h.opcode as u8), (t.is_final, u8::from(t.opcode)));
                    assert_eq!((h.mask, h.payload_len), (t.mask, len));
                    assert_eq!(n as u64, cursor.position());
                }
                // tungstenite checks lengths and control rules later; it rejects only
                // reserved opcodes here, and so must we.
                (Err(e), Ok(Some(_))) => {
                    only_ours_rejected += 1;
                    seen[match e {
                        ReservedOpcode(_) => panic!("{bytes:02x?}"),
                        NonMinimalLength => 1,
                        LengthMsbSet => 2,
                        ControlTooLong => 3,
                        ControlFragmented => 4,
                    }] = true;
                }
                (Err(ReservedOpcode(_)), Err(_)) => seen[0] = true,
                (ours, theirs) => panic!("{bytes:02x?}: ours {ours:?}, theirs {theirs:?}"),
            }
        }
        assert!(both > 15_000, "{both}");
        assert!(only_ours_rejected > 5_000, "{only_ours_rejected}");
        assert_eq!(seen, [true; 5], "every error kind exercised");
    }

    #[test]
    fn apply_mask_matches_naive_for_all_lengths_offsets_alignments() {
        let data: Vec<u8> = (0..128u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..=100 {
            for offset in 0..=7 {
                for align in 0..8 {
                    let (mut fast, mut slow) = (data.clone(), data.clone());
                    apply_mask(&mut fast[align..align + len], KEY, offset);
                    naive_mask(&mut slow[align..align + len], KEY, offset);
                    assert_eq!(fast, slow, "len {len} offset {offset} align {align}");
                }
            }
        }
    }

    #[test]
    fn apply_mask_twice_restores_input() {
        let mut rng = Rng(42);
        for len in [0, 1, 3, 15, 16, 17, 100, 1000] {
            let orig: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let key = (rng.next() as u32 | 0x0101_0101).to_ne_bytes();
            let offset = rng.below(100) as usize;
            let mut buf = orig.clone();
            apply_mask(&mut buf, key, offset);
            assert!(len == 0 || buf != orig);
            apply_mask(&mut buf, key, offset);
            assert_eq!(buf, orig);
        }
    }

    #[test]
    fn apply_mask_in_pieces_matches_whole() {
        let mut rng = Rng(7);
        for _ in 0..500 {
            let len = rng.below(300) as usize;
            let mut whole: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut pieces = whole.clone();
            let key = (rng.next() as u32).to_ne_bytes();
            apply_mask(&mut whole, key, 0);
            let mut at = 0;
            while at < len {
                let n = (1 + rng.below(40) as usize).min(len - at);
                apply_mask(&mut pieces[at..at + n], key, at);
                at += n;
            }
            assert_eq!(pieces, whole);
        }
    }

    #[test]
    fn write_frame_round_trips_every_length_class() {
        for len in [0usize, 125, 126, 65535, 65536, 70_000] {
            let payload = vec![0x33u8; len];
            let mut out = Vec::new();
            write_frame(&mut out, false, Binary, &payload);
            let (h, n) = parse(&out).unwrap().unwrap();
            assert_eq!(h, hdr(false, Binary, None, len as u64));
            assert_eq!(&out[n..], &payload[..]);
        }
    }

    #[test]
    fn errors_display() {
        assert_eq!(ReservedOpcode(3).to_string(), "reserved opcode 0x3");
        let e: Box<dyn std::error::Error> = Box::new(ControlFragmented);
        assert_eq!(e.to_string(), "fragmented control frame");
    }
}
