//! `topics`: random subscribe, unsubscribe, publish, deliver and close sequences through the
//! registry (`Topics`) and a turn's fan-out (`Fanout`), as the loop drives them, against a
//! model that keeps, per connection, the publications it is owed: every connection receives
//! exactly the publications of the topics it was subscribed to when they were published (but
//! its own, when it published), in publication order, until it closes; a connection that takes
//! a closed one's slot receives nothing meant for that one. The registry's positions stay
//! consistent, and topics are freed with their last subscriber. Connections of odd
//! generations take publications compressed: they may get the second framing (here the
//! sequence number inverted), the others never do.
//!
//! Input: operations of 1 + up to 2 bytes each (see [`decode`]).

use std::collections::{BTreeMap, BTreeSet};

use wsloop::topics::{Fanout, SubId, Topics};

use super::util::Reader;

/// Slots (connections alive at once) and topics the operations choose among.
const SLOTS: usize = 8;
const TOPICS: u8 = 6;
/// The most topics one connection may be in.
const MAX_TOPICS: usize = 4;

#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// A connection in this slot, if free (a new generation of it).
    Open(u8),
    Subscribe(u8, u8),
    Unsubscribe(u8, u8),
    /// Publish to a topic, from the connection in the slot (not delivered to it) or, if the
    /// slot is free, from outside.
    Publish(u8, u8),
    /// The connection in the slot is written to in the turn: what it is owed goes out now.
    Deliver(u8),
    /// The connection in the slot ends.
    Close(u8),
    /// The end of the turn: everything owed goes out.
    EndTurn,
}

pub fn decode(data: &[u8]) -> Vec<Op> {
    let mut r = Reader::new(data);
    let mut ops = Vec::new();
    while !r.is_empty() {
        let op = r.u8();
        let slot = r.u8();
        ops.push(match op % 8 {
            0 => Op::Open(slot),
            1 | 2 => Op::Subscribe(slot, r.u8()),
            3 => Op::Unsubscribe(slot, r.u8()),
            4 => Op::Publish(slot, r.u8()),
            5 => Op::Deliver(slot),
            6 => Op::Close(slot),
            _ => Op::EndTurn,
        });
    }
    ops
}

/// One connection: its generation, registry handle, and what the model says it is owed.
struct Conn {
    gen: u32,
    sub: SubId,
    topics: BTreeSet<u8>,
    owed: Vec<u64>,
}

fn key(slot: usize, gen: u32) -> u64 {
    (u64::from(gen) << 32) | slot as u64
}

/// Whether the connection of generation `gen` takes publications compressed.
fn compressed(gen: u32) -> bool {
    gen % 2 == 1
}

/// The sequence number in a frame: as it is, or inverted in the compressed framing, which only
/// connections that take it may get.
fn seq_of(frame: &[u8], gen: u32) -> u64 {
    let v = u64::from_le_bytes(frame.try_into().expect("one 8-byte frame"));
    match v >> 63 {
        0 => v,
        _ => {
            assert!(
                compressed(gen),
                "a plain connection got the compressed framing"
            );
            !v
        }
    }
}

pub fn run(data: &[u8]) {
    let ops = decode(data);
    let mut topics = Topics::new();
    let mut fanout = Fanout::default();
    let mut slots: [Option<Conn>; SLOTS] = Default::default();
    let mut next_gen = 0u32;
    let mut seq = 0u64;
    // What each connection (slot, generation) received, and what the model says it should.
    let mut received: BTreeMap<(usize, u32), Vec<u64>> = BTreeMap::new();
    let mut expected: BTreeMap<(usize, u32), Vec<u64>> = BTreeMap::new();
    let deliver = |fanout: &mut Fanout,
                   slots: &mut [Option<Conn>; SLOTS],
                   received: &mut BTreeMap<(usize, u32), Vec<u64>>,
                   expected: &mut BTreeMap<(usize, u32), Vec<u64>>,
                   slot: usize| {
        let Some(c) = slots[slot].as_mut() else {
            return;
        };
        let mut at = fanout.take(slot);
        let got = received.entry((slot, c.gen)).or_default();
        while let Some(frame) = fanout.next(&mut at) {
            got.push(seq_of(frame, c.gen));
        }
        expected
            .entry((slot, c.gen))
            .or_default()
            .append(&mut c.owed);
    };
    for op in ops {
        match op {
            Op::Open(s) => {
                let s = s as usize % SLOTS;
                if slots[s].is_none() {
                    next_gen += 1;
                    let sub = topics.add_subscriber(key(s, next_gen));
                    fanout.set_compressed(s, compressed(next_gen));
                    slots[s] = Some(Conn {
                        gen: next_gen,
                        sub,
                        topics: BTreeSet::new(),
                        owed: Vec::new(),
                    });
                }
            }
            Op::Subscribe(s, t) => {
                if let Some(c) = slots[s as usize % SLOTS].as_mut() {
                    let t = t % TOPICS;
                    let got = topics.subscribe(c.sub, &[t], MAX_TOPICS);
                    match got {
                        Ok(Some(_)) => assert!(c.topics.insert(t)),
                        Ok(None) => assert!(c.topics.contains(&t)),
                        Err(_) => assert!(c.topics.len() >= MAX_TOPICS && !c.topics.contains(&t)),
                    }
                }
            }
            Op::Unsubscribe(s, t) => {
                if let Some(c) = slots[s as usize % SLOTS].as_mut() {
                    let t = t % TOPICS;
                    assert_eq!(
                        topics.unsubscribe(c.sub, &[t]).is_some(),
                        c.topics.remove(&t)
                    );
                }
            }
            Op::Publish(s, t) => {
                let s = s as usize % SLOTS;
                let t = t % TOPICS;
                let except = slots[s].as_ref().map(|c| key(s, c.gen));
                seq += 1;
                let to = topics
                    .members(&[t])
                    .filter(|&k| Some(k) != except)
                    .map(|k| ((k & 0xffff_ffff) as usize, (k >> 32) as u32));
                let n = fanout.publish(
                    |f| f.extend_from_slice(&seq.to_le_bytes()),
                    |f| f.extend_from_slice(&(!seq).to_le_bytes()),
                    to,
                );
                let mut want = 0;
                for (i, c) in slots.iter_mut().enumerate() {
                    if let Some(c) = c {
                        if c.topics.contains(&t) && Some(key(i, c.gen)) != except {
                            c.owed.push(seq);
                            want += 1;
                        }
                    }
                }
                assert_eq!(n, want, "publication {seq} owed to the wrong number");
            }
            Op::Deliver(s) => {
                let s = s as usize % SLOTS;
                deliver(&mut fanout, &mut slots, &mut received, &mut expected, s);
            }
            Op::Close(s) => {
                let s = s as usize % SLOTS;
                if let Some(c) = slots[s].take() {
                    fanout.forget(s);
                    let mut left = BTreeSet::new();
                    topics.remove_subscriber(c.sub, |t, change| {
                        assert_eq!(change.old, change.new + 1);
                        left.insert(t[0]);
                    });
                    assert_eq!(left, c.topics);
                    // Whatever it was still owed, it never gets.
                    expected.entry((s, c.gen)).or_default();
                }
            }
            Op::EndTurn => end_turn(&mut fanout, &mut slots, &mut received, &mut expected),
        }
        topics.check();
    }
    end_turn(&mut fanout, &mut slots, &mut received, &mut expected);
    for (who, want) in &expected {
        let got = received.get(who).map_or(&[][..], |g| &g[..]);
        assert_eq!(
            got,
            &want[..],
            "connection {who:?} received the wrong publications"
        );
    }
    for (who, got) in &received {
        assert!(
            got.is_empty() || expected.contains_key(who),
            "connection {who:?} received {got:?}, owed nothing"
        );
    }
    // Topics are freed with their last subscriber.
    let in_use: BTreeSet<u8> = slots
        .iter()
        .flatten()
        .flat_map(|c| c.topics.clone())
        .collect();
    assert_eq!(topics.len(), in_use.len());
}

/// The loop's end of turn: each slot owed something, if the connection that was owed is still
/// the slot's, gets all of it; then the arena is cleared.
fn end_turn(
    fanout: &mut Fanout,
    slots: &mut [Option<Conn>; SLOTS],
    received: &mut BTreeMap<(usize, u32), Vec<u64>>,
    expected: &mut BTreeMap<(usize, u32), Vec<u64>>,
) {
    // Read in spans (as the loop writes them), with rooms of none to all.
    const ROOMS: [usize; 5] = [0, 5, 8, 16, usize::MAX];
    let mut r = 0;
    for (slot, gen) in fanout.take_owing() {
        if slots[slot].as_ref().is_some_and(|c| c.gen == gen) {
            let c = slots[slot].as_mut().unwrap();
            let mut at = fanout.take(slot);
            let got = received.entry((slot, gen)).or_default();
            loop {
                let room = ROOMS[r % ROOMS.len()];
                r += 1;
                let Some((span, n)) = fanout.next_span(&mut at, room) else {
                    break;
                };
                assert!(n >= 1 && span.len() == 8 * n, "{n} frames in {span:?}");
                assert!(
                    8 * (n - 1) <= room,
                    "{n} frames taken with room for {room} bytes"
                );
                for frame in span.chunks(8) {
                    got.push(seq_of(frame, gen));
                }
            }
            expected.entry((slot, gen)).or_default().append(&mut c.owed);
        }
    }
    // Nothing is left owed to a live connection.
    for (slot, c) in slots.iter_mut().enumerate() {
        if let Some(c) = c {
            assert!(
                c.owed.is_empty(),
                "slot {slot} was owed publications it never got"
            );
        }
    }
    fanout.clear();
}
