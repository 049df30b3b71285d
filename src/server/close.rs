//! THE close path: [`Core::end`] is the only code that frees a connection's slab slot. Its ways
//! in: [`Core::finish`] (graceful: flush what is owed, then end, lingering after a failure),
//! [`Core::linger`] and [`Core::start_close`] (which arm the close deadline), [`Core::reap`] (the
//! connections doomed during a dispatch) and [`Core::begin_shutdown`].

use super::conn::conn_id;
use super::core::Core;
use super::ws::guarded;
use crate::app::{CloseReason, Handler};
use crate::protocol::close::{truncate_reason, CloseCode};
use crate::protocol::session::State;
use crate::watchdog::Activity;

impl<D> Core<D> {
    /// End the doomed connections, close those marked to close (`to_close`), and shed while
    /// the loop is over its memory mark.
    #[inline]
    pub(super) fn reap<H: Handler<Data = D>>(&mut self, handler: &mut H) {
        if !self.doomed.is_empty() || !self.to_close.is_empty() || self.memory.shedding() {
            self.reap_now(handler);
        }
    }

    #[inline(never)]
    fn reap_now<H: Handler<Data = D>>(&mut self, handler: &mut H) {
        if self.memory.shedding() {
            self.shed_biggest();
        }
        while let Some((idx, gen, reason)) = self.to_close.pop() {
            if !self.alive(idx, gen) {
                continue;
            }
            match reason {
                // Shedding takes connections that are ending too.
                CloseReason::Memory => self.shed(handler, idx),
                _ if self.conns[idx].linger.is_some() => {}
                _ => {
                    // A subscriber over its limit under the `Close` policy: close 1008, as a
                    // send over it does, without waiting for an answer it will not read.
                    self.start_close(idx, CloseCode::POLICY_VIOLATION, "backpressure limit");
                    self.finish(handler, idx, reason);
                }
            }
        }
        while let Some((idx, gen, reason)) = self.doomed.pop() {
            if self.alive(idx, gen) {
                self.end(handler, idx, reason);
            }
        }
    }

    /// End gracefully: flush what is queued, then close; if the socket cannot take it all now,
    /// linger until it drains or the close timeout passes. After a failure, drain the peer's
    /// input until its EOF or the close timeout before closing ([`Conn::half_close`]).
    pub(super) fn finish<H: Handler<Data = D>>(
        &mut self,
        handler: &mut H,
        idx: usize,
        reason: CloseReason,
    ) {
        self.cork_for(idx);
        self.linger(idx, reason);
        self.flush_cork();
        self.reap(handler);
    }

    /// Mark the connection as ending with `reason` once its queued bytes are written (the cork
    /// flush dooms it when nothing is left), or when the close timeout passes.
    pub(super) fn linger(&mut self, idx: usize, reason: CloseReason) {
        let conn = &mut self.conns[idx];
        conn.linger = Some(reason);
        conn.send.sealed = true;
        conn.deadline = self.now + Self::ms(self.config.close_timeout);
        self.rearm(idx);
        // What ends this way often dropped its buffers first (a rejected head, an aborted
        // session).
        self.account(idx);
    }

    /// Start the close handshake on an open connection: send the close frame, seal sends and
    /// arm the close timeout.
    pub(super) fn start_close(&mut self, idx: usize, code: CloseCode, reason: &str) {
        self.cork_for(idx);
        let conn = &mut self.conns[idx];
        conn.send.sealed = true;
        if conn.session.close(code, reason, &mut self.cork) {
            // As on the wire: an unsendable code goes out as a close without status.
            conn.rare().our_close = Some(match code.is_sendable() {
                true => (code, truncate_reason(reason).into()),
                false => (CloseCode::NO_STATUS, "".into()),
            });
            conn.deadline = self.now + Self::ms(self.config.close_timeout);
            self.rearm(idx);
        }
    }

    pub(super) fn begin_shutdown<H: Handler<Data = D>>(&mut self, handler: &mut H) {
        if self.shutdown_at.is_some() {
            return;
        }
        // Stops the audit thread (woken at once; a listing in progress finishes first).
        self.auditor = None;
        let mut closing = Vec::new();
        for l in self.listeners.iter_mut() {
            if let Some(mut l) = l.take() {
                let _ = self.registry.deregister(&mut l);
                closing.push(l);
            }
        }
        self.fds_changed();
        drop(closing);
        if let Some(k) = self.accept_timer.take() {
            self.wheel.cancel(k);
        }
        self.accept_due = false;
        self.shutdown_at = Some(self.now + Self::ms(self.config.shutdown_timeout));
        log::info!("shutting down: closing {} connections", self.conns.len());
        let all: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for idx in all {
            let conn = &mut self.conns[idx];
            if conn.linger.is_some() {
                continue;
            }
            match conn.session.state() {
                State::Open => {
                    conn.send.cause = Some(CloseReason::Shutdown);
                    self.start_close(idx, CloseCode::GOING_AWAY, "server shutdown");
                    self.flush_cork();
                }
                State::CloseSent => {}
                _ => self.end(handler, idx, CloseReason::Shutdown),
            }
        }
        self.reap(handler);
    }

    /// The one close path. Every way a connection ends comes here, exactly once: deregister it,
    /// cancel its timer, free its slab slot, close its fd, count the reason, release its
    /// admission slot, and call `on_close` if it was opened.
    pub(super) fn end<H: Handler<Data = D>>(
        &mut self,
        handler: &mut H,
        idx: usize,
        reason: CloseReason,
    ) {
        // Every descriptor opened so far was counted in the ledger when it was opened.
        debug_assert_eq!(
            self.ledger.owned_by(self.loop_index),
            self.owned_fds(),
            "descriptor count in the ledger drifted"
        );
        let Some(mut conn) = self.conns.try_remove(idx) else {
            return;
        };
        self.release(conn.mem);
        let _ = self.registry.deregister(&mut conn.socket);
        if let Some(k) = conn.timer.take() {
            self.wheel.cancel(k);
        }
        if self.cork_owner == Some(idx) {
            self.cork.clear();
            self.cork_owner = None;
        }
        // Uncounted first, closed then: an audit in between forgives it.
        let moving = super::accept::Moving::new(&self.ledger);
        self.fds_changed();
        self.tally.left(&self.ledger, &conn);
        if conn.socket.handshaking() && !conn.via_proxy {
            self.count_handshake(conn.peer.ip(), false);
        }
        self.tls_ended(&mut conn.socket, reason);
        drop(conn.socket);
        drop(moving);
        let id = conn_id(self.loop_index, idx, conn.gen);
        self.pubsub.forget(id, idx, conn.send.subscribed);
        if conn.session.deflate_bits() != 0 {
            // Its compression profile, and its own state's bytes back to the budgets.
            match conn.rare.as_mut().and_then(|r| r.dedicated.take()) {
                Some(state) => {
                    self.stats.compression_connections[1] -= 1;
                    self.ledger.release_compression(state.bytes);
                    self.codec.forget_dedicated(state.bytes);
                }
                None => self.stats.compression_connections[0] -= 1,
            }
        }
        self.stats.closed[reason.index()] += 1;
        // A descriptor was freed: accepting may go on.
        self.resume_accept();
        self.check_consistency();
        log::debug!(
            "{id} from {} closed: {} after {} ms",
            conn.peer,
            reason.label(),
            (self.now as u32).wrapping_sub(conn.born)
        );
        if let Some(data) = conn.data.take() {
            // The peer's close when it started the handshake; ours when we did and it answered;
            // otherwise the reason's own code.
            let (ours, peers) = match conn.rare.as_deref() {
                Some(r) => (r.our_close.as_ref(), r.peer_close.as_ref()),
                None => (None, None),
            };
            let (code, text) = match (reason, ours, peers) {
                (CloseReason::PeerClosed, _, Some((code, text))) => (*code, &**text),
                (_, Some((code, text)), Some(_)) => (*code, &**text),
                _ => (reason.code(), reason.label()),
            };
            let done = guarded(
                self.config.catch_panics,
                &self.beat,
                Activity::Close,
                id,
                || handler.on_close(id, data, code, text),
            );
            if done.is_none() {
                self.stats.handler_panics += 1;
                log::error!("{id} from {}: on_close panicked", conn.peer);
            }
        }
    }

    /// A TLS handshake completed (read path): no longer in progress, counted `ok` and by its
    /// version and cipher suite.
    pub(super) fn tls_established(&mut self, idx: usize, kind: crate::io::tls_session::TlsKind) {
        let conn = &self.conns[idx];
        if !conn.via_proxy {
            self.count_handshake(conn.peer.ip(), false);
        }
        self.stats.tls_handshaking -= 1;
        self.stats.tls_handshakes_ok += 1;
        self.stats.tls_connections[kind.version] += 1;
        self.stats.tls_ciphers[kind.cipher] += 1;
    }

    /// On the close path, a TLS connection ends: its state leaves the memory budget; a
    /// handshake in progress failed with `reason`;
    /// an established connection leaves its version's and cipher's counts, and the peer is sent
    /// `close_notify` if it was not already (one try, unless the connection is being reset).
    fn tls_ended(&mut self, socket: &mut crate::io::transport::Transport, reason: CloseReason) {
        if socket.is_tls() {
            let state = crate::memory::TLS_CONNECTION_BYTES;
            self.memory.resize(crate::memory::Kind::Tls, state, 0);
        }
        if socket.handshaking() {
            self.stats.tls_handshaking -= 1;
            self.stats.tls_handshakes_failed[reason.index()] += 1;
        } else if let Some(kind) = socket.tls_kind() {
            self.stats.tls_connections[kind.version] -= 1;
            self.stats.tls_ciphers[kind.cipher] -= 1;
            socket.close_notify();
        }
    }

    /// Tell the handler of every subscriber count that changed since it was last told
    /// (`Handler::on_subscription`); called at the end of each turn, when no other callback
    /// runs.
    #[inline]
    pub(super) fn report_subscriptions<H: Handler<Data = D>>(&mut self, handler: &mut H) {
        if !self.pubsub.changes.is_empty() {
            self.report_subscriptions_now(handler);
        }
    }

    #[inline(never)]
    fn report_subscriptions_now<H: Handler<Data = D>>(&mut self, handler: &mut H) {
        // The Redis bridge follows local interest (a topic's first subscriber on any loop, its
        // last one leaving) without a callback into the application.
        if let Some(link) = self.ledger.link() {
            let changes = self.pubsub.changes.iter();
            link.interest(changes.map(|(t, c)| (&**t, c.old, c.new)));
        }
        for (topic, c) in std::mem::take(&mut self.pubsub.changes) {
            let id = crate::app::ConnId(0);
            let done = guarded(
                self.config.catch_panics,
                &self.beat,
                Activity::Subscription,
                id,
                || handler.on_subscription(&topic, c.old, c.new),
            );
            if done.is_none() {
                self.stats.handler_panics += 1;
                log::error!("on_subscription panicked");
            }
        }
    }

    /// Debug builds: the slab, the wheel and the admission counters agree after every close.
    pub(super) fn check_consistency(&self) {
        if cfg!(debug_assertions) {
            let timed = self.conns.iter().filter(|(_, c)| c.timer.is_some()).count();
            assert_eq!(
                self.wheel.len(),
                timed + self.accept_timer.is_some() as usize,
                "timer wheel entries without an owner"
            );
            if self.ledger.loops() == 1 {
                assert_eq!(
                    self.ledger.admission().total(),
                    self.tally.ip_counted(),
                    "per-address counts drifted"
                );
            }
            let shed = self.conns.iter().filter(|(_, c)| c.shed).count();
            assert_eq!(
                shed,
                self.tally.shedding(),
                "refused-connection count drifted"
            );
            self.check_memory();
            self.pubsub.check(|id| {
                let (idx, gen) = super::conn::slot_of(id);
                self.alive(idx, gen)
            });
        }
    }
}
