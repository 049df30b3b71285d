//! `extensions`: the permessage-deflate offer parser and negotiation
//! (`wsloop::protocol::deflate::negotiate`) on arbitrary `Sec-WebSocket-Extensions` lines.
//!
//! Properties: nothing panics; an accepted offer answers the shared profile (both
//! `no_context_takeover`s, a server window of 9 to 15 bits when one is answered, never a client
//! window), and the input holds a `permessage-deflate` offer (case-insensitively) that asked for
//! that server window; the answer's own header value, negotiated again, gives the same
//! agreement (what the server writes is a valid offer of itself); when every line parses, the
//! lines joined into one with commas give the same result (several header lines are one list,
//! RFC 7230 section 3.2.2); a line that does not parse makes the whole header malformed, so
//! appending a line changes nothing once one is malformed.
//!
//! Input: the header lines, separated by `\n`.

use wsloop::protocol::deflate::{negotiate, Agreement, Profile};

const DEDICATED: Profile = Profile::Dedicated { window_bits: 12 };

pub fn run(data: &[u8]) {
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let result = negotiate(lines.iter().copied(), Profile::Shared);
    // The dedicated profile accepts and declines the same offers, answers at most what the
    // shared one does, and never a window above its own.
    let dedicated = negotiate(lines.iter().copied(), DEDICATED);
    match (&result, &dedicated) {
        (Ok(Some(s)), Ok(Some(d))) => {
            assert!(!d.server_no_context_takeover || s.server_no_context_takeover);
            assert!(!d.client_no_context_takeover || s.client_no_context_takeover);
            assert_eq!(d.client_max_window_bits, None, "{d:?}");
            assert_eq!(
                d.server_max_window_bits,
                s.server_max_window_bits.map(|b| b.min(12))
            );
        }
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        (s, d) => panic!("shared {s:?}, dedicated {d:?}"),
    }
    match result {
        Ok(Some(a)) => check_agreement(&a, data),
        Ok(None) => {}
        Err(m) => {
            assert!(m.0.starts_with("malformed Sec-WebSocket-Extensions"), "{m}");
            // Malformed stays malformed whatever follows.
            let more = lines.iter().copied().chain([&b"permessage-deflate"[..]]);
            assert!(negotiate(more, Profile::Shared).is_err());
        }
    }
    if result.is_ok() {
        let joined = lines.join(&b","[..]);
        assert_eq!(
            negotiate([&joined[..]], Profile::Shared),
            result,
            "joined lines differ"
        );
    }
}

fn check_agreement(a: &Agreement, data: &[u8]) {
    assert!(
        a.server_no_context_takeover && a.client_no_context_takeover,
        "{a:?}"
    );
    assert_eq!(a.client_max_window_bits, None, "{a:?}");
    if let Some(bits) = a.server_max_window_bits {
        assert!((9..=15).contains(&bits), "{a:?}");
        // The digits, maybe inside a quoted string with escapes.
        let unescaped: Vec<u8> = data.iter().copied().filter(|&c| c != b'\\').collect();
        let asked = format!("{bits}");
        assert!(
            unescaped
                .windows(asked.len())
                .any(|w| w == asked.as_bytes()),
            "{a:?}: the input never says {asked}"
        );
    }
    assert!((9..=15).contains(&a.deflate_window_bits()));
    let lower = data.to_ascii_lowercase();
    assert!(
        lower.windows(18).any(|w| w == b"permessage-deflate"),
        "accepted without an offer"
    );
    let mut line = Vec::new();
    a.write_header(&mut line);
    let value = line
        .strip_prefix(b"Sec-WebSocket-Extensions: ")
        .and_then(|v| v.strip_suffix(b"\r\n"))
        .expect("the header line's shape");
    assert_eq!(
        negotiate([value], Profile::Shared),
        Ok(Some(*a)),
        "the answer is not an offer of itself"
    );
}
