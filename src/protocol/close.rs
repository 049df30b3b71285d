//! Close codes and close-frame payloads (RFC 6455 sections 5.5.1 and 7.4).

use std::fmt;

/// A WebSocket close status code.
///
/// Any `u16` can be held; [`CloseCode::is_sendable`] tells whether it may appear on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (server shutdown, idle timeout).
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: protocol error.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: a data type the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1005: no status code was present. Reported locally, never sent.
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// 1006: the connection ended without a close frame. Reported locally, never sent.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: message data inconsistent with its type (invalid UTF-8 in a text message).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: a policy was violated (for example the backpressure limit).
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: a message is too big to process.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1010: the client expected an extension the server did not negotiate.
    pub const MANDATORY_EXTENSION: CloseCode = CloseCode(1010);
    /// 1011: the server met an unexpected condition.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1013 Try Again Later: the server is overloaded (RFC 6455's registry; wsloop sends it when
    /// it sheds a connection to stay within its memory budget).
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);

    /// Whether the code may be sent in a close frame: 1000-1003, 1007-1011 (the codes RFC 6455
    /// defines for endpoints to send), 1012-1014 (added to IANA's registry since: service
    /// restart, try again later, bad gateway) or 3000-4999 (registered and private use).
    pub fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The longest close reason that fits a control frame (125 bytes minus the 2-byte code).
pub const MAX_REASON_LEN: usize = 123;

/// A close payload received from the peer that breaks RFC 6455 section 5.5.1 or 7.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClosePayloadError {
    /// A payload of exactly one byte: a code needs two.
    Truncated,
    /// A status code outside the ranges an endpoint may send.
    InvalidCode(u16),
    /// The reason is not valid UTF-8.
    InvalidReason,
}

impl fmt::Display for ClosePayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClosePayloadError::Truncated => f.write_str("close payload of one byte"),
            ClosePayloadError::InvalidCode(c) => write!(f, "invalid close code {c}"),
            ClosePayloadError::InvalidReason => f.write_str("close reason is not UTF-8"),
        }
    }
}

impl std::error::Error for ClosePayloadError {}

/// Parse a close frame's (unmasked) payload.
///
/// An empty payload means "no status" and yields [`CloseCode::NO_STATUS`] with an empty reason.
/// Otherwise the first two bytes are a big-endian code that must be [sendable](CloseCode::is_sendable),
/// followed by a UTF-8 reason. Never panics.
pub fn parse_close_payload(payload: &[u8]) -> Result<(CloseCode, &str), ClosePayloadError> {
    match payload {
        [] => Ok((CloseCode::NO_STATUS, "")),
        [_] => Err(ClosePayloadError::Truncated),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_sendable() {
                return Err(ClosePayloadError::InvalidCode(code.0));
            }
            let reason =
                std::str::from_utf8(reason).map_err(|_| ClosePayloadError::InvalidReason)?;
            Ok((code, reason))
        }
    }
}

/// Cut `reason` to at most [`MAX_REASON_LEN`] bytes at a character boundary, so that a close
/// frame carrying it stays a valid control frame.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendable_ranges_follow_rfc_7_4_and_the_iana_registry() {
        for code in 0..=u16::MAX {
            let expected = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            assert_eq!(CloseCode(code).is_sendable(), expected, "code {code}");
        }
        assert!(!CloseCode::NO_STATUS.is_sendable());
        assert!(!CloseCode::ABNORMAL.is_sendable());
        assert!(!CloseCode(1004).is_sendable());
        assert!(!CloseCode(1015).is_sendable());
    }

    #[test]
    fn empty_payload_is_no_status() {
        assert_eq!(parse_close_payload(&[]), Ok((CloseCode::NO_STATUS, "")));
    }

    #[test]
    fn one_byte_payload_is_rejected() {
        assert_eq!(parse_close_payload(&[3]), Err(ClosePayloadError::Truncated));
    }

    #[test]
    fn code_and_reason_are_parsed() {
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice("bye κόσμε".as_bytes());
        assert_eq!(
            parse_close_payload(&p),
            Ok((CloseCode::NORMAL, "bye κόσμε"))
        );
        assert_eq!(
            parse_close_payload(&4999u16.to_be_bytes()),
            Ok((CloseCode(4999), ""))
        );
    }

    #[test]
    fn invalid_codes_are_rejected() {
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert_eq!(
                parse_close_payload(&code.to_be_bytes()),
                Err(ClosePayloadError::InvalidCode(code))
            );
        }
    }

    #[test]
    fn invalid_utf8_reason_is_rejected() {
        let p = [0x03, 0xe8, 0xce, 0xba, 0xed, 0xa0, 0x80];
        assert_eq!(
            parse_close_payload(&p),
            Err(ClosePayloadError::InvalidReason)
        );
    }

    #[test]
    fn reasons_are_truncated_at_char_boundaries() {
        let long = "é".repeat(100); // 200 bytes
        let cut = truncate_reason(&long);
        assert_eq!(cut.len(), 122);
        assert!(cut.len() <= MAX_REASON_LEN);
        assert_eq!(truncate_reason("short"), "short");
        let exact = "a".repeat(MAX_REASON_LEN);
        assert_eq!(truncate_reason(&exact).len(), MAX_REASON_LEN);
    }
}
