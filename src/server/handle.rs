//! Reaching the loop from other threads: [`LoopHandle`] posts commands to a bounded queue and
//! wakes the loop through a `mio::Waker`; the loop runs them between dispatches, with a [`Ctx`].

use super::ctx::Ctx;
use crate::app::{ConnId, Handler, Message};
use crate::config::Config;
use crate::metrics::Stats;
use crate::protocol::close::CloseCode;
use crate::protocol::frame::OpCode;
use crate::topics::MAX_TOPIC_LEN;
use mio::Waker;
use std::cell::Cell;
use std::fmt;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A message owned by a command in flight to the loop.
pub(super) enum OwnedMessage {
    Text(String),
    Binary(Vec<u8>),
}

impl OwnedMessage {
    pub(super) fn parts(&self) -> (OpCode, &[u8]) {
        match self {
            OwnedMessage::Text(s) => (OpCode::Text, s.as_bytes()),
            OwnedMessage::Binary(b) => (OpCode::Binary, b),
        }
    }

    fn capacity(&self) -> usize {
        match self {
            OwnedMessage::Text(s) => s.capacity(),
            OwnedMessage::Binary(b) => b.capacity(),
        }
    }
}

type Job<H> = Box<dyn FnOnce(&mut H, &mut Ctx<'_, <H as Handler>::Data>) + Send>;

/// A request to the loop.
pub(super) enum Command<H: Handler> {
    Send(ConnId, OwnedMessage),
    Close(ConnId, CloseCode, String),
    Terminate(ConnId),
    /// Publish to a topic's subscribers on every loop.
    Publish(Box<[u8]>, OwnedMessage),
    Post(Job<H>),
    /// A closure whose caller waits for its result ([`LoopHandle::query`]): not counted against
    /// the bound, since each waiting thread has at most one in the queue.
    Query(Job<H>),
    /// Queued at most once, never refused for a full queue.
    Shutdown,
}

impl<H: Handler> Command<H> {
    /// The bytes this command holds while queued, as counted against
    /// [`Config::handle_queue_bytes`]: its own size plus what it owns (a message's or reason's
    /// buffer, a closure's captures; what a closure owns behind pointers is not visible here).
    /// `None` for the control commands, which the bound does not count.
    pub(super) fn cost(&self) -> Option<usize> {
        let own = std::mem::size_of::<Self>();
        Some(match self {
            Command::Send(_, msg) => own + msg.capacity(),
            Command::Publish(topic, msg) => own + topic.len() + msg.capacity(),
            Command::Close(_, _, reason) => own + reason.capacity(),
            Command::Terminate(_) => own,
            Command::Post(f) => own + std::mem::size_of_val(&**f),
            Command::Query(_) | Command::Shutdown => return None,
        })
    }
}

/// Why a [`LoopHandle`] did not queue a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The queue holds [`Config::handle_queue_commands`] commands or
    /// [`Config::handle_queue_bytes`] bytes: the loop has not caught up. The command was
    /// dropped; retry later, give it up, or wait for room with a `*_timeout` method.
    Full,
    /// The command alone is larger than [`Config::handle_queue_bytes`], or a publish's topic is
    /// longer than [`MAX_TOPIC_LEN`](crate::topics::MAX_TOPIC_LEN): it can never be queued.
    TooLarge,
    /// The loop has ended (its `turn` returned false, or its `Server` was dropped): nothing
    /// will run the command.
    Closed,
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueueError::Full => "the loop's command queue is full",
            QueueError::TooLarge => "the command is larger than the loop's command queue",
            QueueError::Closed => "the loop has ended",
        })
    }
}

impl std::error::Error for QueueError {}

/// What a [`LoopHandle`]'s queue holds, from [`LoopHandle::queued`]. Only the bounded commands
/// count (sends, closes, terminates, posts); queries and shutdown do not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Commands queued or being run by the loop now.
    pub commands: usize,
    /// Their bytes (see [`Config::handle_queue_bytes`]).
    pub bytes: usize,
    /// The most commands held at once since the server was built.
    pub peak_commands: usize,
    /// The most bytes held at once since the server was built.
    pub peak_bytes: usize,
    /// Commands refused because the queue was full (or the command too large).
    pub refused: u64,
}

/// The queue behind the mutex.
pub(super) struct Queue<H: Handler> {
    /// Commands not yet taken by the loop.
    commands: Vec<Command<H>>,
    /// False once the loop has ended: commands are then refused.
    open: bool,
    /// A shutdown is queued (or has run): further ones are not queued again.
    shutdown: bool,
    /// What the bounded commands queued or running hold, and the high-water marks.
    stats: QueueStats,
    /// Producers waiting for room.
    waiters: usize,
}

/// The queue and the waker shared by the loop and its handles.
pub(super) struct Shared<H: Handler> {
    queue: Mutex<Queue<H>>,
    /// Signalled when the loop has run a batch (room was freed) or has ended.
    room: Condvar,
    waker: Arc<Waker>,
    max_commands: usize,
    max_bytes: usize,
    /// The TLS certificates the loop serves, for [`LoopHandle::reload_tls`].
    tls: Option<crate::io::tls::TlsSetup>,
}

thread_local! {
    /// The `Shared` (by address) of the loop whose turn runs on this thread, or 0.
    static LOOP_HERE: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as running a loop's turn until dropped (see [`Shared::enter`]).
pub(super) struct OnLoop {
    previous: usize,
}

impl Drop for OnLoop {
    fn drop(&mut self) {
        LOOP_HERE.with(|l| l.set(self.previous));
    }
}

impl<H: Handler> Shared<H> {
    pub(super) fn new(
        waker: Arc<Waker>,
        config: &Config,
        tls: Option<crate::io::tls::TlsSetup>,
    ) -> Self {
        Shared {
            queue: Mutex::new(Queue {
                commands: Vec::new(),
                open: true,
                shutdown: false,
                stats: QueueStats::default(),
                waiters: 0,
            }),
            room: Condvar::new(),
            waker,
            max_commands: config.handle_queue_commands,
            max_bytes: config.handle_queue_bytes,
            tls,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Queue<H>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn id(&self) -> usize {
        self as *const Self as usize
    }

    /// The calling thread runs this loop's turn until the guard is dropped.
    pub(super) fn enter(&self) -> OnLoop {
        OnLoop {
            previous: LOOP_HERE.with(|l| l.replace(self.id())),
        }
    }

    /// Whether the calling thread is running this loop's turn (a callback or posted closure).
    pub(super) fn on_loop_thread(&self) -> bool {
        LOOP_HERE.with(|l| l.get()) == self.id()
    }

    /// Wake the loop (for work it left for its next turn).
    pub(super) fn wake(&self) {
        let _ = self.waker.wake();
    }

    /// Move everything queued so far, in order, into `batch` (empty). The bounded commands
    /// among them stay counted until [`Shared::release`].
    pub(super) fn take(&self, batch: &mut Vec<Command<H>>) {
        std::mem::swap(&mut self.lock().commands, batch);
    }

    /// The loop has run commands holding `commands` and `bytes`: free their room and wake the
    /// producers waiting for it.
    pub(super) fn release(&self, commands: usize, bytes: usize) {
        if commands == 0 {
            return;
        }
        let mut q = self.lock();
        q.stats.commands -= commands;
        q.stats.bytes -= bytes;
        if q.waiters > 0 {
            self.room.notify_all();
        }
    }

    /// The loop has ended: drop what is queued and refuse what comes; release every waiting
    /// producer (with [`QueueError::Closed`]) and every waiting query (with `None`).
    pub(super) fn close(&self) {
        let mut q = self.lock();
        q.open = false;
        let old = std::mem::take(&mut q.commands);
        for bytes in old.iter().filter_map(Command::cost) {
            q.stats.commands -= 1;
            q.stats.bytes -= bytes;
        }
        self.room.notify_all();
        drop(q);
        drop(old);
    }

    /// Queue `cmd`, waiting for room until `deadline` if one is given (and the calling thread
    /// is not the loop's own, which cannot drain while it waits).
    pub(super) fn push(
        &self,
        cmd: Command<H>,
        deadline: Option<Instant>,
    ) -> Result<(), QueueError> {
        let cost = cmd.cost();
        let mut q = self.lock();
        if let Some(bytes) = cost {
            if bytes > self.max_bytes {
                q.stats.refused += 1;
                return Err(QueueError::TooLarge);
            }
            let deadline = deadline.filter(|_| !self.on_loop_thread());
            loop {
                if !q.open {
                    return Err(QueueError::Closed);
                }
                let s = &q.stats;
                if s.commands < self.max_commands && s.bytes + bytes <= self.max_bytes {
                    break;
                }
                let left = deadline.and_then(|d| d.checked_duration_since(Instant::now()));
                let Some(left) = left.filter(|l| !l.is_zero()) else {
                    q.stats.refused += 1;
                    return Err(QueueError::Full);
                };
                q.waiters += 1;
                q = self
                    .room
                    .wait_timeout(q, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                q.waiters -= 1;
            }
            let s = &mut q.stats;
            s.commands += 1;
            s.bytes += bytes;
            s.peak_commands = s.peak_commands.max(s.commands);
            s.peak_bytes = s.peak_bytes.max(s.bytes);
        } else if !q.open {
            return Err(QueueError::Closed);
        }
        if matches!(cmd, Command::Shutdown) {
            if q.shutdown {
                return Ok(());
            }
            q.shutdown = true;
        }
        let was_empty = q.commands.is_empty();
        q.commands.push(cmd);
        drop(q);
        if was_empty {
            // A failed wake leaves the command queued for the next wake-up; nothing to recover.
            let _ = self.waker.wake();
        }
        Ok(())
    }
}

/// A cloneable, `Send` handle to a running server, for other threads (or the loop's own
/// callbacks) to send to connections, close them, run closures on the loop, or shut it down.
///
/// # The queue and its bound
///
/// Every method queues a command and wakes the loop (one mutex lock and at most one `write` to
/// an eventfd); the loop takes everything queued on its next turn and runs it in order. The
/// queue is bounded, so that producers faster than the loop cannot exhaust memory:
/// [`Config::handle_queue_commands`] commands and [`Config::handle_queue_bytes`] bytes (a
/// message's bytes plus a fixed overhead per command), counted from the moment a command is
/// queued until the loop has run the batch it belongs to. Each method says what became of its
/// command:
///
/// - `Ok(())`: queued; the loop will run it (a send to a connection that has ended by then is
///   dropped cheaply: ids carry a generation, so it never reaches a newer connection in the
///   same slot).
/// - [`QueueError::Full`]: the bound is reached and the command was dropped. The `try_*`
///   methods never wait; the `*_timeout` methods wait for room up to a timeout (woken when the
///   loop has run a batch). A producer either retries later, gives the message up (a ticker
///   whose next value replaces this one), or waits.
/// - [`QueueError::TooLarge`]: the command alone exceeds the byte bound.
/// - [`QueueError::Closed`]: the loop has ended; nothing will run it.
///
/// The control commands are not refused for a full queue: [`LoopHandle::shutdown`] (queued at
/// most once) and [`LoopHandle::query`] (with [`stats`](LoopHandle::stats) and
/// [`metrics`](LoopHandle::metrics)), whose caller waits for the answer, so each waiting thread
/// has at most one in the queue. They run in order after what was queued before them.
///
/// On the loop's own thread (in a callback or a posted closure), the `*_timeout` methods do not
/// wait (the loop cannot drain while it waits), and [`LoopHandle::query`] panics (it would wait
/// for itself forever): use the [`WebSocket`](crate::WebSocket) or [`Ctx`] at hand instead.
pub struct LoopHandle<H: Handler> {
    shared: Arc<Shared<H>>,
}

impl<H: Handler> Clone for LoopHandle<H> {
    fn clone(&self) -> Self {
        LoopHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<H: Handler> LoopHandle<H> {
    pub(super) fn new(shared: Arc<Shared<H>>) -> Self {
        LoopHandle { shared }
    }

    pub(super) fn deadline(timeout: Duration) -> Option<Instant> {
        // A timeout too long to represent waits as long as it can.
        Some(
            Instant::now()
                .checked_add(timeout)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365)),
        )
    }

    /// Queue a text message for connection `id`; never waits (see [the queue](LoopHandle)).
    pub fn try_send_text(&self, id: ConnId, text: impl Into<String>) -> Result<(), QueueError> {
        let cmd = Command::Send(id, OwnedMessage::Text(text.into()));
        self.shared.push(cmd, None)
    }

    /// Queue a binary message for connection `id`; never waits.
    pub fn try_send_binary(&self, id: ConnId, bytes: impl Into<Vec<u8>>) -> Result<(), QueueError> {
        let cmd = Command::Send(id, OwnedMessage::Binary(bytes.into()));
        self.shared.push(cmd, None)
    }

    /// [`LoopHandle::try_send_text`], waiting up to `timeout` for room in a full queue.
    pub fn send_text_timeout(
        &self,
        id: ConnId,
        text: impl Into<String>,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        let cmd = Command::Send(id, OwnedMessage::Text(text.into()));
        self.shared.push(cmd, Self::deadline(timeout))
    }

    /// [`LoopHandle::try_send_binary`], waiting up to `timeout` for room in a full queue.
    pub fn send_binary_timeout(
        &self,
        id: ConnId,
        bytes: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        let cmd = Command::Send(id, OwnedMessage::Binary(bytes.into()));
        self.shared.push(cmd, Self::deadline(timeout))
    }

    /// Publish `msg` to every subscriber of `topic`, on this loop and (in a
    /// [`Cluster`](crate::Cluster)) on every other; never waits. Publications queued by one
    /// thread reach each subscriber in the order they were queued. A topic longer than
    /// [`MAX_TOPIC_LEN`](crate::topics::MAX_TOPIC_LEN) bytes: [`QueueError::TooLarge`].
    pub fn try_publish(&self, topic: &[u8], msg: Message<'_>) -> Result<(), QueueError> {
        self.shared.push(Self::publication(topic, msg)?, None)
    }

    /// [`LoopHandle::try_publish`], waiting up to `timeout` for room in a full queue.
    pub fn publish_timeout(
        &self,
        topic: &[u8],
        msg: Message<'_>,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        self.shared
            .push(Self::publication(topic, msg)?, Self::deadline(timeout))
    }

    fn publication(topic: &[u8], msg: Message<'_>) -> Result<Command<H>, QueueError> {
        if topic.len() > MAX_TOPIC_LEN {
            return Err(QueueError::TooLarge);
        }
        let msg = match msg {
            Message::Text(s) => OwnedMessage::Text(s.to_owned()),
            Message::Binary(b) => OwnedMessage::Binary(b.to_vec()),
        };
        Ok(Command::Publish(topic.into(), msg))
    }

    /// How many subscribers `topic` has on this loop, fetched from it; `None` if it has ended.
    /// Panics on the loop's own thread, as [`LoopHandle::query`].
    pub fn num_subscribers(&self, topic: &[u8]) -> Option<usize> {
        let topic = topic.to_vec();
        self.query(move |_, ctx| ctx.num_subscribers(&topic))
    }

    /// Start the close handshake with connection `id`; never waits.
    pub fn try_close(
        &self,
        id: ConnId,
        code: CloseCode,
        reason: impl Into<String>,
    ) -> Result<(), QueueError> {
        self.shared
            .push(Command::Close(id, code, reason.into()), None)
    }

    /// Drop connection `id` without a close handshake; never waits.
    pub fn try_terminate(&self, id: ConnId) -> Result<(), QueueError> {
        self.shared.push(Command::Terminate(id), None)
    }

    /// Run `f` on the loop's thread with the handler and a [`Ctx`]; never waits. The closure's
    /// own size counts against the byte bound (what it owns behind pointers does not: the
    /// command count bounds those).
    pub fn try_post(
        &self,
        f: impl FnOnce(&mut H, &mut Ctx<'_, H::Data>) + Send + 'static,
    ) -> Result<(), QueueError> {
        self.shared.push(Command::Post(Box::new(f)), None)
    }

    /// [`LoopHandle::try_post`], waiting up to `timeout` for room in a full queue.
    pub fn post_timeout(
        &self,
        f: impl FnOnce(&mut H, &mut Ctx<'_, H::Data>) + Send + 'static,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        self.shared
            .push(Command::Post(Box::new(f)), Self::deadline(timeout))
    }

    /// Run `f` on the loop and wait for its result; `None` if the loop has ended (or ends before
    /// running it), at once if it had already. Not refused for a full queue: it runs after what
    /// was queued before it.
    ///
    /// # Panics
    ///
    /// On the loop's own thread (in a callback or posted closure of this server), where it would
    /// wait for itself forever: use the [`Ctx`] or [`WebSocket`](crate::WebSocket) at hand.
    pub fn query<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut H, &mut Ctx<'_, H::Data>) -> R + Send + 'static,
    ) -> Option<R> {
        assert!(
            !self.shared.on_loop_thread(),
            "LoopHandle::query (or stats, metrics) called on the loop's own thread, from a \
             callback or posted closure: it would wait for itself forever; use the Ctx or \
             WebSocket at hand (Ctx::stats, Ctx::metrics) instead"
        );
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job<H> = Box::new(move |h, ctx| {
            let _ = tx.send(f(h, ctx));
        });
        self.shared.push(Command::Query(job), None).ok()?;
        rx.recv().ok()
    }

    /// The loop's counters, fetched from the loop; `None` if it has ended. Panics on the loop's
    /// own thread, as [`LoopHandle::query`].
    pub fn stats(&self) -> Option<Stats> {
        self.query(|_, ctx| ctx.stats())
    }

    /// The metrics in Prometheus text format, rendered on the loop; `None` if it has ended.
    /// Panics on the loop's own thread, as [`LoopHandle::query`].
    pub fn metrics(&self) -> Option<String> {
        self.query(|_, ctx| ctx.metrics())
    }

    /// Graceful shutdown: stop accepting, send close 1001 to every open connection, wait up to
    /// the shutdown timeout for their answers, then drop the rest and let `run` return. Never
    /// refused for a full queue; queued once however often it is called. `Err(Closed)` if the
    /// loop has already ended.
    pub fn shutdown(&self) -> Result<(), QueueError> {
        self.shared.push(Command::Shutdown, None)
    }

    /// Read the TLS certificates and keys again from the files [`Config::tls`] names (every
    /// loop of a [`Cluster`](crate::Cluster) serves the same ones, so one call through any of
    /// its handles reloads them all). New handshakes use the new certificates; open connections
    /// keep theirs. A file that is wrong as at start-up (unreadable, no certificate or key, a
    /// key that does not match, an expired certificate, an SNI certificate not valid for its
    /// name) is an error naming it, and the certificates served stay as they were. Reads the
    /// files on the calling thread, not the loop's; never queued. Counted in
    /// `wsloop_tls_reloads_total{result}`. Without TLS: an error with the field `tls_cert`.
    pub fn reload_tls(&self) -> Result<(), crate::ConfigError> {
        match &self.shared.tls {
            Some(tls) => tls.reload(),
            None => Err(crate::ConfigError {
                field: "tls_cert",
                reason: "the server serves no TLS: nothing to reload".into(),
            }),
        }
    }

    /// What the queue holds now, its high-water marks and how many commands it refused.
    pub fn queued(&self) -> QueueStats {
        self.shared.lock().stats
    }
}
