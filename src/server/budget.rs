//! The memory budget on the loop: every connection's buffers (its session's request head or
//! partial message, its send queue) and the turn's publications are counted in the loop's
//! [`MemoryBudget`] where they change (after a read or a write on the connection, a flush of the
//! cork to it, a delivery to it, its end). When the loop starts shedding, its biggest holders are
//! closed (1013, or 503 before the upgrade; reset, if it does not read what it is sent) until the
//! others hold no more than where shedding stops; while it sheds, a connection that grows past its share is closed too, and new
//! connections are refused (`accept.rs`).
//!
//! [`MemoryBudget`]: crate::memory::MemoryBudget

use super::accept::refusal;
use super::conn::{conn_id, Conn};
use super::core::{Core, LOG_MEMORY};
use crate::admission::Verdict;
use crate::app::{CloseReason, Handler};
use crate::memory::Kind;
use crate::protocol::close::CloseCode;
use std::cmp::Reverse;

/// What a connection's buffers hold now: its session's (request head, partial message) with its
/// unparsed input (and, under TLS, the record or handshake message rustls is receiving), and its
/// send queue's heap bytes (with what rustls holds of its output), each counted up to 4 GiB (a buffer that large is counted as 4 GiB:
/// the budget's sum stays exact for what it counts, and such a connection is far past any
/// share long before).
#[inline]
fn held<D>(c: &Conn<D>) -> [u32; 2] {
    let clamp = |b: usize| u32::try_from(b).unwrap_or(u32::MAX);
    let rare = c
        .rare
        .as_ref()
        .map_or(0, |r| r.stash.capacity() + r.proxy_partial.capacity());
    [
        clamp(c.session.buffered_capacity() + rare + c.socket.tls_pending()),
        clamp(c.pending.heap_bytes() + c.socket.tls_held()),
    ]
}

impl<D> Core<D> {
    /// Bring connection `idx`'s counted buffers up to date (see the module docs).
    #[inline]
    pub(super) fn account(&mut self, idx: usize) {
        let c = &self.conns[idx];
        // Most connections hold nothing, and held nothing: no arithmetic for them.
        if c.mem == [0, 0]
            && !c.session.holds()
            && c.pending.is_empty()
            && c.rare.is_none()
            && !c.socket.tls_holds()
        {
            return;
        }
        let now = held(c);
        if now != c.mem {
            self.account_changed(idx, now);
        }
    }

    #[inline(never)]
    fn account_changed(&mut self, idx: usize, now: [u32; 2]) {
        let conn = &mut self.conns[idx];
        let old = std::mem::replace(&mut conn.mem, now).map(|b| b as usize);
        let now = now.map(|b| b as usize);
        let (was, is) = (old[0] + old[1], now[0] + now[1]);
        self.memory.holder(was, is);
        self.memory.resize(Kind::Partial, old[0], now[0]);
        if !self.memory.resize(Kind::Queue, old[1], now[1]) {
            self.trim_if_ended();
            return;
        }
        // Shedding: a connection that grows past its share is closed (one ending already too:
        // its flush may not take what it holds past the budget), unless it is an operator's.
        if is > was && is > self.memory.share() && !conn.admin {
            self.to_close.push((idx, conn.gen, CloseReason::Memory));
        }
    }

    /// A connection ended: what it held is no longer counted.
    pub(super) fn release(&mut self, mem: [u32; 2]) {
        self.memory.holder(mem[0] as usize + mem[1] as usize, 0);
        self.memory.resize(Kind::Partial, mem[0] as usize, 0);
        self.memory.resize(Kind::Queue, mem[1] as usize, 0);
        self.trim_if_ended();
    }

    /// Shedding has just stopped, or what connections held has drained after reaching a
    /// quarter of the budget: what the allocator holds free since the attack goes back to the
    /// system, so that the process's RSS comes back down too.
    fn trim_if_ended(&mut self) {
        if self.memory.take_ended() {
            crate::sys::trim_heap();
        }
    }

    /// Count the loop's compression state, once a turn: its compressors and decompressor are
    /// made when first needed, its buffer grows with the largest message compressed and shrinks
    /// back (between two counts it may hold up to one message more than counted).
    #[inline]
    pub(super) fn account_codec(&mut self) {
        let now = self.codec.heap_bytes();
        if now != self.codec_bytes {
            let old = std::mem::replace(&mut self.codec_bytes, now);
            self.memory.resize(Kind::Compression, old, now);
            self.trim_if_ended();
        }
    }

    /// Count the turn's publications (after publishing, and after delivering them).
    pub(super) fn account_fanout(&mut self) {
        let now = self.pubsub.fanout.heap_bytes();
        if now != self.fanout_bytes {
            let old = std::mem::replace(&mut self.fanout_bytes, now);
            self.memory.resize(Kind::Publications, old, now);
        }
    }

    /// Shedding: the biggest holders are closed until what the others hold is back at the point
    /// where shedding stops (connections ending already are on their way out with what they
    /// hold), so that a few connections parking what they send cannot keep the loop refusing
    /// newcomers. A scan of the connections, at most once a millisecond while shedding.
    pub(super) fn shed_biggest(&mut self) {
        if self.now == self.last_shed_scan {
            return;
        }
        self.last_shed_scan = self.now;
        let mut used = self.memory.used();
        let target = self.memory.low_mark();
        if used <= target {
            return;
        }
        // Who goes first: connections ending already (told to go, and what their flush holds
        // is the easiest to give up), then what strangers park (partial messages, request
        // heads), then queues of our own output, each biggest first.
        let mut holders: Vec<((u8, Reverse<usize>), usize, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.admin && c.mem != [0, 0])
            .map(|(i, c)| {
                let (partial, queue) = (c.mem[0] as usize, c.mem[1] as usize);
                let class = match (c.linger.is_some(), partial >= queue) {
                    (true, _) => 0,
                    (false, true) => 1,
                    (false, false) => 2,
                };
                ((class, Reverse(partial + queue)), i, c.gen)
            })
            .collect();
        holders.sort_unstable_by_key(|h| h.0);
        for ((_, Reverse(bytes)), idx, gen) in holders {
            if used <= target {
                break;
            }
            used -= bytes;
            self.to_close.push((idx, gen, CloseReason::Memory));
        }
    }

    /// Close connection `idx` to stay within the memory budget: its partial message or request
    /// head is freed at once, and it gets a close frame 1013 (Try Again Later) or, before the
    /// upgrade, a 503, after what is queued for it (a frame already begun on the wire must be
    /// finished); then it lingers, growing no more, until that is written or the close timeout.
    pub(super) fn shed<H: Handler<Data = D>>(&mut self, handler: &mut H, idx: usize) {
        self.log_shed(idx);
        let conn = &self.conns[idx];
        if !conn.pending.is_empty() || conn.linger.is_some() {
            // Bytes are queued for it (it does not read them as fast as they come: a close
            // frame behind them would hold them until the close timeout), or it was ending
            // already: reset it, and everything it holds, here and in the kernel, is freed now.
            self.conns[idx].socket.reset_on_close();
            self.end(handler, idx, CloseReason::Memory);
            return;
        }
        self.cork_for(idx);
        let conn = &mut self.conns[idx];
        match conn.data.is_some() {
            true => conn
                .session
                .abort(CloseCode::TRY_AGAIN_LATER, "memory budget", &mut self.cork),
            false => {
                self.cork.extend_from_slice(&refusal(Verdict::MemoryBudget));
                conn.session.finish_rejected();
            }
        }
        self.account(idx);
        self.finish(handler, idx, CloseReason::Memory);
    }

    fn log_shed(&mut self, idx: usize) {
        let conn = &self.conns[idx];
        let id = conn_id(self.loop_index, idx, conn.gen);
        let (peer, held) = (conn.peer, conn.mem[0] as usize + conn.mem[1] as usize);
        if let Some(more) = self.throttle(LOG_MEMORY, 1) {
            log::warn!(
                "memory budget: {} of {} bytes held; closed {id} from {peer}, which held {held} \
                 ({more} more since the last report)",
                self.memory.used(),
                self.memory.limit()
            );
        }
    }

    /// Debug builds: every connection's counted buffers are what it holds, and the budget's
    /// totals are their sum.
    pub(super) fn check_memory(&self) {
        if cfg!(debug_assertions) {
            let mut sum = [0, 0];
            for (i, c) in self.conns.iter() {
                let now = held(c);
                assert_eq!(
                    c.mem, now,
                    "connection {i}'s buffers are not counted as they are"
                );
                sum[0] += now[0] as usize;
                sum[1] += now[1] as usize;
            }
            let by_kind = self.memory.by_kind();
            let tls = self.conns.iter().filter(|(_, c)| c.socket.is_tls()).count()
                * crate::memory::TLS_CONNECTION_BYTES;
            assert_eq!(
                by_kind,
                [sum[0], sum[1], self.fanout_bytes, self.codec_bytes, tls],
                "the memory budget's totals drifted"
            );
        }
    }
}
