//! permessage-deflate (RFC 7692) for the load generator's `echo` and `idle` modes
//! (`--deflate`, run by `benches/compression.sh`), and the JSON message of those rows (`--json`).
//!
//! The client offers [`OFFER`] and requires the 101 to accept permessage-deflate (a connection
//! whose answer does not is an error, and the run fails). It compresses its one message once,
//! up front, on its own (a fresh raw deflate stream, 32 KiB window, zlib's default level 6,
//! flushed with `Z_SYNC_FLUSH` and the `00 00 ff ff` tail stripped), and sends that frame with
//! RSV1 set every time. A message compressed on its own refers to no earlier message, so it is
//! valid whatever the server answered about the client's context. Echoes with RSV1 set are
//! inflated and compared with the message: with one decompressor for every connection, reset
//! before each message, when the 101 said `server_no_context_takeover`; otherwise the server may
//! keep its context from message to message, and each connection gets a decompressor of its own
//! that is never reset. Echoes without RSV1 (a server may send any message uncompressed) are
//! compared as they are.

use super::{parse_server_header, RxError};
use clap::Args;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The default offer: no context takeover either way, so that every server compresses each
/// echo on its own, as wsloop's shared profile does, and the same message sent again and again
/// is not compressed into a back-reference to the previous one.
pub const OFFER: &str =
    "permessage-deflate; client_no_context_takeover; server_no_context_takeover";

/// The tail that RFC 7692 strips from every compressed message and the receiver appends.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

#[derive(Args, Debug, Clone)]
pub struct DeflateArgs {
    /// Offer permessage-deflate and require the server to accept it: messages go out compressed
    /// (RSV1), compressed echoes are inflated and checked.
    #[arg(long)]
    pub deflate: bool,
    /// The Sec-WebSocket-Extensions offer sent with --deflate (for example
    /// "permessage-deflate; client_max_window_bits", a browser's, which lets the server keep its
    /// context).
    #[arg(long, default_value = OFFER)]
    pub deflate_offer: String,
}

impl DeflateArgs {
    /// The extension header value to offer, if any.
    pub fn offer(&self) -> Option<&str> {
        self.deflate.then_some(self.deflate_offer.as_str())
    }
}

/// A deterministic JSON document of at least `min_len` bytes, shaped like a chat application's
/// timeline update: a few items with ids, an author, a short text, counters and timestamps
/// (field names repeat from item to item, values do not, so it compresses about 3x, as such
/// traffic does). The same bytes on every run and every machine.
pub fn json_message(min_len: usize) -> Vec<u8> {
    const USERS: [(&str, &str); 6] = [
        ("u_1042", "ada"),
        ("u_1187", "grace"),
        ("u_2203", "linus"),
        ("u_2310", "margaret"),
        ("u_3377", "ken"),
        ("u_4051", "barbara"),
    ];
    const WORDS: [&str; 24] = [
        "the",
        "build",
        "is",
        "green",
        "again",
        "after",
        "the",
        "flaky",
        "test",
        "was",
        "fixed",
        "please",
        "review",
        "the",
        "deploy",
        "plan",
        "for",
        "tonight",
        "latency",
        "looks",
        "fine",
        "on",
        "the",
        "dashboard",
    ];
    // A 64-bit linear congruential generator (Knuth's MMIX constants): fixed seed, fixed output.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n
    };
    let mut items: Vec<String> = Vec::new();
    let mut t = 7 * 3600 + 12 * 60;
    loop {
        let (uid, name) = USERS[rnd(USERS.len() as u64) as usize];
        t += 1 + rnd(20);
        let online = rnd(3) != 0;
        let words = 3 + rnd(5);
        let text: Vec<&str> = (0..words)
            .map(|_| WORDS[rnd(WORDS.len() as u64) as usize])
            .collect();
        let reactions = rnd(5);
        let edited = rnd(4) == 0;
        let ms = rnd(1000);
        items.push(format!(
            r#"{{"id":"msg_{}","channel":"deploys","author":{{"id":"{uid}","name":"{name}","online":{online}}},"text":"{}","reactions":{reactions},"edited":{edited},"created_at":"2026-12-06T{:02}:{:02}:{:02}.{ms:03}Z"}}"#,
            1_048_577 + items.len(),
            text.join(" "),
            t / 3600,
            t / 60 % 60,
            t % 60,
        ));
        let doc = format!(
            r#"{{"type":"timeline.update","seq":421337,"room":"team-core","unread":{},"items":[{}]}}"#,
            rnd(40),
            items.join(",")
        );
        if doc.len() >= min_len {
            return doc.into_bytes();
        }
    }
}

/// `msg` deflated on its own as RFC 7692 sends it: raw deflate, 32 KiB window, level 6, one
/// sync flush, the `00 00 ff ff` tail removed.
pub fn compress(msg: &[u8]) -> Result<Vec<u8>, String> {
    let mut c = Compress::new_with_window_bits(Compression::default(), false, 15);
    let mut out = Vec::with_capacity(msg.len() + 64);
    loop {
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&msg[consumed..], &mut out, FlushCompress::Sync)
            .map_err(|e| format!("deflate: {e}"))?;
        if c.total_in() as usize == msg.len() && out.len() < out.capacity() {
            break;
        }
        if status == Status::StreamEnd {
            return Err("deflate ended its stream".into());
        }
        out.reserve(out.capacity());
    }
    if !out.ends_with(&TAIL) {
        return Err("the sync flush did not end with 00 00 ff ff".into());
    }
    out.truncate(out.len() - TAIL.len());
    Ok(out)
}

/// What a server's 101 said about permessage-deflate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The server may keep its compression context from one message to the next (the answer
    /// lacks `server_no_context_takeover`).
    pub server_takeover: bool,
}

/// Read the `Sec-WebSocket-Extensions` answer of a 101 head (lines joined, as RFC 6455 allows):
/// it must name permessage-deflate, and only that, with parameters this client can honour.
pub fn parse_answer(head: &[u8]) -> Result<Answer, String> {
    let text = String::from_utf8_lossy(head);
    let values: Vec<&str> = text
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, v)| v.trim())
        .collect();
    if values.is_empty() {
        return Err("the 101 names no extension (permessage-deflate refused)".into());
    }
    let joined = values.join(",");
    let exts: Vec<&str> = joined
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let [ext] = exts[..] else {
        return Err(format!("the 101 names {} extensions: {joined}", exts.len()));
    };
    let mut parts = ext.split(';').map(str::trim);
    if parts.next() != Some("permessage-deflate") {
        return Err(format!("the 101 names another extension: {ext}"));
    }
    let mut answer = Answer {
        server_takeover: true,
    };
    let mut seen: Vec<&str> = Vec::new();
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        if seen.contains(&name) {
            return Err(format!("parameter {name} twice in the answer: {ext}"));
        }
        seen.push(name);
        match (name, value) {
            ("server_no_context_takeover", None) => answer.server_takeover = false,
            ("client_no_context_takeover", None) => {}
            // The decompressor has the largest window, which reads any smaller one.
            ("server_max_window_bits", Some(v)) if matches!(v.parse::<u8>(), Ok(8..=15)) => {}
            // The message is compressed with a 32 KiB window: only 15 is honoured.
            ("client_max_window_bits", Some("15")) => {}
            _ => return Err(format!("answer this client cannot honour: {ext}")),
        }
    }
    Ok(answer)
}

/// Per-connection receive state of a deflate echo run.
struct Conn {
    hdr: [u8; 10],
    hdr_len: usize,
    /// Payload bytes still to come in the current frame (`None`: between frames).
    remaining: Option<usize>,
    /// The current frame: first header byte, header length.
    first: u8,
    hlen: usize,
    /// Its payload so far.
    payload: Vec<u8>,
    /// What the 101 said (`None`: the connection never opened).
    answer: Option<Answer>,
    /// With server context takeover: this connection's decompressor, made at its first
    /// compressed echo and never reset.
    inflater: Option<Decompress>,
}

/// Receive side of the echo mode with `--deflate`: every connection's frames, the inflaters,
/// and what arrived on the wire.
pub struct Echoes {
    msg: Vec<u8>,
    op: u8,
    verify: bool,
    conns: Vec<Conn>,
    /// For connections whose server answered `server_no_context_takeover`: reset per message.
    shared: Decompress,
    out: Vec<u8>,
    /// Since the last [`Echoes::reset_counts`]: echo frames, those compressed, and their bytes on
    /// the wire (headers and payloads).
    pub frames: u64,
    pub compressed: u64,
    pub wire_in: u64,
}

impl Echoes {
    /// For `n` connections echoing `msg` in frames of opcode `op`.
    pub fn new(n: usize, msg: &[u8], op: u8, verify: bool) -> Echoes {
        Echoes {
            msg: msg.to_vec(),
            op,
            verify,
            conns: (0..n)
                .map(|_| Conn {
                    hdr: [0; 10],
                    hdr_len: 0,
                    remaining: None,
                    first: 0,
                    hlen: 0,
                    payload: Vec::new(),
                    answer: None,
                    inflater: None,
                })
                .collect(),
            shared: Decompress::new_with_window_bits(false, 15),
            out: Vec::with_capacity(msg.len() + 1),
            frames: 0,
            compressed: 0,
            wire_in: 0,
        }
    }

    /// Connection `i` opened with this answer.
    pub fn opened(&mut self, i: usize, answer: Answer) {
        self.conns[i].answer = Some(answer);
    }

    /// How many connections opened whose server keeps its context, and how many that do not.
    pub fn answers(&self) -> (usize, usize) {
        let open = self.conns.iter().filter_map(|c| c.answer);
        open.fold((0, 0), |(t, n), a| {
            if a.server_takeover {
                (t + 1, n)
            } else {
                (t, n + 1)
            }
        })
    }

    pub fn reset_counts(&mut self) {
        self.frames = 0;
        self.compressed = 0;
        self.wire_in = 0;
    }

    /// Consume what connection `i` read; returns how many echoes it completed (each checked).
    pub fn feed(&mut self, i: usize, mut data: &[u8]) -> Result<u64, RxError> {
        let mut done = 0;
        while !data.is_empty() {
            let c = &mut self.conns[i];
            let Some(remaining) = c.remaining else {
                let take = (10 - c.hdr_len).min(data.len());
                c.hdr[c.hdr_len..c.hdr_len + take].copy_from_slice(&data[..take]);
                let have = c.hdr_len + take;
                let Some((_, _, len, hlen)) = parse_server_header(&c.hdr[..have])? else {
                    c.hdr_len = have;
                    data = &data[take..];
                    continue;
                };
                data = &data[hlen - c.hdr_len..];
                c.hdr_len = 0;
                c.first = c.hdr[0];
                c.hlen = hlen;
                c.payload.clear();
                if len == 0 {
                    done += self.frame(i)?;
                } else {
                    self.conns[i].remaining = Some(len);
                }
                continue;
            };
            let take = remaining.min(data.len());
            c.payload.extend_from_slice(&data[..take]);
            data = &data[take..];
            if take == remaining {
                c.remaining = None;
                done += self.frame(i)?;
            } else {
                c.remaining = Some(remaining - take);
            }
        }
        Ok(done)
    }

    /// Connection `i`'s frame is complete: check it; 1 for an echo.
    fn frame(&mut self, i: usize) -> Result<u64, RxError> {
        let c = &mut self.conns[i];
        let (fin, rsv, op) = (c.first & 0x80 != 0, c.first & 0x70, c.first & 0x0f);
        if op == 8 {
            let code = match c.payload[..] {
                [a, b, ..] => u16::from_be_bytes([a, b]),
                _ => 1005,
            };
            return Err(RxError::Closed(code));
        }
        if !fin || op != self.op || (rsv != 0 && rsv != 0x40) {
            return Err(RxError::Protocol(format!(
                "unexpected frame: fin {fin} rsv {:#x} opcode {op} length {} (want a whole message, opcode {})",
                rsv >> 4,
                c.payload.len(),
                self.op
            )));
        }
        self.frames += 1;
        self.wire_in += (c.hlen + c.payload.len()) as u64;
        if rsv == 0 {
            if self.verify && c.payload != self.msg {
                return Err(RxError::Protocol("echoed payload differs".into()));
            }
            return Ok(1);
        }
        self.compressed += 1;
        if !self.verify {
            return Ok(1);
        }
        let takeover = c.answer.is_some_and(|a| a.server_takeover);
        let d = if takeover {
            c.inflater
                .get_or_insert_with(|| Decompress::new_with_window_bits(false, 15))
        } else {
            self.shared.reset(false);
            &mut self.shared
        };
        inflate(d, &[&c.payload, &TAIL], &mut self.out, self.msg.len())
            .map_err(RxError::Protocol)?;
        if self.out != self.msg {
            return Err(RxError::Protocol(format!(
                "echo inflates to {} bytes that differ from the message",
                self.out.len()
            )));
        }
        Ok(1)
    }
}

/// Inflate `parts` (a compressed message, then the tail) into `out`; more than `limit` bytes is
/// an error, and so is a final block (which would end a stream that context takeover continues).
fn inflate(
    d: &mut Decompress,
    parts: &[&[u8]],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), String> {
    out.clear();
    out.reserve_exact(limit + 1);
    for part in parts {
        let mut pos = 0;
        loop {
            let (in0, out0) = (d.total_in(), out.len());
            let status = d
                .decompress_vec(&part[pos..], out, FlushDecompress::Sync)
                .map_err(|e| format!("echo is not valid deflate: {e}"))?;
            pos += (d.total_in() - in0) as usize;
            if out.len() > limit {
                return Err(format!(
                    "echo inflates to more than the {limit}-byte message"
                ));
            }
            if status == Status::StreamEnd {
                return Err("echo ends its deflate stream (final block)".into());
            }
            if pos == part.len() || (d.total_in() == in0 && out.len() == out0) {
                break;
            }
        }
    }
    Ok(())
}
