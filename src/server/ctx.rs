//! [`Ctx`]: what a posted closure (or a query) can do on the loop: reach any of its connections
//! by id, send, close, read the counters.

use super::conn::{conn_id, slot_of};
use super::core::Core;
use crate::app::PubsubOps;
use crate::app::{CloseReason, ConnId, Message, SendStatus};
use crate::config::BackpressurePolicy;
use crate::io::out::Outbox;
use crate::metrics::Stats;
use crate::protocol::close::CloseCode;
use crate::protocol::frame::OpCode;
use crate::protocol::session::State;
use crate::topics::TopicError;
use std::io;

/// What a posted closure can do on the loop: reach any connection by id.
pub struct Ctx<'a, D> {
    pub(super) core: &'a mut Core<D>,
}

impl<'a, D> Ctx<'a, D> {
    pub(super) fn locate(&mut self, id: ConnId) -> Option<usize> {
        let (idx, gen) = slot_of(id.0);
        (id.loop_index() == self.core.loop_index && self.core.alive(idx, gen)).then_some(idx)
    }

    /// Send a message to connection `id`. [`SendStatus::Closed`] if it is gone, closing or not
    /// yet open; over the backpressure limit it is refused as in a callback.
    pub fn send(&mut self, id: ConnId, msg: Message<'_>) -> SendStatus {
        // A closure may send more to the same connection: keep its sends in the cork.
        self.send_as(id, msg, false)
    }

    /// [`Ctx::send`]; `last`: the cork is flushed right after (see [`Outbox::new`]).
    pub(super) fn send_as(&mut self, id: ConnId, msg: Message<'_>, last: bool) -> SendStatus {
        let Some(idx) = self.locate(id) else {
            return SendStatus::Closed;
        };
        let core = &mut *self.core;
        if core.conns[idx].send.sealed || core.conns[idx].data.is_none() {
            return SendStatus::Closed;
        }
        core.cork_for(idx);
        let conn = &mut core.conns[idx];
        if conn.pending.len() + core.cork.len() > core.config.max_backpressure {
            if core.config.backpressure_policy == BackpressurePolicy::Close {
                conn.send.cause = Some(CloseReason::Backpressure);
                core.start_close(idx, CloseCode::POLICY_VIOLATION, "backpressure limit");
                core.linger(idx, CloseReason::Backpressure);
            }
            return SendStatus::Dropped;
        }
        if conn.session.state() != State::Open {
            return SendStatus::Closed;
        }
        let op = match msg {
            Message::Text(_) => OpCode::Text,
            Message::Binary(_) => OpCode::Binary,
        };
        let mut out = Outbox::new(
            &mut core.cork,
            &mut conn.socket,
            &mut conn.pending,
            &mut conn.session,
            &mut core.codec,
            last,
        )
        .with_own(
            conn.rare
                .as_deref_mut()
                .and_then(|r| r.dedicated.as_deref_mut())
                .map(|d| &mut d.deflater),
        );
        let ok = out.message(op, msg.as_bytes());
        let sent = out.sent();
        if !ok {
            conn.send.sealed = true;
        }
        match core.settle(idx, sent) {
            true => SendStatus::Queued,
            false => SendStatus::Closed,
        }
    }

    /// Publish `msg` to every subscriber of `topic`, on this loop and (in a
    /// [`Cluster`](crate::Cluster)) on every other: how many subscribers on this loop it is for.
    /// See [`WebSocket::publish`](crate::WebSocket::publish) for when they get it.
    pub fn publish(&mut self, topic: &[u8], msg: Message<'_>) -> Result<usize, TopicError> {
        let op = match msg {
            Message::Text(_) => OpCode::Text,
            Message::Binary(_) => OpCode::Binary,
        };
        self.core.publish(topic, op, msg.as_bytes(), true)
    }

    /// How many subscribers `topic` has on this loop.
    pub fn num_subscribers(&self, topic: &[u8]) -> usize {
        self.core.pubsub.num_subscribers(topic)
    }

    /// Start the close handshake with connection `id`. Returns false if it is gone or closing.
    pub fn close(&mut self, id: ConnId, code: CloseCode, reason: &str) -> bool {
        let Some(idx) = self.locate(id) else {
            return false;
        };
        let core = &mut *self.core;
        if core.conns[idx].send.sealed || core.conns[idx].data.is_none() {
            return false;
        }
        core.start_close(idx, code, reason);
        true
    }

    /// Drop connection `id` without a close handshake (after the current closure returns).
    pub fn terminate(&mut self, id: ConnId) {
        if let Some(idx) = self.locate(id) {
            let gen = self.core.conns[idx].gen;
            self.core.doomed.push((idx, gen, CloseReason::Terminated));
        }
    }

    /// The data of connection `id`, if it is open.
    pub fn data_mut(&mut self, id: ConnId) -> Option<&mut D> {
        let idx = self.locate(id)?;
        self.core.conns[idx].data.as_mut()
    }

    /// Ids of every open connection (handshake complete, not yet ended).
    pub fn open_ids(&self) -> Vec<ConnId> {
        self.core
            .conns
            .iter()
            .filter(|(_, c)| c.data.is_some())
            .map(|(i, c)| conn_id(self.core.loop_index, i, c.gen))
            .collect()
    }

    /// The loop's counters.
    pub fn stats(&self) -> Stats {
        self.core.stats()
    }

    /// The metrics in Prometheus text format, as `GET /metrics` serves them.
    pub fn metrics(&self) -> String {
        self.core.render_metrics()
    }

    /// Descriptors open in the process (counted in `/proc/self/fd`) minus those it had open
    /// when the loop started and those the loop owns (epoll, waker, listeners, connections, the
    /// spare descriptor). Zero when everything is accounted for; positive when something in the
    /// process leaks descriptors. Costs a directory listing of `/proc/self/fd`.
    pub fn audit(&mut self) -> io::Result<i64> {
        self.core.audit()
    }
}
