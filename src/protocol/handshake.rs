//! HTTP/1.1 WebSocket opening handshake, server side (RFC 6455 §4.2).
//!
//! Sans-IO: [`parse`] reads a request head out of a byte buffer the event loop
//! owns, [`validate_upgrade`] applies the RFC 6455 rules, and the `write_*`
//! functions append a complete response to the connection's output buffer.
//! Nothing here touches a socket or a clock, and nothing allocates except by
//! growing the caller's `Vec<u8>`.

use std::fmt;
use std::io::Write as _;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The most header lines the parser keeps (its stack array); `max_headers` above it counts as it.
pub use crate::config::MAX_HEADERS_CAP;

/// The GUID RFC 6455 appends to `Sec-WebSocket-Key` before hashing.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Size limits applied by [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request head accepted, in bytes, final blank line included
    /// (default 8192). A longer head, or more buffered bytes than this without
    /// a complete head, is rejected with 431.
    pub max_header_bytes: usize,
    /// Most header fields accepted (default 64); more is rejected with 431.
    /// Values above [`MAX_HEADERS_CAP`] are treated as `MAX_HEADERS_CAP`.
    pub max_headers: usize,
}

impl Default for Limits {
    /// `max_header_bytes: 8192`, `max_headers: 64`.
    fn default() -> Self {
        Limits {
            max_header_bytes: 8192,
            max_headers: 64,
        }
    }
}

/// Why a handshake was refused, carrying the HTTP status to answer with.
///
/// Every built-in variant is one rule of [`parse`] or [`validate_upgrade`];
/// [`Rejection::custom`] builds one for an application's own refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 400: httparse could not parse the request head, or its target or `Host`
    /// is not well formed (see [`validate_upgrade`]).
    Malformed,
    /// 431: the head exceeds [`Limits::max_header_bytes`].
    HeadersTooLarge,
    /// 431: more header fields than [`Limits::max_headers`].
    TooManyHeaders,
    /// 405 (answered with `Allow: GET`, as nginx does): method is not GET.
    MethodNotAllowed,
    /// 400: request is HTTP/1.0; the upgrade needs HTTP/1.1.
    HttpVersion,
    /// 400: no `Host` header, or an empty one.
    MissingHost,
    /// 400: more than one `Host` header (RFC 7230 §5.4).
    DuplicateHost,
    /// 400: `Upgrade` header missing or without the `websocket` token.
    NotWebSocket,
    /// 400: `Connection` header missing or without the `upgrade` token.
    ConnectionNotUpgrade,
    /// 400: no `Sec-WebSocket-Key` header.
    MissingKey,
    /// 400: more than one `Sec-WebSocket-Key` header.
    DuplicateKey,
    /// 400: `Sec-WebSocket-Key` is not padded standard base64 of 16 bytes.
    InvalidKey,
    /// 426 (answered with `Sec-WebSocket-Version: 13`): no version header.
    MissingVersion,
    /// 426 (answered with `Sec-WebSocket-Version: 13`): version is not `13`.
    UnsupportedVersion,
    /// 400: the request declares a body (`Content-Length` other than 0, or
    /// any `Transfer-Encoding`); bytes after the head belong to WebSocket.
    BodyNotAllowed,
    /// 400: more than one `Origin` header (a browser sends at most one, RFC 6454 section
    /// 7.3); an origin check reading only one of them could be fooled by the other.
    DuplicateOrigin,
    /// An application-chosen refusal; build it with [`Rejection::custom`].
    Custom {
        /// HTTP status; [`Rejection::status`] maps anything outside 400..=599 to 500.
        status: u16,
        /// Short human reason, sent as the response body.
        reason: &'static str,
    },
}

impl Rejection {
    /// An application refusal with any error status. A `status` outside
    /// `400..=599` is replaced by 500: a refusal must never look like success
    /// (2xx), a redirect (3xx) or, worst, a `101` that switches protocols.
    pub fn custom(status: u16, reason: &'static str) -> Rejection {
        let status = Some(status).filter(|s| (400..=599).contains(s));
        Rejection::Custom {
            status: status.unwrap_or(500),
            reason,
        }
    }

    /// The HTTP status to answer with, always in `400..=599`.
    pub fn status(&self) -> u16 {
        match *self {
            Rejection::HeadersTooLarge | Rejection::TooManyHeaders => 431,
            Rejection::MethodNotAllowed => 405,
            Rejection::MissingVersion | Rejection::UnsupportedVersion => 426,
            Rejection::Custom { status, .. } if (400..=599).contains(&status) => status,
            Rejection::Custom { .. } => 500,
            _ => 400,
        }
    }

    /// A short human-readable reason, used as the response body.
    pub fn reason(&self) -> &'static str {
        match *self {
            Rejection::Malformed => "malformed request",
            Rejection::HeadersTooLarge => "request head too large",
            Rejection::TooManyHeaders => "too many request headers",
            Rejection::MethodNotAllowed => "WebSocket upgrade requires GET",
            Rejection::HttpVersion => "WebSocket upgrade requires HTTP/1.1",
            Rejection::MissingHost => "Host header required",
            Rejection::DuplicateHost => "Host header must appear once",
            Rejection::NotWebSocket => "Upgrade: websocket required",
            Rejection::ConnectionNotUpgrade => "Connection: Upgrade required",
            Rejection::MissingKey => "Sec-WebSocket-Key required",
            Rejection::DuplicateKey => "Sec-WebSocket-Key must appear once",
            Rejection::InvalidKey => "Sec-WebSocket-Key must be base64 of 16 bytes",
            Rejection::MissingVersion => "Sec-WebSocket-Version required",
            Rejection::UnsupportedVersion => "Sec-WebSocket-Version must be 13",
            Rejection::BodyNotAllowed => "upgrade request must not have a body",
            Rejection::DuplicateOrigin => "Origin header must appear at most once",
            Rejection::Custom { reason, .. } => reason,
        }
    }
}

impl fmt::Display for Rejection {
    /// `"<status> <reason>"`, e.g. `400 Host header required`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status(), self.reason())
    }
}

impl std::error::Error for Rejection {}

/// A parsed HTTP/1.x request head borrowing the caller's buffer.
#[derive(Clone)]
pub struct Request<'b> {
    method: &'b str,
    target: &'b str,
    version: u8,
    headers: [(&'b str, &'b [u8]); MAX_HEADERS_CAP],
    len: usize,
}

impl<'b> Request<'b> {
    /// The request method exactly as sent (methods are case-sensitive).
    pub fn method(&self) -> &'b str {
        self.method
    }

    /// The request target exactly as sent: origin-form (`/room?x=1`) or absolute-form
    /// (`http://host/room`); [`Request::path`] and [`Request::query`] are its parts.
    pub fn target(&self) -> &'b str {
        self.target
    }

    /// The path of the request target, up to (not including) the first `?`: for an
    /// absolute-form target (`http://host/room`, which proxies send and RFC 7230 section 5.3.2
    /// has servers accept), its path after the authority, `/` when it has none.
    pub fn path(&self) -> &'b str {
        let before_query = self.target.split_once('?').map_or(self.target, |(p, _)| p);
        match before_query.split_once("://") {
            Some((scheme, rest)) if !scheme.contains('/') => {
                rest.find('/').map_or("/", |at| &rest[at..])
            }
            _ => before_query,
        }
    }

    /// The text after the first `?` of the target (possibly empty), or `None`.
    pub fn query(&self) -> Option<&'b str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// The value of the first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        self.header_all(name).next()
    }

    /// The values of every header named `name` (ASCII case-insensitive), in order.
    pub fn header_all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b [u8]> + 's {
        self.headers()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// All header fields `(name, value)` in the order received; values are
    /// stripped of surrounding whitespace by httparse.
    pub fn headers(&self) -> impl Iterator<Item = (&'b str, &'b [u8])> + '_ {
        self.headers[..self.len].iter().copied()
    }

    /// True if some `Upgrade` header lists the token `websocket`
    /// (case-insensitive, comma-separated list). Says nothing about validity.
    pub fn is_upgrade(&self) -> bool {
        has_token(self, "upgrade", b"websocket")
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (method, target, minor) = (self.method, self.target, self.version);
        write!(f, "{method} {target} HTTP/1.{minor} ")?;
        let lossy = |(n, v): (&str, &[u8])| (n.to_owned(), String::from_utf8_lossy(v).into_owned());
        f.debug_map().entries(self.headers().map(lossy)).finish()
    }
}

/// Result of [`parse`].
// `Request` is ~4 KiB of fixed header slots; it lives briefly on the stack,
// which beats a heap allocation per handshake.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Parsed<'b> {
    /// The buffer holds a valid prefix of a request head; read more bytes.
    Partial,
    /// A complete head. `head_len` bytes (final blank line included) belong to
    /// it; any bytes after them belong to the next protocol (WebSocket frames).
    Complete {
        /// The parsed head.
        request: Request<'b>,
        /// Length of the head in `buf`.
        head_len: usize,
    },
}

/// Parses an HTTP/1.x request head from the start of `buf`.
///
/// Returns `Ok(Partial)` for any valid prefix of a head within the limits,
/// `Ok(Complete)` once the blank line has arrived, and otherwise
/// [`Rejection::Malformed`] (400), [`Rejection::TooManyHeaders`] (431) or
/// [`Rejection::HeadersTooLarge`] (431: `buf` is longer than
/// `max_header_bytes` without a complete head, or the head is longer than it).
/// At most `max_header_bytes` bytes are examined, so repeated calls on a
/// growing buffer cost at most that much each.
pub fn parse<'b>(buf: &'b [u8], limits: &Limits) -> Result<Parsed<'b>, Rejection> {
    let window = &buf[..buf.len().min(limits.max_header_bytes)];
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let max_headers = limits.max_headers.min(MAX_HEADERS_CAP);
    let mut req = httparse::Request::new(&mut raw[..max_headers]);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_header_bytes => {
            return Err(Rejection::HeadersTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(Rejection::TooManyHeaders),
        Err(_) => return Err(Rejection::Malformed),
    };
    let mut request = Request {
        method: req.method.unwrap_or(""),
        target: req.path.unwrap_or(""),
        version: req.version.unwrap_or(0),
        headers: [("", &[][..]); MAX_HEADERS_CAP],
        len: req.headers.len(),
    };
    for (slot, h) in request.headers.iter_mut().zip(req.headers.iter()) {
        *slot = (h.name, h.value);
    }
    Ok(Parsed::Complete { request, head_len })
}

/// A request that passed [`validate_upgrade`].
#[derive(Debug, Clone, Copy)]
pub struct Upgrade<'r> {
    req: &'r Request<'r>,
    key: &'r [u8],
    host: &'r [u8],
}

impl<'r> Upgrade<'r> {
    /// The `Sec-WebSocket-Key` value as sent (24 base64 characters); pass it
    /// to [`accept_key`] or [`write_accept`].
    pub fn key(&self) -> &'r [u8] {
        self.key
    }

    /// Subprotocols offered in every `Sec-WebSocket-Protocol` header, in order:
    /// comma-separated, trimmed, empty and non-UTF-8 items skipped.
    pub fn subprotocols(&self) -> impl Iterator<Item = &'r str> + 'r {
        self.req
            .header_all("sec-websocket-protocol")
            .flat_map(list_items)
            .filter_map(|item| std::str::from_utf8(item).ok())
    }

    /// Raw extension offers from every `Sec-WebSocket-Extensions` header, in
    /// order, split on commas outside quoted strings and trimmed, parameters
    /// left in place (e.g. `permessage-deflate; client_max_window_bits`).
    /// Empty and non-UTF-8 items are skipped.
    pub fn extensions(&self) -> impl Iterator<Item = &'r str> + 'r {
        self.req
            .header_all("sec-websocket-extensions")
            .flat_map(list_items)
            .filter_map(|item| std::str::from_utf8(item).ok())
    }

    /// The `Origin` header, if any (browsers always send one; a request with two is refused).
    pub fn origin(&self) -> Option<&'r [u8]> {
        self.req.header("origin")
    }

    /// The `Host` header value (present exactly once and non-empty).
    pub fn host(&self) -> &'r [u8] {
        self.host
    }

    /// The whole request, for path, query, cookies and other headers.
    pub fn request(&self) -> &'r Request<'r> {
        self.req
    }
}

/// Checks that `req` is a valid RFC 6455 opening handshake.
///
/// Rules, checked in this order, each with its own [`Rejection`]: method GET
/// (405 `Allow: GET`); HTTP/1.1 (400); a target that is a path or an absolute http(s)/ws(s)
/// URI ([`Rejection::Malformed`], 400); exactly one non-empty `Host` (400) that is a valid
/// authority, `host[:port]` ([`Rejection::Malformed`], 400);
/// `Upgrade` lists `websocket` (400); `Connection` lists `upgrade` (400);
/// `Sec-WebSocket-Version` is `13` (426, before the key so that a client of
/// another version learns which one to use); exactly one `Sec-WebSocket-Key`
/// that is padded standard base64 of 16 bytes (400); no body declared (400); at most one
/// `Origin` (400).
/// Token lists are case-insensitive, may repeat the header, and tolerate
/// optional whitespace and empty elements.
pub fn validate_upgrade<'r>(req: &'r Request<'_>) -> Result<Upgrade<'r>, Rejection> {
    use Rejection::*;
    if req.method() != "GET" {
        return Err(MethodNotAllowed);
    }
    if req.version() != 1 {
        return Err(HttpVersion);
    }
    if !is_resource_target(req.target) {
        return Err(Malformed);
    }
    let host = exactly_one(req, "host", MissingHost, DuplicateHost)?;
    if host.is_empty() {
        return Err(MissingHost);
    }
    if !is_authority(host) {
        return Err(Malformed);
    }
    if !req.is_upgrade() {
        return Err(NotWebSocket);
    }
    if !has_token(req, "connection", b"upgrade") {
        return Err(ConnectionNotUpgrade);
    }
    let mut versions = req.header_all("sec-websocket-version").peekable();
    if versions.peek().is_none() {
        return Err(MissingVersion);
    }
    if !versions.all(|v| v == b"13") {
        return Err(UnsupportedVersion);
    }
    let key = exactly_one(req, "sec-websocket-key", MissingKey, DuplicateKey)?;
    let mut decoded = [0u8; 18];
    if key.len() != 24 || STANDARD.decode_slice(key, &mut decoded) != Ok(16) {
        return Err(InvalidKey);
    }
    let zero = |v: &[u8]| !v.is_empty() && v.iter().all(|&c| c == b'0');
    if !req.header_all("content-length").all(zero) || req.header("transfer-encoding").is_some() {
        return Err(BodyNotAllowed);
    }
    if req.header_all("origin").nth(1).is_some() {
        return Err(DuplicateOrigin);
    }
    Ok(Upgrade { req, key, host })
}

/// RFC 6455 section 4.2.1: the request target is a resource name (origin-form) or an absolute
/// http(s) or ws(s) URI.
fn is_resource_target(target: &str) -> bool {
    let t = target.as_bytes();
    let prefix = |s: &str| t.len() > s.len() && t[..s.len()].eq_ignore_ascii_case(s.as_bytes());
    t.starts_with(b"/")
        || ["http://", "https://", "ws://", "wss://"]
            .into_iter()
            .any(prefix)
}

/// RFC 7230 section 5.4: `Host` is an RFC 3986 authority, a reg-name, IPv4 address or
/// bracketed IP literal with an optional `:port`; anything else is a 400.
fn is_authority(v: &[u8]) -> bool {
    let (host, port) = match v.strip_prefix(b"[") {
        Some(rest) => {
            let Some(end) = rest.iter().position(|&c| c == b']') else {
                return false;
            };
            let lit = |c: &u8| c.is_ascii_hexdigit() || b":.vV-_~!$&'()*+,;=".contains(c);
            if end == 0 || !rest[..end].iter().all(lit) {
                return false;
            }
            (&b"ip-literal"[..], &rest[end + 1..])
        }
        None => v.split_at(v.iter().position(|&c| c == b':').unwrap_or(v.len())),
    };
    let reg_name = |c: &u8| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(c);
    let port_ok = match port.split_first() {
        None => true,
        Some((&c, digits)) => c == b':' && digits.iter().all(u8::is_ascii_digit),
    };
    !host.is_empty() && host.iter().all(reg_name) && port_ok
}

/// The value of the single header `name`, or `missing` / `duplicate`.
fn exactly_one<'b>(
    req: &Request<'b>,
    name: &str,
    missing: Rejection,
    duplicate: Rejection,
) -> Result<&'b [u8], Rejection> {
    let mut values = req.header_all(name);
    let first = values.next().ok_or(missing)?;
    match values.next() {
        Some(_) => Err(duplicate),
        None => Ok(first),
    }
}

/// True if any header `name` lists `token` (ASCII case-insensitive).
fn has_token(req: &Request<'_>, name: &str, token: &[u8]) -> bool {
    req.header_all(name)
        .flat_map(list_items)
        .any(|t| t.eq_ignore_ascii_case(token))
}

/// Splits a header value on commas outside quoted strings (RFC 7230 §7);
/// yields items with surrounding whitespace removed, skipping empty ones.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = value;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        let (mut quoted, mut escaped, mut end) = (false, false, rest.len());
        for (i, &c) in rest.iter().enumerate() {
            if escaped {
                escaped = false;
            } else if quoted && c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                quoted = !quoted;
            } else if c == b',' && !quoted {
                end = i;
                break;
            }
        }
        let item = rest[..end].trim_ascii();
        rest = rest.get(end + 1..).unwrap_or(&[]);
        if !item.is_empty() {
            return Some(item);
        }
    })
}

/// `Sec-WebSocket-Accept` for `key` (the key header value as sent, not
/// decoded): base64(SHA-1(key ++ "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")).
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID);
    let digest = sha.finalize();
    let mut out = [0u8; 28];
    #[allow(clippy::expect_used)] // base64 of 20 bytes is always 28 characters
    let n = STANDARD
        .encode_slice(&digest[..], &mut out)
        .expect("20 bytes are 28 base64 chars");
    debug_assert_eq!(n, 28);
    out
}

/// Appends the `101 Switching Protocols` response accepting the handshake
/// whose `Sec-WebSocket-Key` is `key`, selecting `subprotocol` if it is
/// `Some` and non-empty (it should be one of [`Upgrade::subprotocols`]).
/// Control characters in `subprotocol` are replaced by spaces. No extension
/// is accepted (see [`write_accept_with`]).
pub fn write_accept(out: &mut Vec<u8>, key: &[u8], subprotocol: Option<&str>) {
    write_accept_with(out, key, subprotocol, None);
}

/// [`write_accept`], accepting permessage-deflate as `deflate` says (its
/// `Sec-WebSocket-Extensions` line) when it is `Some`.
pub fn write_accept_with(
    out: &mut Vec<u8>,
    key: &[u8],
    subprotocol: Option<&str>,
    deflate: Option<&super::deflate::Agreement>,
) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n");
    out.extend_from_slice(b"Connection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(&accept_key(key));
    out.extend_from_slice(b"\r\n");
    if let Some(p) = subprotocol.filter(|p| !p.is_empty()) {
        push_header(out, "Sec-WebSocket-Protocol", p);
    }
    if let Some(agreement) = deflate {
        agreement.write_header(out);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends a complete response refusing the handshake: status line with the
/// standard phrase, `Content-Type: text/plain; charset=utf-8`,
/// `Content-Length`, `Connection: close`, the headers the refusal needs
/// (405: `Allow: GET`; 426: `Upgrade: websocket`, `Sec-WebSocket-Version: 13`
/// and `Connection: close, Upgrade`, as RFC 7230 §6.7 asks when sending
/// `Upgrade`), and the body `reason + "\n"`.
pub fn write_rejection(out: &mut Vec<u8>, r: &Rejection) {
    let status = r.status();
    let (extra, connection): (&[(&str, &str)], &str) = match status {
        405 => (&[("Allow", "GET")], "close"),
        426 => (
            &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
            "close, Upgrade",
        ),
        _ => (&[], "close"),
    };
    let reason = r.reason().as_bytes();
    let len = reason.len() + 1;
    write_head(out, status, status_phrase(status), extra, connection, len);
    out.extend_from_slice(reason);
    out.push(b'\n');
}

/// Appends a complete response for the loop's own answers (404, 403, 429,
/// 503 with `Retry-After`, ...): `HTTP/1.1 <status> <reason>`, then
/// `extra_headers`, `Content-Type: text/plain; charset=utf-8` if `body` is
/// non-empty and no `Content-Type` is among `extra_headers`, `Content-Length`,
/// `Connection: close`, and `body`.
///
/// An empty `reason` means [`status_phrase`]; a `status` outside 100..=599 is
/// written as 500. The writer owns framing, so `Content-Length`, `Connection`
/// and `Transfer-Encoding` in `extra_headers` are ignored. CR, LF and other
/// control characters in `reason` and header values become spaces, and
/// non-token characters in header names become `-`, so no caller string can
/// inject a header or end the head early.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) {
    let status = Some(status)
        .filter(|s| (100..=599).contains(s))
        .unwrap_or(500);
    let reason = Some(reason).filter(|r| !r.is_empty());
    let reason = reason.unwrap_or_else(|| status_phrase(status));
    write_head(out, status, reason, extra_headers, "close", body.len());
    out.extend_from_slice(body);
}

/// Writes the status line and headers of a response with a `len`-byte body.
fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    extra: &[(&str, &str)],
    connection: &str,
    len: usize,
) {
    let _ = write!(out, "HTTP/1.1 {status} ");
    push_sanitized(out, reason.as_bytes(), false);
    out.extend_from_slice(b"\r\n");
    let mut has_type = false;
    for &(name, value) in extra {
        let owned = ["content-length", "connection", "transfer-encoding"];
        if name.is_empty() || owned.iter().any(|o| name.eq_ignore_ascii_case(o)) {
            continue;
        }
        has_type |= name.eq_ignore_ascii_case("content-type");
        push_header(out, name, value);
    }
    if len > 0 && !has_type {
        out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\n");
    }
    let _ = write!(out, "Content-Length: {len}\r\n");
    let _ = write!(out, "Connection: {connection}\r\n\r\n");
}

/// Appends `name: value\r\n`, sanitized.
fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    push_sanitized(out, name.as_bytes(), true);
    out.extend_from_slice(b": ");
    push_sanitized(out, value.as_bytes(), false);
    out.extend_from_slice(b"\r\n");
}

/// Appends `s`, replacing bytes that may not appear there: in a header name
/// anything but an RFC 7230 tchar becomes `-`; elsewhere control characters
/// (CR and LF among them, but not TAB) become a space.
fn push_sanitized(out: &mut Vec<u8>, s: &[u8], name: bool) {
    let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    out.extend(s.iter().map(|&c| match c {
        _ if name => [b'-', c][tchar(c) as usize],
        b'\t' => c,
        0..=0x1f | 0x7f => b' ',
        _ => c,
    }));
}

/// The standard reason phrase for `status` (RFC 9110 and RFC 6585 names);
/// for a code not in the table, the generic name of its class (e.g. "Client
/// Error"), or "Unknown" outside 100..=599.
pub fn status_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Unknown",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const BASE: [(&str, &str); 5] = [
        ("Host", "example.com"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Version", "13"),
    ];
    type Headers = Vec<(String, String)>;

    /// A request head from a request line and header pairs.
    fn head(line: &str, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut s = format!("{line}\r\n");
        for (n, v) in headers {
            s += &format!("{n}: {v}\r\n");
        }
        (s + "\r\n").into_bytes()
    }

    /// The valid base request with header `name` replaced (`Some`) or removed (`None`).
    fn set(name: &str, value: Option<&str>) -> Vec<u8> {
        let mut h: Vec<(&str, &str)> = BASE.into_iter().filter(|(n, _)| *n != name).collect();
        h.extend(value.map(|v| (name, v)));
        head("GET /chat HTTP/1.1", &h)
    }

    /// The valid base request with `extra` headers appended.
    fn add(extra: &[(&str, &str)]) -> Vec<u8> {
        head("GET /chat HTTP/1.1", &[&BASE[..], extra].concat())
    }

    /// The valid base request with `n` distinct filler headers appended.
    fn with_fillers(n: usize) -> Vec<u8> {
        let names: Vec<String> = (0..n).map(|i| format!("X-H{i}")).collect();
        let extra: Vec<(&str, &str)> = names.iter().map(|name| (name.as_str(), "v")).collect();
        add(&extra)
    }

    fn complete(buf: &[u8], limits: Limits) -> Request<'_> {
        match parse(buf, &limits) {
            Ok(Parsed::Complete { request, .. }) => request,
            other => panic!("not complete: {other:?}"),
        }
    }

    /// parse + validate_upgrade with default limits.
    fn outcome(buf: &[u8]) -> Result<(), Rejection> {
        match parse(buf, &Limits::default())? {
            Parsed::Complete { request, .. } => validate_upgrade(&request).map(|_| ()),
            Parsed::Partial => panic!("unexpected Partial"),
        }
    }

    /// Checks status line, `Connection: close` and `Content-Length` of a
    /// response; returns its (lower-cased) headers and body.
    fn check_response(bytes: &[u8], status: u16) -> (Headers, Vec<u8>) {
        let text = String::from_utf8_lossy(bytes);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        let mut raw = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut raw);
        let Ok(httparse::Status::Complete(n)) = resp.parse(bytes) else {
            panic!("{text}")
        };
        assert_eq!(resp.code, Some(status));
        let lower = |h: &httparse::Header| (h.name.to_ascii_lowercase(), lossy(h.value));
        let headers: Headers = resp.headers.iter().map(lower).collect();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert!(get("connection").unwrap().starts_with("close"), "{text}");
        assert_eq!(get("content-length"), Some((bytes.len() - n).to_string()));
        (headers, bytes[n..].to_vec())
    }

    fn lossy(v: &[u8]) -> String {
        String::from_utf8_lossy(v).into_owned()
    }

    fn has(headers: &Headers, name: &str, value: &str) -> bool {
        headers.iter().any(|(n, v)| n == name && v == value)
    }

    /// Asserts `buf` is refused with `expected`; checks the written response.
    fn rejects(buf: &[u8], expected: Rejection) -> Headers {
        assert_eq!(outcome(buf), Err(expected));
        let mut out = Vec::new();
        write_rejection(&mut out, &expected);
        let (headers, body) = check_response(&out, expected.status());
        let line = format!(
            "HTTP/1.1 {} {}\r\n",
            expected.status(),
            status_phrase(expected.status())
        );
        assert!(out.starts_with(line.as_bytes()));
        assert_eq!(lossy(&body), format!("{}\n", expected.reason()));
        assert!(has(&headers, "content-type", "text/plain; charset=utf-8"));
        headers
    }

    /// One test per rejection rule: request => variant, then headers the
    /// response must carry.
    macro_rules! rejection_tests {
        ($($name:ident: $buf:expr => $r:ident $(, $h:literal = $v:literal)*;)*) => {$(
            #[test]
            fn $name() {
                let headers = rejects(&$buf[..], Rejection::$r);
                let want: &[(&str, &str)] = &[$(($h, $v)),*];
                for (h, v) in want {
                    assert!(has(&headers, h, v), "{headers:?}");
                }
            }
        )*};
    }

    rejection_tests! {
        wrong_method_405: head("POST /chat HTTP/1.1", &BASE) => MethodNotAllowed, "allow" = "GET";
        http_1_0_400: head("GET /chat HTTP/1.0", &BASE) => HttpVersion;
        host_missing_400: set("Host", None) => MissingHost;
        host_empty_400: set("Host", Some("")) => MissingHost;
        host_duplicate_400: add(&[("host", "other")]) => DuplicateHost;
        upgrade_missing_400: set("Upgrade", None) => NotWebSocket;
        upgrade_wrong_400: set("Upgrade", Some("h2c, websocket2")) => NotWebSocket;
        connection_missing_400: set("Connection", None) => ConnectionNotUpgrade;
        connection_without_upgrade_400: set("Connection", Some("keep-alive")) => ConnectionNotUpgrade;
        key_missing_400: set("Sec-WebSocket-Key", None) => MissingKey;
        key_15_bytes_400: set("Sec-WebSocket-Key", Some("BwcHBwcHBwcHBwcHBwcH")) => InvalidKey;
        key_17_bytes_400: set("Sec-WebSocket-Key", Some("BwcHBwcHBwcHBwcHBwcHBwc=")) => InvalidKey;
        key_not_base64_400: set("Sec-WebSocket-Key", Some("!!!!!!!!!!!!!!!!!!!!!!==")) => InvalidKey;
        key_unpadded_400: set("Sec-WebSocket-Key", Some("dGhlIHNhbXBsZSBub25jZQ")) => InvalidKey;
        key_trailing_bits_400: set("Sec-WebSocket-Key", Some("dGhlIHNhbXBsZSBub25jZR==")) => InvalidKey;
        key_duplicate_400: add(&[("Sec-WebSocket-Key", KEY)]) => DuplicateKey;
        version_missing_426: set("Sec-WebSocket-Version", None) => MissingVersion,
            "sec-websocket-version" = "13", "upgrade" = "websocket";
        version_8_426: set("Sec-WebSocket-Version", Some("8")) => UnsupportedVersion,
            "sec-websocket-version" = "13", "connection" = "close, Upgrade";
        content_length_body_400: add(&[("Content-Length", "5")]) => BodyNotAllowed;
        chunked_body_400: add(&[("Transfer-Encoding", "chunked")]) => BodyNotAllowed;
        origin_duplicate_400: add(&[("Origin", "https://a.test"), ("origin", "https://b.test")]) => DuplicateOrigin;
        nine_kib_complete_431: add(&[("X-Big", &"a".repeat(9216))]) => HeadersTooLarge;
        too_many_headers_431: with_fillers(60) => TooManyHeaders;
        garbage_tls_400: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n" => Malformed;
        garbage_header_400: b"GET /chat HTTP/1.1\r\nNo colon here\r\n\r\n" => Malformed;
    }

    #[test]
    fn accept_key_rfc_example() {
        assert_eq!(&accept_key(KEY.as_bytes()), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accept_key_matches_tungstenite() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len % 40).map(|_| next()).collect();
            let key = [STANDARD.encode(&bytes).into_bytes(), bytes][len % 2].clone();
            let want = tungstenite::handshake::derive_accept_key(&key);
            assert_eq!(&accept_key(&key)[..], want.as_bytes());
        }
    }

    #[test]
    fn write_accept_exact_bytes() {
        let mut out = b"queued".to_vec();
        write_accept(&mut out, KEY.as_bytes(), None);
        write_accept(&mut out, KEY.as_bytes(), Some("")); // empty: no protocol header
        write_accept(&mut out, KEY.as_bytes(), Some("chat\r\nX: y"));
        let one = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n";
        let want =
            format!("queued{one}\r\n{one}\r\n{one}Sec-WebSocket-Protocol: chat  X: y\r\n\r\n");
        assert_eq!(lossy(&out), want);
    }

    #[test]
    fn every_split_point_then_complete() {
        let buf = add(&[]);
        for i in 0..buf.len() {
            let r = parse(&buf[..i], &Limits::default());
            assert!(matches!(r, Ok(Parsed::Partial)), "at {i}: {r:?}");
        }
        let Ok(Parsed::Complete { request, head_len }) = parse(&buf, &Limits::default()) else {
            panic!()
        };
        assert_eq!(head_len, buf.len());
        let up = validate_upgrade(&request).unwrap();
        assert_eq!((up.key(), up.host()), (KEY.as_bytes(), &b"example.com"[..]));
        assert_eq!((up.origin(), up.request().path()), (None, "/chat"));
    }

    #[test]
    fn pipelined_bytes_excluded_from_head_len() {
        let mut buf = add(&[]);
        let len = buf.len();
        buf.extend_from_slice(b"\x81\x85\x00\x00\x00\x00hello");
        let parsed = parse(&buf, &Limits::default());
        assert!(matches!(parsed, Ok(Parsed::Complete { head_len, .. }) if head_len == len));
    }

    #[test]
    fn connection_keep_alive_upgrade_accepted() {
        assert_eq!(
            outcome(&set("Connection", Some("keep-alive, Upgrade"))),
            Ok(())
        );
    }

    #[test]
    fn token_lists_with_whitespace_empty_items_and_repeats() {
        assert_eq!(outcome(&set("Connection", Some(",,\tupgrade ,"))), Ok(()));
        assert_eq!(outcome(&set("Upgrade", Some(" , h2c,WebSocket ,"))), Ok(()));
        let mut split = set("Connection", Some("keep-alive"));
        split.splice(split.len() - 2.., *b"Connection: UPGRADE\r\n\r\n");
        assert_eq!(outcome(&split), Ok(()));
    }

    #[test]
    fn content_length_zero_accepted() {
        assert_eq!(outcome(&add(&[("Content-Length", "0")])), Ok(()));
    }

    #[test]
    fn nine_kib_incomplete_431() {
        let buf = add(&[("X-Big", &"a".repeat(9216))]);
        let partial = &buf[..buf.len() - 2];
        assert_eq!(
            parse(partial, &Limits::default()).err(),
            Some(Rejection::HeadersTooLarge)
        );
        // The same prefix cut to the limit is merely incomplete.
        assert!(matches!(
            parse(&partial[..8192], &Limits::default()),
            Ok(Parsed::Partial)
        ));
    }

    #[test]
    fn head_size_boundary() {
        let buf = add(&[]);
        let exact = Limits {
            max_header_bytes: buf.len(),
            ..Limits::default()
        };
        complete(&buf, exact);
        let short = Limits {
            max_header_bytes: buf.len() - 1,
            ..Limits::default()
        };
        assert_eq!(parse(&buf, &short).err(), Some(Rejection::HeadersTooLarge));
    }

    #[test]
    fn header_count_limits() {
        assert_eq!(outcome(&with_fillers(59)), Ok(())); // 64 headers: the default limit
        let ten = Limits {
            max_headers: 10,
            ..Limits::default()
        };
        assert_eq!(
            parse(&with_fillers(6), &ten).err(),
            Some(Rejection::TooManyHeaders)
        );
        // max_headers above the cap behaves as MAX_HEADERS_CAP.
        let huge = Limits {
            max_headers: 1000,
            max_header_bytes: 1 << 20,
        };
        complete(&with_fillers(MAX_HEADERS_CAP - 5), huge);
        let over = with_fillers(MAX_HEADERS_CAP - 4);
        assert_eq!(parse(&over, &huge).err(), Some(Rejection::TooManyHeaders));
    }

    #[test]
    fn subprotocols_and_extensions() {
        let buf = add(&[
            ("Sec-WebSocket-Protocol", "chat, , superchat ,"),
            ("sec-websocket-protocol", "\tv2.bin"),
            (
                "Sec-WebSocket-Extensions",
                "permessage-deflate; server_no_context_takeover, x-q; a=\"1,2\"",
            ),
            ("Sec-WebSocket-Extensions", " x-webkit-deflate-frame "),
        ]);
        let request = complete(&buf, Limits::default());
        let up = validate_upgrade(&request).unwrap();
        assert_eq!(
            up.subprotocols().collect::<Vec<_>>(),
            ["chat", "superchat", "v2.bin"]
        );
        let ext = [
            "permessage-deflate; server_no_context_takeover",
            "x-q; a=\"1,2\"",
            "x-webkit-deflate-frame",
        ];
        assert_eq!(up.extensions().collect::<Vec<_>>(), ext);
    }

    #[test]
    fn request_accessors_and_path_query_split() {
        let cases = [
            ("/c?room=1&x=2", "/c", Some("room=1&x=2")),
            ("/", "/", None),
            ("/a?", "/a", Some("")),
            ("http://x/lobby?a=1", "/lobby", Some("a=1")),
            ("ws://x", "/", None),
            ("https://x:8080/a/b", "/a/b", None),
            ("WSS://x?q", "/", Some("q")),
            ("/p/x://y", "/p/x://y", None),
        ];
        for (target, path, query) in cases {
            let buf = head(
                &format!("GET {target} HTTP/1.1"),
                &[("X-A", "1"), ("x-a", "2")],
            );
            let r = complete(&buf, Limits::default());
            assert_eq!(
                (r.method(), r.path(), r.query(), r.version()),
                ("GET", path, query, 1)
            );
            assert_eq!((r.header("X-a"), r.headers().count()), (Some(&b"1"[..]), 2));
            assert_eq!(r.header_all("x-A").collect::<Vec<_>>(), [b"1", b"2"]);
            assert!(!r.is_upgrade());
        }
    }

    #[test]
    fn chrome_request() {
        let buf = b"GET /ws?token=abc HTTP/1.1\r\nHost: localhost:9001\r\nConnection: Upgrade\r\n\
            Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux \
            x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\n\
            Upgrade: websocket\r\nOrigin: http://localhost:8080\r\nSec-WebSocket-Version: 13\r\n\
            Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n\
            Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\
            Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
            Sec-WebSocket-Protocol: graphql-ws, graphql-transport-ws\r\n\r\n";
        for i in 0..buf.len() {
            let r = parse(&buf[..i], &Limits::default());
            assert!(matches!(r, Ok(Parsed::Partial)), "at {i}: {r:?}");
        }
        let request = complete(buf, Limits::default());
        let up = validate_upgrade(&request).unwrap();
        assert_eq!(up.origin(), Some(&b"http://localhost:8080"[..]));
        let protocols: Vec<_> = up.subprotocols().collect();
        assert_eq!(protocols, ["graphql-ws", "graphql-transport-ws"]);
        assert_eq!(
            (up.extensions().count(), request.query()),
            (1, Some("token=abc"))
        );
        assert_eq!(&accept_key(up.key()), b"HSmrc0sMlYUkAGmm5OPpG2HaGWk=");
    }

    #[test]
    fn python_websockets_request() {
        let buf = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: 6R3Hr1S5Nc9dAlq4UQ5Nvg==\r\n\
            Sec-WebSocket-Version: 13\r\n\
            Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
            User-Agent: Python/3.12 websockets/13.1\r\n\r\n";
        let request = complete(buf, Limits::default());
        let up = validate_upgrade(&request).unwrap();
        assert_eq!((up.host(), up.origin()), (&b"127.0.0.1:8765"[..], None));
        assert_eq!(up.subprotocols().count(), 0);
        let want = tungstenite::handshake::derive_accept_key(b"6R3Hr1S5Nc9dAlq4UQ5Nvg==");
        assert_eq!(&accept_key(up.key())[..], want.as_bytes());
    }

    #[test]
    fn write_response_sanitizes_caller_strings() {
        let mut out = Vec::new();
        let extra = [("Retry-After", "5\r\nSet-Cookie: a=1"), ("Bad Name:", "x")];
        write_response(
            &mut out,
            503,
            "Busy\r\n\r\nHTTP/1.1 200 OK",
            &extra,
            b"later",
        );
        let (headers, body) = check_response(&out, 503);
        let text = lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 503 Busy    HTTP/1.1 200 OK\r\n"),
            "{text}"
        );
        assert!(has(&headers, "retry-after", "5  Set-Cookie: a=1"), "{text}");
        assert!(
            has(&headers, "bad-name-", "x") && body == b"later",
            "{text}"
        );
    }

    #[test]
    fn write_response_framing_and_defaults() {
        let mut out = Vec::new();
        let extra = [("Content-Type", "text/html"), ("Connection", "keep-alive")];
        write_response(&mut out, 404, "", &extra, b"<p>no</p>");
        let (headers, body) = check_response(&out, 404);
        assert!(out.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        assert!(has(&headers, "content-type", "text/html") && body == b"<p>no</p>");
        assert_eq!(headers.len(), 3, "{headers:?}");
        out.clear();
        write_response(&mut out, 42, "", &[], b"");
        assert_eq!(check_response(&out, 500).0.len(), 2);
    }

    #[test]
    fn custom_rejection() {
        let r = Rejection::custom(403, "origin not allowed");
        assert_eq!(
            (r.status(), r.to_string()),
            (403, "403 origin not allowed".into())
        );
        let mut out = Vec::new();
        write_rejection(&mut out, &r);
        assert_eq!(check_response(&out, 403).1, b"origin not allowed\n");
        for bad in [0, 101, 200, 302, 600] {
            let stored = Rejection::Custom {
                status: 500,
                reason: "x",
            };
            assert_eq!(Rejection::custom(bad, "x"), stored);
        }
        assert_eq!(
            Rejection::Custom {
                status: 200,
                reason: "x"
            }
            .status(),
            500
        );
        let e: Box<dyn std::error::Error> = Box::new(Rejection::InvalidKey);
        assert_eq!(
            e.to_string(),
            "400 Sec-WebSocket-Key must be base64 of 16 bytes"
        );
    }

    #[test]
    fn status_phrases() {
        let table = [(400, "Bad Request"), (403, "Forbidden"), (404, "Not Found")]
            .into_iter()
            .chain([(405, "Method Not Allowed"), (426, "Upgrade Required")])
            .chain([
                (429, "Too Many Requests"),
                (431, "Request Header Fields Too Large"),
            ])
            .chain([(500, "Internal Server Error"), (503, "Service Unavailable")])
            .chain([(499, "Client Error"), (700, "Unknown")]);
        for (status, phrase) in table {
            assert_eq!(status_phrase(status), phrase);
        }
    }
}
