//! One connection's state in the slab, its id and token (generation, loop, slot), and its one
//! timer entry. Small by design: an idle connection is a [`Conn`] and a timer-wheel entry.

use crate::app::{CloseReason, ConnId, Peer, SendState};
use crate::io::out::SendQueue;
use crate::io::transport::Transport;
use crate::protocol::close::CloseCode;
use crate::protocol::session::Session;
use crate::timer_wheel::TimerKey;
use std::net::SocketAddr;

/// Slab slots a loop may use (connection ids keep 24 bits for the slot).
pub(super) const MAX_SLOTS: usize = 1 << 24;

/// A deadline that is not set.
pub(super) const NEVER: u64 = u64::MAX;

/// What a timer-wheel entry is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TimerRef {
    /// The connection's one timer: its slab index and generation (a timer that outlives its
    /// connection finds another generation in the slot, or none, and is ignored).
    Conn { idx: u32, gen: u32 },
    /// The accept backoff.
    AcceptBackoff,
}

/// One connection in the slab.
pub(super) struct Conn<D> {
    pub(super) socket: Transport,
    pub(super) gen: u32,
    pub(super) peer: Peer,
    pub(super) session: Session,
    /// The connection's one timer, armed at the earliest of the three deadlines below.
    pub(super) timer: Option<TimerKey>,
    /// The state's deadline (ms): handshake, idle ping or close, close handshake, or linger.
    pub(super) deadline: u64,
    /// When unsent bytes that made no progress make the connection stall out.
    pub(super) stall_at: u64,
    /// The end of the connection's maximum lifetime.
    pub(super) expire_at: u64,
    /// Bytes the socket did not take yet.
    pub(super) pending: SendQueue,
    /// Set once the upgrade is accepted: the connection is open and `on_close` is owed.
    pub(super) data: Option<D>,
    pub(super) send: SendState,
    /// An idle ping is out and unanswered.
    pub(super) pinged: bool,
    /// Ending gracefully: flush `pending`, then close with this reason.
    pub(super) linger: Option<CloseReason>,
    /// What few connections need (close frames, a split PROXY header), out of line.
    pub(super) rare: Option<Box<Rare>>,
    /// Ending after a failure: our final bytes are out and our side is shut down (FIN sent);
    /// input is discarded until the peer's EOF or the close timeout.
    pub(super) fin_sent: bool,
    /// The peer's EOF has been read: there is no input left to drain.
    pub(super) peer_eof: bool,
    /// When it was accepted (ms since the loop started, wrapping), for the close log.
    pub(super) born: u32,
    /// Counted against its address by admission control.
    pub(super) ip_counted: bool,
    /// Refused at admission and answered; kept only to read its request.
    pub(super) shed: bool,
    /// Came in on a metrics-only listener.
    pub(super) admin: bool,
    /// The TCP peer is a trusted proxy; `peer` becomes the client it reports, once it has.
    pub(super) via_proxy: bool,
    /// A PROXY header is expected before the request.
    pub(super) awaiting_proxy: bool,
    /// More than `max_backpressure` bytes are queued: the socket is not read (so the kernel's
    /// flow control holds the peer back) until the queue drains to half the limit.
    pub(super) read_paused: bool,
    /// It used its read budget this turn: it is on the loop's list to be read at the start of
    /// the next turn, and is not read before (however many events it raises meanwhile).
    pub(super) read_later: bool,
    /// Its buffers as last counted in the loop's memory budget: the session's (request head,
    /// partial message) and the send queue's heap bytes, each counted up to 4 GiB (see
    /// `budget.rs`).
    pub(super) mem: [u32; 2],
}

/// The parts of a connection's state that most connections never use, boxed so that an idle
/// connection stays small.
#[derive(Default)]
pub(super) struct Rare {
    /// The close frame the peer sent (code and reason), reported to `on_close`.
    pub(super) peer_close: Option<(CloseCode, Box<str>)>,
    /// The close frame we sent (code and reason), reported to `on_close` when the close
    /// handshake we started completes.
    pub(super) our_close: Option<(CloseCode, Box<str>)>,
    /// The start of a PROXY header split across reads (at most a few hundred bytes).
    pub(super) proxy_partial: Vec<u8>,
    /// The subprotocol the upgrade hook chose, if any.
    pub(super) subprotocol: Option<Box<str>>,
    /// Input read but not parsed yet: the rest of a read whose publications reached the
    /// turn's bound ([`MAX_OWED`](crate::topics::MAX_OWED)), parsed first on the next turn.
    pub(super) stash: Vec<u8>,
    /// permessage-deflate's dedicated profile: the connection's own compressor and
    /// decompressor (its bytes reserved from the compression budget, given back on close).
    pub(super) dedicated: Option<Box<crate::protocol::deflate::Dedicated>>,
}

impl<D> Conn<D> {
    pub(super) fn new(socket: Transport, gen: u32, peer: SocketAddr, deadline: u64) -> Self {
        let peer = Peer::from(peer);
        Conn {
            socket,
            gen,
            peer,
            session: Session::new(),
            timer: None,
            deadline,
            stall_at: NEVER,
            expire_at: NEVER,
            pending: SendQueue::default(),
            data: None,
            send: SendState::default(),
            pinged: false,
            linger: None,
            rare: None,
            fin_sent: false,
            peer_eof: false,
            born: 0,
            ip_counted: false,
            shed: false,
            admin: false,
            via_proxy: false,
            awaiting_proxy: false,
            read_paused: false,
            read_later: false,
            mem: [0, 0],
        }
    }

    /// The final bytes of a connection ending with `linger` are all with the kernel. Returns
    /// whether it stays open to drain input. After a failure (protocol error, refused or timed
    /// out handshake, refused admission, a send over the backpressure limit) the peer may still
    /// be sending, and closing a socket
    /// with unread input makes the kernel send a reset instead of a FIN, discarding whatever of
    /// ours it has not transmitted yet: the close frame or HTTP response just written may never
    /// arrive. So shut down our side instead (FIN after the final bytes) and discard input
    /// until the peer's EOF or the deadline (a lingering close, as nginx does).
    pub(super) fn half_close(&mut self) -> bool {
        let failed = self.linger.is_some_and(CloseReason::is_failure);
        if !failed || self.peer_eof {
            return false;
        }
        if !self.fin_sent {
            self.fin_sent = self.socket.shutdown_write();
        }
        self.fin_sent
    }

    pub(super) fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// The earliest deadline of any kind.
    pub(super) fn next_deadline(&self) -> u64 {
        self.deadline.min(self.stall_at).min(self.expire_at)
    }
}

/// A connection's id and token: its generation in the upper 32 bits, its loop's index in the
/// next 8 and its slab index in the low 24 (a loop never holds 2^24 connections: see
/// [`MAX_SLOTS`]), so ids are unique across the loops of a cluster.
pub(super) fn conn_id(loop_index: usize, idx: usize, gen: u32) -> ConnId {
    ConnId(((gen as u64) << 32) | ((loop_index as u64) << 24) | idx as u64)
}

/// The slab index and generation in a connection's token or id.
pub(super) fn slot_of(id: u64) -> (usize, u32) {
    ((id & 0xff_ffff) as usize, (id >> 32) as u32)
}

#[cfg(test)]
mod tests {
    /// Idle connections must stay cheap (the memory target is a few hundred bytes of user space
    /// per idle connection, wheel entry included): a guard against the state growing unnoticed.
    #[test]
    fn connection_state_stays_small() {
        let conn = std::mem::size_of::<super::Conn<()>>();
        let session = std::mem::size_of::<crate::protocol::session::Session>();
        // 208 since TLS: the transport's pointer to its (boxed) TLS state, null for plain TCP,
        // costs 8 bytes.
        assert!(conn <= 208, "Conn<()> is {conn} bytes");
        assert!(session <= 56, "Session is {session} bytes");
    }
}
