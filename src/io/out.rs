//! A connection's output. Everything written to one connection during one dispatch is collected
//! in the loop's cork buffer and written with one `send` at the end; only the bytes the socket
//! did not take are copied into the connection's own [`SendQueue`], which a writable event
//! flushes. A payload of [`DIRECT_MIN`] bytes or more is not copied into the cork: while nothing
//! is queued it goes out at once with one `writev` of the cork, its header and the payload
//! ([`Outbox`]).

use super::transport::Transport;
use crate::protocol::deflate::{Deflater, SharedCodec};
use crate::protocol::frame::{OpCode, MAX_HEADER_LEN};
use crate::protocol::session::{Session, State};
use crate::reason::CloseReason;

/// The cork buffer is shrunk back to this after a large message passed through it.
pub(crate) const CORK_KEEP: usize = 64 * 1024;

/// The bytes of one connection that its socket has not taken yet, in order: the only place
/// outgoing bytes wait once the dispatch that wrote them has ended, and so the one figure every
/// limit on a connection's output reads ([`SendQueue::len`], with the cork while the connection
/// owns it): sends are refused over `max_backpressure`, reading pauses over it, the write-stall
/// rule and the metrics read it.
///
/// Written bytes are consumed from the front by moving an offset, not the bytes behind it, so
/// draining a queue costs time linear in its size however small the writes; the buffer is
/// compacted only once the consumed part is at least as long as the rest (each byte moves at
/// most once per time it is written), and freed when the queue empties. An empty queue holds no
/// heap memory and costs one pointer in the connection.
#[derive(Default)]
pub(crate) struct SendQueue(Option<Box<QueueBuf>>);

struct QueueBuf {
    bytes: Vec<u8>,
    /// Bytes at the front of `bytes` already written.
    head: usize,
}

impl SendQueue {
    /// Bytes waiting.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.bytes.len() - q.head)
    }

    /// Nothing is waiting.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The heap memory the queue holds (its buffer's capacity and its box), as the memory
    /// budget counts it.
    #[inline]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.0
            .as_ref()
            .map_or(0, |q| q.bytes.capacity() + std::mem::size_of::<QueueBuf>())
    }

    /// The bytes waiting, in order.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.0.as_ref().map_or(&[][..], |q| &q.bytes[q.head..])
    }

    /// Append what a write of `written` bytes left unsent of `parts` (in order).
    pub(crate) fn push_unsent(&mut self, parts: &[&[u8]], written: usize) {
        let total = parts.iter().map(|p| p.len()).sum::<usize>();
        if written >= total {
            return;
        }
        let q = self.0.get_or_insert_with(|| {
            Box::new(QueueBuf {
                bytes: Vec::new(),
                head: 0,
            })
        });
        q.bytes.reserve_exact(total - written);
        let mut skip = written;
        for part in parts {
            let from = skip.min(part.len());
            q.bytes.extend_from_slice(&part[from..]);
            skip -= from;
        }
    }

    /// Append `bytes`.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.push_unsent(&[bytes], 0);
    }

    /// The socket took the first `n` waiting bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        let Some(q) = self.0.as_mut() else {
            return;
        };
        q.head += n;
        debug_assert!(q.head <= q.bytes.len());
        if q.head >= q.bytes.len() {
            self.0 = None;
        } else if q.head >= q.bytes.len() - q.head {
            q.bytes.drain(..q.head);
            q.head = 0;
            if q.bytes.capacity() > CORK_KEEP.max(4 * q.bytes.len()) {
                q.bytes.shrink_to(2 * q.bytes.len());
            }
        }
    }
}

/// Payloads of at least this many bytes are written to the socket straight from the caller's
/// buffer when nothing is queued for the connection, instead of being copied into the cork.
/// Below it the copy is cheaper than the system call a direct write may add (when several
/// messages are answered in one dispatch, the cork sends them all with one `send`).
pub(crate) const DIRECT_MIN: usize = 4096;

/// What a sender did with an [`Outbox`], for the loop to settle once it returns.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sent {
    /// What a direct write left to do.
    pub(crate) direct: Direct,
    /// Bytes written to the socket directly.
    pub(crate) bytes_written: u64,
    /// Data frames sent.
    pub(crate) messages: u64,
}

/// What a direct write left for the loop to do once the sender returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direct {
    /// Nothing (no direct write, or the socket took everything).
    Done,
    /// The socket took only part: the rest is in `pending`, so arm the write-stall deadline.
    Partial,
    /// The write failed: end the connection with this reason.
    Failed(CloseReason),
}

/// Where one connection's outgoing frames go, for a callback or a posted send: the loop's cork
/// (which this connection owns at the time), or, for a payload of [`DIRECT_MIN`] bytes or more
/// while nothing is queued, the socket, with one `writev` of the cork, the frame header and the
/// payload. Bytes on the wire keep the order of the calls: the cork goes out before the new
/// frame, and nothing overtakes queued (`pending`) bytes. What the socket does not take is
/// copied into `pending`; the loop then does, after a partial or failed direct write, what it
/// does after flushing the cork ([`Direct`]).
pub(crate) struct Outbox<'a> {
    cork: &'a mut Vec<u8>,
    transport: &'a mut Transport,
    pending: &'a mut SendQueue,
    /// The connection's protocol state, which encodes every frame (and refuses once closing).
    session: &'a mut Session,
    /// The loop's compressor, for a connection that negotiated permessage-deflate.
    codec: &'a mut SharedCodec,
    /// The connection's own compressor (the dedicated profile), used instead of the loop's.
    own: Option<&'a mut Deflater>,
    /// A direct write is allowed: it adds no system call (see [`Outbox::new`]).
    direct_ok: bool,
    /// What the loop must do after the sender returns.
    pub(crate) direct: Direct,
    /// Bytes written to the socket directly, and data frames sent: the loop adds them to its
    /// counters after the sender returns.
    pub(crate) bytes_written: u64,
    pub(crate) messages: u64,
}

impl<'a> Outbox<'a> {
    /// The output of the connection with this `transport` and `pending` queue, which must own
    /// the cork. `last`: the loop flushes the cork as soon as the sender returns (the answer to the
    /// last message of a read, a posted send, `on_drain`), so one direct write replaces that
    /// `send` instead of adding a system call. Otherwise (more messages of the same read follow,
    /// whose answers share one `send`) every frame goes to the cork, as does every frame after
    /// the first direct write: a sender costs at most one system call more than the cork would.
    pub(crate) fn new(
        cork: &'a mut Vec<u8>,
        transport: &'a mut Transport,
        pending: &'a mut SendQueue,
        session: &'a mut Session,
        codec: &'a mut SharedCodec,
        last: bool,
    ) -> Self {
        Outbox {
            cork,
            transport,
            pending,
            session,
            codec,
            own: None,
            direct_ok: last,
            direct: Direct::Done,
            bytes_written: 0,
            messages: 0,
        }
    }

    /// Compress with the connection's own compressor, if it has one (the dedicated profile).
    #[inline]
    pub(crate) fn with_own(mut self, own: Option<&'a mut Deflater>) -> Self {
        self.own = own;
        self
    }

    /// What was sent through this outbox, for the loop to settle.
    #[inline]
    pub(crate) fn sent(&self) -> Sent {
        Sent {
            direct: self.direct,
            bytes_written: self.bytes_written,
            messages: self.messages,
        }
    }

    /// The loop's compressor (a publication is compressed once for every subscriber).
    #[inline]
    pub(crate) fn codec(&mut self) -> &mut SharedCodec {
        self.codec
    }

    /// Bytes sent but not yet written to the socket.
    #[inline]
    pub(crate) fn buffered(&self) -> usize {
        self.pending.len() + self.cork.len()
    }

    /// Send one data message (`Text` or `Binary`), encoded by the session. Returns false if
    /// nothing may be sent: the session refused (it is closing), or a direct write failed
    /// ([`Direct::Failed`]: the connection must end).
    ///
    /// On a connection that negotiated permessage-deflate, a payload of at least the
    /// compression threshold is compressed on its own with the loop's compressor and sent with
    /// RSV1 set; a shorter one goes out as it is.
    #[inline]
    pub(crate) fn message(&mut self, op: OpCode, payload: &[u8]) -> bool {
        let bits = self.session.deflate_bits();
        let sent = if bits != 0 && self.codec.compressible(payload.len()) {
            self.compressed(op, payload, bits)
        } else if payload.len() < DIRECT_MIN || !self.direct_ok || !self.pending.is_empty() {
            self.session.send(op, payload, self.cork)
        } else {
            self.write_direct(op, payload)
        };
        self.messages += sent as u64;
        sent
    }

    /// Send a ping (payload cut to 125 bytes). Returns false if the session refused.
    pub(crate) fn ping(&mut self, payload: &[u8]) -> bool {
        self.session.ping(payload, self.cork)
    }

    /// Compress `payload` with the loop's compressor for a window of `bits` and send it as one
    /// frame with RSV1 set, through the cork or, if large, a direct write as for any frame.
    #[inline(never)]
    fn compressed(&mut self, op: OpCode, payload: &[u8], bits: u8) -> bool {
        if self.session.state() != State::Open {
            return false; // refused before spending time on compressing it
        }
        let z = match &mut self.own {
            Some(own) => self.codec.compress_with(own, payload),
            None => self.codec.compress(bits, payload),
        };
        if z.len() < DIRECT_MIN || !self.direct_ok || !self.pending.is_empty() {
            return self.session.send_compressed(op, z, self.cork);
        }
        let written = write_frame_now(
            self.transport,
            self.cork,
            self.pending,
            self.session,
            op,
            true,
            z,
        );
        self.settle_direct(written)
    }

    /// One `writev` of the cork, the frame's header and `payload`; queue what the socket does
    /// not take. Returns false if the session refused or the write failed. Kept out of line:
    /// the small-message path through [`Outbox::message`] stays short.
    #[inline(never)]
    fn write_direct(&mut self, op: OpCode, payload: &[u8]) -> bool {
        let written = write_frame_now(
            self.transport,
            self.cork,
            self.pending,
            self.session,
            op,
            false,
            payload,
        );
        self.settle_direct(written)
    }

    /// After a direct write: no other this time (see [`Outbox::new`]), and what it left to do.
    /// `None`: the session refused the frame (it is closing), nothing was written.
    fn settle_direct(&mut self, written: Option<(Result<usize, CloseReason>, bool)>) -> bool {
        let Some(written) = written else {
            return false;
        };
        self.direct_ok = false;
        match written {
            (Ok(n), partial) => {
                self.bytes_written += n as u64;
                if partial {
                    self.direct = Direct::Partial;
                }
                true
            }
            (Err(reason), _) => {
                self.direct = Direct::Failed(reason);
                false
            }
        }
    }
}

/// One `writev` of the cork, the header of a data frame the session encodes (RSV1 set if
/// `compressed`) and its payload; what the socket does not take is queued in `pending`, and the
/// cork is emptied. Returns the bytes written (or why the connection must end) and whether some
/// were queued; `None` if the session refused the frame (it is closing).
fn write_frame_now(
    transport: &mut Transport,
    cork: &mut Vec<u8>,
    pending: &mut SendQueue,
    session: &mut Session,
    op: OpCode,
    compressed: bool,
    payload: &[u8],
) -> Option<(Result<usize, CloseReason>, bool)> {
    let mut head = [0u8; MAX_HEADER_LEN];
    let head_len = match compressed {
        true => session.header_compressed(op, payload.len(), &mut head)?,
        false => session.header(op, payload.len(), &mut head)?,
    };
    let parts = [&cork[..], &head[..head_len], payload];
    let written = transport.write_vectored::<3>(&parts);
    let mut partial = false;
    if let Ok(n) = written {
        let total = parts.iter().map(|p| p.len()).sum::<usize>();
        if n < total {
            pending.push_unsent(&parts, n);
            partial = true;
        }
    }
    cork.clear();
    Some((written.map_err(|e| CloseReason::of_io_error(&e)), partial))
}

#[cfg(test)]
mod tests {
    use super::{Direct, Outbox, SendQueue, DIRECT_MIN};
    use crate::protocol::deflate::SharedCodec;

    fn codec() -> SharedCodec {
        SharedCodec::new(1024)
    }
    use crate::io::transport::Transport;
    use crate::protocol::frame::{write_frame, OpCode};
    use crate::protocol::handshake::Limits;
    use crate::protocol::session::{Head, Session};
    use crate::reason::CloseReason;
    use std::io::Read;

    /// A session past its handshake, as the loop holds it for an open connection.
    fn open_session() -> Session {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let mut session = Session::new();
        let head_len = match session.feed_head(request, &Limits::default()) {
            Ok(Head::Complete { head_len, .. }) => head_len,
            other => panic!("{other:?}"),
        };
        session.finish_handshake(head_len, false);
        session
    }

    #[test]
    fn unsent_remainder_is_queued_exactly_after_any_partial_write() {
        let parts: [&[u8]; 3] = [b"cork", b"", b"payload"];
        let all: Vec<u8> = parts.concat();
        for written in 0..=all.len() {
            let mut pending = SendQueue::default();
            pending.push(b"old");
            pending.push_unsent(&parts, written);
            assert_eq!(
                pending.bytes()[3..],
                all[written..],
                "after {written} bytes written"
            );
            assert_eq!(&pending.bytes()[..3], b"old");
        }
        let mut empty = SendQueue::default();
        empty.push_unsent(&parts, all.len());
        assert!(
            empty.is_empty() && empty.0.is_none(),
            "nothing unsent, nothing held"
        );
    }

    /// Draining a queue in small writes moves each byte at most once (an offset, with a
    /// compaction only once the consumed part outgrows the rest), so the cost is linear in the
    /// queue's size; the bytes come out in order, and an empty queue holds nothing.
    #[test]
    fn draining_a_large_queue_in_small_writes_is_linear_and_in_order() {
        let size = 256 << 20;
        let mut q = SendQueue::default();
        let block: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        for _ in 0..size >> 20 {
            q.push(&block);
        }
        assert_eq!(q.len(), size);
        let (mut moved, mut at, mut step) = (0usize, 0usize, 0usize);
        while !q.is_empty() {
            let n = [16 * 1024, 1, 4093][step % 3].min(q.len());
            step += 1;
            let front = q.bytes();
            assert_eq!(front[0], (at % 256) as u8, "out of order at {at}");
            let before = q.0.as_ref().map(|b| b.head).unwrap_or(0);
            q.consume(n);
            at += n;
            // A compaction moved the unconsumed rest to the front.
            if let Some(b) = q.0.as_ref() {
                if b.head < before + n {
                    moved += b.bytes.len();
                }
            }
            assert_eq!(q.len(), size - at);
        }
        assert_eq!(at, size);
        assert!(moved > 0, "never compacted");
        assert!(
            moved <= size,
            "compaction moved {moved} bytes for a {size}-byte queue"
        );
        assert!(q.0.is_none(), "a drained queue holds no buffer");
    }

    /// A connected pair: the server side as the loop holds it (non-blocking mio socket), with a
    /// small send buffer so that partial writes come soon, and the client side (blocking).
    #[allow(clippy::disallowed_methods, clippy::disallowed_types)] // a loopback pair for the test
    fn pair() -> (Transport, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        server.set_nonblocking(true).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        (
            Transport::tcp(mio::net::TcpStream::from_std(server), 0),
            client,
        )
    }

    /// The direct path against a real socket that stops taking bytes: large frames go out with
    /// `writev` (cork first), the first partial write queues exactly the unsent rest, later
    /// frames queue behind it, and the bytes on the wire are exactly the frames in call order.
    #[test]
    fn direct_writes_keep_order_and_count_exactly_through_a_partial_write() {
        let (mut socket, mut client) = pair();
        let mut session = open_session();
        let mut codec = codec();
        let (mut cork, mut pending) = (Vec::new(), SendQueue::default());
        let (mut bytes_sent, mut messages_sent) = (0u64, 0u64);
        let mut expected = Vec::new();
        // A small frame already corked before the first large one.
        write_frame(&mut cork, true, OpCode::Text, b"first");
        write_frame(&mut expected, true, OpCode::Text, b"first");
        let (mut full, mut partial, mut frames) = (0, 0, 0u64);
        for i in 0u32..200 {
            let len = [DIRECT_MIN, 64 * 1024 + 3, 16 * 1024][i as usize % 3];
            let payload: Vec<u8> = (0..len).map(|j| (j as u32 * 31 + i) as u8).collect();
            let small = format!("small {i}");
            let was_pending = !pending.is_empty();
            let mut out = Outbox::new(
                &mut cork,
                &mut socket,
                &mut pending,
                &mut session,
                &mut codec,
                true,
            );
            assert!(out.message(OpCode::Binary, &payload));
            assert!(out.message(OpCode::Text, small.as_bytes()));
            let direct = out.direct;
            (bytes_sent, messages_sent) =
                (bytes_sent + out.bytes_written, messages_sent + out.messages);
            frames += 2;
            write_frame(&mut expected, true, OpCode::Binary, &payload);
            write_frame(&mut expected, true, OpCode::Text, small.as_bytes());
            match (was_pending, direct) {
                (true, d) => assert_eq!(d, Direct::Done, "a direct write overtook queued bytes"),
                (false, Direct::Done) => {
                    full += 1;
                    assert!(pending.is_empty());
                    // Only the small frame is left, in the cork.
                    assert_eq!(cork.len(), 2 + small.len());
                }
                (false, Direct::Partial) => {
                    partial += 1;
                    assert!(!pending.is_empty());
                }
                (false, Direct::Failed(r)) => panic!("write failed: {r:?}"),
            }
            // The end of a dispatch (as `flush_cork` does once something is queued).
            if !pending.is_empty() {
                pending.push(&cork);
                cork.clear();
            }
            if partial > 0 && i > 20 {
                break;
            }
        }
        assert!(full >= 1, "no direct write was complete");
        assert_eq!(partial, 1, "the socket never refused bytes");
        assert_eq!(messages_sent, frames);
        assert_eq!(
            bytes_sent as usize + pending.len() + cork.len(),
            expected.len()
        );
        // Drain what is queued (as the writable path does) while the client reads everything.
        pending.push(&cork);
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; expected.len()];
            client.read_exact(&mut got).unwrap();
            assert!(
                got == expected,
                "bytes on the wire differ from the frames sent"
            );
        });
        while !pending.is_empty() {
            match socket.write(pending.bytes()).unwrap() {
                0 => std::thread::sleep(std::time::Duration::from_millis(1)),
                n => pending.consume(n),
            }
        }
        reader.join().unwrap();
    }

    /// A direct write only where it replaces the flush that follows (`last`), and at most one
    /// per sender: a second large frame, or any frame when more answers follow, goes to the cork.
    #[test]
    fn a_sender_writes_directly_at_most_once_and_only_when_last() {
        let (mut socket, mut client) = pair();
        let mut session = open_session();
        let mut codec = codec();
        let (mut cork, mut pending) = (Vec::new(), SendQueue::default());
        let (mut bytes_sent, mut messages_sent);
        let payload = vec![5u8; DIRECT_MIN];
        let mut one = Vec::new();
        write_frame(&mut one, true, OpCode::Binary, &payload);
        let mut out = Outbox::new(
            &mut cork,
            &mut socket,
            &mut pending,
            &mut session,
            &mut codec,
            false,
        );
        assert!(out.message(OpCode::Binary, &payload));
        assert_eq!(out.direct, Direct::Done);
        (bytes_sent, messages_sent) = (out.bytes_written, out.messages);
        assert_eq!(cork.len(), one.len(), "not the last answer, yet not corked");
        assert_eq!(bytes_sent, 0);
        let mut out = Outbox::new(
            &mut cork,
            &mut socket,
            &mut pending,
            &mut session,
            &mut codec,
            true,
        );
        assert!(out.message(OpCode::Binary, &payload));
        assert!(out.message(OpCode::Binary, &payload));
        assert_eq!(out.direct, Direct::Done);
        (bytes_sent, messages_sent) =
            (bytes_sent + out.bytes_written, messages_sent + out.messages);
        assert_eq!(
            bytes_sent as usize,
            2 * one.len(),
            "cork + frame in one write"
        );
        assert_eq!(cork, one, "the second large frame was not corked");
        assert_eq!(messages_sent, 3);
        let mut got = vec![0u8; 2 * one.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, [&one[..], &one[..]].concat());
    }

    #[test]
    fn a_failed_direct_write_reports_the_reason_and_sends_nothing_more() {
        let (mut socket, client) = pair();
        let mut session = open_session();
        let mut codec = codec();
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client); // a reset
        let payload = vec![7u8; DIRECT_MIN];
        let (mut cork, mut pending) = (Vec::new(), SendQueue::default());
        let mut messages_sent = 0u64;
        let (mut result, mut sent) = (None, 0);
        for _ in 0..100 {
            cork.extend_from_slice(b"corked");
            let mut out = Outbox::new(
                &mut cork,
                &mut socket,
                &mut pending,
                &mut session,
                &mut codec,
                true,
            );
            let ok = out.message(OpCode::Binary, &payload);
            messages_sent += out.messages;
            if !ok {
                result = Some(out.direct);
                break;
            }
            sent += 1;
            pending = SendQueue::default();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(result, Some(Direct::Failed(CloseReason::Abnormal)));
        assert!(cork.is_empty());
        assert!(pending.is_empty());
        assert_eq!(messages_sent, sent, "a failed send counted as sent");
    }
}
