//! The event loop: mio `Poll` (edge-triggered), connections in a slab with generation-tagged
//! tokens, one timer wheel for every deadline, and the one close path ([`Core::end`]).
//!
//! Read path: one receive buffer per loop; a read that fills less than the buffer has drained
//! the socket (edge-triggered: new data raises a new edge), so a message costs one `recv`.
//! Write path: see [`crate::write`] (the cork, direct writes of large payloads, the queue).
//! Interest (read + write) is registered once per connection: no `epoll_ctl` per message.
//!
//! Deadlines: each connection has one wheel entry, armed at the earliest of its state deadline
//! (handshake, idle ping, idle close, close handshake, linger), its write-stall deadline and its
//! maximum lifetime. Moving a deadline later only records it in the wheel (O(1), no unlinking);
//! when the entry fires early, the loop re-arms it at the new earliest deadline. The idle
//! deadline, which every message moves, is not even recorded in the wheel: the message stores it
//! in the connection, and the entry filed at the old deadline fires early and is re-filed.

use crate::app::{
    CloseReason, ConnId, Decision, Handler, Message, SendState, UpgradeRequest, WebSocket,
};
use crate::cluster::{plan_budget, Ledger};
use crate::config::Config;
use crate::handle::{Command, Ctx, LoopHandle, OwnedMessage, Shared};
use crate::listener::{ACCEPT_ERRNOS, ACCEPT_TIMER};
use crate::protocol::close::{truncate_reason, CloseCode};
use crate::protocol::handshake::{self, Rejection};
use crate::protocol::session::{Event, Head, Session, State};
use crate::sys;
use crate::timer_wheel::{TimerKey, TimerWheel};
use crate::watchdog::{Activity, Heartbeat, Watchdog};
use crate::write::{write_error_reason, write_some, Out, SendQueue, CORK_KEEP};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;
use std::fs::File;
use std::io::{self, ErrorKind, Read};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Token of the cross-thread waker; listener tokens are 0..MAX_LISTENERS, and connection tokens
/// carry a generation >= 1 in their upper 32 bits, so they never collide with either.
const WAKER: Token = Token(u32::MAX as usize);
const MAX_LISTENERS: usize = 64;
/// Slab slots a loop may use (connection ids keep 24 bits for the slot).
pub(crate) const MAX_SLOTS: usize = 1 << 24;
/// A deadline that is not set.
pub(crate) const NEVER: u64 = u64::MAX;
/// How often per-address admission state is swept, in ms.
const SWEEP_MS: u64 = 10_000;
/// Reads that fill the receive buffer one connection may do per turn; then the loop serves the
/// others and reads the rest on its next turn, so a peer that sends faster than the loop
/// parses cannot hold the loop.
const READ_BUDGET: usize = 4;
/// How often a loop of a cluster publishes its metrics snapshot while busy, in ms.
const PUBLISH_MS: u64 = 250;
/// Commands whose buffer the loop keeps between batches from its handles' queue.
const BATCH_KEEP: usize = 1024;

/// A timer entry: the connection's slab index and generation ([`ACCEPT_TIMER`] for the accept
/// backoff).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TimerRef {
    pub(crate) idx: u32,
    pub(crate) gen: u32,
}

/// One connection in the slab.
pub(crate) struct Conn<D> {
    pub(crate) socket: TcpStream,
    pub(crate) gen: u32,
    pub(crate) peer: SocketAddr,
    pub(crate) session: Session,
    /// The connection's one timer, armed at the earliest of the three deadlines below.
    pub(crate) timer: Option<TimerKey>,
    /// The state's deadline (ms): handshake, idle ping or close, close handshake, or linger.
    pub(crate) deadline: u64,
    /// When unsent bytes that made no progress make the connection stall out.
    pub(crate) stall_at: u64,
    /// The end of the connection's maximum lifetime.
    pub(crate) expire_at: u64,
    /// Bytes the socket did not take yet.
    pub(crate) pending: SendQueue,
    /// Set once the upgrade is accepted: the connection is open and `on_close` is owed.
    pub(crate) data: Option<D>,
    pub(crate) send: SendState,
    pub(crate) subprotocol: Option<Box<str>>,
    /// An idle ping is out and unanswered.
    pub(crate) pinged: bool,
    /// Ending gracefully: flush `pending`, then close with this reason.
    pub(crate) linger: Option<CloseReason>,
    /// What few connections need (close frames, a split PROXY header), out of line.
    pub(crate) rare: Option<Box<Rare>>,
    /// Ending after a failure: our final bytes are out and our side is shut down (FIN sent);
    /// input is discarded until the peer's EOF or the close timeout.
    pub(crate) fin_sent: bool,
    /// The peer's EOF has been read: there is no input left to drain.
    pub(crate) peer_eof: bool,
    /// When it was accepted (ms since the loop started, wrapping), for the close log.
    pub(crate) born: u32,
    /// Counted against its address by admission control.
    pub(crate) ip_counted: bool,
    /// Refused at admission and answered; kept only to read its request.
    pub(crate) shed: bool,
    /// Came in on a metrics-only listener.
    pub(crate) admin: bool,
    /// The TCP peer is a trusted proxy; `peer` becomes the client it reports, once it has.
    pub(crate) via_proxy: bool,
    /// A PROXY header is expected before the request.
    pub(crate) awaiting_proxy: bool,
    /// More than `max_backpressure` bytes are queued: the socket is not read (so the kernel's
    /// flow control holds the peer back) until the queue drains to half the limit.
    pub(crate) read_paused: bool,
}

/// The parts of a connection's state that most connections never use, boxed so that an idle
/// connection stays small.
#[derive(Default)]
pub(crate) struct Rare {
    /// The close frame the peer sent (code and reason), reported to `on_close`.
    peer_close: Option<(CloseCode, Box<str>)>,
    /// The close frame we sent (code and reason), reported to `on_close` when the close
    /// handshake we started completes.
    our_close: Option<(CloseCode, Box<str>)>,
    /// The start of a PROXY header split across reads (at most a few hundred bytes).
    proxy_partial: Vec<u8>,
}

impl<D> Conn<D> {
    pub(crate) fn new(socket: TcpStream, gen: u32, peer: SocketAddr, deadline: u64) -> Self {
        Conn {
            socket,
            gen,
            peer,
            session: Session::new(),
            timer: None,
            deadline,
            stall_at: NEVER,
            expire_at: NEVER,
            pending: SendQueue::default(),
            data: None,
            send: SendState::default(),
            subprotocol: None,
            pinged: false,
            linger: None,
            rare: None,
            fin_sent: false,
            peer_eof: false,
            born: 0,
            ip_counted: false,
            shed: false,
            admin: false,
            via_proxy: false,
            awaiting_proxy: false,
            read_paused: false,
        }
    }

    /// The final bytes of a connection ending with `linger` are all with the kernel. Returns
    /// whether it stays open to drain input. After a failure (protocol error, refused or timed
    /// out handshake, refused admission, a send refused over the backpressure limit) the peer
    /// may still be sending, and closing a socket with unread input makes the kernel send a
    /// reset instead of a FIN, discarding whatever of ours it has not transmitted yet: the
    /// close frame or HTTP response just written may never arrive. So shut down our side instead (FIN after the final bytes) and discard input
    /// until the peer's EOF or the deadline (a lingering close, as nginx does).
    pub(crate) fn half_close(&mut self) -> bool {
        let failed = matches!(
            self.linger,
            Some(
                CloseReason::Protocol(_)
                    | CloseReason::Rejected(_)
                    | CloseReason::HttpAnswered
                    | CloseReason::HandshakeTimeout
                    | CloseReason::Refused
                    | CloseReason::Backpressure
            )
        );
        if !failed || self.peer_eof {
            return false;
        }
        if !self.fin_sent {
            self.fin_sent = self.socket.shutdown(std::net::Shutdown::Write).is_ok();
        }
        self.fin_sent
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// The earliest deadline of any kind.
    fn next_deadline(&self) -> u64 {
        self.deadline.min(self.stall_at).min(self.expire_at)
    }
}

/// Counters the loop keeps; read through [`Ctx::stats`] or [`LoopHandle::stats`].
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
    /// rate limited.
    pub refused: [u64; 3],
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
    /// Bytes read from client sockets.
    pub bytes_received: u64,
    /// Bytes written to client sockets.
    pub bytes_sent: u64,
    /// Times a connection that sent faster than the loop reads had its reading put off to the
    /// next turn after four reads that filled the receive buffer, so that it could not hold
    /// the loop.
    pub read_yields: u64,
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
    /// [`Ctx::audit`]; 0: all accounted for).
    pub audit_difference: i64,
    /// Requests for `/metrics` or `/healthz` answered 429 because of
    /// [`Config::endpoint_rate`].
    pub endpoint_limited: u64,
    /// Application callbacks (or posted closures) that panicked.
    pub handler_panics: u64,
    /// Loop turns that ran longer than the stall threshold, as the watchdog saw them.
    pub stalls: u64,
    /// The longest stall the watchdog saw, in nanoseconds.
    pub longest_stall_ns: u64,
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

/// Everything the loop owns except the poll, the handler and the receive buffer, so that a
/// handler callback can borrow a connection, the cork and the handler at the same time.
pub(crate) struct Core<D> {
    pub(crate) registry: Registry,
    pub(crate) listeners: Vec<Option<TcpListener>>,
    pub(crate) conns: Slab<Conn<D>>,
    pub(crate) wheel: TimerWheel<TimerRef>,
    /// Output collected for `cork_owner` during the current dispatch.
    pub(crate) cork: Vec<u8>,
    pub(crate) cork_owner: Option<usize>,
    /// Connections to end once the current dispatch returns: (slab index, generation, reason).
    pub(crate) doomed: Vec<(usize, u32, CloseReason)>,
    /// Connections that used their read budget this turn, to read again next turn (slab index,
    /// generation).
    reread: Vec<(usize, u32)>,
    /// A ping was delivered during the current read: its connection may owe a pong.
    pong_due: bool,
    pub(crate) config: Config,
    /// Milliseconds of silence before the idle ping ([`ping_after`] of `config`).
    ping_after: u64,
    limits: handshake::Limits,
    start: Instant,
    /// What this loop shares with the other loops of its cluster (a ledger of one alone).
    pub(crate) ledger: Arc<Ledger>,
    /// This loop's index in the ledger.
    pub(crate) member: usize,
    /// When this loop next publishes its metrics snapshot to the ledger (clusters only), and the
    /// turn count it last published at.
    next_publish: u64,
    published_turns: u64,
    pub(crate) now: u64,
    pub(crate) next_gen: u32,
    pub(crate) stats: Stats,
    shutdown_at: Option<u64>,
    // --- admission and the fd budget
    /// Connections counted in the ledger's admission table (consistency check).
    pub(crate) ip_counted: u64,
    /// Refused connections being answered (in `conns`, not counted as admitted).
    pub(crate) shedding: usize,
    pub(crate) max_connections: usize,
    pub(crate) fd_budget: usize,
    /// Kept open to be released when accept fails with `EMFILE`.
    pub(crate) spare_fd: Option<File>,
    /// Descriptors of the poll and waker.
    fixed_fds: usize,
    started: bool,
    next_sweep: u64,
    // --- accepting
    pub(crate) accept_due: bool,
    /// Connections admitted in the current loop turn (see `Core::accept_from`).
    pub(crate) turn_admitted: usize,
    pub(crate) accept_paused: bool,
    pub(crate) paused_since: u64,
    pub(crate) backoff_ms: u64,
    pub(crate) accept_timer: Option<TimerKey>,
    /// Per log kind: when it was last logged (ms) and how many since were suppressed.
    pub(crate) log_throttle: [(u64, u64); crate::listener::LOG_SLOTS],
    /// Whether each listener serves only metrics and health (not WebSocket upgrades).
    pub(crate) listener_admin: Vec<bool>,
    /// The periodic fd audit's thread (loop 0 only), stopped at shutdown.
    auditor: Option<crate::audit::Auditor>,
    /// Token buckets of the operator endpoints (`/metrics`, `/healthz`): requests on the
    /// WebSocket listeners, and on the metrics listeners.
    endpoint_buckets: [crate::admission::Bucket; 2],
    /// The heartbeat the stall watchdog reads, if it runs.
    beat: Option<Arc<Heartbeat>>,
    /// Which origins may upgrade.
    origin: crate::origin::OriginPolicy,
    /// Proxies whose word on the client address is taken.
    pub(crate) trusted: crate::protocol::proxy::TrustedProxies,
}

/// A WebSocket server: listeners, connections and the handler, driven by [`Server::run`].
pub struct Server<H: Handler> {
    poll: Poll,
    events: Events,
    inner: Inner<H>,
    /// Stops its thread when the server is dropped.
    _watchdog: Option<Watchdog>,
}

struct Inner<H: Handler> {
    core: Core<H::Data>,
    handler: H,
    recv: Vec<u8>,
    shared: Arc<Shared<H>>,
    /// The commands taken from the queue, run by [`Inner::run_commands`] (kept for its
    /// capacity).
    batch: Vec<Command<H>>,
}

impl<H: Handler> Server<H> {
    /// A server with `config` and `handler`, listening nowhere yet. Fails on an invalid
    /// configuration (as `io::ErrorKind::InvalidInput`) or when epoll cannot be created.
    pub fn new(config: Config, handler: H) -> io::Result<Self> {
        let ledger = Arc::new(Ledger::new(1, &config));
        Self::member(config, handler, ledger, 0)
    }

    /// Loop `member` of the group sharing `ledger` (a [`Cluster`](crate::Cluster) sizes its
    /// budget with [`Server::join_budget`] before its first turn).
    pub(crate) fn member(
        config: Config,
        handler: H,
        ledger: Arc<Ledger>,
        member: usize,
    ) -> io::Result<Self> {
        config
            .validate()
            .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
        let before = sys::open_fds().unwrap_or(0);
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let registry = poll.registry().try_clone()?;
        let fixed_fds = sys::open_fds().unwrap_or(before + 3).saturating_sub(before);
        let limits = handshake::Limits {
            max_header_bytes: config.max_header_bytes,
            max_headers: config.max_headers,
        };
        let origin =
            crate::origin::OriginPolicy::new(&config.allowed_origins, config.allow_missing_origin)
                .map_err(|e| {
                    io::Error::new(
                        ErrorKind::InvalidInput,
                        format!("invalid allowed_origins: {e}"),
                    )
                })?;
        let watchdog = match config.stall_threshold.is_zero() {
            true => None,
            false => Some(Watchdog::start(config.stall_threshold)?),
        };
        let start = ledger.start;
        let shared = Arc::new(Shared::new(waker, &config));
        let server = Server {
            events: Events::with_capacity(config.events_capacity),
            inner: Inner {
                recv: vec![0; config.recv_buffer_size],
                core: Core {
                    registry,
                    listeners: Vec::new(),
                    conns: Slab::new(),
                    wheel: TimerWheel::new(0),
                    cork: Vec::new(),
                    cork_owner: None,
                    doomed: Vec::new(),
                    reread: Vec::new(),
                    pong_due: false,
                    limits,
                    start,
                    ledger,
                    member,
                    next_publish: 0,
                    published_turns: 0,
                    now: 0,
                    next_gen: 0,
                    stats: Stats::default(),
                    shutdown_at: None,
                    ip_counted: 0,
                    shedding: 0,
                    max_connections: 0,
                    fd_budget: 0,
                    // Kept open to be released when accept fails with `EMFILE`.
                    spare_fd: File::open("/dev/null").ok(),
                    fixed_fds,
                    started: false,
                    next_sweep: SWEEP_MS,
                    accept_due: false,
                    turn_admitted: 0,
                    accept_paused: false,
                    paused_since: 0,
                    backoff_ms: 0,
                    accept_timer: None,
                    log_throttle: [(0, 0); crate::listener::LOG_SLOTS],
                    listener_admin: Vec::new(),
                    auditor: None,
                    endpoint_buckets: [crate::admission::Bucket::full(config.endpoint_rate, 0); 2],
                    beat: watchdog.as_ref().map(|w| w.beat.clone()),
                    origin,
                    trusted: crate::protocol::proxy::TrustedProxies::parse(&config.trusted_proxies)
                        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?,

                    ping_after: ping_after(&config),
                    config,
                },
                handler,
                shared,
                batch: Vec::new(),
            },
            poll,
            _watchdog: watchdog,
        };
        server.inner.core.fds_changed();
        Ok(server)
    }

    /// Listen on `addr` (IPv4 or IPv6; port 0 picks a free port) and return the bound address.
    /// The backlog is [`Config::listen_backlog`], capped by `net.core.somaxconn`.
    /// Besides WebSocket upgrades it answers `GET /metrics` and `GET /healthz` when
    /// [`Config::serve_metrics`] is set.
    pub fn listen(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        self.add_listener(addr, false, false)
    }

    /// [`Server::listen`], with `SO_REUSEPORT` when `reuse_port` (a cluster's loops).
    pub(crate) fn listen_with(
        &mut self,
        addr: SocketAddr,
        reuse_port: bool,
    ) -> io::Result<SocketAddr> {
        self.add_listener(addr, false, reuse_port)
    }

    /// Listen on `addr` for `GET /metrics` and `GET /healthz` only (an address for operators,
    /// apart from the WebSocket port); everything else gets 404. Returns the bound address.
    pub fn listen_metrics(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        self.add_listener(addr, true, false)
    }

    fn add_listener(
        &mut self,
        addr: SocketAddr,
        admin: bool,
        reuse_port: bool,
    ) -> io::Result<SocketAddr> {
        let core = &mut self.inner.core;
        let i = core.listeners.len();
        if i >= MAX_LISTENERS {
            return Err(io::Error::other("too many listeners"));
        }
        let mut listener = crate::listener::bind(addr, core.config.listen_backlog, reuse_port)?;
        let bound = listener.local_addr()?;
        self.poll
            .registry()
            .register(&mut listener, Token(i), Interest::READABLE)?;
        core.listeners.push(Some(listener));
        core.listener_admin.push(admin);
        core.accept_due = true;
        core.fds_changed();
        Ok(bound)
    }

    /// A handle for other threads (and for the loop's own callbacks) to reach this server.
    pub fn handle(&self) -> LoopHandle<H> {
        LoopHandle::new(self.inner.shared.clone())
    }

    /// The handler, for inspection between turns.
    pub fn handler(&self) -> &H {
        &self.inner.handler
    }

    /// The loop's counters.
    pub fn stats(&self) -> Stats {
        self.inner.core.stats()
    }

    /// Descriptors open in the process beyond those the loop accounts for (see
    /// [`Ctx::audit`]). Zero when nothing leaks.
    pub fn audit(&mut self) -> io::Result<i64> {
        self.inner.core.audit()
    }

    /// The metrics in Prometheus text format, as `GET /metrics` serves them.
    pub fn metrics(&self) -> String {
        self.inner.core.render_metrics()
    }

    /// A cluster's loop: take its share of the fd budget (see [`Core::join_budget`]).
    pub(crate) fn join_budget(&mut self, budget: usize, max_connections: usize) {
        self.inner.core.join_budget(budget, max_connections);
    }

    /// Run until shut down (through [`LoopHandle::shutdown`]) and every connection has ended.
    /// Fails at once if the configuration does not fit the process's descriptor limit.
    pub fn run(mut self) -> io::Result<()> {
        while self.turn(None)? {}
        Ok(())
    }

    /// One round: wait for readiness up to `timeout` (and no longer than the next timer),
    /// dispatch every event, fire due timers. Returns false once the server has shut down and
    /// every connection has ended. The first call sizes the fd budget (and may fail, as `run`).
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        // Callbacks and posted closures run on this thread until the turn returns: a query from
        // them would wait for itself (see `LoopHandle::query`).
        let _on_loop = self.inner.shared.enter();
        let more = self.turn_inner(timeout)?;
        if !more {
            // Ended: queries and commands get their answer (None, Closed) at once from now on.
            self.inner.shared.close();
        }
        Ok(more)
    }

    fn turn_inner(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        let core = &mut self.inner.core;
        if !core.started {
            core.start_up()?;
        }
        if core.shutdown_at.is_some() && core.conns.is_empty() {
            return Ok(false);
        }
        let timer_wait = core
            .wheel
            .next_expiration()
            .into_iter()
            .chain(core.shutdown_at)
            .min()
            .map(|t| Duration::from_millis(t.saturating_sub(core.now)));
        let mut wait = match (timeout, timer_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if core.accept_due || !core.reread.is_empty() {
            wait = Some(Duration::ZERO);
        }
        if core.ledger.loops() > 1 && core.stats.loop_turns != core.published_turns {
            // Publish what changed soon, even if nothing else wakes this loop.
            let due = Duration::from_millis(core.next_publish.saturating_sub(core.now));
            wait = Some(wait.map_or(due, |w| w.min(due)));
        }
        if let Err(e) = self.poll.poll(&mut self.events, wait) {
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let busy = Instant::now();
        if let Some(b) = &self.inner.core.beat {
            b.turn_start();
        }
        self.inner.core.tick();
        if !self.inner.core.reread.is_empty() {
            self.inner.reread();
        }
        for event in self.events.iter() {
            self.inner.dispatch(event);
        }
        self.inner.fire_timers();
        let core = &mut self.inner.core;
        if core.accept_due && core.shutdown_at.is_none() {
            core.accept_all();
            core.reap(&mut self.inner.handler);
        }
        crate::metrics::observe_turn(&mut core.stats, busy.elapsed().as_nanos() as u64);
        let more = !(core.shutdown_at.is_some() && core.conns.is_empty());
        if core.ledger.loops() > 1 && (core.now >= core.next_publish || !more) {
            core.publish();
        }
        if let Some(b) = &core.beat {
            b.turn_end();
        }
        Ok(more)
    }
}

impl<H: Handler> Inner<H> {
    fn dispatch(&mut self, event: &mio::event::Event) {
        let token = event.token().0;
        if token == WAKER.0 {
            self.run_commands();
        } else if token < MAX_LISTENERS {
            // Accept at the end of the turn, once this turn's events and timers have freed
            // what they free: a slot held by a client that already left is not a full server.
            self.core.accept_due = true;
        } else {
            let (idx, gen) = slot_of(token as u64);
            if !self.core.alive(idx, gen) {
                return;
            }
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                self.readable(idx, event.is_read_closed() || event.is_error());
            }
            if event.is_writable() && self.core.alive(idx, gen) {
                self.writable(idx);
            }
        }
        self.core.flush_cork();
        self.core.reap(&mut self.handler);
    }

    /// Read until the socket is drained (or [`READ_BUDGET`] reads filled the buffer: then the
    /// rest is read next turn), feeding the session; then write the pong owed for the pings
    /// read, if nothing is queued ([`Core::write_owed_pong`]).
    #[inline(always)]
    fn readable(&mut self, idx: usize, closed: bool) {
        let live = self.read_some(idx, closed);
        if std::mem::take(&mut self.core.pong_due) && live {
            self.core.write_owed_pong(idx);
        }
    }

    /// The reads of [`Inner::readable`]. Returns false if the connection ended or is ending.
    #[inline(always)]
    fn read_some(&mut self, idx: usize, closed: bool) -> bool {
        let limit = self.core.config.max_backpressure;
        for _ in 0..READ_BUDGET {
            let conn = &mut self.core.conns[idx];
            let queued = !conn.pending.is_empty() || self.core.cork.len() > limit;
            if conn.read_paused || (queued && self.over_limit(idx)) {
                return true;
            }
            let conn = &mut self.core.conns[idx];
            let n = match (&conn.socket).read(&mut self.recv) {
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
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    let reason = conn.linger.unwrap_or(match e.kind() {
                        ErrorKind::ConnectionReset => CloseReason::Abnormal,
                        _ => CloseReason::IoError,
                    });
                    self.core.end(&mut self.handler, idx, reason);
                    return false;
                }
            };
            self.core.stats.bytes_received += n as u64;
            if !self.received(idx, n) {
                return false;
            }
            if n < self.recv.len() && !closed {
                return true;
            }
        }
        // The peer sends faster than the loop reads: let the other connections have their turn
        // and read the rest next turn (no new edge will come for bytes already there).
        let gen = self.core.conns[idx].gen;
        self.core.reread.push((idx, gen));
        self.core.stats.read_yields += 1;
        true
    }

    /// Read the connections whose read budget ran out last turn.
    fn reread(&mut self) {
        for (idx, gen) in std::mem::take(&mut self.core.reread) {
            if self.core.alive(idx, gen) {
                self.readable(idx, true);
                self.core.flush_cork();
                self.core.reap(&mut self.handler);
            }
        }
    }

    /// Before a read, when bytes are queued: if more than `max_backpressure` are queued for the
    /// connection once the cork has been offered to the socket, stop reading it (its answers
    /// would only queue more) until `writable` has drained the queue to half the limit.
    /// Returns true when reading must stop (paused, or the write failed).
    #[inline(never)]
    fn over_limit(&mut self, idx: usize) -> bool {
        let core = &mut self.core;
        let limit = core.config.max_backpressure;
        let corked = match core.cork_owner {
            Some(owner) if owner == idx => core.cork.len(),
            _ => 0,
        };
        if core.conns[idx].pending.len() + corked <= limit {
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
    fn received(&mut self, idx: usize, n: usize) -> bool {
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

    /// A connection from a trusted proxy starts with a PROXY header: read it, take the client
    /// address it reports, apply the per-address limits to that client, and hand what follows
    /// it to the handshake.
    fn proxy_header(&mut self, idx: usize, n: usize) -> bool {
        use crate::protocol::proxy::{parse_proxy, ProxyHeader};
        let Inner {
            core,
            handler,
            recv,
            ..
        } = self;
        let conn = &mut core.conns[idx];
        let buffered = conn
            .rare
            .as_ref()
            .is_some_and(|r| !r.proxy_partial.is_empty());
        let parsed = if buffered {
            let partial = &mut conn.rare().proxy_partial;
            partial.extend_from_slice(&recv[..n]);
            parse_proxy(partial)
        } else {
            parse_proxy(&recv[..n])
        };
        let (len, source) = match parsed {
            Ok(ProxyHeader::Partial) => {
                if !buffered {
                    conn.rare().proxy_partial = recv[..n].to_vec();
                }
                return true;
            }
            Ok(ProxyHeader::Complete { len, source }) => (len, source),
            Err(e) => {
                log::debug!(
                    "{} from {}: {e}",
                    conn_id(core.member, idx, conn.gen),
                    conn.peer
                );
                core.cork_for(idx);
                let rej = Rejection::custom(400, "bad PROXY protocol header");
                handshake::write_rejection(&mut core.cork, &rej);
                return reject(core, handler, idx, 400);
            }
        };
        // What follows the header goes where the handshake reads it: the receive buffer. It is
        // never longer than this read (the header is longer than its buffered start).
        let rest = if buffered {
            let partial = std::mem::take(&mut conn.rare().proxy_partial);
            let rest = &partial[len..];
            recv[..rest.len()].copy_from_slice(rest);
            rest.len()
        } else {
            recv.copy_within(len..n, 0);
            n - len
        };
        conn.awaiting_proxy = false;
        // A header that names no client (v1 UNKNOWN, v2 LOCAL) leaves the proxy's own address
        // as the key: never unaccounted.
        if let Some(client) = source {
            conn.peer = client;
        }
        let (total, now, ip) = (&mut core.ip_counted, core.now, conn.peer.ip());
        if let Err(verdict) = admit_client(&core.ledger, total, now, ip, &mut conn.ip_counted) {
            return core.refuse_client(handler, idx, verdict);
        }
        rest == 0 || self.handshake(idx, rest)
    }

    fn handshake(&mut self, idx: usize, n: usize) -> bool {
        let Inner {
            core,
            handler,
            recv,
            ..
        } = self;
        core.cork_for(idx);
        let conn = &mut core.conns[idx];
        let (head_len, buffered, data, subprotocol) = match conn
            .session
            .feed_head(&recv[..n], &core.limits)
        {
            Ok(Head::Partial) => return true,
            Err(rej) => {
                handshake::write_rejection(&mut core.cork, &rej);
                return reject(core, handler, idx, rej.status());
            }
            Ok(Head::Complete {
                request,
                head_len,
                buffered,
            }) => {
                let admin = conn.admin;
                if admin || !request.is_upgrade() {
                    let route = Route::of(request.method(), request.path());
                    return core.answer_http(handler, idx, route, admin);
                }
                if conn.via_proxy && !core.config.proxy_protocol {
                    // Only the header the proxy sets: it passes the other on as the client wrote it.
                    let kind = core.config.forwarded_header;
                    let name = match kind {
                        crate::config::ForwardedHeader::XForwardedFor => "x-forwarded-for",
                        crate::config::ForwardedHeader::Forwarded => "forwarded",
                    };
                    let values: Vec<&[u8]> = request.header_all(name).collect();
                    let trusted = &core.trusted;
                    let proxy = conn.peer.ip();
                    let key = crate::protocol::proxy::forwarded_key(proxy, kind, &values, |ip| {
                        trusted.contains(ip)
                    });
                    if key != proxy {
                        conn.peer = SocketAddr::new(key, 0);
                    }
                    let (total, now) = (&mut core.ip_counted, core.now);
                    let counted = &mut conn.ip_counted;
                    if let Err(verdict) = admit_client(&core.ledger, total, now, key, counted) {
                        return core.refuse_client(handler, idx, verdict);
                    }
                }
                let upgrade = match handshake::validate_upgrade(&request) {
                    Ok(u) => u,
                    Err(rej) => {
                        handshake::write_rejection(&mut core.cork, &rej);
                        return reject(core, handler, idx, rej.status());
                    }
                };
                if let Err(refusal) = core.origin.check(upgrade.origin()) {
                    log::debug!("{}: {refusal}", conn.peer);
                    let rej = Rejection::custom(403, refusal.reason());
                    handshake::write_rejection(&mut core.cork, &rej);
                    return reject(core, handler, idx, 403);
                }
                let req = UpgradeRequest {
                    upgrade,
                    peer: conn.peer,
                };
                let id = conn_id(core.member, idx, conn.gen);
                let decision = guarded(
                    core.config.catch_panics,
                    &core.beat,
                    Activity::Upgrade,
                    id,
                    || handler.upgrade(&req),
                );
                let Some(decision) = decision else {
                    log::error!(
                        "upgrade hook panicked on a request from {}: answering 500",
                        req.peer
                    );
                    core.stats.handler_panics += 1;
                    let rej = Rejection::custom(500, "internal server error");
                    handshake::write_rejection(&mut core.cork, &rej);
                    return reject(core, handler, idx, 500);
                };
                match decision {
                    Decision::Reject { status, reason } => {
                        let rej = Rejection::custom(status, reason);
                        handshake::write_rejection(&mut core.cork, &rej);
                        return reject(core, handler, idx, rej.status());
                    }
                    Decision::Accept { data, subprotocol } => {
                        if let Some(p) = subprotocol.as_deref() {
                            if !req.subprotocols().any(|o| o == p) {
                                log::error!("upgrade hook chose subprotocol {p:?}, which the client did not offer");
                                let rej = Rejection::custom(
                                    500,
                                    "server chose a subprotocol the client did not offer",
                                );
                                handshake::write_rejection(&mut core.cork, &rej);
                                return reject(core, handler, idx, 500);
                            }
                        }
                        handshake::write_accept(
                            &mut core.cork,
                            req.upgrade.key(),
                            subprotocol.as_deref(),
                        );
                        (head_len, buffered, data, subprotocol)
                    }
                }
            }
        };
        let rest = conn.session.finish_handshake(head_len, buffered);
        conn.data = Some(data);
        conn.subprotocol = subprotocol.map(String::into_boxed_str);
        conn.deadline = core.now.saturating_add(core.ping_after);
        let lifetime = Core::<H::Data>::ms(core.config.max_lifetime);
        if lifetime > 0 {
            conn.expire_at = core.now + lifetime;
        }
        core.rearm(idx);
        let conn = &core.conns[idx];
        log::debug!(
            "{} open from {}",
            conn_id(core.member, idx, conn.gen),
            conn.peer
        );
        // Frames may follow in this read: their answers should share the cork's one `send`.
        let last = false;
        if !callback(core, handler, idx, Activity::Open, last, |h, ws| {
            h.on_open(ws)
        }) {
            return false;
        }
        if buffered {
            let mut rest = rest;
            frames(core, handler, idx, &mut rest)
        } else {
            frames(core, handler, idx, &mut recv[head_len..n])
        }
    }

    fn writable(&mut self, idx: usize) {
        let core = &mut self.core;
        let conn = &mut core.conns[idx];
        if conn.pending.is_empty() {
            return;
        }
        let n = match write_some(&conn.socket, conn.pending.bytes()) {
            Ok(n) => n,
            Err(e) => {
                let reason = conn.linger.unwrap_or(write_error_reason(&e));
                core.end(&mut self.handler, idx, reason);
                return;
            }
        };
        core.stats.bytes_sent += n as u64;
        conn.pending.consume(n);
        let resume = conn.read_paused && conn.pending.len() <= core.config.max_backpressure / 2;
        if resume {
            conn.read_paused = false;
        }
        if conn.pending.is_empty() {
            conn.stall_at = NEVER;
            if let Some(reason) = conn.linger {
                if !conn.half_close() {
                    core.end(&mut self.handler, idx, reason);
                }
                return;
            }
        } else if n > 0 && !conn.read_paused {
            // Progress moves the stall deadline; not while the queue is over the limit, which
            // must drain to half of it within one write-stall timeout however much each write
            // takes (a slow but steady reader cannot hold a full queue for ever).
            conn.stall_at = core.now + Core::<H::Data>::ms(core.config.write_stall_timeout);
            core.rearm(idx);
        }
        if resume {
            // Input that arrived while paused raised no edge of its own: read it now.
            let gen = core.conns[idx].gen;
            self.readable(idx, true);
            if !self.core.alive(idx, gen) || self.core.doomed.iter().any(|d| d.0 == idx) {
                return;
            }
        }
        let Inner { core, handler, .. } = self;
        let conn = &mut core.conns[idx];
        if conn.pending.is_empty() && conn.data.is_some() && conn.session.state() == State::Open {
            // A pong owed while bytes were queued goes out now, before anything `on_drain` sends.
            core.write_owed_pong(idx);
            // The cork is flushed right after: a direct write adds no system call.
            callback(core, handler, idx, Activity::Drain, true, |h, ws| {
                h.on_drain(ws)
            });
        }
    }

    fn fire_timers(&mut self) {
        let Inner { core, handler, .. } = self;
        if let Some(at) = core.shutdown_at {
            if core.now >= at {
                let all: Vec<usize> = core.conns.iter().map(|(i, _)| i).collect();
                for idx in all {
                    core.end(handler, idx, CloseReason::Shutdown);
                }
            }
        }
        if core.now >= core.next_sweep {
            core.ledger.admission().sweep(core.now);
            core.next_sweep = core.now + SWEEP_MS;
        }
        while let Some((_, TimerRef { idx, gen })) = core.wheel.poll(core.now) {
            if idx == ACCEPT_TIMER {
                core.accept_timer_fired();
                continue;
            }
            let idx = idx as usize;
            if !core.alive(idx, gen) {
                continue;
            }
            core.conns[idx].timer = None;
            core.timer_fired(handler, idx);
            core.flush_cork();
            core.reap(handler);
            if core.alive(idx, gen) {
                core.rearm(idx);
            }
        }
    }

    /// Run every command queued so far, in order; then free their room in the queue.
    fn run_commands(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        self.shared.take(&mut batch);
        let (mut count, mut bytes) = (0, 0);
        for cmd in batch.drain(..) {
            if let Some(b) = cmd.cost() {
                count += 1;
                bytes += b;
            }
            let Inner { core, handler, .. } = self;
            match cmd {
                Command::Send(id, msg) => {
                    // Flushed right after: a large message may go out without a copy.
                    let mut ctx = Ctx { core };
                    match &msg {
                        OwnedMessage::Text(s) => ctx.send_as(id, Message::Text(s), true),
                        OwnedMessage::Binary(b) => ctx.send_as(id, Message::Binary(b), true),
                    };
                }
                Command::Close(id, code, reason) => {
                    Ctx { core }.close(id, code, &reason);
                }
                Command::Terminate(id) => Ctx { core }.terminate(id),
                Command::Post(f) | Command::Query(f) => {
                    let beat = core.beat.clone();
                    let catch = core.config.catch_panics;
                    let id = ConnId(0);
                    let mut ctx = Ctx { core };
                    if guarded(catch, &beat, Activity::Posted, id, || f(handler, &mut ctx))
                        .is_none()
                    {
                        log::error!("a posted closure panicked");
                        self.core.stats.handler_panics += 1;
                    }
                }
                Command::Shutdown => core.begin_shutdown(handler),
            }
            self.core.flush_cork();
            self.core.reap(&mut self.handler);
        }
        // Keep a small batch's buffer for the next one; give a burst's back.
        if batch.capacity() <= BATCH_KEEP {
            self.batch = batch;
        }
        self.shared.release(count, bytes);
    }
}

/// Run one handler callback for the open connection `idx` with a [`WebSocket`] view, then apply
/// what it asked for (close, terminate). `last`: the cork is flushed right after the callback
/// (see [`Out::new`]). Returns false if the connection is ending.
fn callback<H: Handler>(
    core: &mut Core<H::Data>,
    handler: &mut H,
    idx: usize,
    kind: Activity,
    last: bool,
    f: impl FnOnce(&mut H, &mut WebSocket<'_, H::Data>),
) -> bool {
    core.cork_for(idx);
    let conn = &mut core.conns[idx];
    let Some(data) = conn.data.as_mut() else {
        return false;
    };
    let mut ws = WebSocket {
        id: conn_id(core.member, idx, conn.gen),
        peer: conn.peer,
        data,
        send: &mut conn.send,
        out: Out::new(
            &mut core.cork,
            &conn.socket,
            &mut conn.pending,
            &mut core.stats,
            last,
        ),
        subprotocol: conn.subprotocol.as_deref(),
        max_backpressure: core.config.max_backpressure,
        policy: core.config.backpressure_policy,
    };
    let id = ws.id;
    let done = guarded(core.config.catch_panics, &core.beat, kind, id, || {
        f(handler, &mut ws)
    });
    let direct = ws.out.direct;
    let live = core.settle(idx, direct);
    if done.is_none() {
        return handler_panicked(core, handler, idx, kind);
    }
    live && after_callback(core, handler, idx)
}

/// Run application code, reporting it to the stall watchdog, and (unless configured
/// otherwise) catching a panic: `None` when it panicked.
fn guarded<R>(
    catch: bool,
    beat: &Option<Arc<Heartbeat>>,
    kind: Activity,
    id: ConnId,
    f: impl FnOnce() -> R,
) -> Option<R> {
    if let Some(b) = beat {
        b.running(kind, id.0);
    }
    let r = match catch {
        true => catch_unwind(AssertUnwindSafe(f)).ok(),
        false => Some(f()),
    };
    if let Some(b) = beat {
        b.running(Activity::Loop, 0);
    }
    r
}

/// A callback for open connection `idx` panicked: count it, and close the connection with 1011
/// through the close path; the loop goes on serving everyone else. Returns false.
fn handler_panicked<H: Handler>(
    core: &mut Core<H::Data>,
    handler: &mut H,
    idx: usize,
    kind: Activity,
) -> bool {
    core.stats.handler_panics += 1;
    let conn = &mut core.conns[idx];
    log::error!(
        "{} from {}: {} panicked; closing the connection with 1011",
        conn_id(core.member, idx, conn.gen),
        conn.peer,
        kind.label()
    );
    core.cork_for(idx);
    let conn = &mut core.conns[idx];
    let error = crate::protocol::session::ProtocolError {
        code: CloseCode::INTERNAL_ERROR,
        reason: "internal server error",
    };
    conn.session.fail(error, &mut core.cork);
    core.finish(handler, idx, CloseReason::HandlerPanic);
    false
}

/// Apply a close or terminate that a callback requested. Returns false if the connection ended
/// or is closing.
fn after_callback<H: Handler>(core: &mut Core<H::Data>, handler: &mut H, idx: usize) -> bool {
    let conn = &mut core.conns[idx];
    if conn.send.terminate {
        core.end(handler, idx, CloseReason::Terminated);
        return false;
    }
    if let Some(req) = conn.send.close_req.take() {
        let (code, reason) = *req;
        core.start_close(idx, code, &reason);
        if core.conns[idx].send.cause == Some(CloseReason::Backpressure) {
            // The client does not read: waiting for its close reply is pointless.
            core.finish(handler, idx, CloseReason::Backpressure);
            return false;
        }
    }
    true
}

/// Feed frame bytes to an open connection's session and dispatch its events.
/// Returns false if the connection ended or is ending.
fn frames<H: Handler>(
    core: &mut Core<H::Data>,
    handler: &mut H,
    idx: usize,
    buf: &mut [u8],
) -> bool {
    core.cork_for(idx);
    let max = core.config.max_message_size;
    let mut off = 0;
    let len = buf.len();
    while off < len {
        let conn = &mut core.conns[idx];
        let (used, event) = match conn.session.read(&mut buf[off..], max, &mut core.cork) {
            Ok(r) => r,
            Err(e) => {
                log::debug!(
                    "{} protocol error from {}: {e}",
                    conn_id(core.member, idx, conn.gen),
                    conn.peer
                );
                core.finish(handler, idx, CloseReason::Protocol(e.code));
                return false;
            }
        };
        off += used;
        let Some(event) = event else { continue };
        // The last message of this read: its answer is flushed once this returns, so a direct
        // write adds no system call. Answers to earlier ones share the cork's one `send`.
        let last = off == len;
        let Some(data) = conn.data.as_mut() else {
            return false;
        };
        let id = conn_id(core.member, idx, conn.gen);
        if matches!(event, Event::Text(_) | Event::Binary(_)) {
            core.stats.messages_received += 1;
        }
        let mut ws = WebSocket {
            id,
            peer: conn.peer,
            data,
            send: &mut conn.send,
            out: Out::new(
                &mut core.cork,
                &conn.socket,
                &mut conn.pending,
                &mut core.stats,
                last,
            ),
            subprotocol: conn.subprotocol.as_deref(),
            max_backpressure: core.config.max_backpressure,
            policy: core.config.backpressure_policy,
        };
        let (catch, beat) = (core.config.catch_panics, &core.beat);
        let (kind, done) = match event {
            Event::Text(s) => {
                let f = || handler.on_message(&mut ws, Message::Text(s));
                (
                    Activity::Message,
                    guarded(catch, beat, Activity::Message, id, f),
                )
            }
            Event::Binary(b) => {
                let f = || handler.on_message(&mut ws, Message::Binary(b));
                (
                    Activity::Message,
                    guarded(catch, beat, Activity::Message, id, f),
                )
            }
            Event::Ping(p) => {
                core.pong_due = true;
                let f = || handler.on_ping(&mut ws, p);
                (
                    Activity::PingPong,
                    guarded(catch, beat, Activity::PingPong, id, f),
                )
            }
            Event::Pong(p) => {
                let f = || handler.on_pong(&mut ws, p);
                (
                    Activity::PingPong,
                    guarded(catch, beat, Activity::PingPong, id, f),
                )
            }
            Event::Close { code, reason } => {
                let ours = ws.send.sealed;
                let cause = ws.send.cause;
                conn.rare().peer_close = Some((code, reason.into()));
                let reason = match (ours, cause) {
                    (true, Some(cause)) => cause,
                    (true, None) => CloseReason::ClosedByServer,
                    (false, _) => CloseReason::PeerClosed,
                };
                core.finish(handler, idx, reason);
                return false;
            }
        };
        let direct = ws.out.direct;
        let live = core.settle(idx, direct);
        if done.is_none() {
            return handler_panicked(core, handler, idx, kind);
        }
        if !live || !after_callback(core, handler, idx) {
            return false;
        }
        // The backpressure limit counts the cork, so a burst of messages read in one dispatch
        // must not pile its answers up there: what the socket takes at once is no slow
        // reader's backlog. Offer a cork that reached the limit to the socket now.
        if core.cork.len() >= core.config.max_backpressure.min(CORK_KEEP) {
            core.flush_cork();
            if core.doomed.iter().any(|d| d.0 == idx) {
                return false; // the write failed; `reap` ends it
            }
            core.cork_for(idx);
        }
    }
    core.conns[idx].session.reclaim();
    true
}

/// Count a connection from a trusted proxy against the per-address limits, under the address
/// it now has (the client the proxy named, or the proxy's own): counted, or refused and why.
fn admit_client(
    ledger: &Ledger,
    total: &mut u64,
    now: u64,
    ip: std::net::IpAddr,
    counted: &mut bool,
) -> Result<(), crate::admission::Verdict> {
    *counted = ledger.admission().admit_address(ip, now)?;
    *total += *counted as u64;
    Ok(())
}

/// Answer a refused request (the response is in the cork) and end the connection.
fn reject<H: Handler>(core: &mut Core<H::Data>, handler: &mut H, idx: usize, status: u16) -> bool {
    let conn = &mut core.conns[idx];
    let peer = conn.peer;
    log::debug!(
        "{} from {peer} rejected with {status}",
        conn_id(core.member, idx, conn.gen)
    );
    conn.session.finish_rejected();
    if let Some(more) = core.throttle(crate::listener::LOG_REJECTS, 1) {
        log::info!("rejecting handshakes: {status} to {peer} ({more} more since the last report)");
    }
    core.stats.rejected_status[crate::metrics::status_index(status)] += 1;
    core.finish(handler, idx, CloseReason::Rejected(status));
    false
}

/// Milliseconds of silence before the idle ping (half the idle timeout); NEVER when off.
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

fn ping_after(config: &Config) -> u64 {
    match Core::<()>::ms(config.idle_timeout) {
        0 => NEVER,
        idle => idle.div_ceil(2),
    }
}

/// The plain HTTP requests the loop answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Metrics,
    Health,
    Other,
}

impl Route {
    fn of(method: &str, path: &str) -> Route {
        match (method, path) {
            ("GET", "/metrics") => Route::Metrics,
            ("GET", "/healthz") => Route::Health,
            _ => Route::Other,
        }
    }
}

/// A connection's id and token: its generation in the upper 32 bits, its loop's index in the
/// next 8 and its slab index in the low 24 (a loop never holds 2^24 connections: see
/// [`MAX_SLOTS`]), so ids are unique across the loops of a cluster.
pub(crate) fn conn_id(member: usize, idx: usize, gen: u32) -> ConnId {
    ConnId(((gen as u64) << 32) | ((member as u64) << 24) | idx as u64)
}

/// The slab index and generation in a connection's token or id.
pub(crate) fn slot_of(id: u64) -> (usize, u32) {
    ((id & 0xff_ffff) as usize, (id >> 32) as u32)
}

impl<D> Core<D> {
    fn tick(&mut self) {
        self.turn_admitted = 0;
        self.now = self.start.elapsed().as_millis() as u64;
    }

    /// Size the fd budget (once, before the first poll): raise the soft limit if configured,
    /// and derive or check `max_connections`.
    fn start_up(&mut self) -> io::Result<()> {
        if self.config.raise_fd_limit {
            raise_fd_limit();
        }
        let (soft, _) = sys::nofile_limit()?;
        let in_use = sys::open_fds()?;
        self.ledger.set_base(in_use);
        let headroom = self.config.fd_headroom;
        let (budget, max) = plan_budget(soft, in_use, headroom, self.config.max_connections, 1)
            .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?[0];
        let summary = crate::cluster::Budget {
            fd_budget: budget,
            max_connections: max,
            fd_limit: soft,
            open: in_use,
            headroom,
            loops: 1,
        };
        log::info!("{summary}");
        self.join_budget(budget, max);
        Ok(())
    }

    /// Take `budget` descriptors for connections and `max_connections`, and start.
    pub(crate) fn join_budget(&mut self, budget: usize, max_connections: usize) {
        self.started = true;
        self.fd_budget = budget;
        self.max_connections = max_connections;
        // One audit per process, on a thread of its own: loop 0's.
        let every = self.config.audit_interval;
        if self.member == 0 && !every.is_zero() && self.auditor.is_none() {
            match crate::audit::Auditor::start(self.ledger.clone(), every) {
                Ok(a) => self.auditor = Some(a),
                Err(e) => log::warn!("cannot start the fd audit thread: {e}; no periodic audit"),
            }
        }
        if self.ledger.loops() > 1 {
            self.publish();
        }
    }

    /// Store this loop's descriptor count in the ledger: after opening one, before closing one
    /// (see [`Ledger`]).
    pub(crate) fn fds_changed(&self) {
        self.ledger.set_owned(self.member, self.owned_fds());
    }

    /// Publish this loop's snapshot for the other loops of its cluster to render.
    fn publish(&mut self) {
        self.ledger.publish(self.member, self.snapshot());
        self.published_turns = self.stats.loop_turns;
        self.next_publish = self.now + PUBLISH_MS;
    }

    pub(crate) fn stats(&self) -> Stats {
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
            ..self.stats.clone()
        }
    }

    /// Answer a client that the per-address limits refused, once a trusted proxy named it
    /// (503 or 429), and end the connection.
    fn refuse_client<H: Handler<Data = D>>(
        &mut self,
        handler: &mut H,
        idx: usize,
        verdict: crate::admission::Verdict,
    ) -> bool {
        self.stats.refused[verdict.index()] += 1;
        self.cork_for(idx);
        self.cork
            .extend_from_slice(&crate::listener::refusal(verdict));
        self.conns[idx].session.finish_rejected();
        self.finish(handler, idx, CloseReason::Refused);
        false
    }

    /// Answer a plain HTTP request (metrics or health, within the endpoints' rate, else 429; or
    /// an error) and end the connection.
    fn answer_http<H: Handler<Data = D>>(
        &mut self,
        handler: &mut H,
        idx: usize,
        route: Route,
        admin: bool,
    ) -> bool {
        let serve = admin || self.config.serve_metrics;
        let endpoint = serve && route != Route::Other;
        let (rate, bucket) = (
            self.config.endpoint_rate,
            &mut self.endpoint_buckets[admin as usize],
        );
        let limited = endpoint && rate > 0 && !bucket.take(self.now, rate, rate);
        match route {
            _ if limited => {
                self.stats.endpoint_limited += 1;
                self.stats.rejected_status[crate::metrics::status_index(429)] += 1;
                handshake::write_response(
                    &mut self.cork,
                    429,
                    "",
                    &[("Retry-After", "1")],
                    b"too many requests for /metrics and /healthz\n",
                );
            }
            Route::Metrics if serve => {
                let body = self.render_metrics();
                handshake::write_response(
                    &mut self.cork,
                    200,
                    "OK",
                    &[("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                    body.as_bytes(),
                );
            }
            Route::Health if serve => match self.health() {
                crate::metrics::Health::Ok => {
                    handshake::write_response(&mut self.cork, 200, "OK", &[], b"ok\n")
                }
                crate::metrics::Health::Unhealthy(why) => {
                    let body = format!("{why}\n");
                    handshake::write_response(&mut self.cork, 503, "", &[], body.as_bytes())
                }
            },
            _ if admin => {
                self.stats.rejected_status[crate::metrics::status_index(404)] += 1;
                handshake::write_response(&mut self.cork, 404, "", &[], b"not found\n");
            }
            _ => {
                self.stats.rejected_status[crate::metrics::status_index(426)] += 1;
                handshake::write_response(
                    &mut self.cork,
                    426,
                    "",
                    &[("Upgrade", "websocket")],
                    b"this is a WebSocket endpoint\n",
                );
            }
        }
        self.conns[idx].session.finish_rejected();
        self.finish(handler, idx, CloseReason::HttpAnswered);
        false
    }

    /// Descriptors the loop owns.
    pub(crate) fn owned_fds(&self) -> usize {
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
    pub(crate) fn audit(&mut self) -> io::Result<i64> {
        // No undisturbed reading (other loops opening and closing all along): the last result.
        Ok(self.ledger.audit()?.unwrap_or(self.ledger.last_audit().1))
    }

    pub(crate) fn alive(&self, idx: usize, gen: u32) -> bool {
        self.conns.get(idx).is_some_and(|c| c.gen == gen)
    }

    /// `d` in the wheel's milliseconds, rounded up: a deadline never comes before its time.
    pub(crate) fn ms(d: Duration) -> u64 {
        d.as_nanos().div_ceil(1_000_000).min(u64::MAX as u128 / 4) as u64
    }

    /// Point the connection's timer at the earliest of its deadlines.
    pub(crate) fn rearm(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        let at = conn.next_deadline();
        match conn.timer {
            Some(k) if at == NEVER => {
                self.wheel.cancel(k);
                conn.timer = None;
            }
            Some(k) => {
                self.wheel.extend(k, at);
            }
            None if at == NEVER => {}
            None => {
                conn.timer = Some(self.wheel.insert(
                    at,
                    TimerRef {
                        idx: idx as u32,
                        gen: conn.gen,
                    },
                ));
            }
        }
    }

    /// End the doomed connections.
    fn reap<H: Handler<Data = D>>(&mut self, handler: &mut H) {
        while let Some((idx, gen, reason)) = self.doomed.pop() {
            if self.alive(idx, gen) {
                self.end(handler, idx, reason);
            }
        }
    }

    /// End gracefully: flush what is queued, then close; if the socket cannot take it all now,
    /// linger until it drains or the close timeout passes. After a failure, drain the peer's
    /// input until its EOF or the close timeout before closing ([`Conn::half_close`]).
    fn finish<H: Handler<Data = D>>(&mut self, handler: &mut H, idx: usize, reason: CloseReason) {
        self.cork_for(idx);
        self.linger(idx, reason);
        self.flush_cork();
        self.reap(handler);
    }

    /// Mark the connection as ending with `reason` once its queued bytes are written (the cork
    /// flush dooms it when nothing is left), or when the close timeout passes.
    pub(crate) fn linger(&mut self, idx: usize, reason: CloseReason) {
        let conn = &mut self.conns[idx];
        conn.linger = Some(reason);
        conn.send.sealed = true;
        conn.deadline = self.now + Self::ms(self.config.close_timeout);
        self.rearm(idx);
    }

    /// Write the pong the connection owes for the pings it sent, unless bytes are queued for it:
    /// then the pong waits until `writable` has drained the queue, and later pings only replace
    /// its payload. So a connection holds at most one pong in its queue and owes at most one
    /// more, however many pings it sends without reading.
    #[inline(never)]
    pub(crate) fn write_owed_pong(&mut self, idx: usize) {
        if self.conns[idx].session.pong_owed() && self.conns[idx].pending.is_empty() {
            self.cork_for(idx);
            self.conns[idx].session.write_pong(&mut self.cork);
        }
    }

    /// Start the close handshake on an open connection: send the close frame, seal sends and
    /// arm the close timeout.
    pub(crate) fn start_close(&mut self, idx: usize, code: CloseCode, reason: &str) {
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

    /// The connection's timer fired: act on every deadline that has passed.
    fn timer_fired<H: Handler<Data = D>>(&mut self, handler: &mut H, idx: usize) {
        let now = self.now;
        let conn = &mut self.conns[idx];
        if conn.stall_at <= now {
            // Over the limit (reading paused) it had to drain to half of it; otherwise it had
            // to make progress at all.
            let reason = match conn.read_paused {
                true => CloseReason::Backpressure,
                false => CloseReason::WriteStall,
            };
            log::debug!(
                "{} dropped: {}",
                conn_id(self.member, idx, conn.gen),
                reason.label()
            );
            self.end(handler, idx, reason);
            return;
        }
        if conn.expire_at <= now {
            conn.expire_at = NEVER;
            if conn.session.state() == State::Open && conn.linger.is_none() {
                conn.send.cause = Some(CloseReason::MaxLifetime);
                self.start_close(idx, CloseCode::GOING_AWAY, "maximum lifetime reached");
            }
        }
        let conn = &mut self.conns[idx];
        if conn.deadline > now {
            return;
        }
        if let Some(reason) = conn.linger {
            self.end(handler, idx, reason);
            return;
        }
        match conn.session.state() {
            State::Handshake => {
                self.cork_for(idx);
                handshake::write_response(
                    &mut self.cork,
                    408,
                    "handshake timeout",
                    &[],
                    b"handshake timeout\n",
                );
                self.conns[idx].session.finish_rejected();
                self.stats.rejected_status[crate::metrics::status_index(408)] += 1;
                self.finish(handler, idx, CloseReason::HandshakeTimeout);
            }
            State::Open if !conn.pinged => {
                conn.pinged = true;
                let rest = Self::ms(self.config.idle_timeout) - self.ping_after;
                conn.deadline = now + rest.max(1);
                self.cork_for(idx);
                self.conns[idx].session.ping(b"", &mut self.cork);
            }
            State::Open => {
                self.start_close(idx, CloseCode::GOING_AWAY, "idle timeout");
                self.finish(handler, idx, CloseReason::IdleTimeout);
            }
            State::CloseSent => {
                let reason = match (self.shutdown_at, conn.send.cause) {
                    (Some(_), _) => CloseReason::Shutdown,
                    (None, Some(cause)) => cause,
                    (None, None) => CloseReason::CloseTimeout,
                };
                self.end(handler, idx, reason);
            }
            State::Closed => self.end(handler, idx, CloseReason::Abnormal),
        }
    }

    fn begin_shutdown<H: Handler<Data = D>>(&mut self, handler: &mut H) {
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
    pub(crate) fn end<H: Handler<Data = D>>(
        &mut self,
        handler: &mut H,
        idx: usize,
        reason: CloseReason,
    ) {
        // Every descriptor opened so far was counted in the ledger when it was opened.
        debug_assert_eq!(
            self.ledger.owned_by(self.member),
            self.owned_fds(),
            "descriptor count in the ledger drifted"
        );
        let Some(mut conn) = self.conns.try_remove(idx) else {
            return;
        };
        let _ = self.registry.deregister(&mut conn.socket);
        if let Some(k) = conn.timer.take() {
            self.wheel.cancel(k);
        }
        if self.cork_owner == Some(idx) {
            self.cork.clear();
            self.cork_owner = None;
        }
        self.fds_changed();
        drop(conn.socket);
        if conn.ip_counted {
            self.ledger.admission().release(conn.peer.ip());
            self.ip_counted -= 1;
        }
        if conn.shed {
            self.shedding -= 1;
        }
        self.stats.closed[reason.index()] += 1;
        // A descriptor was freed: accepting may go on.
        self.resume_accept();
        self.check_consistency();
        let id = conn_id(self.member, idx, conn.gen);
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

    /// Debug builds: the slab, the wheel and the admission counters agree after every close.
    fn check_consistency(&self) {
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
                    self.ip_counted,
                    "per-address counts drifted"
                );
            }
            let shed = self.conns.iter().filter(|(_, c)| c.shed).count();
            assert_eq!(shed, self.shedding, "refused-connection count drifted");
        }
    }
}

impl<H: Handler> Drop for Server<H> {
    fn drop(&mut self) {
        // Commands queued for a loop that will never run them are dropped, which also wakes
        // any thread waiting in `LoopHandle::query`.
        self.inner.shared.close();
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

    /// Idle connections must stay cheap (the memory target is a few hundred bytes of user space
    /// per idle connection, wheel entry included): a guard against the state growing unnoticed.
    #[test]
    fn connection_state_stays_small() {
        let conn = std::mem::size_of::<super::Conn<()>>();
        let session = std::mem::size_of::<crate::protocol::session::Session>();
        assert!(conn <= 264, "Conn<()> is {conn} bytes");
        assert!(session <= 96, "Session is {session} bytes");
    }
}
