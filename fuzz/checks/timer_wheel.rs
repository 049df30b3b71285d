//! `timer_wheel`: arbitrary insert, cancel, extend and advance sequences against a naive model
//! (an ordered map of pending deadlines): the same timers fire at the same ticks, stale keys are
//! inert, and `next_expiration` is never later than a pending deadline, so a loop that sleeps
//! until it and polls fires every timer exactly at its deadline.
//!
//! Input: one byte choosing the start tick, then operations of 1 + up to 9 bytes each (see
//! [`decode`]).

use std::collections::{BTreeMap, HashSet};

use wsloop::timer_wheel::{TimerKey, TimerWheel};

use super::util::Reader;

/// Most stepped polls one `Step` makes before it jumps to its target.
const MAX_STEPS: usize = 256;

#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Insert a timer at this deadline.
    Insert(Tick),
    /// Cancel the timer inserted by the `n`th insert (`n` modulo the inserts so far).
    Cancel(u8),
    /// Move that timer's deadline.
    Extend(u8, Tick),
    /// Poll at this tick until nothing more fires.
    Jump(Tick),
    /// Sleep until `next_expiration` and poll, repeatedly, up to this tick.
    Step(Tick),
    /// Poll once at this tick (pops at most one timer).
    PollOne(Tick),
}

/// A tick relative to the wheel's current tick, in several magnitudes.
#[derive(Debug, Clone, Copy)]
pub enum Tick {
    Past(u16),
    Ahead(u64),
    Absolute(u64),
    NearMax(u16),
}

impl Tick {
    fn at(self, now: u64) -> u64 {
        match self {
            Tick::Past(d) => now.saturating_sub(u64::from(d)),
            Tick::Ahead(d) => now.saturating_add(d),
            Tick::Absolute(t) => t,
            Tick::NearMax(d) => u64::MAX - u64::from(d),
        }
    }
}

pub struct Input {
    pub start: u64,
    pub ops: Vec<Op>,
}

fn tick(r: &mut Reader<'_>) -> Tick {
    match r.u8() % 8 {
        0 => Tick::Past(r.u16()),
        1 => Tick::Ahead(u64::from(r.u8())),
        2 => Tick::Ahead(u64::from(r.u16())),
        3 => Tick::Ahead(u64::from(r.u32())),
        // Around the slot boundaries of each level: 64^k - 1, 64^k, 64^k + 1.
        4 => {
            let b = r.u8();
            let level = u32::from(b % 8);
            let base = 1u64 << (6 * level);
            Tick::Ahead((base + u64::from(b / 8 % 3)).saturating_sub(1))
        }
        5 => Tick::Ahead(r.u64()),
        6 => Tick::Absolute(r.u64()),
        _ => Tick::NearMax(r.u16()),
    }
}

pub fn decode(data: &[u8]) -> Input {
    let mut r = Reader::new(data);
    let start = match r.u8() % 4 {
        0 => 0,
        1 => u64::from(r.u16()),
        2 => r.u64(),
        _ => u64::MAX - u64::from(r.u16()),
    };
    let mut ops = Vec::new();
    while !r.is_empty() {
        let op = match r.u8() % 8 {
            0 | 1 => Op::Insert(tick(&mut r)),
            2 => Op::Cancel(r.u8()),
            3 => Op::Extend(r.u8(), tick(&mut r)),
            4 => Op::Jump(tick(&mut r)),
            5 => Op::Step(tick(&mut r)),
            6 => Op::PollOne(tick(&mut r)),
            _ => Op::Step(Tick::Ahead(u64::from(r.u16()))),
        };
        ops.push(op);
    }
    Input { start, ops }
}

pub fn run(data: &[u8]) {
    check(&decode(data));
}

struct Model {
    wheel: TimerWheel<usize>,
    /// Every key ever returned, by insert number.
    keys: Vec<TimerKey>,
    /// The same keys, to check that none is handed out twice.
    seen: HashSet<TimerKey>,
    /// Pending timers: insert number -> deadline.
    pending: BTreeMap<usize, u64>,
}

impl Model {
    /// Pops timers at `at` until `None` (or once with `one`), checking each against the model.
    /// `stepped`: `at` came from `next_expiration`, so a timer due after the previous tick must
    /// fire exactly at its deadline.
    fn poll(&mut self, at: u64, stepped: bool, one: bool) {
        let before = self.wheel.now();
        let now = at.max(before);
        loop {
            let Some((key, id)) = self.wheel.poll(at) else {
                let due: Vec<_> = self.pending.iter().filter(|(_, &d)| d <= now).collect();
                assert!(due.is_empty(), "due at {now} but not fired: {due:?}");
                break;
            };
            assert_eq!(self.wheel.now(), now);
            assert_eq!(self.keys.get(id), Some(&key), "payload/key mismatch");
            let deadline = self.pending.remove(&id).expect("fired a timer not pending");
            assert!(deadline <= now, "timer {id} due {deadline} fired at {now}");
            if stepped {
                assert!(
                    deadline <= before || deadline == now,
                    "timer {id} due {deadline} fired late at {now} (previous tick {before})"
                );
            }
            assert_eq!(self.wheel.get(key), None, "fired key not stale");
            assert_eq!(self.wheel.cancel(key), None);
            if one {
                break;
            }
        }
        self.check();
    }

    /// Lengths, deadlines and `next_expiration` agree with the model.
    fn check(&self) {
        let now = self.wheel.now();
        assert_eq!(self.wheel.len(), self.pending.len());
        assert_eq!(self.wheel.is_empty(), self.pending.is_empty());
        for (&id, &deadline) in &self.pending {
            assert_eq!(self.wheel.deadline(self.keys[id]), Some(deadline));
            assert_eq!(self.wheel.get(self.keys[id]), Some(&id));
        }
        let next = self.wheel.next_expiration();
        match self.pending.values().min() {
            None => assert_eq!(next, None),
            Some(&min) if min <= now => assert_eq!(next, Some(now)),
            Some(&min) => {
                let next = next.expect("timers pending but no expiration");
                assert!(
                    now < next && next <= min,
                    "next {next}, now {now}, min {min}"
                );
            }
        }
    }
}

pub fn check(input: &Input) {
    let mut m = Model {
        wheel: TimerWheel::new(input.start),
        keys: Vec::new(),
        seen: HashSet::new(),
        pending: BTreeMap::new(),
    };
    assert_eq!(m.wheel.now(), input.start);
    m.check();
    for &op in &input.ops {
        let now = m.wheel.now();
        match op {
            Op::Insert(t) => {
                let deadline = t.at(now);
                let id = m.keys.len();
                let key = m.wheel.insert(deadline, id);
                assert!(m.seen.insert(key), "key reused");
                m.keys.push(key);
                m.pending.insert(id, deadline);
            }
            Op::Cancel(i) if !m.keys.is_empty() => {
                let id = usize::from(i) % m.keys.len();
                let got = m.wheel.cancel(m.keys[id]);
                assert_eq!(got, m.pending.remove(&id).map(|_| id));
            }
            Op::Extend(i, t) if !m.keys.is_empty() => {
                let id = usize::from(i) % m.keys.len();
                let deadline = t.at(now);
                let live = m.wheel.extend(m.keys[id], deadline);
                match m.pending.get_mut(&id) {
                    Some(d) => {
                        assert!(live);
                        *d = deadline;
                    }
                    None => assert!(!live, "stale key extended"),
                }
            }
            Op::Cancel(_) | Op::Extend(..) => {}
            Op::Jump(t) => m.poll(t.at(now), false, false),
            Op::PollOne(t) => m.poll(t.at(now), false, true),
            Op::Step(t) => {
                let target = t.at(now);
                for _ in 0..MAX_STEPS {
                    match m.wheel.next_expiration() {
                        Some(at) if at <= target => m.poll(at, true, false),
                        _ => break,
                    }
                }
                m.poll(target, false, false);
            }
        }
        m.check();
    }
}
