//! Replays every committed fuzz input (`fuzz/seeds/<target>/` and `fuzz/regressions/<target>/`)
//! through the same checking functions the libFuzzer targets run (`fuzz/checks/`), so that the
//! fuzzers' properties are checked by `cargo test` on stable Rust, without libFuzzer.
//!
//! Each target replays in a child process (this binary again, told which target by
//! [`CHILD`]), bounded as libFuzzer bounds a run: its address space to [`MEMORY_KIB`] (an
//! input that makes a check allocate more aborts that child, and the test names the input),
//! and each input to [`PER_INPUT`] (one that takes longer is killed and named). A missing seed
//! folder is an error, and so is a regression input missing from [`REGRESSIONS`] or a file in
//! `fuzz/regressions/` not listed there: a deleted regression cannot go unnoticed.
//!
//! Set `WSLOOP_REPLAY_CORPUS=1` to also replay libFuzzer's local corpus (`fuzz/corpus/<target>/`,
//! not committed, so then required), e.g. after a long fuzzing run.
//!
//! No libtest harness (`harness = false` in Cargo.toml): `main` is the parent, or the child.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]
#![allow(clippy::unreachable)] // `unreachable!()` marks what a check has ruled out

#[path = "../fuzz/checks/mod.rs"]
mod checks;
mod child_support;

use child_support::Proc;
use std::collections::BTreeSet;
use std::fs;
use std::panic;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// Set (to a target's name) in the environment of a child replaying that target.
const CHILD: &str = "WSLOOP_REPLAY_TARGET";
/// A child's address space, in KiB (`ulimit -v`): libFuzzer's default memory limit, 2 GiB.
const MEMORY_KIB: u64 = 2 << 20;
/// How long one input may run (debug build, loaded machine; each takes milliseconds).
const PER_INPUT: Duration = Duration::from_secs(10);

/// Every regression input committed, per target: each must still be there, and nothing else.
/// (A new one: `cp` it into `fuzz/regressions/<target>/` and name it here; see FUZZING.md.)
const REGRESSIONS: &[(&str, &[&str])] = &[
    (
        "connection",
        &[
            "message_capacity_doubles",
            "ping_flood_many_reads",
            "ping_flood_one_read",
        ],
    ),
    (
        "handshake",
        &[
            "absolute_target_with_an_unknown_scheme",
            "head_capacity_doubles",
            "host_not_an_authority",
        ],
    ),
    ("inflate", &["ping_payload_split_across_reads"]),
    (
        "tls",
        &[
            "a_nearly_full_socket_at_the_end",
            "bad_record_after_our_close_notify",
            "client_write_after_the_servers_alert",
            "handshake_failure_without_an_alert_then_input",
            "key_update_answers_past_the_clients_bound",
            "write_before_the_handshake",
        ],
    ),
    ("resp", &["integer_i64_min"]),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files directly in `dir`, sorted (dotfiles skipped). Panics if it cannot be read.
fn files(dir: &Path) -> Vec<PathBuf> {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: cannot be read: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

/// The inputs of `target`: its seeds (the folder must exist), its regressions (exactly those
/// listed in [`REGRESSIONS`]) and, with `WSLOOP_REPLAY_CORPUS` set, its local corpus (which
/// must exist then).
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = fuzz_dir();
    let mut all = files(&root.join("seeds").join(target));
    assert!(!all.is_empty(), "{target}: no seed input");
    let listed: BTreeSet<&str> = REGRESSIONS
        .iter()
        .filter(|(t, _)| *t == target)
        .flat_map(|(_, names)| names.iter().copied())
        .collect();
    let dir = root.join("regressions").join(target);
    let found: Vec<PathBuf> = if dir.exists() || !listed.is_empty() {
        files(&dir)
    } else {
        Vec::new()
    };
    let names: BTreeSet<String> = found
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let gone: Vec<&&str> = listed.iter().filter(|n| !names.contains(**n)).collect();
    assert!(
        gone.is_empty(),
        "{target}: regression inputs missing: {gone:?}"
    );
    let unlisted: Vec<&String> = names
        .iter()
        .filter(|n| !listed.contains(n.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "{target}: regression inputs not listed in REGRESSIONS (tests/fuzz_replay.rs): {unlisted:?}"
    );
    all.extend(found);
    if std::env::var_os("WSLOOP_REPLAY_CORPUS").is_some() {
        all.extend(files(&root.join("corpus").join(target)));
    }
    all
}

/// The child: replay `target`'s inputs, saying on stderr when each begins and how it ended.
fn child(target: &str) {
    let (_, check) = checks::TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let inputs = inputs(target);
    for path in &inputs {
        eprintln!("replay: begin {}", path.display());
        let data = match fs::read(path) {
            Ok(data) => data,
            // A running fuzzer replaces corpus files as it reduces them.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("replay: end {} gone", path.display());
                continue;
            }
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let ok = panic::catch_unwind(|| check(&data)).is_ok();
        eprintln!(
            "replay: end {} {}",
            path.display(),
            if ok { "ok" } else { "FAILED" }
        );
    }
    eprintln!("replay: done {}", inputs.len());
}

/// What a child's log says so far: the inputs that ended (and how), the one under way.
struct Progress {
    ended: Vec<(String, String)>,
    running: Option<String>,
    done: bool,
}

fn progress(log: &str) -> Progress {
    let mut p = Progress {
        ended: Vec::new(),
        running: None,
        done: false,
    };
    // Whole lines only: the child may be half-way through writing the last one.
    let whole = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
    for line in whole.lines() {
        if let Some(path) = line.strip_prefix("replay: begin ") {
            p.running = Some(path.to_string());
        } else if let Some(rest) = line.strip_prefix("replay: end ") {
            let (path, how) = rest.rsplit_once(' ').expect("an outcome");
            p.ended.push((path.to_string(), how.to_string()));
            p.running = None;
        } else if line.starts_with("replay: done ") {
            p.done = true;
        }
    }
    p
}

/// Replay `target` in a bounded child; the inputs replayed, or what went wrong.
fn replay_in_child(target: &str) -> Result<usize, String> {
    let exe = std::env::current_exe().expect("this test binary");
    let mut proc = Proc::spawn(
        &format!("replay-{target}"),
        Command::new("sh")
            .args([
                "-c",
                &format!("ulimit -v {MEMORY_KIB} && exec \"$0\""),
                exe.to_str().expect("a UTF-8 path"),
            ])
            .env(CHILD, target)
            .env("RUST_BACKTRACE", "0"),
    )
    .map_err(|e| format!("{target}: cannot start: {e}"))?;
    // (the input under way, since when)
    let mut current: Option<(String, Instant)> = None;
    loop {
        let p = progress(&proc.log());
        if proc.group.exited() {
            let status = proc.terminate(Duration::from_secs(1));
            let p = progress(&proc.log());
            let failed: Vec<&String> = p
                .ended
                .iter()
                .filter(|(_, how)| how == "FAILED")
                .map(|(path, _)| path)
                .collect();
            if let Some(path) = p.running {
                return Err(format!(
                    "{target}: {path} ended the replay ({status:?}; out of its {} MiB?):\n{}",
                    MEMORY_KIB >> 10,
                    proc.log_tail(20)
                ));
            }
            if !p.done || !status.is_some_and(|s| s.success()) {
                return Err(format!("{target}: {status:?}:\n{}", proc.log_tail(20)));
            }
            if !failed.is_empty() {
                return Err(format!(
                    "{target}: failing inputs: {failed:#?}\n{}",
                    proc.log()
                ));
            }
            return Ok(p.ended.len());
        }
        match (&p.running, &current) {
            (Some(path), Some((was, since))) if path == was => {
                if since.elapsed() > PER_INPUT {
                    proc.group.kill();
                    return Err(format!("{target}: {path} ran for more than {PER_INPUT:?}"));
                }
            }
            (Some(path), _) => current = Some((path.clone(), Instant::now())),
            (None, _) => current = None,
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn main() {
    if let Ok(target) = std::env::var(CHILD) {
        child(&target);
        return;
    }
    // Every target with listed regressions exists.
    for (target, _) in REGRESSIONS {
        assert!(
            checks::TARGETS.iter().any(|(t, _)| t == target),
            "REGRESSIONS names {target}, which is no fuzz target"
        );
    }
    let mut errors = Vec::new();
    for (target, _) in checks::TARGETS {
        match replay_in_child(target) {
            Ok(n) => println!("{target}: {n} inputs replayed"),
            Err(e) => errors.push(e),
        }
    }
    assert!(errors.is_empty(), "fuzz replay:\n{}", errors.join("\n"));
    println!("fuzz replay: ok");
}
