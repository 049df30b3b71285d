//! Delivering publications: from the turn's arena into a subscriber's cork when it is about to
//! be written to anyway, or at the end of the turn with one `writev` per 64 runs of frames;
//! within each subscriber's backpressure limit and policy (see [`super::topics`]).

use super::core::Core;
use crate::config::BackpressurePolicy;
use crate::protocol::frame::OpCode;
use crate::reason::CloseReason;
use crate::topics::{Cursor, TopicError, MAX_TOPIC_LEN};

/// What subscribers did with what they were owed, for the counters.
#[derive(Default)]
struct Delivered {
    delivered: u64,
    dropped_backpressure: u64,
    dropped_closing: u64,
    dropped_memory: u64,
}

/// Whether a subscriber takes its next publication.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admit {
    Yes,
    /// Over its backpressure limit, under the `Drop` policy: this one is dropped.
    Skip,
    /// The loop sheds to stay within its memory budget, and this subscriber holds more than
    /// its share: this one is dropped, rather than copied and then shed for it.
    SkipMemory,
    /// Over its limit under the `Close` policy: this one is dropped and the subscriber is
    /// being closed with 1008, so the rest are dropped too.
    Close,
    /// Closing already: this one and the rest are dropped.
    Closing,
}

impl<D> Core<D> {
    /// Publish to `topic`'s subscribers on this loop, and (unless it came from another loop,
    /// `forward` false) to the other loops of a cluster; the connection that owns the cork now
    /// (a posted closure's last send, say) gets it there at once. Returns how many subscribers
    /// on this loop it is for; `Err` for a topic longer than the limit.
    pub(super) fn publish(
        &mut self,
        topic: &[u8],
        op: OpCode,
        payload: &[u8],
        forward: bool,
    ) -> Result<usize, TopicError> {
        if topic.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong);
        }
        if forward {
            self.pubsub.originate(topic, op, payload);
        }
        let reached = self
            .pubsub
            .publish_local(topic, op, payload, None, &mut self.codec);
        self.account_fanout();
        if let Some(owner) = self.cork_owner {
            // It is owed this (and nothing earlier: it got that when it took the cork).
            self.deliver_into_cork(owner);
        }
        Ok(reached)
    }

    /// Connection `idx` is about to own the cork: what it is owed goes there first, so that
    /// what it is sent next comes after (the order in which the application made them).
    #[allow(clippy::expect_used)] // admit_next said a frame is next
    pub(super) fn deliver_into_cork(&mut self, idx: usize) {
        let mut at = self.pubsub.fanout.take(idx);
        let mut count = Delivered::default();
        while self.admit_next(idx, &mut at, &mut count) {
            // The one admitted, and those after it that still fit under the limit.
            let fanout = &self.pubsub.fanout;
            let (span, n) = fanout.next_span(&mut at, self.room(idx)).expect("admitted");
            self.cork.extend_from_slice(span);
            count.delivered += n as u64;
        }
        self.count_deliveries(count);
    }

    /// What connection `idx` holds against its backpressure limit: its queue, and the cork if
    /// it owns it.
    fn held(&self, idx: usize) -> usize {
        let corked = match self.cork_owner {
            Some(owner) if owner == idx => self.cork.len(),
            _ => 0,
        };
        self.conns[idx].pending.len() + corked
    }

    /// What a subscriber may hold: its backpressure limit, and while the loop sheds, its
    /// equal part of the memory budget.
    fn limit(&self) -> usize {
        match self.memory.shedding() {
            true => self.config.max_backpressure.min(self.memory.equal_part()),
            false => self.config.max_backpressure,
        }
    }

    /// How many more bytes connection `idx` may be handed within its limit.
    fn room(&self, idx: usize) -> usize {
        self.limit().saturating_sub(self.held(idx))
    }

    /// Move `at` past what connection `idx` does not take (counted); whether a publication it
    /// takes is next.
    fn admit_next(&mut self, idx: usize, at: &mut Cursor, count: &mut Delivered) -> bool {
        while !at.is_end() {
            match self.admit_delivery(idx) {
                Admit::Yes => return true,
                refused => self.refuse(refused, at, count),
            }
        }
        false
    }

    /// Whether connection `idx` takes one more publication now; under the `Close` policy, one
    /// over the limit starts its close.
    fn admit_delivery(&mut self, idx: usize) -> Admit {
        let held = self.held(idx);
        let conn = &mut self.conns[idx];
        if conn.data.is_none() || conn.send.sealed {
            return Admit::Closing;
        }
        if held <= self.config.max_backpressure {
            // While the loop sheds, a subscriber holding its equal part gets no more copies
            // (over the budget itself, none at all: not even one that the socket may take).
            let memory = &self.memory;
            if memory.shedding() && (memory.over() || held > memory.equal_part()) {
                return Admit::SkipMemory;
            }
            return Admit::Yes;
        }
        if self.config.backpressure_policy == BackpressurePolicy::Drop {
            return Admit::Skip;
        }
        // Closed by `reap` (1008, without waiting for an answer it will not read).
        conn.send.sealed = true;
        conn.send.cause = Some(CloseReason::Backpressure);
        self.to_close
            .push((idx, conn.gen, CloseReason::Backpressure));
        Admit::Close
    }

    /// Count a refused publication at `at` (and, for a subscriber that takes nothing more,
    /// everything after it), moving `at` past them.
    fn refuse(&self, admit: Admit, at: &mut Cursor, count: &mut Delivered) {
        let fanout = &self.pubsub.fanout;
        match admit {
            Admit::Yes => {}
            Admit::Skip => {
                fanout.next(at);
                count.dropped_backpressure += 1;
            }
            Admit::SkipMemory => {
                fanout.next(at);
                count.dropped_memory += 1;
            }
            Admit::Close | Admit::Closing => {
                if admit == Admit::Close && fanout.next(at).is_some() {
                    count.dropped_backpressure += 1;
                }
                while let Some((_, n)) = fanout.next_span(at, usize::MAX) {
                    count.dropped_closing += n as u64;
                }
            }
        }
    }

    fn count_deliveries(&mut self, c: Delivered) {
        self.stats.deliveries += c.delivered;
        self.stats.deliveries_dropped[0] += c.dropped_backpressure;
        self.stats.deliveries_dropped[1] += c.dropped_closing;
        self.stats.deliveries_dropped[3] += c.dropped_memory;
    }

    /// The end of a turn (or earlier, when what is owed grew large): every subscriber still
    /// owed something gets it with one `writev` of up to 64 slices straight from the arena (a
    /// run of consecutive publications is one slice), as much as its backpressure limit
    /// admits; what its socket does not take is queued, and what comes after is queued within
    /// the limit. Then the arena is cleared.
    #[allow(clippy::expect_used)] // admit_next said a frame is next
    pub(super) fn deliver_owed(&mut self) {
        self.flush_cork();
        let mut count = Delivered::default();
        for (idx, gen) in self.pubsub.fanout.take_owing() {
            // A batch goes to the socket while what precedes it is within the backpressure
            // limit, and, while the loop sheds, within the subscriber's equal part of the
            // budget (what the socket does not take is queued).
            let limit = self.limit();
            // A slot reused this turn is owed what its new connection is (the old one's list
            // was forgotten when it ended): only the new one's entry takes it.
            if !self.alive(idx, gen) {
                continue;
            }
            let mut at = self.pubsub.fanout.take(idx);
            // Straight to the socket while nothing is queued for it.
            while self.conns[idx].pending.is_empty() && self.admit_next(idx, &mut at, &mut count) {
                let fanout = &self.pubsub.fanout;
                let mut parts: [&[u8]; 64] = [&[]; 64];
                let (mut n, mut total, mut frames) = (0, 0, 0);
                // Each frame admitted as a send would be: while what goes before it is within
                // the limit.
                while n < parts.len() && total <= limit {
                    let Some((span, k)) = fanout.next_span(&mut at, limit - total) else {
                        break;
                    };
                    parts[n] = span;
                    total += span.len();
                    frames += k as u64;
                    n += 1;
                }
                let parts = &parts[..n];
                let conn = &mut self.conns[idx];
                match conn.socket.write_vectored::<64>(parts) {
                    Ok(written) => {
                        self.stats.bytes_sent += written as u64;
                        count.delivered += frames;
                        if written < total {
                            conn.pending.push_unsent(parts, written);
                            let queued = conn.pending.len();
                            self.stats.queue_peak = self.stats.queue_peak.max(queued);
                            conn.stall_at = self.now + Self::ms(self.config.write_stall_timeout);
                            self.rearm(idx);
                        }
                    }
                    Err(e) => {
                        let reason = conn.linger.unwrap_or(CloseReason::of_io_error(&e));
                        self.doomed.push((idx, gen, reason));
                        // Its connection is ending: the rest is dropped.
                        self.refuse(Admit::Closing, &mut at, &mut count);
                    }
                }
            }
            // Behind queued bytes: into the queue, within the limit.
            while self.admit_next(idx, &mut at, &mut count) {
                let fanout = &self.pubsub.fanout;
                let (span, n) = fanout.next_span(&mut at, self.room(idx)).expect("admitted");
                let conn = &mut self.conns[idx];
                conn.pending.push(span);
                self.stats.queue_peak = self.stats.queue_peak.max(conn.pending.len());
                count.delivered += n as u64;
            }
            self.account(idx);
        }
        self.count_deliveries(count);
        self.pubsub.fanout.clear();
    }

    /// Publications of this turn delivered, and forwarded to the other loops of a cluster and
    /// to the Redis bridge.
    #[inline]
    pub(super) fn settle_publications(&mut self) {
        // Nothing owed means an empty arena: whatever was published was owed to someone, and
        // only `deliver_owed` takes the list of who is owed. An arena kept from a busy turn is
        // given back on the first turn that publishes nothing.
        let fanout = &self.pubsub.fanout;
        if fanout.owing() || !self.pubsub.outgoing.is_empty() || self.fanout_bytes != 0 {
            self.settle_publications_now();
        }
    }

    #[inline(never)]
    fn settle_publications_now(&mut self) {
        match self.pubsub.fanout.owing() {
            true => self.deliver_owed(),
            false => self.pubsub.fanout.release(),
        }
        self.account_fanout();
        if !self.pubsub.outgoing.is_empty() {
            let batch = std::mem::take(&mut self.pubsub.outgoing);
            if self.ledger.loops() > 1 {
                let (dropped, woken) = self.ledger.forward(self.loop_index, &batch);
                self.stats.deliveries_dropped[2] += dropped;
                self.stats.forward_wakeups += woken;
            }
            // To the other instances: one lock of the bridge's bounded queue.
            if let Some(link) = self.ledger.link() {
                link.send(&batch);
            }
        }
    }
}
