//! Incremental UTF-8 validation for text messages that arrive in fragments (frames) or pieces
//! (reads), failing on the first byte that makes the input so far invalid (RFC 6455 section
//! 8.1; Autobahn cases 6.x check fail-fast), without buffering the message.
//!
//! Built on `std::str::from_utf8` (SIMD-accelerated for ASCII): its error says whether the
//! input is already invalid (`error_len() == Some(_)`) or merely ends inside a code point that
//! could still be completed (`None`). std rejects impossible prefixes eagerly (`C0`, `E0 80`,
//! `ED A0`, `F4 90`, `F5`, ...), so an error is reported at the first bad byte. The bytes of an
//! incomplete trailing code point (at most 3) are kept and completed from the next piece.

use std::fmt;

/// Streaming UTF-8 validator. State: the up to 3 bytes of an incomplete trailing code point.
/// Five bytes, no allocation; `Default` is the start of a message.
#[derive(Default, Clone, Debug)]
pub struct Utf8Validator {
    /// Bytes of the incomplete code point; `pending[..pending_len]` is a valid UTF-8 prefix.
    pending: [u8; 4],
    /// 0..=3.
    pending_len: u8,
}

/// The bytes fed so far are not a prefix of valid UTF-8, or the message ended inside a code
/// point. For WebSocket text this calls for closing with status 1007.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utf8Error;

impl fmt::Display for Utf8Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid UTF-8 in text message")
    }
}

impl std::error::Error for Utf8Error {}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validate the next piece of the message (any length, including empty; a code point may
    /// span any number of pieces).
    ///
    /// `Err` as soon as the bytes fed so far cannot be a prefix of valid UTF-8, i.e. in the
    /// call that receives the first offending byte, never later. After `Err` the validator has
    /// been reset, so it can be reused for a new message. Cost: one `from_utf8` over `bytes`,
    /// plus at most 4 bytes when completing a code point split across pieces.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), Utf8Error> {
        let mut rest = bytes;
        if self.pending_len > 0 {
            let have = usize::from(self.pending_len);
            let need = sequence_len(self.pending[0]) - have;
            let take = need.min(rest.len());
            self.pending[have..have + take].copy_from_slice(&rest[..take]);
            match std::str::from_utf8(&self.pending[..have + take]) {
                Ok(_) => {
                    self.pending_len = 0;
                    rest = &rest[take..];
                }
                // Still a valid prefix; `take < need`, so the piece is used up.
                Err(e) if e.error_len().is_none() => {
                    self.pending_len += take as u8;
                    return Ok(());
                }
                Err(_) => return self.fail(),
            }
        }
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &rest[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => self.fail(),
        }
    }

    /// The message ended: `Err` if it ends inside a code point. Resets the validator for the
    /// next message either way.
    pub fn finish(&mut self) -> Result<(), Utf8Error> {
        let clean = self.is_clean();
        self.reset();
        if clean {
            Ok(())
        } else {
            Err(Utf8Error)
        }
    }

    /// Forget any pending partial code point (start of a new message).
    pub fn reset(&mut self) {
        self.pending_len = 0;
    }

    /// True if no partial code point is pending: at a code point boundary of valid input, or
    /// fresh (new, or after `finish`, `reset` or an error).
    pub fn is_clean(&self) -> bool {
        self.pending_len == 0
    }

    fn fail(&mut self) -> Result<(), Utf8Error> {
        self.reset();
        Err(Utf8Error)
    }
}

/// Length of the sequence introduced by `lead`, which is a valid multi-byte lead byte
/// (`C2..=F4`) because it was accepted as a prefix by `from_utf8`.
fn sequence_len(lead: u8) -> usize {
    match lead {
        ..0xE0 => 2,
        0xE0..0xF0 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    const MIXED: &str =
        "a\u{7f}\u{80}é\u{7ff}\u{800}€\u{d7ff}\u{e000}\u{fffd}\u{ffff}\u{10000}😀\u{10ffff}z";

    /// Feed `pieces`; the index of the first piece whose `feed` fails, or `pieces.len()` if
    /// `finish` fails, or `None` if all is valid.
    fn first_failure(pieces: &[&[u8]]) -> Option<usize> {
        let mut v = Utf8Validator::new();
        for (i, p) in pieces.iter().enumerate() {
            if v.feed(p).is_err() {
                return Some(i);
            }
        }
        v.finish().err().map(|_| pieces.len())
    }

    /// Index of the first byte after which `bytes` can no longer be a prefix of valid UTF-8
    /// (computed the slow way, prefix by prefix), or `bytes.len()` if only incomplete at the end.
    fn bad_byte(bytes: &[u8]) -> Option<usize> {
        if std::str::from_utf8(bytes).is_ok() {
            return None;
        }
        let bad = (1..=bytes.len()).find(
            |&k| matches!(std::str::from_utf8(&bytes[..k]), Err(e) if e.error_len().is_some()),
        );
        Some(bad.map_or(bytes.len(), |k| k - 1))
    }

    /// `bytes` must fail exactly at byte `at` whether fed whole, byte by byte, or split in two
    /// at any position.
    fn assert_fails_at(bytes: &[u8], at: usize) {
        assert_eq!(first_failure(&[bytes]), Some(0), "{bytes:02x?} whole");
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            first_failure(&singles),
            Some(at),
            "{bytes:02x?} byte by byte"
        );
        for split in 0..=bytes.len() {
            let (a, b) = bytes.split_at(split);
            let want = if at < split { 0 } else { 1 };
            assert_eq!(
                first_failure(&[a, b]),
                Some(want),
                "{bytes:02x?} split {split}"
            );
        }
    }

    #[test]
    fn valid_text_passes_whole() {
        for s in ["", "hello", MIXED, "κόσμε", "\u{0}"] {
            assert_eq!(first_failure(&[s.as_bytes()]), None, "{s}");
        }
    }

    #[test]
    fn valid_text_split_at_every_position_passes() {
        let b = MIXED.as_bytes();
        for i in 0..=b.len() {
            for j in i..=b.len() {
                assert_eq!(
                    first_failure(&[&b[..i], &b[i..j], &b[j..]]),
                    None,
                    "{i} {j}"
                );
            }
        }
    }

    #[test]
    fn valid_text_byte_by_byte_passes_and_tracks_pending() {
        let mut v = Utf8Validator::new();
        for (i, &byte) in MIXED.as_bytes().iter().enumerate() {
            v.feed(&[byte]).unwrap();
            // Clean exactly at code point boundaries; a 4-byte char spans 4 pieces.
            assert_eq!(v.is_clean(), MIXED.is_char_boundary(i + 1), "{i}");
            v.feed(&[]).unwrap();
        }
        v.finish().unwrap();
    }

    #[test]
    fn overlong_encodings_fail_at_first_bad_byte() {
        assert_fails_at(&[0xC0, 0x80], 0);
        assert_fails_at(&[0xC1, 0xBF], 0);
        assert_fails_at(&[0xE0, 0x80, 0x80], 1);
        assert_fails_at(&[0xE0, 0x9F, 0xBF], 1);
        assert_fails_at(&[0xF0, 0x80, 0x80, 0x80], 1);
        assert_fails_at(&[0xF0, 0x8F, 0xBF, 0xBF], 1);
    }

    #[test]
    fn surrogates_fail_at_first_bad_byte() {
        assert_fails_at(&[0xED, 0xA0, 0x80], 1);
        assert_fails_at(&[b'a', 0xED, 0xBF, 0xBF], 2);
        assert_fails_at(&[0xED, 0xA0, 0x80, 0xED, 0xB0, 0x80], 1);
    }

    #[test]
    fn above_max_code_point_fails_at_first_bad_byte() {
        assert_fails_at(&[0xF4, 0x90, 0x80, 0x80], 1);
        for lead in 0xF5..=0xFF {
            assert_fails_at(&[lead, 0x80, 0x80, 0x80], 0);
        }
    }

    #[test]
    fn stray_and_missing_continuation_bytes_fail_at_first_bad_byte() {
        assert_fails_at(&[0x80], 0);
        assert_fails_at(&[b'a', 0xBF, b'b'], 1);
        assert_fails_at(&[0xC3, 0xA9, 0xA9], 2);
        assert_fails_at(&[0xE2, 0x82, b'x'], 2);
        assert_fails_at(&[0xF0, 0x9F, 0x98, 0xF0], 3);
    }

    #[test]
    fn truncated_sequence_fails_at_finish_and_resets() {
        for bytes in [&[0xC3][..], &[0xE2, 0x82], &[b'a', 0xF0, 0x9F, 0x98]] {
            let mut v = Utf8Validator::new();
            v.feed(bytes).unwrap();
            assert!(!v.is_clean());
            assert_eq!(v.finish(), Err(Utf8Error));
            assert!(v.is_clean());
            v.feed("é".as_bytes()).unwrap();
            v.finish().unwrap();
        }
    }

    #[test]
    fn autobahn_6_x_fails_exactly_at_a0() {
        let bytes = [
            0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80,
            0x65, 0x64, 0x69, 0x74, 0x65, 0x64,
        ];
        let mut v = Utf8Validator::new();
        for (i, &b) in bytes.iter().enumerate() {
            let r = v.feed(&[b]);
            if i < 12 {
                assert_eq!(r, Ok(()), "byte {i}");
            } else {
                assert_eq!((i, b, r), (12, 0xa0, Err(Utf8Error)));
                break;
            }
        }
        assert_fails_at(&bytes, 12);
    }

    #[test]
    fn error_resets_and_reset_clears_pending() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xE2]).unwrap();
        assert_eq!(v.feed(&[0x41]), Err(Utf8Error));
        assert!(v.is_clean());
        v.feed(b"ok").unwrap();
        v.feed(&[0xE2, 0x82]).unwrap();
        v.reset();
        assert!(v.is_clean());
        v.feed(b"fresh").unwrap();
        v.finish().unwrap();
    }

    #[test]
    fn random_pieces_agree_with_std() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let chars: Vec<char> = MIXED.chars().collect();
        let tricky = [
            0x80, 0xBF, 0xC0, 0xC2, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xA0, 0x90, 0x8F,
        ];
        let (mut valid, mut invalid) = (0, 0);
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            for _ in 0..rng.below(24) {
                match rng.below(16) {
                    0 => bytes.push(rng.next() as u8),
                    1 => bytes.push(tricky[rng.below(tricky.len() as u64) as usize]),
                    _ => {
                        let c = chars[rng.below(chars.len() as u64) as usize];
                        bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                }
            }
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() || rng.below(4) == 0 {
                let n = (rng.below(6) as usize).min(rest.len());
                let (a, b) = rest.split_at(n);
                pieces.push(a);
                rest = b;
            }
            let got = first_failure(&pieces);
            match bad_byte(&bytes) {
                None => {
                    valid += 1;
                    assert_eq!(got, None, "{bytes:02x?}");
                }
                Some(at) => {
                    invalid += 1;
                    // The piece holding byte `at` fails; a truncated tail fails at finish.
                    let mut end = 0;
                    let want = pieces.iter().position(|p| {
                        end += p.len();
                        at < end
                    });
                    assert_eq!(
                        got,
                        Some(want.unwrap_or(pieces.len())),
                        "{bytes:02x?} {pieces:02x?}"
                    );
                }
            }
        }
        assert!(valid > 2_000 && invalid > 2_000, "{valid} {invalid}");
    }

    #[test]
    fn error_displays() {
        let e: Box<dyn std::error::Error> = Box::new(Utf8Error);
        assert_eq!(e.to_string(), "invalid UTF-8 in text message");
    }
}
