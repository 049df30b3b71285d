//! What a loop reports: its snapshot (counters and a scan of its connections) for the other
//! loops of its cluster, `/metrics` and `/healthz`. Constant time in the descriptors open (the
//! ledger's counts and the last audit's result, never a listing of `/proc`).

use super::core::Core;
use crate::metrics::{render, FdFigures, Health, Scan, Snapshot};
use crate::protocol::session::State;
use crate::sys;

impl<D> Core<D> {
    pub(super) fn scan(&self) -> Scan {
        let mut s = Scan::default();
        for (_, c) in self.conns.iter() {
            if c.shed {
                s.refusing += 1;
            } else if c.linger.is_some() {
                s.closing += 1;
            } else {
                match c.session.state() {
                    State::Handshake => s.handshake += 1,
                    State::Open => s.open += 1,
                    State::CloseSent | State::Closed => s.closing += 1,
                }
            }
            s.queued += c.pending.len();
            s.largest_queue = s.largest_queue.max(c.pending.len());
            s.read_paused += c.read_paused as usize;
            s.largest_holder = s.largest_holder.max(c.mem[0] as usize + c.mem[1] as usize);
        }
        s
    }

    /// This loop's counters and scan now (a pause in progress counted in `paused_ms`).
    pub(super) fn snapshot(&self) -> Snapshot {
        let mut stats = self.stats();
        if self.accept_paused {
            stats.paused_ms += self.now.saturating_sub(self.paused_since);
        }
        Snapshot {
            stats,
            scan: self.scan(),
        }
    }

    /// Healthy unless accepting is paused, process descriptors have climbed into the headroom
    /// (the high-water mark: limit minus `fd_headroom`), or the last fd audit found a
    /// difference. Constant time: the descriptor count is the ledger's (plus the last audit's
    /// difference), never a listing of `/proc`.
    pub(super) fn health(&self) -> Health {
        if self.accept_paused || self.ledger.others_paused(self.loop_index) {
            return Health::Unhealthy(
                "accepting is paused (out of file descriptors or memory)".into(),
            );
        }
        if self.memory.shedding() {
            return Health::Unhealthy(format!(
                "shedding to stay within the memory budget: {} of {} bytes held",
                self.memory.used(),
                self.memory.limit()
            ));
        }
        let open = self.ledger.open_estimate();
        if let Ok((limit, _)) = sys::nofile_limit() {
            let high = limit.saturating_sub(self.config.fd_headroom as u64);
            if open as u64 >= high {
                return Health::Unhealthy(format!(
                    "{open} file descriptors open, high-water mark {high} (limit {limit})"
                ));
            }
        }
        let (audited, diff) = self.ledger.last_audit();
        if diff > 0 {
            return Health::Unhealthy(format!(
                "fd audit: {audited} open, {} accounted for ({diff:+})",
                audited as i64 - diff
            ));
        }
        Health::Ok
    }

    /// What `/healthz` says after `ok` (nothing without a Redis bridge).
    pub(super) fn health_detail(&self) -> Option<String> {
        self.ledger.link().map(|l| l.health_line())
    }

    /// The metrics of every loop in Prometheus text format, as `GET /metrics` serves them.
    pub(super) fn render_metrics(&self) -> String {
        let parts = self.ledger.snapshots(self.loop_index, self.snapshot());
        let fds = FdFigures {
            open_estimate: self.ledger.open_estimate(),
            audit_difference: self.ledger.last_audit().1,
            audits: self.ledger.audits(),
            owned: self.ledger.owned_total() + self.ledger.bridge_fds(),
        };
        let broker = self.ledger.link().map(|l| l.figures()).unwrap_or_default();
        render(&parts, &fds, &broker)
    }
}
