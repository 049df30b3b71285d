//! The Redis bridge: one per process, started with the first loop and stopped with it (as the
//! fd audit is), sharing this process's topics with every other instance on the same Redis.
//!
//! It runs on two threads of its own, one per connection, because a Redis connection that has
//! subscribed can do nothing but (un)subscribe and read its messages:
//!
//! - `wsloop-redis-out` takes the loops' publications from the [`Link`]'s bounded queue and
//!   sends them (`PUBLISH`, numbered per topic, a batch written as one pipeline and its replies
//!   parsed in place: `outbound.rs`), and measures the round trip with a `PING` every
//!   [`PING_EVERY`];
//! - `wsloop-redis-in` subscribes to the channel of every topic with local interest (on any
//!   loop) and unsubscribes from those without, reads the messages of the other instances,
//!   drops (and counts) those over `max_message_size` or not in the wire format, and hands the
//!   others to every loop through the inboxes the loops of a cluster use for each other. It
//!   reads its socket itself (`inbound.rs`): large reads, every reply parsed in place by
//!   [`resp`](crate::protocol::resp) (no allocation per reply, a payload over the limit dropped
//!   as it arrives, never held), this instance's own messages (which Redis sends back to it)
//!   skipped on their header's instance id before anything is copied, and the messages of one
//!   read handed to the loops as one batch (one lock of each inbox, and one wake-up of a loop
//!   whose inbox was empty). The `redis` crate's reply parser built a `Value` per message and
//!   per reply, and the hand-off was one message at a time: that cost per message, measured in
//!   BENCHMARKS.md, is what these readers remove. The crate still parses the URL, packs the
//!   (un)subscription commands, and asks a cluster node for `CLUSTER SLOTS` (`sharded.rs`).
//!
//! Either thread reconnects after any error (Redis down, killed, or closing the connection, as
//! it does to a subscriber over its output-buffer limit; for the subscriber also an error
//! reply, a malformed stream, or a subscription not confirmed within [`IO_TIMEOUT`]) with a
//! backoff from [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`]; after a reconnection the
//! subscriber subscribes again to every topic with local interest. Local delivery never waits
//! for either.
//!
//! With sharded pub/sub (`RedisConfig::sharded`) the publisher sends `SPUBLISH` to the primary
//! of a Redis Cluster that serves the channel's slot, and the subscriber runs a reader per
//! primary that subscribes there with `SSUBSCRIBE` (`sharded.rs`).
//!
//! Descriptors: [`connect_raw`] opens the publisher's and the subscriber's sockets, and the
//! crate the short-lived one that asks for `CLUSTER SLOTS` (`Client::get_connection_with_timeout`
//! in [`connect_once`]); this file counts each in the ledger around the call: [`Ledger::moving`] twice before it (a host
//! name's resolution may open a file or a socket for a moment), the socket counted with
//! [`Ledger::bridge_fd`] once connected, and uncounted before it is dropped. The fd budget
//! keeps the most the bridge may hold ([`bridge_fds`](crate::broker::bridge_fds): two, or two
//! per primary with sharding) out of the connections' share ([`Ledger::bridge_reserve`]).

use crate::broker::{header, Link, Refused, Sequences, SEND_FAILED};
use crate::ledger::Ledger;
use crate::protocol::resp::Frame;
use inbound::Inbound;
use outbound::Outbound;
use std::collections::HashMap;
use std::io::{self, Read, Write};
// The subscriber's own sockets, opened and counted in the ledger by `connect_raw`.
#[allow(clippy::disallowed_types)]
use std::net::TcpStream;
use std::net::ToSocketAddrs;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

mod inbound;
mod outbound;
mod sharded;

/// The first wait before reconnecting; doubled after each failure.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait before reconnecting.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often the publisher measures the round trip.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(2);
/// How long connecting, or waiting for a reply, may take before the connection counts as down.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the subscriber waits for a message before it looks at local interest again: the
/// most a new local topic waits for its channel to be subscribed.
const POLL: Duration = Duration::from_millis(20);
/// A subscriber connection that failed sooner than this after it was made is made again only
/// after a backoff.
const HEALTHY: Duration = Duration::from_secs(1);
/// Publications sent in one pipeline at most.
const PIPELINE: usize = 256;
/// The subscriber logs a message it dropped at most this often (with how many more it
/// dropped since); each one at debug level.
const LOG_DROPS_EVERY: Duration = Duration::from_secs(10);
/// The most of a channel's name a log line shows.
const LOG_CHANNEL: usize = 80;

/// The bridge's threads; stopped (and joined) when dropped.
pub(crate) struct Bridge {
    link: Arc<Link>,
    threads: Vec<JoinHandle<()>>,
}

impl Bridge {
    /// Start the bridge for `ledger`'s link (none: no bridge).
    pub(crate) fn start(ledger: &Arc<Ledger>) -> io::Result<Option<Bridge>> {
        let Some(link) = ledger.link().cloned() else {
            return Ok(None);
        };
        redis::IntoConnectionInfo::into_connection_info(link.config.url.as_str())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut bridge = Bridge {
            link: link.clone(),
            threads: Vec::new(),
        };
        let (l, s) = (ledger.clone(), link.clone());
        bridge.threads.push(
            thread::Builder::new()
                .name("wsloop-redis-out".into())
                .spawn(move || publisher(&l, &s))?,
        );
        let (l, s) = (ledger.clone(), link);
        bridge.threads.push(
            thread::Builder::new()
                .name("wsloop-redis-in".into())
                .spawn(move || match s.config.sharded {
                    true => sharded::subscriber(&l, &s),
                    false => subscriber(&l, &s),
                })?,
        );
        Ok(Some(bridge))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.link.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A connection to Redis (the crate's, or the subscriber's own socket), counted in the ledger
/// while it is open.
struct Counted<'a, C = redis::Connection> {
    ledger: &'a Ledger,
    con: Option<C>,
}

impl<C> Drop for Counted<'_, C> {
    fn drop(&mut self) {
        if let Some(con) = self.con.take() {
            self.ledger.moving();
            self.ledger.bridge_fd(false);
            drop(con);
            self.ledger.settled();
        }
    }
}

/// A socket of the bridge's own (the publisher's and the subscriber's), opened and counted in
/// the ledger by [`connect_raw`] only.
#[allow(clippy::disallowed_types)]
type Raw<'a> = Counted<'a, TcpStream>;

/// One attempt to connect, the socket counted in the ledger if it opens.
#[allow(clippy::disallowed_methods)] // the bridge's sockets, counted in the ledger here
fn connect_once<'a>(ledger: &'a Ledger, client: &redis::Client) -> redis::RedisResult<Counted<'a>> {
    ledger.moving();
    ledger.moving();
    let got = client.get_connection_with_timeout(IO_TIMEOUT);
    if got.is_ok() {
        ledger.bridge_fd(true);
    }
    ledger.settled();
    ledger.settled();
    got.map(|con| Counted {
        ledger,
        con: Some(con),
    })
}

/// One attempt to connect a socket of the bridge's own to the Redis at `info` (TCP: the
/// configuration takes `redis://` URLs only), counted in the ledger if it opens, with its read
/// timeout [`POLL`], and authenticated with `AUTH` if `info` has a password. Its replies and
/// messages are read by the bridge itself (`inbound.rs`, `outbound.rs`), not by the crate.
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // counted in the ledger here
fn connect_raw<'a>(ledger: &'a Ledger, info: &redis::ConnectionInfo) -> Result<Raw<'a>, String> {
    let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
        return Err(format!("{}: not a TCP address", info.addr()));
    };
    ledger.moving();
    ledger.moving();
    let mut why = format!("{host}:{port}: no address");
    let mut got = None;
    match (host.as_str(), *port).to_socket_addrs() {
        Ok(addrs) => {
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
                    Ok(s) => {
                        got = Some(s);
                        break;
                    }
                    Err(e) => why = format!("{addr}: {e}"),
                }
            }
        }
        Err(e) => why = format!("{host}:{port}: {e}"),
    }
    if got.is_some() {
        ledger.bridge_fd(true);
    }
    ledger.settled();
    ledger.settled();
    let mut counted = Counted { ledger, con: got };
    let stream = counted.con.as_mut().ok_or(why)?;
    let settings = info.redis_settings();
    let setup = stream
        .set_nodelay(true)
        .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|_| stream.set_read_timeout(Some(IO_TIMEOUT)));
    setup.map_err(|e| e.to_string())?;
    if let Some(password) = settings.password() {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password);
        stream
            .write_all(&auth.get_packed_command())
            .map_err(|e| e.to_string())?;
        auth_reply(stream)?;
    }
    stream
        .set_read_timeout(Some(POLL))
        .map_err(|e| e.to_string())?;
    Ok(counted)
}

/// Read the reply to `AUTH` (within the socket's read timeout): `+OK`, or the error.
fn auth_reply(stream: &mut impl Read) -> Result<(), String> {
    let mut reader = crate::protocol::resp::Reader::new(0);
    loop {
        let n = stream
            .read(reader.spare())
            .map_err(|e| format!("AUTH: {e}"))?;
        if n == 0 {
            return Err("AUTH: unexpected end of file".into());
        }
        reader.filled(n);
        match reader.next_frame() {
            Ok(Some(Frame::Simple(b"OK"))) => return Ok(()),
            Ok(Some(Frame::Error(e))) => return Err(String::from_utf8_lossy(e).into_owned()),
            Ok(Some(other)) => return Err(format!("AUTH: unexpected reply {other:?}")),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `attempt` until it works (the backoff starts again from its shortest) or the bridge stops
/// (`None`); after each failure wait the backoff, doubled each time, and say so once.
fn retry<T>(
    link: &Link,
    backoff: &mut Duration,
    what: &str,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> Option<T> {
    let mut first = true;
    while !link.stopped() {
        match attempt() {
            Ok(t) => {
                *backoff = BACKOFF_MIN;
                return Some(t);
            }
            Err(e) => {
                if first {
                    log::warn!(
                        "redis {what}: cannot connect to {}: {e}; retrying with backoff",
                        redacted(&link.config.url)
                    );
                    first = false;
                }
                sleep(link, *backoff);
                *backoff = (*backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    None
}

/// Sleep `d`, or until the bridge is stopped.
fn sleep(link: &Link, d: Duration) {
    let until = Instant::now() + d;
    while !link.stopped() {
        let now = Instant::now();
        if now >= until {
            return;
        }
        thread::sleep((until - now).min(Duration::from_millis(20)));
    }
}

/// The channel of `topic`.
fn channel(link: &Link, topic: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(link.config.prefix.len() + topic.len());
    c.extend_from_slice(link.config.prefix.as_bytes());
    c.extend_from_slice(topic);
    c
}

/// The publisher thread (see the module docs): one connection of its own and `PUBLISH`; or,
/// with `RedisConfig::sharded`, a connection to each primary and `SPUBLISH` to the one that
/// serves the channel's slot (`sharded.rs`). Each batch is written as one pipeline per
/// connection and its replies read back by `outbound.rs`.
fn publisher(ledger: &Ledger, link: &Link) {
    let Some(info) = url_info(link, "publisher") else {
        return;
    };
    let mut backoff = BACKOFF_MIN;
    let mut seqs: HashMap<Arc<[u8]>, u64> = HashMap::new();
    let mut connected_once = false;
    let mut known = Vec::new();
    let mut chan = Vec::new();
    let command = if link.config.sharded {
        "SPUBLISH"
    } else {
        "PUBLISH"
    };
    while let Some((mut nodes, topology)) =
        connect_publisher(ledger, &info, link, &mut backoff, &mut known)
    {
        let timeouts = nodes.iter_mut().all(|c| {
            c.con
                .as_mut()
                .is_some_and(|s| s.set_read_timeout(Some(IO_TIMEOUT)).is_ok())
        });
        if !timeouts {
            continue;
        }
        let mut outs: Vec<Outbound> = nodes.iter().map(|_| Outbound::new()).collect();
        if connected_once {
            link.counters.reconnects.fetch_add(1, Relaxed);
        }
        connected_once = true;
        let mut next_ping = Instant::now();
        loop {
            if Instant::now() >= next_ping {
                let Some(rtt) = ping_all(&mut nodes, &mut outs) else {
                    break;
                };
                let c = &link.counters;
                c.rtt_ns.store(rtt.as_nanos() as u64, Relaxed);
                if !c.up_out.swap(true, Relaxed) {
                    log::info!(
                        "redis publisher: connected to {}",
                        redacted(&link.config.url)
                    );
                }
                next_ping = Instant::now() + PING_EVERY;
            }
            let wait = next_ping.saturating_duration_since(Instant::now());
            let batch = link.take(wait, PIPELINE);
            if link.stopped() {
                return;
            }
            if batch.is_empty() {
                continue;
            }
            if seqs.len() + batch.len() > crate::broker::MAX_SEQUENCES {
                seqs.clear();
            }
            // One pipeline per node (one in all without sharding), in the batch's order.
            for f in &batch {
                let seq = seqs.entry(f.topic.clone()).or_insert(0);
                *seq += 1;
                chan.clear();
                chan.extend_from_slice(link.config.prefix.as_bytes());
                chan.extend_from_slice(&f.topic);
                let head = header(link.instance, *seq, f.text);
                outs[topology.node_of(&chan)].publish(command, &chan, &head, &f.payload);
            }
            if let Err(e) = send(link, &mut nodes, &mut outs) {
                log::warn!("redis publisher: {e}; reconnecting");
                break;
            }
        }
        link.counters.up_out.store(false, Relaxed);
    }
}

/// The configured URL's address and credentials (checked when the configuration was).
fn url_info(link: &Link, what: &str) -> Option<redis::ConnectionInfo> {
    match redis::IntoConnectionInfo::into_connection_info(link.config.url.as_str()) {
        Ok(info) => Some(info),
        Err(e) => {
            log::error!("redis {what}: {}: {e}", redacted(&link.config.url));
            None
        }
    }
}

/// The publisher's connections: one to the configured Redis, or one to each primary of the
/// cluster (with sharding; `known`: the primaries found last time).
fn connect_publisher<'a>(
    ledger: &'a Ledger,
    info: &redis::ConnectionInfo,
    link: &Link,
    backoff: &mut Duration,
    known: &mut Vec<redis::ConnectionInfo>,
) -> Option<(Vec<Raw<'a>>, sharded::Topology)> {
    match link.config.sharded {
        true => sharded::connect_all(ledger, link, backoff, known),
        false => retry(link, backoff, "publisher", || connect_raw(ledger, info))
            .map(|c| (vec![c], sharded::Topology::single())),
    }
}

/// `PING` every connection: the slowest round trip, or `None` if one failed.
fn ping_all(nodes: &mut [Raw<'_>], outs: &mut [Outbound]) -> Option<Duration> {
    let mut rtt = Duration::ZERO;
    for (c, o) in nodes.iter_mut().zip(outs) {
        rtt = rtt.max(o.ping(c.con.as_mut()?).ok()?);
    }
    Some(rtt)
}

/// Send each connection its pipeline: those acknowledged are counted as sent, the others as
/// dropped; the first error, if any.
fn send(link: &Link, nodes: &mut [Raw<'_>], outs: &mut [Outbound]) -> Result<(), String> {
    let mut result = Ok(());
    for (c, o) in nodes.iter_mut().zip(outs) {
        let n = o.pending();
        if n == 0 {
            continue;
        }
        let (acked, sent) = match c.con.as_mut() {
            Some(stream) => o.flush(stream),
            None => (0, Err("not connected".into())),
        };
        link.counters.sent.fetch_add(acked, Relaxed);
        link.counters.dropped[SEND_FAILED].fetch_add(n - acked, Relaxed);
        if let (Err(e), Ok(())) = (sent, &result) {
            result = Err(e);
        }
    }
    result
}

/// The subscriber thread (see the module docs): one connection of its own, its replies and
/// messages read by `inbound.rs`.
fn subscriber(ledger: &Ledger, link: &Link) {
    let Some(info) = url_info(link, "subscriber") else {
        return;
    };
    let mut backoff = BACKOFF_MIN;
    // For connections that fail once made: before their subscriptions were confirmed, or
    // within [`HEALTHY`] (an error reply, a malformed stream, Redis closing it at once), so
    // that such a Redis is not asked again in a tight loop.
    let mut again = BACKOFF_MIN;
    let mut seen = Sequences::default();
    let mut drops = Throttle::default();
    while let Some(mut counted) = retry(link, &mut backoff, "subscriber", || {
        connect_raw(ledger, &info)
    }) {
        let since = Instant::now();
        let Some(stream) = counted.con.as_mut() else {
            break;
        };
        let mut inbound = Inbound::new(link, &inbound::PLAIN);
        // Every topic with local interest is subscribed again on a new connection.
        let mut version = u64::MAX;
        let mut up = false;
        let why = loop {
            if link.stopped() {
                return;
            }
            if let Some((v, wanted)) = link.wanted(version) {
                let out = inbound.update(wanted.into_iter().collect(), &mut seen);
                if let Err(e) = stream.write_all(&out) {
                    break e.to_string();
                }
                version = v;
            }
            if !up && inbound.confirmed() {
                up = true;
                link.counters.up_in.store(true, Relaxed);
                log::info!(
                    "redis subscriber: connected to {}",
                    redacted(&link.config.url)
                );
            }
            if let Some(late) = inbound.overdue(Instant::now()) {
                break late;
            }
            match inbound.read(stream) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => break e,
            }
            if let Err(e) = inbound.deliver(ledger, &mut seen, &mut drops) {
                break e;
            }
        };
        log::warn!("redis subscriber: {why}; reconnecting");
        link.counters.up_in.store(false, Relaxed);
        drop(counted);
        if up && since.elapsed() >= HEALTHY {
            again = BACKOFF_MIN;
        } else {
            sleep(link, again);
            again = (again * 2).min(BACKOFF_MAX);
        }
    }
}

/// A channel's name for a log line: escaped, and cut at [`LOG_CHANNEL`] bytes.
fn shown(chan: &[u8]) -> String {
    let cut = &chan[..chan.len().min(LOG_CHANNEL)];
    let more = if cut.len() < chan.len() { "..." } else { "" };
    format!("{}{more}", cut.escape_ascii())
}

/// Log a dropped message: each at debug level, and at info level at most once every
/// [`LOG_DROPS_EVERY`], with how many were dropped since the last such line.
fn log_drop(drops: &mut Throttle, why: Refused, chan: &[u8], bytes: u64) {
    let why = why.as_str();
    log::debug!(
        "redis subscriber: dropped a message on {} ({bytes} bytes): {why}",
        shown(chan)
    );
    if let Some(more) = drops.due(Instant::now(), LOG_DROPS_EVERY) {
        log::info!(
            "redis subscriber: dropped a message on {} ({bytes} bytes): {why} \
             ({more} more dropped since the last report; see wsloop_broker_dropped_total)",
            shown(chan)
        );
    }
}

/// One line at most every period: how many more happened in between.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// One more happened at `now`: `Some(suppressed since the last line)` if a line is due.
    fn due(&mut self, now: Instant, every: Duration) -> Option<u64> {
        match self.last {
            Some(last) if now < last + every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// `url` as the logs show it: a password in it (`redis://user:PASSWORD@host/`) replaced by
/// `***`, so that logs, which are read by more people than the configuration, never hold it.
fn redacted(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.into();
    };
    let authority_end = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |i| scheme_end + i);
    let Some(at) = url[scheme_end..authority_end]
        .rfind('@')
        .map(|i| scheme_end + i)
    else {
        return url.into();
    };
    let userinfo = &url[scheme_end..at];
    let user = userinfo.split_once(':').map_or("", |(u, _)| u);
    format!("{}{user}:***{}", &url[..scheme_end], &url[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_never_reaches_the_logs() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.5:6379/"),
            "redis://:***@10.0.0.5:6379/"
        );
        assert_eq!(
            redacted("redis://app:s3cret@redis.internal/2"),
            "redis://app:***@redis.internal/2"
        );
        assert_eq!(redacted("redis://a:b:c@h"), "redis://a:***@h");
        for plain in ["redis://127.0.0.1:6379/", "redis://h/0?x=a@b", "not a url"] {
            assert_eq!(redacted(plain), plain);
        }
    }

    #[test]
    fn the_drop_log_is_throttled_and_says_how_many_it_left_out() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        assert_eq!(t.due(t0, every), Some(0));
        assert_eq!(t.due(t0 + Duration::from_secs(1), every), None);
        assert_eq!(t.due(t0 + Duration::from_secs(9), every), None);
        assert_eq!(t.due(t0 + every, every), Some(2));
        assert_eq!(t.due(t0 + every, every), None);
        assert_eq!(t.due(t0 + 3 * every, every), Some(1));
    }

    #[test]
    fn channels_are_shown_escaped_and_cut() {
        assert_eq!(shown(b"wsloop:/a\n\xff"), "wsloop:/a\\n\\xff");
        let long = vec![b'x'; 300];
        assert_eq!(shown(&long), format!("{}...", "x".repeat(LOG_CHANNEL)));
    }
}
