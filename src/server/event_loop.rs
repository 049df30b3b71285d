//! [`Server`]: the poll, one turn (wait, dispatch every event, fire due timers, accept), and the
//! commands other threads queue through a [`LoopHandle`].

use super::conn::slot_of;
use super::core::{ping_after, Core, LOG_SLOTS, SWEEP_MS};
use super::ctx::Ctx;
use super::handle::{Command, LoopHandle, OwnedMessage, Shared};
use super::ws::guarded;
use crate::app::{ConnId, Handler, Message};
use crate::config::{Config, ConfigError};
use crate::error::Error;
use crate::ledger::Ledger;
use crate::metrics::Stats;
use crate::protocol::frame::OpCode;
use crate::protocol::handshake;
use crate::sys;
use crate::timer_wheel::TimerWheel;
use crate::topics::TopicError;
use crate::watchdog::{Activity, Watchdog};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Token of the cross-thread waker; listener tokens are 0..MAX_LISTENERS, and connection tokens
/// carry a generation >= 1 in their upper 32 bits, so they never collide with either.
pub(super) const WAKER: Token = Token(u32::MAX as usize);

pub(super) const MAX_LISTENERS: usize = 64;

/// Commands whose buffer the loop keeps between batches from its handles' queue.
pub(super) const BATCH_KEEP: usize = 1024;

/// A WebSocket server: listeners, connections and the handler, driven by [`Server::run`].
pub struct Server<H: Handler> {
    poll: Poll,
    events: Events,
    inner: Inner<H>,
    /// Stops its thread when the server is dropped.
    _watchdog: Option<Watchdog>,
}

pub(super) struct Inner<H: Handler> {
    pub(super) core: Core<H::Data>,
    pub(super) handler: H,
    pub(super) recv: Vec<u8>,
    pub(super) shared: Arc<Shared<H>>,
    /// The commands taken from the queue, run by [`Inner::run_commands`] (kept for its
    /// capacity).
    pub(super) batch: Vec<Command<H>>,
    /// Commands taken but not run yet: a batch whose publications reached the turn's bound
    /// runs the rest on the next turn, before anything queued since.
    pub(super) leftover: Vec<Command<H>>,
    /// Publications forwarded by other loops and not published here yet, likewise.
    pub(super) incoming: Vec<crate::ledger::Forwarded>,
}

impl<H: Handler> Server<H> {
    /// A server with `config` and `handler`, listening nowhere yet. Fails on an invalid
    /// configuration ([`Error::Config`], naming the field) or when epoll cannot be created.
    pub fn new(config: Config, handler: H) -> Result<Self, Error> {
        config.validate()?;
        let tls = crate::io::tls::setup(&config)?;
        let ledger = Arc::new(Ledger::new(1, &config).with_tls(tls));
        Self::for_loop(config, handler, ledger, 0)
    }

    /// Loop `loop_index` of the group sharing `ledger` (a [`Cluster`](crate::Cluster) sizes its
    /// budget with [`Server::join_budget`] before its first turn).
    pub(crate) fn for_loop(
        config: Config,
        handler: H,
        ledger: Arc<Ledger>,
        loop_index: usize,
    ) -> Result<Self, Error> {
        config.validate()?;
        let before = sys::open_fds().unwrap_or(0);
        let (poll, waker, registry) = open_poll()?;
        // Other loops of a cluster wake this one with publications for its subscribers.
        ledger.set_waker(loop_index, waker.clone());
        let fixed_fds = sys::open_fds().unwrap_or(before + 3).saturating_sub(before);
        let limits = handshake::Limits {
            max_header_bytes: config.max_header_bytes,
            max_headers: config.max_headers,
        };
        let origin =
            crate::origin::OriginPolicy::new(&config.allowed_origins, config.allow_missing_origin)
                .map_err(|e| ConfigError {
                    field: "allowed_origins",
                    reason: e.to_string(),
                })?;
        let watchdog = match config.stall_threshold.is_zero() {
            true => None,
            false => Some(Watchdog::start(config.stall_threshold)?),
        };
        let start = ledger.start;
        let tls = ledger.tls().cloned();
        let shared = Arc::new(Shared::new(waker, &config, tls.clone()));
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
                    spill: Vec::new(),
                    pong_due: false,
                    pubsub: super::topics::Pubsub::new(
                        config.max_topics_per_connection,
                        ledger.loops() > 1 || ledger.link().is_some(),
                    ),
                    to_close: Vec::new(),
                    memory: crate::memory::MemoryBudget::new(ledger.memory_share()),
                    fanout_bytes: 0,
                    codec: crate::protocol::deflate::SharedCodec::new(config.compression_threshold),
                    codec_bytes: 0,
                    codec_mark: 0,
                    tls_spent_ns: 0,
                    tls_by_address: Default::default(),
                    last_shed_scan: u64::MAX,
                    limits,
                    start,
                    ledger,
                    loop_index,
                    next_publish: 0,
                    published_turns: 0,
                    now: 0,
                    next_gen: 0,
                    stats: Stats::default(),
                    shutdown_at: None,
                    tally: Default::default(),
                    max_connections: 0,
                    fd_budget: 0,
                    // Kept open to be released when accept fails with `EMFILE`.
                    spare_fd: super::accept::open_spare(),
                    fixed_fds,
                    started: false,
                    next_sweep: SWEEP_MS,
                    accept_due: false,
                    turn_admitted: 0,
                    accept_paused: false,
                    paused_since: 0,
                    backoff_ms: 0,
                    accept_timer: None,
                    log_throttle: [(0, 0); LOG_SLOTS],
                    listener_admin: Vec::new(),
                    auditor: None,
                    bridge: None,
                    endpoint_buckets: [crate::admission::Bucket::full(config.endpoint_rate, 0); 2],
                    beat: watchdog.as_ref().map(|w| w.beat.clone()),
                    origin,
                    trusted: crate::admission::TrustedProxies::parse(&config.trusted_proxies)
                        .map_err(|reason| ConfigError {
                            field: "trusted_proxies",
                            reason,
                        })?,
                    ping_after: ping_after(&config),
                    tls,
                    config,
                },
                handler,
                shared,
                batch: Vec::new(),
                leftover: Vec::new(),
                incoming: Vec::new(),
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
    pub fn listen(&mut self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        self.add_listener(addr, false, false)
    }

    /// [`Server::listen`], with `SO_REUSEPORT` when `reuse_port` (a cluster's loops).
    pub(crate) fn listen_with(
        &mut self,
        addr: SocketAddr,
        reuse_port: bool,
    ) -> Result<SocketAddr, Error> {
        self.add_listener(addr, false, reuse_port)
    }

    /// Listen on `addr` for `GET /metrics` and `GET /healthz` only (an address for operators,
    /// apart from the WebSocket port); everything else gets 404. Returns the bound address.
    pub fn listen_metrics(&mut self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        self.add_listener(addr, true, false)
    }

    pub(super) fn add_listener(
        &mut self,
        addr: SocketAddr,
        admin: bool,
        reuse_port: bool,
    ) -> Result<SocketAddr, Error> {
        let core = &mut self.inner.core;
        let i = core.listeners.len();
        let failed = |source| Error::Listen { addr, source };
        if i >= MAX_LISTENERS {
            return Err(failed(io::Error::other("too many listeners")));
        }
        let mut listener = super::accept::bind(
            addr,
            core.config.listen_backlog,
            reuse_port,
            core.config.socket_receive_buffer,
        )
        .map_err(failed)?;
        let bound = listener.local_addr().map_err(failed)?;
        self.poll
            .registry()
            .register(&mut listener, Token(i), Interest::READABLE)
            .map_err(failed)?;
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

    /// Publish `msg` to every subscriber of `topic` (see [`Ctx::publish`]); between turns,
    /// so it is written to this loop's subscribers at once.
    pub fn publish(&mut self, topic: &[u8], msg: Message<'_>) -> Result<usize, TopicError> {
        let reached = Ctx {
            core: &mut self.inner.core,
        }
        .publish(topic, msg)?;
        let core = &mut self.inner.core;
        core.settle_publications();
        core.reap(&mut self.inner.handler);
        core.report_subscriptions(&mut self.inner.handler);
        Ok(reached)
    }

    /// How many subscribers `topic` has on this loop.
    pub fn num_subscribers(&self, topic: &[u8]) -> usize {
        use crate::app::PubsubOps;
        self.inner.core.pubsub.num_subscribers(topic)
    }

    /// A cluster's loop: take its share of the fd budget (see [`Core::join_budget`]).
    pub(crate) fn join_budget(&mut self, budget: usize, max_connections: usize) {
        self.inner.core.join_budget(budget, max_connections);
    }

    /// Run until shut down (through [`LoopHandle::shutdown`]) and every connection has ended.
    /// Fails at once if the configuration does not fit the process's descriptor limit.
    pub fn run(mut self) -> Result<(), Error> {
        while self.turn(None)? {}
        Ok(())
    }

    /// One round: wait for readiness up to `timeout` (and no longer than the next timer),
    /// dispatch every event, fire due timers. Returns false once the server has shut down and
    /// every connection has ended. The first call sizes the fd budget (and may fail, as `run`).
    pub fn turn(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
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

    pub(super) fn turn_inner(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
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
                return Err(Error::Io(e));
            }
        }
        let busy = Instant::now();
        if let Some(b) = &self.inner.core.beat {
            b.turn_start();
        }
        self.inner.core.tick();
        self.inner.core.tls_spent_ns = 0;
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
        core.settle_publications();
        core.account_codec();
        core.reap(&mut self.inner.handler);
        core.report_subscriptions(&mut self.inner.handler);
        core.check_memory();
        let ran = busy.elapsed().as_nanos() as u64;
        crate::metrics::observe_turn(&mut core.stats, ran);
        let more = !(core.shutdown_at.is_some() && core.conns.is_empty());
        if core.ledger.loops() > 1 && (core.now >= core.next_publish || !more) {
            core.publish_snapshot();
        }
        if let Some(b) = &core.beat {
            b.turn_end(ran);
        }
        Ok(more)
    }
}

/// The loop's own descriptors: its epoll, the registry's duplicate of it, and the waker's
/// eventfd. [`Server::for_loop`] measures them into `fixed_fds` and counts them in the ledger
/// (`fds_changed`) before it returns; they close when the server is dropped.
#[allow(clippy::disallowed_methods)] // the one place the loop opens descriptors of its own
fn open_poll() -> io::Result<(Poll, Arc<Waker>, Registry)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let registry = poll.registry().try_clone()?;
    Ok((poll, waker, registry))
}

impl<H: Handler> Inner<H> {
    pub(super) fn dispatch(&mut self, event: &mio::event::Event) {
        let token = event.token().0;
        let mut touched = None;
        if token == WAKER.0 {
            self.run_commands();
            self.take_forwarded();
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
            touched = Some((idx, gen));
        }
        self.core.flush_cork();
        if let Some((idx, _)) = touched.filter(|&(i, g)| self.core.alive(i, g)) {
            // What its read or write did to its buffers (sends were counted by the flush).
            self.core.account(idx);
        }
        if self.core.pubsub.fanout.is_large() {
            self.core.deliver_owed();
        }
        self.core.reap(&mut self.handler);
    }

    /// Publish what the other loops of a cluster (and the Redis bridge) forwarded to this one, in
    /// their order; once the turn's publications reach their bound, the rest waits for the next
    /// turn. When the rest of an earlier batch is done, the inbox is taken too: what arrived in
    /// it meanwhile woke the loop only if the inbox was empty, and that wake-up may be this one
    /// (else the inbox would fill, and what comes next would be dropped, with no wake-up left
    /// to take it).
    pub(super) fn take_forwarded(&mut self) {
        if self.core.ledger.loops() == 1 && self.core.ledger.link().is_none() {
            return;
        }
        loop {
            let leftover = !self.incoming.is_empty();
            let mut batch = match leftover {
                false => self.core.ledger.take_forwarded(self.core.loop_index),
                true => std::mem::take(&mut self.incoming),
            };
            let mut rest = batch.drain(..);
            while let Some(f) = rest.next() {
                let op = if f.text { OpCode::Text } else { OpCode::Binary };
                // A topic too long was refused where it was published.
                let _ = self.core.publish(&f.topic, op, &f.payload, false);
                if self.core.pubsub.fanout.is_large() {
                    self.core.deliver_owed();
                    self.core.reap(&mut self.handler);
                    if rest.len() > 0 {
                        self.incoming = rest.collect();
                        self.shared.wake();
                        return;
                    }
                }
            }
            if !leftover {
                return;
            }
        }
    }

    /// Run every command queued so far, in order; then free their room in the queue. Once the
    /// turn's publications reach their bound, the rest of the batch runs on the next turn (so
    /// that a burst of publications from other threads cannot hold the loop), before anything
    /// queued since.
    pub(super) fn run_commands(&mut self) {
        let mut batch = match self.leftover.is_empty() {
            true => {
                let mut batch = std::mem::take(&mut self.batch);
                self.shared.take(&mut batch);
                batch
            }
            false => std::mem::take(&mut self.leftover),
        };
        let (mut count, mut bytes) = (0, 0);
        let mut cmds = batch.drain(..);
        while let Some(cmd) = cmds.next() {
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
                Command::Publish(topic, msg) => {
                    let (op, payload) = msg.parts();
                    // The length was checked when it was queued.
                    let _ = core.publish(&topic, op, payload, true);
                }
                Command::Shutdown => core.begin_shutdown(handler),
            }
            self.core.flush_cork();
            let large = self.core.pubsub.fanout.is_large();
            if large {
                self.core.deliver_owed();
            }
            self.core.reap(&mut self.handler);
            if large && cmds.len() > 0 {
                self.leftover = cmds.by_ref().collect();
                self.shared.wake();
                break;
            }
        }
        drop(cmds);
        // Keep a small batch's buffer for the next one; give a burst's back.
        if batch.capacity() <= BATCH_KEEP {
            self.batch = batch;
        }
        self.shared.release(count, bytes);
    }
}

impl<H: Handler> Drop for Server<H> {
    fn drop(&mut self) {
        // Commands queued for a loop that will never run them are dropped, which also wakes
        // any thread waiting in `LoopHandle::query`.
        self.inner.shared.close();
    }
}
