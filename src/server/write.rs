//! The loop's side of the write path: the cork changes hands between connections, what a sender
//! left for the loop is settled, the cork is flushed at the end of a dispatch, a writable event
//! drains the connection's queue, and an owed pong goes out (see [`crate::io::out`]).

use super::conn::NEVER;
use super::core::Core;
use super::event_loop::Inner;
use super::ws::callback;
use crate::app::{CloseReason, Handler};
use crate::io::out::{Direct, Sent, CORK_KEEP};
use crate::protocol::session::State;
use crate::watchdog::Activity;

impl<H: Handler> Inner<H> {
    /// A writable edge: write what is queued for the connection (under TLS, first what rustls
    /// still holds, even when nothing is queued).
    pub(super) fn writable(&mut self, idx: usize) {
        let core = &mut self.core;
        let conn = &mut core.conns[idx];
        let queued = !conn.pending.is_empty();
        if !queued && !conn.socket.holds() {
            return;
        }
        let written = match queued {
            true => conn.socket.write(conn.pending.bytes()),
            false => conn.socket.flush().map(|()| 0),
        };
        let n = match written {
            Ok(n) => n,
            Err(e) => {
                let reason = conn.linger.unwrap_or(CloseReason::of_io_error(&e));
                core.end(&mut self.handler, idx, reason);
                return;
            }
        };
        core.stats.bytes_sent += n as u64;
        conn.pending.consume(n);
        let resume = conn.read_paused && conn.pending.len() <= core.config.max_backpressure / 2;
        if resume {
            conn.read_paused = false;
        }
        if conn.pending.is_empty() && !conn.socket.holds() {
            conn.stall_at = NEVER;
            if let Some(reason) = conn.linger {
                if !conn.half_close() {
                    core.end(&mut self.handler, idx, reason);
                }
                return;
            }
        } else if n > 0 && !conn.read_paused {
            // Progress moves the stall deadline; not while the queue is over the limit, which
            // must drain to half of it within one write-stall timeout however much each write
            // takes (a slow but steady reader cannot hold a full queue for ever).
            conn.stall_at = core.now + Core::<H::Data>::ms(core.config.write_stall_timeout);
            core.rearm(idx);
        }
        if resume {
            // Input that arrived while paused raised no edge of its own: read it now.
            let gen = core.conns[idx].gen;
            self.readable(idx, true);
            if !self.core.alive(idx, gen) || self.core.doomed.iter().any(|d| d.0 == idx) {
                return;
            }
        }
        let Inner { core, handler, .. } = self;
        let conn = &mut core.conns[idx];
        let drained = queued && conn.pending.is_empty();
        if drained && conn.data.is_some() && conn.session.state() == State::Open {
            // A pong owed while bytes were queued goes out now, before anything `on_drain` sends.
            core.write_owed_pong(idx);
            // The cork is flushed right after: a direct write adds no system call.
            callback(core, handler, idx, Activity::Drain, true, |h, ws| {
                h.on_drain(ws)
            });
        }
    }
}

impl<D> Core<D> {
    /// Make `idx` the owner of the cork buffer, first flushing what another connection left in it.
    pub(super) fn cork_for(&mut self, idx: usize) {
        if self.cork_owner != Some(idx) {
            self.flush_cork();
            self.cork_owner = Some(idx);
            if self.pubsub.fanout.owing() {
                // What it was published earlier in this turn goes out before what it sends.
                self.deliver_into_cork(idx);
            }
        }
    }

    /// After a sender used connection `idx`'s [`Outbox`]: count what it sent, and if it wrote
    /// to the socket directly, on a partial write arm the write-stall deadline, on a failure
    /// doom the connection, as [`Core::flush_cork`] does. Returns false if the connection is
    /// doomed.
    #[inline]
    pub(super) fn settle(&mut self, idx: usize, sent: Sent) -> bool {
        self.stats.bytes_sent += sent.bytes_written;
        self.stats.messages_sent += sent.messages;
        sent.direct == Direct::Done || self.settle_direct(idx, sent.direct)
    }

    #[inline(never)]
    pub(super) fn settle_direct(&mut self, idx: usize, direct: Direct) -> bool {
        match direct {
            Direct::Done => true,
            Direct::Partial => {
                let queued = self.conns[idx].pending.len();
                self.stats.queue_peak = self.stats.queue_peak.max(queued);
                self.conns[idx].stall_at = self.now + Self::ms(self.config.write_stall_timeout);
                self.rearm(idx);
                self.account(idx);
                true
            }
            Direct::Failed(reason) => {
                let conn = &self.conns[idx];
                self.doomed
                    .push((idx, conn.gen, conn.linger.unwrap_or(reason)));
                false
            }
        }
    }

    /// Write the cork to its owner with one `send`; queue what the socket does not take.
    /// A write error dooms the connection (ended by `reap`).
    pub(super) fn flush_cork(&mut self) {
        let Some(idx) = self.cork_owner.take() else {
            return;
        };
        if let Some(conn) = self.conns.get_mut(idx) {
            if self.cork.is_empty() {
                // Nothing to write; a lingering connection may be done all the same.
            } else if !conn.pending.is_empty() {
                conn.pending.push(&self.cork);
                self.stats.queue_peak = self.stats.queue_peak.max(conn.pending.len());
                self.account(idx);
            } else {
                let written = conn.socket.write(&self.cork);
                if let Ok(n) = written {
                    self.stats.bytes_sent += n as u64;
                }
                match written {
                    Ok(n) if n == self.cork.len() => {}
                    Ok(n) => {
                        conn.pending.push_unsent(&[&self.cork], n);
                        self.stats.queue_peak = self.stats.queue_peak.max(conn.pending.len());
                        conn.stall_at = self.now + Self::ms(self.config.write_stall_timeout);
                        self.cork.clear();
                        self.rearm(idx);
                        self.account(idx);
                    }
                    Err(e) => {
                        let reason = conn.linger.unwrap_or(CloseReason::of_io_error(&e));
                        self.doomed.push((idx, conn.gen, reason));
                    }
                }
            }
            if let Some(conn) = self.conns.get_mut(idx) {
                // Under TLS, what rustls still holds must go out first (a writable edge).
                let out = conn.pending.is_empty() && !conn.socket.holds();
                if let (Some(reason), true) = (conn.linger, out) {
                    if !conn.half_close() {
                        self.doomed.push((idx, conn.gen, reason));
                    }
                }
            }
        }
        self.cork.clear();
        if self.cork.capacity() > 16 * CORK_KEEP {
            self.cork.shrink_to(CORK_KEEP);
        }
    }

    /// Write the pong the connection owes for the pings it sent, unless bytes are queued for it:
    /// then the pong waits until `writable` has drained the queue, and later pings only replace
    /// its payload. So a connection holds at most one pong in its queue and owes at most one
    /// more, however many pings it sends without reading.
    #[inline(never)]
    pub(super) fn write_owed_pong(&mut self, idx: usize) {
        if self.conns[idx].session.pong_owed() && self.conns[idx].pending.is_empty() {
            self.cork_for(idx);
            self.conns[idx].session.write_pong(&mut self.cork);
        }
    }
}
