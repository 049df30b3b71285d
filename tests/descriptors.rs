//! Descriptor ownership, read from the source text of src/: every construct that makes a
//! descriptor (opens, binds, accepts, creates an epoll, an eventfd or a pipe, duplicates, adopts
//! or detaches one) must be in a module whose descriptors the fd ledger counts, so that a new
//! feature cannot open one that the fd audit does not know about (it would read as a leak, and
//! the fd budget would not leave room for it). The clippy lints of Cargo.toml's `[lints]`
//! (`disallowed_methods`, `disallowed_types`, lists in clippy.toml) refuse the same calls by
//! their resolved paths; this test also covers what a lint cannot: a module that allows those
//! lints, or `unsafe`, without being one of the few that may.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod source_support;

use source_support::{code_of, files, line_of, src, without_tests};
use std::fs;

/// Everything in src/ that can make a descriptor, or take one over: the text that names it,
/// and what it makes. Unit tests (`#[cfg(test)]`) are not read.
const CREATORS: &[(&str, &str)] = &[
    // Files and directories.
    ("File::open", "a file"),
    ("File::create", "a file"),
    ("File::options", "a file"),
    ("OpenOptions", "a file"),
    ("fs::read(", "a file, for one call"),
    ("fs::read_to_string(", "a file, for one call"),
    ("read_dir(", "a directory listing"),
    // Sockets.
    ("Socket::new", "a socket"),
    ("Socket::pair", "two sockets"),
    ("socketpair", "two sockets"),
    ("libc::socket", "a socket"),
    ("TcpListener::bind", "a listener"),
    ("TcpStream::connect", "a socket"),
    ("UdpSocket::bind", "a socket"),
    ("UnixStream::", "a socket"),
    ("UnixListener::", "a socket"),
    ("UnixDatagram::", "a socket"),
    (".accept(", "an accepted connection"),
    ("accept4", "an accepted connection"),
    // The loop's own kinds: epoll, eventfd, pipes and the like.
    ("Poll::new", "an epoll"),
    ("epoll_create", "an epoll"),
    ("Waker::new", "an eventfd"),
    ("eventfd", "an eventfd"),
    ("pipe(", "a pipe"),
    ("pipe2(", "a pipe"),
    ("pipe::", "a pipe"),
    ("Signals::new", "a self-pipe for signals"),
    ("signalfd", "a signalfd"),
    ("timerfd", "a timerfd"),
    ("memfd_create", "a memfd"),
    ("inotify_init", "an inotify descriptor"),
    ("Command::new", "a child process's pipes"),
    // Duplicating, adopting, detaching.
    ("try_clone", "a duplicate"),
    ("dup(", "a duplicate"),
    ("dup2(", "a duplicate"),
    ("dup3(", "a duplicate"),
    ("F_DUPFD", "a duplicate"),
    ("from_std(", "a socket adopted from std"),
    ("from_raw_fd", "an adopted raw descriptor"),
    ("into_raw_fd", "a descriptor detached from its owner"),
    ("OwnedFd", "a raw descriptor owner"),
    ("libc::open", "a file"),
    // The redis crate opens (and resolves the host of) its own sockets.
    ("get_connection", "a socket the redis crate opens"),
];

/// How the fd ledger (src/ledger.rs) knows about a descriptor opened in an allowed place.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Counted {
    /// The file stores the loop's new count with `fds_changed` after opening (src/server/core.rs
    /// `owned_fds`: epoll and waker, listeners, connections, the spare).
    FdsChanged,
    /// Open only for the length of one call, and left out of the count (`sys::open_fds` does not
    /// count its own directory; the audit keeps the lowest of several readings).
    Transient,
    /// Opened before any loop starts: part of the base the ledger measures at start.
    Base,
    /// The Redis bridge's sockets: counted with `bridge_fd(true)` once connected (the call in
    /// flight, with its name resolution, bracketed by `moving`/`settled`), uncounted with
    /// `bridge_fd(false)` before they close; kept out of the connections' budget by
    /// `bridge_reserve`.
    Bridge,
}

/// Where each kind of descriptor may be opened, and how the ledger counts it there.
const ALLOWED: &[(&str, &str, Counted)] = &[
    // The libc wrapper reads /proc/self/fd and /proc/sys.
    ("sys.rs", "read_dir(", Counted::Transient),
    ("sys.rs", "fs::read_to_string(", Counted::Transient),
    // ... and the TLS certificates and keys, at start-up and on a reload (a regular file, open
    // for one read).
    ("sys.rs", "OpenOptions", Counted::Transient),
    // Listeners (bound here, counted by `Server::add_listener`), accepted connections (counted
    // by `insert_conn`, or closed before accept returns: refused or shed), the spare for EMFILE.
    ("server/accept.rs", "Socket::new", Counted::FdsChanged),
    ("server/accept.rs", "from_std(", Counted::FdsChanged),
    ("server/accept.rs", ".accept(", Counted::FdsChanged),
    ("server/accept.rs", "File::open", Counted::FdsChanged),
    // The loop's epoll, the registry's duplicate of it and the waker's eventfd, measured into
    // `fixed_fds` and counted when the server is built.
    ("server/event_loop.rs", "Poll::new", Counted::FdsChanged),
    ("server/event_loop.rs", "Waker::new", Counted::FdsChanged),
    ("server/event_loop.rs", "try_clone", Counted::FdsChanged),
    // The Redis bridge's connections: the publisher's and the subscriber's, opened by the
    // bridge itself (it reads them with its own parser); the one asking a cluster node for
    // CLUSTER SLOTS, opened by the redis crate.
    ("bridge.rs", "get_connection", Counted::Bridge),
    ("bridge.rs", "TcpStream::connect", Counted::Bridge),
    // The binary's signal pipe, opened before its loops start.
    ("main.rs", "Signals::new", Counted::Base),
];

/// Files that may allow `clippy::disallowed_methods` or `clippy::disallowed_types` outside their
/// unit tests: those of [`ALLOWED`], the transport (it owns a connection's socket) and the
/// loop's state (it holds the listeners and the spare that accept.rs opens).
const LINT_EXCEPTIONS: &[&str] = &[
    "sys.rs",
    "io/transport.rs",
    "server/accept.rs",
    "server/core.rs",
    "server/event_loop.rs",
    "main.rs",
    "bridge.rs",
];

/// (file relative to src/, its code without comments, string contents and unit tests).
fn sources() -> Vec<(String, String)> {
    files()
        .into_iter()
        .map(|f| {
            let text = fs::read_to_string(src().join(&f)).expect("read a source file");
            let code = without_tests(&code_of(&text));
            (f, code)
        })
        .collect()
}

/// Every place in `sources` that can make a descriptor: (file, line, creator, what it makes).
fn openings(sources: &[(String, String)]) -> Vec<(String, usize, &'static str, &'static str)> {
    let mut found = Vec::new();
    for (file, code) in sources {
        for (creator, what) in CREATORS {
            for (at, _) in code.match_indices(creator) {
                found.push((file.clone(), line_of(code, at), *creator, *what));
            }
        }
    }
    found.sort();
    found
}

/// The openings outside the places [`ALLOWED`] names, as lines of a report.
fn unaccounted(sources: &[(String, String)]) -> Vec<String> {
    openings(sources)
        .into_iter()
        .filter(|(file, _, creator, _)| !ALLOWED.iter().any(|(f, c, _)| f == file && c == creator))
        .map(|(file, line, creator, what)| format!("src/{file}:{line}: `{creator}` ({what})"))
        .collect()
}

#[test]
fn every_descriptor_is_opened_where_the_fd_ledger_counts_it() {
    let sources = sources();
    let found = openings(&sources);
    // The scan sees the openings that are there (else it proves nothing).
    for (file, creator, _) in ALLOWED {
        assert!(
            found.iter().any(|(f, _, c, _)| f == file && c == creator),
            "ALLOWED names `{creator}` in src/{file}, which no longer has it: remove the entry"
        );
    }
    let wrong = unaccounted(&sources);
    assert!(
        wrong.is_empty(),
        "descriptors opened where the fd ledger does not count them:\n{}\n\
         Open them in src/server/accept.rs (connections, listeners, the spare) or src/sys.rs \
         (a transient read), or count them in the ledger (`fds_changed`, `owned_fds`) and add \
         the place to ALLOWED in tests/descriptors.rs with how it is counted.",
        wrong.join("\n")
    );
}

#[test]
fn the_allowed_places_count_what_they_open() {
    for (file, creator, counted) in ALLOWED {
        if *counted == Counted::FdsChanged {
            let text = fs::read_to_string(src().join(file)).unwrap();
            assert!(
                code_of(&text).contains("fds_changed()"),
                "src/{file} opens `{creator}` and says the ledger counts it, but never calls \
                 fds_changed()"
            );
        }
        if *counted == Counted::Bridge {
            let code = code_of(&fs::read_to_string(src().join(file)).unwrap());
            for call in [
                "bridge_fd(true)",
                "bridge_fd(false)",
                "moving()",
                "settled()",
            ] {
                assert!(
                    code.contains(call),
                    "src/{file} opens the bridge's sockets but never calls {call}"
                );
            }
        }
    }
}

#[test]
fn only_the_descriptor_modules_allow_the_descriptor_lints() {
    let mut wrong = Vec::new();
    for (file, code) in sources() {
        for lint in ["disallowed_methods", "disallowed_types"] {
            for (at, _) in code.match_indices(lint) {
                if !LINT_EXCEPTIONS.contains(&file.as_str()) {
                    wrong.push(format!("src/{file}:{}: {lint}", line_of(&code, at)));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "modules allowing the descriptor lints (only {LINT_EXCEPTIONS:?} may):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn unsafe_code_is_allowed_on_the_sys_module_alone() {
    let mut allows = Vec::new();
    let mut blocks = Vec::new();
    for (file, code) in sources() {
        for (at, _) in code.match_indices("allow(unsafe_code)") {
            let next = code[at..].lines().nth(1).unwrap_or("").trim().to_string();
            allows.push((file.clone(), next));
        }
        if file != "sys.rs" && code.contains("unsafe ") {
            blocks.push(file);
        }
    }
    assert_eq!(
        allows,
        [("lib.rs".to_string(), "mod sys;".to_string())],
        "`unsafe_code` may be allowed once, on `mod sys` in lib.rs"
    );
    assert!(blocks.is_empty(), "`unsafe` outside src/sys.rs: {blocks:?}");
    let lib = code_of(&fs::read_to_string(src().join("lib.rs")).unwrap());
    assert!(
        lib.contains("#![deny(unsafe_code)]"),
        "lib.rs denies unsafe_code"
    );
    assert!(
        lib.contains("#![deny(missing_docs)]"),
        "lib.rs denies missing_docs"
    );
}

/// The checker itself: a `File::open` added to the loop's WebSocket module is reported with its
/// line, one inside unit tests or in a comment is not, and the same call in accept.rs is allowed.
#[test]
fn the_scan_reports_an_opening_added_to_another_module() {
    let ws = "use std::fs::File;\n\
              // File::open in a comment\n\
              fn on_message() {\n    let log = File::open(\"/tmp/x\");\n}\n\
              #[cfg(test)]\nmod tests {\n    fn t() { let _ = std::fs::File::open(\"\"); }\n}\n";
    let accept = "fn spare() { let _ = File::open(\"/dev/null\"); }\n";
    let sources = [
        ("server/ws.rs".to_string(), without_tests(&code_of(ws))),
        (
            "server/accept.rs".to_string(),
            without_tests(&code_of(accept)),
        ),
    ];
    assert_eq!(
        unaccounted(&sources),
        ["src/server/ws.rs:4: `File::open` (a file)"]
    );
}
