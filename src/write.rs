//! The loop's side of the write path: the cork changes hands between connections, what a sender
//! left for the loop is settled, and the cork is flushed at the end of a dispatch (see
//! [`crate::io::out`]).

use crate::event_loop::Core;
use crate::io::out::{Direct, Sent, CORK_KEEP};
use crate::reason::CloseReason;

impl<D> Core<D> {
    /// Make `idx` the owner of the cork buffer, first flushing what another connection left in it.
    pub(crate) fn cork_for(&mut self, idx: usize) {
        if self.cork_owner != Some(idx) {
            self.flush_cork();
            self.cork_owner = Some(idx);
        }
    }

    /// After a sender used connection `idx`'s [`Outbox`]: count what it sent, and if it wrote
    /// to the socket directly, on a partial write arm the write-stall deadline, on a failure
    /// doom the connection, as [`Core::flush_cork`] does. Returns false if the connection is
    /// doomed.
    #[inline]
    pub(crate) fn settle(&mut self, idx: usize, sent: Sent) -> bool {
        self.stats.bytes_sent += sent.bytes_written;
        self.stats.messages_sent += sent.messages;
        sent.direct == Direct::Done || self.settle_direct(idx, sent.direct)
    }

    #[inline(never)]
    fn settle_direct(&mut self, idx: usize, direct: Direct) -> bool {
        match direct {
            Direct::Done => true,
            Direct::Partial => {
                let queued = self.conns[idx].pending.len();
                self.stats.queue_peak = self.stats.queue_peak.max(queued);
                self.conns[idx].stall_at = self.now + Self::ms(self.config.write_stall_timeout);
                self.rearm(idx);
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
    pub(crate) fn flush_cork(&mut self) {
        let Some(idx) = self.cork_owner.take() else {
            return;
        };
        if let Some(conn) = self.conns.get_mut(idx) {
            if self.cork.is_empty() {
                // Nothing to write; a lingering connection may be done all the same.
            } else if !conn.pending.is_empty() {
                conn.pending.push(&self.cork);
                self.stats.queue_peak = self.stats.queue_peak.max(conn.pending.len());
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
                    }
                    Err(e) => {
                        let reason = conn.linger.unwrap_or(CloseReason::of_io_error(&e));
                        self.doomed.push((idx, conn.gen, reason));
                    }
                }
            }
            if let Some(conn) = self.conns.get_mut(idx) {
                if let (Some(reason), true) = (conn.linger, conn.pending.is_empty()) {
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
}
