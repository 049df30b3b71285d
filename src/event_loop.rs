//! The event loop: mio `Poll` (edge-triggered), connections in a slab with generation-tagged
//! tokens, one timer wheel for every deadline, and the one close path ([`Core::end`]).
//!
//! Read path: one receive buffer per loop; a read that fills less than the buffer has drained
//! the socket (edge-triggered: new data raises a new edge), so a message costs one `recv`.
//! Write path: everything written to one connection during one dispatch is collected in the
//! loop's cork buffer and written with one `send` at the end; only the bytes the socket did not
//! take are copied into the connection's own queue, which a writable event flushes.
//! Interest (read + write) is registered once per connection: no `epoll_ctl` per message.

use crate::app::{
    CloseReason, ConnId, Decision, Handler, Message, SendState, UpgradeRequest, WebSocket,
};
use crate::config::Config;
use crate::handle::{Command, Ctx, LoopHandle, OwnedMessage, Shared};
use crate::protocol::close::CloseCode;
use crate::protocol::frame::OpCode;
use crate::protocol::handshake::{self, Rejection};
use crate::protocol::session::{Event, Head, Session, State};
use crate::timer_wheel::{TimerKey, TimerWheel};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Token of the cross-thread waker; listener tokens are 0..MAX_LISTENERS, and connection tokens
/// carry a generation >= 1 in their upper 32 bits, so they never collide with either.
const WAKER: Token = Token(u32::MAX as usize);
const MAX_LISTENERS: usize = 64;
const NONE: usize = usize::MAX;
/// The cork buffer is shrunk back to this after a large message passed through it.
const CORK_KEEP: usize = 64 * 1024;

/// A timer entry: the connection's slab index and generation.
#[derive(Clone, Copy, Debug)]
struct TimerRef {
    idx: u32,
    gen: u32,
}

/// One connection in the slab.
pub(crate) struct Conn<D> {
    socket: TcpStream,
    gen: u32,
    peer: SocketAddr,
    session: Session,
    /// The connection's one timer; what it means depends on the session state.
    timer: Option<TimerKey>,
    /// Bytes the socket did not take yet.
    pending: Vec<u8>,
    /// Set once the upgrade is accepted: the connection is open and `on_close` is owed.
    data: Option<D>,
    send: SendState,
    subprotocol: Option<Box<str>>,
    /// An idle ping is out and unanswered.
    pinged: bool,
    /// Ending gracefully: flush `pending`, then close with this reason.
    linger: Option<CloseReason>,
    /// The close frame the peer sent (code and reason), reported to `on_close`.
    peer_close: Option<(CloseCode, Box<str>)>,
}

/// Counters the loop keeps; read through [`Ctx::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections open right now (any state).
    pub connections: usize,
    /// Timers armed right now.
    pub timers: usize,
    /// Connections ended, by [`CloseReason::index`].
    pub closed: [u64; CloseReason::LABELS.len()],
    /// Accept calls that failed with an error other than `WouldBlock`.
    pub accept_errors: u64,
}

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
    registry: Registry,
    conns: Slab<Conn<D>>,
    wheel: TimerWheel<TimerRef>,
    /// Output collected for `cork_owner` during the current dispatch.
    cork: Vec<u8>,
    cork_owner: usize,
    /// Connections to end once the current dispatch returns: (slab index, generation, reason).
    doomed: Vec<(usize, u32, CloseReason)>,
    config: Config,
    limits: handshake::Limits,
    start: Instant,
    now: u64,
    next_gen: u32,
    stats: Stats,
    shutdown_at: Option<u64>,
}

/// A WebSocket server: listeners, connections and the handler, driven by [`Server::run`].
pub struct Server<H: Handler> {
    poll: Poll,
    events: Events,
    inner: Inner<H>,
}

struct Inner<H: Handler> {
    listeners: Vec<Option<TcpListener>>,
    core: Core<H::Data>,
    handler: H,
    recv: Vec<u8>,
    shared: Arc<Shared<H>>,
}

impl<H: Handler> Server<H> {
    /// A server with `config` and `handler`, listening nowhere yet. Fails on an invalid
    /// configuration (as `io::ErrorKind::InvalidInput`) or when epoll cannot be created.
    pub fn new(config: Config, handler: H) -> io::Result<Self> {
        config
            .validate()
            .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let registry = poll.registry().try_clone()?;
        let limits = handshake::Limits {
            max_header_bytes: config.max_header_bytes,
            max_headers: config.max_headers,
        };
        Ok(Server {
            events: Events::with_capacity(config.events_capacity),
            inner: Inner {
                listeners: Vec::new(),
                recv: vec![0; config.recv_buffer_size],
                core: Core {
                    registry,
                    conns: Slab::new(),
                    wheel: TimerWheel::new(0),
                    cork: Vec::new(),
                    cork_owner: NONE,
                    doomed: Vec::new(),
                    limits,
                    start: Instant::now(),
                    now: 0,
                    next_gen: 0,
                    stats: Stats::default(),
                    shutdown_at: None,
                    config,
                },
                handler,
                shared: Arc::new(Shared::new(waker)),
            },
            poll,
        })
    }

    /// Listen on `addr` (IPv4 or IPv6; port 0 picks a free port) and return the bound address.
    pub fn listen(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let i = self.inner.listeners.len();
        if i >= MAX_LISTENERS {
            return Err(io::Error::other("too many listeners"));
        }
        let mut listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        self.poll
            .registry()
            .register(&mut listener, Token(i), Interest::READABLE)?;
        self.inner.listeners.push(Some(listener));
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

    /// Run until shut down (through [`LoopHandle::shutdown`]) and every connection has ended.
    pub fn run(mut self) -> io::Result<()> {
        while self.turn(None)? {}
        Ok(())
    }

    /// One round: wait for readiness up to `timeout` (and no longer than the next timer),
    /// dispatch every event, fire due timers. Returns false once the server has shut down and
    /// every connection has ended.
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        let core = &mut self.inner.core;
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
        let wait = match (timeout, timer_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Err(e) = self.poll.poll(&mut self.events, wait) {
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
        self.inner.core.tick();
        for event in self.events.iter() {
            self.inner.dispatch(event);
        }
        self.inner.fire_timers();
        let core = &self.inner.core;
        Ok(!(core.shutdown_at.is_some() && core.conns.is_empty()))
    }
}

impl<H: Handler> Inner<H> {
    fn dispatch(&mut self, event: &mio::event::Event) {
        let token = event.token().0;
        if token == WAKER.0 {
            self.run_commands();
        } else if token < MAX_LISTENERS {
            self.accept(token);
        } else {
            let (idx, gen) = (token & 0xffff_ffff, (token >> 32) as u32);
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
        self.reap();
    }

    /// Accept until `WouldBlock`.
    fn accept(&mut self, i: usize) {
        loop {
            let Some(listener) = self.listeners.get(i).and_then(Option::as_ref) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.core.admit(stream, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.core.stats.accept_errors += 1;
                    match e.raw_os_error() {
                        Some(libc::ECONNABORTED | libc::EPROTO | libc::EINTR | libc::EPERM) => {}
                        _ => {
                            log::warn!("accept failed: {e}");
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Read until the socket is drained, feeding the session.
    fn readable(&mut self, idx: usize, closed: bool) {
        loop {
            let conn = &mut self.core.conns[idx];
            let n = match (&conn.socket).read(&mut self.recv) {
                Ok(0) => {
                    let reason = conn.linger.unwrap_or(CloseReason::Abnormal);
                    self.core.end(&mut self.handler, idx, reason);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    let reason = conn.linger.unwrap_or(match e.kind() {
                        ErrorKind::ConnectionReset => CloseReason::Abnormal,
                        _ => CloseReason::IoError,
                    });
                    self.core.end(&mut self.handler, idx, reason);
                    return;
                }
            };
            if !self.received(idx, n) {
                return;
            }
            if n < self.recv.len() && !closed {
                return;
            }
        }
    }

    /// Handle `n` fresh bytes in the receive buffer. Returns false if the connection ended or
    /// is ending (further input is not wanted).
    fn received(&mut self, idx: usize, n: usize) -> bool {
        let core = &mut self.core;
        let conn = &mut core.conns[idx];
        if conn.linger.is_some() {
            return true; // draining a final response: discard input, watch for EOF
        }
        match conn.session.state() {
            State::Handshake => self.handshake(idx, n),
            State::Open | State::CloseSent => {
                if conn.session.state() == State::Open {
                    conn.pinged = false;
                    if let Some(k) = conn.timer {
                        core.wheel.extend(k, core.now + core.ping_after());
                    }
                }
                let Inner {
                    core,
                    handler,
                    recv,
                    ..
                } = self;
                frames(core, handler, idx, &mut recv[..n])
            }
            State::Closed => true,
        }
    }

    fn handshake(&mut self, idx: usize, n: usize) -> bool {
        let Inner {
            core,
            handler,
            recv,
            ..
        } = self;
        core.cork_for(idx);
        let ping_after = core.ping_after();
        let conn = &mut core.conns[idx];
        let peer = conn.peer;
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
                if !request.is_upgrade() {
                    handshake::write_response(
                        &mut core.cork,
                        426,
                        "this is a WebSocket endpoint",
                        &[("Upgrade", "websocket")],
                        b"this is a WebSocket endpoint\n",
                    );
                    conn.session.finish_rejected();
                    core.finish(handler, idx, CloseReason::HttpAnswered);
                    return false;
                }
                let upgrade = match handshake::validate_upgrade(&request) {
                    Ok(u) => u,
                    Err(rej) => {
                        handshake::write_rejection(&mut core.cork, &rej);
                        return reject(core, handler, idx, rej.status());
                    }
                };
                let req = UpgradeRequest { upgrade, peer };
                match handler.upgrade(&req) {
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
        if let Some(k) = conn.timer.take() {
            core.wheel.cancel(k);
        }
        if ping_after > 0 {
            conn.timer = Some(core.wheel.insert(
                core.now + ping_after,
                TimerRef {
                    idx: idx as u32,
                    gen: conn.gen,
                },
            ));
        }
        log::debug!("{} open from {}", conn_id(idx, conn.gen), peer);
        if !callback(core, handler, idx, |h, ws| h.on_open(ws)) {
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
        let conn = &mut self.core.conns[idx];
        if conn.pending.is_empty() {
            return;
        }
        match write_some(&conn.socket, &conn.pending) {
            Ok(n) if n == conn.pending.len() => conn.pending = Vec::new(),
            Ok(n) => {
                conn.pending.drain(..n);
                return;
            }
            Err(e) => {
                let reason = conn.linger.unwrap_or(write_error_reason(&e));
                self.core.end(&mut self.handler, idx, reason);
                return;
            }
        }
        if let Some(reason) = conn.linger {
            self.core.end(&mut self.handler, idx, reason);
            return;
        }
        if conn.data.is_some() && conn.session.state() == State::Open {
            let Inner { core, handler, .. } = self;
            core.cork_for(idx);
            callback(core, handler, idx, |h, ws| h.on_drain(ws));
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
        while let Some((_, TimerRef { idx, gen })) = core.wheel.poll(core.now) {
            let idx = idx as usize;
            if !core.alive(idx, gen) {
                continue;
            }
            core.conns[idx].timer = None;
            core.timer_fired(handler, idx);
            core.flush_cork();
            core.reap(handler);
        }
    }

    fn reap(&mut self) {
        self.core.reap(&mut self.handler);
    }

    fn run_commands(&mut self) {
        for cmd in self.shared.take() {
            let Inner {
                core,
                handler,
                listeners,
                ..
            } = self;
            match cmd {
                Command::Send(id, msg) => {
                    let mut ctx = Ctx { core };
                    match &msg {
                        OwnedMessage::Text(s) => ctx.send(id, Message::Text(s)),
                        OwnedMessage::Binary(b) => ctx.send(id, Message::Binary(b)),
                    };
                }
                Command::Close(id, code, reason) => {
                    Ctx { core }.close(id, code, &reason);
                }
                Command::Terminate(id) => Ctx { core }.terminate(id),
                Command::Post(f) => f(handler, &mut Ctx { core }),
                Command::Shutdown => {
                    for l in listeners.iter_mut() {
                        if let Some(mut l) = l.take() {
                            let _ = core.registry.deregister(&mut l);
                        }
                    }
                    core.begin_shutdown(handler);
                }
            }
            self.core.flush_cork();
            self.core.reap(&mut self.handler);
        }
    }
}

/// Run one handler callback for the open connection `idx` with a [`WebSocket`] view, then apply
/// what it asked for (close, terminate). Returns false if the connection is ending.
fn callback<H: Handler>(
    core: &mut Core<H::Data>,
    handler: &mut H,
    idx: usize,
    f: impl FnOnce(&mut H, &mut WebSocket<'_, H::Data>),
) -> bool {
    core.cork_for(idx);
    let conn = &mut core.conns[idx];
    let Some(data) = conn.data.as_mut() else {
        return false;
    };
    let mut ws = WebSocket {
        id: conn_id(idx, conn.gen),
        peer: conn.peer,
        data,
        send: &mut conn.send,
        out: &mut core.cork,
        pending: conn.pending.len(),
        subprotocol: conn.subprotocol.as_deref(),
    };
    f(handler, &mut ws);
    after_callback(core, handler, idx)
}

/// Apply a close or terminate that a callback requested. Returns false if the connection ended
/// or is closing.
fn after_callback<H: Handler>(core: &mut Core<H::Data>, handler: &mut H, idx: usize) -> bool {
    let conn = &mut core.conns[idx];
    if conn.send.terminate {
        core.end(handler, idx, CloseReason::Terminated);
        return false;
    }
    if let Some((code, reason)) = conn.send.close_req.take() {
        core.start_close(idx, code, &reason);
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
    while off < buf.len() {
        let conn = &mut core.conns[idx];
        let (used, event) = match conn.session.read(&mut buf[off..], max, &mut core.cork) {
            Ok(r) => r,
            Err(e) => {
                log::debug!(
                    "{} protocol error from {}: {e}",
                    conn_id(idx, conn.gen),
                    conn.peer
                );
                core.finish(handler, idx, CloseReason::Protocol(e.code));
                return false;
            }
        };
        off += used;
        let Some(event) = event else { continue };
        let Some(data) = conn.data.as_mut() else {
            return false;
        };
        let mut ws = WebSocket {
            id: conn_id(idx, conn.gen),
            peer: conn.peer,
            data,
            send: &mut conn.send,
            out: &mut core.cork,
            pending: conn.pending.len(),
            subprotocol: conn.subprotocol.as_deref(),
        };
        match event {
            Event::Text(s) => handler.on_message(&mut ws, Message::Text(s)),
            Event::Binary(b) => handler.on_message(&mut ws, Message::Binary(b)),
            Event::Ping(p) => handler.on_ping(&mut ws, p),
            Event::Pong(p) => handler.on_pong(&mut ws, p),
            Event::Close { code, reason } => {
                let ours = ws.send.sealed;
                conn.peer_close = Some((code, reason.into()));
                let reason = if ours {
                    CloseReason::ClosedByServer
                } else {
                    CloseReason::PeerClosed
                };
                core.finish(handler, idx, reason);
                return false;
            }
        }
        if !after_callback(core, handler, idx) {
            return false;
        }
    }
    core.conns[idx].session.reclaim();
    true
}

/// Answer a refused request (the response is in the cork) and end the connection.
fn reject<H: Handler>(core: &mut Core<H::Data>, handler: &mut H, idx: usize, status: u16) -> bool {
    let conn = &mut core.conns[idx];
    log::debug!(
        "{} from {} rejected with {status}",
        conn_id(idx, conn.gen),
        conn.peer
    );
    conn.session.finish_rejected();
    core.finish(handler, idx, CloseReason::Rejected(status));
    false
}

fn conn_id(idx: usize, gen: u32) -> ConnId {
    ConnId(((gen as u64) << 32) | idx as u64)
}

fn write_error_reason(e: &io::Error) -> CloseReason {
    match e.kind() {
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => CloseReason::Abnormal,
        _ => CloseReason::IoError,
    }
}

/// One `send` of `bytes`; `Ok(0)` when the socket would block.
fn write_some(mut socket: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match socket.write(bytes) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

impl<D> Core<D> {
    fn tick(&mut self) {
        self.now = self.start.elapsed().as_millis() as u64;
    }

    fn stats(&self) -> Stats {
        Stats {
            connections: self.conns.len(),
            timers: self.wheel.len(),
            ..self.stats.clone()
        }
    }

    fn alive(&self, idx: usize, gen: u32) -> bool {
        self.conns.get(idx).is_some_and(|c| c.gen == gen)
    }

    /// Milliseconds of silence before the idle ping (half the idle timeout); 0 when disabled.
    fn ping_after(&self) -> u64 {
        (self.config.idle_timeout.as_millis() as u64).div_ceil(2)
    }

    fn ms(d: Duration) -> u64 {
        d.as_millis() as u64
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let gen = self.next_gen;
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        if idx > u32::MAX as usize {
            return; // unreachable in practice: the fd limit is far lower
        }
        let mut socket = stream;
        let token = Token(conn_id(idx, gen).0 as usize);
        if let Err(e) =
            self.registry
                .register(&mut socket, token, Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("cannot register connection from {peer}: {e}");
            return; // dropping the socket closes it; nothing else was allocated
        }
        let timer = self.wheel.insert(
            self.now + Self::ms(self.config.handshake_timeout),
            TimerRef {
                idx: idx as u32,
                gen,
            },
        );
        entry.insert(Conn {
            socket,
            gen,
            peer,
            session: Session::new(),
            timer: Some(timer),
            pending: Vec::new(),
            data: None,
            send: SendState::default(),
            subprotocol: None,
            pinged: false,
            linger: None,
            peer_close: None,
        });
        self.stats.accepted += 1;
    }

    /// Make `idx` the owner of the cork buffer, first flushing what another connection left in it.
    fn cork_for(&mut self, idx: usize) {
        if self.cork_owner != idx {
            self.flush_cork();
            self.cork_owner = idx;
        }
    }

    /// Write the cork to its owner with one `send`; queue what the socket does not take.
    /// A write error dooms the connection (ended by `reap`).
    fn flush_cork(&mut self) {
        let idx = std::mem::replace(&mut self.cork_owner, NONE);
        if idx == NONE || self.cork.is_empty() {
            return;
        }
        if let Some(conn) = self.conns.get_mut(idx) {
            if !conn.pending.is_empty() {
                conn.pending.extend_from_slice(&self.cork);
            } else {
                match write_some(&conn.socket, &self.cork) {
                    Ok(n) if n == self.cork.len() => {}
                    Ok(n) => conn.pending.extend_from_slice(&self.cork[n..]),
                    Err(e) => {
                        let reason = conn.linger.unwrap_or(write_error_reason(&e));
                        self.doomed.push((idx, conn.gen, reason));
                    }
                }
            }
            if conn.linger.is_some() && conn.pending.is_empty() {
                let reason = conn.linger.unwrap_or(CloseReason::Abnormal);
                self.doomed.push((idx, conn.gen, reason));
            }
        }
        self.cork.clear();
        if self.cork.capacity() > 16 * CORK_KEEP {
            self.cork.shrink_to(CORK_KEEP);
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
    /// linger until it drains or the close timeout passes.
    fn finish<H: Handler<Data = D>>(&mut self, handler: &mut H, idx: usize, reason: CloseReason) {
        self.cork_for(idx);
        let conn = &mut self.conns[idx];
        conn.linger = Some(reason);
        conn.send.sealed = true;
        self.flush_cork();
        let conn = &mut self.conns[idx];
        if conn.pending.is_empty() || self.doomed.iter().any(|d| d.0 == idx) {
            self.reap(handler);
            if self.alive(idx, conn_gen(&self.conns, idx)) {
                self.end(handler, idx, reason);
            }
            return;
        }
        let deadline = self.now + Self::ms(self.config.close_timeout);
        self.rearm(idx, deadline);
    }

    /// Start the close handshake on an open connection: send the close frame, seal sends and
    /// arm the close timeout.
    fn start_close(&mut self, idx: usize, code: CloseCode, reason: &str) {
        self.cork_for(idx);
        let conn = &mut self.conns[idx];
        conn.send.sealed = true;
        if conn.session.close(code, reason, &mut self.cork) {
            let deadline = self.now + Self::ms(self.config.close_timeout);
            self.rearm(idx, deadline);
        }
    }

    /// Point the connection's timer at `deadline`.
    fn rearm(&mut self, idx: usize, deadline: u64) {
        let conn = &mut self.conns[idx];
        match conn.timer {
            Some(k) if self.wheel.extend(k, deadline) => {}
            _ => {
                conn.timer = Some(self.wheel.insert(
                    deadline,
                    TimerRef {
                        idx: idx as u32,
                        gen: conn.gen,
                    },
                ));
            }
        }
    }

    fn timer_fired<H: Handler<Data = D>>(&mut self, handler: &mut H, idx: usize) {
        let conn = &mut self.conns[idx];
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
                self.finish(handler, idx, CloseReason::HandshakeTimeout);
            }
            State::Open if !conn.pinged => {
                conn.pinged = true;
                self.cork_for(idx);
                self.conns[idx].session.ping(b"", &mut self.cork);
                let rest = Self::ms(self.config.idle_timeout) - self.ping_after();
                let deadline = self.now + rest.max(1);
                self.rearm(idx, deadline);
            }
            State::Open => {
                self.start_close(idx, CloseCode::GOING_AWAY, "idle timeout");
                self.finish(handler, idx, CloseReason::IdleTimeout);
            }
            State::CloseSent => {
                let reason = if self.shutdown_at.is_some() {
                    CloseReason::Shutdown
                } else {
                    CloseReason::CloseTimeout
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
        self.shutdown_at = Some(self.now + Self::ms(self.config.shutdown_timeout));
        log::info!("shutting down: closing {} connections", self.conns.len());
        let all: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for idx in all {
            let conn = &self.conns[idx];
            if conn.linger.is_some() {
                continue;
            }
            match conn.session.state() {
                State::Open => {
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
    /// cancel its timer, free its slab slot, close its fd, count the reason, and call `on_close`
    /// if it was opened.
    pub(crate) fn end<H: Handler<Data = D>>(
        &mut self,
        handler: &mut H,
        idx: usize,
        reason: CloseReason,
    ) {
        let Some(mut conn) = self.conns.try_remove(idx) else {
            return;
        };
        let _ = self.registry.deregister(&mut conn.socket);
        if let Some(k) = conn.timer.take() {
            self.wheel.cancel(k);
        }
        if self.cork_owner == idx {
            self.cork.clear();
            self.cork_owner = NONE;
        }
        drop(conn.socket);
        self.stats.closed[reason.index()] += 1;
        let id = conn_id(idx, conn.gen);
        log::debug!("{id} from {} closed: {}", conn.peer, reason.label());
        if let Some(data) = conn.data.take() {
            let (code, text) = match (&conn.peer_close, reason) {
                (Some((code, text)), CloseReason::PeerClosed | CloseReason::ClosedByServer) => {
                    (*code, &**text)
                }
                _ => (reason.code(), reason.label()),
            };
            handler.on_close(id, data, code, text);
        }
    }
}

fn conn_gen<D>(conns: &Slab<Conn<D>>, idx: usize) -> u32 {
    conns.get(idx).map_or(0, |c| c.gen)
}

impl<'a, D> Ctx<'a, D> {
    pub(crate) fn locate(&mut self, id: ConnId) -> Option<usize> {
        let (idx, gen) = ((id.0 & 0xffff_ffff) as usize, (id.0 >> 32) as u32);
        self.core.alive(idx, gen).then_some(idx)
    }

    /// Send a message to connection `id`. Returns false if it is gone, closing or not yet open.
    pub fn send(&mut self, id: ConnId, msg: Message<'_>) -> bool {
        let Some(idx) = self.locate(id) else {
            return false;
        };
        let core = &mut *self.core;
        if core.conns[idx].send.sealed || core.conns[idx].data.is_none() {
            return false;
        }
        core.cork_for(idx);
        let op = match msg {
            Message::Text(_) => OpCode::Text,
            Message::Binary(_) => OpCode::Binary,
        };
        core.conns[idx]
            .session
            .send(op, msg.as_bytes(), &mut core.cork)
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
            .map(|(i, c)| conn_id(i, c.gen))
            .collect()
    }

    /// The loop's counters.
    pub fn stats(&self) -> Stats {
        self.core.stats()
    }
}

impl<H: Handler> Drop for Server<H> {
    fn drop(&mut self) {
        // Commands queued for a loop that will never run them are dropped, which also wakes
        // any thread waiting in `LoopHandle::query`.
        self.inner.shared.close();
    }
}
