//! Child processes for the tests that run other programs (the `wsloop` binary, nginx, the
//! interop clients, a browser): each child leads its own process group, which is killed (and
//! the child reaped) when its guard is dropped; its output is drained in a thread, so that it
//! never blocks on a full pipe, into a log the test can read at any time; every wait is
//! bounded.
//!
//! Included by the test files that use it (`mod child_support;`, declared before
//! `mod attack_support;`, which uses it too).
#![allow(dead_code)]

use rustix::process::{kill_process, kill_process_group, waitid, Pid, Signal};
use rustix::process::{WaitId, WaitIdOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bound on reading the rest of a child's output once it has exited (or was killed).
pub const DRAIN_BOUND: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Output

/// A pipe read to its end in a thread, into a log readable at any time.
pub struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Drain {
    /// Read `r` in a thread named `{name}-drain` until its end (or an error).
    pub fn start(name: &str, mut r: impl Read + Send + 'static) -> Drain {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let (tx, done) = mpsc::channel();
        thread::Builder::new()
            .name(format!("{name}-drain"))
            .spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match r.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => sink
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = tx.send(());
            })
            .expect("start a drain thread");
        Drain { buf, done }
    }

    /// Everything read so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Wait (at most `bound`) for the end of the pipe; everything read.
    pub fn finish(&self, bound: Duration) -> String {
        let _ = self.done.recv_timeout(bound);
        self.text()
    }

    /// The last `lines` lines read so far.
    pub fn tail(&self, lines: usize) -> String {
        let text = self.text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Process groups

/// A child leading its own process group; the group is killed (and the child reaped) on drop.
pub struct Group {
    pub child: Child,
    /// Set once the child is reaped.
    pub status: Option<ExitStatus>,
}

impl Group {
    /// Spawn `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut Command) -> io::Result<Group> {
        let child = cmd.process_group(0).spawn()?;
        Ok(Group {
            child,
            status: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the child has exited; it is not reaped, so its group id stays reserved and
    /// [`Group::kill`] still reaches stray grandchildren, never another process.
    pub fn exited(&self) -> bool {
        if self.status.is_some() {
            return true;
        }
        let Some(pid) = self.pid() else {
            return true;
        };
        // WNOWAIT: the child stays unreaped.
        let query = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        matches!(waitid(WaitId::Pid(pid), query), Ok(Some(_)))
    }

    /// The child's pid (`None` only for a pid no process can have).
    fn pid(&self) -> Option<Pid> {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Poll (every 20 ms, at most `bound`) until the child has exited; whether it did.
    pub fn wait_exited(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        while !self.exited() {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Send `signal` to the child alone (not its group), unless it is reaped already.
    pub fn signal(&self, signal: Signal) {
        if let (None, Some(pid)) = (self.status, self.pid()) {
            // Our own child, not reaped: its pid is still its own.
            let _ = kill_process(pid, signal);
        }
    }

    /// Kill the whole group (the child and whatever it started), then reap the child; its
    /// status.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(pid) = self.pid() {
                // The process group our unreaped child leads.
                let _ = kill_process_group(pid, Signal::KILL);
            }
            self.status = self.child.wait().ok();
        }
        self.status
    }

    /// SIGTERM to the child, then a bounded wait for its exit. Its exit status if it exited
    /// within `bound`; otherwise `None`, after the group was killed.
    pub fn terminate(&mut self, bound: Duration) -> Option<ExitStatus> {
        self.signal(Signal::TERM);
        let exited = self.wait_exited(bound);
        let status = self.kill();
        status.filter(|_| exited)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A long-running child (a server) with its stderr drained into a log; stdin and stdout are
/// null. Dropped while running, its group is killed.
pub struct Proc {
    pub group: Group,
    pub name: String,
    log: Drain,
}

impl Proc {
    /// Spawn `cmd` as `name`, leading its own process group.
    pub fn spawn(name: &str, cmd: &mut Command) -> io::Result<Proc> {
        let mut group = Group::spawn(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )?;
        let log = Drain::start(name, group.child.stderr.take().expect("piped stderr"));
        Ok(Proc {
            group,
            name: name.to_string(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.group.id()
    }

    /// Whether the child has not been reaped yet.
    pub fn running(&self) -> bool {
        self.group.status.is_none()
    }

    /// Everything the child logged so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.log.tail(lines)
    }

    /// Poll (every 10 ms, at most `bound`) until `found` finds what it looks for, given the log
    /// so far. If the child exits first: its status, once it is reaped and its log complete.
    /// Panics, with the log, when `bound` has passed.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        bound: Duration,
        mut found: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, Option<ExitStatus>> {
        let deadline = Instant::now() + bound;
        loop {
            let log = self.log();
            if let Some(t) = found(&log) {
                return Ok(t);
            }
            if self.group.exited() {
                let status = self.group.kill();
                self.log.finish(DRAIN_BOUND);
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what} not within {bound:?}:\n{log}",
                self.name
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, a bounded wait for the exit (then the group killed), and the rest of the log
    /// read (bounded). The exit status if the child exited within `bound`.
    pub fn terminate(&mut self, bound: Duration) -> Option<ExitStatus> {
        let status = self.group.terminate(bound);
        self.log.finish(DRAIN_BOUND);
        status
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptors

/// The descriptors of process `pid` (`self` for this one), with what each refers to
/// (`socket:[123]`, `pipe:[456]`, `/dev/null`, ...); a descriptor closed while the table is read
/// is left out.
pub fn fd_table(pid: &str) -> io::Result<Vec<(u32, String)>> {
    let mut table = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(entry.path()) {
            table.push((fd, target.to_string_lossy().into_owned()));
        }
    }
    table.sort();
    Ok(table)
}

/// Whether a descriptor target names one kernel object (a pipe or socket, by inode), so that
/// the same target in two processes is the same object, shared by inheritance.
fn names_one_object(target: &str) -> bool {
    target.starts_with("pipe:[") || target.starts_with("socket:[")
}

/// The pipes and sockets child `pid` holds beyond its standard input, output and error that
/// this test process holds too and did not itself inherit from its parent (cargo, or whatever
/// ran the tests): descriptors the suite leaked into the child. A pipe or socket both hold is
/// one object, which only inheritance shares. What this process inherited from outside is
/// passed on to every child it spawns (std's `Command` closes nothing it did not open), and is
/// not the suite's doing: it is left out.
pub fn leaked_into(pid: u32) -> Vec<String> {
    let Ok(child) = fd_table(&pid.to_string()) else {
        return Vec::new(); // exited: a test's own assertions say why
    };
    let ours = fd_table("self").expect("this process's descriptors");
    let outside: Vec<String> = fd_table(&std::os::unix::process::parent_id().to_string())
        .unwrap_or_default()
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    child
        .into_iter()
        .filter(|(fd, t)| *fd > 2 && names_one_object(t))
        .filter(|(_, t)| ours.iter().any(|(_, o)| o == t) && !outside.contains(t))
        .map(|(fd, t)| format!("{fd} -> {t}"))
        .collect()
}

/// Panics, naming them, if child `name` (`pid`) holds descriptors leaked from the suite (see
/// [`leaked_into`]).
pub fn assert_nothing_leaked_into(name: &str, pid: u32) {
    let leaked = leaked_into(pid);
    assert!(
        leaked.is_empty(),
        "{name} (pid {pid}) inherited descriptors of the test process: {leaked:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Short runs

/// What a bounded run of a command printed, and how it ended.
pub struct Run {
    /// `None`: the command did not finish within its bound and was killed with its group.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Run `cmd` (stdin as the caller set it) with its output piped, in its own process group,
/// bounded by `bound`: past it the group is killed. Then the group is killed in any case (stray
/// grandchildren) and the output read (bounded). An error only if it cannot start.
pub fn run_bounded(cmd: &mut Command, bound: Duration) -> io::Result<Run> {
    let mut group = Group::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?;
    let stdout = Drain::start("stdout", group.child.stdout.take().unwrap());
    let stderr = Drain::start("stderr", group.child.stderr.take().unwrap());
    let finished = group.wait_exited(bound);
    let status = group.kill().filter(|_| finished);
    Ok(Run {
        status,
        stdout: stdout.finish(DRAIN_BOUND),
        stderr: stderr.finish(DRAIN_BOUND),
    })
}

// ---------------------------------------------------------------------------------------------
// Tools and files

/// Whether the tests run under CI (`CI` set, as CI services and `.ci/run` do, to anything but
/// `false`, `0` or nothing): there a missing tool is an error, not a skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
}

/// A tool is missing: with `CI` set the test fails, otherwise it prints a note and is skipped
/// (`suite`: which tests, in the note).
pub fn missing(suite: &str, what: &str, why: &str, install: &str) {
    if under_ci() {
        panic!("{what} is not available ({why}) and CI is set: install it with `{install}`");
    }
    // Straight to stderr, past the test harness's capture: the note shows in a passing run.
    let _ = writeln!(
        io::stderr(),
        "note: {what} is not available ({why}); skipping this {suite} test (`{install}`)"
    );
}

/// A fresh temporary folder, `wsloop-{what}-{pid}-{nanos}`, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("wsloop-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a temporary folder");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
