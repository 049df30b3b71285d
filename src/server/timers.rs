//! Deadlines: each connection has one timer-wheel entry, armed at the earliest of its state
//! deadline (handshake, idle ping, idle close, close handshake, linger), its write-stall
//! deadline and its maximum lifetime. Moving a deadline later only records it (O(1), no
//! unlinking); when the entry fires early it is re-filed at the new earliest deadline. The idle
//! deadline, which every message moves, is not even recorded in the wheel: the message stores it
//! in the connection, and the entry filed at the old deadline fires early and is re-filed.

use super::conn::{conn_id, TimerRef, NEVER};
use super::core::{Core, SWEEP_MS};
use super::event_loop::Inner;
use crate::app::{CloseReason, Handler};
use crate::protocol::close::CloseCode;
use crate::protocol::handshake;
use crate::protocol::session::State;

impl<H: Handler> Inner<H> {
    pub(super) fn fire_timers(&mut self) {
        let Inner { core, handler, .. } = self;
        if let Some(at) = core.shutdown_at {
            if core.now >= at {
                let all: Vec<usize> = core.conns.iter().map(|(i, _)| i).collect();
                for idx in all {
                    core.end(handler, idx, CloseReason::Shutdown);
                }
            }
        }
        if core.now >= core.next_sweep {
            core.ledger.admission().sweep(core.now);
            core.next_sweep = core.now + SWEEP_MS;
        }
        while let Some((_, timer)) = core.wheel.poll(core.now) {
            let TimerRef::Conn { idx, gen } = timer else {
                core.accept_timer_fired();
                continue;
            };
            let idx = idx as usize;
            if !core.alive(idx, gen) {
                continue;
            }
            core.conns[idx].timer = None;
            core.timer_fired(handler, idx);
            core.flush_cork();
            core.reap(handler);
            if core.alive(idx, gen) {
                // A deadline may have freed its buffers (a refused handshake's head).
                core.account(idx);
                core.rearm(idx);
            }
        }
    }
}

impl<D> Core<D> {
    /// Point the connection's timer at the earliest of its deadlines.
    pub(super) fn rearm(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        let at = conn.next_deadline();
        match conn.timer {
            Some(k) if at == NEVER => {
                self.wheel.cancel(k);
                conn.timer = None;
            }
            Some(k) => {
                self.wheel.extend(k, at);
            }
            None if at == NEVER => {}
            None => {
                conn.timer = Some(self.wheel.insert(
                    at,
                    TimerRef::Conn {
                        idx: idx as u32,
                        gen: conn.gen,
                    },
                ));
            }
        }
    }

    /// The connection's timer fired: act on every deadline that has passed.
    pub(super) fn timer_fired<H: Handler<Data = D>>(&mut self, handler: &mut H, idx: usize) {
        let now = self.now;
        let conn = &mut self.conns[idx];
        if conn.stall_at <= now {
            // Over the limit (reading paused) it had to drain to half of it; otherwise it had
            // to make progress at all. A connection already closing for a reason (a
            // backpressure close that waits for its queue to drain) ends for that reason.
            let reason = match conn.read_paused {
                true => CloseReason::Backpressure,
                false => CloseReason::WriteStall,
            };
            let reason = conn.linger.unwrap_or(reason);
            log::debug!(
                "{} dropped: {}",
                conn_id(self.loop_index, idx, conn.gen),
                reason.label()
            );
            conn.socket.abandon();
            self.end(handler, idx, reason);
            return;
        }
        if conn.expire_at <= now {
            conn.expire_at = NEVER;
            if conn.session.state() == State::Open && conn.linger.is_none() {
                conn.send.cause = Some(CloseReason::MaxLifetime);
                self.start_close(idx, CloseCode::GOING_AWAY, "maximum lifetime reached");
            }
        }
        let conn = &mut self.conns[idx];
        if conn.deadline > now {
            return;
        }
        if let Some(reason) = conn.linger {
            // Its final bytes were not all taken in time, or it did not end its side.
            conn.socket.abandon();
            self.end(handler, idx, reason);
            return;
        }
        match conn.session.state() {
            State::Handshake if conn.socket.handshaking() => {
                // The TLS handshake did not complete in time: there is no way to say 408 to a
                // client that has no keys yet, so the connection is just closed.
                conn.socket.abandon();
                self.end(handler, idx, CloseReason::HandshakeTimeout);
            }
            State::Handshake => {
                self.cork_for(idx);
                handshake::write_response(
                    &mut self.cork,
                    408,
                    "handshake timeout",
                    &[],
                    b"handshake timeout\n",
                );
                self.conns[idx].session.finish_rejected();
                self.stats.rejected_status[crate::metrics::status_index(408)] += 1;
                self.finish(handler, idx, CloseReason::HandshakeTimeout);
            }
            State::Open if !conn.pinged => {
                conn.pinged = true;
                let rest = Self::ms(self.config.idle_timeout) - self.ping_after;
                conn.deadline = now + rest.max(1);
                self.cork_for(idx);
                self.conns[idx].session.ping(b"", &mut self.cork);
            }
            State::Open => {
                self.start_close(idx, CloseCode::GOING_AWAY, "idle timeout");
                self.finish(handler, idx, CloseReason::IdleTimeout);
            }
            State::CloseSent => {
                let reason = match (self.shutdown_at, conn.send.cause) {
                    (Some(_), _) => CloseReason::Shutdown,
                    (None, Some(cause)) => cause,
                    (None, None) => CloseReason::CloseTimeout,
                };
                conn.socket.abandon();
                self.end(handler, idx, reason);
            }
            State::Closed => self.end(handler, idx, CloseReason::Abnormal),
        }
    }
}
