//! [`Core`]: everything a loop owns except the poll, the handler and the receive buffer, so that
//! a callback can borrow a connection, the cork and the handler at once; and the loop's clock,
//! start-up (the fd budget) and descriptor accounting.

use super::conn::{Conn, TimerRef, NEVER};
use crate::admission::Verdict;
use crate::app::CloseReason;
use crate::config::Config;
use crate::error::Error;
use crate::ledger::{plan_budget, raise_fd_limit, Budget, Ledger};
use crate::metrics::{Stats, ACCEPT_ERRNOS};
use crate::protocol::handshake;
use crate::sys;
use crate::timer_wheel::{TimerKey, TimerWheel};
use crate::watchdog::Heartbeat;
use mio::Registry;
use slab::Slab;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often per-address admission state is swept, in ms.
pub(super) const SWEEP_MS: u64 = 10_000;

/// How often a loop of a cluster publishes its metrics snapshot while busy, in ms.
pub(super) const PUBLISH_MS: u64 = 250;

/// Log throttle slots: accept errors by errno index, then refusals by verdict, then shedding.
pub(super) const LOG_REFUSALS: usize = ACCEPT_ERRNOS.len() + 1;
pub(super) const LOG_SHED: usize = LOG_REFUSALS + Verdict::LABELS.len();
/// Handshakes answered with an HTTP error.
pub(super) const LOG_REJECTS: usize = LOG_SHED + 1;
/// Connections closed to stay within the memory budget.
pub(super) const LOG_MEMORY: usize = LOG_REJECTS + 1;
/// New TLS connections refused at the cap on handshakes in progress.
pub(super) const LOG_TLS_CAP: usize = LOG_MEMORY + 1;
/// How many kinds of log line are throttled.
pub(super) const LOG_SLOTS: usize = LOG_TLS_CAP + 1;

/// Everything the loop owns except the poll, the handler and the receive buffer, so that a
/// handler callback can borrow a connection, the cork and the handler at the same time.
pub(super) struct Core<D> {
    pub(super) registry: Registry,
    /// Bound in accept.rs, counted by `fds_changed`, closed at shutdown on the close path.
    #[allow(clippy::disallowed_types)]
    // held here, opened and closed where the ledger counts it
    pub(super) listeners: Vec<Option<mio::net::TcpListener>>,
    pub(super) conns: Slab<Conn<D>>,
    pub(super) wheel: TimerWheel<TimerRef>,
    /// Output collected for `cork_owner` during the current dispatch.
    pub(super) cork: Vec<u8>,
    pub(super) cork_owner: Option<usize>,
    /// Connections to end once the current dispatch returns: (slab index, generation, reason).
    pub(super) doomed: Vec<(usize, u32, CloseReason)>,
    /// Connections that used their read budget this turn, to read again next turn (slab index,
    /// generation).
    pub(super) reread: Vec<(usize, u32)>,
    /// A message the session reassembled, handed over for the callback that gets it (see
    /// [`Session::read`](crate::protocol::session::Session::read)); released after it.
    pub(super) spill: Vec<u8>,
    /// Publish/subscribe: the topics, and this turn's publications and who is owed them.
    pub(super) pubsub: super::topics::Pubsub,
    /// Connections to close once no callback runs (`reap`): subscribers over their
    /// backpressure limit under the `Close` policy (1008), and connections shed to keep the
    /// loop within its memory budget (1013).
    pub(super) to_close: Vec<(usize, u32, CloseReason)>,
    /// This loop's share of the memory budget and what it holds.
    pub(super) memory: crate::memory::MemoryBudget,
    /// The turn's publications' bytes, as last accounted in `memory`.
    pub(super) fanout_bytes: usize,
    /// permessage-deflate's shared profile: the loop's compressors, decompressor and
    /// compression buffer (nothing until a connection negotiates it).
    pub(super) codec: crate::protocol::deflate::SharedCodec,
    /// Their heap bytes, as last accounted in `memory`.
    pub(super) codec_bytes: usize,
    /// `codec.work()` when the connection being read began its turn (see [`CODEC_BUDGET`]).
    ///
    /// [`CODEC_BUDGET`]: super::ws::CODEC_BUDGET
    pub(super) codec_mark: u64,
    /// Nanoseconds this turn has spent in TLS handshakes (see
    /// [`TLS_TURN_BUDGET_NS`](super::read::TLS_TURN_BUDGET_NS)).
    pub(super) tls_spent_ns: u64,
    /// TLS handshakes in progress on this loop by per-address key (connections from trusted
    /// proxies aside), for the per-address share of the cap (`accept.rs`).
    pub(super) tls_by_address: std::collections::HashMap<std::net::IpAddr, u32>,
    /// When the connections were last scanned for the biggest holders (ms).
    pub(super) last_shed_scan: u64,
    /// A ping was delivered during the current read: its connection may owe a pong.
    pub(super) pong_due: bool,
    pub(super) config: Config,
    /// Milliseconds of silence before the idle ping ([`ping_after`] of `config`).
    pub(super) ping_after: u64,
    pub(super) limits: handshake::Limits,
    pub(super) start: Instant,
    /// What this loop shares with the other loops of its cluster (a ledger of one alone).
    pub(super) ledger: Arc<Ledger>,
    /// This loop's index in the ledger.
    pub(super) loop_index: usize,
    /// When this loop next publishes its metrics snapshot to the ledger (clusters only), and the
    /// turn count it last published at.
    pub(super) next_publish: u64,
    pub(super) published_turns: u64,
    pub(super) now: u64,
    pub(super) next_gen: u32,
    pub(super) stats: Stats,
    pub(super) shutdown_at: Option<u64>,
    // --- admission and the fd budget
    /// Connections counted in the ledger's admission table (consistency check).
    pub(super) tally: Tally,
    pub(super) max_connections: usize,
    pub(super) fd_budget: usize,
    /// Kept open to be released when accept fails with `EMFILE` (opened and released in
    /// accept.rs, counted by `fds_changed`).
    #[allow(clippy::disallowed_types)]
    // held here, opened and closed where the ledger counts it
    pub(super) spare_fd: Option<std::fs::File>,
    /// Descriptors of the poll and waker.
    pub(super) fixed_fds: usize,
    pub(super) started: bool,
    pub(super) next_sweep: u64,
    // --- accepting
    pub(super) accept_due: bool,
    /// Connections admitted in the current loop turn (see `Core::accept_from`).
    pub(super) turn_admitted: usize,
    pub(super) accept_paused: bool,
    pub(super) paused_since: u64,
    pub(super) backoff_ms: u64,
    pub(super) accept_timer: Option<TimerKey>,
    /// Per log kind: when it was last logged (ms) and how many since were suppressed.
    pub(super) log_throttle: [(u64, u64); LOG_SLOTS],
    /// Whether each listener serves only metrics and health (not WebSocket upgrades).
    pub(super) listener_admin: Vec<bool>,
    /// The periodic fd audit's thread (loop 0 only), stopped at shutdown.
    pub(super) auditor: Option<crate::audit::Auditor>,
    /// The Redis bridge's threads (loop 0 only, with `Config::redis`), stopped at shutdown.
    pub(super) bridge: Option<crate::bridge::Bridge>,
    /// Token buckets of the operator endpoints (`/metrics`, `/healthz`): requests on the
    /// WebSocket listeners, and on the metrics listeners.
    pub(super) endpoint_buckets: [crate::admission::Bucket; 2],
    /// The heartbeat the stall watchdog reads, if it runs.
    pub(super) beat: Option<Arc<Heartbeat>>,
    /// Which origins may upgrade.
    pub(super) origin: crate::origin::OriginPolicy,
    /// Proxies whose word on the client address is taken.
    pub(super) trusted: crate::admission::TrustedProxies,
    /// TLS on the WebSocket listeners: the configuration the loops share, and the
    /// certificate's expiry.
    pub(super) tls: Option<crate::io::tls::TlsSetup>,
}

impl<D> Core<D> {
    pub(super) fn tick(&mut self) {
        self.turn_admitted = 0;
        self.now = self.start.elapsed().as_millis() as u64;
    }

    /// Size the fd budget (once, before the first poll): raise the soft limit if configured,
    /// and derive or check `max_connections`.
    pub(super) fn start_up(&mut self) -> Result<(), Error> {
        if self.config.raise_fd_limit {
            raise_fd_limit();
        }
        let (soft, _) = sys::nofile_limit()?;
        let in_use = sys::open_fds()?;
        self.ledger.set_base(in_use);
        let headroom = self.config.fd_headroom;
        // The Redis bridge's sockets, not open yet, are kept out of the connections' budget.
        let fixed = in_use + self.ledger.bridge_reserve();
        let (budget, max) = plan_budget(soft, fixed, headroom, self.config.max_connections, 1)?[0];
        let summary = Budget {
            fd_budget: budget,
            max_connections: max,
            fd_limit: soft,
            open: in_use,
            headroom,
            loops: 1,
            memory_budget: self.ledger.memory_budget().0,
        };
        log::info!("{summary}");
        self.join_budget(budget, max);
        Ok(())
    }

    /// Take `budget` descriptors for connections and `max_connections`, and start.
    pub(super) fn join_budget(&mut self, budget: usize, max_connections: usize) {
        self.started = true;
        self.fd_budget = budget;
        self.max_connections = max_connections;
        // One audit per process, on a thread of its own: loop 0's.
        let every = self.config.audit_interval;
        if self.loop_index == 0 && !every.is_zero() && self.auditor.is_none() {
            match crate::audit::Auditor::start(self.ledger.clone(), every) {
                Ok(a) => self.auditor = Some(a),
                Err(e) => log::warn!("cannot start the fd audit thread: {e}; no periodic audit"),
            }
        }
        // One Redis bridge per process, likewise.
        if self.loop_index == 0 && self.bridge.is_none() {
            match crate::bridge::Bridge::start(&self.ledger) {
                Ok(b) => self.bridge = b,
                Err(e) => log::error!("cannot start the Redis bridge: {e}; topics stay local"),
            }
        }
        if self.ledger.loops() > 1 {
            self.publish_snapshot();
        }
    }

    /// Connection `idx` is read (and its unparsed input parsed) again at the start of the next
    /// turn, not before, after the other connections have been served.
    pub(super) fn read_next_turn(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        if !conn.read_later {
            conn.read_later = true;
            self.reread.push((idx, conn.gen));
            self.stats.read_yields += 1;
        }
    }

    /// Store this loop's descriptor count in the ledger: after opening one, before closing one
    /// (see [`Ledger`]).
    pub(super) fn fds_changed(&self) {
        self.ledger.set_owned(self.loop_index, self.owned_fds());
    }

    /// Publish this loop's snapshot for the other loops of its cluster to render.
    pub(super) fn publish_snapshot(&mut self) {
        self.ledger.publish(self.loop_index, self.snapshot());
        self.published_turns = self.stats.loop_turns;
        self.next_publish = self.now + PUBLISH_MS;
    }

    pub(super) fn stats(&self) -> Stats {
        Stats {
            connections: self.conns.len(),
            timers: self.wheel.len() - self.accept_timer.is_some() as usize,
            audit_difference: self.ledger.last_audit().1,
            accept_paused: self.accept_paused,
            stalls: self.beat.as_ref().map_or(0, |b| b.stalls.load(Relaxed)),
            longest_stall_ns: self.beat.as_ref().map_or(0, |b| b.longest_ns.load(Relaxed)),
            max_connections: self.max_connections,
            fd_budget: self.fd_budget,
            fds_owned: self.owned_fds(),
            topics: self.pubsub.sizes().0,
            subscriptions: self.pubsub.sizes().1,
            published: self.pubsub.published,
            memory_budget: self.memory.limit(),
            memory_bytes: self.memory.by_kind(),
            compressed_messages: self.codec.messages(),
            compression_bytes: self.codec.bytes(),
            compression_budget: self.ledger.compression_budget().into(),
            memory_shedding: self.memory.shedding(),
            memory_shed_episodes: self.memory.episodes,
            tls_certificate_not_after: self.tls.as_ref().map_or(0, |t| t.not_after()),
            tls_reloads: self.tls.as_ref().map_or([0; 2], |t| t.reloads()),
            ..self.stats.clone()
        }
    }

    /// Descriptors the loop owns.
    pub(super) fn owned_fds(&self) -> usize {
        self.fixed_fds
            + self.listeners.iter().flatten().count()
            + self.conns.len()
            + self.spare_fd.is_some() as usize
    }

    /// Open descriptors in the process minus those it had before the loop started and those
    /// the loop owns: positive when something leaks descriptors, zero when all is accounted.
    /// Fewer than expected means a descriptor open at start (the application's, or a transient
    /// one another thread held while the baseline was measured) has been closed since: that is
    /// no leak, so the baseline moves down and the difference is zero.
    pub(super) fn audit(&mut self) -> io::Result<i64> {
        // No undisturbed reading (other loops opening and closing all along): the last result.
        Ok(self.ledger.audit()?.unwrap_or(self.ledger.last_audit().1))
    }

    pub(super) fn alive(&self, idx: usize, gen: u32) -> bool {
        self.conns.get(idx).is_some_and(|c| c.gen == gen)
    }

    /// `d` in the wheel's milliseconds, rounded up: a deadline never comes before its time.
    pub(super) fn ms(d: Duration) -> u64 {
        d.as_nanos().div_ceil(1_000_000).min(u64::MAX as u128 / 4) as u64
    }

    /// Rate-limit one kind of log line (`slot`) to one a second: `n` more events happened;
    /// returns how many were suppressed since the last line when one may be logged now.
    pub(super) fn throttle(&mut self, slot: usize, n: u64) -> Option<u64> {
        let (last, suppressed) = &mut self.log_throttle[slot];
        if *last != 0 && self.now < *last + 1000 {
            *suppressed += n;
            return None;
        }
        let more = *suppressed + n - 1;
        *last = self.now.max(1);
        *suppressed = 0;
        Some(more)
    }
}

/// The loop's counts over its connections: how many are counted against their address in the
/// admission table, and how many are refused ones being answered. Private to this type: they
/// change only where a connection enters the slab, is counted against its address, or leaves
/// it (the close path), through these methods, which keep them equal to the connections' own
/// flags.
#[derive(Debug, Default)]
pub(super) struct Tally {
    ip_counted: u64,
    shedding: usize,
}

impl Tally {
    /// Refused connections being answered now.
    pub(super) fn shedding(&self) -> usize {
        self.shedding
    }

    /// Connections counted against their address now.
    pub(super) fn ip_counted(&self) -> u64 {
        self.ip_counted
    }

    /// A connection entered the slab: counted against its address already or not; refused
    /// (and being answered) or not.
    pub(super) fn entered<D>(&mut self, conn: &Conn<D>) {
        self.ip_counted += conn.ip_counted as u64;
        self.shedding += conn.shed as usize;
    }

    /// Count a connection from a trusted proxy against the per-address limits, under the
    /// address it now has (the client the proxy named, or the proxy's own): counted, or
    /// refused and why.
    /// `counted` is the connection's own flag, set here.
    pub(super) fn admit_address(
        &mut self,
        ledger: &Ledger,
        now: u64,
        ip: IpAddr,
        counted: &mut bool,
    ) -> Result<(), Verdict> {
        debug_assert!(!*counted);
        *counted = ledger.admission().admit_address(ip, now)?;
        self.ip_counted += *counted as u64;
        Ok(())
    }

    /// A connection left the slab (the close path): give back what it was counted for.
    pub(super) fn left<D>(&mut self, ledger: &Ledger, conn: &Conn<D>) {
        if conn.ip_counted {
            ledger.admission().release(conn.peer.ip());
            self.ip_counted -= 1;
        }
        self.shedding -= conn.shed as usize;
    }
}

/// Milliseconds of silence before the idle ping (half the idle timeout); NEVER when off.
pub(super) fn ping_after(config: &Config) -> u64 {
    match Core::<()>::ms(config.idle_timeout) {
        0 => NEVER,
        idle => idle.div_ceil(2),
    }
}

#[cfg(test)]
mod tests {
    use super::Core;
    use std::time::Duration;

    #[test]
    fn durations_become_whole_milliseconds_rounded_up() {
        let ms = |us| Core::<()>::ms(Duration::from_micros(us));
        assert_eq!(
            (ms(0), ms(1), ms(1000), ms(1001), ms(1999), ms(2000)),
            (0, 1, 1, 2, 2, 2)
        );
        assert_eq!(Core::<()>::ms(Duration::MAX), u64::MAX / 4);
    }
}
