//! The subscriber's side of one Redis connection (the plain subscriber's, or one primary's
//! with sharding): which channels it asked for and which Redis confirmed, and the messages it
//! reads, handed to the loops a read at a time.
//!
//! The connection's socket is read in large reads into one buffer, and every frame of a read
//! is parsed in place ([`resp::Reader`]): no allocation per reply. A message from this
//! instance (Redis sends each publisher's messages back to it when it is subscribed too) is
//! recognised by its header's instance id before anything of it is copied. The other
//! instances' messages of one read are handed to every loop as one batch
//! ([`Ledger::forward_all`]: one lock of each loop's inbox, and one wake-up of a loop whose
//! inbox was empty), and the counters are added to once per read.

use super::{channel, log_drop, shown, Throttle, IO_TIMEOUT};
use crate::broker::{decode, is_own, Link, Refused, Seen, Sequences, INBOX_FULL};
use crate::ledger::Ledger;
use crate::protocol::resp::{self, Elem, Frame};
use crate::topics::Forwarded;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// The commands and the kinds of reply of plain or sharded pub/sub.
pub(super) struct Kinds {
    pub(super) subscribe: &'static str,
    pub(super) unsubscribe: &'static str,
    /// The first element of a message, of a subscription's and of an unsubscription's
    /// confirmation (the commands' names, lower case).
    message: &'static [u8],
    subscribed: &'static [u8],
    unsubscribed: &'static [u8],
}

/// `SUBSCRIBE` and `message`.
pub(super) const PLAIN: Kinds = Kinds {
    subscribe: "SUBSCRIBE",
    unsubscribe: "UNSUBSCRIBE",
    message: b"message",
    subscribed: b"subscribe",
    unsubscribed: b"unsubscribe",
};

/// `SSUBSCRIBE` and `smessage` (Redis 7).
pub(super) const SHARDED: Kinds = Kinds {
    subscribe: "SSUBSCRIBE",
    unsubscribe: "SUNSUBSCRIBE",
    message: b"smessage",
    subscribed: b"ssubscribe",
    unsubscribed: b"sunsubscribe",
};

/// One subscribed connection's reader and state (see the module docs).
pub(super) struct Inbound<'a> {
    reader: resp::Reader,
    state: State<'a>,
}

struct State<'a> {
    link: &'a Link,
    kinds: &'static Kinds,
    /// The topics asked for (their `Arc`s are shared by every message delivered on them).
    subscribed: HashSet<Arc<[u8]>>,
    /// Channels asked for and not confirmed yet, and by when they must be; confirmations of
    /// unsubscriptions still to come, per channel.
    pending: HashMap<Vec<u8>, Instant>,
    leaving: HashMap<Vec<u8>, usize>,
    /// The messages of the current read, for the loops.
    batch: Vec<Forwarded>,
}

impl<'a> Inbound<'a> {
    pub(super) fn new(link: &'a Link, kinds: &'static Kinds) -> Self {
        Inbound {
            reader: resp::Reader::new(link.max_message.saturating_add(crate::broker::HEADER)),
            state: State {
                link,
                kinds,
                subscribed: HashSet::new(),
                pending: HashMap::new(),
                leaving: HashMap::new(),
                batch: Vec::new(),
            },
        }
    }

    /// Subscribe to the channels of the topics in `wanted` not subscribed yet and unsubscribe
    /// from the others: the commands to send (one per channel: with sharding, one command's
    /// channels must share a slot). What was heard on the topics left is forgotten.
    pub(super) fn update(&mut self, wanted: HashSet<Arc<[u8]>>, seen: &mut Sequences) -> Vec<u8> {
        let s = &mut self.state;
        let mut out = Vec::new();
        for t in wanted.difference(&s.subscribed) {
            let chan = channel(s.link, t);
            out.extend(
                redis::cmd(s.kinds.subscribe)
                    .arg(&chan)
                    .get_packed_command(),
            );
            s.pending.insert(chan, Instant::now() + IO_TIMEOUT);
        }
        for t in s.subscribed.difference(&wanted) {
            let chan = channel(s.link, t);
            out.extend(
                redis::cmd(s.kinds.unsubscribe)
                    .arg(&chan)
                    .get_packed_command(),
            );
            s.pending.remove(&chan);
            *s.leaving.entry(chan).or_insert(0) += 1;
            seen.forget(t);
        }
        s.link.counters.tracked.store(seen.len() as u64, Relaxed);
        s.subscribed = wanted;
        out
    }

    /// Every channel asked for was confirmed.
    pub(super) fn confirmed(&self) -> bool {
        self.state.pending.is_empty()
    }

    /// A channel whose subscription was not confirmed in time, if any.
    pub(super) fn overdue(&self, now: Instant) -> Option<String> {
        let (chan, _) = self.state.pending.iter().find(|(_, by)| now >= **by)?;
        Some(format!(
            "no confirmation of {} {}",
            self.state.kinds.subscribe,
            shown(chan)
        ))
    }

    /// Read what the socket has (waiting at most its read timeout): whether anything came.
    /// The end of the stream, or a read error other than a timeout or a signal, is an error.
    pub(super) fn read(&mut self, stream: &mut impl Read) -> Result<bool, String> {
        match stream.read(self.reader.spare()) {
            Ok(0) => Err("unexpected end of file".into()),
            Ok(n) => {
                self.reader.filled(n);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Handle every complete frame read: confirmations, and messages, handed to the loops as
    /// one batch. An error reply, a malformed stream or an unsubscription not asked for is an
    /// error (the connection is dropped).
    pub(super) fn deliver(
        &mut self,
        ledger: &Ledger,
        seen: &mut Sequences,
        drops: &mut Throttle,
    ) -> Result<(), String> {
        let Inbound { reader, state } = self;
        let mut own = 0;
        let result = loop {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    if let Err(e) = state.frame(&frame, seen, drops, &mut own) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            }
        };
        let c = &state.link.counters;
        if own > 0 {
            c.own.fetch_add(own, Relaxed);
        }
        if !state.batch.is_empty() {
            c.received.fetch_add(state.batch.len() as u64, Relaxed);
            let dropped = ledger.forward_all(&state.batch);
            if dropped > 0 {
                c.dropped[INBOX_FULL].fetch_add(dropped, Relaxed);
            }
            state.batch.clear();
        }
        result
    }
}

impl State<'_> {
    fn frame(
        &mut self,
        frame: &Frame<'_>,
        seen: &mut Sequences,
        drops: &mut Throttle,
        own: &mut u64,
    ) -> Result<(), String> {
        let kinds = self.kinds;
        match (frame, frame.items()) {
            (_, [Elem::Bulk(kind), Elem::Bulk(chan), payload]) if *kind == kinds.message => {
                self.message(chan, payload, seen, drops, own);
            }
            (_, [Elem::Bulk(kind), Elem::Bulk(chan), ..]) if *kind == kinds.subscribed => {
                self.pending.remove(*chan);
            }
            (_, [Elem::Bulk(kind), Elem::Bulk(chan), ..]) if *kind == kinds.unsubscribed => {
                match self.leaving.get_mut(*chan) {
                    Some(n) if *n > 1 => *n -= 1,
                    Some(_) => {
                        self.leaving.remove(*chan);
                    }
                    // Not asked for: Redis unsubscribed us (with sharding, the slot moved).
                    None => return Err(format!("Redis unsubscribed {}", shown(chan))),
                }
            }
            (Frame::Error(e), _) => return Err(String::from_utf8_lossy(e).into_owned()),
            // Anything else a subscribed connection may get (a pong, say) says nothing here.
            _ => {}
        }
        Ok(())
    }

    /// A message on `chan`: dropped if it is this instance's own (before anything else is
    /// looked at), not in the wire format or too large (counted); else numbered and batched.
    fn message(
        &mut self,
        chan: &[u8],
        payload: &Elem<'_>,
        seen: &mut Sequences,
        drops: &mut Throttle,
        own: &mut u64,
    ) {
        let link = self.link;
        let raw = match payload {
            Elem::Bulk(raw) if is_own(raw, link.instance) => {
                // Delivered here when it was published.
                *own += 1;
                return;
            }
            Elem::Bulk(raw) => Ok(*raw),
            Elem::TooLarge(n) => Err((Refused::TooLarge, *n)),
            _ => Err((Refused::Invalid, 0)),
        };
        let checked = match chan.strip_prefix(link.config.prefix.as_bytes()) {
            Some(topic) if topic.len() <= crate::topics::MAX_TOPIC_LEN => raw.and_then(|raw| {
                decode(raw, link.max_message)
                    .map(|d| (topic, d))
                    .map_err(|why| (why, raw.len() as u64))
            }),
            _ => Err((
                Refused::Invalid,
                raw.map_or_else(|(_, n)| n, |r| r.len() as u64),
            )),
        };
        let (topic, (instance, seq, text, payload)) = match checked {
            Ok(ok) => ok,
            Err((why, bytes)) => {
                link.counters.dropped[why.index()].fetch_add(1, Relaxed);
                log_drop(drops, why, chan, bytes);
                return;
            }
        };
        let c = &link.counters;
        match seen.see(instance, topic, seq) {
            Seen::First => c.tracked.store(seen.len() as u64, Relaxed),
            Seen::Next => {}
            Seen::Gap(lost) => {
                c.gaps.fetch_add(1, Relaxed);
                log::debug!(
                    "redis subscriber: {lost} messages of instance {instance:016x} on {} lost",
                    shown(chan)
                );
            }
            Seen::Reset => {
                c.resets.fetch_add(1, Relaxed);
                log::debug!(
                    "redis subscriber: instance {instance:016x} on {} went back to {seq}",
                    shown(chan)
                );
            }
        }
        let topic = match self.subscribed.get(topic) {
            Some(t) => t.clone(),
            None => topic.into(),
        };
        self.batch.push(Forwarded {
            topic,
            text,
            payload: payload.into(),
        });
    }
}
