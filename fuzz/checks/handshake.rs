//! `handshake`: arbitrary bytes, cut into arbitrary chunks, through the request-head parser
//! (`handshake::parse` on the growing prefix and `Session::feed_head` on the chunks),
//! `validate_upgrade` and the response writers.
//!
//! Properties: nothing panics; the incremental parse agrees with a parse of the whole prefix;
//! every accepted request satisfies each rule of RFC 6455 section 4.2.1 (checked here from the
//! parsed head, independently of `validate_upgrade`), and every refusal is the documented first
//! failing rule; tungstenite's server accepts what wsloop accepts (where tungstenite's simpler
//! header matching applies); the 101 response is strictly well formed and its accept key equals
//! tungstenite's `derive_accept_key`; every refusal and every `write_response` answer is a
//! well-formed HTTP response with a matching `Content-Length`, whatever strings it was given.
//!
//! Input: `[flags, p1, p2, n]`, then `n % 16` chunk sizes (each byte + 1), then the request
//! bytes; the last chunk takes the rest. flags bit 0: limits from p1/p2 instead of the
//! defaults; bits 1-2: which subprotocol the application picks; bit 3: the application refuses
//! with status `u16::from_le_bytes([p1, p2])`.

use tungstenite::handshake::derive_accept_key;
use wsloop::protocol::handshake::{
    self, parse, validate_upgrade, write_accept, write_rejection, write_response, Limits, Parsed,
    Rejection, Request, Upgrade,
};
use wsloop::protocol::session::{Head, Session};

use super::util::{base64_decode, check_refusal, parse_response, tungstenite_parses, Reader};

/// Which subprotocol the application selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubChoice {
    None,
    First,
    Last,
    /// A string with control characters that the client never offered: the writer must still
    /// produce a well-formed response.
    Hostile,
}

pub struct Input<'a> {
    pub limits: Limits,
    pub sub: SubChoice,
    /// The application refuses the upgrade with this status.
    pub refuse: Option<u16>,
    pub chunks: Vec<&'a [u8]>,
    pub request: &'a [u8],
}

pub fn decode(data: &[u8]) -> Input<'_> {
    let mut r = Reader::new(data);
    let (flags, p1, p2, n) = (r.u8(), r.u8(), r.u8(), r.u8() % 16);
    let sizes: Vec<usize> = r
        .bytes(n.into())
        .iter()
        .map(|&b| usize::from(b) + 1)
        .collect();
    let request = r.rest();
    let limits = if flags & 1 != 0 {
        Limits {
            max_header_bytes: 64 + usize::from(p1) * 16,
            max_headers: 1 + usize::from(p2) % 140,
        }
    } else {
        Limits::default()
    };
    let sub = [
        SubChoice::None,
        SubChoice::First,
        SubChoice::Last,
        SubChoice::Hostile,
    ][usize::from(flags >> 1) & 3];
    let refuse = (flags & 8 != 0).then(|| u16::from_le_bytes([p1, p2]));
    let mut chunks = Vec::new();
    let mut rest = request;
    for size in sizes {
        if rest.is_empty() {
            break;
        }
        let (c, r) = rest.split_at(size.min(rest.len()));
        chunks.push(c);
        rest = r;
    }
    if !rest.is_empty() {
        chunks.push(rest);
    }
    Input {
        limits,
        sub,
        refuse,
        chunks,
        request,
    }
}

pub fn run(data: &[u8]) {
    check(&decode(data));
}

pub fn check(input: &Input<'_>) {
    let limits = &input.limits;
    check_prefixes(input);
    check_session(input);
    let mut out = b"earlier".to_vec();
    match parse(input.request, limits) {
        Ok(Parsed::Partial) => {}
        Err(rej) => {
            assert_ne!(rej, Rejection::HttpVersion);
            check_rejection(&rej);
        }
        Ok(Parsed::Complete { request, head_len }) => {
            assert!(head_len <= input.request.len().min(limits.max_header_bytes));
            check_request(input, &request);
            // The loop's own answers, with strings taken from the request.
            let status = u16::from_le_bytes([head_len as u8, (head_len >> 8) as u8]);
            let reason = request.path();
            let first = request.headers().next().unwrap_or(("", b""));
            let name = String::from_utf8_lossy(first.1);
            let value = String::from_utf8_lossy(&input.request[..head_len.min(200)]);
            let extra = [(&*name, &*value), (first.0, reason), ("Retry-After", "5")];
            out.clear();
            write_response(&mut out, status, reason, &extra, first.1);
            check_written_response(&out, status, reason, &extra, first.1);
        }
    }
}

/// `parse` on the growing prefix at every chunk boundary: `Partial` until the head completes,
/// then always the same head; an error, once reported, is reported again for every longer
/// prefix.
fn check_prefixes(input: &Input<'_>) {
    let limits = &input.limits;
    let mut end = 0;
    let mut seen: Option<Result<(usize, String), Rejection>> = None;
    for chunk in &input.chunks {
        end += chunk.len();
        let now = match parse(&input.request[..end], limits) {
            Ok(Parsed::Partial) => {
                assert!(seen.is_none(), "{seen:?} then Partial at {end}");
                assert!(end <= limits.max_header_bytes);
                continue;
            }
            Ok(Parsed::Complete { request, head_len }) => Ok((head_len, format!("{request:?}"))),
            Err(e) => Err(e),
        };
        if let Some(before) = &seen {
            assert_eq!(before, &now, "prefix of {end} bytes");
        }
        seen = Some(now);
    }
}

/// `Session::feed_head` over the chunks agrees with `parse` of the bytes fed so far, keeps at
/// most `max_header_bytes` (+ the last chunk) buffered, and hands back exactly the bytes after
/// the head.
fn check_session(input: &Input<'_>) {
    let limits = &input.limits;
    let mut session = Session::new();
    let mut fed = 0;
    for chunk in &input.chunks {
        fed += chunk.len();
        let prefix = &input.request[..fed];
        let whole = parse(prefix, limits);
        let got = session.feed_head(chunk, limits);
        let done = match (got, whole) {
            (Ok(Head::Partial), Ok(Parsed::Partial)) => None,
            // The buffered path looks for the end of the head before parsing, so a malformed
            // head (or one with too many fields) that has not ended yet and is within the size
            // limit is still "partial".
            (Ok(Head::Partial), Err(e)) => {
                assert!(fed > chunk.len(), "unbuffered partial vs {e:?}");
                assert!(matches!(
                    e,
                    Rejection::Malformed | Rejection::TooManyHeaders
                ));
                None
            }
            (
                Ok(Head::Complete {
                    request,
                    head_len,
                    buffered,
                }),
                Ok(Parsed::Complete {
                    request: want,
                    head_len: want_len,
                }),
            ) => {
                assert_eq!(head_len, want_len);
                assert_eq!(format!("{request:?}"), format!("{want:?}"));
                assert_eq!(buffered, fed > chunk.len());
                Some((head_len, buffered))
            }
            (Err(e), Err(want)) => {
                assert_eq!(e, want, "after {fed} bytes");
                session.finish_rejected();
                assert_eq!(session.buffered_capacity(), 0);
                return;
            }
            (got, whole) => panic!("after {fed} bytes: session {got:?}, parse {whole:?}"),
        };
        if let Some((head_len, buffered)) = done {
            let rest = session.finish_handshake(head_len, buffered);
            let want: &[u8] = if buffered { &prefix[head_len..] } else { &[] };
            assert_eq!(rest, want);
            assert_eq!(session.buffered_len(), 0);
            return;
        }
        assert_eq!(
            session.buffered_len(),
            fed,
            "the whole partial head is kept"
        );
        assert!(session.buffered_len() <= limits.max_header_bytes);
        assert!(
            session.buffered_capacity() <= limits.max_header_bytes + chunk.len(),
            "capacity {} for {} buffered bytes, limit {}",
            session.buffered_capacity(),
            fed,
            limits.max_header_bytes
        );
    }
}

/// Every value of header `name`.
fn values<'b>(req: &Request<'b>, name: &str) -> Vec<&'b [u8]> {
    let matching = req.headers().filter(|(n, _)| n.eq_ignore_ascii_case(name));
    matching.map(|(_, v)| v).collect()
}

/// The comma-separated items of every value of header `name`, trimmed, empty ones skipped.
fn items<'b>(req: &Request<'b>, name: &str) -> Vec<&'b [u8]> {
    let split = values(req, name)
        .into_iter()
        .flat_map(|v| v.split(|&c| c == b','));
    split
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect()
}

fn has_item(req: &Request<'_>, name: &str, token: &str) -> bool {
    items(req, name)
        .iter()
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The outcome `validate_upgrade` documents: its rules in its order, written out again here.
fn expected_outcome(req: &Request<'_>) -> Result<(), Rejection> {
    use Rejection::*;
    if req.method() != "GET" {
        return Err(MethodNotAllowed);
    }
    if req.version() != 1 {
        return Err(HttpVersion);
    }
    if !is_resource_target(req) {
        return Err(Malformed);
    }
    match values(req, "host")[..] {
        [] => return Err(MissingHost),
        [[]] => return Err(MissingHost),
        [h] if !is_authority(h) => return Err(Malformed),
        [_] => {}
        _ => return Err(DuplicateHost),
    }
    if !has_item(req, "upgrade", "websocket") {
        return Err(NotWebSocket);
    }
    if !has_item(req, "connection", "upgrade") {
        return Err(ConnectionNotUpgrade);
    }
    let versions = values(req, "sec-websocket-version");
    if versions.is_empty() {
        return Err(MissingVersion);
    }
    if versions.iter().any(|v| *v != b"13") {
        return Err(UnsupportedVersion);
    }
    match values(req, "sec-websocket-key")[..] {
        [] => return Err(MissingKey),
        [k] if k.len() == 24 && base64_decode(k).is_some_and(|d| d.len() == 16) => {}
        [_] => return Err(InvalidKey),
        _ => return Err(DuplicateKey),
    }
    let zero = |v: &&[u8]| !v.is_empty() && v.iter().all(|&c| c == b'0');
    let lengths = values(req, "content-length");
    if !lengths.iter().all(zero) || !values(req, "transfer-encoding").is_empty() {
        return Err(BodyNotAllowed);
    }
    if values(req, "origin").len() > 1 {
        return Err(DuplicateOrigin);
    }
    Ok(())
}

/// The request target is origin-form (a resource name) or an absolute http(s) or ws(s) URI.
fn is_resource_target(req: &Request<'_>) -> bool {
    // The target as sent: `path` drops an absolute-form target's scheme and authority.
    let t = req.target().as_bytes();
    let absolute = ["http://", "https://", "ws://", "wss://"]
        .iter()
        .any(|s| t.len() > s.len() && t[..s.len()].eq_ignore_ascii_case(s.as_bytes()));
    t.starts_with(b"/") || absolute
}

/// RFC 3986 authority (`host [":" port]`) as the Host header must carry it (RFC 7230 5.4).
fn is_authority(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(end) = v.iter().position(|&c| c == b']') else {
            return false;
        };
        let inner = &v[1..end];
        let ip_literal = |c: &u8| c.is_ascii_hexdigit() || b":.vV-_~!$&'()*+,;=".contains(c);
        if inner.is_empty() || !inner.iter().all(ip_literal) {
            return false;
        }
        (&v[..=end], &v[end + 1..])
    } else {
        match v.iter().position(|&c| c == b':') {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, &[][..]),
        }
    };
    let reg_name = |c: &u8| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(c);
    let host_ok = host.first() == Some(&b'[') || (!host.is_empty() && host.iter().all(reg_name));
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// RFC 6455 section 4.2.1, rule by rule, for an accepted request. Returns the first rule broken.
fn rfc6455_violation(req: &Request<'_>) -> Option<&'static str> {
    // 1. An HTTP/1.1 or higher GET request, including a Request-URI that is a resource name
    //    (origin-form) or an absolute HTTP/HTTPS (or ws/wss) URI.
    if req.method() != "GET" || req.version() < 1 {
        return Some("1: GET, HTTP/1.1 or higher");
    }
    if !is_resource_target(req) {
        return Some("1: Request-URI is a resource name or an absolute URI");
    }
    // 2. A Host header field containing the server's authority.
    match values(req, "host")[..] {
        [h] if is_authority(h) => {}
        _ => return Some("2: one Host header with an authority"),
    }
    // 3. An Upgrade header field containing the value "websocket" (case-insensitive).
    if !has_item(req, "upgrade", "websocket") {
        return Some("3: Upgrade contains websocket");
    }
    // 4. A Connection header field that includes the token "Upgrade" (case-insensitive).
    if !has_item(req, "connection", "upgrade") {
        return Some("4: Connection includes Upgrade");
    }
    // 5. A Sec-WebSocket-Key whose value base64-decodes to 16 bytes.
    match values(req, "sec-websocket-key")[..] {
        [k] if base64_decode(k).is_some_and(|d| d.len() == 16) => {}
        _ => return Some("5: Sec-WebSocket-Key of 16 bytes"),
    }
    // 6. A Sec-WebSocket-Version header field with a value of 13.
    let versions = values(req, "sec-websocket-version");
    if versions.is_empty() || versions.iter().any(|v| *v != b"13") {
        return Some("6: Sec-WebSocket-Version 13");
    }
    // 7-10 (Origin, Sec-WebSocket-Protocol, Sec-WebSocket-Extensions, others) are optional.
    None
}

/// True if any value of the headers whose item lists are compared contains a quote or a
/// backslash (quoted strings: wsloop's list splitting honours them, the simple one here not).
fn has_quotes(req: &Request<'_>) -> bool {
    let listed = [
        "upgrade",
        "connection",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
    ];
    listed.iter().any(|n| {
        let v = values(req, n);
        v.iter().any(|v| v.contains(&b'"') || v.contains(&b'\\'))
    })
}

/// A complete head: `validate_upgrade` against the rules, then the responses.
fn check_request(input: &Input<'_>, req: &Request<'_>) {
    let verdict = validate_upgrade(req);
    let quotes = has_quotes(req);
    if !quotes {
        assert_eq!(verdict.map(|_| ()), expected_outcome(req), "{req:?}");
    }
    if !req.is_upgrade() {
        assert!(quotes || !has_item(req, "upgrade", "websocket"));
        // The loop answers a plain HTTP request this way.
        let mut out = Vec::new();
        let body = b"this is a WebSocket endpoint\n";
        write_response(
            &mut out,
            426,
            "this is a WebSocket endpoint",
            &[("Upgrade", "websocket")],
            body,
        );
        let (resp, got) = check_refusal(&out, Some(426));
        assert_eq!(got, body);
        assert_eq!(resp.one("upgrade"), Some(&b"websocket"[..]));
    }
    match verdict {
        Err(rej) => check_rejection(&rej),
        Ok(up) => {
            if let Some(rule) = rfc6455_violation(req) {
                panic!("accepted a request that breaks rule {rule}: {req:?}");
            }
            check_upgrade(&up, req, quotes);
            check_tungstenite_accepts(input, req);
            check_decision(input, &up);
        }
    }
}

/// The accessors of an accepted upgrade return what the head carries.
fn check_upgrade(up: &Upgrade<'_>, req: &Request<'_>, quotes: bool) {
    assert_eq!(up.key(), values(req, "sec-websocket-key")[0]);
    assert_eq!(up.host(), values(req, "host")[0]);
    assert_eq!(up.origin(), values(req, "origin").first().copied());
    if !quotes {
        let utf8 = |v: &[u8]| std::str::from_utf8(v).ok().map(str::to_owned);
        let protocols: Vec<String> = items(req, "sec-websocket-protocol")
            .into_iter()
            .filter_map(utf8)
            .collect();
        assert_eq!(up.subprotocols().collect::<Vec<_>>(), protocols);
        let extensions: Vec<String> = items(req, "sec-websocket-extensions")
            .into_iter()
            .filter_map(utf8)
            .collect();
        assert_eq!(up.extensions().collect::<Vec<_>>(), extensions);
    }
}

/// tungstenite's server, given the same head, accepts it and derives the same accept key, as
/// long as its simpler header matching applies (one Upgrade header that is exactly
/// "websocket", one Connection header without tabs or quotes, ASCII values, a parseable URI).
fn check_tungstenite_accepts(input: &Input<'_>, req: &Request<'_>) {
    use tungstenite::handshake::machine::TryParse;
    use tungstenite::handshake::server::{create_response, Request as TRequest};
    let upgrade = values(req, "upgrade");
    let connection = values(req, "connection");
    let simple = upgrade.len() == 1
        && upgrade[0].eq_ignore_ascii_case(b"websocket")
        && connection.len() == 1
        && !connection[0].iter().any(|&c| c == b'\t' || c == b'"')
        && req.headers().all(|(_, v)| v.is_ascii())
        && values(req, "sec-websocket-version").len() == 1;
    if !simple {
        return;
    }
    let Ok(Some((_, treq))) = TRequest::try_parse(input.request) else {
        return; // e.g. a request target that `http::Uri` refuses
    };
    let resp = create_response(&treq).unwrap_or_else(|e| {
        panic!("wsloop accepts, tungstenite refuses ({e}): {req:?}");
    });
    let accept = resp.headers()["Sec-WebSocket-Accept"].as_bytes();
    assert_eq!(
        accept,
        handshake::accept_key(values(req, "sec-websocket-key")[0])
    );
}

/// The application's decision: a refusal or a 101, each checked.
fn check_decision(input: &Input<'_>, up: &Upgrade<'_>) {
    let mut out = Vec::new();
    if let Some(status) = input.refuse {
        let rej = Rejection::custom(status, "refused by the application");
        let want = if (400..=599).contains(&status) {
            status
        } else {
            500
        };
        assert_eq!(rej.status(), want);
        write_rejection(&mut out, &rej);
        let (_, body) = check_refusal(&out, Some(want));
        assert_eq!(body, b"refused by the application\n");
        return;
    }
    let offered: Vec<&str> = up.subprotocols().collect();
    let sub = match input.sub {
        SubChoice::None => None,
        SubChoice::First => offered.first().copied(),
        SubChoice::Last => offered.last().copied(),
        SubChoice::Hostile => Some("chat\r\nSet-Cookie: x=1\r\n\r\nHTTP/1.1 200 OK"),
    };
    write_accept(&mut out, up.key(), sub);
    let head = check_accept(&out, up.key(), sub);
    assert_eq!(head, out.len(), "bytes after the 101 head");
}

/// Checks a 101 response at the start of `bytes` accepting `key` with subprotocol `sub`; returns
/// the length of its head (what follows is WebSocket frames).
pub fn check_accept(bytes: &[u8], key: &[u8], sub: Option<&str>) -> usize {
    let text = String::from_utf8_lossy(bytes);
    let resp = parse_response(bytes).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(resp.status, 101, "{text:?}");
    assert_eq!(resp.reason, b"Switching Protocols");
    let upgrade = resp.one("upgrade").expect("Upgrade header");
    assert!(upgrade.eq_ignore_ascii_case(b"websocket"), "{text:?}");
    let connection = resp.one("connection").expect("Connection header");
    assert!(connection.eq_ignore_ascii_case(b"upgrade"), "{text:?}");
    let accept = resp
        .one("sec-websocket-accept")
        .expect("Sec-WebSocket-Accept");
    assert_eq!(accept, derive_accept_key(key).as_bytes());
    let sub = sub.filter(|s| !s.is_empty());
    match sub {
        Some(s) => {
            let clean: Vec<u8> = s
                .bytes()
                .map(|c| {
                    if c < 0x20 && c != b'\t' || c == 0x7f {
                        b' '
                    } else {
                        c
                    }
                })
                .collect();
            let got = resp.one("sec-websocket-protocol").expect("subprotocol");
            assert_eq!(got, clean.trim_ascii(), "{text:?}");
        }
        None => assert!(resp.one("sec-websocket-protocol").is_none(), "{text:?}"),
    }
    assert_eq!(
        resp.headers.len(),
        3 + usize::from(sub.is_some()),
        "{text:?}"
    );
    tungstenite_parses(&bytes[..resp.head_len], 101);
    resp.head_len
}

/// `write_rejection` writes a complete refusal with the documented status, headers and body.
fn check_rejection(rej: &Rejection) {
    let mut out = Vec::new();
    write_rejection(&mut out, rej);
    let (resp, body) = check_refusal(&out, Some(rej.status()));
    assert_eq!(body, format!("{}\n", rej.reason()).as_bytes());
    assert_eq!(
        resp.one("content-type"),
        Some(&b"text/plain; charset=utf-8"[..])
    );
    match rej.status() {
        405 => assert_eq!(resp.one("allow"), Some(&b"GET"[..])),
        426 => {
            assert_eq!(resp.one("sec-websocket-version"), Some(&b"13"[..]));
            assert_eq!(resp.one("upgrade"), Some(&b"websocket"[..]));
            assert_eq!(resp.one("connection"), Some(&b"close, Upgrade"[..]));
        }
        _ => {}
    }
}

/// `write_response` with arbitrary strings: one well-formed response, the caller's headers
/// each on one line (none injected, framing headers dropped), the body intact.
fn check_written_response(
    out: &[u8],
    status: u16,
    reason: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) {
    let text = String::from_utf8_lossy(out);
    let resp = parse_response(out).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let want = if (100..=599).contains(&status) {
        status
    } else {
        500
    };
    assert_eq!(resp.status, want, "{text:?}");
    if reason.is_empty() {
        assert_eq!(resp.reason, handshake::status_phrase(want).as_bytes());
    }
    assert_eq!(&out[resp.head_len..], body, "{text:?}");
    let len = resp.one("content-length").expect("Content-Length");
    assert_eq!(len, body.len().to_string().as_bytes());
    assert_eq!(resp.one("connection"), Some(&b"close"[..]));
    let framing = ["content-length", "connection", "transfer-encoding"];
    let kept = extra
        .iter()
        .filter(|(n, _)| !n.is_empty() && !framing.iter().any(|f| n.eq_ignore_ascii_case(f)));
    let has_type = kept
        .clone()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"));
    let want_headers = kept.count() + 2 + usize::from(!body.is_empty() && !has_type);
    assert_eq!(resp.headers.len(), want_headers, "{text:?}");
    tungstenite_parses(out, want);
}
