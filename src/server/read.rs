//! The read path: one receive buffer per loop; a read that fills less than the buffer has drained
//! the socket (edge-triggered: new data raises a new edge), so a message costs one `recv`. A
//! connection with more than `max_backpressure` queued is not read; one that sends faster than
//! the loop parses yields after [`READ_BUDGET`] full reads (or [`CODEC_BUDGET`] bytes of
//! compression work) and is read again next turn.
//!
//! [`CODEC_BUDGET`]: super::ws::CODEC_BUDGET

use super::conn::NEVER;
use super::event_loop::Inner;
use super::ws::frames;
use crate::app::{CloseReason, Handler};
use crate::protocol::session::State;
use std::io::ErrorKind;

/// Reads that fill the receive buffer one connection may do per turn; then the loop serves the
/// others and reads the rest on its next turn, so a peer that sends faster than the loop
/// parses cannot hold the loop.
pub(super) const READ_BUDGET: usize = 4;

/// The time a turn may spend in TLS handshakes (reading, and answering, connections whose
/// handshake is in progress); once it is spent, the other handshaking connections with input
/// wait for the next turn (reread first, in order), so that a burst of ClientHellos, which a
/// client can replay at no cost of its own while each costs the server a signature (about
/// 0.3 ms with P-256, 5 ms with RSA-4096), cannot hold the loop: established connections are
/// served between. 5 ms.
pub(super) const TLS_TURN_BUDGET_NS: u64 = 5_000_000;

impl<H: Handler> Inner<H> {
    /// Read until the socket is drained (or [`READ_BUDGET`] reads filled the buffer: then the
    /// rest is read next turn), feeding the session; then write the pong owed for the pings
    /// read, if nothing is queued ([`Core::write_owed_pong`]).
    /// The connection's turn begins here: its compression work is metered from now (see
    /// [`CODEC_BUDGET`](super::ws::CODEC_BUDGET)).
    #[inline(always)]
    pub(super) fn readable(&mut self, idx: usize, closed: bool) {
        self.core.codec_mark = self.core.codec.work();
        self.read_and_answer(idx, closed);
    }

    /// [`Inner::readable`] without starting the meter (a yielded connection's stash was parsed
    /// first, on the same meter).
    #[inline(always)]
    fn read_and_answer(&mut self, idx: usize, closed: bool) {
        let live = self.read_some(idx, closed);
        if std::mem::take(&mut self.core.pong_due) && live {
            self.core.write_owed_pong(idx);
        }
    }

    /// The reads of [`Inner::readable`]. Returns false if the connection ended or is ending.
    #[inline(always)]
    pub(super) fn read_some(&mut self, idx: usize, closed: bool) -> bool {
        let limit = self.core.config.max_backpressure;
        for _ in 0..READ_BUDGET {
            let conn = &mut self.core.conns[idx];
            let queued = !conn.pending.is_empty() || self.core.cork.len() > limit;
            if conn.read_paused || conn.read_later || (queued && self.over_limit(idx)) {
                return true;
            }
            let conn = &mut self.core.conns[idx];
            let handshake = conn.socket.handshaking().then(std::time::Instant::now);
            if handshake.is_some() && self.core.tls_spent_ns >= TLS_TURN_BUDGET_NS {
                self.core.read_next_turn(idx);
                return true;
            }
            let read = conn.socket.read(&mut self.recv, closed);
            if let Some(t) = handshake {
                self.core.tls_spent_ns += t.elapsed().as_nanos() as u64;
            }
            let conn = &mut self.core.conns[idx];
            if let Some(kind) = conn.socket.take_established() {
                self.core.tls_established(idx, kind);
            }
            let conn = &mut self.core.conns[idx];
            let n = match read {
                Ok(0) => {
                    // The peer finished sending; it may still be reading, so what we owe it
                    // (echoes of its last messages, say) is flushed before the close; when
                    // nothing is owed, `finish` ends it at once.
                    let reason = conn.linger.unwrap_or(CloseReason::Abnormal);
                    conn.peer_eof = true;
                    self.core.finish(&mut self.handler, idx, reason);
                    return false;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if conn.socket.take_more() {
                        self.core.read_next_turn(idx);
                    }
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    let reason = conn.linger.unwrap_or(CloseReason::of_io_error(&e));
                    self.core.end(&mut self.handler, idx, reason);
                    return false;
                }
            };
            self.core.stats.bytes_received += n as u64;
            if !self.received(idx, n) {
                return false;
            }
            if n < self.recv.len() && !closed {
                // Short: drained, unless TLS stopped at its read bound with more there.
                if self.core.conns[idx].socket.take_more() {
                    self.core.read_next_turn(idx);
                }
                return true;
            }
        }
        // The peer sends faster than the loop reads: let the other connections have their turn
        // and read the rest next turn (no new edge will come for bytes already there).
        self.core.read_next_turn(idx);
        true
    }

    /// Parse the input a yield left unparsed (see [`Rare::stash`](super::conn::Rare)), before
    /// anything more is read: `Some(true)` to read on, `Some(false)` if it yielded again (the
    /// rest is stashed), `None` if the connection ended or is ending.
    #[inline(never)]
    fn stashed(&mut self, idx: usize) -> Option<bool> {
        let core = &mut self.core;
        let mut stash = std::mem::take(&mut core.conns[idx].rare().stash);
        let conn = &core.conns[idx];
        if conn.linger.is_some() || conn.session.state() == State::Closed {
            return Some(true); // ending: the input is discarded
        }
        if !frames(core, &mut self.handler, idx, &mut stash) {
            return None;
        }
        Some(!core.conns[idx].read_later)
    }

    /// Read the connections whose read budget ran out last turn.
    pub(super) fn reread(&mut self) {
        for (idx, gen) in std::mem::take(&mut self.core.reread) {
            if self.core.alive(idx, gen) {
                self.core.conns[idx].read_later = false;
                self.core.codec_mark = self.core.codec.work();
                // What a yield left unparsed goes first (only a yield leaves any, and a
                // connection that yielded is read nowhere but here).
                let stashed = self.core.conns[idx].rare.as_ref();
                if stashed.is_some_and(|r| !r.stash.is_empty()) && self.stashed(idx) != Some(true) {
                    self.core.flush_cork();
                    if self.core.alive(idx, gen) {
                        self.core.account(idx);
                    }
                    self.core.reap(&mut self.handler);
                    continue;
                }
                self.read_and_answer(idx, true);
                self.core.flush_cork();
                if self.core.alive(idx, gen) {
                    self.core.account(idx);
                }
                self.core.reap(&mut self.handler);
            }
        }
    }

    /// Before a read, when bytes are queued: if more than `max_backpressure` are queued for the
    /// connection once the cork has been offered to the socket, stop reading it (its answers
    /// would only queue more) until `writable` has drained the queue to half the limit.
    /// Returns true when reading must stop (paused, or the write failed).
    #[inline(never)]
    pub(super) fn over_limit(&mut self, idx: usize) -> bool {
        let core = &mut self.core;
        let limit = core.config.max_backpressure;
        let corked = match core.cork_owner {
            Some(owner) if owner == idx => core.cork.len(),
            _ => 0,
        };
        let conn = &core.conns[idx];
        if conn.pending.len() + corked + conn.socket.tls_held() <= limit {
            return false;
        }
        core.flush_cork();
        if core.doomed.iter().any(|d| d.0 == idx) {
            return true; // the write failed; `reap` ends it
        }
        let conn = &mut core.conns[idx];
        // Paused only with bytes queued: the socket is full, so a writable edge will come.
        conn.read_paused = conn.pending.len() > limit;
        conn.read_paused
    }

    /// Handle `n` fresh bytes in the receive buffer. Returns false if the connection ended or
    /// is ending (further input is not wanted).
    #[inline(always)]
    pub(super) fn received(&mut self, idx: usize, n: usize) -> bool {
        let Inner {
            core,
            handler,
            recv,
            ..
        } = self;
        let conn = &mut core.conns[idx];
        if conn.linger.is_some() {
            return true; // ending: discard input, watch for EOF
        }
        match conn.session.state() {
            State::Handshake if conn.awaiting_proxy => self.proxy_header(idx, n),
            State::Handshake => self.handshake(idx, n),
            State::Open | State::CloseSent => {
                if conn.session.state() == State::Open {
                    conn.pinged = false;
                    if core.ping_after != NEVER {
                        // Only moves the deadline later (it was set from an earlier `now`, or
                        // half an idle timeout after the ping): the timer, filed at the old
                        // deadline, fires early and `timer_fired` re-files it, so a message
                        // costs one store here and no wheel work.
                        let at = core.now + core.ping_after;
                        let old = std::mem::replace(&mut conn.deadline, at);
                        if at < old {
                            core.rearm(idx);
                        }
                    }
                }
                frames(core, handler, idx, &mut recv[..n])
            }
            State::Closed => true,
        }
    }
}
