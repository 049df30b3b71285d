//! What the loops and the Redis bridge (`bridge.rs`) share, and the bridge's wire format.
//!
//! The loops never wait for Redis and never call into the application for it: at the end of a
//! turn a loop hands the turn's publications to the [`Link`] (one lock, into a bounded queue
//! whose oldest entries are dropped and counted when it is full), and reports the topics whose
//! local interest began or ended (its subscriber count went from 0, or to 0). The link counts,
//! per topic, the loops with subscribers, so the bridge subscribes to a topic's channel while
//! any loop has one. Nothing here is touched per message when the bridge is off: the loops hold
//! no link then.
//!
//! The wire format (README, "Several instances (Redis)"): a topic's channel is the prefix
//! followed by the topic's bytes; a message is a 20-byte header ([`HEADER`]), then the
//! payload, unchanged:
//!
//! ```text
//! byte 0      2     3            11           19       20
//!      | "ws" | 1   | instance   | sequence   | opcode | payload ...
//!        magic  ver   u64 BE       u64 BE       1: text, 2: binary
//! ```
//!
//! The sequence counts one
//! publisher's messages on one topic from 1; a receiver counts the numbers it did not see as
//! gaps (Redis pub/sub is at-most-once).

use crate::config::RedisConfig;
use crate::metrics::{BrokerFigures, BROKER_DROP_REASONS as DROP_REASONS};
use crate::topics::Forwarded;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The header of a message on the wire: magic, version, instance, sequence, opcode.
pub(crate) const HEADER: usize = 20;
const MAGIC: &[u8; 3] = b"ws\x01";

/// The Redis bridge's sockets: its publisher's and its subscriber's connection.
pub(crate) const BRIDGE_FDS: usize = 2;

/// Entries the bridge keeps to number its own messages (one per topic it published to) and to
/// check the numbers it receives (one per publisher and topic): beyond this many it forgets
/// them all and starts again (a publisher's numbers then restart at 1, which a receiver takes
/// as a restart, not a gap).
pub(crate) const MAX_SEQUENCES: usize = 1 << 16;

/// The counters the bridge keeps (the README's `wsloop_broker_*` metrics).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) up_out: AtomicBool,
    pub(crate) up_in: AtomicBool,
    pub(crate) reconnects: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    /// Dropped: the queue was full; a send failed (Redis gone); a loop's inbox was full;
    /// invalid messages (not in the wire format, or a number already seen).
    pub(crate) dropped: [AtomicU64; 4],
    pub(crate) gaps: AtomicU64,
    pub(crate) own: AtomicU64,
    /// The last PING's round trip, in nanoseconds.
    pub(crate) rtt_ns: AtomicU64,
}

/// Publications waiting for the bridge, and their bytes.
#[derive(Default)]
struct Queue {
    items: VecDeque<Forwarded>,
    bytes: usize,
}

/// Per topic, the loops with at least one subscriber; and a version bumped on every change.
#[derive(Default)]
struct Interest {
    loops: HashMap<Arc<[u8]>, usize>,
    version: u64,
}

/// What the loops and the bridge share (see the module docs).
pub(crate) struct Link {
    pub(crate) config: RedisConfig,
    /// This process's id on the wire: random, drawn at start.
    pub(crate) instance: u64,
    queue: Mutex<Queue>,
    ready: Condvar,
    interest: Mutex<Interest>,
    stop: AtomicBool,
    pub(crate) counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Link {
    pub(crate) fn new(config: RedisConfig) -> Self {
        // The standard library seeds each RandomState from the system's random source.
        let instance = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Link {
            config,
            instance,
            queue: Mutex::default(),
            ready: Condvar::new(),
            interest: Mutex::default(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// A loop's publications of one turn, for Redis: one lock. What does not fit the queue's
    /// bounds pushes out the oldest, counted.
    pub(crate) fn send(&self, batch: &[Forwarded]) {
        let mut q = lock(&self.queue);
        let was_empty = q.items.is_empty();
        for f in batch {
            q.bytes += f.topic.len() + f.payload.len();
            q.items.push_back(f.clone());
        }
        let mut dropped = 0;
        while q.items.len() > self.config.queue_messages || q.bytes > self.config.queue_bytes {
            let Some(old) = q.items.pop_front() else {
                break;
            };
            q.bytes -= old.topic.len() + old.payload.len();
            dropped += 1;
        }
        drop(q);
        self.counters.dropped[0].fetch_add(dropped, Relaxed);
        if was_empty {
            self.ready.notify_one();
        }
    }

    /// Wait up to `timeout` for publications to send (or a stop); take up to `max` of them.
    pub(crate) fn take(&self, timeout: Duration, max: usize) -> Vec<Forwarded> {
        let mut q = lock(&self.queue);
        if q.items.is_empty() && !self.stopped() {
            q = self
                .ready
                .wait_timeout(q, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let n = q.items.len().min(max);
        let taken: Vec<Forwarded> = q.items.drain(..n).collect();
        q.bytes -= taken
            .iter()
            .map(|f| f.topic.len() + f.payload.len())
            .sum::<usize>();
        taken
    }

    /// Publications waiting, and their bytes.
    pub(crate) fn queued(&self) -> (usize, usize) {
        let q = lock(&self.queue);
        (q.items.len(), q.bytes)
    }

    /// A loop's subscriber counts changed: `(topic, old, new)` for each change, in order.
    pub(crate) fn interest<'a>(&self, changes: impl Iterator<Item = (&'a [u8], usize, usize)>) {
        let mut i = lock(&self.interest);
        let mut moved = false;
        for (topic, old, new) in changes {
            if old == 0 && new > 0 {
                *i.loops.entry(topic.into()).or_insert(0) += 1;
                moved = true;
            } else if old > 0 && new == 0 {
                if let Some(n) = i.loops.get_mut(topic) {
                    *n -= 1;
                    if *n == 0 {
                        i.loops.remove(topic);
                    }
                }
                moved = true;
            }
        }
        if moved {
            i.version += 1;
        }
    }

    /// The topics with local interest, if they changed since `version` (with the new version).
    pub(crate) fn wanted(&self, version: u64) -> Option<(u64, Vec<Arc<[u8]>>)> {
        let i = lock(&self.interest);
        (i.version != version).then(|| (i.version, i.loops.keys().cloned().collect()))
    }

    /// Ask the bridge's threads to end.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Relaxed);
        let _q = lock(&self.queue);
        self.ready.notify_all();
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// Both connections are up.
    pub(crate) fn up(&self) -> bool {
        self.counters.up_in.load(Relaxed) && self.counters.up_out.load(Relaxed)
    }

    /// The figures `/metrics` shows.
    pub(crate) fn figures(&self) -> BrokerFigures {
        let c = &self.counters;
        let (queued, queued_bytes) = self.queued();
        BrokerFigures {
            enabled: true,
            up: self.up(),
            reconnects: c.reconnects.load(Relaxed),
            sent: c.sent.load(Relaxed),
            received: c.received.load(Relaxed),
            dropped: DROP_REASONS
                .iter()
                .zip(&c.dropped)
                .map(|(r, n)| (*r, n.load(Relaxed)))
                .collect(),
            gaps: c.gaps.load(Relaxed),
            rtt_seconds: c.rtt_ns.load(Relaxed) as f64 / 1e9,
            queued,
            queued_bytes,
        }
    }

    /// The line `/healthz` adds to its body.
    pub(crate) fn health_line(&self) -> String {
        match self.up() {
            true => format!(
                "broker: up (round trip {:.3} ms)",
                self.counters.rtt_ns.load(Relaxed) as f64 / 1e6
            ),
            false => "broker: down (reconnecting; local delivery goes on)".into(),
        }
    }
}

/// A message on the wire: the header, then the payload.
pub(crate) fn encode(instance: u64, seq: u64, text: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&instance.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.push(if text { 1 } else { 2 });
    out.extend_from_slice(payload);
    out
}

/// A message read from the wire: (instance, sequence, text, payload); `None` when it is not one
/// (another version, a bad opcode, text that is not UTF-8, a sequence of 0).
pub(crate) fn decode(msg: &[u8]) -> Option<(u64, u64, bool, &[u8])> {
    if msg.len() < HEADER || &msg[..3] != MAGIC {
        return None;
    }
    let word = |at: usize| {
        let mut b = [0; 8];
        b.copy_from_slice(&msg[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let (instance, seq) = (word(3), word(11));
    let payload = &msg[HEADER..];
    let text = match msg[19] {
        1 => std::str::from_utf8(payload).is_ok(),
        2 => false,
        _ => return None,
    };
    if seq == 0 || (msg[19] == 1 && !text) {
        return None;
    }
    Some((instance, seq, text, payload))
}

/// The numbers a receiver has seen, per publisher and topic.
#[derive(Default)]
pub(crate) struct Sequences {
    last: HashMap<(u64, Arc<[u8]>), u64>,
}

/// What a received number means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// The next one (or the first seen, or a restart at 1): deliver it. With the numbers
    /// skipped before it (gaps).
    Next(u64),
    /// One already seen, or older: not delivered again.
    Old,
}

impl Sequences {
    pub(crate) fn see(&mut self, instance: u64, topic: &[u8], seq: u64) -> Seen {
        if self.last.len() >= MAX_SEQUENCES {
            self.last.clear();
        }
        let key = (instance, Arc::<[u8]>::from(topic));
        match self.last.get_mut(&key) {
            Some(last) if seq == 1 || seq > *last => {
                let gaps = if seq == 1 { 0 } else { seq - *last - 1 };
                *last = seq;
                Seen::Next(gaps)
            }
            Some(_) => Seen::Old,
            None => {
                self.last.insert(key, seq);
                Seen::Next(0)
            }
        }
    }

    /// A topic no longer subscribed: what was missed meanwhile was not for us.
    pub(crate) fn forget(&mut self, topic: &[u8]) {
        self.last.retain(|(_, t), _| &**t != topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_round_trips_and_refuses_what_is_not_a_message() {
        let m = encode(0x0102_0304_0506_0708, 9, true, "héllo".as_bytes());
        assert_eq!(&m[..3], b"ws\x01");
        assert_eq!(m.len(), HEADER + "héllo".len());
        assert_eq!(
            decode(&m),
            Some((0x0102_0304_0506_0708, 9, true, "héllo".as_bytes()))
        );
        let b = encode(7, 1, false, &[0, 255, 0]);
        assert_eq!(decode(&b), Some((7, 1, false, &[0u8, 255, 0][..])));
        // Not a message: short, another magic, a bad opcode, text that is not UTF-8, seq 0.
        assert_eq!(decode(&m[..HEADER - 1]), None);
        let mut other = m.clone();
        other[2] = 2;
        assert_eq!(decode(&other), None);
        let mut op = b.clone();
        op[19] = 3;
        assert_eq!(decode(&op), None);
        assert_eq!(decode(&encode(7, 1, true, &[0xff])), None);
        assert_eq!(decode(&encode(7, 0, false, b"x")), None);
    }

    #[test]
    fn sequences_count_gaps_and_refuse_old_numbers() {
        let mut s = Sequences::default();
        assert_eq!(s.see(1, b"t", 5), Seen::Next(0)); // first seen
        assert_eq!(s.see(1, b"t", 6), Seen::Next(0));
        assert_eq!(s.see(1, b"t", 9), Seen::Next(2)); // 7 and 8 lost
        assert_eq!(s.see(1, b"t", 9), Seen::Old);
        assert_eq!(s.see(1, b"t", 4), Seen::Old);
        assert_eq!(s.see(2, b"t", 3), Seen::Next(0)); // another publisher
        assert_eq!(s.see(1, b"u", 3), Seen::Next(0)); // another topic
        assert_eq!(s.see(1, b"t", 1), Seen::Next(0)); // a restart
        s.forget(b"t");
        assert_eq!(s.see(1, b"t", 40), Seen::Next(0));
        assert_eq!(s.see(1, b"u", 4), Seen::Next(0));
    }

    #[test]
    fn the_queue_drops_its_oldest_beyond_its_bounds_and_interest_counts_loops() {
        let link = Link::new(RedisConfig {
            queue_messages: 3,
            queue_bytes: 4096,
            ..RedisConfig::default()
        });
        let f = |n: u8| Forwarded {
            topic: Arc::from(&b"t"[..]),
            text: false,
            payload: Arc::from(&[n][..]),
        };
        link.send(&[f(1), f(2)]);
        link.send(&[f(3), f(4), f(5)]);
        assert_eq!(link.queued(), (3, 6));
        assert_eq!(link.counters.dropped[0].load(Relaxed), 2);
        let got = link.take(Duration::ZERO, 2);
        assert_eq!(got.iter().map(|f| f.payload[0]).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(link.queued(), (1, 2));
        // Bytes bound too.
        let big = Forwarded {
            topic: Arc::from(&b"t"[..]),
            text: false,
            payload: Arc::from(vec![0u8; 4095]),
        };
        link.send(&[big]);
        assert_eq!(link.queued(), (1, 4096));
        // Interest: two loops on "a"; the channel is wanted until both have left.
        let (v0, w) = link.wanted(u64::MAX).unwrap();
        assert!(w.is_empty());
        link.interest([(&b"a"[..], 0, 1)].into_iter());
        link.interest([(&b"a"[..], 0, 2), (&b"b"[..], 0, 1)].into_iter());
        link.interest([(&b"a"[..], 1, 0), (&b"b"[..], 1, 0)].into_iter());
        let (v1, w) = link.wanted(v0).unwrap();
        assert_eq!(w, vec![Arc::<[u8]>::from(&b"a"[..])]);
        assert!(link.wanted(v1).is_none());
        link.interest([(&b"a"[..], 2, 0)].into_iter());
        assert!(link.wanted(v1).unwrap().1.is_empty());
    }
}
