//! Hierarchical timer wheel keyed by abstract `u64` ticks.
//!
//! Six levels of 64 slots; a slot on level `l` spans `64^l` ticks, so the wheel
//! sees `2^36` ticks ahead. Deadlines further out are parked in the last slot of
//! the top level's window and re-filed when that slot is processed.
//!
//! Entries live in a [`Slab`]; each slot holds the head of an intrusive doubly
//! linked list threaded through the entries by index, so insert, cancel and
//! extend are O(1). Per level a `u64` bitmap records the occupied slots; the next
//! occupied slot is found with a rotate and `trailing_zeros`.
//!
//! Every filed entry sits in a slot whose start tick (its *position*) is `<=` its
//! deadline and lies strictly after the current tick's slot on that level, within
//! the next 63 slots. Processing a slot at its position moves due entries to a
//! due list (popped by [`TimerWheel::poll`]) and re-files the others lower down.

use std::fmt;
use std::num::NonZeroU64;

use slab::Slab;

const LEVELS: usize = 6;
const SLOTS: usize = 64;
const SLOT_BITS: u32 = 6;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// Ticks the wheel can see ahead (`2^36`).
const WHEEL_SPAN: u64 = 1 << (SLOT_BITS as usize * LEVELS);
/// "No entry" link value.
const NIL: u32 = u32::MAX;
/// `level` value for entries in the due list.
const DUE: u8 = LEVELS as u8;
/// Index of the due list in `heads`.
const DUE_LIST: usize = DUE as usize * SLOTS;

/// The bit shift of a slot's span on `level` (a slot spans `1 << shift` ticks).
fn shift_of(level: usize) -> u32 {
    SLOT_BITS * level as u32
}

/// Index into `heads`; the due list is (`DUE`, 0).
fn list_of(level: u8, slot: u8) -> usize {
    level as usize * SLOTS + slot as usize
}

struct Entry<T> {
    payload: T,
    /// The true deadline; may be later than the slot it is filed in.
    deadline: u64,
    generation: NonZeroU64,
    prev: u32,
    next: u32,
    /// `0..LEVELS`, or `DUE` (then `slot` is 0).
    level: u8,
    slot: u8,
}

/// Handle to a timer in a [`TimerWheel`].
///
/// Holds the entry's slab index and a generation number, which is unique for
/// the lifetime of the wheel. Once the timer fired or was cancelled the key is
/// *stale*: every method given it returns `None`/`false` and never touches
/// another timer that happens to reuse the same slab slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    /// Non-zero, so that `Option<TimerKey>` costs nothing extra.
    generation: NonZeroU64,
}

/// A hierarchical timer wheel holding payloads of type `T`.
///
/// Time is an abstract, monotonic `u64` tick (e.g. milliseconds since loop
/// start). Insert, cancel and extend are O(1); [`poll`](Self::poll) costs time
/// proportional to the slots and entries it visits, never to elapsed ticks.
/// Capacity is limited to `u32::MAX - 1` simultaneous timers.
pub struct TimerWheel<T> {
    entries: Slab<Entry<T>>,
    /// List heads: `LEVELS * SLOTS` slots followed by the due list.
    heads: [u32; LEVELS * SLOTS + 1],
    occupied: [u64; LEVELS],
    /// The tick the wheel has been advanced to.
    elapsed: u64,
    next_generation: u64,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("now", &self.elapsed)
            .field("len", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl<T> TimerWheel<T> {
    /// Creates an empty wheel whose current tick is `now`. O(1), no allocation.
    pub fn new(now: u64) -> Self {
        Self::with_capacity(now, 0)
    }

    /// Creates an empty wheel at tick `now` with room for `cap` timers before
    /// the entry storage reallocates. Allocates once.
    pub fn with_capacity(now: u64, cap: usize) -> Self {
        TimerWheel {
            entries: Slab::with_capacity(cap),
            heads: [NIL; LEVELS * SLOTS + 1],
            occupied: [0; LEVELS],
            elapsed: now,
            next_generation: 0,
        }
    }

    /// The tick the wheel was last advanced to: the largest `now` passed to
    /// [`poll`](Self::poll), or the creation tick. O(1).
    pub fn now(&self) -> u64 {
        self.elapsed
    }

    /// Number of pending timers (not yet fired or cancelled). O(1).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no timers are pending. O(1).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a timer firing at `deadline` and returns its key. A deadline at or
    /// before [`now`](Self::now) is due and fires on the next `poll`.
    /// O(1) (amortised: the slab may grow). Panics if more than `u32::MAX - 1`
    /// timers are pending at once.
    pub fn insert(&mut self, deadline: u64, payload: T) -> TimerKey {
        let generation = NonZeroU64::MIN.saturating_add(self.next_generation);
        self.next_generation += 1;
        let index = self.entries.insert(Entry {
            payload,
            deadline,
            generation,
            prev: NIL,
            next: NIL,
            level: DUE,
            slot: 0,
        });
        // Timers are bounded by connections, which the fd budget bounds: 2^32 - 1 of them would
        // take 160 GiB of entries first.
        #[allow(clippy::panic)]
        let index = match u32::try_from(index) {
            Ok(i) if i != NIL => i,
            _ => panic!("TimerWheel: too many timers"),
        };
        self.file(index, self.elapsed);
        TimerKey { index, generation }
    }

    /// Removes the timer and returns its payload; `None` (and no effect) if the
    /// key is stale. O(1).
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        self.entry(key)?;
        self.unlink(key.index);
        Some(self.entries.remove(key.index as usize).payload)
    }

    /// Moves the timer's deadline to `deadline`, earlier or later; it then fires
    /// at the first `poll` whose `now >= deadline` (a deadline `<= now()` makes it
    /// due immediately). Returns `false` (and does nothing) for a stale key.
    ///
    /// O(1). For a timer not yet due, a deadline at or after the start of the
    /// slot it is filed in (always true when extending) only records the new
    /// value; the timer is re-filed lazily when that slot is processed. An
    /// earlier deadline, or a future one for a due timer, unlinks and re-files
    /// it immediately.
    pub fn extend(&mut self, key: TimerKey, deadline: u64) -> bool {
        let Some(entry) = self.entry_mut(key) else {
            return false;
        };
        entry.deadline = deadline;
        let (level, slot) = (entry.level, entry.slot);
        let keep = if level == DUE {
            deadline <= self.elapsed
        } else {
            deadline >= self.slot_position(level as usize, slot)
        };
        if !keep {
            self.unlink(key.index);
            self.file(key.index, self.elapsed);
        }
        true
    }

    /// The timer's current deadline, or `None` for a stale key. O(1).
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        self.entry(key).map(|e| e.deadline)
    }

    /// The timer's payload, or `None` for a stale key. O(1).
    pub fn get(&self, key: TimerKey) -> Option<&T> {
        self.entry(key).map(|e| &e.payload)
    }

    /// The timer's payload, mutably, or `None` for a stale key. O(1).
    pub fn get_mut(&mut self, key: TimerKey) -> Option<&mut T> {
        self.entry_mut(key).map(|e| &mut e.payload)
    }

    /// Advances the wheel to `now` (a `now` below [`now()`](Self::now) counts as
    /// `now()`) and pops one timer whose deadline is `<= now`, removing it (its
    /// key becomes stale). Call repeatedly until `None`; every timer with
    /// deadline `<= now` comes out, each exactly once, in no particular order.
    ///
    /// Cost: proportional to the occupied slots visited (found via bitmaps) and
    /// the entries cascaded or fired; a jump of `2^36` ticks or more re-files
    /// every entry once. Never proportional to the number of elapsed ticks.
    pub fn poll(&mut self, now: u64) -> Option<(TimerKey, T)> {
        self.advance(now);
        let index = self.heads[DUE_LIST];
        if index == NIL {
            return None;
        }
        self.unlink(index);
        let entry = self.entries.remove(index as usize);
        let key = TimerKey {
            index,
            generation: entry.generation,
        };
        Some((key, entry.payload))
    }

    /// When to poll next: `None` when empty; [`now()`](Self::now) when a timer
    /// is already due; otherwise the start tick of the earliest occupied slot,
    /// which is `> now()` and `<=` every pending deadline. Polling at that tick
    /// always makes progress (fires or cascades a slot), so sleeping until it and
    /// polling in a loop reaches each deadline exactly. It can be early: up to
    /// one wake-up per level for a timer, and for deadlines beyond `2^36` ticks
    /// one wake-up per `~2^36` ticks. O(levels).
    pub fn next_expiration(&self) -> Option<u64> {
        if self.heads[DUE_LIST] != NIL {
            return Some(self.elapsed);
        }
        self.next_slot().map(|(position, _, _)| position)
    }

    fn entry(&self, key: TimerKey) -> Option<&Entry<T>> {
        let entry = self.entries.get(key.index as usize)?;
        (entry.generation == key.generation).then_some(entry)
    }

    fn entry_mut(&mut self, key: TimerKey) -> Option<&mut Entry<T>> {
        let entry = self.entries.get_mut(key.index as usize)?;
        (entry.generation == key.generation).then_some(entry)
    }

    /// Pushes `index` onto the front of list (`level`, `slot`).
    fn link(&mut self, index: u32, level: u8, slot: u8) {
        let list = list_of(level, slot);
        let head = self.heads[list];
        let entry = &mut self.entries[index as usize];
        entry.level = level;
        entry.slot = slot;
        entry.prev = NIL;
        entry.next = head;
        if head != NIL {
            self.entries[head as usize].prev = index;
        }
        self.heads[list] = index;
        if level != DUE {
            self.occupied[level as usize] |= 1 << slot;
        }
    }

    /// Removes `index` from whatever list it is in.
    fn unlink(&mut self, index: u32) {
        let entry = &self.entries[index as usize];
        let (prev, next, level, slot) = (entry.prev, entry.next, entry.level, entry.slot);
        if prev != NIL {
            self.entries[prev as usize].next = next;
        } else {
            self.heads[list_of(level, slot)] = next;
            if next == NIL && level != DUE {
                self.occupied[level as usize] &= !(1 << slot);
            }
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
    }

    /// Files unlinked entry `index` relative to `self.elapsed`: into the due
    /// list if its deadline is `<= due_limit`, else into the lowest level whose
    /// window holds the deadline, else into the last slot of the top level.
    fn file(&mut self, index: u32, due_limit: u64) {
        let deadline = self.entries[index as usize].deadline;
        if deadline <= due_limit {
            self.link(index, DUE, 0);
            return;
        }
        for level in 0..LEVELS {
            let shift = shift_of(level);
            let start = self.elapsed >> shift << shift;
            // Window: the 63 slots after the current one; `None` = past u64::MAX.
            match start.checked_add(1 << (shift + SLOT_BITS)) {
                Some(end) if deadline >= end => {}
                _ => {
                    let slot = ((deadline >> shift) & SLOT_MASK) as u8;
                    return self.link(index, level as u8, slot);
                }
            }
        }
        // Beyond the wheel: park in the top level's last slot of the window.
        let top = shift_of(LEVELS - 1);
        let slot = (((self.elapsed >> top) + SLOT_MASK) & SLOT_MASK) as u8;
        self.link(index, (LEVELS - 1) as u8, slot);
    }

    /// Start tick of `slot` on `level`, reading the slots cyclically from the
    /// current tick's slot (offset 0 = the current slot, only seen while a slot
    /// at exactly `elapsed` is still to be processed).
    fn slot_position(&self, level: usize, slot: u8) -> u64 {
        let shift = shift_of(level);
        let current = self.elapsed >> shift;
        let offset = (u64::from(slot).wrapping_sub(current)) & SLOT_MASK;
        (current << shift) + (offset << shift)
    }

    /// The earliest occupied slot over all levels: (position, level, slot).
    fn next_slot(&self) -> Option<(u64, usize, u8)> {
        let mut best: Option<(u64, usize, u8)> = None;
        for (level, &occupied) in self.occupied.iter().enumerate() {
            if occupied == 0 {
                continue;
            }
            let current = ((self.elapsed >> shift_of(level)) & SLOT_MASK) as u32;
            let offset = occupied.rotate_right(current).trailing_zeros();
            let slot = ((current + offset) & SLOT_MASK as u32) as u8;
            let position = self.slot_position(level, slot);
            if best.is_none_or(|(p, _, _)| position < p) {
                best = Some((position, level, slot));
            }
        }
        best
    }

    /// Processes every slot whose position is `<= now`, moving due entries to
    /// the due list and cascading the rest, then sets `elapsed = now`.
    fn advance(&mut self, now: u64) {
        if now <= self.elapsed {
            return;
        }
        if now - self.elapsed >= WHEEL_SPAN {
            // Every filed position is < elapsed + 2^36 <= now: re-file all at once.
            return self.refile_all(now);
        }
        while let Some((position, level, slot)) = self.next_slot() {
            if position > now {
                break;
            }
            self.elapsed = position;
            self.occupied[level] &= !(1 << slot);
            let mut index = std::mem::replace(&mut self.heads[list_of(level as u8, slot)], NIL);
            while index != NIL {
                let next = self.entries[index as usize].next;
                self.file(index, now);
                index = next;
            }
        }
        self.elapsed = now;
    }

    /// Detaches every filed entry, jumps to `now` and files them again.
    fn refile_all(&mut self, now: u64) {
        let mut chain = NIL;
        for level in 0..LEVELS {
            let mut occupied = std::mem::take(&mut self.occupied[level]);
            while occupied != 0 {
                let slot = occupied.trailing_zeros() as usize;
                occupied &= occupied - 1;
                let mut index = std::mem::replace(&mut self.heads[level * SLOTS + slot], NIL);
                while index != NIL {
                    let entry = &mut self.entries[index as usize];
                    let next = entry.next;
                    entry.next = chain;
                    chain = index;
                    index = next;
                }
            }
        }
        self.elapsed = now;
        while chain != NIL {
            let next = self.entries[chain as usize].next;
            self.file(chain, now);
            chain = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls at `now` until `None`, returning the payloads sorted.
    fn drain(wheel: &mut TimerWheel<u64>, now: u64) -> Vec<u64> {
        let mut fired = Vec::new();
        while let Some((key, id)) = wheel.poll(now) {
            assert_eq!(wheel.get(key), None, "fired key must be stale");
            fired.push(id);
        }
        fired.sort_unstable();
        fired
    }

    #[test]
    fn insert_fires_exactly_at_deadline() {
        let mut wheel = TimerWheel::new(0);
        let key = wheel.insert(10, 1);
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.deadline(key), Some(10));
        assert_eq!(wheel.next_expiration(), Some(10));
        assert_eq!(drain(&mut wheel, 9), Vec::<u64>::new());
        assert_eq!(wheel.now(), 9);
        assert_eq!(wheel.poll(10), Some((key, 1)));
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_expiration(), None);
        assert_eq!(wheel.cancel(key), None);
    }

    #[test]
    fn deadline_in_past_or_now_fires_on_next_poll() {
        let mut wheel = TimerWheel::new(100);
        wheel.insert(50, 1);
        wheel.insert(100, 2);
        wheel.insert(101, 3);
        assert_eq!(wheel.next_expiration(), Some(100));
        // A `now` in the past counts as the current tick.
        assert_eq!(drain(&mut wheel, 7), vec![1, 2]);
        assert_eq!(wheel.now(), 100);
        assert_eq!(wheel.next_expiration(), Some(101));
        assert_eq!(drain(&mut wheel, 101), vec![3]);
    }

    #[test]
    fn cancel_returns_payload_once() {
        let mut wheel = TimerWheel::new(0);
        let a = wheel.insert(5_000, 1);
        let b = wheel.insert(5_000, 2);
        assert_eq!(wheel.cancel(a), Some(1));
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.get(b), Some(&2));
        *wheel.get_mut(b).unwrap() = 20;
        assert_eq!(drain(&mut wheel, 5_000), vec![20]);
    }

    #[test]
    fn stale_keys_after_cancel_or_fire_ignore_reused_slot() {
        let mut wheel = TimerWheel::new(0);
        let cancelled = wheel.insert(100, 1);
        assert_eq!(wheel.cancel(cancelled), Some(1));
        let fired = wheel.insert(200, 2);
        assert_eq!(fired.index, cancelled.index, "slab slot is reused");
        assert_eq!(drain(&mut wheel, 200), vec![2]);
        let live = wheel.insert(300, 3);
        assert_eq!(live.index, cancelled.index, "slab slot is reused again");
        for old in [cancelled, fired] {
            assert_ne!(old, live);
            assert_eq!(wheel.cancel(old), None);
            assert!(!wheel.extend(old, 1));
            assert_eq!(wheel.get(old), None);
            assert_eq!(wheel.get_mut(old), None);
            assert_eq!(wheel.deadline(old), None);
        }
        assert_eq!((wheel.len(), wheel.deadline(live)), (1, Some(300)));
        assert_eq!(drain(&mut wheel, 299), Vec::<u64>::new());
        assert_eq!(drain(&mut wheel, 300), vec![3]);
    }

    #[test]
    fn extend_later_records_only_and_fires_at_new_deadline() {
        let mut wheel = TimerWheel::new(0);
        let key = wheel.insert(100, 1);
        let filed = |w: &TimerWheel<u64>| {
            let entry = &w.entries[key.index as usize];
            (entry.level, entry.slot)
        };
        let before = filed(&wheel);
        assert!(wheel.extend(key, 300_000));
        assert_eq!(filed(&wheel), before, "extending later must not re-file");
        assert_eq!(wheel.deadline(key), Some(300_000));
        assert_eq!(drain(&mut wheel, 100), Vec::<u64>::new());
        assert_eq!(drain(&mut wheel, 299_999), Vec::<u64>::new());
        assert_eq!(drain(&mut wheel, 300_000), vec![1]);
    }

    #[test]
    fn extend_earlier_refiles_immediately() {
        let mut wheel = TimerWheel::new(0);
        let key = wheel.insert(1_000_000, 1);
        assert!(wheel.next_expiration().unwrap() > 50);
        assert!(wheel.extend(key, 50));
        assert_eq!(wheel.next_expiration(), Some(50));
        assert_eq!(drain(&mut wheel, 49), Vec::<u64>::new());
        assert_eq!(drain(&mut wheel, 50), vec![1]);
        // Extending into the past makes a timer due right away...
        let key = wheel.insert(500, 2);
        assert!(wheel.extend(key, 10));
        assert_eq!(wheel.next_expiration(), Some(50));
        // ...and extending a due timer to the future takes it out again.
        assert!(wheel.extend(key, 80));
        assert_eq!(wheel.next_expiration(), Some(80));
        assert_eq!(drain(&mut wheel, 79), Vec::<u64>::new());
        assert_eq!(drain(&mut wheel, 80), vec![2]);
    }

    #[test]
    fn far_deadlines_do_not_overflow() {
        let mut wheel = TimerWheel::new(0);
        wheel.insert(WHEEL_SPAN + 5, 1);
        wheel.insert(1 << 40, 2);
        wheel.insert(u64::MAX, 3);
        wheel.insert(u64::MAX - 1, 4);
        assert!(wheel.next_expiration().unwrap() <= WHEEL_SPAN + 5);
        assert_eq!(drain(&mut wheel, WHEEL_SPAN + 4), Vec::<u64>::new());
        assert_eq!(drain(&mut wheel, WHEEL_SPAN + 5), vec![1]);
        assert_eq!(drain(&mut wheel, (1 << 40) - 1), Vec::<u64>::new());
        assert_eq!(drain(&mut wheel, 1 << 40), vec![2]);
        assert_eq!(drain(&mut wheel, u64::MAX - 2), Vec::<u64>::new());
        assert_eq!(wheel.len(), 2);
        assert_eq!(wheel.next_expiration(), Some(u64::MAX - 1));
        assert_eq!(drain(&mut wheel, u64::MAX - 1), vec![4]);
        assert_eq!(drain(&mut wheel, u64::MAX), vec![3]);
        // A wheel starting next to the end of time.
        let mut wheel = TimerWheel::new(u64::MAX - 10);
        wheel.insert(u64::MAX, 1);
        wheel.insert(u64::MAX - 3, 2);
        assert_eq!(wheel.next_expiration(), Some(u64::MAX - 3));
        assert_eq!(drain(&mut wheel, u64::MAX - 3), vec![2]);
        assert_eq!(wheel.next_expiration(), Some(u64::MAX));
        assert_eq!(drain(&mut wheel, u64::MAX), vec![1]);
    }

    #[test]
    fn big_jumps_fire_everything_due() {
        let mut wheel = TimerWheel::new(12_345);
        let mut rng = XorShift(7);
        let mut expected = Vec::new();
        for id in 0..5_000 {
            let deadline = 12_345 + rng.log_uniform(45);
            wheel.insert(deadline, id);
            if deadline <= (1 << 35) {
                expected.push(id);
            }
        }
        wheel.insert(u64::MAX, 9_999);
        assert_eq!(drain(&mut wheel, 1 << 35), expected); // below the full-span jump
        assert_eq!(drain(&mut wheel, 1 << 62).len() + 1, 5_001 - expected.len());
        assert_eq!(wheel.len(), 1);
        assert_eq!(drain(&mut wheel, u64::MAX), vec![9_999]);
    }

    #[test]
    fn stepping_by_next_expiration_hits_each_deadline() {
        let mut wheel = TimerWheel::new(1_000);
        let mut rng = XorShift(99);
        let n = 2_000;
        for _ in 0..n {
            let deadline = 1_001 + rng.log_uniform(41);
            wheel.insert(deadline, deadline);
        }
        let (mut steps, mut fired) = (0, 0);
        while let Some(t) = wheel.next_expiration() {
            assert!(t > wheel.now(), "nothing is due between steps");
            while let Some((_, deadline)) = wheel.poll(t) {
                assert_eq!(deadline, t, "fired early or late");
                fired += 1;
            }
            steps += 1;
            assert!(steps <= 40 * n, "next_expiration must make progress");
        }
        assert_eq!(fired, n);
    }

    /// Deterministic xorshift64 PRNG.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// A value below `2^b` for a `b` uniform in `0..max_bits`.
        fn log_uniform(&mut self, max_bits: u64) -> u64 {
            let bits = self.below(max_bits);
            self.below(1 << bits)
        }
    }

    fn random_deadline(rng: &mut XorShift, now: u64) -> u64 {
        match rng.below(20) {
            0..=1 => now.saturating_sub(rng.below(100)),
            2..=3 => now.saturating_add(WHEEL_SPAN + rng.below(1 << 40)),
            4 => u64::MAX - rng.below(2),
            _ => now.saturating_add(1 + rng.log_uniform(37)),
        }
    }

    fn run_model(seed: u64, start: u64, ops: usize) {
        let mut rng = XorShift(seed);
        let mut wheel = TimerWheel::new(start);
        // Model: (id, key, deadline) of every pending timer.
        let (mut live, mut dead): (Vec<(u64, TimerKey, u64)>, Vec<TimerKey>) = (vec![], vec![]);
        let mut next_id = 0;
        for _ in 0..ops {
            let now = wheel.now();
            match rng.below(100) {
                0..=34 => {
                    let deadline = random_deadline(&mut rng, now);
                    let key = wheel.insert(deadline, next_id);
                    live.push((next_id, key, deadline));
                    next_id += 1;
                }
                35..=44 if !live.is_empty() => {
                    let (id, key, _) = live.swap_remove(rng.below(live.len() as u64) as usize);
                    assert_eq!(wheel.cancel(key), Some(id));
                    dead.push(key);
                }
                45..=64 if !live.is_empty() => {
                    let i = rng.below(live.len() as u64) as usize;
                    let deadline = match rng.below(3) {
                        0 => live[i].2.saturating_add(rng.log_uniform(40)),
                        1 => live[i].2.saturating_sub(rng.log_uniform(40)),
                        _ => random_deadline(&mut rng, now),
                    };
                    assert!(wheel.extend(live[i].1, deadline));
                    live[i].2 = deadline;
                    assert_eq!(wheel.deadline(live[i].1), Some(deadline));
                }
                65..=69 if !dead.is_empty() => {
                    let key = dead[rng.below(dead.len() as u64) as usize];
                    assert_eq!(wheel.get(key), None);
                    assert_eq!(wheel.deadline(key), None);
                    assert!(!wheel.extend(key, now.wrapping_add(1)));
                    assert_eq!(wheel.cancel(key), None);
                }
                _ => {
                    let stepping = rng.below(3) == 0;
                    let target = if stepping {
                        wheel.next_expiration().unwrap_or(now)
                    } else {
                        match rng.below(10) {
                            0 => now.saturating_sub(rng.below(10)),
                            1..=4 => now.saturating_add(rng.below(64)),
                            5..=8 => now.saturating_add(rng.log_uniform(38)),
                            _ => now.saturating_add(rng.log_uniform(50)),
                        }
                    };
                    let mut expected: Vec<u64> = live
                        .iter()
                        .filter(|e| e.2 <= target.max(now))
                        .map(|e| e.0)
                        .collect();
                    expected.sort_unstable();
                    let mut fired = Vec::new();
                    while let Some((key, id)) = wheel.poll(target) {
                        let pos = live.iter().position(|e| e.0 == id).expect("fired twice");
                        let (_, live_key, deadline) = live.swap_remove(pos);
                        assert_eq!(key, live_key);
                        if stepping && deadline > now {
                            assert_eq!(deadline, target, "stepping must hit deadlines");
                        }
                        fired.push(id);
                        dead.push(key);
                    }
                    assert_eq!(wheel.now(), target.max(now));
                    fired.sort_unstable();
                    assert_eq!(fired, expected);
                }
            }
            assert_eq!(wheel.len(), live.len());
            let now = wheel.now();
            match (live.iter().map(|e| e.2).min(), wheel.next_expiration()) {
                (None, next) => assert_eq!(next, None),
                (Some(min), next) if min <= now => assert_eq!(next, Some(now)),
                (Some(min), Some(next)) => assert!(now < next && next <= min, "{next} {min}"),
                (Some(_), None) => panic!("next_expiration is None with timers pending"),
            }
        }
        assert!(next_id > ops as u64 / 4 && dead.len() > ops / 10);
    }

    #[test]
    fn model_from_zero() {
        for seed in 1..=8u64 {
            run_model(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 0, 20_000);
        }
    }

    #[test]
    fn model_across_boundaries_and_near_end_of_time() {
        for (seed, start) in [
            (42, WHEEL_SPAN - 3),
            (43, (1 << 42) - 70),
            (77, u64::MAX - (1 << 44)),
        ] {
            run_model(seed, start, 30_000);
        }
    }
}
