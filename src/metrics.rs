//! Prometheus metrics (text exposition format 0.0.4) and the health verdict. Rendering scans
//! the connections once (states, queued bytes); neither lists `/proc/self/fd`: the descriptor
//! figures come from the ledger's counts and the last fd audit, which runs on a thread of its
//! own (`crate::audit`). Nothing here runs per message.

use crate::admission::Verdict;
use crate::reason::CloseReason;
use crate::sys;
use std::fmt::Write;

/// Upper bounds (seconds) of the loop-turn duration histogram's buckets; `+Inf` follows.
pub const TURN_BUCKETS: [f64; 11] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
];

/// HTTP statuses counted individually for rejected handshakes; others count as "other".
pub const REJECT_STATUSES: [u16; 11] = [400, 403, 404, 405, 408, 414, 426, 429, 431, 500, 503];

/// Index of `status` in [`REJECT_STATUSES`], or its length for "other".
pub fn status_index(status: u16) -> usize {
    REJECT_STATUSES
        .iter()
        .position(|s| *s == status)
        .unwrap_or(REJECT_STATUSES.len())
}

/// Record one loop turn that took `ns` nanoseconds.
pub(crate) fn observe_turn(stats: &mut Stats, ns: u64) {
    stats.loop_turns += 1;
    stats.turn_ns_sum += ns;
    let secs = ns as f64 / 1e9;
    let i = TURN_BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(TURN_BUCKETS.len());
    stats.turn_buckets[i] += 1;
}

/// What the loop reports about its health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Serving normally.
    Ok,
    /// Not healthy, with a one-line reason.
    Unhealthy(String),
}

/// What only a scan of the connections can tell.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scan {
    pub(crate) handshake: usize,
    pub(crate) open: usize,
    pub(crate) closing: usize,
    pub(crate) refusing: usize,
    pub(crate) queued: usize,
    pub(crate) largest_queue: usize,
    pub(crate) read_paused: usize,
    /// The most bytes one connection holds in its buffers (counted in the memory budget).
    pub(crate) largest_holder: usize,
}

/// One loop's counters and scan at one moment: what a loop publishes for the others of its
/// cluster to render, and what totals are summed from.
#[derive(Clone, Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) stats: Stats,
    pub(crate) scan: Scan,
}

impl Snapshot {
    /// The totals over loops: counters and gauges add up, the largest queue and the longest
    /// stall are the largest, accepting counts as paused if any loop has paused it.
    pub(crate) fn total(parts: &[Snapshot]) -> Snapshot {
        let mut t = Snapshot::default();
        for p in parts {
            let (a, b) = (&mut t.stats, &p.stats);
            a.accepted += b.accepted;
            a.connections += b.connections;
            a.timers += b.timers;
            add(&mut a.closed, &b.closed);
            add(&mut a.accept_errors, &b.accept_errors);
            add(&mut a.refused, &b.refused);
            a.accept_paused |= b.accept_paused;
            a.paused_ms += b.paused_ms;
            a.max_connections += b.max_connections;
            a.fd_budget += b.fd_budget;
            a.fds_owned += b.fds_owned;
            a.messages_received += b.messages_received;
            a.messages_sent += b.messages_sent;
            add(&mut a.compressed_messages, &b.compressed_messages);
            add(&mut a.compression_bytes, &b.compression_bytes);
            add_usize(&mut a.compression_connections, &b.compression_connections);
            a.compression_downgrades += b.compression_downgrades;
            // Process-wide: every loop reports the same.
            a.compression_budget = b.compression_budget;
            a.bytes_received += b.bytes_received;
            a.bytes_sent += b.bytes_sent;
            a.loop_turns += b.loop_turns;
            a.turn_ns_sum += b.turn_ns_sum;
            add(&mut a.turn_buckets, &b.turn_buckets);
            add(&mut a.rejected_status, &b.rejected_status);
            a.audit_difference = a.audit_difference.max(b.audit_difference);
            a.handler_panics += b.handler_panics;
            a.endpoint_limited += b.endpoint_limited;
            a.stalls += b.stalls;
            a.longest_stall_ns = a.longest_stall_ns.max(b.longest_stall_ns);
            a.queue_peak = a.queue_peak.max(b.queue_peak);
            a.read_yields += b.read_yields;
            a.topics += b.topics;
            a.subscriptions += b.subscriptions;
            a.published += b.published;
            a.deliveries += b.deliveries;
            add(&mut a.deliveries_dropped, &b.deliveries_dropped);
            a.forward_wakeups += b.forward_wakeups;
            a.memory_budget += b.memory_budget;
            add_usize(&mut a.memory_bytes, &b.memory_bytes);
            a.memory_shedding |= b.memory_shedding;
            a.memory_shed_episodes += b.memory_shed_episodes;
            a.tls_handshakes_ok += b.tls_handshakes_ok;
            add(&mut a.tls_handshakes_failed, &b.tls_handshakes_failed);
            a.tls_handshaking += b.tls_handshaking;
            a.tls_handshakes_capped += b.tls_handshakes_capped;
            add_usize(&mut a.tls_connections, &b.tls_connections);
            add_usize(&mut a.tls_ciphers, &b.tls_ciphers);
            a.tls_certificate_not_after =
                a.tls_certificate_not_after.max(b.tls_certificate_not_after);
            // One count for the process, which every loop reports.
            a.tls_reloads = b.tls_reloads;
            let (a, b) = (&mut t.scan, &p.scan);
            a.handshake += b.handshake;
            a.open += b.open;
            a.closing += b.closing;
            a.refusing += b.refusing;
            a.queued += b.queued;
            a.largest_queue = a.largest_queue.max(b.largest_queue);
            a.read_paused += b.read_paused;
            a.largest_holder = a.largest_holder.max(b.largest_holder);
        }
        t
    }
}

fn add<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

fn add_usize<const N: usize>(a: &mut [usize; N], b: &[usize; N]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// The reasons a published message was not handed to a subscriber, as
/// `wsloop_deliveries_dropped_total` labels them, in the order of
/// [`Stats::deliveries_dropped`].
pub const DELIVERY_DROPS: [&str; 4] = ["backpressure", "closing", "overflow", "memory"];

/// Counters the loop keeps; read through [`Ctx::stats`](crate::Ctx::stats) or
/// [`LoopHandle::stats`](crate::LoopHandle::stats).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted since start (admitted or refused).
    pub accepted: u64,
    /// Connections held right now (any state, refused ones being answered included).
    pub connections: usize,
    /// Timers armed for connections right now (the loop's own accept-backoff timer is not
    /// counted): zero when no connection is held.
    pub timers: usize,
    /// Connections ended, by [`CloseReason::index`].
    pub closed: [u64; CloseReason::LABELS.len()],
    /// Failed accept calls by errno, in the order of [`ACCEPT_ERRNO_LABELS`]; the last is "other".
    pub accept_errors: [u64; ACCEPT_ERRNOS.len() + 1],
    /// Connections refused at admission, by [`Verdict::index`](crate::admission::Verdict::index): server full, address full,
    /// rate limited, memory budget.
    pub refused: [u64; 4],
    /// Accepting is paused right now (out of descriptors or another resource).
    pub accept_paused: bool,
    /// Milliseconds spent with accepting paused, over completed pauses.
    pub paused_ms: u64,
    /// The connection limit in force (configured, or derived from the fd budget).
    pub max_connections: usize,
    /// Descriptors the loop may hold for connections.
    pub fd_budget: usize,
    /// Descriptors the loop owns: epoll, waker, listeners, connections, the spare.
    pub fds_owned: usize,
    /// Complete messages received from clients.
    pub messages_received: u64,
    /// Messages sent to clients.
    pub messages_sent: u64,
    /// permessage-deflate: messages inflated (received compressed) and compressed (sent with
    /// RSV1), in that order.
    pub compressed_messages: [u64; 2],
    /// permessage-deflate's bytes: received compressed, and what they inflated to; compressed
    /// to send, and what they were compressed to (the payloads, without the 4-byte tails; a
    /// publication compressed once for all its subscribers counts once), in that order.
    pub compression_bytes: [u64; 4],
    /// Open connections that negotiated permessage-deflate: with the shared profile, and with
    /// their own state (the dedicated profile), in that order.
    pub compression_connections: [usize; 2],
    /// Connections that would have had their own compression state but were given the shared
    /// profile because the compression budget was full.
    pub compression_downgrades: u64,
    /// The process's compression budget and what connections' own state holds of it (the same
    /// figures in every loop's stats: process-wide).
    pub compression_budget: [usize; 2],
    /// Bytes read from client sockets.
    pub bytes_received: u64,
    /// Bytes written to client sockets.
    pub bytes_sent: u64,
    /// Times a connection that sent faster than the loop reads had its reading put off to the
    /// next turn after four reads that filled the receive buffer, so that it could not hold
    /// the loop.
    pub read_yields: u64,
    /// Topics with at least one subscriber on the loop now.
    pub topics: usize,
    /// Subscriptions (a connection in a topic) on the loop now.
    pub subscriptions: usize,
    /// Messages published (each counted once, however many subscribers it reached).
    pub published: u64,
    /// Published messages handed to subscribers (one per subscriber reached).
    pub deliveries: u64,
    /// Published messages not handed to a subscriber, by reason ([`DELIVERY_DROPS`]): over its
    /// backpressure limit; closing; (per loop that missed it) a publication another loop of a
    /// cluster could not forward because this loop's inbox was full; and, while the loop sheds
    /// to stay within its memory budget, one for a subscriber holding more than its share.
    pub deliveries_dropped: [u64; 4],
    /// The loop's share of the memory budget, in bytes.
    pub memory_budget: usize,
    /// Bytes held in buffers counted in the memory budget, by kind
    /// ([`Kind::ALL`](crate::memory::Kind::ALL)): partial messages and request heads, send
    /// queues, the turn's publications, the loop's compression state, its TLS connections'
    /// state.
    pub memory_bytes: [usize; 5],
    /// The loop is shedding to stay within its memory budget: new connections are refused, and
    /// connections that grow past their share are closed.
    pub memory_shedding: bool,
    /// Times the loop started shedding.
    pub memory_shed_episodes: u64,
    /// Times this loop woke another loop of its cluster to deliver the publications it
    /// forwarded: at most one per other loop per turn, however many it published.
    pub forward_wakeups: u64,
    /// The most bytes one connection's send queue has held at once since start (what the
    /// socket did not take; see [`Config::max_backpressure`](crate::Config::max_backpressure)).
    pub queue_peak: usize,
    /// Loop turns.
    pub loop_turns: u64,
    /// Nanoseconds spent in turns (dispatching, not waiting).
    pub turn_ns_sum: u64,
    /// Turns by duration, per bucket of [`metrics::TURN_BUCKETS`](crate::metrics::TURN_BUCKETS)
    /// (not cumulative; the last is `+Inf`).
    pub turn_buckets: [u64; crate::metrics::TURN_BUCKETS.len() + 1],
    /// Handshakes answered with an HTTP error, by
    /// [`metrics::REJECT_STATUSES`](crate::metrics::REJECT_STATUSES) (the last is "other").
    pub rejected_status: [u64; crate::metrics::REJECT_STATUSES.len() + 1],
    /// The difference the last fd audit found (the periodic one on its own thread, or
    /// [`Ctx::audit`](crate::Ctx::audit); 0: all accounted for).
    pub audit_difference: i64,
    /// Requests for `/metrics` or `/healthz` answered 429 because of
    /// [`Config::endpoint_rate`](crate::Config::endpoint_rate).
    pub endpoint_limited: u64,
    /// Application callbacks (or posted closures) that panicked.
    pub handler_panics: u64,
    /// Loop turns that ran longer than the stall threshold, as the watchdog saw them.
    pub stalls: u64,
    /// The longest stall the watchdog saw, in nanoseconds.
    pub longest_stall_ns: u64,
    /// TLS handshakes completed.
    pub tls_handshakes_ok: u64,
    /// TLS handshakes that failed (the connection ended before it completed), by the
    /// [`CloseReason::index`] of its end: `tls_error` (garbage, cleartext, a bad record or an
    /// alert), `handshake_timeout`, `abnormal` (the client left), and so on.
    pub tls_handshakes_failed: [u64; CloseReason::LABELS.len()],
    /// TLS handshakes in progress now.
    pub tls_handshaking: usize,
    /// New connections on TLS listeners closed at once because the loop's share of
    /// [`Config::tls_max_handshakes`](crate::Config::tls_max_handshakes) was in progress.
    pub tls_handshakes_capped: u64,
    /// Established TLS connections held now, by version (TLS 1.2, TLS 1.3).
    pub tls_connections: [usize; 2],
    /// Established TLS connections held now, by cipher suite (in the order of their
    /// `wsloop_tls_cipher_connections` labels; the last is any other).
    pub tls_ciphers: [usize; 10],
    /// The soonest `notAfter` of the certificates served, in seconds since 1970 (0 without
    /// TLS).
    pub tls_certificate_not_after: i64,
    /// Certificate reloads over the process (every loop shares its certificates): that took
    /// effect, and that failed (the certificates served stayed as they were).
    pub tls_reloads: [u64; 2],
}

/// Labels of [`Stats::accept_errors`], in order.
pub const ACCEPT_ERRNO_LABELS: [&str; ACCEPT_ERRNOS.len() + 1] = {
    let mut labels = ["other"; ACCEPT_ERRNOS.len() + 1];
    let mut i = 0;
    while i < ACCEPT_ERRNOS.len() {
        labels[i] = ACCEPT_ERRNOS[i].1;
        i += 1;
    }
    labels
};

impl Stats {
    /// How many connections ended with `reason`'s label.
    pub fn closed_by(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()]
    }
    /// Connections ended in total.
    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }
}

/// The accept errors counted by kind, in this order; anything else is "other".
pub const ACCEPT_ERRNOS: [(i32, &str); 9] = [
    (libc::EMFILE, "EMFILE"),
    (libc::ENFILE, "ENFILE"),
    (libc::ENOBUFS, "ENOBUFS"),
    (libc::ENOMEM, "ENOMEM"),
    (libc::ECONNABORTED, "ECONNABORTED"),
    (libc::EPROTO, "EPROTO"),
    (libc::ECONNRESET, "ECONNRESET"),
    (libc::EPERM, "EPERM"),
    (libc::EINTR, "EINTR"),
];

/// Index of `errno` in [`ACCEPT_ERRNOS`], or its length for "other".
pub fn accept_errno_index(errno: i32) -> usize {
    ACCEPT_ERRNOS
        .iter()
        .position(|(e, _)| *e == errno)
        .unwrap_or(ACCEPT_ERRNOS.len())
}

/// The process's descriptor figures as the ledger keeps them, for [`render`].
pub(crate) struct FdFigures {
    /// Those accounted for now plus the last audit's difference.
    pub(crate) open_estimate: usize,
    /// The last audit's difference (open minus accounted for).
    pub(crate) audit_difference: i64,
    /// Audits completed.
    pub(crate) audits: u64,
    /// Descriptors the loops own, and the Redis bridge's sockets.
    pub(crate) owned: usize,
}

/// The Redis bridge's figures, for [`render`] (all zero without a bridge).
#[derive(Clone, Debug, Default)]
pub(crate) struct BrokerFigures {
    /// A bridge is configured.
    pub(crate) enabled: bool,
    /// Both its connections are up.
    pub(crate) up: bool,
    pub(crate) reconnects: u64,
    /// Messages sent to Redis, and received from it (other instances' only).
    pub(crate) sent: u64,
    pub(crate) received: u64,
    /// Messages dropped, by reason (see `broker::DROP_REASONS`).
    pub(crate) dropped: Vec<(&'static str, u64)>,
    /// Gaps (jumps forward) and resets (jumps back) in other instances' sequence numbers.
    pub(crate) gaps: u64,
    pub(crate) resets: u64,
    /// Publishers (per topic) whose numbers the bridge follows.
    pub(crate) tracked: u64,
    /// The last PING's round trip.
    pub(crate) rtt_seconds: f64,
    /// Publications waiting to be sent, and their bytes.
    pub(crate) queued: usize,
    pub(crate) queued_bytes: usize,
}

/// The reasons of `wsloop_broker_dropped_total` (the Redis bridge's `Counters::dropped`, in
/// order), listed even without a bridge.
pub(crate) const BROKER_DROP_REASONS: [&str; 5] = [
    "queue_full",
    "send_failed",
    "inbox_full",
    "invalid",
    "too_large",
];

fn render_broker(m: &mut Exposition, b: &BrokerFigures) {
    m.one(
        "wsloop_broker_enabled",
        "gauge",
        "1 if topics are shared with other instances through Redis (--redis).",
        b.enabled as u8 as f64,
    );
    m.one(
        "wsloop_broker_up",
        "gauge",
        "1 while both of the Redis bridge's connections are up.",
        b.up as u8 as f64,
    );
    m.one(
        "wsloop_broker_reconnects_total",
        "counter",
        "Times the Redis bridge's publisher connected again after losing Redis.",
        b.reconnects as f64,
    );
    m.one(
        "wsloop_broker_sent_total",
        "counter",
        "Publications sent to Redis.",
        b.sent as f64,
    );
    m.one(
        "wsloop_broker_received_total",
        "counter",
        "Publications of other instances received from Redis and handed to the loops.",
        b.received as f64,
    );
    m.head(
        "wsloop_broker_dropped_total",
        "counter",
        "Publications the Redis bridge dropped, by reason.",
    );
    for r in BROKER_DROP_REASONS {
        let n = b
            .dropped
            .iter()
            .find(|(k, _)| *k == r)
            .map_or(0, |(_, n)| *n);
        m.line("wsloop_broker_dropped_total", &[("reason", r)], n as f64);
    }
    m.one(
        "wsloop_broker_gaps_total",
        "counter",
        "Times messages of another instance on a topic were lost: its sequence number jumped \
         forward (one per jump, however many numbers it skipped).",
        b.gaps as f64,
    );
    m.one(
        "wsloop_broker_sequence_resets_total",
        "counter",
        "Times another instance's sequence number on a topic went back or repeated (it forgot \
         its numbers, or the message was forged): delivered, and followed from there.",
        b.resets as f64,
    );
    m.one(
        "wsloop_broker_sequences_tracked",
        "gauge",
        "Publishers (instance and topic) whose sequence numbers the bridge follows (at most \
         65,536: beyond, the half heard from least recently are forgotten).",
        b.tracked as f64,
    );
    m.one(
        "wsloop_broker_rtt_seconds",
        "gauge",
        "The round trip of the last PING to Redis.",
        b.rtt_seconds,
    );
    m.one(
        "wsloop_broker_queued",
        "gauge",
        "Publications waiting to be sent to Redis.",
        b.queued as f64,
    );
    m.one(
        "wsloop_broker_queued_bytes",
        "gauge",
        "Bytes of the publications waiting to be sent to Redis.",
        b.queued_bytes as f64,
    );
}

fn render_tls(m: &mut Exposition, st: &Stats) {
    m.head(
        "wsloop_tls_handshakes_total",
        "counter",
        "TLS handshakes completed (ok) or failed, by how the connection ended.",
    );
    m.line(
        "wsloop_tls_handshakes_total",
        &[("result", "ok")],
        st.tls_handshakes_ok as f64,
    );
    m.by_reason(
        "wsloop_tls_handshakes_total",
        "result",
        &st.tls_handshakes_failed,
    );
    m.one(
        "wsloop_tls_handshakes_in_progress",
        "gauge",
        "TLS handshakes begun and not completed yet.",
        st.tls_handshaking as f64,
    );
    m.one(
        "wsloop_tls_handshakes_capped_total",
        "counter",
        "New connections on TLS listeners closed at once: the cap on handshakes in progress was reached.",
        st.tls_handshakes_capped as f64,
    );
    m.head(
        "wsloop_tls_connections",
        "gauge",
        "Established TLS connections held now, by TLS version.",
    );
    for (i, version) in crate::io::tls_session::TLS_VERSIONS.iter().enumerate() {
        m.line(
            "wsloop_tls_connections",
            &[("version", version)],
            st.tls_connections[i] as f64,
        );
    }
    m.head(
        "wsloop_tls_cipher_connections",
        "gauge",
        "Established TLS connections held now, by cipher suite.",
    );
    for (i, cipher) in crate::io::tls_session::TLS_CIPHERS.iter().enumerate() {
        m.line(
            "wsloop_tls_cipher_connections",
            &[("cipher", cipher)],
            st.tls_ciphers[i] as f64,
        );
    }
    m.one(
        "wsloop_tls_certificate_not_after_seconds",
        "gauge",
        "The soonest notAfter of the certificates served (seconds since 1970; 0 without TLS).",
        st.tls_certificate_not_after as f64,
    );
    m.head(
        "wsloop_tls_reloads_total",
        "counter",
        "Certificate reloads (SIGHUP, LoopHandle::reload_tls): that took effect (ok), that failed and left the certificates served unchanged (failed).",
    );
    for (i, result) in ["ok", "failed"].iter().enumerate() {
        m.line(
            "wsloop_tls_reloads_total",
            &[("result", result)],
            st.tls_reloads[i] as f64,
        );
    }
}

/// The metrics of every loop (`parts`, in loop order) in Prometheus text format.
pub(crate) fn render(parts: &[Snapshot], fds: &FdFigures, broker: &BrokerFigures) -> String {
    let total = Snapshot::total(parts);
    let (st, scan) = (&total.stats, &total.scan);
    let mut m = Exposition(String::with_capacity(8192));

    m.head(
        "wsloop_connections",
        "gauge",
        "Connections held now, by state.",
    );
    for (state, n) in [
        ("handshake", scan.handshake),
        ("open", scan.open),
        ("closing", scan.closing),
        ("refusing", scan.refusing),
    ] {
        m.line("wsloop_connections", &[("state", state)], n as f64);
    }
    m.one(
        "wsloop_connections_max",
        "gauge",
        "The connection limit in force.",
        st.max_connections as f64,
    );
    m.one(
        "wsloop_connections_accepted_total",
        "counter",
        "Connections accepted (admitted or refused).",
        st.accepted as f64,
    );
    m.head(
        "wsloop_connections_closed_total",
        "counter",
        "Connections ended, by reason.",
    );
    m.by_reason("wsloop_connections_closed_total", "reason", &st.closed);
    m.head(
        "wsloop_handshakes_rejected_total",
        "counter",
        "Upgrade requests answered with an HTTP error, by status.",
    );
    for (i, n) in st.rejected_status.iter().enumerate() {
        let status = REJECT_STATUSES
            .get(i)
            .map_or("other".to_string(), |s| s.to_string());
        m.line(
            "wsloop_handshakes_rejected_total",
            &[("status", &status)],
            *n as f64,
        );
    }
    m.head(
        "wsloop_admission_rejections_total",
        "counter",
        "Connections refused at admission (503 or 429), by limit.",
    );
    for (i, label) in Verdict::LABELS.iter().enumerate() {
        m.line(
            "wsloop_admission_rejections_total",
            &[("limit", label)],
            st.refused[i] as f64,
        );
    }
    m.head(
        "wsloop_accept_errors_total",
        "counter",
        "Failed accept calls, by errno.",
    );
    for (i, label) in ACCEPT_ERRNO_LABELS.iter().enumerate() {
        m.line(
            "wsloop_accept_errors_total",
            &[("errno", label)],
            st.accept_errors[i] as f64,
        );
    }
    m.one(
        "wsloop_accept_paused",
        "gauge",
        "1 while accepting is paused (out of descriptors or memory).",
        st.accept_paused as u8 as f64,
    );
    m.one(
        "wsloop_accept_paused_seconds_total",
        "counter",
        "Seconds spent with accepting paused.",
        st.paused_ms as f64 / 1000.0,
    );
    let diff = fds.audit_difference;
    m.one(
        "wsloop_process_open_fds",
        "gauge",
        "File descriptors open in the process: those accounted for now plus the last fd audit's difference (no listing of /proc per scrape).",
        fds.open_estimate as f64,
    );
    m.one(
        "wsloop_fd_audit_difference",
        "gauge",
        "Open descriptors minus those accounted for (the loops' own plus those open before they started), as the last fd audit found; non-zero means a leak.",
        diff.max(0) as f64,
    );
    m.one(
        "wsloop_fd_audits_total",
        "counter",
        "Fd audits completed (listings of /proc/self/fd, on the audit thread).",
        fds.audits as f64,
    );
    m.one(
        "wsloop_fds_accounted",
        "gauge",
        "Descriptors the loops own (epoll, waker, listeners, connections, the spares) and the Redis bridge's sockets.",
        fds.owned as f64,
    );
    if let Ok((limit, _)) = sys::nofile_limit() {
        m.one(
            "wsloop_fd_limit",
            "gauge",
            "The soft RLIMIT_NOFILE.",
            limit.min(1 << 53) as f64,
        );
    }
    m.one(
        "wsloop_fd_budget",
        "gauge",
        "Descriptors the loop may use for connections.",
        st.fd_budget as f64,
    );
    m.one(
        "wsloop_messages_received_total",
        "counter",
        "Complete messages received from clients.",
        st.messages_received as f64,
    );
    m.one(
        "wsloop_messages_sent_total",
        "counter",
        "Messages sent to clients.",
        st.messages_sent as f64,
    );
    m.head(
        "wsloop_compressed_messages_total",
        "counter",
        "Messages received compressed and inflated, and messages compressed and sent (permessage-deflate).",
    );
    for (i, direction) in ["received", "sent"].into_iter().enumerate() {
        m.line(
            "wsloop_compressed_messages_total",
            &[("direction", direction)],
            st.compressed_messages[i] as f64,
        );
    }
    m.head(
        "wsloop_compression_connections",
        "gauge",
        "Open connections that negotiated permessage-deflate, by profile: shared (the loop's compressor), dedicated (their own state).",
    );
    for (i, profile) in ["shared", "dedicated"].into_iter().enumerate() {
        m.line(
            "wsloop_compression_connections",
            &[("profile", profile)],
            st.compression_connections[i] as f64,
        );
    }
    m.one(
        "wsloop_compression_downgrades_total",
        "counter",
        "Connections given the shared profile instead of their own compression state, the compression budget being full.",
        st.compression_downgrades as f64,
    );
    m.one(
        "wsloop_compression_budget_bytes",
        "gauge",
        "The process's compression budget: the most bytes connections' own compression state may hold.",
        st.compression_budget[0] as f64,
    );
    m.one(
        "wsloop_compression_budget_held_bytes",
        "gauge",
        "Bytes of the compression budget held by connections' own compression state.",
        st.compression_budget[1] as f64,
    );
    m.head(
        "wsloop_compression_bytes_total",
        "counter",
        "permessage-deflate payload bytes, compressed and uncompressed: received (compressed, and what they inflated to) and sent (before compression, and what they were compressed to; a publication counts once).",
    );
    let forms = [
        ("received", "compressed"),
        ("received", "uncompressed"),
        ("sent", "uncompressed"),
        ("sent", "compressed"),
    ];
    for (i, (direction, form)) in forms.into_iter().enumerate() {
        m.line(
            "wsloop_compression_bytes_total",
            &[("direction", direction), ("form", form)],
            st.compression_bytes[i] as f64,
        );
    }
    m.one(
        "wsloop_received_bytes_total",
        "counter",
        "Bytes read from client sockets.",
        st.bytes_received as f64,
    );
    m.one(
        "wsloop_sent_bytes_total",
        "counter",
        "Bytes written to client sockets.",
        st.bytes_sent as f64,
    );
    render_tls(&mut m, st);
    m.one(
        "wsloop_queued_bytes",
        "gauge",
        "Bytes waiting for slow readers, over all connections.",
        scan.queued as f64,
    );
    m.one(
        "wsloop_queued_bytes_largest",
        "gauge",
        "Bytes waiting for the slowest reader.",
        scan.largest_queue as f64,
    );
    m.one(
        "wsloop_queued_bytes_peak",
        "gauge",
        "The most bytes one connection's send queue has held at once since start.",
        st.queue_peak as f64,
    );
    m.one(
        "wsloop_read_yields_total",
        "counter",
        "Times a connection sending faster than the loop reads was read again next turn.",
        st.read_yields as f64,
    );
    m.one(
        "wsloop_read_paused_connections",
        "gauge",
        "Connections not read because more than the backpressure limit is queued for them.",
        scan.read_paused as f64,
    );
    m.one(
        "wsloop_topics",
        "gauge",
        "Topics with at least one subscriber (summed over loops: a topic with subscribers on two loops counts twice).",
        st.topics as f64,
    );
    m.one(
        "wsloop_subscriptions",
        "gauge",
        "Subscriptions: a connection in a topic.",
        st.subscriptions as f64,
    );
    m.one(
        "wsloop_published_total",
        "counter",
        "Messages published (each once, on the loop it was published on).",
        st.published as f64,
    );
    m.one(
        "wsloop_deliveries_total",
        "counter",
        "Published messages handed to a subscriber (one per subscriber reached).",
        st.deliveries as f64,
    );
    m.head(
        "wsloop_deliveries_dropped_total",
        "counter",
        "Published messages not handed to a subscriber, by reason.",
    );
    for (i, label) in DELIVERY_DROPS.iter().enumerate() {
        m.line(
            "wsloop_deliveries_dropped_total",
            &[("reason", label)],
            st.deliveries_dropped[i] as f64,
        );
    }
    m.one(
        "wsloop_memory_budget_bytes",
        "gauge",
        "The memory budget for buffers that grow with what clients send or do not read.",
        st.memory_budget as f64,
    );
    m.head(
        "wsloop_memory_bytes",
        "gauge",
        "Bytes held in buffers counted in the memory budget, by kind.",
    );
    for kind in crate::memory::Kind::ALL {
        m.line(
            "wsloop_memory_bytes",
            &[("kind", kind.label())],
            st.memory_bytes[kind as usize] as f64,
        );
    }
    m.one(
        "wsloop_memory_largest_holder_bytes",
        "gauge",
        "The most bytes one connection holds in buffers counted in the memory budget.",
        scan.largest_holder as f64,
    );
    m.one(
        "wsloop_memory_shedding",
        "gauge",
        "1 while a loop sheds to stay within the memory budget (new connections refused, growers closed).",
        st.memory_shedding as u8 as f64,
    );
    m.one(
        "wsloop_memory_shed_episodes_total",
        "counter",
        "Times a loop started shedding to stay within the memory budget.",
        st.memory_shed_episodes as f64,
    );
    m.one(
        "wsloop_forward_wakeups_total",
        "counter",
        "Wake-ups of another loop of the cluster for publications forwarded to it (at most one per loop per turn).",
        st.forward_wakeups as f64,
    );
    m.one(
        "wsloop_timers",
        "gauge",
        "Connection timers armed in the wheel.",
        st.timers as f64,
    );
    m.one(
        "wsloop_loop_turns_total",
        "counter",
        "Event loop turns.",
        st.loop_turns as f64,
    );
    m.one(
        "wsloop_endpoint_rate_limited_total",
        "counter",
        "Requests for /metrics or /healthz answered 429 (over --endpoint-rate).",
        st.endpoint_limited as f64,
    );
    render_broker(&mut m, broker);
    m.one(
        "wsloop_handler_panics_total",
        "counter",
        "Application callbacks or posted closures that panicked (caught; the connection got 1011 or 500).",
        st.handler_panics as f64,
    );
    m.one(
        "wsloop_loop_stalls_total",
        "counter",
        "Loop turns that ran longer than the stall threshold.",
        st.stalls as f64,
    );
    m.one(
        "wsloop_loop_longest_stall_seconds",
        "gauge",
        "The longest loop turn the stall watchdog saw.",
        st.longest_stall_ns as f64 / 1e9,
    );
    m.head(
        "wsloop_loop_turn_duration_seconds",
        "histogram",
        "Time a loop turn spent dispatching events and timers (not waiting).",
    );
    let mut cumulative = 0;
    for (i, n) in st.turn_buckets.iter().enumerate() {
        cumulative += n;
        let le = TURN_BUCKETS
            .get(i)
            .map_or("+Inf".to_string(), |b| b.to_string());
        m.line(
            "wsloop_loop_turn_duration_seconds_bucket",
            &[("le", &le)],
            cumulative as f64,
        );
    }
    m.line(
        "wsloop_loop_turn_duration_seconds_sum",
        &[],
        st.turn_ns_sum as f64 / 1e9,
    );
    m.line(
        "wsloop_loop_turn_duration_seconds_count",
        &[],
        st.loop_turns as f64,
    );
    per_loop(&mut m, parts);
    m.0
}

fn per_loop(m: &mut Exposition, parts: &[Snapshot]) {
    type Get = fn(&Snapshot) -> f64;
    let series: [(&str, &str, &str, Get); 6] = [
        (
            "wsloop_per_loop_connections",
            "gauge",
            "Connections held now, per loop.",
            |p| p.stats.connections as f64,
        ),
        (
            "wsloop_per_loop_connections_max",
            "gauge",
            "The loop's share of the connection limit.",
            |p| p.stats.max_connections as f64,
        ),
        (
            "wsloop_per_loop_fd_budget",
            "gauge",
            "The loop's share of the fd budget.",
            |p| p.stats.fd_budget as f64,
        ),
        (
            "wsloop_per_loop_accepted_total",
            "counter",
            "Connections accepted, per loop.",
            |p| p.stats.accepted as f64,
        ),
        (
            "wsloop_per_loop_messages_received_total",
            "counter",
            "Complete messages received, per loop.",
            |p| p.stats.messages_received as f64,
        ),
        (
            "wsloop_per_loop_busy_seconds_total",
            "counter",
            "Time the loop spent dispatching (not waiting).",
            |p| p.stats.turn_ns_sum as f64 / 1e9,
        ),
    ];
    for (name, kind, help, get) in series {
        m.head(name, kind, help);
        for (i, p) in parts.iter().enumerate() {
            m.line(name, &[("loop", &i.to_string())], get(p));
        }
    }
}

struct Exposition(String);

impl Exposition {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{val}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {v}");
    }
    /// One line per close reason: `name{key="<reason's label>"}` with its count.
    fn by_reason(&mut self, name: &str, key: &str, counts: &[u64; CloseReason::LABELS.len()]) {
        for (label, n) in CloseReason::LABELS.iter().zip(counts) {
            self.line(name, &[(key, label)], *n as f64);
        }
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.head(name, kind, help);
        self.line(name, &[], v);
    }
}
