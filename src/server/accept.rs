//! The accept path: listeners with our own backlog, accepting that neither spins nor hangs,
//! admission (global, per-address, rate), the fd budget and the spare-descriptor trick.
//!
//! Accept runs until `WouldBlock` or a per-turn budget; when the budget runs out the loop comes
//! back next turn without waiting (edge-triggered: no new event would come). Errors:
//! `ECONNABORTED`, `EPROTO`, `ECONNRESET`, `EPERM`, `EINTR` skip that connection. `EMFILE`
//! releases the spare descriptor, accepts and answers (503) the whole pending backlog, reopens
//! the spare, then pauses accepting with a backoff timer (5 ms doubling to 1 s); `ENFILE`,
//! `ENOBUFS`, `ENOMEM` (and anything unexpected) pause with the same backoff. The close path
//! resumes accepting as soon as it frees a descriptor.

// This module opens descriptors (Cargo.toml's [lints]): listeners, accepted connections and the
// spare. Each is counted in the fd ledger (`fds_changed`) as it is opened, and given back there
// when it closes: a connection on the close path, the spare here, a listener at shutdown.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use super::conn::{conn_id, Conn, TimerRef, MAX_SLOTS};
use super::core::{Core, LOG_REFUSALS, LOG_SHED, LOG_TLS_CAP};
use crate::admission::Verdict;
use crate::app::CloseReason;
use crate::io::transport::Transport;
use crate::metrics::accept_errno_index;
use crate::protocol::handshake;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};
use std::fs::File;
use std::io::{self, ErrorKind, Write};
use std::net::SocketAddr;

/// How long a refused client has to send its request before we close (we answered already).
pub(super) const SHED_LINGER_MS: u64 = 1000;
pub(super) const BACKOFF_MIN_MS: u64 = 5;
pub(super) const BACKOFF_MAX_MS: u64 = 1000;

/// Create a non-blocking listener on `addr` with `SO_REUSEADDR`, `IPV6_V6ONLY` for IPv6 (so an
/// IPv4 listener can share the port) and the given backlog, capped by `net.core.somaxconn`;
/// with `reuse_port`, `SO_REUSEPORT` too, so that each loop of a cluster binds its own listener
/// on the same port and the kernel spreads connections over them.
/// A listener on `addr` with our backlog (capped by `somaxconn`); a `receive_buffer` other than 0
/// is set on it before `listen`, so that the connections it accepts inherit it and announce a
/// window that fits it.
pub(super) fn bind(
    addr: SocketAddr,
    backlog: u32,
    reuse_port: bool,
    receive_buffer: usize,
) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if receive_buffer > 0 {
        socket.set_recv_buffer_size(receive_buffer)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let cap = crate::sys::somaxconn().unwrap_or(4096).max(1);
    socket.listen(backlog.min(cap).min(i32::MAX as u32) as i32)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The descriptor kept open to be released when accept fails with `EMFILE` (see
/// [`Core::shed_backlog`]): `/dev/null`, or none if it cannot be opened now.
pub(super) fn open_spare() -> Option<File> {
    File::open("/dev/null").ok()
}

/// How a new connection enters the slab.
pub(super) enum Kind {
    /// To be served; counted against its address or not; from a metrics-only listener or not;
    /// from a trusted proxy or not.
    Admitted {
        ip_counted: bool,
        admin: bool,
        via_proxy: bool,
    },
    /// Refused at admission and already answered.
    Refused,
}

/// What to do after an accept error.
pub(super) enum AcceptError {
    /// Skip this connection and go on.
    Skip,
    /// Out of descriptors in this process: shed the backlog with the spare fd, then pause.
    ProcessLimit,
    /// Out of a system resource: pause with backoff.
    Pause,
}

pub(super) fn classify(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::ECONNABORTED | libc::EPROTO | libc::ECONNRESET | libc::EPERM | libc::EINTR) => {
            AcceptError::Skip
        }
        Some(libc::EMFILE) => AcceptError::ProcessLimit,
        _ => AcceptError::Pause,
    }
}

/// A short answer for a refused client, written straight to its socket.
pub(super) fn refusal(verdict: Verdict) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    let (status, reason) = match verdict {
        Verdict::RateLimited => (429, "too many new connections from your address"),
        Verdict::AddressFull => (503, "too many connections from your address"),
        Verdict::ServerFull => (503, "server at capacity"),
        Verdict::MemoryBudget => (503, "server memory budget reached"),
    };
    handshake::write_response(
        &mut out,
        status,
        reason,
        &[("Retry-After", "1")],
        reason.as_bytes(),
    );
    out
}

impl<D> Core<D> {
    /// Accept from every listener (after a listener event, a backoff timer, or a freed fd).
    pub(super) fn accept_all(&mut self) {
        self.accept_due = false;
        for i in 0..self.listeners.len() {
            self.accept_from(i);
        }
    }

    pub(super) fn accept_from(&mut self, i: usize) {
        if self.accept_paused {
            return;
        }
        for _ in 0..self.config.accepts_per_turn {
            let admitted = self.conns.len() - self.tally.shedding();
            if self.turn_admitted > 0 && admitted >= self.max_connections {
                // Full, but with connections admitted in this very turn, whose events (a
                // request, a reset) the loop has not seen yet. A connect-and-reset storm would
                // otherwise fill every slot with dead connections and refuse whoever queued
                // behind them. Let the loop see those events first: next turn, whoever still
                // waits is admitted, or refused if the server is still full.
                self.accept_due = true;
                return;
            }
            let Some(listener) = self.listeners.get(i).and_then(Option::as_ref) else {
                return;
            };
            // Between the accept and the count of its descriptor, an audit forgives it.
            let _moving = Moving::new(&self.ledger);
            match listener.accept() {
                Ok((stream, peer)) => {
                    if self.backoff_ms > 0 {
                        // Only a success proves the shortage is over: with nothing pending,
                        // accept says WouldBlock even when out of descriptors.
                        log::warn!("accepting resumed");
                        self.backoff_ms = 0;
                    }
                    self.on_accepted(stream, peer, self.listener_admin[i]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.restore_spare();
                    return;
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(0);
                    self.stats.accept_errors[accept_errno_index(errno)] += 1;
                    match classify(&e) {
                        AcceptError::Skip => continue,
                        AcceptError::ProcessLimit => {
                            self.warn_throttled(errno, &e);
                            self.shed_backlog(i);
                            self.pause_accept();
                            return;
                        }
                        AcceptError::Pause => {
                            self.warn_throttled(errno, &e);
                            self.pause_accept();
                            return;
                        }
                    }
                }
            }
        }
        // Budget spent: more may be waiting, and edge-triggered epoll will not say so again.
        self.accept_due = true;
    }

    /// `EMFILE`: free the spare descriptor, accept and answer everything pending in the backlog
    /// (each client gets a 503 or, failing that, a reset, instead of hanging), reopen the spare.
    pub(super) fn shed_backlog(&mut self, i: usize) {
        let Some(listener) = self.listeners.get(i).and_then(Option::as_ref) else {
            return;
        };
        let Some(spare) = self.spare_fd.take() else {
            return;
        };
        self.fds_changed();
        drop(spare);
        let answer = refusal(Verdict::ServerFull);
        // A TLS client could not read it (see `on_accepted`): closed without it.
        let plain = self.listener_admin[i] || self.tls.is_none();
        let mut shed = 0u64;
        // Each is accepted, answered and closed without being counted.
        let _moving = Moving::new(&self.ledger);
        while let Ok((mut stream, _)) = listener.accept() {
            if plain {
                let _ = stream.write(&answer);
            }
            drop(stream);
            shed += 1;
            self.stats.closed[CloseReason::Refused.index()] += 1;
        }
        self.stats.refused[Verdict::ServerFull.index()] += shed;
        self.spare_fd = open_spare();
        self.fds_changed();
        if shed > 0 {
            if let Some(more) = self.throttle(LOG_SHED, shed) {
                log::warn!(
                    "out of file descriptors: answered {} pending connections with 503",
                    more + 1
                );
            }
        }
    }

    /// Reopen the spare descriptor if a shortage took it: reopening it after a shed fails when
    /// another thread (another loop of a cluster, say) took the descriptor it freed, and a loop
    /// without its spare could not answer the next shortage's backlog. Called when accept finds
    /// the backlog empty: it says so only when a descriptor was free (else EMFILE).
    fn restore_spare(&mut self) {
        if self.spare_fd.is_none() {
            self.spare_fd = open_spare();
            if self.spare_fd.is_some() {
                self.fds_changed();
            }
        }
    }

    /// Stop accepting until the backoff timer fires (5 ms doubling to 1 s) or the close path
    /// frees a descriptor.
    pub(super) fn pause_accept(&mut self) {
        if self.backoff_ms == 0 {
            log::warn!("accepting paused; retrying with a backoff from {BACKOFF_MIN_MS} ms to {BACKOFF_MAX_MS} ms");
        }
        self.backoff_ms = (self.backoff_ms * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS);
        if !self.accept_paused {
            self.accept_paused = true;
            self.paused_since = self.now;
        }
        if let Some(k) = self.accept_timer.take() {
            self.wheel.cancel(k);
        }
        self.accept_timer = Some(
            self.wheel
                .insert(self.now + self.backoff_ms, TimerRef::AcceptBackoff),
        );
    }

    /// Accept again (backoff timer fired, or a descriptor was freed).
    pub(super) fn resume_accept(&mut self) {
        if !self.accept_paused {
            return;
        }
        if let Some(k) = self.accept_timer.take() {
            self.wheel.cancel(k);
        }
        self.accept_paused = false;
        self.stats.paused_ms += self.now.saturating_sub(self.paused_since);
        self.accept_due = true;
    }

    /// The accept backoff timer fired.
    pub(super) fn accept_timer_fired(&mut self) {
        self.accept_timer = None;
        self.resume_accept();
    }

    /// Log an accept error at most once a second per kind, with how many were suppressed.
    pub(super) fn warn_throttled(&mut self, errno: i32, e: &io::Error) {
        match self.throttle(accept_errno_index(errno), 1) {
            Some(0) => log::warn!("accept failed: {e}"),
            Some(more) => log::warn!("accept failed: {e} ({more} more suppressed)"),
            None => {}
        }
    }

    /// A new connection: admit it, or answer it with 503/429 and let it go.
    pub(super) fn on_accepted(&mut self, stream: TcpStream, peer: SocketAddr, admin: bool) {
        self.stats.accepted += 1;
        let tls = self.tls.is_some() && !admin;
        if tls && self.stats.tls_handshaking >= self.handshake_cap() {
            return self.cap_handshakes(stream);
        }
        // Every per-address key is canonical: an IPv4-mapped IPv6 peer is its IPv4 address.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let admitted = self.conns.len() - self.tally.shedding();
        // The metrics listener is for operators, who need it most when the server is full: its
        // connections skip the client limits and may use the whole fd budget.
        let via_proxy = !admin && self.trusted.contains(peer.ip());
        if tls && !via_proxy && self.handshakes_of(peer.ip()) >= self.handshake_cap_per_address() {
            return self.cap_handshakes(stream);
        }
        let decision = if admin {
            match self.conns.len() < self.fd_budget {
                true => Ok(false),
                false => Err(Verdict::ServerFull),
            }
        } else if self.memory.shedding() || (tls && !self.memory.tls_room()) {
            Err(Verdict::MemoryBudget)
        } else if via_proxy {
            // A trusted proxy speaks for many clients: the per-address limits apply once it has
            // said which client this is (PROXY header or X-Forwarded-For).
            match admitted < self.max_connections {
                true => Ok(false),
                false => Err(Verdict::ServerFull),
            }
        } else {
            self.ledger
                .admission()
                .admit(peer.ip(), self.now, admitted, self.max_connections)
        };
        let verdict = match decision {
            Ok(ip_counted) => {
                self.turn_admitted += 1;
                let deadline = self.now + Self::ms(self.config.handshake_timeout);
                let kind = Kind::Admitted {
                    ip_counted,
                    admin,
                    via_proxy,
                };
                self.insert_conn(stream, peer, deadline, kind);
                return;
            }
            Err(verdict) => verdict,
        };
        self.stats.refused[verdict.index()] += 1;
        self.log_refusal(verdict, peer);
        if tls {
            // A TLS client can read no answer before a handshake, and a handshake is what a
            // refusal spares the server: closed at once.
            drop(stream);
            self.stats.closed[CloseReason::Refused.index()] += 1;
            return;
        }
        let mut stream = stream;
        let _ = stream.write(&refusal(verdict));
        if self.conns.len() < self.fd_budget && self.tally.shedding() < self.shed_cap() {
            // Keep it briefly (see `insert_conn`).
            let deadline = self.now + SHED_LINGER_MS.min(Self::ms(self.config.handshake_timeout));
            self.insert_conn(stream, peer, deadline, Kind::Refused);
        } else {
            // No descriptor to spare for lingering, or as many refused clients held as may be:
            // dropping the stream closes it now; the answer is on its way, or a reset is.
            // Never in the slab, but counted all the same.
            self.stats.closed[CloseReason::Refused.index()] += 1;
        }
    }

    /// This loop's share of `tls_max_handshakes` (at least one; no cap at 0).
    fn handshake_cap(&self) -> usize {
        match self.config.tls_max_handshakes {
            0 => usize::MAX,
            n => n.div_ceil(self.ledger.loops()),
        }
    }

    /// What one address may have of this loop's handshakes in progress: a sixteenth of the
    /// loop's share of `tls_max_handshakes` (at least one), so that one address opening
    /// connections that never finish their handshakes cannot take every place (no cap at 0).
    fn handshake_cap_per_address(&self) -> usize {
        match self.handshake_cap() {
            usize::MAX => usize::MAX,
            n => (n / 16).max(1),
        }
    }

    /// The handshakes in progress on this loop from `ip`'s address (counted under its
    /// per-address key; connections from trusted proxies are not counted).
    fn handshakes_of(&self, ip: std::net::IpAddr) -> usize {
        let key = crate::admission::key_of(ip, self.config.ipv6_prefix_len);
        self.tls_by_address.get(&key).map_or(0, |&n| n as usize)
    }

    /// A handshake from `ip` begins (`true`) or is no longer in progress (`false`): its
    /// address's count in [`Core::tls_by_address`].
    pub(super) fn count_handshake(&mut self, ip: std::net::IpAddr, begins: bool) {
        let key = crate::admission::key_of(ip, self.config.ipv6_prefix_len);
        count_handshake(&mut self.tls_by_address, key, begins);
    }

    /// A new TLS connection while the loop's share of `tls_max_handshakes` is in progress, or
    /// its address's share of it:
    /// closed at once, before any handshake work, the admission table and an answer it could
    /// not read; counted and logged (at most once a second).
    #[inline(never)]
    fn cap_handshakes(&mut self, stream: TcpStream) {
        drop(stream);
        self.stats.tls_handshakes_capped += 1;
        self.stats.closed[CloseReason::Refused.index()] += 1;
        let in_progress = self.stats.tls_handshaking;
        if let Some(more) = self.throttle(LOG_TLS_CAP, 1) {
            log::warn!(
                "{in_progress} TLS handshakes in progress, this loop's cap: closing new connections ({more} more since the last report)"
            );
        }
    }

    /// How many refused connections may be held at once (each for at most a second, so that it
    /// reads its answer before the close): half the descriptors the budget keeps beyond
    /// `max_connections`. The other half stays free for the metrics listener, whose operators
    /// need it most when the server is full, so that clients refused faster than they leave
    /// (one address over its limit, say) can never take it; beyond the cap a refused client's
    /// answer is written and its connection closed at once.
    pub(super) fn shed_cap(&self) -> usize {
        self.fd_budget.saturating_sub(self.max_connections) / 2
    }

    pub(super) fn log_refusal(&mut self, verdict: Verdict, peer: SocketAddr) {
        if let Some(more) = self.throttle(LOG_REFUSALS + verdict.index(), 1) {
            log::info!(
                "refusing connections ({}), latest from {peer} ({more} more since the last report)",
                verdict.label()
            );
        }
    }

    /// Register a new connection and put it in the slab, with its first deadline.
    pub(super) fn insert_conn(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        deadline: u64,
        kind: Kind,
    ) {
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let gen = self.next_gen;
        let ip_counted = matches!(
            kind,
            Kind::Admitted {
                ip_counted: true,
                ..
            }
        );
        // Not inserted after all: counted under `reason`; dropping the socket closes it, and
        // nothing else was allocated.
        let failed = |core: &mut Self, reason: CloseReason| {
            if ip_counted {
                core.ledger.admission().release(peer.ip());
            }
            core.stats.closed[reason.index()] += 1;
        };
        // TLS on the WebSocket listeners; the metrics-only listener stays plain.
        let tls = match kind {
            Kind::Admitted { admin: false, .. } => self.tls.as_ref().map(|t| t.config.clone()),
            _ => None,
        };
        let send_buffer = self.config.socket_send_buffer;
        let mut socket = match tls {
            None => Transport::tcp(stream, send_buffer),
            Some(config) => match Transport::tls(stream, send_buffer, config) {
                Ok(socket) => socket,
                Err(_) => return failed(self, CloseReason::TlsError),
            },
        };
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        let token = Token(conn_id(self.loop_index, idx, gen).0 as usize);
        if idx >= MAX_SLOTS
            || self
                .registry
                .register(&mut socket, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
        {
            return failed(self, CloseReason::IoError);
        }
        let mut conn = Conn::new(socket, gen, peer, deadline);
        conn.born = self.now as u32;
        match kind {
            Kind::Admitted {
                ip_counted,
                admin,
                via_proxy,
            } => {
                conn.ip_counted = ip_counted;
                conn.admin = admin;
                conn.via_proxy = via_proxy;
                conn.awaiting_proxy = via_proxy && self.config.proxy_protocol;
                if conn.awaiting_proxy {
                    // Under TLS the header comes in cleartext, before the ClientHello.
                    conn.socket.expect_proxy_header();
                }
            }
            Kind::Refused => {
                // Answered already: shut down our side and wait for the client's EOF (or the
                // deadline), so that closing does not reset the connection before it read the
                // answer.
                conn.shed = true;
                conn.linger = Some(CloseReason::Refused);
                conn.send.sealed = true;
                conn.half_close();
            }
        }
        self.tally.entered(&conn);
        if conn.socket.is_tls() {
            self.stats.tls_handshaking += 1;
            if !conn.via_proxy {
                let key = crate::admission::key_of(conn.peer.ip(), self.config.ipv6_prefix_len);
                count_handshake(&mut self.tls_by_address, key, true);
            }
            let state = crate::memory::TLS_CONNECTION_BYTES;
            self.memory.resize(crate::memory::Kind::Tls, 0, state);
        }
        entry.insert(conn);
        self.fds_changed();
        self.rearm(idx);
    }
}

/// A descriptor in flight (see [`Ledger::moving`]) for as long as this lives.
pub(super) struct Moving(std::sync::Arc<crate::ledger::Ledger>);

impl Moving {
    pub(super) fn new(ledger: &std::sync::Arc<crate::ledger::Ledger>) -> Moving {
        ledger.moving();
        Moving(ledger.clone())
    }
}

impl Drop for Moving {
    fn drop(&mut self) {
        self.0.settled();
    }
}

/// Count a handshake from the address `key` that begins (`true`) or is no longer in progress
/// (`false`) in `by_address` (an entry only while its count is above 0).
fn count_handshake(
    by_address: &mut std::collections::HashMap<std::net::IpAddr, u32>,
    key: std::net::IpAddr,
    begins: bool,
) {
    match begins {
        true => *by_address.entry(key).or_insert(0) += 1,
        false => {
            if let Some(n) = by_address.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    by_address.remove(&key);
                }
            }
        }
    }
}
