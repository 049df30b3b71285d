//! The `wsloop` binary's startup and shutdown, as a child process: configuration errors name the
//! flag (and the numbers, for the descriptor limit) instead of failing later with an OS error or
//! a wrapped sum, sub-millisecond timeouts are refused, and SIGTERM exits promptly whatever the
//! stall threshold.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod child_support;

use child_support::{run_bounded, Proc};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on a run that should fail at once (a server that starts instead is killed then).
const REFUSE_BOUND: Duration = Duration::from_secs(10);

/// Run the binary with `args` (listening on a free port), expecting it to refuse to start; its
/// stderr.
fn refused(args: &[&str]) -> String {
    let run = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_wsloop"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .env("RUST_LOG", "info"),
        REFUSE_BOUND,
    )
    .expect("run wsloop");
    let status = run.status.unwrap_or_else(|| {
        panic!(
            "wsloop {args:?} did not exit within {REFUSE_BOUND:?} (it started?):\n{}",
            run.stderr
        )
    });
    assert!(!status.success(), "wsloop {args:?} exited with {status}");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run.stderr
}

fn has_all(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "{p:?} missing from:\n{text}");
    }
}

#[test]
fn sigterm_exits_promptly_with_an_hour_long_stall_threshold() {
    let mut proc = Proc::spawn(
        "wsloop",
        Command::new(env!("CARGO_BIN_EXE_wsloop"))
            .args(["--listen", "127.0.0.1:0", "--stall-threshold", "3600"])
            .env("RUST_LOG", "info"),
    )
    .expect("spawn wsloop");
    proc.wait_for("wsloop to start", Duration::from_secs(20), |log| {
        log.contains("fd budget").then_some(())
    })
    .unwrap_or_else(|status| panic!("wsloop exited at startup ({status:?}):\n{}", proc.log()));
    let started = Instant::now();
    proc.group.signal(rustix::process::Signal::TERM);
    // The watchdog checks every quarter of the threshold (15 minutes here): before, the process
    // waited that long for it after SIGTERM.
    let exited = proc.group.wait_exited(Duration::from_secs(5));
    let took = started.elapsed();
    let status = proc.terminate(Duration::from_secs(1));
    assert!(
        exited,
        "still running {took:?} after SIGTERM:\n{}",
        proc.log()
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(proc.log().contains("stopped"), "{}", proc.log());
}

#[test]
fn an_fd_headroom_that_overflows_the_budget_is_refused() {
    let err = refused(&[
        "--max-connections",
        "20000",
        "--fd-headroom",
        "18446744073709551603",
    ]);
    has_all(
        &err,
        &["invalid --fd-headroom", "18446744073709551603", "at most"],
    );
    // The largest accepted headroom still cannot fit any real limit: refused with the numbers.
    let err = refused(&["--fd-limit", "1024", "--fd-headroom", "1073741824"]);
    has_all(
        &err,
        &[
            "invalid --fd-headroom",
            "RLIMIT_NOFILE 1024",
            "headroom 1073741824",
            "--fd-limit 1024",
        ],
    );
}

#[test]
fn sub_millisecond_timeouts_are_refused_naming_the_flag() {
    for flag in [
        "--idle-timeout",
        "--max-lifetime",
        "--handshake-timeout",
        "--close-timeout",
        "--write-stall-timeout",
    ] {
        let err = refused(&[flag, "0.0005"]);
        has_all(&err, &[&format!("invalid {flag}"), "500µs", "1 ms"]);
    }
}

#[test]
fn descriptor_limit_errors_name_the_flags_and_the_numbers() {
    // Below the descriptors the process has open already.
    let err = refused(&["--fd-limit", "5"]);
    has_all(
        &err,
        &[
            "invalid --fd-limit",
            "RLIMIT_NOFILE 5 is too low",
            "open already",
            "set by --fd-limit 5",
            "raise the limit",
        ],
    );
    assert!(!err.contains("os error"), "{err}");
    // Enough for one loop, not for 200.
    let err = refused(&["--threads", "200", "--fd-limit", "300"]);
    has_all(
        &err,
        &[
            "invalid --threads",
            "200 event loops need at least",
            "RLIMIT_NOFILE 300",
            "--fd-limit 300",
            "run fewer loops",
            "or lower --fd-headroom",
        ],
    );
    assert!(!err.contains("listen"), "{err}");
    // A connection limit the budget cannot hold.
    let err = refused(&["--fd-limit", "200", "--max-connections", "5000"]);
    has_all(
        &err,
        &[
            "invalid --max-connections",
            "5000 does not fit",
            "lower --max-connections",
            "--fd-limit 200",
        ],
    );
    // Other configuration errors name the flag, not the field; the first one found wins over
    // a descriptor limit that would also fail.
    let err = refused(&["--max-message-size", "0", "--fd-limit", "5"]);
    has_all(
        &err,
        &["invalid --max-message-size: must be at least 1 byte"],
    );
    assert!(!err.contains("max_message_size"), "{err}");
    let err = refused(&["--proxy-protocol"]);
    has_all(&err, &["invalid --proxy-protocol", "needs --trusted-proxy"]);
}
