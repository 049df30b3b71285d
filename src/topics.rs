//! Publish/subscribe without I/O: the registry of topics ([`Topics`]), and one loop turn's
//! publications with who is owed which ([`Fanout`]). The loop (`server/topics.rs`,
//! `server/deliver.rs`) writes what they say; here they are unit-tested and fuzzed against
//! simple models.
//!
//! [`Topics`]: each topic lists its subscribers, each subscriber its topics, and a hash map of
//! subscriptions keeps both positions, so subscribing and unsubscribing are O(1) (hash look-ups
//! and a swap-remove on each side, fixing the one moved entry's position), removing a subscriber
//! is O(its topics), and listing a topic's subscribers is O(subscribers). A topic exists while
//! it has a subscriber: its memory is freed when the last one leaves. A subscriber is an opaque
//! `u64` key (the loop uses a connection's id).
//!
//! [`Fanout`]: a publication is framed once into the turn's arena; each subscriber it is for is
//! owed a reference to it, appended to that subscriber's list, so that what one subscriber is
//! owed is read back in publication order without a copy. The list holds runs of consecutive
//! publications (12 bytes each): a subscriber owed the next publication after the last one it
//! is owed extends its last run instead, so one topic's subscribers hold one run each however
//! many messages the turn publishes to it, and since publications are framed back to back, a
//! run's frames are one slice of the arena, written with one `iovec`. Subscribers are addressed
//! by slot and generation (a connection's place in the loop's slab): a slot reused within the
//! turn is told apart by its generation.
//!
//! Subscribers that negotiated permessage-deflate take a second framing, compressed once for
//! all of them: from the turn's first publication owed to one of them on, every publication is
//! framed into a second arena too (compressed, or as it is when short), back to back, so that
//! their runs are single slices there as well.

use slab::Slab;
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// A publication one loop of a cluster forwards to the others, and the Redis bridge to and
/// from the other instances.
#[derive(Clone, Debug)]
pub(crate) struct Forwarded {
    /// The topic.
    pub(crate) topic: std::sync::Arc<[u8]>,
    /// A text message (else binary).
    pub(crate) text: bool,
    /// The message.
    pub(crate) payload: std::sync::Arc<[u8]>,
}

/// The longest topic name, in bytes. Longer names are refused ([`TopicError::TooLong`]).
pub const MAX_TOPIC_LEN: usize = 256;

/// Why a subscription was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicError {
    /// The name is longer than [`MAX_TOPIC_LEN`].
    TooLong,
    /// The subscriber is in as many topics as it may be
    /// ([`Config::max_topics_per_connection`](crate::Config::max_topics_per_connection)).
    TooMany,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicError::TooLong => "topic name longer than 256 bytes",
            TopicError::TooMany => "too many topics for one connection",
        })
    }
}

impl std::error::Error for TopicError {}

/// A subscriber's handle in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubId(u32);

/// One topic: its name and its subscribers.
struct Topic {
    name: Arc<[u8]>,
    members: Vec<u32>,
}

/// One subscriber: its key and its topics.
struct Subscriber {
    key: u64,
    topics: Vec<u32>,
}

/// The registry (see the module docs).
#[derive(Default)]
pub struct Topics {
    topics: Slab<Topic>,
    names: HashMap<Arc<[u8]>, u32>,
    subscribers: Slab<Subscriber>,
    /// Per subscription (subscriber, topic): its index in the subscriber's topics and in the
    /// topic's members.
    links: HashMap<(u32, u32), (u32, u32)>,
}

/// What a subscribe or unsubscribe did to a topic: its subscriber count before and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    /// Subscribers before.
    pub old: usize,
    /// Subscribers after.
    pub new: usize,
}

impl Topics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new subscriber (in no topic yet) with `key`, which [`Topics::members`] reports.
    pub fn add_subscriber(&mut self, key: u64) -> SubId {
        SubId(self.subscribers.insert(Subscriber {
            key,
            topics: Vec::new(),
        }) as u32)
    }

    /// Subscribe `sub` to `topic` (created if new), unless it is in `max_topics` topics
    /// already. `Ok(None)`: it was subscribed already.
    pub fn subscribe(
        &mut self,
        sub: SubId,
        topic: &[u8],
        max_topics: usize,
    ) -> Result<Option<Change>, TopicError> {
        if topic.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong);
        }
        let known = self.names.get(topic).copied();
        if known.is_some_and(|t| self.links.contains_key(&(sub.0, t))) {
            return Ok(None);
        }
        if self.subscribers[sub.0 as usize].topics.len() >= max_topics {
            return Err(TopicError::TooMany);
        }
        let t = known.unwrap_or_else(|| {
            let name: Arc<[u8]> = topic.into();
            let t = self.topics.insert(Topic {
                name: name.clone(),
                members: Vec::new(),
            }) as u32;
            self.names.insert(name, t);
            t
        });
        let mine = &mut self.subscribers[sub.0 as usize].topics;
        let members = &mut self.topics[t as usize].members;
        self.links
            .insert((sub.0, t), (mine.len() as u32, members.len() as u32));
        mine.push(t);
        members.push(sub.0);
        let new = members.len();
        Ok(Some(Change { old: new - 1, new }))
    }

    /// Unsubscribe `sub` from `topic`; `None` if it was not subscribed.
    pub fn unsubscribe(&mut self, sub: SubId, topic: &[u8]) -> Option<Change> {
        let t = *self.names.get(topic)?;
        let at = self.links.remove(&(sub.0, t))?;
        Some(self.unlink(sub.0, t, at))
    }

    /// Remove `sub` and its subscriptions; `changed(topic, change)` is called for each topic it
    /// was in.
    #[allow(clippy::expect_used)] // every listed subscription has its link (the topics fuzz target checks)
    pub fn remove_subscriber(&mut self, sub: SubId, mut changed: impl FnMut(&[u8], Change)) {
        while let Some(&t) = self.subscribers[sub.0 as usize].topics.last() {
            let name = self.topics[t as usize].name.clone();
            let at = self
                .links
                .remove(&(sub.0, t))
                .expect("a listed subscription");
            changed(&name, self.unlink(sub.0, t, at));
        }
        self.subscribers.remove(sub.0 as usize);
    }

    /// Whether `sub` is subscribed to `topic`.
    pub fn is_subscribed(&self, sub: SubId, topic: &[u8]) -> bool {
        self.names
            .get(topic)
            .is_some_and(|&t| self.links.contains_key(&(sub.0, t)))
    }

    /// The topics `sub` is subscribed to, in no particular order.
    pub fn topics_of(&self, sub: SubId) -> impl Iterator<Item = &[u8]> {
        self.subscribers[sub.0 as usize]
            .topics
            .iter()
            .map(|&t| &*self.topics[t as usize].name)
    }

    /// The keys of `topic`'s subscribers, in no particular order (none if it has none).
    pub fn members(&self, topic: &[u8]) -> impl Iterator<Item = u64> + '_ {
        let members = self
            .names
            .get(topic)
            .map_or(&[][..], |&t| &self.topics[t as usize].members[..]);
        members.iter().map(|&s| self.subscribers[s as usize].key)
    }

    /// How many subscribers `topic` has.
    pub fn count(&self, topic: &[u8]) -> usize {
        self.names
            .get(topic)
            .map_or(0, |&t| self.topics[t as usize].members.len())
    }

    /// Topics with at least one subscriber.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Whether there is no topic.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Subscriptions over all topics.
    pub fn subscriptions(&self) -> usize {
        self.links.len()
    }

    /// Remove subscription (`s`, `t`), which was at `(in_sub, in_topic)`, from both lists,
    /// fixing the position of the entry each swap-remove moved; drop the topic if it is now
    /// empty.
    #[allow(clippy::expect_used)] // every listed subscription has its link (the topics fuzz target checks)
    fn unlink(&mut self, s: u32, t: u32, (in_sub, in_topic): (u32, u32)) -> Change {
        let mine = &mut self.subscribers[s as usize].topics;
        mine.swap_remove(in_sub as usize);
        if let Some(&moved) = mine.get(in_sub as usize) {
            self.links
                .get_mut(&(s, moved))
                .expect("a listed subscription")
                .0 = in_sub;
        }
        let topic = &mut self.topics[t as usize];
        topic.members.swap_remove(in_topic as usize);
        if let Some(&moved) = topic.members.get(in_topic as usize) {
            self.links.get_mut(&(moved, t)).expect("a listed member").1 = in_topic;
        }
        let new = topic.members.len();
        if new == 0 {
            let topic = self.topics.remove(t as usize);
            self.names.remove(&topic.name);
        }
        Change { old: new + 1, new }
    }

    /// Debug builds and tests: both lists and the positions agree.
    pub fn check(&self) {
        let mut subscriptions = 0;
        for (t, topic) in self.topics.iter() {
            assert!(!topic.members.is_empty(), "empty topic kept");
            assert_eq!(self.names.get(&topic.name), Some(&(t as u32)));
            for (i, &s) in topic.members.iter().enumerate() {
                assert_eq!(self.links[&(s, t as u32)].1, i as u32);
            }
            subscriptions += topic.members.len();
        }
        for (s, sub) in self.subscribers.iter() {
            for (i, &t) in sub.topics.iter().enumerate() {
                assert_eq!(self.links[&(s as u32, t)].0, i as u32);
            }
        }
        assert_eq!(self.names.len(), self.topics.len());
        assert_eq!(subscriptions, self.links.len());
    }
}

/// The end of a list of what a subscriber is owed.
const END: u32 = u32::MAX;

/// Publications `from..to` (consecutive), owed to one subscriber; `next` is the entry of the
/// subscriber's next run, or [`END`].
#[derive(Clone, Copy)]
struct Run {
    from: u32,
    to: u32,
    next: u32,
}

/// One turn's publications, framed once each, and what each subscriber is owed of them (see
/// the module docs).
pub struct Fanout {
    /// The publications, framed, back to back.
    frames: Vec<u8>,
    /// Each publication's frame in `frames`.
    pubs: Vec<Range<usize>>,
    /// What is owed: runs of publications, each subscriber's linked in order.
    owed: Vec<Run>,
    /// Per slot: the first and last run of what it is owed.
    lists: Vec<Option<(u32, u32)>>,
    /// Slots owed something, with their generation, in the order they were first owed.
    owing: Vec<(usize, u32)>,
    /// The publications from `z0` on, framed for subscribers that take them compressed.
    zframes: Vec<u8>,
    /// Each of those frames in `zframes` (publication `z0 + i` at `i`).
    zpubs: Vec<Range<usize>>,
    /// The turn's first publication owed to a slot in `zslots`, or [`END`].
    z0: u32,
    /// Per slot: it takes publications compressed ([`Fanout::set_compressed`]).
    zslots: Vec<bool>,
}

impl Default for Fanout {
    fn default() -> Self {
        Fanout {
            frames: Vec::new(),
            pubs: Vec::new(),
            owed: Vec::new(),
            lists: Vec::new(),
            owing: Vec::new(),
            zframes: Vec::new(),
            zpubs: Vec::new(),
            z0: END,
            zslots: Vec::new(),
        }
    }
}

/// Where a subscriber is in reading what it is owed ([`Fanout::take`], [`Fanout::next`]):
/// the run, and the next publication in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    run: u32,
    at: u32,
    /// Its subscriber takes the compressed framing where there is one.
    z: bool,
}

impl Cursor {
    /// Whether nothing more is owed.
    pub fn is_end(self) -> bool {
        self.run == END
    }
}

/// Deliver early, before the turn ends ([`Fanout::is_large`]), once this many runs of
/// publications are owed: what a turn holds for its subscribers stays bounded however many
/// messages one read publishes to however many subscribers.
pub const MAX_OWED: usize = 1 << 16;
/// Deliver early once a turn keeps this many publications.
pub const MAX_PUBS: usize = 1 << 16;
/// Deliver early once a turn's publications take this many bytes framed.
pub const MAX_FRAMED: usize = 1 << 20;
/// The most bytes of publications one loop of a cluster holds forwarded from the others and not
/// yet taken; beyond it a loop that does not keep up misses them (counted).
pub const MAX_FORWARDED: usize = 16 << 20;

impl Fanout {
    /// Frame one publication with `write` and owe it to each of `to` (slot, generation); if one
    /// of them takes publications compressed, or one did earlier this turn, frame it with
    /// `write_z` too (see the module docs). Returns how many it is owed to; with none, nothing
    /// is kept.
    pub fn publish(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>),
        write_z: impl FnOnce(&mut Vec<u8>),
        to: impl IntoIterator<Item = (usize, u32)>,
    ) -> usize {
        let start = self.frames.len();
        write(&mut self.frames);
        let p = self.pubs.len() as u32;
        let mut n = 0;
        let mut z = false;
        for (slot, gen) in to {
            n += 1;
            z = z || self.zslots.get(slot).copied().unwrap_or(false);
            if self.lists.len() <= slot {
                self.lists.resize(slot + 1, None);
            }
            let entry = self.owed.len() as u32;
            match &mut self.lists[slot] {
                // Owed the publication before this one: its run goes on.
                Some((_, last)) if self.owed[*last as usize].to == p => {
                    self.owed[*last as usize].to = p + 1;
                    continue;
                }
                Some((_, last)) => {
                    self.owed[*last as usize].next = entry;
                    *last = entry;
                }
                list @ None => {
                    *list = Some((entry, entry));
                    self.owing.push((slot, gen));
                }
            }
            self.owed.push(Run {
                from: p,
                to: p + 1,
                next: END,
            });
        }
        if n == 0 {
            self.frames.truncate(start);
            return 0;
        }
        self.pubs.push(start..self.frames.len());
        if z && self.z0 == END {
            self.z0 = p;
        }
        if self.z0 != END {
            let zstart = self.zframes.len();
            write_z(&mut self.zframes);
            self.zpubs.push(zstart..self.zframes.len());
        }
        n
    }

    /// Whether the connection in `slot` takes publications compressed (it negotiated
    /// permessage-deflate), from its next publication on. A slot's new connection sets it anew.
    pub fn set_compressed(&mut self, slot: usize, on: bool) {
        if self.zslots.len() <= slot {
            if !on {
                return;
            }
            self.zslots.resize(slot + 1, false);
        }
        self.zslots[slot] = on;
    }

    /// The frames of publications `from..to` of one run, as a subscriber with the compressed
    /// framing (`z`) or not takes them: one slice, and each publication's range in it.
    #[inline]
    fn arena(&self, z: bool, from: usize) -> (&[u8], &[Range<usize>], usize) {
        let z0 = self.z0 as usize;
        match z && self.z0 != END && from >= z0 {
            true => (&self.zframes, &self.zpubs, z0),
            false => (&self.frames, &self.pubs, 0),
        }
    }

    /// Whether anything is owed to anyone.
    #[inline]
    pub fn owing(&self) -> bool {
        !self.owing.is_empty()
    }

    /// What `slot` is owed, from the first (read it with [`Fanout::next`] or
    /// [`Fanout::next_span`]); its list is cleared.
    pub fn take(&mut self, slot: usize) -> Cursor {
        let first = self.lists.get_mut(slot).and_then(Option::take);
        let z = self.zslots.get(slot).copied().unwrap_or(false);
        self.cursor(first.map_or(END, |(first, _)| first), z)
    }

    /// A cursor at the start of run `run` (or the end).
    fn cursor(&self, run: u32, z: bool) -> Cursor {
        let at = match run {
            END => 0,
            r => self.owed[r as usize].from,
        };
        Cursor { run, at, z }
    }

    /// The next publication's frame at `at`, moving `at` on; `None` at the end.
    pub fn next(&self, at: &mut Cursor) -> Option<&[u8]> {
        if at.is_end() {
            return None;
        }
        let p = at.at as usize;
        let run = self.owed[at.run as usize];
        let (frames, pubs, base) = self.arena(at.z, run.from as usize);
        at.at += 1;
        if at.at == run.to {
            *at = self.cursor(run.next, at.z);
        }
        Some(&frames[pubs[p - base].clone()])
    }

    /// The next publications at `at` that lie back to back in the arena, as one slice, and how
    /// many they are, moving `at` past them; `None` at the end. The first is always taken; each
    /// following one of the same run while the bytes taken before it are at most `room` (as a
    /// send is admitted while what is queued before it is within a limit).
    pub fn next_span(&self, at: &mut Cursor, room: usize) -> Option<(&[u8], usize)> {
        if at.is_end() {
            return None;
        }
        let run = self.owed[at.run as usize];
        let (frames, pubs, z0) = self.arena(at.z, run.from as usize);
        let (from, to) = (at.at as usize - z0, run.to as usize - z0);
        let base = pubs[from].start;
        let more = pubs[from + 1..to].partition_point(|r| r.start - base <= room);
        let end = from + 1 + more;
        *at = match end == to {
            true => self.cursor(run.next, at.z),
            false => Cursor {
                run: at.run,
                at: (end + z0) as u32,
                z: at.z,
            },
        };
        Some((&frames[base..pubs[end - 1].end], end - from))
    }

    /// The slots owed something, with their generations (each slot with the generation it had
    /// when first owed; a slot reused since may appear again with its new one). Take each one's
    /// list with [`Fanout::take`] if that generation is still the slot's, and only then.
    pub fn take_owing(&mut self) -> Vec<(usize, u32)> {
        std::mem::take(&mut self.owing)
    }

    /// The subscriber in `slot` is gone: it is owed nothing more.
    pub fn forget(&mut self, slot: usize) {
        if let Some(list) = self.lists.get_mut(slot) {
            *list = None;
        }
        self.set_compressed(slot, false);
    }

    /// Everything owed has been delivered (or forgotten): start the next turn, keeping a small
    /// arena's memory.
    pub fn clear(&mut self) {
        debug_assert!(
            self.lists.iter().all(Option::is_none),
            "undelivered publications"
        );
        self.frames.clear();
        if self.frames.capacity() > MAX_FRAMED {
            self.frames = Vec::new();
        }
        self.pubs.clear();
        if self.pubs.capacity() > MAX_PUBS {
            self.pubs = Vec::new();
        }
        self.owed.clear();
        if self.owed.capacity() > MAX_OWED {
            self.owed = Vec::new();
        }
        self.owing.clear();
        self.zframes.clear();
        if self.zframes.capacity() > MAX_FRAMED {
            self.zframes = Vec::new();
        }
        self.zpubs.clear();
        if self.zpubs.capacity() > MAX_PUBS {
            self.zpubs = Vec::new();
        }
        self.z0 = END;
    }

    /// The heap memory the fan-out holds for publications (arena and references), as the
    /// memory budget counts it. (The per-slot lists, 12 bytes a slot, grow with the
    /// connections, not with what is published.)
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.frames.capacity()
            + self.pubs.capacity() * size_of::<Range<usize>>()
            + self.owed.capacity() * size_of::<Run>()
            + self.owing.capacity() * size_of::<(usize, u32)>()
            + self.zframes.capacity()
            + self.zpubs.capacity() * size_of::<Range<usize>>()
    }

    /// Nothing was published this turn: give back what the arena kept from the last one.
    pub fn release(&mut self) {
        debug_assert!(self.owing.is_empty() && self.pubs.is_empty());
        self.frames = Vec::new();
        self.pubs = Vec::new();
        self.owed = Vec::new();
        self.owing = Vec::new();
        self.zframes = Vec::new();
        self.zpubs = Vec::new();
    }

    /// What is owed (runs of publications, the publications, or their frames) is large enough
    /// to deliver now, before the turn ends.
    pub fn is_large(&self) -> bool {
        self.owed.len() >= MAX_OWED
            || self.pubs.len() >= MAX_PUBS
            || self.frames.len() + self.zframes.len() >= MAX_FRAMED
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn subscribe_publish_unsubscribe() {
        let mut r = Topics::new();
        let (a, b) = (r.add_subscriber(1), r.add_subscriber(2));
        assert_eq!(
            r.subscribe(a, b"room", 8),
            Ok(Some(Change { old: 0, new: 1 }))
        );
        assert_eq!(r.subscribe(a, b"room", 8), Ok(None), "already subscribed");
        assert_eq!(
            r.subscribe(b, b"room", 8),
            Ok(Some(Change { old: 1, new: 2 }))
        );
        assert_eq!(
            r.subscribe(b, b"other", 8),
            Ok(Some(Change { old: 0, new: 1 }))
        );
        let mut m: Vec<u64> = r.members(b"room").collect();
        m.sort();
        assert_eq!(m, [1, 2]);
        assert!(r.is_subscribed(a, b"room") && !r.is_subscribed(a, b"other"));
        assert_eq!((r.len(), r.subscriptions(), r.count(b"room")), (2, 3, 2));
        assert_eq!(r.unsubscribe(a, b"room"), Some(Change { old: 2, new: 1 }));
        assert_eq!(r.unsubscribe(a, b"room"), None);
        let mut changes = Vec::new();
        r.remove_subscriber(b, |t, c| changes.push((t.to_vec(), c)));
        changes.sort();
        assert_eq!(
            changes,
            [
                (b"other".to_vec(), Change { old: 1, new: 0 }),
                (b"room".to_vec(), Change { old: 1, new: 0 })
            ]
        );
        assert!(r.is_empty(), "topics are freed with their last subscriber");
        assert_eq!(r.members(b"room").count(), 0);
        r.check();
    }

    /// Publication `p`'s frame in the tests: three bytes.
    fn frame(p: u8) -> impl FnOnce(&mut Vec<u8>) {
        move |f: &mut Vec<u8>| f.extend_from_slice(&[p, p, p])
    }

    /// The compressed framing, where no subscriber takes it: never written.
    fn plain() -> impl FnOnce(&mut Vec<u8>) {
        |_: &mut Vec<u8>| panic!("no subscriber takes publications compressed")
    }

    /// Subscribers that take publications compressed share a second framing from the turn's
    /// first publication owed to one of them; a run that began before it is read plain to its
    /// end; a slot's next connection is plain unless set again.
    #[test]
    fn compressed_subscribers_read_the_second_framing() {
        let mut f = Fanout::default();
        f.set_compressed(2, true);
        // 0 to slot 1 only (plain); 1 and 2 to both; 3 to slot 1 only, yet framed twice.
        let zframe = |p: u8| move |z: &mut Vec<u8>| z.extend_from_slice(&[p + 100; 2]);
        assert_eq!(f.publish(frame(0), zframe(0), [(1, 1)]), 1);
        for p in 1..3 {
            assert_eq!(f.publish(frame(p), zframe(p), [(1, 1), (2, 1)]), 2);
        }
        assert_eq!(f.publish(frame(3), zframe(3), [(1, 1)]), 1);
        assert_eq!(f.publish(frame(4), zframe(4), [(2, 1)]), 1);
        let mut at = f.take(1);
        let (span, n) = f.next_span(&mut at, usize::MAX).expect("owed");
        assert_eq!((span, n), (&[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3][..], 4));
        let mut at = f.take(2);
        assert_eq!(
            f.next_span(&mut at, usize::MAX),
            Some((&[101, 101, 102, 102][..], 2)),
            "one slice of the second arena"
        );
        assert_eq!(f.next(&mut at), Some(&[104, 104][..]));
        assert!(at.is_end());
        f.clear();
        // The slot's connection ended; the next one there is plain.
        f.forget(2);
        assert_eq!(f.publish(frame(5), plain(), [(2, 2)]), 1);
        let mut at = f.take(2);
        assert_eq!(f.next(&mut at), Some(&[5, 5, 5][..]));
        f.clear();
    }

    #[test]
    fn consecutive_publications_are_one_run_and_one_slice() {
        let mut f = Fanout::default();
        // Slot 1 is owed 0, 1, 2 and 4; slot 2 only 3.
        for p in 0..5u8 {
            let to: &[(usize, u32)] = if p == 3 { &[(2, 7)] } else { &[(1, 9)] };
            assert_eq!(f.publish(frame(p), plain(), to.iter().copied()), 1);
        }
        assert_eq!(f.take_owing(), [(1, 9), (2, 7)]);
        let mut at = f.take(1);
        assert_eq!(
            f.next_span(&mut at, usize::MAX),
            Some((&[0, 0, 0, 1, 1, 1, 2, 2, 2][..], 3)),
            "a run is one slice"
        );
        assert_eq!(f.next_span(&mut at, usize::MAX), Some((&[4, 4, 4][..], 1)));
        assert_eq!(f.next_span(&mut at, usize::MAX), None);
        assert!(at.is_end());
        let mut at = f.take(2);
        assert_eq!(f.next(&mut at), Some(&[3, 3, 3][..]));
        assert_eq!(f.next(&mut at), None);
        f.clear();
    }

    /// `next_span` takes the first frame, then each one while the bytes before it are within
    /// `room`, as a send is admitted while what is queued before it is within the limit.
    #[test]
    fn a_span_stops_where_the_room_does() {
        let mut f = Fanout::default();
        for p in 0..10u8 {
            f.publish(frame(p), plain(), [(0, 0)]);
        }
        let mut at = f.take(0);
        assert_eq!(f.next_span(&mut at, 0), Some((&[0, 0, 0][..], 1)));
        assert_eq!(f.next_span(&mut at, 2), Some((&[1, 1, 1][..], 1)));
        // 3 bytes before the second frame and 6 before the third are within 6; 9 are not.
        let (span, n) = f.next_span(&mut at, 6).expect("owed");
        assert_eq!((span.len(), n, span[0], span[8]), (9, 3, 2, 4));
        assert_eq!(f.next(&mut at), Some(&[5, 5, 5][..]));
        let (span, n) = f.next_span(&mut at, usize::MAX).expect("owed");
        assert_eq!((span.len(), n, span[0], span[11]), (12, 4, 6, 9));
        assert_eq!(f.next_span(&mut at, usize::MAX), None);
        f.clear();
    }

    /// A turn that publishes many messages to one topic's subscribers holds one run per
    /// subscriber, not one entry per delivery: 1,000 messages to 100 subscribers (100,000
    /// deliveries) are not yet large, and all of them are read back in order.
    #[test]
    fn one_topics_publications_cost_one_run_per_subscriber() {
        let mut f = Fanout::default();
        for p in 0..1000u32 {
            let n = f.publish(
                |b: &mut Vec<u8>| b.extend_from_slice(&p.to_le_bytes()),
                plain(),
                (0..100).map(|s| (s, 1)),
            );
            assert_eq!(n, 100);
        }
        assert!(!f.is_large(), "100,000 deliveries in 100 runs");
        for (slot, _) in f.take_owing() {
            let mut at = f.take(slot);
            let (span, n) = f.next_span(&mut at, usize::MAX).expect("owed");
            assert_eq!(n, 1000);
            let got: Vec<u32> = span
                .chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(got, (0..1000).collect::<Vec<u32>>());
            assert!(at.is_end());
        }
        f.clear();
        // Publications are bounded too, even when they cost no new run.
        for p in 0..MAX_PUBS as u32 {
            f.publish(|b: &mut Vec<u8>| b.push(p as u8), plain(), [(0, 1)]);
        }
        assert!(f.is_large());
        f.take(0);
        f.clear();
    }

    #[test]
    fn names_and_counts_are_bounded() {
        let mut r = Topics::new();
        let a = r.add_subscriber(1);
        let long = vec![b'x'; MAX_TOPIC_LEN + 1];
        assert_eq!(r.subscribe(a, &long, 8), Err(TopicError::TooLong));
        assert!(r.subscribe(a, &long[..MAX_TOPIC_LEN], 8).is_ok());
        assert!(r.subscribe(a, b"two", 2).is_ok());
        assert_eq!(r.subscribe(a, b"three", 2), Err(TopicError::TooMany));
        assert_eq!(r.len(), 2, "a refused topic is not created");
        r.check();
    }

    /// Random operations against a model (a map from topic to member set): the registry says
    /// the same, and its back-pointers stay consistent.
    #[test]
    fn agrees_with_a_model_under_random_operations() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut r = Topics::new();
        let mut model: BTreeMap<Vec<u8>, BTreeSet<u64>> = BTreeMap::new();
        let mut subs: Vec<(u64, SubId)> = Vec::new();
        let mut key = 0;
        for _ in 0..20_000 {
            let topic = vec![b'a' + next(12) as u8];
            match next(6) {
                0 => {
                    key += 1;
                    subs.push((key, r.add_subscriber(key)));
                }
                1 | 2 if !subs.is_empty() => {
                    let (k, s) = subs[next(subs.len() as u64) as usize];
                    let got = r.subscribe(s, &topic, 6);
                    model.entry(topic.clone()).or_default();
                    let mine = model.values().filter(|m| m.contains(&k)).count();
                    let set = model.get_mut(&topic).unwrap();
                    match got {
                        Ok(Some(c)) => {
                            assert!(set.insert(k));
                            assert_eq!(c.new, set.len());
                        }
                        Ok(None) => assert!(set.contains(&k)),
                        Err(TopicError::TooMany) => assert!(mine >= 6 && !set.contains(&k)),
                        Err(e) => panic!("{e}"),
                    }
                    model.retain(|_, m| !m.is_empty());
                }
                3 if !subs.is_empty() => {
                    let (k, s) = subs[next(subs.len() as u64) as usize];
                    let got = r.unsubscribe(s, &topic);
                    let had = model.get_mut(&topic).is_some_and(|m| m.remove(&k));
                    assert_eq!(got.is_some(), had);
                    model.retain(|_, m| !m.is_empty());
                }
                4 if !subs.is_empty() => {
                    let (k, s) = subs.swap_remove(next(subs.len() as u64) as usize);
                    let mut seen = 0;
                    r.remove_subscriber(s, |_, _| seen += 1);
                    let mut was = 0;
                    for m in model.values_mut() {
                        was += m.remove(&k) as usize;
                    }
                    assert_eq!(seen, was);
                    model.retain(|_, m| !m.is_empty());
                }
                _ => {}
            }
            let got: BTreeSet<u64> = r.members(&topic).collect();
            assert_eq!(got, model.get(&topic).cloned().unwrap_or_default());
            assert_eq!(r.len(), model.len());
        }
        r.check();
        for (k, s) in &subs {
            let mut mine: Vec<&[u8]> = r.topics_of(*s).collect();
            mine.sort();
            let want: Vec<&[u8]> = model
                .iter()
                .filter(|(_, m)| m.contains(k))
                .map(|(t, _)| &t[..])
                .collect();
            assert_eq!(mine, want);
        }
    }
}
