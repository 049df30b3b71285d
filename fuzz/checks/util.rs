//! Helpers shared by the checks: an input reader, and strict parsers for what the server writes
//! (HTTP responses and server-to-client frames), written independently of the crate's own code.

/// Reads fixed-size fields from fuzzer bytes; reads past the end yield zeros.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// RFC 7230 tchar.
pub fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// A response head parsed by [`parse_response`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub reason: Vec<u8>,
    /// Names lower-cased, values with surrounding whitespace removed.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Length of the head, final CRLF included.
    pub head_len: usize,
}

impl Response {
    /// Values of every header `name` (lower-case).
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        let matching = self.headers.iter().filter(|(n, _)| n == name);
        matching.map(|(_, v)| &v[..]).collect()
    }

    /// The single value of header `name`, `None` if absent; panics if repeated.
    pub fn one(&self, name: &str) -> Option<&[u8]> {
        let all = self.all(name);
        assert!(all.len() <= 1, "header {name} repeated: {self:?}");
        all.first().copied()
    }
}

/// Strictly parses an HTTP/1.1 response head: `HTTP/1.1 DDD reason CRLF`, then `name: value CRLF`
/// lines (token names, values without control characters other than HTAB), then CRLF. Bare LF,
/// obsolete line folding and anything else lenient parsers forgive is an error here.
pub fn parse_response(bytes: &[u8]) -> Result<Response, String> {
    let mut lines = Vec::new();
    let mut at = 0;
    loop {
        let rel = bytes[at..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| format!("unterminated line at {at}"))?;
        let line = &bytes[at..at + rel];
        at += rel + 2;
        if line.is_empty() {
            break;
        }
        if line.iter().any(|&c| c == b'\r' || c == b'\n') {
            return Err(format!(
                "bare CR or LF in {:?}",
                String::from_utf8_lossy(line)
            ));
        }
        lines.push(line);
    }
    let (status_line, header_lines) = lines.split_first().ok_or("empty head")?;
    let rest = status_line
        .strip_prefix(b"HTTP/1.1 ")
        .ok_or("status line must start with HTTP/1.1")?;
    if rest.len() < 4 || rest[3] != b' ' || !rest[..3].iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "bad status line {:?}",
            String::from_utf8_lossy(status_line)
        ));
    }
    let status = std::str::from_utf8(&rest[..3]).unwrap().parse().unwrap();
    let reason = rest[4..].to_vec();
    let ctl = |c: &u8| (*c < 0x20 && *c != b'\t') || *c == 0x7f;
    if reason.iter().any(ctl) {
        return Err("control character in reason phrase".into());
    }
    let mut headers = Vec::new();
    for line in header_lines {
        let colon = line
            .iter()
            .position(|&c| c == b':')
            .ok_or("header without colon")?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&c| is_tchar(c)) {
            return Err(format!(
                "bad header name {:?}",
                String::from_utf8_lossy(name)
            ));
        }
        if value.iter().any(ctl) {
            return Err("control character in header value".into());
        }
        let name = String::from_utf8(name.to_ascii_lowercase()).unwrap();
        headers.push((name, value.trim_ascii().to_vec()));
    }
    Ok(Response {
        status,
        reason,
        headers,
        head_len: at,
    })
}

/// Checks that `bytes` is exactly one complete HTTP response refusing a request: strict head,
/// status in 400..=599 (or `status` when given), `Connection: close` and a `Content-Length`
/// that matches the body that follows. Also parses it with tungstenite's client-side response
/// parser. Returns the head and the body.
pub fn check_refusal(bytes: &[u8], status: Option<u16>) -> (Response, &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let resp = parse_response(bytes).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!((400..=599).contains(&resp.status), "{text:?}");
    if let Some(s) = status {
        assert_eq!(resp.status, s, "{text:?}");
    }
    let connection = resp.one("connection").expect("Connection header");
    assert!(
        connection
            .split(|&c| c == b',')
            .next()
            .map(<[u8]>::trim_ascii)
            == Some(b"close"),
        "{text:?}"
    );
    let len = resp.one("content-length").expect("Content-Length header");
    let len: usize = std::str::from_utf8(len).unwrap().parse().unwrap();
    let body = &bytes[resp.head_len..];
    assert_eq!(body.len(), len, "body length vs Content-Length: {text:?}");
    assert!(resp.one("transfer-encoding").is_none(), "{text:?}");
    tungstenite_parses(bytes, resp.status);
    (resp, body)
}

/// tungstenite's client parses the response head with the same status.
pub fn tungstenite_parses(bytes: &[u8], status: u16) {
    use tungstenite::handshake::client::Response;
    use tungstenite::handshake::machine::TryParse;
    match Response::try_parse(bytes) {
        Ok(Some((_, r))) => assert_eq!(r.status().as_u16(), status),
        other => panic!(
            "tungstenite cannot parse {:?}: {other:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

/// One server-to-client frame parsed by [`parse_server_frames`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Parses `bytes` as a sequence of complete, valid server-to-client frames: RSV bits clear, a
/// defined opcode, no mask, minimal length encoding, control frames final with at most 125
/// bytes. The header fields are cross-checked against tungstenite's `FrameHeader::parse`.
pub fn parse_server_frames(mut bytes: &[u8]) -> Result<Vec<Frame>, String> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 2 {
            return Err("truncated frame header".into());
        }
        let (b0, b1) = (bytes[0], bytes[1]);
        let (fin, rsv, opcode) = (b0 & 0x80 != 0, b0 & 0x70, b0 & 0x0f);
        if rsv != 0 {
            return Err(format!("RSV bits set in {b0:#x}"));
        }
        if !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
            return Err(format!("reserved opcode {opcode}"));
        }
        if b1 & 0x80 != 0 {
            return Err("server frame is masked".into());
        }
        let (len, hlen) = match b1 & 0x7f {
            126 if bytes.len() >= 4 => (u64::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 if bytes.len() >= 10 => (u64::from_be_bytes(bytes[2..10].try_into().unwrap()), 10),
            126 | 127 => return Err("truncated extended length".into()),
            n => (u64::from(n), 2),
        };
        let minimal = match hlen {
            4 => len >= 126,
            10 => (0x1_0000..1 << 63).contains(&len),
            _ => true,
        };
        if !minimal {
            return Err(format!("length {len} not minimally encoded"));
        }
        if opcode >= 8 && (!fin || len > 125) {
            return Err(format!("bad control frame: fin {fin}, length {len}"));
        }
        let mut cursor = std::io::Cursor::new(bytes);
        match tungstenite::protocol::frame::FrameHeader::parse(&mut cursor) {
            Ok(Some((h, l))) => {
                let op: u8 = h.opcode.into();
                let same = (h.is_final, op, h.mask, l) == (fin, opcode, None, len);
                if !same || cursor.position() != hlen as u64 || h.rsv1 || h.rsv2 || h.rsv3 {
                    return Err(format!("tungstenite reads {h:?} {l}"));
                }
            }
            other => return Err(format!("tungstenite: {other:?}")),
        }
        let end = hlen as u64 + len;
        if (bytes.len() as u64) < end {
            return Err(format!("truncated payload: {len} announced"));
        }
        let end = end as usize;
        frames.push(Frame {
            fin,
            opcode,
            payload: bytes[hlen..end].to_vec(),
        });
        bytes = &bytes[end..];
    }
    Ok(frames)
}

/// Strict standard base64 with padding (RFC 4648 section 4), rejecting non-zero pad bits.
pub fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 4 != 0 {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let quads = s.len() / 4;
    for (i, q) in s.chunks(4).enumerate() {
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - pad;
        if bytes[keep..].iter().any(|&b| b != 0) {
            return None; // non-zero pad bits
        }
        out.extend_from_slice(&bytes[..keep]);
    }
    Some(out)
}
