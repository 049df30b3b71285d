//! The stall watchdog. A handler that blocks delays every connection on the loop; the loop
//! writes a heartbeat (when its current turn started, and what it is running) with a few
//! relaxed atomic stores per turn, and a watchdog thread that reads it reports any turn that
//! runs longer than a threshold: a warning naming the callback and the connection, a counter,
//! and the longest stall seen.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// What the loop is running, as reported in a stall warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Activity {
    /// Dispatching I/O or timers (no application code).
    Loop = 0,
    /// `Handler::upgrade`.
    Upgrade = 1,
    /// `Handler::on_open`.
    Open = 2,
    /// `Handler::on_message`.
    Message = 3,
    /// `Handler::on_ping` or `on_pong`.
    PingPong = 4,
    /// `Handler::on_drain`.
    Drain = 5,
    /// `Handler::on_close`.
    Close = 6,
    /// A closure posted through a `LoopHandle`.
    Posted = 7,
    /// `Handler::on_subscription`.
    Subscription = 8,
}

impl Activity {
    fn from_u8(v: u8) -> Activity {
        match v {
            1 => Activity::Upgrade,
            2 => Activity::Open,
            3 => Activity::Message,
            4 => Activity::PingPong,
            5 => Activity::Drain,
            6 => Activity::Close,
            7 => Activity::Posted,
            8 => Activity::Subscription,
            _ => Activity::Loop,
        }
    }

    /// The name used in logs.
    pub fn label(self) -> &'static str {
        match self {
            Activity::Loop => "loop dispatch",
            Activity::Upgrade => "upgrade hook",
            Activity::Open => "on_open",
            Activity::Message => "on_message",
            Activity::PingPong => "on_ping/on_pong",
            Activity::Drain => "on_drain",
            Activity::Close => "on_close",
            Activity::Posted => "posted closure",
            Activity::Subscription => "on_subscription",
        }
    }
}

/// The loop's side: a heartbeat the watchdog reads.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    base: Instant,
    /// Nanoseconds since `base` (+1) at which the current turn started; 0 while waiting.
    turn_started: AtomicU64,
    /// What runs now: activity in the top byte, connection id (`u64`, 0 for none) below.
    activity: AtomicU64,
    conn: AtomicU64,
    /// Stalls reported, and the longest seen, in nanoseconds.
    pub(crate) stalls: AtomicU64,
    pub(crate) longest_ns: AtomicU64,
    /// The current turn was reported as a stall (its end is logged with its length).
    reported: std::sync::atomic::AtomicBool,
}

impl Heartbeat {
    fn new() -> Self {
        Heartbeat {
            base: Instant::now(),
            turn_started: AtomicU64::new(0),
            activity: AtomicU64::new(0),
            conn: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            longest_ns: AtomicU64::new(0),
            reported: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    /// A turn begins (the poll returned).
    pub(crate) fn turn_start(&self) {
        self.activity.store(Activity::Loop as u64, Relaxed);
        self.turn_started.store(self.now_ns(), Relaxed);
    }

    /// The turn is over after `ns` nanoseconds; the loop goes back to waiting. A turn the
    /// watchdog reported as a stall is logged again with its whole length (the report came
    /// when it crossed the threshold), and counts as the longest if it is.
    pub(crate) fn turn_end(&self, ns: u64) {
        self.turn_started.store(0, Relaxed);
        if self.reported.swap(false, Relaxed) {
            self.longest_ns.fetch_max(ns, Relaxed);
            log::warn!(
                "event loop stalled: the turn ended after {} ms",
                ns / 1_000_000
            );
        }
    }

    /// Application code of `kind` is about to run for connection `conn` (0: none).
    pub(crate) fn running(&self, kind: Activity, conn: u64) {
        self.conn.store(conn, Relaxed);
        self.activity.store(kind as u64, Relaxed);
    }
}

/// The watchdog thread; stops when dropped, at once whatever the threshold.
#[derive(Debug)]
pub(crate) struct Watchdog {
    pub(crate) beat: Arc<Heartbeat>,
    /// Set (and signalled) to stop the thread: it waits on this between checks, so a stop
    /// wakes it at once instead of after its period.
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Start watching for turns longer than `threshold` (checked every quarter of it, at least
    /// every millisecond).
    pub(crate) fn start(threshold: Duration) -> std::io::Result<Watchdog> {
        let beat = Arc::new(Heartbeat::new());
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (b, s) = (beat.clone(), stop.clone());
        let limit = threshold.as_nanos() as u64;
        let period = (threshold / 4).max(Duration::from_millis(1));
        let thread = thread::Builder::new()
            .name("wsloop-watchdog".into())
            .spawn(move || {
                let mut reported_turn = 0;
                let (lock, cvar) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                // Checked before each wait: a stop that came before this thread first waited
                // is seen too.
                while !*stopped {
                    // Wakes early only to stop (or spuriously: one more check, harmless).
                    stopped = cvar
                        .wait_timeout(stopped, period)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    if *stopped {
                        break;
                    }
                    check(&b, limit, &mut reported_turn);
                }
            })?;
        Ok(Watchdog {
            beat,
            stop,
            thread: Some(thread),
        })
    }
}

/// One look at the heartbeat: count and report a turn running longer than `limit` ns (once per
/// turn; `reported_turn` remembers the last one reported).
fn check(b: &Heartbeat, limit: u64, reported_turn: &mut u64) {
    let started = b.turn_started.load(Relaxed);
    if started == 0 {
        return;
    }
    let stalled = b.now_ns().saturating_sub(started);
    if stalled <= limit {
        return;
    }
    b.longest_ns.fetch_max(stalled, Relaxed);
    if *reported_turn != started {
        *reported_turn = started;
        b.stalls.fetch_add(1, Relaxed);
        b.reported.store(true, Relaxed);
        let kind = Activity::from_u8(b.activity.load(Relaxed) as u8);
        let conn = b.conn.load(Relaxed);
        log::warn!(
            "event loop stalled: a turn has run for {} ms (threshold {} ms), in {}{}",
            stalled / 1_000_000,
            limit / 1_000_000,
            kind.label(),
            if conn != 0 {
                format!(" of connection {}", crate::app::ConnId(conn))
            } else {
                String::new()
            }
        );
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cvar.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_turns_are_not_reported() {
        // A threshold far above any scheduling hiccup of this test thread.
        let dog = Watchdog::start(Duration::from_secs(2)).unwrap();
        let beat = dog.beat.clone();
        for _ in 0..1000 {
            beat.turn_start();
            beat.turn_end(0);
        }
        thread::sleep(Duration::from_millis(50));
        assert_eq!(beat.stalls.load(Relaxed), 0);
        assert_eq!(beat.longest_ns.load(Relaxed), 0);
    }

    #[test]
    fn a_long_turn_is_reported_once() {
        let dog = Watchdog::start(Duration::from_millis(20)).unwrap();
        let beat = dog.beat.clone();
        beat.turn_start();
        beat.running(Activity::Message, 42);
        // The turn lasts until the watchdog has seen it (bounded: on a loaded machine its
        // thread may not run for a while), then ten more of its checks.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while beat.stalls.load(Relaxed) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the stall was never seen"
            );
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(50));
        beat.turn_end(0);
        assert_eq!(beat.stalls.load(Relaxed), 1, "one stall, reported once");
        assert!(beat.longest_ns.load(Relaxed) >= 20_000_000);
    }

    #[test]
    fn dropping_stops_the_thread_at_once_whatever_the_threshold() {
        // An hour's threshold: the thread would sleep a quarter of it between checks.
        let dog = Watchdog::start(Duration::from_secs(3600)).unwrap();
        thread::sleep(Duration::from_millis(20)); // the thread is waiting by now
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            drop(dog);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the watchdog's drop returns promptly");
    }
}
