//! Publish/subscribe on the loop. The registry ([`Topics`]) says who subscribes to what; a
//! publication is framed once into this turn's arena, and each subscriber is owed a reference
//! to it, not a copy. At the end of the turn every subscriber that is owed anything gets it
//! with one `writev` straight from the arena (what the socket does not take goes into its
//! queue, within its backpressure limit); a subscriber that becomes the cork's owner earlier in
//! the turn (because it sends, or is read, or a timer fires) gets what it is owed in its cork
//! first, so that on one connection sends and publications keep the order in which they were
//! made. A subscriber that is closing, or over its limit, gets nothing more (dropped and
//! counted, or closed with 1008 by the `Close` policy): see `deliver.rs`.
//!
//! In a cluster, a publication is also forwarded to the other loops: at the end of the turn,
//! one push of the turn's batch into each other loop's inbox, and one wake-up for a loop whose
//! inbox was empty.

use super::conn::slot_of;
use crate::app::{ConnId, Message, PubsubOps};
use crate::ledger::Forwarded;
use crate::protocol::deflate::{SharedCodec, MAX_WINDOW_BITS};
use crate::protocol::frame::{write_compressed_frame, write_frame, OpCode};
use crate::topics::{Change, Fanout, SubId, TopicError, Topics, MAX_TOPIC_LEN};
use std::collections::HashMap;
use std::sync::Arc;

/// The loop's publish/subscribe state (see the module docs).
#[derive(Default)]
pub(super) struct Pubsub {
    registry: Topics,
    /// Each subscribing connection's handle in the registry, by connection id.
    subscribers: HashMap<u64, SubId>,
    /// [`Config::max_topics_per_connection`](crate::Config::max_topics_per_connection).
    max_topics: usize,
    /// This loop is one of several, or there is a Redis bridge: publications are kept for the
    /// other loops and the bridge.
    forward: bool,
    /// This turn's publications and who is owed them.
    pub(super) fanout: Fanout,
    /// Subscriber counts that changed, reported at the end of the turn
    /// (`Handler::on_subscription`).
    pub(super) changes: Vec<(Arc<[u8]>, Change)>,
    /// This turn's publications, for the other loops of a cluster and the Redis bridge.
    pub(super) outgoing: Vec<Forwarded>,
    /// Messages published on this loop (each once, however many subscribers it reached).
    pub(super) published: u64,
}

impl Pubsub {
    pub(super) fn new(max_topics: usize, forward: bool) -> Self {
        Pubsub {
            max_topics,
            forward,
            ..Pubsub::default()
        }
    }

    /// Frame one message for `topic`'s subscribers on this loop, except `except`: each is owed
    /// it. For subscribers that negotiated permessage-deflate it is also framed compressed, once
    /// for all of them, with `codec` (as it is, if shorter than the compression threshold).
    /// Returns how many it is for.
    pub(super) fn publish_local(
        &mut self,
        topic: &[u8],
        op: OpCode,
        payload: &[u8],
        except: Option<u64>,
        codec: &mut SharedCodec,
    ) -> usize {
        if self.registry.count(topic) == 0 {
            return 0;
        }
        let to = self
            .registry
            .members(topic)
            .filter(|&key| Some(key) != except)
            .map(|key| {
                let (idx, gen) = slot_of(key);
                (idx, gen)
            });
        let compressed = |frames: &mut Vec<u8>| match codec.compressible(payload.len()) {
            true => write_compressed_frame(frames, op, codec.compress(MAX_WINDOW_BITS, payload)),
            false => write_frame(frames, true, op, payload),
        };
        self.fanout.publish(
            |frames| write_frame(frames, true, op, payload),
            compressed,
            to,
        )
    }

    /// A message published on this loop: counted, and kept for the other loops of a cluster,
    /// if this is one, and for the Redis bridge, if there is one.
    pub(super) fn originate(&mut self, topic: &[u8], op: OpCode, payload: &[u8]) {
        self.published += 1;
        if self.forward {
            self.outgoing.push(Forwarded {
                topic: topic.into(),
                text: op == OpCode::Text,
                payload: payload.into(),
            });
        }
    }

    /// Connection `id` (slot `idx`) ended: it is owed nothing more, and leaves its topics.
    pub(super) fn forget(&mut self, id: ConnId, idx: usize, subscribed: bool) {
        self.fanout.forget(idx);
        if !subscribed {
            return;
        }
        if let Some(sub) = self.subscribers.remove(&id.0) {
            let changes = &mut self.changes;
            self.registry
                .remove_subscriber(sub, |topic, c| changes.push((topic.into(), c)));
        }
    }

    /// Topics with a subscriber, and subscriptions, on this loop.
    pub(super) fn sizes(&self) -> (usize, usize) {
        (self.registry.len(), self.registry.subscriptions())
    }

    /// Debug builds: the registry is consistent, and no subscriber is a connection not alive.
    pub(super) fn check(&self, alive: impl Fn(u64) -> bool) {
        self.registry.check();
        for &id in self.subscribers.keys() {
            assert!(alive(id), "a topic refers to a connection that has ended");
        }
    }
}

fn op_of(msg: &Message<'_>) -> OpCode {
    match msg {
        Message::Text(_) => OpCode::Text,
        Message::Binary(_) => OpCode::Binary,
    }
}

impl PubsubOps for Pubsub {
    fn subscribe(&mut self, id: ConnId, topic: &[u8]) -> Result<bool, TopicError> {
        let registry = &mut self.registry;
        let sub = *self
            .subscribers
            .entry(id.0)
            .or_insert_with(|| registry.add_subscriber(id.0));
        let change = self.registry.subscribe(sub, topic, self.max_topics)?;
        if let Some(c) = change {
            self.changes.push((topic.into(), c));
        }
        Ok(change.is_some())
    }

    fn unsubscribe(&mut self, id: ConnId, topic: &[u8]) -> bool {
        let Some(&sub) = self.subscribers.get(&id.0) else {
            return false;
        };
        let change = self.registry.unsubscribe(sub, topic);
        if let Some(c) = change {
            self.changes.push((topic.into(), c));
        }
        change.is_some()
    }

    fn is_subscribed(&self, id: ConnId, topic: &[u8]) -> bool {
        self.subscribers
            .get(&id.0)
            .is_some_and(|&s| self.registry.is_subscribed(s, topic))
    }

    fn topics(&self, id: ConnId) -> Vec<Vec<u8>> {
        self.subscribers.get(&id.0).map_or(Vec::new(), |&s| {
            self.registry.topics_of(s).map(<[u8]>::to_vec).collect()
        })
    }

    fn publish(
        &mut self,
        topic: &[u8],
        msg: Message<'_>,
        except: Option<ConnId>,
        codec: &mut SharedCodec,
    ) -> Result<usize, TopicError> {
        if topic.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong);
        }
        let op = op_of(&msg);
        self.originate(topic, op, msg.as_bytes());
        let except = except.map(|id| id.0);
        Ok(self.publish_local(topic, op, msg.as_bytes(), except, codec))
    }

    fn num_subscribers(&self, topic: &[u8]) -> usize {
        self.registry.count(topic)
    }
}
