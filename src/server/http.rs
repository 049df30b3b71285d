//! Before the upgrade: the PROXY header, the handshake (admission of a forwarded client, the
//! RFC 6455 checks, the origin policy, the application's upgrade hook), the 101, and the plain
//! HTTP requests the loop answers itself (`/metrics`, `/healthz`, refusals).

use super::conn::conn_id;
use super::core::{Core, LOG_REJECTS};
use super::event_loop::Inner;
use super::ws::{callback, frames, guarded};
use crate::app::{CloseReason, Decision, Handler, UpgradeRequest};
use crate::config::Compression;
use crate::protocol::deflate::{self, Agreement, Dedicated, Profile, MAX_WINDOW_BITS};
use crate::protocol::handshake::{self, Rejection};
use crate::protocol::session::Head;
use crate::watchdog::Activity;
use std::net::SocketAddr;

impl<H: Handler> Inner<H> {
    /// A connection from a trusted proxy starts with a PROXY header: read it, take the client
    /// address it reports, apply the per-address limits to that client, and hand what follows
    /// it to the handshake.
    pub(super) fn proxy_header(&mut self, idx: usize, n: usize) -> bool {
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
                    conn_id(core.loop_index, idx, conn.gen),
                    conn.peer
                );
                core.cork_for(idx);
                let rej = Rejection::custom(400, "bad PROXY protocol header");
                return reject(core, handler, idx, &rej);
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
            conn.peer = client.into();
        }
        let (ip, counted) = (conn.peer.ip(), &mut conn.ip_counted);
        if let Err(verdict) = core
            .tally
            .admit_address(&core.ledger, core.now, ip, counted)
        {
            return core.refuse_client(handler, idx, verdict);
        }
        if conn.socket.is_tls() {
            // The rest is the start of the TLS stream: rustls reads it, before the socket, on
            // a read at the start of the next turn (the socket may be drained: no edge would
            // come for bytes already read).
            if conn.socket.start_tls(&recv[..rest]) && !conn.read_later {
                conn.read_later = true;
                core.reread.push((idx, conn.gen));
            }
            return true;
        }
        rest == 0 || self.handshake(idx, rest)
    }

    pub(super) fn handshake(&mut self, idx: usize, n: usize) -> bool {
        let Inner {
            core,
            handler,
            recv,
            ..
        } = self;
        core.cork_for(idx);
        let conn = &mut core.conns[idx];
        let (head_len, buffered, data, subprotocol, deflate) = match conn
            .session
            .feed_head(&recv[..n], &core.limits)
        {
            Ok(Head::Partial) => return true,
            Err(rej) => {
                return reject(core, handler, idx, &rej);
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
                        conn.peer = SocketAddr::new(key, 0).into();
                    }
                    let (tally, counted) = (&mut core.tally, &mut conn.ip_counted);
                    if let Err(verdict) = tally.admit_address(&core.ledger, core.now, key, counted)
                    {
                        return core.refuse_client(handler, idx, verdict);
                    }
                }
                let upgrade = match handshake::validate_upgrade(&request) {
                    Ok(u) => u,
                    Err(rej) => {
                        return reject(core, handler, idx, &rej);
                    }
                };
                if let Err(refusal) = core.origin.check(upgrade.origin()) {
                    log::debug!("{}: {refusal}", conn.peer);
                    let rej = Rejection::custom(403, refusal.reason());
                    return reject(core, handler, idx, &rej);
                }
                // permessage-deflate: a malformed header fails the handshake here, before the
                // application is asked; no acceptable offer means no compression.
                let profile = match core.config.compression {
                    Compression::Off => None,
                    Compression::Shared => Some(Profile::Shared),
                    Compression::Dedicated => Some(Profile::Dedicated {
                        window_bits: core.config.compression_window_bits,
                    }),
                };
                let offers = upgrade.request().header_all("sec-websocket-extensions");
                let mut deflate = match profile.map(|p| deflate::negotiate(offers, p)) {
                    None => None,
                    // An offer without context takeover either way gains nothing from state
                    // of its own: the loop's shared compressor serves it (the answer is the
                    // same).
                    Some(Ok(agreement)) => agreement.map(|a| match a {
                        Agreement {
                            server_no_context_takeover: true,
                            client_no_context_takeover: true,
                            ..
                        } => (a, Some(Profile::Shared)),
                        _ => (a, profile),
                    }),
                    Some(Err(malformed)) => {
                        log::debug!("{}: {malformed}", conn.peer);
                        let rej = Rejection::custom(400, malformed.0);
                        return reject(core, handler, idx, &rej);
                    }
                };
                let req = UpgradeRequest {
                    upgrade,
                    peer: conn.peer,
                };
                let id = conn_id(core.loop_index, idx, conn.gen);
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
                    return reject(core, handler, idx, &rej);
                };
                match decision {
                    Decision::Reject { status, reason } => {
                        let rej = Rejection::custom(status, reason);
                        return reject(core, handler, idx, &rej);
                    }
                    Decision::Accept { data, subprotocol } => {
                        if let Some(p) = subprotocol.as_deref() {
                            if !req.subprotocols().any(|o| o == p) {
                                log::error!("upgrade hook chose subprotocol {p:?}, which the client did not offer");
                                let rej = Rejection::custom(
                                    500,
                                    "server chose a subprotocol the client did not offer",
                                );
                                return reject(core, handler, idx, &rej);
                            }
                        }
                        if let Some((agreement, Some(Profile::Dedicated { .. }))) = &deflate {
                            // Its own state, if the compression budget has room and this loop
                            // holds at most half its memory share in such state; else the
                            // shared profile (whose answer differs: negotiated again).
                            let config = &core.config;
                            let bytes = Dedicated::heap_bytes(
                                agreement,
                                config.compression_window_bits,
                                config.compression_mem_level,
                            );
                            let local = core.codec.dedicated_bytes() + bytes;
                            if local > core.memory.limit() / 2
                                || !core.ledger.reserve_compression(bytes)
                            {
                                core.stats.compression_downgrades += 1;
                                let offers =
                                    req.upgrade.request().header_all("sec-websocket-extensions");
                                deflate = deflate::negotiate(offers, Profile::Shared)
                                    .ok()
                                    .flatten()
                                    .map(|a| (a, Some(Profile::Shared)));
                            }
                        }
                        handshake::write_accept_with(
                            &mut core.cork,
                            req.upgrade.key(),
                            subprotocol.as_deref(),
                            deflate.as_ref().map(|(a, _)| a),
                        );
                        (head_len, buffered, data, subprotocol, deflate)
                    }
                }
            }
        };
        let rest = conn.session.finish_handshake(head_len, buffered);
        match deflate {
            None => {}
            Some((agreement, Some(Profile::Dedicated { window_bits }))) => {
                // Its own compressor and decompressor (the budget reserved above).
                let mem_level = core.config.compression_mem_level;
                let state = Dedicated::new(&agreement, window_bits, mem_level);
                conn.session
                    .enable_deflate(agreement.deflate_window_bits().min(window_bits));
                core.codec.adopt_dedicated(state.bytes);
                conn.rare().dedicated = Some(Box::new(state));
                core.stats.compression_connections[1] += 1;
                // Publications compressed once for all fit only a connection whose server side
                // keeps no context; with context takeover it takes them plain.
                let free = agreement.server_no_context_takeover
                    && agreement.deflate_window_bits() == MAX_WINDOW_BITS;
                core.pubsub.fanout.set_compressed(idx, free);
            }
            Some((agreement, _)) => {
                let bits = agreement.deflate_window_bits();
                conn.session.enable_deflate(bits);
                // The loop's decompressor is made with the first connection that may need it
                // (counted in the memory budget at the end of the turn).
                core.codec.inflater();
                core.stats.compression_connections[0] += 1;
                // Publications are compressed once, with the largest window, for every
                // subscriber that allows it; one that asked for a smaller window takes them
                // plain.
                let full = bits == MAX_WINDOW_BITS;
                core.pubsub.fanout.set_compressed(idx, full);
            }
        }
        conn.data = Some(data);
        if let Some(p) = subprotocol {
            conn.rare().subprotocol = Some(p.into_boxed_str());
        }
        conn.deadline = core.now.saturating_add(core.ping_after);
        let lifetime = Core::<H::Data>::ms(core.config.max_lifetime);
        if lifetime > 0 {
            conn.expire_at = core.now + lifetime;
        }
        core.rearm(idx);
        let conn = &core.conns[idx];
        log::debug!(
            "{} open from {}",
            conn_id(core.loop_index, idx, conn.gen),
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
}

/// Answer a refused request with `rej` and end the connection. Returns false.
pub(super) fn reject<H: Handler>(
    core: &mut Core<H::Data>,
    handler: &mut H,
    idx: usize,
    rej: &Rejection,
) -> bool {
    let status = rej.status();
    core.cork_for(idx);
    handshake::write_rejection(&mut core.cork, rej);
    let conn = &mut core.conns[idx];
    let peer = conn.peer;
    log::debug!(
        "{} from {peer} rejected with {status}",
        conn_id(core.loop_index, idx, conn.gen)
    );
    conn.session.finish_rejected();
    if let Some(more) = core.throttle(LOG_REJECTS, 1) {
        log::info!("rejecting handshakes: {status} to {peer} ({more} more since the last report)");
    }
    core.stats.rejected_status[crate::metrics::status_index(status)] += 1;
    core.finish(handler, idx, CloseReason::Rejected(status));
    false
}

/// The plain HTTP requests the loop answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    Metrics,
    Health,
    Other,
}

impl Route {
    pub(super) fn of(method: &str, path: &str) -> Route {
        match (method, path) {
            ("GET", "/metrics") => Route::Metrics,
            ("GET", "/healthz") => Route::Health,
            _ => Route::Other,
        }
    }
}

impl<D> Core<D> {
    /// Answer a client that the per-address limits refused, once a trusted proxy named it
    /// (503 or 429), and end the connection.
    pub(super) fn refuse_client<H: Handler<Data = D>>(
        &mut self,
        handler: &mut H,
        idx: usize,
        verdict: crate::admission::Verdict,
    ) -> bool {
        self.stats.refused[verdict.index()] += 1;
        // A TLS client whose handshake has not begun (its PROXY header was just read) could
        // not read a cleartext answer (as a refusal at accept): closed without one, before
        // any handshake work.
        if !self.conns[idx].socket.handshaking() {
            self.cork_for(idx);
            self.cork
                .extend_from_slice(&super::accept::refusal(verdict));
        }
        self.conns[idx].session.finish_rejected();
        self.finish(handler, idx, CloseReason::Refused);
        false
    }

    /// Answer a plain HTTP request (metrics or health, within the endpoints' rate, else 429; or
    /// an error) and end the connection.
    pub(super) fn answer_http<H: Handler<Data = D>>(
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
                    // Local service works: 200, with the broker's state when there is one.
                    let body = match self.health_detail() {
                        Some(d) => format!("ok\n{d}\n"),
                        None => "ok\n".into(),
                    };
                    handshake::write_response(&mut self.cork, 200, "OK", &[], body.as_bytes())
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
}
