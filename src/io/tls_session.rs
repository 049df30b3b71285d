//! One TLS connection: rustls makes the handshake (its unbuffered API, driven by the loop), then
//! hands over the traffic secrets (`dangerous_into_kernel_connection`, the API kernel TLS uses)
//! and wsloop seals and opens the records itself ([`Records`]), in place, in the loop's receive
//! buffer and one sealing buffer per loop thread. rustls's [`KernelConnection`] is kept for
//! key updates.
//!
//! Why: rustls's buffered connection copies each record's plaintext into a new allocation each
//! way (BENCHMARKS.md, TLS: about a third of what TLS added to a 1 KiB echo beyond AES-GCM
//! itself); its unbuffered API still does for application data.
//!
//! Buffers, and when they hold memory:
//! - `incoming`: the handshake's input (at most [`MAX_HANDSHAKE_INPUT`]), freed when it ends;
//! - `partial`: after it, the part of a record not received yet (less than [`MAX_RECORD`]),
//!   allocated only while a record is split between reads;
//! - `held`: ciphertext the socket has not taken (a handshake flight; after it, what the last
//!   write sealed), allocated only while the socket is full;
//! - records are sealed into one scratch buffer per thread (per loop), never per connection.

use super::records::{Opened, RecordError, Records, MAX_PLAINTEXT, MAX_RECORD};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData};
use rustls::{ProtocolVersion, ServerConfig, SupportedCipherSuite};
use std::cell::RefCell;
use std::io::{self, ErrorKind, Read, Write};
use std::sync::Arc;

/// The most plaintext one TLS record carries (2^14): what the transport seals at once.
pub(crate) const TLS_CHUNK: usize = MAX_PLAINTEXT;

/// The most plaintext one write seals before it writes (two full records): a WebSocket frame
/// of 16 KiB and its header leave in one system call. Ciphertext the socket did not take is
/// held, at most this much and its records' overhead.
pub(crate) const WRITE_MAX: usize = 2 * TLS_CHUNK;

/// The smallest read buffer a TLS connection reads into: one whole record of the largest size
/// must fit, since records are opened where they were read (`Config::validate` requires it).
pub(crate) const MIN_READ_BUFFER: usize = crate::config::TLS_MIN_RECV_BUFFER;
const _: () = assert!(MIN_READ_BUFFER >= MAX_RECORD);

/// The most bytes a client may send while its handshake is in progress: its first flight (a
/// ClientHello of a few KiB at most, even with post-quantum key shares and session tickets;
/// twice after a HelloRetryRequest), then the read that holds its Finished (at most 4 KiB, the
/// handshake's read size, even with application data behind it). Beyond it the connection
/// fails (`tls_error`): rustls would otherwise be handed a handshake message of up to 64 KiB
/// to hold until the handshake deadline.
pub(crate) const MAX_HANDSHAKE_INPUT: usize = 16 * 1024;

/// What one read of the handshake asks the socket for.
const HANDSHAKE_READ: usize = 4096;

/// The most ciphertext one [`Tls::read`] takes from the socket: a client whose records make
/// little or no plaintext (key updates between one-byte records, say) would otherwise keep one
/// read going until its socket drains, holding the loop. Past it the read stops, and
/// `Transport::take_more` tells the loop to read the connection again next turn.
pub(crate) const TLS_READ_MAX: usize = 256 * 1024;

/// The TLS versions a connection may use, as the metrics label them (index of
/// [`TlsKind::version`]).
pub(crate) const TLS_VERSIONS: [&str; 2] = ["1.2", "1.3"];

/// The cipher suites a connection may use (ring's, all of which the server offers), as the
/// metrics label them; a suite not listed (another provider's) is counted as the last, `other`.
pub(crate) const TLS_CIPHERS: [&str; 10] = [
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "other",
];

/// An established TLS connection's version and cipher suite, as indexes of [`TLS_VERSIONS`]
/// and [`TLS_CIPHERS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TlsKind {
    pub(crate) version: usize,
    pub(crate) cipher: usize,
}

impl TlsKind {
    fn of(version: ProtocolVersion, suite: SupportedCipherSuite) -> TlsKind {
        let version = match version {
            ProtocolVersion::TLSv1_2 => 0,
            _ => 1,
        };
        let last = TLS_CIPHERS.len() - 1;
        let cipher = suite.suite().as_str().map_or(last, |n| {
            TLS_CIPHERS[..last]
                .iter()
                .position(|c| *c == n)
                .unwrap_or(last)
        });
        TlsKind { version, cipher }
    }
}

thread_local! {
    /// Where a write seals its records before sending them (one per loop thread).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The bytes [`SCRATCH`] holds on this thread.
pub(crate) fn scratch_capacity() -> usize {
    SCRATCH.with_borrow(|s| s.capacity())
}

enum State {
    Handshake(Box<UnbufferedServerConnection>),
    Traffic(Box<Traffic>),
    /// While converting, or after a failure in between.
    Gone,
}

struct Traffic {
    records: Records,
    kernel: KernelConnection<ServerConnectionData>,
    kind: TlsKind,
    /// The peer asked for our key to change (TLS 1.3): our `KeyUpdate` goes before our next
    /// application data, once however many requests came meanwhile (RFC 8446 §4.6.3).
    key_update_owed: bool,
}

impl Traffic {
    /// The peer's `KeyUpdate`: the receiving key changes.
    fn update_rx(&mut self) -> Result<(), RecordError> {
        let rx = self
            .kernel
            .update_rx_secret()
            .map_err(|_| RecordError::Exhausted)?;
        self.records.rekey_rx(&rx)
    }

    /// Our `KeyUpdate`, sealed into `out` under the old key, then the new sending key.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.records.seal_key_update(out)?;
        let tx = self
            .kernel
            .update_tx_secret()
            .map_err(|_| RecordError::Exhausted)?;
        self.records.rekey_tx(&tx)
    }
}

/// One TLS connection (see the module docs).
pub(crate) struct Tls {
    state: State,
    /// The handshake's input not processed yet.
    incoming: Vec<u8>,
    /// After the handshake: the start of a record not complete yet.
    partial: Vec<u8>,
    /// Ciphertext the socket has not taken, from `held_at` on.
    held: Vec<u8>,
    held_at: usize,
    /// The peer's end of input was seen: its `close_notify`, or TCP's EOF.
    pub(crate) eof: bool,
    /// The connection failed (a bad record, an alert): nothing more is written.
    pub(crate) failed: bool,
    /// Our `close_notify` is queued (or was sent).
    pub(crate) closing: bool,
    /// The socket will be reset on close: nothing more is written.
    pub(crate) reset: bool,
    /// The handshake's completion was reported (see `Transport::take_established`).
    pub(crate) reported: bool,
    /// A PROXY header comes first (see `Transport::expect_proxy_header`): until
    /// `Transport::start_tls`, bytes move as they are, both ways.
    pub(crate) raw: bool,
    /// What followed the PROXY header in the read that ended it: the start of the TLS stream,
    /// read before the socket (empty, and unallocated, otherwise; at most
    /// [`MAX_HANDSHAKE_INPUT`] and one byte).
    pub(crate) early: Vec<u8>,
    /// Bytes read while the handshake was in progress (see [`MAX_HANDSHAKE_INPUT`]).
    handshake_in: usize,
    /// The plaintext whose ciphertext is held (see [`Tls::holds`]), while any of it is.
    pub(crate) chunk: usize,
    /// The last read stopped at [`TLS_READ_MAX`] (or at the end of the read buffer) with the
    /// socket not drained.
    pub(crate) more: bool,
}

impl Tls {
    /// A server connection of `config`.
    pub(crate) fn new(config: Arc<ServerConfig>) -> io::Result<Tls> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        Ok(Tls {
            state: State::Handshake(Box::new(conn)),
            incoming: Vec::new(),
            partial: Vec::new(),
            held: Vec::new(),
            held_at: 0,
            eof: false,
            failed: false,
            closing: false,
            reset: false,
            reported: false,
            raw: false,
            early: Vec::new(),
            handshake_in: 0,
            chunk: 0,
            more: false,
        })
    }

    /// The handshake completed: its version and cipher suite.
    pub(crate) fn kind(&self) -> Option<TlsKind> {
        match &self.state {
            State::Traffic(t) => Some(t.kind),
            _ => None,
        }
    }

    /// Ciphertext held for the socket (it goes out on a writable edge, through
    /// [`Tls::flush`]).
    pub(crate) fn holds(&self) -> bool {
        self.held_at < self.held.len()
    }

    /// The ciphertext held for the socket, in bytes.
    #[cfg(test)]
    pub(crate) fn held_len(&self) -> usize {
        self.held.len() - self.held_at
    }

    /// Input held: the handshake's not processed yet, or a record not complete yet.
    pub(crate) fn pending(&self) -> usize {
        self.incoming.len() + self.partial.len()
    }

    /// Write what is held, as far as the socket takes it: true once nothing is held.
    pub(crate) fn flush<S>(&mut self, stream: &S) -> io::Result<bool>
    where
        for<'s> &'s S: Write,
    {
        flush_held(&mut self.held, &mut self.held_at, stream)
    }

    /// Read plaintext into `buf` (at least [`MIN_READ_BUFFER`] bytes): `Ok(0)` at the peer's
    /// end of input; `WouldBlock` when nothing is there. Reads the socket until `buf` is full
    /// or the socket is drained (fewer bytes than `buf` holds means drained, unless
    /// [`Tls::more`] is set), writing what the handshake owes; `closed` (the event said the
    /// peer's FIN or reset is queued, which raises no edge of its own) makes it read until the
    /// socket says so. `stream` is the connection's socket (or, for the fuzz target, bytes in
    /// memory: [`crate::io::fuzzing`]).
    pub(crate) fn read<S>(&mut self, stream: &S, buf: &mut [u8], closed: bool) -> io::Result<usize>
    where
        for<'s> &'s S: Read + Write,
    {
        let read = self.read_plain(stream, buf, closed);
        if self.eof && matches!(read, Ok(n) if n > 0) {
            // The end came with the bytes returned (a close_notify after data in one read):
            // no edge will come for it, so the loop reads again next turn and gets `Ok(0)`.
            self.more = true;
        }
        read
    }

    /// The reads of [`Tls::read`].
    fn read_plain<S>(&mut self, stream: &S, buf: &mut [u8], closed: bool) -> io::Result<usize>
    where
        for<'s> &'s S: Read + Write,
    {
        if self.closing {
            // Our close_notify went out: the connection lingers (after a failure, our answer
            // sent) and the loop discards what the peer still sends until its EOF. Nothing is
            // opened any more: the bytes pass as they are, for the loop to discard.
            let mut s = stream;
            return loop {
                match s.read(buf) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
        }
        if self.failed {
            return Err(io::Error::new(ErrorKind::InvalidData, "TLS failed"));
        }
        if self.eof {
            return Ok(0);
        }
        if buf.len() < MIN_READ_BUFFER {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "read buffer smaller than a TLS record",
            ));
        }
        let mut filled = 0;
        if matches!(self.state, State::Handshake(_))
            && !self.read_handshake(stream, buf, &mut filled, closed)?
        {
            if self.incoming.is_empty() {
                // Waiting for the client's next flight: the read buffer's memory goes back.
                self.incoming = Vec::new();
            }
            return match (filled, self.eof) {
                (0, false) => Err(ErrorKind::WouldBlock.into()),
                (n, _) => Ok(n),
            };
        }
        self.read_records(stream, buf, filled, closed)
    }

    /// The handshake's reads: true once it is done (and converted), with any plaintext that
    /// came with the client's last flight at `buf[..*filled]`.
    fn read_handshake<S>(
        &mut self,
        stream: &S,
        buf: &mut [u8],
        filled: &mut usize,
        closed: bool,
    ) -> io::Result<bool>
    where
        for<'s> &'s S: Read + Write,
    {
        loop {
            if self.drive(stream, buf, filled)? {
                return Ok(true);
            }
            if self.eof {
                return Ok(false);
            }
            let have = self.incoming.len();
            self.incoming.resize(have + HANDSHAKE_READ, 0);
            let read = read_some(stream, &mut self.early, &mut self.incoming[have..]);
            let (n, drained) = match read {
                Ok((0, _)) => {
                    self.incoming.truncate(have);
                    // TCP's EOF in the handshake (half a ClientHello, say): the end.
                    self.eof = true;
                    return Ok(false);
                }
                Ok((n, from_socket)) => (n, from_socket && n < HANDSHAKE_READ),
                Err(e) => {
                    self.incoming.truncate(have);
                    return match e.kind() {
                        ErrorKind::WouldBlock => Ok(false),
                        _ => Err(e),
                    };
                }
            };
            self.incoming.truncate(have + n);
            self.handshake_in += n;
            if self.handshake_in > MAX_HANDSHAKE_INPUT {
                // Far more than any client's first flight: refused before rustls is handed it.
                self.failed = true;
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "TLS handshake input over its limit",
                ));
            }
            if drained && !closed {
                // What came is processed, then we wait for the next edge.
                return self.drive(stream, buf, filled);
            }
        }
    }

    /// Run rustls's handshake on what `incoming` holds until it needs more input (false) or is
    /// done and converted (true).
    fn drive<S>(&mut self, stream: &S, buf: &mut [u8], filled: &mut usize) -> io::Result<bool>
    where
        for<'s> &'s S: Write,
    {
        enum Step {
            Again,
            NeedInput,
            Traffic,
            Eof,
            Failed(rustls::Error),
        }
        loop {
            let Tls {
                state,
                incoming,
                held,
                held_at,
                ..
            } = self;
            let State::Handshake(conn) = state else {
                return Ok(true);
            };
            let status = conn.process_tls_records(incoming);
            let mut discard = status.discard;
            let step = match status.state {
                Err(e) => Step::Failed(e),
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    encode_into(&mut enc, held);
                    Step::Again
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    // Sent as far as the socket takes it; the rest is held (and goes on a
                    // writable edge): for rustls it is transmitted either way.
                    flush_held(held, held_at, stream)?;
                    t.done();
                    Step::Again
                }
                Ok(ConnectionState::BlockedHandshake) => Step::NeedInput,
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    // Records that came with the client's Finished. The handshake input is at
                    // most MAX_HANDSHAKE_INPUT, so their plaintext fits the read buffer.
                    let mut step = Step::Again;
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => {
                                discard += rec.discard;
                                let n = rec.payload.len();
                                match buf.get_mut(*filled..*filled + n) {
                                    Some(to) => to.copy_from_slice(rec.payload),
                                    None => {
                                        step = Step::Failed(rustls::Error::General(
                                            "early records larger than the read buffer".into(),
                                        ));
                                        break;
                                    }
                                }
                                *filled += n;
                            }
                            Err(e) => {
                                step = Step::Failed(e);
                                break;
                            }
                        }
                    }
                    step
                }
                Ok(ConnectionState::WriteTraffic(_)) => Step::Traffic,
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Step::Eof,
                Ok(_) => Step::Failed(rustls::Error::General(
                    "unexpected state in the TLS handshake".into(),
                )),
            };
            incoming.drain(..discard);
            match step {
                Step::Again => {}
                Step::NeedInput => return Ok(false),
                Step::Eof => {
                    self.eof = true;
                    return Ok(false);
                }
                Step::Traffic => {
                    let State::Handshake(conn) = &self.state else {
                        return Ok(true);
                    };
                    if conn.is_handshaking() {
                        // TLS 1.3: our flight is out, the client's Finished is not in yet.
                        return Ok(false);
                    }
                    self.convert()?;
                    return Ok(true);
                }
                Step::Failed(e) => {
                    self.failed = true;
                    self.send_alert_after_failure(stream);
                    return Err(tls_error(e));
                }
            }
        }
    }

    /// The handshake is over and rustls has nothing left to send: the records are ours from
    /// now on. What rustls did not process (the start of the client's next record) becomes the
    /// first partial record.
    fn convert(&mut self) -> io::Result<()> {
        let State::Handshake(conn) = std::mem::replace(&mut self.state, State::Gone) else {
            return Ok(());
        };
        let (secrets, kernel) = (*conn).dangerous_into_kernel_connection().map_err(|e| {
            self.failed = true;
            tls_error(e)
        })?;
        let suite = kernel.negotiated_cipher_suite();
        let limit = match suite {
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        };
        let version = kernel.protocol_version();
        let Some(records) = Records::new(version, &secrets.tx, &secrets.rx, limit) else {
            self.failed = true;
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "TLS cipher suite not served",
            ));
        };
        self.state = State::Traffic(Box::new(Traffic {
            records,
            key_update_owed: false,
            kernel,
            kind: TlsKind::of(version, suite),
        }));
        self.partial = std::mem::take(&mut self.incoming);
        if self.partial.is_empty() {
            self.partial = Vec::new();
        }
        Ok(())
    }

    /// After the handshake: read ciphertext into `buf` after the plaintext there (`filled`
    /// bytes), open every whole record in place, and keep a split one for the next read.
    fn read_records<S>(
        &mut self,
        stream: &S,
        buf: &mut [u8],
        mut filled: usize,
        closed: bool,
    ) -> io::Result<usize>
    where
        for<'s> &'s S: Read + Write,
    {
        let mut fed = 0usize;
        loop {
            if self.eof || filled == buf.len() {
                return Ok(filled);
            }
            // The split record first, then the socket, after the plaintext so far.
            let p = self.partial.len();
            if buf.len() - filled <= p {
                // No room for the split record and more: the rest on the next read.
                self.more = true;
                return would_block(filled);
            }
            buf[filled..filled + p].copy_from_slice(&self.partial);
            self.partial = Vec::new();
            let room = buf.len() - filled - p;
            let (n, drained) = match read_some(stream, &mut self.early, &mut buf[filled + p..]) {
                Ok((0, _)) => {
                    // TCP's EOF without close_notify: the WebSocket close handshake says
                    // whether the peer ended cleanly.
                    self.eof = true;
                    (0, true)
                }
                Ok((n, from_socket)) => (n, from_socket && n < room),
                Err(e) if e.kind() == ErrorKind::WouldBlock => (0, true),
                Err(e) => {
                    // What was read stays: the split record with it.
                    self.partial.extend_from_slice(&buf[filled..filled + p]);
                    return Err(e);
                }
            };
            fed += n;
            filled = self.open_records(stream, buf, filled, filled + p + n)?;
            if self.eof {
                return Ok(filled);
            }
            if n == 0 || (drained && !closed) {
                return would_block(filled);
            }
            if fed >= TLS_READ_MAX {
                self.more = true;
                return would_block(filled);
            }
        }
    }

    /// Open the whole records in `buf[from..end]`, moving their plaintext to `buf[from..]`,
    /// and keep the split one at the end in `partial`. Returns the end of the plaintext.
    fn open_records<S>(
        &mut self,
        stream: &S,
        buf: &mut [u8],
        from: usize,
        end: usize,
    ) -> io::Result<usize>
    where
        for<'s> &'s S: Write,
    {
        let Tls {
            state,
            partial,
            eof,
            ..
        } = self;
        let State::Traffic(t) = state else {
            return Ok(from);
        };
        let mut out = from;
        let mut at = from;
        let failure = loop {
            let len = match t.records.record_len(&buf[at..end]) {
                Ok(Some(len)) if at + len <= end => len,
                Ok(_) => break None,
                Err(e) => break Some(e),
            };
            match t.records.open(&mut buf[at..at + len]) {
                Ok(Opened::Data(r)) => {
                    buf.copy_within(at + r.start..at + r.end, out);
                    out += r.len();
                }
                Ok(Opened::CloseNotify) => {
                    *eof = true;
                    return Ok(out);
                }
                Ok(Opened::KeyUpdate { requested }) => {
                    if let Err(e) = t.update_rx() {
                        break Some(e);
                    }
                    // Ours goes with our next write: a peer that asks many times while we are
                    // silent gets one, and asking costs it a record per answer at most.
                    t.key_update_owed |= requested;
                }
                Ok(Opened::Nothing) => {}
                Err(e) => break Some(e),
            }
            at += len;
        };
        match failure {
            None => {
                partial.extend_from_slice(&buf[at..end]);
                Ok(out)
            }
            Some(e) => Err(self.record_failed(stream, e)),
        }
    }

    /// Take plaintext from `parts`, sealed into records and written, while the socket takes
    /// it all: returns the bytes taken. Writes nothing while ciphertext is held (it goes first,
    /// on a writable edge) or the handshake is in progress.
    pub(crate) fn write<S>(&mut self, stream: &S, parts: &[&[u8]]) -> io::Result<usize>
    where
        for<'s> &'s S: Write,
    {
        if self.failed {
            return Err(io::Error::new(ErrorKind::InvalidData, "TLS failed"));
        }
        if !self.flush(stream)? {
            return Ok(0);
        }
        let Tls {
            state,
            held,
            held_at,
            chunk,
            ..
        } = self;
        let State::Traffic(t) = state else {
            return Ok(0); // the handshake first
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let written = SCRATCH.with_borrow_mut(|out| -> io::Result<usize> {
            let mut taken = 0;
            while taken < total {
                out.clear();
                let round = taken;
                if std::mem::take(&mut t.key_update_owed) {
                    // Before our next application data (RFC 8446 §4.6.3).
                    t.update_tx(out).map_err(record_error)?;
                }
                while taken < total && taken - round < WRITE_MAX {
                    let mut slices: [&[u8]; 16] = [&[]; 16];
                    let (mut k, mut room, mut skip) = (0, TLS_CHUNK, taken);
                    for part in parts {
                        if skip >= part.len() {
                            skip -= part.len();
                            continue;
                        }
                        let rest = &part[skip..];
                        skip = 0;
                        let n = rest.len().min(room);
                        slices[k] = &rest[..n];
                        (k, room) = (k + 1, room - n);
                        if room == 0 || k == slices.len() {
                            break;
                        }
                    }
                    t.records.seal(&slices[..k], out).map_err(record_error)?;
                    taken += TLS_CHUNK - room;
                    if t.records.tx_worn() {
                        if t.kind.version == 0 {
                            // TLS 1.2 cannot change keys: the connection ends here.
                            return Err(record_error(RecordError::Exhausted));
                        }
                        t.update_tx(out).map_err(record_error)?;
                    }
                }
                let at = write_some(out, stream)?;
                if at < out.len() {
                    // The socket is full: the rest is held, and this round's plaintext with it.
                    held.extend_from_slice(&out[at..]);
                    *held_at = 0;
                    *chunk = taken - round;
                    break;
                }
            }
            // A large scratch goes back after a large write.
            if out.capacity() > 2 * MAX_RECORD + WRITE_MAX {
                *out = Vec::new();
            }
            Ok(taken)
        });
        // A record that could not be sealed, or a socket that failed: nothing more is written.
        self.failed |= written.is_err();
        written
    }

    /// Our close_notify (once), sealed and tried; not while a PROXY header is awaited (no TLS
    /// has begun), nor after a failure.
    pub(crate) fn close_notify<S>(&mut self, stream: &S)
    where
        for<'s> &'s S: Write,
    {
        if self.closing || self.failed || self.raw {
            return;
        }
        self.closing = true;
        // A handshake that never completed ends without one (the TCP close says it).
        if let State::Traffic(t) = &mut self.state {
            if t.records.seal_close_notify(&mut self.held).is_ok() {
                let _ = self.flush(stream);
            }
        }
    }

    /// A record could not be taken: the connection fails, with the alert that answers it
    /// (one try).
    fn record_failed<S>(&mut self, stream: &S, e: RecordError) -> io::Error
    where
        for<'s> &'s S: Write,
    {
        self.failed = true;
        if let (State::Traffic(t), Some(d)) = (&mut self.state, e.alert()) {
            if t.records.seal_fatal_alert(d, &mut self.held).is_ok() {
                let _ = self.flush(stream);
            }
        }
        record_error(e)
    }

    /// The handshake failed: the alert rustls has for it, one try.
    fn send_alert_after_failure<S>(&mut self, stream: &S)
    where
        for<'s> &'s S: Write,
    {
        if let State::Handshake(conn) = &mut self.state {
            // The same input as before (rustls's deframer keeps positions in it): the alert it
            // queued comes out before anything of it is looked at again.
            let status = conn.process_tls_records(&mut self.incoming);
            if let Ok(ConnectionState::EncodeTlsData(mut enc)) = status.state {
                encode_into(&mut enc, &mut self.held);
            }
        }
        let _ = self.flush(stream);
    }
}

/// Encode a record rustls has into `held`, growing it as needed.
fn encode_into(enc: &mut EncodeTlsData<'_, ServerConnectionData>, held: &mut Vec<u8>) {
    let start = held.len();
    held.resize(start + 4096, 0);
    loop {
        match enc.encode(&mut held[start..]) {
            Ok(n) => {
                held.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(s)) => held.resize(start + s.required_size, 0),
            Err(EncodeError::AlreadyEncoded) => {
                held.truncate(start);
                return;
            }
        }
    }
}

/// Write `held[*at..]`: true once all of it is written (then its memory goes back).
fn flush_held<S>(held: &mut Vec<u8>, at: &mut usize, stream: &S) -> io::Result<bool>
where
    for<'s> &'s S: Write,
{
    *at += write_some(&held[*at..], stream)?;
    if *at < held.len() {
        return Ok(false);
    }
    *held = Vec::new();
    *at = 0;
    Ok(true)
}

/// Write `bytes` as far as the socket takes them: the bytes written.
fn write_some<S>(bytes: &[u8], stream: &S) -> io::Result<usize>
where
    for<'s> &'s S: Write,
{
    let mut w = stream;
    let mut at = 0;
    while at < bytes.len() {
        match w.write(&bytes[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// Read what followed a PROXY header first, then the socket: the bytes read, and whether they
/// came from the socket (a short read of it means it is drained; a short copy does not).
fn read_some<S>(stream: &S, early: &mut Vec<u8>, buf: &mut [u8]) -> io::Result<(usize, bool)>
where
    for<'s> &'s S: Read,
{
    if !early.is_empty() {
        let n = buf.len().min(early.len());
        buf[..n].copy_from_slice(&early[..n]);
        early.drain(..n);
        if early.is_empty() {
            *early = Vec::new(); // its memory back at once
        }
        return Ok((n, false));
    }
    let mut s = stream;
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => return other.map(|n| (n, true)),
        }
    }
}

/// What a read that found nothing more returns: the bytes it has, or `WouldBlock`.
fn would_block(filled: usize) -> io::Result<usize> {
    match filled {
        0 => Err(ErrorKind::WouldBlock.into()),
        n => Ok(n),
    }
}

/// A TLS failure as the loop sees it: `InvalidData` (no socket error has that kind).
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e)
}

fn record_error(e: RecordError) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e)
}
