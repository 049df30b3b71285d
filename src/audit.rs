//! The periodic fd audit, on a thread of its own: listing `/proc/self/fd` costs time in
//! proportion to the descriptors open (milliseconds at ten thousand), which the event loop must
//! not spend. The thread compares the listing with the ledger's count every `audit_interval`,
//! stores the result in the ledger (atomics that `/healthz`, `/metrics` and `Stats` read), and
//! logs a difference at most once a minute while it lasts. It is started with the first loop
//! and stopped (woken at once, and joined) when that loop shuts down or is dropped.

use crate::ledger::Ledger;
use std::io;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often a lasting difference is logged again.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The audit thread; stops when dropped.
pub(crate) struct Auditor {
    /// Dropping it wakes the thread, which then ends.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Auditor {
    /// Audit `ledger` every `every` (the first one `every` from now).
    pub(crate) fn start(ledger: Arc<Ledger>, every: Duration) -> io::Result<Auditor> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("wsloop-audit".into())
            .spawn(move || {
                let mut warned: Option<Instant> = None;
                let mut was = 0;
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    was = audit_once(&ledger, was, &mut warned);
                }
            })?;
        Ok(Auditor {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// One audit: store the result, and warn about a difference when it appears, and again at most
/// once a minute while it lasts; say when it is gone. Returns the difference now in force.
fn audit_once(ledger: &Ledger, was: i64, warned: &mut Option<Instant>) -> i64 {
    let diff = match ledger.audit() {
        Ok(Some(diff)) => diff,
        Ok(None) => {
            log::debug!("fd audit: descriptors opened or closed during every reading; next time");
            return was;
        }
        Err(e) => {
            log::debug!("fd audit: cannot list /proc/self/fd: {e}");
            return was;
        }
    };
    if diff != 0 {
        if was == 0 || warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            let (open, _) = ledger.last_audit();
            log::warn!(
                "fd audit: {open} descriptors open, {} accounted for (the loops' own and those open before they started): difference {diff:+}",
                open as i64 - diff,
            );
            *warned = Some(Instant::now());
        }
    } else if was != 0 {
        log::warn!("fd audit: the difference of {was:+} is gone");
    }
    diff
}

impl Drop for Auditor {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
