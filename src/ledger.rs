//! What the loops of one process share, touched only when a connection opens or closes (never
//! per message): the descriptor accounting behind the fd audit ([`Ledger`]), the per-address
//! admission table (so per-IP limits hold for the process, as nginx's shared zones do), and
//! the snapshots from which any loop renders metrics for all of them, and the compression
//! budget that connections' own compression state draws on; and the fd budget, planned in one
//! place for one loop or many ([`plan_budget`]).

use crate::admission::Admission;
use crate::broker::Link;
use crate::config::{Config, ConfigError, FD_LIMIT};
use crate::io::tls::TlsSetup;
use crate::metrics::Snapshot;
use crate::sys;
pub(crate) use crate::topics::Forwarded;
use mio::Waker;
use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

/// How many readings an fd audit takes at most (see [`Ledger::difference_with`]).
const AUDIT_READINGS: usize = 5;

/// What the loops of one process share. A [`Server`] on its own has a ledger of one.
pub(crate) struct Ledger {
    /// The clock every loop of the group counts milliseconds from (admission buckets are
    /// shared, so their times must agree).
    pub(crate) start: Instant,
    /// Descriptors the process had open that belong to no loop (measured at start).
    base: AtomicUsize,
    /// Per loop: descriptors it owns. A loop stores a new count after opening a descriptor
    /// and before closing one.
    owned: Box<[AtomicUsize]>,
    /// Bumped before and after every store to `owned`: a reading of `/proc/self/fd` taken while
    /// it did not move saw no descriptor counted mid-scan (see [`Ledger::difference_with`]).
    changes: AtomicU64,
    /// Descriptors being opened or closed right now, between the system call and the store to
    /// `owned` that counts it (an accept before its count; a close after its count): a reading
    /// may see each of them one over what is accounted for, and forgives that much.
    in_flight: AtomicUsize,
    /// One `/proc/self/fd` scan at a time (a scan's own directory descriptor must not show up
    /// in another's count).
    scanning: Mutex<()>,
    /// The last audit's result: descriptors open, and open minus accounted for; and how many
    /// audits have completed.
    audit_open: AtomicUsize,
    audit_difference: AtomicI64,
    audits: AtomicU64,
    admission: Mutex<Admission>,
    /// Per loop: its latest published metrics snapshot.
    snapshots: Box<[Mutex<Option<Snapshot>>]>,
    /// Per loop: the publications other loops forwarded to it, not taken yet, with their bytes;
    /// and the waker that tells it.
    inboxes: Box<[Mutex<Inbox>]>,
    /// The memory budget over all loops, and where its size came from.
    memory: (usize, String),
    /// The compression budget (bytes all connections' own compression state may hold, see
    /// [`Config::compression_budget`]) and what is reserved of it.
    compression: (usize, AtomicUsize),
    wakers: Box<[OnceLock<Arc<Waker>>]>,
    /// What the loops share with the Redis bridge, when there is one.
    link: Option<Arc<Link>>,
    /// The Redis bridge's sockets (see `bridge.rs`): counted after they connect, uncounted
    /// before they close, like a loop's.
    bridge_fds: AtomicUsize,
    /// The TLS configuration every loop serves, made once at start ([`Ledger::with_tls`]).
    tls: Option<TlsSetup>,
}

/// One loop's inbox: the publications forwarded to it, and their bytes.
type Inbox = (Vec<Forwarded>, usize);

impl Ledger {
    pub(crate) fn new(loops: usize, config: &Config) -> Self {
        let burst = match config.connection_burst_per_ip {
            0 => config.connection_rate_per_ip,
            b => b,
        };
        Ledger {
            start: Instant::now(),
            base: AtomicUsize::new(0),
            owned: (0..loops).map(|_| AtomicUsize::new(0)).collect(),
            changes: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            scanning: Mutex::new(()),
            audit_open: AtomicUsize::new(0),
            audit_difference: AtomicI64::new(0),
            audits: AtomicU64::new(0),
            admission: Mutex::new(
                Admission::new(
                    config.max_connections_per_ip,
                    config.connection_rate_per_ip,
                    burst,
                )
                .with_ipv6_prefix(config.ipv6_prefix_len),
            ),
            snapshots: (0..loops).map(|_| Mutex::new(None)).collect(),
            inboxes: (0..loops).map(|_| Mutex::new((Vec::new(), 0))).collect(),
            wakers: (0..loops).map(|_| OnceLock::new()).collect(),
            link: config
                .redis
                .clone()
                .map(|r| Arc::new(Link::new(r, config.max_message_size))),
            bridge_fds: AtomicUsize::new(0),
            tls: None,
            memory: match config.memory_budget {
                0 => crate::memory::default_budget(),
                n => (n, "--memory-budget".into()),
            },
            compression: (0, AtomicUsize::new(0)),
        }
        .with_compression_budget(config.compression_budget)
    }

    /// The compression budget: as configured, or a quarter of the memory budget; at most half
    /// of it (the state also counts in the memory budget, and shedding cannot reduce it).
    fn with_compression_budget(mut self, configured: usize) -> Self {
        let most = self.memory.0 / 2;
        self.compression.0 = match configured {
            0 => self.memory.0 / 4,
            n if n > most => {
                log::warn!(
                    "--compression-budget {n} is more than half the memory budget: {most} bytes used"
                );
                most
            }
            n => n,
        };
        self
    }

    /// Reserve `bytes` of the compression budget for one connection's own state: false (nothing
    /// reserved) if that would pass it.
    pub(crate) fn reserve_compression(&self, bytes: usize) -> bool {
        let (cap, held) = (&self.compression.0, &self.compression.1);
        held.fetch_update(SeqCst, SeqCst, |h| {
            h.checked_add(bytes).filter(|&n| n <= *cap)
        })
        .is_ok()
    }

    /// Give back `bytes` of the compression budget (the connection holding them ended).
    pub(crate) fn release_compression(&self, bytes: usize) {
        self.compression.1.fetch_sub(bytes, SeqCst);
    }

    /// The compression budget and what is reserved of it.
    pub(crate) fn compression_budget(&self) -> (usize, usize) {
        (self.compression.0, self.compression.1.load(SeqCst))
    }

    /// The ledger of loops that serve TLS with `tls` (made by [`crate::io::tls::load`]).
    pub(crate) fn with_tls(mut self, tls: Option<TlsSetup>) -> Self {
        self.tls = tls;
        self
    }

    /// The TLS configuration the loops serve, if any.
    pub(crate) fn tls(&self) -> Option<&TlsSetup> {
        self.tls.as_ref()
    }

    /// The memory budget over all loops, and where its size came from.
    pub(crate) fn memory_budget(&self) -> (usize, &str) {
        (self.memory.0, &self.memory.1)
    }

    /// Each loop's share of the memory budget.
    pub(crate) fn memory_share(&self) -> usize {
        self.memory.0 / self.loops()
    }

    /// Loop `loop_index`'s waker, through which the others tell it of forwarded publications.
    pub(crate) fn set_waker(&self, loop_index: usize, waker: Arc<Waker>) {
        let _ = self.wakers[loop_index].set(waker);
    }

    /// What the loops share with the Redis bridge, if there is one.
    pub(crate) fn link(&self) -> Option<&Arc<Link>> {
        self.link.as_ref()
    }

    /// Descriptors kept out of the connections' budget for the Redis bridge (its two sockets,
    /// or with sharding two per primary of the cluster: `broker::bridge_fds`) and not open
    /// now: added to those in use when the budget is planned.
    pub(crate) fn bridge_reserve(&self) -> usize {
        match &self.link {
            Some(link) => {
                crate::broker::bridge_fds(&link.config).saturating_sub(self.bridge_fds.load(SeqCst))
            }
            None => 0,
        }
    }

    /// The Redis bridge opened (`+1`) a socket, or is about to close (`-1`) one: counted like a
    /// loop's descriptor (see `owned`), bracketed by [`Ledger::moving`] and [`Ledger::settled`].
    pub(crate) fn bridge_fd(&self, opened: bool) {
        self.changes.fetch_add(1, SeqCst);
        match opened {
            true => self.bridge_fds.fetch_add(1, SeqCst),
            false => self.bridge_fds.fetch_sub(1, SeqCst),
        };
        self.changes.fetch_add(1, SeqCst);
    }

    /// The Redis bridge's sockets open now.
    pub(crate) fn bridge_fds(&self) -> usize {
        self.bridge_fds.load(SeqCst)
    }

    /// Hand `batch` (messages from other instances, through Redis) to every loop, as
    /// [`Ledger::forward`] does. Returns how many were dropped for a full inbox (once per loop).
    pub(crate) fn forward_all(&self, batch: &[Forwarded]) -> u64 {
        self.forward_to(None, batch).0
    }

    /// Hand `batch` (loop `from`'s publications of one turn, in order) to every other loop:
    /// one lock of each inbox, and a wake-up for a loop whose inbox was empty. An inbox over
    /// its bytes takes none of the batch. Returns how many publications were dropped so (each
    /// counted once per loop that missed it), and how many loops were woken.
    pub(crate) fn forward(&self, from: usize, batch: &[Forwarded]) -> (u64, u64) {
        self.forward_to(Some(from), batch)
    }

    fn forward_to(&self, from: Option<usize>, batch: &[Forwarded]) -> (u64, u64) {
        let (mut dropped, mut woken) = (0, 0);
        let bytes: usize = batch.iter().map(|f| f.topic.len() + f.payload.len()).sum();
        for to in (0..self.loops()).filter(|&i| Some(i) != from) {
            let mut inbox = self.inboxes[to]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if inbox.1 + bytes > crate::topics::MAX_FORWARDED {
                dropped += batch.len() as u64;
                continue;
            }
            let was_empty = inbox.0.is_empty();
            inbox.0.extend_from_slice(batch);
            inbox.1 += bytes;
            drop(inbox);
            if was_empty {
                if let Some(w) = self.wakers[to].get() {
                    // A failed wake leaves the batch for the loop's next wake-up.
                    let _ = w.wake();
                    woken += 1;
                }
            }
        }
        (dropped, woken)
    }

    /// What the other loops forwarded to loop `loop_index`, in the order they sent it.
    pub(crate) fn take_forwarded(&self, loop_index: usize) -> Vec<Forwarded> {
        let mut inbox = self.inboxes[loop_index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        inbox.1 = 0;
        std::mem::take(&mut inbox.0)
    }

    pub(crate) fn loops(&self) -> usize {
        self.owned.len()
    }

    pub(crate) fn set_owned(&self, loop_index: usize, n: usize) {
        self.changes.fetch_add(1, SeqCst);
        self.owned[loop_index].store(n, SeqCst);
        self.changes.fetch_add(1, SeqCst);
    }

    /// A descriptor is about to be opened (before `accept`) or has just been uncounted before
    /// its close: a reading meanwhile forgives it (see `in_flight`). Call
    /// [`Ledger::settled`] once it is counted, or closed.
    pub(crate) fn moving(&self) {
        self.in_flight.fetch_add(1, SeqCst);
    }

    /// The descriptor [`Ledger::moving`] announced is counted, or closed (or was never
    /// opened).
    pub(crate) fn settled(&self) {
        self.in_flight.fetch_sub(1, SeqCst);
    }

    /// Descriptors accounted for: those of no loop plus every loop's own and the Redis bridge's.
    pub(crate) fn accounted(&self) -> usize {
        self.base.load(SeqCst) + self.owned_total() + self.bridge_fds()
    }

    /// Descriptors loop `loop_index` owns, as it last stored them.
    pub(crate) fn owned_by(&self, loop_index: usize) -> usize {
        self.owned[loop_index].load(SeqCst)
    }

    /// Descriptors the loops own.
    pub(crate) fn owned_total(&self) -> usize {
        self.owned.iter().map(|o| o.load(SeqCst)).sum()
    }

    /// Set the base from the descriptors open now, when every loop has stored its count.
    pub(crate) fn set_base(&self, open: usize) {
        let own = self.owned_total() + self.bridge_fds();
        self.base.store(open.saturating_sub(own), SeqCst);
    }

    pub(crate) fn admission(&self) -> MutexGuard<'_, Admission> {
        self.admission
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Descriptors open (as `open_fds` lists them) and open minus accounted for, without
    /// changing anything; `None` when no reading was undisturbed.
    ///
    /// `/proc/self/fd` is listed a chunk at a time, while the loops open and close descriptors
    /// on their own threads: a descriptor opened behind the listing's position and counted
    /// before the count is read would make too many accounted for. So a reading counts only if
    /// no loop stored a count from just before the listing started until the count was read
    /// (`changes` did not move). Such a reading can still see a descriptor a loop has opened but
    /// not counted yet, or counted out but not closed yet: too few accounted for, a positive
    /// difference. So a positive reading is taken again, up to [`AUDIT_READINGS`] in all, and
    /// the smallest counts. A leak stays; a race does not.
    fn difference_with(
        &self,
        mut open_fds: impl FnMut() -> io::Result<usize>,
    ) -> io::Result<Option<(usize, i64)>> {
        let _scan = self.scanning.lock().unwrap_or_else(PoisonError::into_inner);
        let mut best: Option<(usize, i64)> = None;
        for _ in 0..AUDIT_READINGS {
            let before = self.changes.load(SeqCst);
            let moving = self.in_flight.load(SeqCst);
            let open = open_fds()?;
            let accounted = self.accounted();
            let moving = moving.max(self.in_flight.load(SeqCst)) as i64;
            if self.changes.load(SeqCst) != before {
                std::thread::yield_now();
                continue;
            }
            let diff = match open as i64 - accounted as i64 {
                d if d > 0 => (d - moving).max(0),
                d => d,
            };
            if best.is_none_or(|(_, d)| diff < d) {
                best = Some((open, diff));
            }
            if diff <= 0 {
                break;
            }
        }
        Ok(best)
    }

    /// The audit: [`Ledger::difference_with`] `/proc/self/fd`, kept as the last result (what `/healthz` and
    /// `/metrics` report; they never list `/proc` themselves). Fewer descriptors than accounted
    /// for means one open at start (the application's, or a transient one another thread held
    /// while the base was measured) has been closed since: no leak, so the base moves down and
    /// the difference is zero. Returns the difference, or `None` (and keeps the last result)
    /// when no reading was undisturbed.
    pub(crate) fn audit(&self) -> io::Result<Option<i64>> {
        self.audit_with(sys::open_fds)
    }

    fn audit_with(&self, open_fds: impl FnMut() -> io::Result<usize>) -> io::Result<Option<i64>> {
        let Some((open, mut diff)) = self.difference_with(open_fds)? else {
            return Ok(None);
        };
        if diff < 0 {
            let less = diff.unsigned_abs() as usize;
            let _ = self
                .base
                .fetch_update(SeqCst, SeqCst, |b| Some(b.saturating_sub(less)));
            diff = 0;
        }
        self.audit_open.store(open, SeqCst);
        self.audit_difference.store(diff, SeqCst);
        self.audits.fetch_add(1, SeqCst);
        Ok(Some(diff))
    }

    /// The last audit's result: descriptors open then, and the difference it found (zero
    /// before the first audit).
    pub(crate) fn last_audit(&self) -> (usize, i64) {
        (
            self.audit_open.load(SeqCst),
            self.audit_difference.load(SeqCst),
        )
    }

    /// Audits completed.
    pub(crate) fn audits(&self) -> u64 {
        self.audits.load(SeqCst)
    }

    /// Descriptors open in the process, without listing `/proc`: those accounted for now, plus
    /// the leak the last audit found.
    pub(crate) fn open_estimate(&self) -> usize {
        self.accounted() + self.last_audit().1.max(0) as usize
    }

    /// Whether any loop other than `loop_index` has paused accepting, as it last published.
    pub(crate) fn others_paused(&self, loop_index: usize) -> bool {
        (0..self.loops()).filter(|i| *i != loop_index).any(|i| {
            self.snapshots[i]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|s| s.stats.accept_paused)
        })
    }

    pub(crate) fn publish(&self, loop_index: usize, snapshot: Snapshot) {
        *self.snapshots[loop_index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(snapshot);
    }

    /// Every loop's snapshot, with `own` (fresh) in place of `loop_index`'s published one. A loop
    /// that has not published yet counts as empty.
    pub(crate) fn snapshots(&self, loop_index: usize, own: Snapshot) -> Vec<Snapshot> {
        let mut own = Some(own);
        (0..self.loops())
            .map(|i| match i == loop_index {
                true => own.take().unwrap_or_default(),
                false => self.snapshots[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// Descriptors each loop opens for itself: its epoll (the poll and its registry's duplicate),
/// its waker's eventfd and the spare kept for `EMFILE`, besides one per listener.
const LOOP_OWN_FDS: u64 = 4;

/// Before any loop starts: whether RLIMIT_NOFILE (`soft`) leaves room, beyond the `open`
/// descriptors, for `loops` loops with `listeners` listeners each (and loop 0's metrics
/// listener): their own descriptors, the one each reserves for a refused client, at least two
/// connections each, and the headroom. Refused naming `threads` when fewer loops would fit,
/// else the limit itself ([`FD_LIMIT`]), with every number.
pub(crate) fn check_room(
    soft: u64,
    open: usize,
    headroom: usize,
    loops: usize,
    listeners: usize,
    metrics: bool,
) -> Result<(), ConfigError> {
    let per_loop = LOOP_OWN_FDS.saturating_add(listeners as u64);
    // Its own, one reserved for a refused client, two connections.
    let need = |loops: u64| {
        per_loop
            .checked_add(3)
            .and_then(|each| each.checked_mul(loops))
            .and_then(|n| n.checked_add(open as u64))
            .and_then(|n| n.checked_add(headroom as u64))
            .and_then(|n| n.checked_add(metrics as u64))
    };
    let needed = need(loops as u64);
    if needed.is_some_and(|n| n <= soft) {
        return Ok(());
    }
    // Whom to name: fewer loops would fit; or a headroom above the default takes the whole
    // limit while the rest would fit; or else the limit is too low.
    let without_headroom = need(1)
        .map(|n| n - headroom as u64)
        .or_else(|| (per_loop + 3 + metrics as u64).checked_add(open as u64));
    let raised = headroom > Config::default().fd_headroom && headroom as u64 >= soft;
    let field = match need(1) {
        Some(one) if loops > 1 && one <= soft => "threads",
        _ if raised && without_headroom.is_some_and(|n| n <= soft) => "fd_headroom",
        _ => FD_LIMIT,
    };
    let needed = needed.map_or("more than 2^64".to_string(), |n| n.to_string());
    let plural = if loops == 1 { " needs" } else { "s need" };
    Err(ConfigError {
        field,
        reason: format!(
            "RLIMIT_NOFILE {soft} is too low: {loops} event loop{plural} at least {needed} file \
             descriptors ({open} open already, headroom {headroom}, and per loop {per_loop} of its \
             own, 1 reserved and 2 for connections{}); raise the limit (ulimit -n, systemd \
             LimitNOFILE){}{}",
            if metrics {
                ", 1 for the metrics listener"
            } else {
                ""
            },
            if loops > 1 { ", run fewer loops" } else { "" },
            if headroom > 0 {
                " or lower fd_headroom"
            } else {
                ""
            },
        ),
    })
}

/// How the fd budget is split: per loop, the descriptors it may use for connections and its
/// connection limit. `soft` is RLIMIT_NOFILE, `in_use` the descriptors open now (every loop's
/// epoll, waker, listeners and spare included), `wanted` the configured `max_connections`
/// (0: derive it, keeping an eighth of each share, at most 1024, for answering refused
/// clients). One descriptor per loop is reserved for a refused client it briefly holds when
/// its share is full. Every sum is checked: values that cannot fit are refused, naming the
/// field (`fd_headroom`, `max_connections`) or the limit ([`FD_LIMIT`]) with the numbers.
pub(crate) fn plan_budget(
    soft: u64,
    in_use: usize,
    headroom: usize,
    wanted: usize,
    loops: usize,
) -> Result<Vec<(usize, usize)>, ConfigError> {
    let numbers = format!("RLIMIT_NOFILE {soft}, {in_use} open, headroom {headroom}");
    if loops == 0 {
        return Err(ConfigError {
            field: "threads",
            reason: "must be at least 1".into(),
        });
    }
    let reserved = (in_use as u64)
        .checked_add(headroom as u64)
        .and_then(|r| r.checked_add(loops as u64));
    let Some(reserved) = reserved.filter(|_| (headroom as u64) < soft) else {
        return Err(ConfigError {
            field: "fd_headroom",
            reason: format!("{headroom} leaves no descriptor for connections ({numbers})"),
        });
    };
    let budget = soft.saturating_sub(reserved).min(1 << 24) as usize;
    let per = match loops {
        1 => String::new(),
        n => format!(" shared by {n} threads"),
    };
    let least = loops.saturating_mul(2);
    if budget < least {
        return Err(ConfigError {
            field: if loops > 1 { "threads" } else { FD_LIMIT },
            reason: format!(
                "no connection fits the file-descriptor budget of {budget}{per} ({numbers}); \
                 raise the limit (ulimit -n, systemd LimitNOFILE)"
            ),
        });
    }
    if wanted > budget {
        return Err(ConfigError {
            field: "max_connections",
            reason: format!(
                "{wanted} does not fit the file-descriptor budget of {budget}{per} ({numbers}); \
                 raise the limit (ulimit -n, systemd LimitNOFILE) or lower max_connections"
            ),
        });
    }
    let share = |total: usize, i: usize| total / loops + (i < total % loops) as usize;
    Ok((0..loops)
        .map(|i| {
            let b = share(budget, i);
            let max = match wanted {
                // b >= 2: at least one connection is left after the reserve.
                0 => b.saturating_sub((b / 8).clamp(1, 1024)),
                w => share(w, i),
            };
            (b, max)
        })
        .collect())
}

/// How the process's descriptors were budgeted at start (see [`Cluster::budget`](crate::Cluster::budget)); its
/// `Display` is the line the loop logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Descriptors the loops may use for connections, in all.
    pub fd_budget: usize,
    /// Connections the loops may hold, in all.
    pub max_connections: usize,
    /// The soft RLIMIT_NOFILE.
    pub fd_limit: u64,
    /// Descriptors open when the budget was measured.
    pub open: usize,
    /// [`Config::fd_headroom`].
    pub headroom: usize,
    /// Loops sharing the budget.
    pub loops: usize,
    /// The memory budget over all loops, in bytes (see
    /// [`Config::memory_budget`](crate::Config::memory_budget)).
    pub memory_budget: usize,
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fd budget {} (RLIMIT_NOFILE {}, {} open, headroom {}): up to {} connections",
            self.fd_budget, self.fd_limit, self.open, self.headroom, self.max_connections
        )?;
        if self.loops > 1 {
            write!(f, " over {} loops", self.loops)?;
        }
        write!(f, "; memory budget {} MiB", self.memory_budget >> 20)
    }
}

/// Set the process's soft `RLIMIT_NOFILE` to `soft`, at most the hard limit (which is left as it
/// is; an unlimited one stands for the kernel's `fs.nr_open`). Returns the soft limit now in
/// force. The `wsloop` binary's `--fd-limit` is this call.
///
/// The limit belongs to the process, not to a server: call this before starting any, and set
/// [`Config::raise_fd_limit`] to false, or each server raises the limit to the hard one again
/// when it starts. A server measures its fd budget from the limit in force when it starts (a
/// limit too low for its configuration is a [`ConfigError`] naming every number, before any
/// connection is accepted); lowering it under a running server makes its accepts fail with
/// `EMFILE`, which it survives (it sheds the backlog and backs off) but does not foresee.
///
/// Fails with the system's error (`EPERM` when the process may not change its limits).
pub fn set_fd_limit(soft: u64) -> io::Result<u64> {
    sys::set_nofile_soft(soft)
}

/// Raise the soft RLIMIT_NOFILE to the hard limit, and say so.
pub(crate) fn raise_fd_limit() {
    match sys::raise_nofile_limit() {
        Ok((old, new)) if new > old => {
            log::info!("raised the soft RLIMIT_NOFILE from {old} to {new}")
        }
        Ok(_) => {}
        Err(e) => log::warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_loop_keeps_the_whole_budget() {
        // 1024 - (20 open + 32 headroom + 1) = 971, an eighth (121) kept for refusals.
        assert_eq!(plan_budget(1024, 20, 32, 0, 1), Ok(vec![(971, 850)]));
        assert_eq!(plan_budget(1024, 20, 32, 500, 1), Ok(vec![(971, 500)]));
    }

    #[test]
    fn loops_split_the_budget_and_the_limit() {
        // 1024 - (20 + 32 + 3) = 969 over 3 loops: 323 each.
        let p = plan_budget(1024, 20, 32, 0, 3).unwrap();
        assert_eq!(p, vec![(323, 283); 3]);
        // 970 over 3: the remainder goes to the first loops; a configured limit likewise.
        let p = plan_budget(1025, 20, 32, 100, 3).unwrap();
        assert_eq!(p, vec![(324, 34), (323, 33), (323, 33)]);
        assert_eq!(p.iter().map(|s| s.0).sum::<usize>(), 970);
        assert_eq!(p.iter().map(|s| s.1).sum::<usize>(), 100);
    }

    #[test]
    fn a_budget_that_does_not_fit_is_refused_with_the_numbers() {
        let e = plan_budget(64, 40, 20, 0, 2).unwrap_err();
        assert_eq!(e.field, "threads");
        let text = e.to_string();
        assert!(
            text.contains("no connection fits the file-descriptor budget of 2 shared by 2 threads"),
            "{text}"
        );
        let e = plan_budget(1024, 20, 32, 2000, 1).unwrap_err();
        assert_eq!(e.field, "max_connections");
        let text = e.to_string();
        assert!(
            text.contains("max_connections: 2000 does not fit"),
            "{text}"
        );
        assert!(
            text.contains("RLIMIT_NOFILE 1024, 20 open, headroom 32"),
            "{text}"
        );
        let e = plan_budget(40, 30, 8, 0, 1).unwrap_err();
        assert_eq!(e.field, FD_LIMIT, "{e}");
    }

    #[test]
    fn a_headroom_that_overflows_the_sum_is_refused_not_wrapped() {
        // 13 open + (2^64 - 13) headroom + 1 wraps to 1 in u64: a budget of "20000 fit".
        let headroom = 18446744073709551603;
        let e = plan_budget(1 << 20, 13, headroom, 20_000, 1).unwrap_err();
        assert_eq!(e.field, "fd_headroom", "{e}");
        assert!(e.to_string().contains(&headroom.to_string()), "{e}");
        for (soft, open, headroom) in [
            (u64::MAX, usize::MAX, usize::MAX),
            (u64::MAX, 1, usize::MAX),
            (1024, usize::MAX, 1),
            (1024, 10, 1024),
        ] {
            for loops in [1, 3, 256] {
                assert!(plan_budget(soft, open, headroom, 0, loops).is_err());
                assert!(check_room(soft, open, headroom, loops, 64, true).is_err());
            }
        }
        // A headroom that fits is taken as before.
        assert_eq!(
            plan_budget(1 << 20, 13, 1 << 19, 0, 1).unwrap()[0].0,
            (1 << 19) - 14
        );
    }

    #[test]
    fn a_limit_too_low_for_the_loops_names_threads_or_the_limit_with_the_numbers() {
        // 200 loops with one listener: 8 each (4 own + 1 listener + 1 reserved + 2 conns).
        assert_eq!(check_room(1639, 7, 32, 200, 1, false), Ok(()));
        assert!(check_room(1638, 7, 32, 200, 1, false).is_err());
        let e = check_room(300, 7, 32, 200, 1, false).unwrap_err();
        assert_eq!(
            e.field, "threads",
            "one loop would fit: fewer loops is the way"
        );
        for n in [
            "RLIMIT_NOFILE 300",
            "200 event loops",
            "at least 1639",
            "7 open",
        ] {
            assert!(e.reason.contains(n), "{n}: {e}");
        }
        // Below the descriptors already open: the limit itself.
        let e = check_room(5, 9, 32, 1, 1, false).unwrap_err();
        assert_eq!(e.field, FD_LIMIT);
        assert!(e.reason.contains("RLIMIT_NOFILE 5"), "{e}");
        assert!(e.reason.contains("9 open already"), "{e}");
        let e = check_room(1024, 9, 4096, 1, 1, false).unwrap_err();
        assert_eq!(e.field, "fd_headroom");
        let e = check_room(1024, 9, usize::MAX, 1, 1, false).unwrap_err();
        assert_eq!(e.field, "fd_headroom");
        assert!(e.reason.contains("more than 2^64"), "{e}");
        // The default headroom is not blamed for a tiny limit.
        let e = check_room(20, 9, 32, 1, 1, false).unwrap_err();
        assert_eq!(e.field, FD_LIMIT);
    }

    #[test]
    fn the_audit_counts_every_loop_and_moves_the_base_down_only() {
        let ledger = Ledger::new(2, &Config::default());
        ledger.set_owned(0, 3);
        ledger.set_owned(1, 2);
        ledger.set_base(20);
        assert_eq!(ledger.accounted(), 20);
        assert_eq!(ledger.audit_with(|| Ok(20)).unwrap(), Some(0));
        // Fewer open than accounted for (something open at start closed): the base moves down.
        assert_eq!(ledger.audit_with(|| Ok(18)).unwrap(), Some(0));
        assert_eq!(ledger.accounted(), 18);
        // One more open than accounted for at every reading: a leak, and the base stays.
        assert_eq!(ledger.audit_with(|| Ok(19)).unwrap(), Some(1));
        assert_eq!(ledger.accounted(), 18);
        assert_eq!((ledger.last_audit(), ledger.audits()), ((19, 1), 3));
        assert_eq!(ledger.open_estimate(), 19);
        // A race: the first reading saw a descriptor a loop had not counted yet.
        let mut readings = [19, 18, 18].into_iter();
        let found = ledger
            .difference_with(|| Ok(readings.next().unwrap()))
            .unwrap();
        assert_eq!(found, Some((18, 0)));
    }

    #[test]
    fn a_reading_during_which_a_count_moved_does_not_count() {
        let ledger = Ledger::new(1, &Config::default());
        ledger.set_owned(0, 4);
        ledger.set_base(14); // 10 not the loop's
        assert_eq!(ledger.audit_with(|| Ok(15)).unwrap(), Some(1));
        // The loop opens a descriptor while every listing is running, and counts it before the
        // count is read: the listing missed it (14 for 15 accounted). Such readings are not
        // taken, neither as a difference nor to move the base down; the last result stays.
        let mut owned = 4;
        let result = ledger
            .audit_with(|| {
                owned += 1;
                ledger.set_owned(0, owned);
                Ok(10 + owned - 1)
            })
            .unwrap();
        assert_eq!(result, None);
        assert_eq!(ledger.accounted(), 10 + owned);
        assert_eq!((ledger.last_audit(), ledger.audits()), ((15, 1), 1));
        // Undisturbed, the same count is no difference at all.
        assert_eq!(ledger.audit_with(|| Ok(10 + owned)).unwrap(), Some(0));
    }
}
