//! Reaching the loop from other threads: [`LoopHandle`] posts commands to a queue and wakes the
//! loop through a `mio::Waker`; the loop runs them between dispatches, with a [`Ctx`].

use crate::app::{CloseReason, ConnId, Handler, Message, SendStatus};
use crate::config::BackpressurePolicy;
use crate::event_loop::{conn_id, slot_of, Core, Stats};
use crate::protocol::close::CloseCode;
use crate::protocol::frame::OpCode;
use crate::protocol::session::State;
use crate::write::Out;
use mio::Waker;
use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

/// A message owned by a command in flight to the loop.
pub(crate) enum OwnedMessage {
    Text(String),
    Binary(Vec<u8>),
}

type Job<H> = Box<dyn FnOnce(&mut H, &mut Ctx<'_, <H as Handler>::Data>) + Send>;

/// A request to the loop.
pub(crate) enum Command<H: Handler> {
    Send(ConnId, OwnedMessage),
    Close(ConnId, CloseCode, String),
    Terminate(ConnId),
    Post(Job<H>),
    Shutdown,
}

/// The queue and the waker shared by the loop and its handles.
pub(crate) struct Shared<H: Handler> {
    /// `None` once the loop has ended: commands are then dropped at once.
    queue: Mutex<Option<Vec<Command<H>>>>,
    waker: Waker,
}

impl<H: Handler> Shared<H> {
    pub(crate) fn new(waker: Waker) -> Self {
        Shared {
            queue: Mutex::new(Some(Vec::new())),
            waker,
        }
    }

    /// Everything queued so far, in order.
    pub(crate) fn take(&self) -> Vec<Command<H>> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The loop has ended: drop what is queued and refuse what comes.
    pub(crate) fn close(&self) {
        let old = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(old);
    }

    fn push(&self, cmd: Command<H>) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(queue) = q.as_mut() else {
            return;
        };
        let was_empty = queue.is_empty();
        queue.push(cmd);
        drop(q);
        if was_empty {
            // A failed wake leaves the command queued for the next wake-up; nothing to recover.
            let _ = self.waker.wake();
        }
    }
}

/// A cloneable, `Send` handle to a running server, for other threads (or the loop's own
/// callbacks) to send to connections, close them, run closures on the loop, or shut it down.
///
/// Every method only queues a command and wakes the loop (one mutex lock and at most one
/// `write` to an eventfd); the loop applies commands in order on its next turn. Commands aimed at
/// a connection that has ended by then are dropped: connection ids carry a generation, so they
/// never reach a newer connection in the same slot. Commands sent after the loop has returned
/// are dropped.
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
    pub(crate) fn new(shared: Arc<Shared<H>>) -> Self {
        LoopHandle { shared }
    }

    /// Send a text message to connection `id`.
    pub fn send_text(&self, id: ConnId, text: impl Into<String>) {
        self.shared
            .push(Command::Send(id, OwnedMessage::Text(text.into())));
    }

    /// Send a binary message to connection `id`.
    pub fn send_binary(&self, id: ConnId, bytes: impl Into<Vec<u8>>) {
        self.shared
            .push(Command::Send(id, OwnedMessage::Binary(bytes.into())));
    }

    /// Start the close handshake with connection `id`.
    pub fn close(&self, id: ConnId, code: CloseCode, reason: impl Into<String>) {
        self.shared.push(Command::Close(id, code, reason.into()));
    }

    /// Drop connection `id` without a close handshake.
    pub fn terminate(&self, id: ConnId) {
        self.shared.push(Command::Terminate(id));
    }

    /// Run `f` on the loop's thread with the handler and a [`Ctx`].
    pub fn post(&self, f: impl FnOnce(&mut H, &mut Ctx<'_, H::Data>) + Send + 'static) {
        self.shared.push(Command::Post(Box::new(f)));
    }

    /// Run `f` on the loop and wait for its result; `None` if the loop has ended (or ends before
    /// running it). Blocks the calling thread: never call it from the loop's own thread.
    pub fn query<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut H, &mut Ctx<'_, H::Data>) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.post(move |h, ctx| {
            let _ = tx.send(f(h, ctx));
        });
        rx.recv().ok()
    }

    /// The loop's counters, fetched from the loop; `None` if it has ended.
    pub fn stats(&self) -> Option<Stats> {
        self.query(|_, ctx| ctx.stats())
    }

    /// The metrics in Prometheus text format, rendered on the loop; `None` if it has ended.
    pub fn metrics(&self) -> Option<String> {
        self.query(|_, ctx| ctx.metrics())
    }

    /// Graceful shutdown: stop accepting, send close 1001 to every open connection, wait up to
    /// the shutdown timeout for their answers, then drop the rest and let `run` return.
    pub fn shutdown(&self) {
        self.shared.push(Command::Shutdown);
    }
}

/// What a posted closure can do on the loop: reach any connection by id.
pub struct Ctx<'a, D> {
    pub(crate) core: &'a mut Core<D>,
}

impl<'a, D> Ctx<'a, D> {
    pub(crate) fn locate(&mut self, id: ConnId) -> Option<usize> {
        let (idx, gen) = slot_of(id.0);
        (id.loop_index() == self.core.member && self.core.alive(idx, gen)).then_some(idx)
    }

    /// Send a message to connection `id`. [`SendStatus::Closed`] if it is gone, closing or not
    /// yet open; over the backpressure limit it is refused as in a callback.
    pub fn send(&mut self, id: ConnId, msg: Message<'_>) -> SendStatus {
        // A closure may send more to the same connection: keep its sends in the cork.
        self.send_as(id, msg, false)
    }

    /// [`Ctx::send`]; `last`: the cork is flushed right after (see [`Out::new`]).
    pub(crate) fn send_as(&mut self, id: ConnId, msg: Message<'_>, last: bool) -> SendStatus {
        let Some(idx) = self.locate(id) else {
            return SendStatus::Closed;
        };
        let core = &mut *self.core;
        if core.conns[idx].send.sealed || core.conns[idx].data.is_none() {
            return SendStatus::Closed;
        }
        core.cork_for(idx);
        let conn = &mut core.conns[idx];
        if conn.pending.len() + core.cork.len() > core.config.max_backpressure {
            if core.config.backpressure_policy == BackpressurePolicy::Close {
                conn.send.cause = Some(CloseReason::Backpressure);
                core.start_close(idx, CloseCode::POLICY_VIOLATION, "backpressure limit");
                core.linger(idx, CloseReason::Backpressure);
            }
            return SendStatus::Dropped;
        }
        if conn.session.state() != State::Open {
            return SendStatus::Closed;
        }
        let op = match msg {
            Message::Text(_) => OpCode::Text,
            Message::Binary(_) => OpCode::Binary,
        };
        let mut out = Out::new(
            &mut core.cork,
            &conn.socket,
            &mut conn.pending,
            &mut core.stats,
            last,
        );
        let sent = out.frame(op, msg.as_bytes());
        let direct = out.direct;
        if !sent {
            conn.send.sealed = true;
        }
        match core.settle(idx, direct) {
            true => SendStatus::Queued,
            false => SendStatus::Closed,
        }
    }

    /// Start the close handshake with connection `id`. Returns false if it is gone or closing.
    pub fn close(&mut self, id: ConnId, code: CloseCode, reason: &str) -> bool {
        let Some(idx) = self.locate(id) else {
            return false;
        };
        let core = &mut *self.core;
        if core.conns[idx].send.sealed || core.conns[idx].data.is_none() {
            return false;
        }
        core.start_close(idx, code, reason);
        true
    }

    /// Drop connection `id` without a close handshake (after the current closure returns).
    pub fn terminate(&mut self, id: ConnId) {
        if let Some(idx) = self.locate(id) {
            let gen = self.core.conns[idx].gen;
            self.core.doomed.push((idx, gen, CloseReason::Terminated));
        }
    }

    /// The data of connection `id`, if it is open.
    pub fn data_mut(&mut self, id: ConnId) -> Option<&mut D> {
        let idx = self.locate(id)?;
        self.core.conns[idx].data.as_mut()
    }

    /// Ids of every open connection (handshake complete, not yet ended).
    pub fn open_ids(&self) -> Vec<ConnId> {
        self.core
            .conns
            .iter()
            .filter(|(_, c)| c.data.is_some())
            .map(|(i, c)| conn_id(self.core.member, i, c.gen))
            .collect()
    }

    /// The loop's counters.
    pub fn stats(&self) -> Stats {
        self.core.stats()
    }

    /// The metrics in Prometheus text format, as `GET /metrics` serves them.
    pub fn metrics(&self) -> String {
        self.core.render_metrics()
    }

    /// Descriptors open in the process (counted in `/proc/self/fd`) minus those it had open
    /// when the loop started and those the loop owns (epoll, waker, listeners, connections, the
    /// spare descriptor). Zero when everything is accounted for; positive when something in the
    /// process leaks descriptors. Costs a directory listing of `/proc/self/fd`.
    pub fn audit(&mut self) -> io::Result<i64> {
        self.core.audit()
    }
}
