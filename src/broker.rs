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
//! publisher's messages on one topic from 1. A receiver uses it to notice loss, never to drop
//! a message: Redis pub/sub delivers one connection's messages in order and never twice, so a
//! number past the next one is a gap (messages lost: Redis pub/sub is at-most-once), and one
//! not past the last is a reset (the publisher forgot its numbers, or the message was forged
//! by someone else who can publish on the channels); either way it is delivered, and the
//! receiver follows the new number.
//!
//! What arrives from Redis is checked before any loop hears of it ([`decode`]): the header,
//! the payload against the loops' `max_message_size` (before text is checked for UTF-8, so
//! that an oversized payload costs no scan), the opcode (text or binary only) and UTF-8 text.

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

/// With sharded pub/sub (`RedisConfig::sharded`), the most primaries of a Redis Cluster the
/// bridge connects to (its publisher and its subscriber each hold a connection to every one).
pub(crate) const MAX_NODES: usize = 16;

/// The sockets the bridge may hold at once: [`BRIDGE_FDS`], or with sharding two per primary
/// for at most [`MAX_NODES`] of them.
pub(crate) fn bridge_fds(config: &RedisConfig) -> usize {
    match config.sharded {
        true => 2 * MAX_NODES,
        false => BRIDGE_FDS,
    }
}

/// Entries the bridge keeps to number its own messages (one per topic it published to) and to
/// check the numbers it receives (one per publisher and topic). The publisher forgets all of
/// its numbers beyond this many (they restart at 1, which a receiver counts as a reset); the
/// receiver forgets the half it heard from least recently ([`Sequences`]), so that messages
/// forged with random instance ids cannot make it grow.
pub(crate) const MAX_SEQUENCES: usize = 1 << 16;

/// The indices of [`Counters::dropped`], in the order of the reasons
/// (`metrics::BROKER_DROP_REASONS`).
pub(crate) const QUEUE_FULL: usize = 0;
pub(crate) const SEND_FAILED: usize = 1;
pub(crate) const INBOX_FULL: usize = 2;
pub(crate) const INVALID: usize = 3;
pub(crate) const TOO_LARGE: usize = 4;

/// The counters the bridge keeps (the README's `wsloop_broker_*` metrics).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) up_out: AtomicBool,
    pub(crate) up_in: AtomicBool,
    pub(crate) reconnects: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    /// Dropped ([`QUEUE_FULL`] and the other indices): the queue was full; a send failed
    /// (Redis gone); a loop's inbox was full; a message from Redis not in the wire format; one
    /// whose payload is over `max_message_size`.
    pub(crate) dropped: [AtomicU64; 5],
    /// Gaps: times a publisher's number on a topic jumped past the next one.
    pub(crate) gaps: AtomicU64,
    /// Resets: times a publisher's number on a topic was not past its last one.
    pub(crate) resets: AtomicU64,
    /// The receiver's entries in [`Sequences`] (at most [`MAX_SEQUENCES`]).
    pub(crate) tracked: AtomicU64,
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
    /// The loops' `max_message_size`: a message from Redis with a longer payload is dropped.
    pub(crate) max_message: usize,
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
    pub(crate) fn new(config: RedisConfig, max_message: usize) -> Self {
        // The standard library seeds each RandomState from the system's random source.
        let instance = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Link {
            config,
            max_message,
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
        self.counters.dropped[QUEUE_FULL].fetch_add(dropped, Relaxed);
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
            resets: c.resets.load(Relaxed),
            tracked: c.tracked.load(Relaxed),
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

/// A message's header on the wire.
pub(crate) fn header(instance: u64, seq: u64, text: bool) -> [u8; HEADER] {
    let mut h = [0; HEADER];
    h[..3].copy_from_slice(MAGIC);
    h[3..11].copy_from_slice(&instance.to_be_bytes());
    h[11..19].copy_from_slice(&seq.to_be_bytes());
    h[19] = if text { 1 } else { 2 };
    h
}

/// A message on the wire: the header, then the payload.
#[cfg(test)]
pub(crate) fn encode(instance: u64, seq: u64, text: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&header(instance, seq, text));
    out.extend_from_slice(payload);
    out
}

/// Whether `msg` starts with the wire format's magic and names `instance` as its publisher:
/// the subscriber checks this first, so that the messages Redis sends back to their own
/// instance are skipped before anything of them is copied or decoded (a message forged with
/// this instance's id is skipped so too).
pub(crate) fn is_own(msg: &[u8], instance: u64) -> bool {
    msg.len() >= HEADER && msg[..3] == *MAGIC && msg[3..11] == instance.to_be_bytes()
}

/// A message read from the wire: the publisher's instance and sequence number, whether it is
/// text, and its payload.
pub(crate) type Decoded<'a> = (u64, u64, bool, &'a [u8]);

/// Why a message from Redis is not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not in the wire format: short, another magic or version, an opcode other than text or
    /// binary, text that is not UTF-8, a sequence number of 0 (or a channel outside the prefix,
    /// or a topic over `MAX_TOPIC_LEN`: see the bridge).
    Invalid,
    /// A payload over `max_message_size`.
    TooLarge,
}

impl Refused {
    /// Its index in [`Counters::dropped`].
    pub(crate) fn index(self) -> usize {
        match self {
            Refused::Invalid => INVALID,
            Refused::TooLarge => TOO_LARGE,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        crate::metrics::BROKER_DROP_REASONS[self.index()]
    }
}

/// A message read from the wire, its payload at most `max` bytes. The length is checked before
/// the opcode and the UTF-8 of text, so that an oversized payload is refused without a scan.
pub(crate) fn decode(msg: &[u8], max: usize) -> Result<Decoded<'_>, Refused> {
    if msg.len() < HEADER || &msg[..3] != MAGIC {
        return Err(Refused::Invalid);
    }
    let payload = &msg[HEADER..];
    if payload.len() > max {
        return Err(Refused::TooLarge);
    }
    let word = |at: usize| {
        let mut b = [0; 8];
        b.copy_from_slice(&msg[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let (instance, seq) = (word(3), word(11));
    let text = match msg[19] {
        1 => true,
        2 => false,
        _ => return Err(Refused::Invalid),
    };
    if seq == 0 || (text && std::str::from_utf8(payload).is_err()) {
        return Err(Refused::Invalid);
    }
    Ok((instance, seq, text, payload))
}

/// The last number a receiver heard from each publisher on each topic it is subscribed to, at
/// most [`MAX_SEQUENCES`] of them: when a new one would pass that, the half heard from least
/// recently are forgotten (amortised O(1) a message). A publisher forgotten is heard as new
/// again: its next message is neither a gap nor a reset, and is delivered as every message is.
#[derive(Default)]
pub(crate) struct Sequences {
    topics: HashMap<Arc<[u8]>, HashMap<u64, Last>>,
    /// Entries over all topics.
    len: usize,
    /// Counts calls to [`Sequences::see`]: when each entry was last heard from.
    tick: u64,
}

#[derive(Clone, Copy)]
struct Last {
    seq: u64,
    tick: u64,
}

/// What a received number says (the message is delivered whatever it says).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// The first number heard from this publisher on this topic (or since it was forgotten).
    First,
    /// The next one.
    Next,
    /// A jump forward past this many numbers: the messages lost between (one gap).
    Gap(u64),
    /// A number not past the last one: the publisher started again (its numbers restart at 1
    /// after it forgets them), or someone else published it. Followed from now on.
    Reset,
}

impl Sequences {
    pub(crate) fn see(&mut self, instance: u64, topic: &[u8], seq: u64) -> Seen {
        self.tick += 1;
        let now = Last {
            seq,
            tick: self.tick,
        };
        if let Some(last) = self
            .topics
            .get_mut(topic)
            .and_then(|p| p.get_mut(&instance))
        {
            let was = std::mem::replace(last, now).seq;
            return match seq.checked_sub(was) {
                Some(1) => Seen::Next,
                Some(0) | None => Seen::Reset,
                Some(d) => Seen::Gap(d - 1),
            };
        }
        if self.len >= MAX_SEQUENCES {
            self.forget_oldest_half();
        }
        match self.topics.get_mut(topic) {
            Some(p) => {
                p.insert(instance, now);
            }
            None => {
                self.topics
                    .insert(topic.into(), HashMap::from([(instance, now)]));
            }
        }
        self.len += 1;
        Seen::First
    }

    /// The entries kept.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Forget the half of the entries heard from least recently (the ticks are distinct: each
    /// call to `see` stamps one entry).
    fn forget_oldest_half(&mut self) {
        let mut ticks: Vec<u64> = self
            .topics
            .values()
            .flat_map(|p| p.values().map(|l| l.tick))
            .collect();
        if ticks.is_empty() {
            return;
        }
        let half = ticks.len() / 2;
        let cut = *ticks.select_nth_unstable(half).1;
        self.topics.retain(|_, p| {
            p.retain(|_, l| l.tick > cut);
            !p.is_empty()
        });
        self.len = self.topics.values().map(HashMap::len).sum();
    }

    /// A topic no longer subscribed: what was missed meanwhile was not for us.
    pub(crate) fn forget(&mut self, topic: &[u8]) {
        if let Some(p) = self.topics.remove(topic) {
            self.len -= p.len();
        }
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
            decode(&m, 16),
            Ok((0x0102_0304_0506_0708, 9, true, "héllo".as_bytes()))
        );
        let b = encode(7, 1, false, &[0, 255, 0]);
        assert_eq!(decode(&b, 16), Ok((7, 1, false, &[0u8, 255, 0][..])));
        // Not a message: short, another magic, a bad opcode (every one but text and binary),
        // text that is not UTF-8, seq 0.
        assert_eq!(decode(&m[..HEADER - 1], 16), Err(Refused::Invalid));
        let mut other = m.clone();
        other[2] = 2;
        assert_eq!(decode(&other, 16), Err(Refused::Invalid));
        for opcode in (0..=255u8).filter(|o| ![1, 2].contains(o)) {
            let mut op = b.clone();
            op[19] = opcode;
            assert_eq!(decode(&op, 16), Err(Refused::Invalid), "opcode {opcode}");
        }
        assert_eq!(
            decode(&encode(7, 1, true, &[0xff]), 16),
            Err(Refused::Invalid)
        );
        assert_eq!(
            decode(&encode(7, 0, false, b"x"), 16),
            Err(Refused::Invalid)
        );
        // Its own messages, told by the header alone.
        assert!(is_own(&m, 0x0102_0304_0506_0708));
        assert!(is_own(&m[..HEADER], 0x0102_0304_0506_0708));
        assert!(!is_own(&m[..HEADER - 1], 0x0102_0304_0506_0708));
        assert!(!is_own(&m, 0x0102_0304_0506_0709));
        assert!(!is_own(&other, 0x0102_0304_0506_0708), "another version");
    }

    #[test]
    fn a_payload_over_the_limit_is_refused_before_anything_else_is_read() {
        let max = 16;
        let at = encode(7, 1, false, &[b'a'; 16]);
        assert_eq!(decode(&at, max), Ok((7, 1, false, &[b'a'; 16][..])));
        let over = encode(7, 1, false, &[b'a'; 17]);
        assert_eq!(decode(&over, max), Err(Refused::TooLarge));
        // Too large whatever else is wrong past the magic: its text is not even looked at.
        assert_eq!(
            decode(&encode(7, 1, true, &[0xff; 17]), max),
            Err(Refused::TooLarge)
        );
        let mut op = over.clone();
        op[19] = 9;
        assert_eq!(decode(&op, max), Err(Refused::TooLarge));
        assert_eq!(
            decode(&encode(7, 0, false, &[0; 17]), max),
            Err(Refused::TooLarge)
        );
        assert_eq!(Refused::TooLarge.as_str(), "too_large");
        assert_eq!(Refused::Invalid.as_str(), "invalid");
    }

    #[test]
    fn sequences_count_gaps_and_resets_and_never_refuse_a_number() {
        let mut s = Sequences::default();
        assert_eq!(s.see(1, b"t", 5), Seen::First);
        assert_eq!(s.see(1, b"t", 6), Seen::Next);
        assert_eq!(s.see(1, b"t", 9), Seen::Gap(2)); // 7 and 8 lost
        assert_eq!(s.see(1, b"t", 9), Seen::Reset); // a repeat: followed, not refused
        assert_eq!(s.see(1, b"t", 10), Seen::Next);
        assert_eq!(s.see(1, b"t", 4), Seen::Reset); // backwards
        assert_eq!(s.see(1, b"t", 5), Seen::Next); // followed from there
        assert_eq!(s.see(2, b"t", 3), Seen::First); // another publisher
        assert_eq!(s.see(1, b"u", 3), Seen::First); // another topic
        assert_eq!(s.see(1, b"t", 1), Seen::Reset); // the publisher forgot its numbers
        assert_eq!(s.see(1, b"t", 2), Seen::Next);
        // A forged number far ahead: one gap; the real publisher's next is a reset, and the
        // one after is the next again.
        assert_eq!(s.see(1, b"t", 1 << 62), Seen::Gap((1 << 62) - 3));
        assert_eq!(s.see(1, b"t", 3), Seen::Reset);
        assert_eq!(s.see(1, b"t", 4), Seen::Next);
        assert_eq!(s.see(1, b"t", u64::MAX), Seen::Gap(u64::MAX - 5));
        assert_eq!(s.see(1, b"t", u64::MAX), Seen::Reset);
        assert_eq!(s.len(), 3);
        s.forget(b"t");
        assert_eq!(s.len(), 1);
        assert_eq!(s.see(1, b"t", 40), Seen::First);
        assert_eq!(s.see(1, b"u", 4), Seen::Next);
    }

    #[test]
    fn a_flood_of_publishers_keeps_the_sequences_bounded_and_the_recent_ones() {
        let mut s = Sequences::default();
        // Two real publishers, heard from throughout a flood of random ones on their topic.
        let mut next = [1u64, 1];
        let mut most = 0;
        for i in 0..(3 * MAX_SEQUENCES as u64) {
            s.see(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 3), b"room", 1);
            if i % 1000 == 0 {
                for (p, n) in next.iter_mut().enumerate() {
                    // Never forgotten: always among the half heard from most recently.
                    let want = if *n == 1 { Seen::First } else { Seen::Next };
                    assert_eq!(s.see(p as u64 + 1, b"room", *n), want, "after {i}");
                    *n += 1;
                }
            }
            most = most.max(s.len());
        }
        assert_eq!(most, MAX_SEQUENCES);
        assert!(s.len() <= MAX_SEQUENCES);
        // The real ones were heard from recently: still known, their next is the next.
        assert_eq!(s.see(1, b"room", next[0]), Seen::Next);
        assert_eq!(s.see(2, b"room", next[1]), Seen::Next);
        s.forget(b"room");
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn the_queue_drops_its_oldest_beyond_its_bounds_and_interest_counts_loops() {
        let link = Link::new(
            RedisConfig {
                queue_messages: 3,
                queue_bytes: 4096,
                ..RedisConfig::default()
            },
            16 * 1024,
        );
        let f = |n: u8| Forwarded {
            topic: Arc::from(&b"t"[..]),
            text: false,
            payload: Arc::from(&[n][..]),
        };
        link.send(&[f(1), f(2)]);
        link.send(&[f(3), f(4), f(5)]);
        assert_eq!(link.queued(), (3, 6));
        assert_eq!(link.counters.dropped[QUEUE_FULL].load(Relaxed), 2);
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
