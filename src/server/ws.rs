//! After the upgrade: frames through the session, and the application's callbacks, each run
//! under the stall watchdog and (unless configured otherwise) `catch_unwind`, with a
//! [`WebSocket`] view of its connection.

use super::conn::{conn_id, Conn};
use super::core::Core;
use super::topics::Pubsub;
use crate::app::{CloseReason, ConnId, Handler, Message, WebSocket};
use crate::config::Config;
use crate::io::out::{Outbox, CORK_KEEP};
use crate::protocol::deflate::SharedCodec;
use crate::protocol::session::Event;
use crate::watchdog::{Activity, Heartbeat};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Bytes of compression work (inflated plus compressed, see [`SharedCodec::work`]) one
/// connection's input may cost per turn; past it the rest of its input waits for the next turn,
/// as it does after [`READ_BUDGET`] full reads. Compression costs up to a hundred times more
/// CPU per byte than framing, so without it 32 clients sending hard-to-compress messages that
/// are echoed compressed held the loop for 0.8-2 s a turn. At least one message is handled per
/// turn, so a turn's work is bounded by this or one message (`max_message_size`), whichever
/// is larger.
///
/// [`READ_BUDGET`]: super::read::READ_BUDGET
pub(super) const CODEC_BUDGET: u64 = 32 * 1024;

/// Run one handler callback for the open connection `idx` with a [`WebSocket`] view, then apply
/// what it asked for (close, terminate). `last`: the cork is flushed right after the callback
/// (see [`Outbox::new`]). Returns false if the connection is ending.
pub(super) fn callback<H: Handler>(
    core: &mut Core<H::Data>,
    handler: &mut H,
    idx: usize,
    kind: Activity,
    last: bool,
    f: impl FnOnce(&mut H, &mut WebSocket<'_, H::Data>),
) -> bool {
    core.cork_for(idx);
    let conn = &mut core.conns[idx];
    let id = conn_id(core.loop_index, idx, conn.gen);
    let Some(mut ws) = websocket(
        conn,
        &mut core.cork,
        &mut core.pubsub,
        &mut core.codec,
        &core.config,
        id,
        last,
    ) else {
        return false;
    };
    let done = guarded(core.config.catch_panics, &core.beat, kind, id, || {
        f(handler, &mut ws)
    });
    let sent = ws.out.sent();
    let live = core.settle(idx, sent);
    if done.is_none() {
        return handler_panicked(core, handler, idx, kind);
    }
    live && after_callback(core, handler, idx)
}

/// The [`WebSocket`] a callback gets for the open connection `conn` (id `id`), sending into
/// the cork (which the connection must own); `None` if the connection is not open.
fn websocket<'a, D>(
    conn: &'a mut Conn<D>,
    cork: &'a mut Vec<u8>,
    pubsub: &'a mut Pubsub,
    codec: &'a mut SharedCodec,
    config: &Config,
    id: ConnId,
    last: bool,
) -> Option<WebSocket<'a, D>> {
    let data = conn.data.as_mut()?;
    let (subprotocol, own) = match conn.rare.as_deref_mut() {
        Some(r) => (r.subprotocol.as_deref(), r.dedicated.as_deref_mut()),
        None => (None, None),
    };
    Some(WebSocket {
        id,
        peer: conn.peer,
        data,
        send: &mut conn.send,
        out: Outbox::new(
            cork,
            &mut conn.socket,
            &mut conn.pending,
            &mut conn.session,
            codec,
            last,
        )
        .with_own(own.map(|d| &mut d.deflater)),
        subprotocol,
        max_backpressure: config.max_backpressure,
        policy: config.backpressure_policy,
        pubsub,
    })
}

/// An event that a callback answers, with the activity the watchdog reports it as.
enum Call<'a> {
    Message(Message<'a>),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
}

/// Run application code, reporting it to the stall watchdog, and (unless configured
/// otherwise) catching a panic: `None` when it panicked.
pub(super) fn guarded<R>(
    catch: bool,
    beat: &Option<Arc<Heartbeat>>,
    kind: Activity,
    id: ConnId,
    f: impl FnOnce() -> R,
) -> Option<R> {
    if let Some(b) = beat {
        b.running(kind, id.0);
    }
    let r = match catch {
        true => catch_unwind(AssertUnwindSafe(f)).ok(),
        false => Some(f()),
    };
    if let Some(b) = beat {
        b.running(Activity::Loop, 0);
    }
    r
}

/// A callback for open connection `idx` panicked: count it, and close the connection with 1011
/// through the close path; the loop goes on serving everyone else. Returns false.
pub(super) fn handler_panicked<H: Handler>(
    core: &mut Core<H::Data>,
    handler: &mut H,
    idx: usize,
    kind: Activity,
) -> bool {
    core.stats.handler_panics += 1;
    let conn = &mut core.conns[idx];
    log::error!(
        "{} from {}: {} panicked; closing the connection with 1011",
        conn_id(core.loop_index, idx, conn.gen),
        conn.peer,
        kind.label()
    );
    core.cork_for(idx);
    let reason = CloseReason::HandlerPanic;
    let session = &mut core.conns[idx].session;
    session.abort(reason.code(), "internal server error", &mut core.cork);
    core.finish(handler, idx, reason);
    false
}

/// Apply a close or terminate that a callback requested. Returns false if the connection ended
/// or is closing.
pub(super) fn after_callback<H: Handler>(
    core: &mut Core<H::Data>,
    handler: &mut H,
    idx: usize,
) -> bool {
    let conn = &mut core.conns[idx];
    if conn.send.terminate {
        core.end(handler, idx, CloseReason::Terminated);
        return false;
    }
    if let Some(req) = conn.send.close_req.take() {
        let (code, reason) = *req;
        core.start_close(idx, code, &reason);
        if core.conns[idx].send.cause == Some(CloseReason::Backpressure) {
            // The client does not read: waiting for its close reply is pointless.
            core.finish(handler, idx, CloseReason::Backpressure);
            return false;
        }
    }
    true
}

/// Feed frame bytes to an open connection's session and dispatch its events.
/// Returns false if the connection ended or is ending.
pub(super) fn frames<H: Handler>(
    core: &mut Core<H::Data>,
    handler: &mut H,
    idx: usize,
    buf: &mut [u8],
) -> bool {
    core.cork_for(idx);
    let max = core.config.max_message_size;
    let mut off = 0;
    let len = buf.len();
    while off < len {
        let conn = &mut core.conns[idx];
        // The connection's own decompressor (dedicated profile), or the loop's; none (and no
        // lookup) without compression.
        let compressed = conn.session.deflate_bits() != 0;
        let inflater = match compressed {
            false => None,
            true => match conn
                .rare
                .as_deref_mut()
                .and_then(|r| r.dedicated.as_deref_mut())
            {
                Some(own) => Some(&mut own.inflater),
                None => Some(core.codec.inflater()),
            },
        };
        let read = conn.session.read_with(
            &mut buf[off..],
            &mut core.spill,
            max,
            &mut core.cork,
            inflater,
        );
        if compressed {
            if let Some(own) = conn
                .rare
                .as_deref_mut()
                .and_then(|r| r.dedicated.as_deref_mut())
            {
                // Its counts join the loop's (and meter this turn's work).
                core.codec.absorb(&mut own.inflater);
            }
        }
        let (used, event) = match read {
            Ok(r) => r,
            Err(e) => {
                log::debug!(
                    "{} protocol error from {}: {e}",
                    conn_id(core.loop_index, idx, conn.gen),
                    conn.peer
                );
                if core.spill.capacity() != 0 {
                    // A compressed message inflated before the error (invalid UTF-8).
                    core.spill = Vec::new();
                }
                core.finish(handler, idx, CloseReason::Protocol(e.code));
                return false;
            }
        };
        off += used;
        let (kind, call) = match event {
            None => continue,
            Some(Event::Close { code, reason }) => {
                conn.rare().peer_close = Some((code, reason.into()));
                let reason = match (conn.send.sealed, conn.send.cause) {
                    (true, Some(cause)) => cause,
                    (true, None) => CloseReason::ClosedByServer,
                    (false, _) => CloseReason::PeerClosed,
                };
                core.finish(handler, idx, reason);
                return false;
            }
            Some(Event::Text(s)) => (Activity::Message, Call::Message(Message::Text(s))),
            Some(Event::Binary(b)) => (Activity::Message, Call::Message(Message::Binary(b))),
            Some(Event::Ping(p)) => {
                core.pong_due = true;
                (Activity::PingPong, Call::Ping(p))
            }
            Some(Event::Pong(p)) => (Activity::PingPong, Call::Pong(p)),
        };
        if kind == Activity::Message {
            core.stats.messages_received += 1;
        }
        // The last message of this read: its answer is flushed once this returns, so a direct
        // write adds no system call. Answers to earlier ones share the cork's one `send`.
        let last = off == len;
        let id = conn_id(core.loop_index, idx, conn.gen);
        let Some(mut ws) = websocket(
            conn,
            &mut core.cork,
            &mut core.pubsub,
            &mut core.codec,
            &core.config,
            id,
            last,
        ) else {
            return false;
        };
        let done = guarded(
            core.config.catch_panics,
            &core.beat,
            kind,
            id,
            || match call {
                Call::Message(m) => handler.on_message(&mut ws, m),
                Call::Ping(p) => handler.on_ping(&mut ws, p),
                Call::Pong(p) => handler.on_pong(&mut ws, p),
            },
        );
        let sent = ws.out.sent();
        let live = core.settle(idx, sent);
        if core.spill.capacity() != 0 {
            // A message reassembled by the session was handed over for the callback: release it.
            core.spill = Vec::new();
        }
        if done.is_none() {
            return handler_panicked(core, handler, idx, kind);
        }
        if !live || !after_callback(core, handler, idx) {
            return false;
        }
        // The backpressure limit counts the cork, so a burst of messages read in one dispatch
        // must not pile its answers up there: what the socket takes at once is no slow
        // reader's backlog. Offer a cork that reached the limit to the socket now.
        // Likewise what this read publishes is delivered once it grows large; and then the
        // rest of the input waits for the next turn, so that one connection's publications
        // cannot hold the loop (a small input to a large room is a lot of work).
        // Compression work is metered the same way: past `CODEC_BUDGET` this turn, the rest
        // waits (and no more is read: `read_later` stops the reads).
        let large = core.pubsub.fanout.is_large();
        let spent = core.codec.work() - core.codec_mark >= CODEC_BUDGET;
        if large || spent || core.cork.len() >= core.config.max_backpressure.min(CORK_KEEP) {
            match large {
                true => core.deliver_owed(),
                false => core.flush_cork(),
            }
            if core.doomed.iter().any(|d| d.0 == idx) {
                return false; // the write failed; `reap` ends it
            }
            if (large && off < len) || spent {
                core.conns[idx].rare().stash.extend_from_slice(&buf[off..]);
                core.read_next_turn(idx);
                return true;
            }
            core.cork_for(idx);
        }
    }
    true
}
