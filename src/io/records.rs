//! TLS records after the handshake, sealed and opened by wsloop itself.
//!
//! rustls makes the handshake; once it is done, `rustls::kernel::KernelConnection` hands over
//! the traffic secrets (the API kernel TLS uses) and keeps only what a key update needs. From
//! then on a record is opened in place where the loop read it (its receive buffer) and sealed
//! in place where it is sent from: no allocation and no copy per record beyond the one into the
//! output buffer, where rustls's buffered connection allocates a record buffer each way and
//! copies the plaintext twice (BENCHMARKS.md, TLS: about 0.3 µs of a 1 KiB echo).
//!
//! What this layer accepts after the handshake, and nothing more:
//! - TLS 1.3 (RFC 8446 §5): protected records of outer type application_data whose inner type
//!   is application_data, alert (close_notify ends the input; a `user_canceled` warning is
//!   ignored; any other alert fails the connection) or handshake (only `KeyUpdate`, whole
//!   within its record, at most [`MAX_KEY_UPDATES`] without application data between them);
//! - TLS 1.2 (RFC 5246 §6.2, RFC 5288, RFC 7905): application_data, and alert records
//!   (close_notify ends the input; warnings are ignored; fatal alerts fail it). A handshake
//!   record (renegotiation) fails it.
//! - At most [`MAX_WARNINGS`] ignored warnings in a connection's life, and
//!   [`MAX_EMPTY_RUN`] empty application data records in a row (the limits of rustls and
//!   BoringSSL).
//! - Records of at most 2^14 bytes of plaintext and the suite's expansion (a larger length in
//!   a header fails the connection before the record is read; a larger TLS 1.3 inner
//!   plaintext, once opened).

use ring::aead;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use std::ops::Range;

/// A record's header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// The most plaintext a record carries (2^14).
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// The most a TLS 1.3 record's protected part may be (2^14 + 256).
const MAX_CIPHERTEXT_13: usize = MAX_PLAINTEXT + 256;
/// The most a TLS 1.2 record's protected part may be (2^14 + 2048).
const MAX_CIPHERTEXT_12: usize = MAX_PLAINTEXT + 2048;
/// The largest record on the wire.
pub(crate) const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT_12;
/// AEAD tag length (every suite served).
const TAG: usize = 16;
/// TLS 1.2 AES-GCM's explicit nonce in each record.
const EXPLICIT: usize = 8;
/// Warning alerts (TLS 1.2) ignored before the connection fails.
const MAX_WARNINGS: u32 = 4;
/// Empty application data records in a row before the connection fails: each costs an
/// authentication and makes nothing (rustls has the same bound).
const MAX_EMPTY_RUN: u32 = 32;
/// The peer's `KeyUpdate`s (TLS 1.3) without application data between them. Each costs key
/// derivations (and, if it asks for ours, more and a record back): a client sending nothing
/// else would cost far more CPU per byte than any other record. (rustls's and BoringSSL's
/// bound.)
const MAX_KEY_UPDATES: u32 = 32;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;
const ALERT_WARNING: u8 = 1;
const ALERT_FATAL: u8 = 2;

/// Why a record could not be taken: the connection fails (`tls_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordError {
    /// A header's type or version is not one this layer takes now.
    Unexpected,
    /// A header announces more than a record may hold.
    Oversized,
    /// Authentication failed: a forged, reordered or corrupted record.
    Decrypt,
    /// An alert other than close_notify (and TLS 1.2 warnings).
    Alert(u8),
    /// A handshake message other than a whole `KeyUpdate` (TLS 1.3), or any (TLS 1.2).
    Handshake,
    /// Sequence numbers or the suite's record limit exhausted.
    Exhausted,
    /// Records that make nothing, over their bound: empty records in a row, warnings, or
    /// `KeyUpdate`s without application data between them.
    Flood,
    /// An alert of no level defined.
    IllegalAlert,
    /// A message that does not parse: an alert or `KeyUpdate` of the wrong length or value,
    /// or a TLS 1.3 warning other than `user_canceled`.
    Decode,
}

impl RecordError {
    /// The alert description that answers it (RFC 8446 §6.2), if any: none for the peer's own
    /// fatal alert.
    pub(crate) fn alert(self) -> Option<u8> {
        match self {
            RecordError::Unexpected | RecordError::Handshake | RecordError::Flood => Some(10),
            RecordError::IllegalAlert => Some(47),
            RecordError::Decode => Some(50),
            RecordError::Decrypt => Some(20),
            RecordError::Oversized => Some(22),
            RecordError::Exhausted => Some(80),
            RecordError::Alert(_) => None,
        }
    }
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Unexpected => f.write_str("unexpected TLS record"),
            RecordError::Oversized => f.write_str("oversized TLS record"),
            RecordError::Decrypt => f.write_str("TLS record failed authentication"),
            RecordError::Alert(d) => write!(f, "TLS alert {d} from the peer"),
            RecordError::Handshake => f.write_str("unexpected TLS handshake message"),
            RecordError::Exhausted => f.write_str("TLS record limit reached"),
            RecordError::Flood => f.write_str("TLS records that make nothing, over their bound"),
            RecordError::IllegalAlert => f.write_str("TLS alert of no defined level"),
            RecordError::Decode => f.write_str("TLS message that does not parse"),
        }
    }
}

impl std::error::Error for RecordError {}

/// What one record held.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// Application data, at this range of the buffer the record was opened in (empty for an
    /// empty record).
    Data(Range<usize>),
    /// The peer's close_notify: no more input.
    CloseNotify,
    /// TLS 1.3 `KeyUpdate`: the receiving keys must change now ([`Records::rekey_rx`]); if
    /// `requested`, the peer asks for ours to change too (a `KeyUpdate` sealed with the old
    /// keys, [`Records::seal_key_update`], then [`Records::rekey_tx`]).
    KeyUpdate { requested: bool },
    /// Nothing for the connection (a TLS 1.2 warning alert).
    Nothing,
}

/// One direction's key, its IV and the next sequence number.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Option<Keys> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return None,
        };
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(alg, key.as_ref()).ok()?);
        let iv = <[u8; aead::NONCE_LEN]>::try_from(iv.as_ref()).ok()?;
        Some(Keys { key, iv, seq })
    }

    /// The IV with the sequence number XORed into its last 8 bytes (RFC 8446 §5.3; TLS 1.2's
    /// ChaCha20-Poly1305, RFC 7905; and TLS 1.2 AES-GCM's nonce as rustls makes it).
    fn nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn next(&mut self) -> Result<u64, RecordError> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        Ok(seq)
    }
}

/// A connection's record layer after the handshake (see the module docs).
pub(crate) struct Records {
    tls13: bool,
    /// TLS 1.2 AES-GCM: each record carries an 8-byte explicit nonce.
    explicit: bool,
    rx: Keys,
    tx: Keys,
    /// Records that may be sealed under one key (the suite's confidentiality limit, with a
    /// margin): TLS 1.3 then updates its sending key, TLS 1.2 fails.
    tx_limit: u64,
    warnings: u32,
    /// Empty application data records in a row.
    empty_run: u32,
    /// The peer's `KeyUpdate`s since its last application data.
    key_updates: u32,
}

impl Records {
    /// The layer for a connection of `version` whose handshake gave these secrets (sequence
    /// numbers included); `None` for a version or suite this layer does not serve.
    pub(crate) fn new(
        version: ProtocolVersion,
        tx: &(u64, ConnectionTrafficSecrets),
        rx: &(u64, ConnectionTrafficSecrets),
        confidentiality_limit: u64,
    ) -> Option<Records> {
        let tls13 = match version {
            ProtocolVersion::TLSv1_3 => true,
            ProtocolVersion::TLSv1_2 => false,
            _ => return None,
        };
        let explicit = !tls13 && !matches!(tx.1, ConnectionTrafficSecrets::Chacha20Poly1305 { .. });
        Some(Records {
            tls13,
            explicit,
            rx: Keys::new(&rx.1, rx.0)?,
            tx: Keys::new(&tx.1, tx.0)?,
            tx_limit: confidentiality_limit.saturating_sub(confidentiality_limit / 16),
            warnings: 0,
            empty_run: 0,
            key_updates: 0,
        })
    }

    /// The size of the record at the start of `buf`, once its header is there: `Ok(None)`
    /// while fewer than [`HEADER`] bytes are; an error for a header this layer refuses (so
    /// that no more than one record's bytes are ever held for it).
    pub(crate) fn record_len(&self, buf: &[u8]) -> Result<Option<usize>, RecordError> {
        let Some(h) = buf.get(..HEADER) else {
            return Ok(None);
        };
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        let max = if self.tls13 {
            MAX_CIPHERTEXT_13
        } else {
            MAX_CIPHERTEXT_12
        };
        let ok_type = match self.tls13 {
            true => h[0] == CONTENT_APPLICATION_DATA,
            false => matches!(
                h[0],
                CONTENT_APPLICATION_DATA | CONTENT_ALERT | CONTENT_HANDSHAKE
            ),
        };
        if !ok_type || h[1] != 3 {
            return Err(RecordError::Unexpected);
        }
        if len > max {
            return Err(RecordError::Oversized);
        }
        Ok(Some(HEADER + len))
    }

    /// Open the whole record `buf` (its header included: [`Records::record_len`] bytes) in
    /// place. The plaintext is left inside `buf`, at the range returned.
    pub(crate) fn open(&mut self, buf: &mut [u8]) -> Result<Opened, RecordError> {
        let opened = self.open_record(buf)?;
        match &opened {
            Opened::Data(r) if r.is_empty() => {
                self.empty_run += 1;
                if self.empty_run > MAX_EMPTY_RUN {
                    return Err(RecordError::Flood);
                }
            }
            Opened::Data(_) => (self.empty_run, self.key_updates) = (0, 0),
            Opened::KeyUpdate { .. } => {
                self.key_updates += 1;
                if self.key_updates > MAX_KEY_UPDATES {
                    return Err(RecordError::Flood);
                }
            }
            Opened::CloseNotify => {}
            Opened::Nothing => {
                // A warning alert ignored.
                self.warnings += 1;
                if self.warnings > MAX_WARNINGS {
                    return Err(RecordError::Flood);
                }
            }
        }
        Ok(opened)
    }

    fn open_record(&mut self, buf: &mut [u8]) -> Result<Opened, RecordError> {
        debug_assert_eq!(self.record_len(buf), Ok(Some(buf.len())));
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&buf[..HEADER]);
        let typ = header[0];
        let seq = self.rx.seq;
        let nonce_iv = self.rx.nonce();
        let body = &mut buf[HEADER..];
        if self.tls13 {
            if body.len() < TAG + 1 {
                return Err(RecordError::Decrypt);
            }
            let nonce = aead::Nonce::assume_unique_for_key(nonce_iv);
            let plain = self
                .rx
                .key
                .open_in_place(nonce, aead::Aad::from(header), body)
                .map_err(|_| RecordError::Decrypt)?;
            self.rx.next()?;
            if plain.len() > MAX_PLAINTEXT + 1 {
                return Err(RecordError::Oversized);
            }
            // The inner plaintext: content, the inner type, then zeros (padding).
            let Some(end) = plain.iter().rposition(|&b| b != 0) else {
                return Err(RecordError::Unexpected);
            };
            if end > MAX_PLAINTEXT {
                return Err(RecordError::Oversized);
            }
            let content = HEADER..HEADER + end;
            return match plain[end] {
                CONTENT_APPLICATION_DATA => Ok(Opened::Data(content)),
                CONTENT_ALERT => alert(&plain[..end], true),
                CONTENT_HANDSHAKE => key_update(&plain[..end]),
                _ => Err(RecordError::Unexpected),
            };
        }
        // TLS 1.2.
        let overhead = TAG + if self.explicit { EXPLICIT } else { 0 };
        let Some(plain_len) = body.len().checked_sub(overhead) else {
            return Err(RecordError::Decrypt);
        };
        if plain_len > MAX_PLAINTEXT {
            return Err(RecordError::Oversized);
        }
        let nonce = match self.explicit {
            true => {
                let mut n = [0u8; aead::NONCE_LEN];
                n[..4].copy_from_slice(&self.rx.iv[..4]);
                n[4..].copy_from_slice(&body[..EXPLICIT]);
                n
            }
            false => nonce_iv,
        };
        let aad = tls12_aad(seq, typ, plain_len);
        let skip = if self.explicit { EXPLICIT } else { 0 };
        let plain = self
            .rx
            .key
            .open_within(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                body,
                skip..,
            )
            .map_err(|_| RecordError::Decrypt)?;
        debug_assert_eq!(plain.len(), plain_len);
        self.rx.next()?;
        match typ {
            CONTENT_APPLICATION_DATA => Ok(Opened::Data(HEADER..HEADER + plain_len)),
            CONTENT_ALERT => alert(plain, false),
            _ => Err(RecordError::Handshake),
        }
    }

    /// The bytes sealing `n` bytes of plaintext adds: header, tag, and TLS 1.3's inner type or
    /// TLS 1.2 AES-GCM's explicit nonce.
    #[cfg(test)]
    pub(crate) fn overhead(&self) -> usize {
        HEADER
            + TAG
            + if self.tls13 {
                1
            } else if self.explicit {
                EXPLICIT
            } else {
                0
            }
    }

    /// Whether the sending key is near its suite's limit: under TLS 1.3 the caller then sends
    /// a `KeyUpdate` ([`Records::seal_key_update`]) and rekeys; under TLS 1.2 the connection
    /// must end.
    pub(crate) fn tx_worn(&self) -> bool {
        self.tx.seq >= self.tx_limit
    }

    /// Append a record of application data holding `parts` (at most [`MAX_PLAINTEXT`] bytes
    /// in all) to `out`.
    pub(crate) fn seal(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_typed(CONTENT_APPLICATION_DATA, parts, out)
    }

    /// Append our close_notify to `out`.
    pub(crate) fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_typed(CONTENT_ALERT, &[&[ALERT_WARNING, ALERT_CLOSE_NOTIFY]], out)
    }

    /// Append a fatal alert of this description to `out` (after a failure: the connection
    /// writes nothing more).
    pub(crate) fn seal_fatal_alert(
        &mut self,
        description: u8,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        self.seal_typed(CONTENT_ALERT, &[&[2, description]], out)
    }

    /// TLS 1.3: append our `KeyUpdate` (not asking for the peer's) to `out`; the caller then
    /// rekeys with [`Records::rekey_tx`].
    pub(crate) fn seal_key_update(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        debug_assert!(self.tls13);
        self.seal_typed(
            CONTENT_HANDSHAKE,
            &[&[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0]],
            out,
        )
    }

    /// The receiving key after the peer's `KeyUpdate`.
    pub(crate) fn rekey_rx(
        &mut self,
        secrets: &(u64, ConnectionTrafficSecrets),
    ) -> Result<(), RecordError> {
        self.rx = Keys::new(&secrets.1, secrets.0).ok_or(RecordError::Exhausted)?;
        Ok(())
    }

    /// The sending key after our `KeyUpdate`.
    pub(crate) fn rekey_tx(
        &mut self,
        secrets: &(u64, ConnectionTrafficSecrets),
    ) -> Result<(), RecordError> {
        self.tx = Keys::new(&secrets.1, secrets.0).ok_or(RecordError::Exhausted)?;
        Ok(())
    }

    fn seal_typed(
        &mut self,
        typ: u8,
        parts: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(len <= MAX_PLAINTEXT);
        let nonce = self.tx.nonce();
        let seq = self.tx.next()?;
        let start = out.len();
        let (outer, inner) = match self.tls13 {
            true => (CONTENT_APPLICATION_DATA, len + 1),
            false => (typ, len),
        };
        let explicit = if self.explicit { EXPLICIT } else { 0 };
        let body = explicit + inner + TAG;
        out.reserve(HEADER + body);
        out.push(outer);
        out.extend_from_slice(&[3, 3]);
        out.extend_from_slice(&(body as u16).to_be_bytes());
        if self.explicit {
            out.extend_from_slice(&nonce[4..]);
        }
        for p in parts {
            out.extend_from_slice(p);
        }
        if self.tls13 {
            out.push(typ);
        }
        // The additional data: TLS 1.3's record header, or TLS 1.2's 13 bytes.
        let (aad, aad_len) = match self.tls13 {
            true => {
                let mut a = [0u8; 13];
                a[..HEADER].copy_from_slice(&out[start..start + HEADER]);
                (a, HEADER)
            }
            false => (tls12_aad(seq, typ, len), 13),
        };
        let plain_at = start + HEADER + explicit;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&aad[..aad_len]),
                &mut out[plain_at..],
            )
            .map_err(|_| RecordError::Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// TLS 1.2's additional data: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9] = 3;
    a[10] = 3;
    a[11..].copy_from_slice(&(len as u16).to_be_bytes());
    a
}

/// An alert's content: close_notify ends the input; a warning is ignored (TLS 1.3: only
/// `user_canceled`, which a close_notify follows; RFC 8446 §6); any other alert fails the
/// connection.
fn alert(content: &[u8], tls13: bool) -> Result<Opened, RecordError> {
    match content {
        [ALERT_WARNING | ALERT_FATAL, ALERT_CLOSE_NOTIFY] => Ok(Opened::CloseNotify),
        [ALERT_WARNING, ALERT_USER_CANCELED] => Ok(Opened::Nothing),
        [ALERT_WARNING, _] if tls13 => Err(RecordError::Decode),
        [ALERT_WARNING, _] => Ok(Opened::Nothing),
        [ALERT_FATAL, d] => Err(RecordError::Alert(*d)),
        [_, _] => Err(RecordError::IllegalAlert),
        _ => Err(RecordError::Decode),
    }
}

/// A TLS 1.3 handshake record after the handshake: one whole `KeyUpdate`, nothing else (a
/// client sends no other message then; one split over records is refused).
fn key_update(content: &[u8]) -> Result<Opened, RecordError> {
    match content {
        [HANDSHAKE_KEY_UPDATE, 0, 0, 1, r @ (0 | 1)] => {
            Ok(Opened::KeyUpdate { requested: *r == 1 })
        }
        [HANDSHAKE_KEY_UPDATE, ..] => Err(RecordError::Decode),
        _ => Err(RecordError::Handshake),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(chacha: bool, k: u8) -> ConnectionTrafficSecrets {
        let key = AeadKey::from([k; 32]);
        let iv = Iv::from([k.wrapping_mul(7); 12]);
        match chacha {
            true => ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
            false => ConnectionTrafficSecrets::Aes256Gcm { key, iv },
        }
    }

    /// Two ends of one connection: what `a` seals `b` opens.
    fn pair(version: ProtocolVersion, chacha: bool) -> (Records, Records) {
        let (s1, s2) = ((5, secrets(chacha, 1)), (9, secrets(chacha, 2)));
        let a = Records::new(version, &s1, &s2, 1 << 24).unwrap();
        let s1 = (5, secrets(chacha, 1));
        let s2 = (9, secrets(chacha, 2));
        let b = Records::new(version, &s2, &s1, 1 << 24).unwrap();
        (a, b)
    }

    const ALL: [(ProtocolVersion, bool); 4] = [
        (ProtocolVersion::TLSv1_3, false),
        (ProtocolVersion::TLSv1_3, true),
        (ProtocolVersion::TLSv1_2, false),
        (ProtocolVersion::TLSv1_2, true),
    ];

    #[test]
    fn what_one_end_seals_the_other_opens_in_place_for_every_version_and_suite() {
        for (v, chacha) in ALL {
            let (mut a, mut b) = pair(v, chacha);
            let mut wire = Vec::new();
            let sizes = [0usize, 1, 20, 1024, MAX_PLAINTEXT];
            for (i, &n) in sizes.iter().enumerate() {
                let data: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
                let (x, y) = data.split_at(n / 3);
                a.seal(&[x, y], &mut wire).unwrap();
            }
            // Every record opens, in order, to what was sealed; each is as long as
            // `overhead` says.
            let mut at = 0;
            for (i, &n) in sizes.iter().enumerate() {
                let len = b.record_len(&wire[at..]).unwrap().unwrap();
                assert_eq!(len, n + a.overhead(), "{v:?} chacha={chacha}");
                let rec = &mut wire[at..at + len];
                match b.open(rec).unwrap() {
                    Opened::Data(r) => {
                        let want: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
                        assert_eq!(&rec[r], &want[..]);
                    }
                    other => panic!("{other:?}"),
                }
                at += len;
            }
            assert_eq!(at, wire.len());
            assert_eq!(b.record_len(&[]), Ok(None));
        }
    }

    #[test]
    fn a_flipped_bit_or_a_replayed_record_fails_authentication() {
        for (v, chacha) in ALL {
            let (mut a, mut b) = pair(v, chacha);
            let mut wire = Vec::new();
            a.seal(&[b"hello"], &mut wire).unwrap();
            let mut bad = wire.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert_eq!(b.open(&mut bad), Err(RecordError::Decrypt), "{v:?}");
            // The good record still opens (a failed one does not advance the sequence)...
            let mut good = wire.clone();
            assert!(matches!(b.open(&mut good), Ok(Opened::Data(_))));
            // ...once: the same record again is out of sequence.
            let mut again = wire.clone();
            assert_eq!(b.open(&mut again), Err(RecordError::Decrypt), "{v:?}");
        }
    }

    #[test]
    fn close_notify_and_key_updates_open_as_such() {
        for (v, chacha) in ALL {
            let (mut a, mut b) = pair(v, chacha);
            let mut wire = Vec::new();
            a.seal_close_notify(&mut wire).unwrap();
            assert_eq!(b.open(&mut wire), Ok(Opened::CloseNotify), "{v:?}");
            if v == ProtocolVersion::TLSv1_3 {
                let mut wire = Vec::new();
                a.seal_key_update(&mut wire).unwrap();
                assert_eq!(
                    b.open(&mut wire),
                    Ok(Opened::KeyUpdate { requested: false })
                );
                // Both change keys: what `a` seals under its new key, `b` opens under its.
                let new = (0, secrets(chacha, 3));
                a.rekey_tx(&new).unwrap();
                b.rekey_rx(&(0, secrets(chacha, 3))).unwrap();
                let mut wire = Vec::new();
                a.seal(&[b"after"], &mut wire).unwrap();
                match b.open(&mut wire).unwrap() {
                    Opened::Data(r) => assert_eq!(&wire[r], b"after"),
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn headers_this_layer_does_not_take_are_refused_before_their_body() {
        let (a, _) = pair(ProtocolVersion::TLSv1_3, false);
        // Oversized: 2^14 + 257 announced.
        let len = (MAX_PLAINTEXT + 257) as u16;
        let h = [23, 3, 3, (len >> 8) as u8, len as u8];
        assert_eq!(a.record_len(&h), Err(RecordError::Oversized));
        // TLS 1.3 takes only application_data on the outside after the handshake.
        for t in [20u8, 21, 22, 24, 0] {
            assert_eq!(
                a.record_len(&[t, 3, 3, 0, 20]),
                Err(RecordError::Unexpected)
            );
        }
        assert_eq!(
            a.record_len(&[23, 4, 3, 0, 20]),
            Err(RecordError::Unexpected)
        );
        assert_eq!(a.record_len(&[23, 3, 3, 0]), Ok(None));
        let (a12, _) = pair(ProtocolVersion::TLSv1_2, false);
        assert_eq!(a12.record_len(&[21, 3, 3, 0, 26]), Ok(Some(31)));
        let len = (MAX_PLAINTEXT + 2049) as u16;
        assert_eq!(
            a12.record_len(&[23, 3, 3, (len >> 8) as u8, len as u8]),
            Err(RecordError::Oversized)
        );
    }

    #[test]
    fn empty_records_in_a_row_and_key_updates_past_their_budget_fail() {
        for (v, chacha) in ALL {
            let (mut a, mut b) = pair(v, chacha);
            // 32 empty records in a row are taken; one with data resets the run.
            for round in 0..2 {
                let mut wire = Vec::new();
                for _ in 0..MAX_EMPTY_RUN {
                    a.seal(&[], &mut wire).unwrap();
                }
                a.seal(&[b"x"], &mut wire).unwrap();
                let mut at = 0;
                while at < wire.len() {
                    let len = b.record_len(&wire[at..]).unwrap().unwrap();
                    assert!(
                        b.open(&mut wire[at..at + len]).is_ok(),
                        "{v:?} round {round}"
                    );
                    at += len;
                }
            }
            // The 33rd in a row is not.
            let mut wire = Vec::new();
            for _ in 0..=MAX_EMPTY_RUN {
                a.seal(&[], &mut wire).unwrap();
            }
            let mut at = 0;
            let mut last = Ok(Opened::Nothing);
            while at < wire.len() {
                let len = b.record_len(&wire[at..]).unwrap().unwrap();
                last = b.open(&mut wire[at..at + len]);
                at += len;
            }
            assert_eq!(last, Err(RecordError::Flood), "{v:?}");
        }
        // TLS 1.3: MAX_KEY_UPDATES key updates without data between them, then no more;
        // data between them starts the count again.
        let (mut a, mut b) = pair(ProtocolVersion::TLSv1_3, false);
        let update = |a: &mut Records, b: &mut Records| {
            let mut wire = Vec::new();
            a.seal_key_update(&mut wire).unwrap();
            b.open(&mut wire)
        };
        for round in 0..3 {
            for _ in 0..MAX_KEY_UPDATES {
                assert_eq!(
                    update(&mut a, &mut b),
                    Ok(Opened::KeyUpdate { requested: false }),
                    "round {round}"
                );
            }
            let mut wire = Vec::new();
            a.seal(&[b"data"], &mut wire).unwrap();
            assert!(matches!(b.open(&mut wire), Ok(Opened::Data(_))));
        }
        for _ in 0..MAX_KEY_UPDATES {
            update(&mut a, &mut b).unwrap();
        }
        assert_eq!(update(&mut a, &mut b), Err(RecordError::Flood));
    }

    #[test]
    fn a_fatal_alert_opens_as_that_alert_and_the_peers_ends_the_input_with_an_error() {
        for (v, chacha) in ALL {
            let (mut a, mut b) = pair(v, chacha);
            let mut wire = Vec::new();
            a.seal_fatal_alert(20, &mut wire).unwrap();
            assert_eq!(b.open(&mut wire), Err(RecordError::Alert(20)), "{v:?}");
        }
    }

    #[test]
    fn warnings_are_ignored_a_few_times_and_bad_alerts_are_refused() {
        let alert = |a: &mut Records, b: &mut Records, body: [u8; 2]| {
            let mut wire = Vec::new();
            a.seal_typed(CONTENT_ALERT, &[&body], &mut wire).unwrap();
            b.open(&mut wire)
        };
        // TLS 1.2 ignores any warning, TLS 1.3 only user_canceled: MAX_WARNINGS in a
        // connection's life, data between or not.
        for (v, warning) in [
            (ProtocolVersion::TLSv1_2, 113),
            (ProtocolVersion::TLSv1_3, 90),
        ] {
            let (mut a, mut b) = pair(v, false);
            for _ in 0..MAX_WARNINGS {
                assert_eq!(alert(&mut a, &mut b, [1, warning]), Ok(Opened::Nothing));
                let mut wire = Vec::new();
                a.seal(&[b"data"], &mut wire).unwrap();
                assert!(matches!(b.open(&mut wire), Ok(Opened::Data(_))));
            }
            assert_eq!(alert(&mut a, &mut b, [1, warning]), Err(RecordError::Flood));
        }
        for v in [ProtocolVersion::TLSv1_2, ProtocolVersion::TLSv1_3] {
            let (mut a, mut b) = pair(v, false);
            assert_eq!(alert(&mut a, &mut b, [2, 0]), Ok(Opened::CloseNotify));
            let (mut a, mut b) = pair(v, false);
            assert_eq!(
                alert(&mut a, &mut b, [3, 0]),
                Err(RecordError::IllegalAlert)
            );
            let (mut a, mut b) = pair(v, false);
            assert_eq!(alert(&mut a, &mut b, [2, 40]), Err(RecordError::Alert(40)));
        }
        // TLS 1.3: a warning other than user_canceled does not parse.
        let (mut a, mut b) = pair(ProtocolVersion::TLSv1_3, false);
        assert_eq!(alert(&mut a, &mut b, [1, 113]), Err(RecordError::Decode));
        assert_eq!(RecordError::Decode.alert(), Some(50));
        assert_eq!(RecordError::IllegalAlert.alert(), Some(47));
    }

    #[test]
    fn a_tls_1_3_inner_plaintext_over_its_limit_is_refused() {
        // 2^14 bytes of content, the type, and one byte of padding: one byte over (sealed by
        // hand: the layer never makes such a record).
        let (a, mut b) = pair(ProtocolVersion::TLSv1_3, false);
        let mut inner = vec![7u8; MAX_PLAINTEXT];
        inner.extend_from_slice(&[CONTENT_APPLICATION_DATA, 0]);
        let len = (inner.len() + TAG) as u16;
        let header = [CONTENT_APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let nonce = aead::Nonce::assume_unique_for_key(a.tx.nonce());
        a.tx.key
            .seal_in_place_append_tag(nonce, aead::Aad::from(header), &mut inner)
            .unwrap();
        let mut wire = header.to_vec();
        wire.extend_from_slice(&inner);
        assert_eq!(b.record_len(&wire), Ok(Some(wire.len())));
        assert_eq!(b.open(&mut wire), Err(RecordError::Oversized));
        // A KeyUpdate of a value other than 0 or 1 does not parse.
        let (mut a2, mut b2) = pair(ProtocolVersion::TLSv1_3, false);
        let mut wire = Vec::new();
        a2.seal_typed(
            CONTENT_HANDSHAKE,
            &[&[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 2]],
            &mut wire,
        )
        .unwrap();
        assert_eq!(b2.open(&mut wire), Err(RecordError::Decode));
    }

    #[test]
    fn tls_1_2_refuses_renegotiation() {
        let (mut a, mut b) = pair(ProtocolVersion::TLSv1_2, false);
        let mut wire = Vec::new();
        a.seal_typed(CONTENT_HANDSHAKE, &[&[1, 0, 0, 0]], &mut wire)
            .unwrap();
        assert_eq!(b.open(&mut wire), Err(RecordError::Handshake));
    }
}
