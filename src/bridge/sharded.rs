//! Sharded pub/sub (`RedisConfig::sharded`, `--redis-sharded`; Redis 7): the bridge publishes
//! with `SPUBLISH` and subscribes with `SSUBSCRIBE`, so that on a Redis Cluster a topic's
//! messages travel only through the primary that serves its channel's slot, instead of being
//! broadcast over the cluster bus to every node as `PUBLISH` is.
//!
//! The redis crate's synchronous cluster connection does no pub/sub (its asynchronous one does,
//! on tokio, and opens its sockets where the fd ledger cannot count them), so the bridge routes
//! by itself on single-node connections (its own sockets; the crate's for `CLUSTER SLOTS`):
//!
//! - [`discover`] asks the configured node (or, if it does not answer, the primaries known from
//!   last time) for `CLUSTER SLOTS`: the primaries, at most [`MAX_NODES`], and which serves
//!   each of the 16,384 slots (every slot must be served). A Redis without cluster mode refuses
//!   the command; it is then one node serving every slot (`SSUBSCRIBE` and `SPUBLISH` behave
//!   there as `SUBSCRIBE` and `PUBLISH`).
//! - A channel's slot is Redis Cluster's: CRC16 (XMODEM) of the channel's name, or of its hash
//!   tag (the bytes between the first `{` and the next `}`, when not empty), modulo 16,384.
//! - The publisher (`bridge.rs`) holds a connection to each primary and sends each node its
//!   share of a batch as one pipeline; an error (a node gone, or `MOVED` after a slot moved)
//!   drops that node's share (counted) and makes it discover the cluster again.
//! - The subscriber thread discovers the cluster and runs a reader per primary ([`subscriber`]),
//!   each on a socket of its own read as the plain subscriber's is (`inbound.rs`, RESP2: a
//!   message is told from a reply by its first element): it subscribes to the channels of the
//!   topics with local interest whose slot its node serves. When any reader fails (its node
//!   gone; an error reply, as `MOVED` to a `SSUBSCRIBE`; no confirmation of a `SSUBSCRIBE`
//!   within the I/O timeout; or Redis unsubscribing it, as Redis 7 does when a slot moves away),
//!   they all stop, and the subscriber discovers the cluster again, with the bridge's backoff,
//!   and subscribes again on the primaries it then finds.
//!
//! Messages published while a slot moves, or while a node is failing over, are lost, as those
//! published while Redis is down are (pub/sub is at-most-once): the receivers count them as
//! gaps.

use super::inbound::{self, Inbound};
use super::{
    channel, connect_once, connect_raw, retry, sleep, Raw, Throttle, BACKOFF_MAX, BACKOFF_MIN,
    IO_TIMEOUT,
};
use crate::broker::{Link, Sequences, MAX_NODES};
use crate::ledger::Ledger;
use redis::{ConnectionAddr, ConnectionInfo, Value};
use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

fn lock_shared<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The slots of a Redis Cluster.
const SLOTS: usize = 16_384;

/// CRC16 as Redis Cluster computes it (XMODEM: polynomial 0x1021, initial value 0, no
/// reflection): the Redis Cluster specification gives `CRC16("123456789") = 0x31C3`.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a channel: of its hash tag (the bytes between the first `{` and the next `}`)
/// if that is not empty, else of its whole name.
pub(super) fn slot(channel: &[u8]) -> usize {
    let tag = channel.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &channel[open + 1..];
        let len = rest.iter().position(|&b| b == b'}')?;
        (len > 0).then(|| &rest[..len])
    });
    usize::from(crc16(tag.unwrap_or(channel))) % SLOTS
}

/// The primaries and which of them serves each slot.
pub(super) struct Topology {
    /// Where each primary listens (with the configured URL's credentials).
    nodes: Vec<ConnectionInfo>,
    /// Per slot, the index of its primary in `nodes`; empty: one node serves every slot (no
    /// sharding, or a Redis without cluster mode).
    owner: Vec<u8>,
}

impl Topology {
    /// One connection for every channel (no sharding: the configured Redis).
    pub(super) fn single() -> Topology {
        Topology {
            nodes: Vec::new(),
            owner: Vec::new(),
        }
    }

    /// The index of the node that serves `channel`.
    pub(super) fn node_of(&self, channel: &[u8]) -> usize {
        match self.owner.is_empty() {
            true => 0,
            false => usize::from(self.owner[slot(channel)]),
        }
    }

    /// A node's address, for the log.
    fn name(&self, node: usize) -> String {
        match self.nodes.get(node).map(ConnectionInfo::addr) {
            Some(ConnectionAddr::Tcp(host, port)) => format!("{host}:{port}"),
            Some(other) => other.to_string(),
            None => "?".into(),
        }
    }
}

/// Read `CLUSTER SLOTS`: the primary of each slot range (the first address after the range).
/// A node that announces no address (an empty or `?` endpoint) is taken to be on `base`'s host.
fn parse_slots(base: &ConnectionInfo, reply: &Value) -> Result<Topology, String> {
    let bad = |what: &str| format!("CLUSTER SLOTS: {what}");
    let Value::Array(ranges) = reply else {
        return Err(bad("not an array"));
    };
    let base_host = match base.addr() {
        ConnectionAddr::Tcp(host, _) => host.clone(),
        _ => return Err(bad("the configured address is not TCP")),
    };
    let mut nodes: Vec<(String, u16)> = Vec::new();
    let mut owner = vec![u8::MAX; SLOTS];
    for range in ranges {
        let Value::Array(f) = range else {
            return Err(bad("a range is not an array"));
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
            (f.first(), f.get(1), f.get(2))
        else {
            return Err(bad("a range without its primary"));
        };
        let host = match primary.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => return Err(bad("a primary without a host")),
        };
        let host = match host.as_str() {
            "" | "?" => base_host.clone(),
            _ => host,
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            return Err(bad("a primary without a port"));
        };
        let port = u16::try_from(*port).map_err(|_| bad("a port out of range"))?;
        let (Ok(start), Ok(end)) = (usize::try_from(*start), usize::try_from(*end)) else {
            return Err(bad("a slot out of range"));
        };
        if start > end || end >= SLOTS {
            return Err(bad("a slot out of range"));
        }
        let node = match nodes.iter().position(|n| n.0 == host && n.1 == port) {
            Some(i) => i,
            None if nodes.len() == MAX_NODES => {
                return Err(format!(
                    "more than {MAX_NODES} primaries: the bridge connects to at most {MAX_NODES}"
                ))
            }
            None => {
                nodes.push((host, port));
                nodes.len() - 1
            }
        };
        owner[start..=end].fill(node as u8);
    }
    if let Some(free) = owner.iter().position(|&o| o == u8::MAX) {
        return Err(format!(
            "slot {free} is served by no primary (the cluster is not ready)"
        ));
    }
    let nodes = nodes
        .into_iter()
        .map(|(host, port)| base.clone().set_addr(ConnectionAddr::Tcp(host, port)))
        .collect();
    Ok(Topology { nodes, owner })
}

/// The cluster's primaries and their slots, from the configured node or, if it does not
/// answer, from one of those known from last time (`known`, updated).
fn discover(
    ledger: &Ledger,
    link: &Link,
    known: &mut Vec<ConnectionInfo>,
) -> Result<Topology, String> {
    let seed = redis::IntoConnectionInfo::into_connection_info(link.config.url.as_str())
        .map_err(|e| e.to_string())?;
    let mut why = String::new();
    for info in std::iter::once(&seed).chain(known.iter()) {
        let asked = redis::Client::open(info.clone()).and_then(|c| {
            let mut counted = connect_once(ledger, &c)?;
            let con = counted
                .con
                .as_mut()
                .ok_or((redis::ErrorKind::Io, "not connected"))?;
            con.set_read_timeout(Some(IO_TIMEOUT))?;
            con.set_write_timeout(Some(IO_TIMEOUT))?;
            redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(con)
        });
        let found = match asked {
            Ok(reply) => parse_slots(info, &reply),
            Err(e)
                if e.detail()
                    .is_some_and(|d| d.contains("cluster support disabled")) =>
            {
                Ok(Topology {
                    nodes: vec![info.clone()],
                    owner: Vec::new(),
                })
            }
            Err(e) => Err(e.to_string()),
        };
        match found {
            Ok(t) => {
                *known = t.nodes.clone();
                return Ok(t);
            }
            Err(e) => why = format!("{}: {e}", info.addr()),
        }
    }
    Err(why)
}

/// Discover the cluster and connect to every primary (the publisher's connections), retrying
/// with the backoff until it works or the bridge stops.
pub(super) fn connect_all<'a>(
    ledger: &'a Ledger,
    link: &Link,
    backoff: &mut Duration,
    known: &mut Vec<ConnectionInfo>,
) -> Option<(Vec<Raw<'a>>, Topology)> {
    retry(link, backoff, "publisher (sharded)", || {
        let t = discover(ledger, link, known)?;
        let mut cons = Vec::with_capacity(t.nodes.len());
        for (i, info) in t.nodes.iter().enumerate() {
            let c = connect_raw(ledger, info);
            cons.push(c.map_err(|e| format!("{}: {e}", t.name(i)))?);
        }
        Ok((cons, t))
    })
}

/// What the readers of one topology share.
struct Readers<'a> {
    ledger: &'a Ledger,
    link: &'a Link,
    topology: Topology,
    /// Set when any reader fails: they all stop, and the cluster is discovered again.
    refresh: AtomicBool,
    /// Readers subscribed to every channel of theirs.
    ready: AtomicUsize,
    /// Set once every reader was ready (the backoff starts again from its shortest).
    all_ready: AtomicBool,
    /// The sequence numbers heard and the drop log's throttle, over every reader.
    shared: &'a Mutex<(Sequences, Throttle)>,
    /// A reader's failure was logged as a warning since the readers were last all ready (the
    /// others, until they are again, at debug level: one warning per outage).
    warned: &'a AtomicBool,
}

/// The subscriber thread with sharding (see the module docs).
pub(super) fn subscriber(ledger: &Ledger, link: &Link) {
    // One backoff for reaching the cluster, one for readers that fail once it was reached.
    let (mut backoff, mut readers_backoff) = (BACKOFF_MIN, BACKOFF_MIN);
    let shared = Mutex::new((Sequences::default(), Throttle::default()));
    let warned = AtomicBool::new(false);
    let mut known = Vec::new();
    while let Some(topology) = retry(link, &mut backoff, "subscriber (sharded)", || {
        discover(ledger, link, &mut known)
    }) {
        let readers = Readers {
            ledger,
            link,
            topology,
            refresh: AtomicBool::new(false),
            ready: AtomicUsize::new(0),
            all_ready: AtomicBool::new(false),
            shared: &shared,
            warned: &warned,
        };
        let nodes = readers.topology.nodes.len();
        thread::scope(|s| {
            for node in 0..nodes {
                let r = &readers;
                let spawned = thread::Builder::new()
                    .name(format!("wsloop-redis-in{node}"))
                    .spawn_scoped(s, move || {
                        if let Err(e) = r.read(node) {
                            let level = match r.warned.swap(true, Relaxed) {
                                false => log::Level::Warn,
                                true => log::Level::Debug,
                            };
                            log::log!(
                                level,
                                "redis subscriber ({}): {e}; discovering the cluster again",
                                r.topology.name(node)
                            );
                        }
                        r.refresh.store(true, Relaxed);
                    });
                if spawned.is_err() {
                    readers.refresh.store(true, Relaxed);
                }
            }
        });
        link.counters.up_in.store(false, Relaxed);
        if readers.all_ready.load(Relaxed) {
            readers_backoff = BACKOFF_MIN;
        }
        sleep(link, readers_backoff);
        readers_backoff = (readers_backoff * 2).min(BACKOFF_MAX);
    }
}

impl Readers<'_> {
    /// One primary's reader: subscribes to the channels of the topics with local interest that
    /// this node serves, and hands their messages on; returns when the bridge stops or another
    /// reader failed (`Ok`), or when this one fails.
    fn read(&self, node: usize) -> Result<(), String> {
        let link = self.link;
        let mut counted = connect_raw(self.ledger, &self.topology.nodes[node])?;
        let stream = counted.con.as_mut().ok_or("not connected")?;
        let mut inbound = Inbound::new(link, &inbound::SHARDED);
        let mut version = u64::MAX;
        let mut ready = false;
        let result = loop {
            if link.stopped() || self.refresh.load(Relaxed) {
                break Ok(());
            }
            if let Some((v, wanted)) = link.wanted(version) {
                let mine: HashSet<Arc<[u8]>> = wanted
                    .into_iter()
                    .filter(|t| self.topology.node_of(&channel(link, t)) == node)
                    .collect();
                let out = inbound.update(mine, &mut lock_shared(self.shared).0);
                if let Err(e) = stream.write_all(&out) {
                    break Err(e.to_string());
                }
                version = v;
            }
            if !ready && inbound.confirmed() {
                ready = true;
                if self.ready.fetch_add(1, Relaxed) + 1 == self.topology.nodes.len() {
                    self.all_ready.store(true, Relaxed);
                    self.warned.store(false, Relaxed);
                    link.counters.up_in.store(true, Relaxed);
                    log::info!(
                        "redis subscriber (sharded): connected to {} primaries",
                        self.topology.nodes.len()
                    );
                }
            }
            // No confirmation in time, an error reply (`MOVED` to a `SSUBSCRIBE`) or Redis
            // unsubscribing the reader (as Redis 7 does when a slot moves away): the slot
            // moved, or the node is gone.
            if let Some(late) = inbound.overdue(Instant::now()) {
                break Err(format!("{late} (its slot moved?)"));
            }
            match inbound.read(stream) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => break Err(e),
            }
            let (seen, drops) = &mut *lock_shared(self.shared);
            if let Err(e) = inbound.deliver(self.ledger, seen, drops) {
                break Err(e);
            }
        };
        if ready {
            self.ready.fetch_sub(1, Relaxed);
        }
        link.counters.up_in.store(false, Relaxed);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters_crc16_with_hash_tags() {
        // The Redis Cluster specification's check value, and slots `CLUSTER KEYSLOT` gives
        // (Redis 7.0).
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"123456789"), 0x31c3 % SLOTS);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b""), 0);
        // A hash tag: the bytes between the first `{` and the next `}`, if not empty (the
        // numbers are Redis 7.0's `CLUSTER KEYSLOT`).
        assert_eq!(slot(b"{user1000}.following"), 3443);
        assert_eq!(slot(b"user1000"), 3443);
        assert_eq!(slot(b"wsloop:{foo}/a"), 12182);
        assert_eq!(slot(b"foo{}{bar}"), 8363); // an empty tag: the whole name
        assert_eq!(slot(b"foo{{bar}}zap"), 4015); // the tag is `{bar`
        assert_eq!(slot(b"{bar"), 4015);
        assert_eq!(slot(b"foo{bar}{zap}"), 5061); // the first tag
        assert_eq!(slot(b"{unclosed"), 470);
    }

    fn range(start: i64, end: i64, host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ]),
        ])
    }

    fn base() -> ConnectionInfo {
        redis::Client::open("redis://:secret@10.0.0.5:7000/")
            .unwrap()
            .get_connection_info()
            .clone()
    }

    #[test]
    fn cluster_slots_give_each_slot_its_primary_and_keep_the_credentials() {
        let reply = Value::Array(vec![
            range(0, 5460, "10.0.0.5", 7000),
            range(5461, 10922, "", 7001),
            range(10923, 16383, "10.0.0.7", 7002),
        ]);
        let t = parse_slots(&base(), &reply).unwrap();
        assert_eq!(t.nodes.len(), 3);
        assert_eq!(
            t.name(1),
            "10.0.0.5:7001",
            "no endpoint: the configured host"
        );
        assert_eq!(t.nodes[2].redis_settings().password(), Some("secret"));
        assert_eq!(t.node_of(b"123456789"), 2); // slot 12739
        assert_eq!(t.node_of(b"bar"), 0); // slot 5061
        assert_eq!(t.node_of(b"{a}x"), t.node_of(b"a"));
        assert_eq!(Topology::single().node_of(b"123456789"), 0);
    }

    #[test]
    fn cluster_slots_that_leave_a_slot_unserved_or_are_malformed_are_refused() {
        let gap = Value::Array(vec![range(0, 100, "h", 1), range(102, 16383, "h", 2)]);
        let e = parse_slots(&base(), &gap).err().unwrap();
        assert!(e.contains("slot 101 is served by no primary"), "{e}");
        for bad in [
            Value::Int(1),
            Value::Array(vec![range(0, 16384, "h", 1)]),
            Value::Array(vec![range(5, 4, "h", 1)]),
            Value::Array(vec![range(-1, 16383, "h", 1)]),
            Value::Array(vec![range(0, 16383, "h", 70000)]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(16383)])]),
        ] {
            assert!(parse_slots(&base(), &bad).is_err(), "{bad:?}");
        }
        // More primaries than the bridge connects to.
        let per = SLOTS / (MAX_NODES + 1);
        let many: Vec<Value> = (0..=MAX_NODES)
            .map(|i| {
                let end = if i == MAX_NODES {
                    SLOTS - 1
                } else {
                    (i + 1) * per - 1
                };
                range((i * per) as i64, end as i64, "h", 7000 + i as i64)
            })
            .collect();
        let e = parse_slots(&base(), &Value::Array(many)).err().unwrap();
        assert!(
            e.contains(&format!("more than {MAX_NODES} primaries")),
            "{e}"
        );
    }
}
