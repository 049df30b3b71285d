//! The public API: the [`Handler`] trait an application implements, the [`WebSocket`] handle
//! its callbacks receive, and the types that travel with them.

use crate::config::BackpressurePolicy;
use crate::io::out::Outbox;
use crate::protocol::close::CloseCode;
use crate::protocol::deflate::SharedCodec;
use crate::protocol::frame::OpCode;
use crate::protocol::handshake::Upgrade;
pub use crate::reason::CloseReason;
use crate::topics::TopicError;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Identifies one connection for its whole life. Ids carry a generation, so an id kept after its
/// connection ended never reaches the connection that later reuses the same slot: operations on it
/// report that the connection is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub(crate) u64);

impl ConnId {
    /// The id as a number (unique among the connections alive at one time in one server or
    /// cluster).
    pub fn as_u64(self) -> u64 {
        self.0
    }
    /// The index of the loop that serves this connection: in a [`Cluster`](crate::Cluster),
    /// reach it through that loop's handle (`cluster.handles()[id.loop_index()]`); 0 for a
    /// [`Server`](crate::Server).
    pub fn loop_index(self) -> usize {
        ((self.0 >> 24) & 0xff) as usize
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}:{}", self.0 >> 32, self.0 & 0xff_ffff)?;
        match self.loop_index() {
            0 => Ok(()),
            i => write!(f, "@{i}"),
        }
    }
}

/// A peer's address, packed: its IP and port in 20 bytes where a `SocketAddr` takes 32 (every
/// connection holds one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Peer {
    ip: IpAddr,
    port: u16,
}

impl Peer {
    /// The address as a `SocketAddr`.
    pub(crate) fn addr(self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
    /// The IP.
    pub(crate) fn ip(self) -> IpAddr {
        self.ip
    }
}

impl From<SocketAddr> for Peer {
    fn from(a: SocketAddr) -> Peer {
        Peer {
            ip: a.ip(),
            port: a.port(),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr().fmt(f)
    }
}

/// A complete message from a client. Borrowed: from the loop's receive buffer when the message
/// arrived whole in one read (no copy), otherwise from the connection's reassembly buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, already checked to be UTF-8.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl<'a> Message<'a> {
    /// The message's bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            Message::Text(s) => s.as_bytes(),
            Message::Binary(b) => b,
        }
    }
}

/// What the upgrade hook sees: the validated request and the peer's address.
pub struct UpgradeRequest<'a> {
    pub(crate) upgrade: Upgrade<'a>,
    pub(crate) peer: Peer,
}

impl<'a> UpgradeRequest<'a> {
    /// The request path, without the query.
    pub fn path(&self) -> &str {
        self.upgrade.request().path()
    }
    /// The query string after `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.upgrade.request().query()
    }
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.upgrade.request().header(name)
    }
    /// Every header, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.upgrade.request().headers()
    }
    /// The subprotocols the client offered, in its order of preference.
    pub fn subprotocols(&self) -> impl Iterator<Item = &str> {
        self.upgrade.subprotocols()
    }
    /// The extension offers the client made (wsloop negotiates none).
    pub fn extensions(&self) -> impl Iterator<Item = &str> {
        self.upgrade.extensions()
    }
    /// The `Origin` header, if the client sent one (browsers do).
    pub fn origin(&self) -> Option<&[u8]> {
        self.upgrade.origin()
    }
    /// The TCP peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer.addr()
    }
}

/// The upgrade hook's answer.
pub enum Decision<D> {
    /// Upgrade, with this per-connection data and optionally one of the offered subprotocols
    /// (a subprotocol the client did not offer is a programming error: the request is answered
    /// with 500 instead).
    Accept {
        /// Per-connection user data, reachable through [`WebSocket::data`].
        data: D,
        /// The chosen subprotocol.
        subprotocol: Option<String>,
    },
    /// Refuse with an HTTP status (400-599) and a one-line reason, e.g. 403 for a bad origin.
    Reject {
        /// The HTTP status.
        status: u16,
        /// The reason, sent as the response body.
        reason: &'static str,
    },
}

impl<D> Decision<D> {
    /// Accept with `data` and no subprotocol.
    pub fn accept(data: D) -> Self {
        Decision::Accept {
            data,
            subprotocol: None,
        }
    }
}

/// An application's callbacks. All run on the loop's thread, one at a time; none may block
/// (post long work to another thread and answer through a [`LoopHandle`](crate::LoopHandle)).
///
/// Sending or closing from a callback never runs another callback re-entrantly: a close or
/// terminate requested in a callback takes effect after it returns.
pub trait Handler: 'static {
    /// Per-connection data, created by [`Handler::upgrade`], dropped after [`Handler::on_close`].
    type Data: 'static;

    /// Decide on a valid upgrade request (RFC 6455 checks already passed).
    fn upgrade(&mut self, req: &UpgradeRequest<'_>) -> Decision<Self::Data>;

    /// The 101 response is on its way; the connection is open.
    fn on_open(&mut self, _ws: &mut WebSocket<'_, Self::Data>) {}

    /// A complete message arrived.
    fn on_message(&mut self, ws: &mut WebSocket<'_, Self::Data>, msg: Message<'_>);

    /// A ping arrived (the pong is sent automatically).
    fn on_ping(&mut self, _ws: &mut WebSocket<'_, Self::Data>, _payload: &[u8]) {}

    /// A pong arrived.
    fn on_pong(&mut self, _ws: &mut WebSocket<'_, Self::Data>, _payload: &[u8]) {}

    /// Everything queued for this connection has been written to the socket after it had to be
    /// buffered (a slow reader caught up).
    fn on_drain(&mut self, _ws: &mut WebSocket<'_, Self::Data>) {}

    /// The number of this loop's subscribers of `topic` changed from `old` to `new` (a
    /// connection subscribed, unsubscribed, or ended). Called after the callback that made the
    /// change returns, never from inside it; an application can mirror its topics elsewhere
    /// (subscribe to a broker's channel at 0 -> 1, unsubscribe at 1 -> 0).
    fn on_subscription(&mut self, _topic: &[u8], _old: usize, _new: usize) {}

    /// The connection ended, for whatever reason; called exactly once for every connection that
    /// was opened, and never for one that was not. `code` is the peer's close code when it closed,
    /// ours when we did, 1006 when the connection ended without a close frame.
    fn on_close(&mut self, _id: ConnId, _data: Self::Data, _code: CloseCode, _reason: &str) {}
}

/// What a send did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendStatus {
    /// Queued for the socket (written at the end of the current dispatch, or buffered).
    Queued,
    /// The connection is closing or closed: nothing was sent.
    Closed,
    /// More than [`Config::max_backpressure`](crate::Config::max_backpressure) bytes were
    /// already queued for this slow reader: nothing was sent. With the `Close` policy the
    /// connection is also being closed with 1008.
    Dropped,
}

/// A connection's send-side state, shared by callbacks and posted closures.
#[derive(Debug, Default)]
pub(crate) struct SendState {
    /// A close the application asked for, applied after the callback returns.
    pub close_req: Option<Box<(CloseCode, Box<str>)>>,
    /// The application asked to drop the connection without a close handshake.
    pub terminate: bool,
    /// Sends are refused (a close was requested or the session is closing).
    pub sealed: bool,
    /// Why the server is closing, when it is for a reason of its own (counted at the end).
    pub cause: Option<CloseReason>,
    /// It has subscribed to a topic (the close path then takes it out of the registry).
    pub subscribed: bool,
}

/// What a [`WebSocket`]'s topic methods reach: the loop's publish/subscribe (the server
/// implements it; the application's API sees only these operations).
pub(crate) trait PubsubOps {
    /// Subscribe connection `id` to `topic`: whether it was not subscribed before.
    fn subscribe(&mut self, id: ConnId, topic: &[u8]) -> Result<bool, TopicError>;
    /// Unsubscribe: whether it was subscribed.
    fn unsubscribe(&mut self, id: ConnId, topic: &[u8]) -> bool;
    /// Whether `id` is subscribed to `topic`.
    fn is_subscribed(&self, id: ConnId, topic: &[u8]) -> bool;
    /// The topics `id` is subscribed to.
    fn topics(&self, id: ConnId) -> Vec<Vec<u8>>;
    /// Publish to `topic`'s subscribers except `except` (framed compressed with `codec` for
    /// those that negotiated permessage-deflate): how many it is for.
    fn publish(
        &mut self,
        topic: &[u8],
        msg: Message<'_>,
        except: Option<ConnId>,
        codec: &mut SharedCodec,
    ) -> Result<usize, TopicError>;
    /// How many subscribers `topic` has on this loop.
    fn num_subscribers(&self, topic: &[u8]) -> usize;
}

/// A connection as seen from inside a callback: its data, and ways to send and close.
pub struct WebSocket<'a, D> {
    pub(crate) id: ConnId,
    pub(crate) peer: Peer,
    pub(crate) data: &'a mut D,
    pub(crate) send: &'a mut SendState,
    /// Where frames go: the loop's cork (owned by this connection for the callback's duration),
    /// the connection's queue, or, for large payloads, the socket itself.
    pub(crate) out: Outbox<'a>,
    pub(crate) subprotocol: Option<&'a str>,
    pub(crate) max_backpressure: usize,
    pub(crate) policy: BackpressurePolicy,
    /// The loop's topics.
    pub(crate) pubsub: &'a mut dyn PubsubOps,
}

impl<'a, D> WebSocket<'a, D> {
    /// This connection's id, usable later through a [`LoopHandle`](crate::LoopHandle).
    pub fn id(&self) -> ConnId {
        self.id
    }
    /// The TCP peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer.addr()
    }
    /// The per-connection data created by the upgrade hook.
    pub fn data(&self) -> &D {
        self.data
    }
    /// The per-connection data, mutably.
    pub fn data_mut(&mut self) -> &mut D {
        self.data
    }
    /// The subprotocol chosen at upgrade, if any.
    pub fn subprotocol(&self) -> Option<&str> {
        self.subprotocol
    }
    /// Send a text message.
    pub fn send_text(&mut self, text: &str) -> SendStatus {
        self.message(OpCode::Text, text.as_bytes())
    }
    /// Send a binary message.
    pub fn send_binary(&mut self, bytes: &[u8]) -> SendStatus {
        self.message(OpCode::Binary, bytes)
    }
    /// Send a message of either kind.
    pub fn send(&mut self, msg: Message<'_>) -> SendStatus {
        match msg {
            Message::Text(s) => self.send_text(s),
            Message::Binary(b) => self.send_binary(b),
        }
    }
    /// Send a ping (payload cut to 125 bytes).
    pub fn ping(&mut self, payload: &[u8]) -> SendStatus {
        if let Some(refused) = self.refused() {
            return refused;
        }
        let sent = self.out.ping(payload);
        self.sent(sent)
    }
    /// Start the close handshake with `code` and `reason` once the callback returns; later sends
    /// are refused. The connection ends when the client answers or after the close timeout.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        if !self.send.sealed {
            self.send.sealed = true;
            self.send.close_req = Some(Box::new((code, reason.into())));
        }
    }
    /// Drop the connection without a close handshake once the callback returns.
    pub fn terminate(&mut self) {
        self.send.sealed = true;
        self.send.terminate = true;
    }
    /// Subscribe this connection to `topic` (at most
    /// [`MAX_TOPIC_LEN`](crate::topics::MAX_TOPIC_LEN) bytes): `Ok(true)` if it was not
    /// subscribed. It stays subscribed until it unsubscribes or ends.
    pub fn subscribe(&mut self, topic: &[u8]) -> Result<bool, TopicError> {
        let new = self.pubsub.subscribe(self.id, topic)?;
        self.send.subscribed = true;
        Ok(new)
    }
    /// Unsubscribe from `topic`: whether it was subscribed.
    pub fn unsubscribe(&mut self, topic: &[u8]) -> bool {
        self.pubsub.unsubscribe(self.id, topic)
    }
    /// Whether this connection is subscribed to `topic`.
    pub fn is_subscribed(&self, topic: &[u8]) -> bool {
        self.pubsub.is_subscribed(self.id, topic)
    }
    /// The topics this connection is subscribed to, in no particular order.
    pub fn topics(&self) -> Vec<Vec<u8>> {
        self.pubsub.topics(self.id)
    }
    /// Publish `msg` to every subscriber of `topic` but this connection (on every loop of a
    /// cluster): how many subscribers on this loop it is for. The message is framed once; each
    /// subscriber gets it at the end of the loop's turn (or earlier, before anything else the
    /// loop writes to it), within its backpressure limit: see README, Topics.
    pub fn publish(&mut self, topic: &[u8], msg: Message<'_>) -> Result<usize, TopicError> {
        self.pubsub
            .publish(topic, msg, Some(self.id), self.out.codec())
    }
    /// Bytes sent but not yet written to the socket.
    pub fn buffered_amount(&self) -> usize {
        self.out.buffered()
    }

    #[inline(always)]
    fn message(&mut self, op: OpCode, payload: &[u8]) -> SendStatus {
        if let Some(refused) = self.refused() {
            return refused;
        }
        let sent = self.out.message(op, payload);
        self.sent(sent)
    }

    /// Why a send is refused before anything is written, if it is: the connection is closing,
    /// or more than the backpressure limit is queued (with the `Close` policy the connection is
    /// then closed with 1008 once the callback returns).
    #[inline(always)]
    fn refused(&mut self) -> Option<SendStatus> {
        if self.send.sealed {
            return Some(SendStatus::Closed);
        }
        if self.buffered_amount() > self.max_backpressure {
            if self.policy == BackpressurePolicy::Close {
                self.send.sealed = true;
                self.send.cause = Some(CloseReason::Backpressure);
                self.send.close_req = Some(Box::new((
                    CloseCode::POLICY_VIOLATION,
                    "backpressure limit".into(),
                )));
            }
            return Some(SendStatus::Dropped);
        }
        None
    }

    /// The status of a send that was not refused: queued, or, if the session refused it (it is
    /// closing) or writing to the socket failed, closed (sealed: the connection ends once the
    /// callback returns).
    #[inline(always)]
    fn sent(&mut self, sent: bool) -> SendStatus {
        if sent {
            SendStatus::Queued
        } else {
            self.send.sealed = true;
            SendStatus::Closed
        }
    }
}
