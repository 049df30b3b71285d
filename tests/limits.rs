//! The README's Limits table against the `wsloop` binary (a child process, see
//! `tests/attack_support`): every default `--help` shows is `Config::default()`'s and the
//! table's; accepts per turn; the listen backlog and its cap (`net.core.somaxconn`); the soft
//! `RLIMIT_NOFILE` raised to the hard limit; the fd budget and the reserve kept for answering
//! refused clients.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[allow(dead_code)]
mod attack_support;
mod child_support;
mod common;
mod rlimit_support;

use attack_support::*;
use child_support::{missing, run_bounded};
use common::{close_frame, read_frame, OP_CLOSE};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;
use wsloop::config::{ForwardedHeader, MAX_FD_HEADROOM, MAX_HEADERS_CAP};
use wsloop::{BackpressurePolicy, Compression, Config, RedisConfig};

// ---------------------------------------------------------------------------------------------
// Defaults: --help, Config::default(), the README

/// Every `--flag` of `wsloop --help`, with the default it shows (`[default: ...]`), if any.
fn help_defaults() -> BTreeMap<String, Option<String>> {
    let run = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_wsloop"))
            .arg("--help")
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    )
    .expect("run wsloop --help");
    assert!(run.status.is_some_and(|s| s.success()), "{}", run.stderr);
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in run.stdout.lines() {
        let t = line.trim();
        if let Some(flag) = t
            .split([' ', ','])
            .find(|w| w.starts_with("--") && w.len() > 2)
            .filter(|_| t.starts_with('-'))
        {
            current = Some(flag.to_string());
            flags.insert(flag.to_string(), None);
        } else if let Some(d) = t.strip_prefix("[default: ") {
            let flag = current.clone().expect("a default before any flag");
            flags.insert(flag, Some(d.trim_end_matches(']').to_string()));
        }
    }
    flags
}

/// What a default is, comparably: a number (durations in seconds) or a word.
#[derive(Debug, PartialEq)]
enum Value {
    Num(f64),
    Word(&'static str),
}

fn secs(d: Duration) -> Value {
    Value::Num(d.as_secs_f64())
}

fn num(n: impl Into<f64>) -> Value {
    Value::Num(n.into())
}

/// The flags with a default, and the value each must show: `Config::default()`'s.
fn config_defaults() -> Vec<(&'static str, Value)> {
    let c = Config::default();
    vec![
        ("--listen", Value::Word("127.0.0.1:9001")), // the binary's own
        ("--max-message-size", num(c.max_message_size as f64)),
        ("--max-header-bytes", num(c.max_header_bytes as f64)),
        ("--max-headers", num(c.max_headers as f64)),
        ("--handshake-timeout", secs(c.handshake_timeout)),
        ("--idle-timeout", secs(c.idle_timeout)),
        ("--close-timeout", secs(c.close_timeout)),
        ("--shutdown-timeout", secs(c.shutdown_timeout)),
        ("--max-connections", num(c.max_connections as f64)),
        ("--max-connections-per-ip", num(c.max_connections_per_ip)),
        ("--connection-rate-per-ip", num(c.connection_rate_per_ip)),
        ("--connection-burst-per-ip", num(c.connection_burst_per_ip)),
        ("--ipv6-prefix", num(c.ipv6_prefix_len)),
        ("--socket-send-buffer", num(c.socket_send_buffer as f64)),
        (
            "--socket-receive-buffer",
            num(c.socket_receive_buffer as f64),
        ),
        ("--memory-budget", num(c.memory_budget as f64)),
        ("--fd-headroom", num(c.fd_headroom as f64)),
        ("--listen-backlog", num(c.listen_backlog)),
        ("--accepts-per-turn", num(c.accepts_per_turn as f64)),
        ("--max-backpressure", num(c.max_backpressure as f64)),
        ("--tls-max-handshakes", num(c.tls_max_handshakes as f64)),
        (
            "--backpressure-policy",
            Value::Word(match c.backpressure_policy {
                BackpressurePolicy::Close => "close",
                BackpressurePolicy::Drop => "drop",
            }),
        ),
        (
            "--compression",
            Value::Word(match c.compression {
                Compression::Off => "off",
                Compression::Shared => "shared",
                Compression::Dedicated => "dedicated",
                _ => "(unknown)",
            }),
        ),
        (
            "--compression-threshold",
            num(c.compression_threshold as f64),
        ),
        (
            "--compression-window-bits",
            num(c.compression_window_bits as f64),
        ),
        (
            "--compression-mem-level",
            num(c.compression_mem_level as f64),
        ),
        ("--compression-budget", num(c.compression_budget as f64)),
        ("--write-stall-timeout", secs(c.write_stall_timeout)),
        ("--max-lifetime", secs(c.max_lifetime)),
        ("--threads", num(c.threads as f64)),
        ("--endpoint-rate", num(c.endpoint_rate)),
        ("--audit-interval", secs(c.audit_interval)),
        ("--stall-threshold", secs(c.stall_threshold)),
        (
            "--redis-prefix",
            Value::Word(Box::leak(RedisConfig::default().prefix.into_boxed_str())),
        ),
        (
            "--forwarded-header",
            Value::Word(match c.forwarded_header {
                ForwardedHeader::XForwardedFor => "x-forwarded-for",
                ForwardedHeader::Forwarded => "forwarded",
            }),
        ),
    ]
}

#[test]
fn the_binarys_defaults_are_config_defaults() {
    let help = help_defaults();
    let expected = config_defaults();
    for (flag, want) in &expected {
        let shown = help
            .get(*flag)
            .unwrap_or_else(|| panic!("{flag} missing from --help"))
            .as_deref()
            .unwrap_or_else(|| panic!("{flag} shows no default"));
        let got = match want {
            Value::Num(_) => Value::Num(
                shown
                    .parse()
                    .unwrap_or_else(|_| panic!("{flag}: default {shown:?}")),
            ),
            Value::Word(w) => Value::Word(if shown == *w { w } else { "(differs)" }),
        };
        assert_eq!(&got, want, "{flag}: --help says {shown:?}");
    }
    // Every default --help shows is one of those: a new flag's default is checked too.
    let unchecked: Vec<&String> = help
        .iter()
        .filter(|(f, d)| d.is_some() && !expected.iter().any(|(e, _)| e == f))
        .map(|(f, _)| f)
        .collect();
    assert!(unchecked.is_empty(), "defaults not compared: {unchecked:?}");
    // The flags without a default leave the library's default in force.
    let c = Config::default();
    for (flag, absent_means, config) in [
        ("--fd-limit", "raise the soft limit", c.raise_fd_limit),
        ("--metrics-on-ws", "no metrics on ws", !c.serve_metrics),
        (
            "--require-origin",
            "origin optional",
            c.allow_missing_origin,
        ),
        ("--proxy-protocol", "no PROXY header", !c.proxy_protocol),
        (
            "--allowed-origin",
            "every origin",
            c.allowed_origins.is_empty(),
        ),
        ("--trusted-proxy", "no proxy", c.trusted_proxies.is_empty()),
    ] {
        assert_eq!(help.get(flag), Some(&None), "{flag}");
        assert!(
            config,
            "without {flag} ({absent_means}), as Config::default()"
        );
    }
}

/// The rows of the README's Limits table: (limit, default, flag) cells, backticks removed.
fn readme_limits() -> Vec<(String, String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("| limit | default | flag | what happens at the limit |")
        .expect("the Limits table");
    readme[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<String> = l.split('|').map(|c| c.trim().replace('`', "")).collect();
            (cells[1].clone(), cells[2].clone(), cells[3].clone())
        })
        .collect()
}

/// The quantity a default cell starts with, in base units (bytes, seconds, a count): "16 KiB",
/// "10 s, absolute ...", "100 ms", "65,536 commands", "off ...", "derived ...".
fn quantity(cell: &str) -> f64 {
    if cell.starts_with("off") || cell.starts_with("derived") {
        return 0.0;
    }
    let mut words = cell.split(' ').map(|w| w.trim_end_matches(','));
    let first = words.next().unwrap_or_default().replace(',', "");
    let n: f64 = first
        .parse()
        .unwrap_or_else(|_| panic!("no quantity at the start of {cell:?}"));
    match words.next() {
        Some("KiB") => n * 1024.0,
        Some("MiB") => n * 1024.0 * 1024.0,
        Some("s") => n,
        Some("ms") => n / 1000.0,
        _ => n,
    }
}

#[test]
fn the_readme_limits_table_shows_the_defaults() {
    let c = Config::default();
    let by_flag = config_defaults();
    let rows = readme_limits();
    assert!(rows.len() >= 20, "{rows:?}");
    for (limit, default, flag) in &rows {
        let f = flag.split([' ', ',']).find(|w| w.starts_with("--"));
        let want: Vec<f64> = match (f, limit.as_str()) {
            (Some("--fd-limit"), _) => {
                assert!(
                    c.raise_fd_limit && default.contains("raised to the hard limit"),
                    "{limit}: {default:?}"
                );
                continue;
            }
            (Some("--connection-rate-per-ip"), _) => {
                assert!(default.contains("burst: the rate"), "{default:?}");
                assert_eq!(c.connection_burst_per_ip, 0, "0: the rate");
                vec![c.connection_rate_per_ip as f64]
            }
            (Some("--max-headers"), _) => {
                assert!(default.contains(&format!("at most {MAX_HEADERS_CAP}")));
                vec![c.max_headers as f64]
            }
            (Some("--ipv6-prefix"), _) => {
                assert!(default.contains("an IPv6 /64"), "{default:?}");
                assert_eq!(c.ipv6_prefix_len, 64);
                continue;
            }
            (Some("--memory-budget"), "TLS state in the memory budget") => {
                let per = wsloop::memory::TLS_CONNECTION_BYTES;
                assert!(
                    default.starts_with(&format!("{} KiB per TLS connection", per >> 10))
                        && default.ends_with("at most half the budget"),
                    "{default:?}"
                );
                continue;
            }
            (Some("--memory-budget"), _) => {
                assert!(
                    default.starts_with("half the cgroup's memory limit"),
                    "{default:?}"
                );
                assert_eq!(c.memory_budget, 0, "0: derived");
                continue;
            }
            (Some("--socket-send-buffer"), _) => {
                assert!(
                    default.starts_with("the kernel's auto-tuning"),
                    "{default:?}"
                );
                assert_eq!(c.socket_send_buffer, 0, "0: the kernel decides");
                continue;
            }
            (Some("--socket-receive-buffer"), _) => {
                assert!(
                    default.starts_with("the kernel's auto-tuning"),
                    "{default:?}"
                );
                assert_eq!(c.socket_receive_buffer, 0, "0: the kernel decides");
                continue;
            }
            (Some("--compression"), _) => {
                assert!(default.starts_with("off"), "{default:?}");
                assert_eq!(c.compression, Compression::Off);
                continue;
            }
            (Some("--tls-cert"), _) => {
                assert!(default.starts_with("off"), "{default:?}");
                assert_eq!(c.tls, None);
                continue;
            }
            (Some("--tls-sni"), _) => {
                assert!(default.starts_with("none"), "{default:?}");
                let tls = wsloop::TlsConfig::new("cert.pem", "key.pem");
                assert!(tls.sni.is_empty());
                continue;
            }
            (None, "TLS certificate reload") => {
                assert!(default.starts_with("on SIGHUP"), "{default:?}");
                continue;
            }
            (Some("--fd-headroom"), _) => {
                assert_eq!(MAX_FD_HEADROOM, 1 << 30);
                assert!(default.contains("at most 2^30"), "{default:?}");
                vec![c.fd_headroom as f64]
            }
            (Some(f), _) => {
                let (_, v) = by_flag
                    .iter()
                    .find(|(flag, _)| *flag == f)
                    .unwrap_or_else(|| panic!("{limit}: {f} has no default to compare"));
                match v {
                    Value::Num(n) => vec![*n],
                    Value::Word(w) => panic!("{limit}: {w}"),
                }
            }
            (None, "receive buffer") => vec![c.recv_buffer_size as f64],
            (None, "refused clients held") => {
                assert!(default.starts_with("at most a second each"), "{default:?}");
                continue;
            }
            (None, "PROXY protocol v2 header") => vec![wsloop::protocol::proxy::V2_MAX as f64],
            (None, "topics per connection") => vec![c.max_topics_per_connection as f64],
            (None, "topic name") => vec![wsloop::topics::MAX_TOPIC_LEN as f64],
            (None, "publications held in a turn") => {
                let pubs = default.split(", ").nth(1).map(quantity);
                assert_eq!(pubs, Some(wsloop::topics::MAX_PUBS as f64), "{default:?}");
                let framed = default.split(" or ").nth(1).map(quantity);
                assert_eq!(
                    framed,
                    Some(wsloop::topics::MAX_FRAMED as f64),
                    "{default:?}"
                );
                vec![wsloop::topics::MAX_OWED as f64]
            }
            (None, "publications forwarded to another loop, not yet taken") => {
                vec![wsloop::topics::MAX_FORWARDED as f64]
            }
            (None, l) if l.starts_with("commands queued by LoopHandle") => {
                let bytes = default.split(", ").nth(1).map(quantity);
                assert_eq!(bytes, Some(c.handle_queue_bytes as f64), "{default:?}");
                vec![c.handle_queue_commands as f64]
            }
            (None, "Redis bridge's outgoing queue") => {
                let r = RedisConfig::default();
                let bytes = default.split(", ").nth(1).map(quantity);
                assert_eq!(bytes, Some(r.queue_bytes as f64), "{default:?}");
                vec![r.queue_messages as f64]
            }
            (None, "Redis bridge's reconnection backoff") => {
                // 100 ms doubling to 2 s (src/bridge.rs BACKOFF_MIN, BACKOFF_MAX).
                assert!(default.contains("doubling to 2 s"), "{default:?}");
                vec![0.1]
            }
            (None, l) if l.starts_with("primaries of a Redis Cluster the bridge connects to") => {
                // src/broker.rs MAX_NODES; a publisher's and a subscriber's socket for each.
                assert!(default.contains("32 descriptors"), "{default:?}");
                vec![16.0]
            }
            (None, "publishers whose sequence numbers the Redis bridge follows") => {
                // src/broker.rs MAX_SEQUENCES.
                vec![65_536.0]
            }
            // src/io/tls_session.rs, WRITE_MAX (crate-private): src/io/transport.rs's unit test
            // `tls_holds_at_most_one_write_for_a_peer_that_does_not_read` proves it.
            (None, "TLS output held per connection") => vec![32768.0],
            // src/io/tls_session.rs, MAX_HANDSHAKE_INPUT (crate-private): tests/tls_edges.rs's
            // `a_client_hello_over_16_kib_is_refused_at_once` proves it.
            (None, "TLS handshake input") => vec![16384.0],
            (None, "reads per turn") => {
                // Fixed in the loop: 4 full reads of the receive buffer.
                assert!(
                    default.contains(&format!("({} KiB)", 4 * c.recv_buffer_size / 1024)),
                    "{default:?}"
                );
                vec![4.0]
            }
            (None, l) => panic!("the Limits row {l:?} maps to no default"),
        };
        assert_eq!(vec![quantity(default)], want, "{limit}: {default:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Accepting

/// A raw client that sent an upgrade request (answered later).
fn asking(w: &Wsloop) -> TcpStream {
    let mut s = connect(w.addr, &Opts::default()).expect("connect");
    s.write_all(&upgrade_request(w.addr)).unwrap();
    s
}

/// Read the 101 on each client, then close each cleanly.
fn upgraded_then_closed(clients: Vec<TcpStream>) {
    for (i, mut s) in clients.into_iter().enumerate() {
        let head = read_head(&mut s).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert!(head.starts_with("HTTP/1.1 101 "), "client {i}: {head:?}");
        s.write_all(&close_frame(1000, "")).unwrap();
        let f = read_frame(&mut s);
        assert_eq!(f.opcode, OP_CLOSE, "client {i}");
        let (end, _) = read_answer(&mut s, IO_TIMEOUT);
        assert!(matches!(end, Answer::Eof(ref b) if b.is_empty()), "{end:?}");
    }
}

#[test]
fn accepts_per_turn_spreads_a_backlog_over_turns_and_loses_no_one() {
    const N: usize = 64;
    const PER_TURN: usize = 4;
    let w = Wsloop::spawn("accepts-per-turn", &["--accepts-per-turn", "4"]);
    let m0 = w.metrics();
    // Stopped, the child cannot accept: every client waits in its backlog.
    w.freeze();
    let clients: Vec<TcpStream> = (0..N).map(|_| asking(&w)).collect();
    w.thaw();
    let m1 = {
        // Everyone is answered: no edge lost when a turn's budget ran out.
        let clients = clients;
        let m = w.wait_until("every client upgraded", |m| {
            m.get("wsloop_connections{state=\"open\"}") == N as f64
        });
        upgraded_then_closed(clients);
        m
    };
    // Accepting N waiting clients 4 at a time takes N / 4 turns at least (with the limit
    // ignored, the backlog goes in one turn and the requests in the next: a few turns).
    let turns = m1.get("wsloop_loop_turns_total") - m0.get("wsloop_loop_turns_total");
    assert!(
        turns >= (N / PER_TURN) as f64,
        "{turns} turns for {N} clients"
    );
    let (_, m2) = quiet_since(&w, &m0, &[("peer_closed", N as u64)]);
    assert_eq!(
        m2.get("wsloop_connections_accepted_total") - m0.get("wsloop_connections_accepted_total"),
        // The clients, and the metrics requests between (each a connection of its own).
        N as f64 + m2.closed("http_answered") as f64 - m0.closed("http_answered") as f64
    );
    println!("accepts per turn: {N} waiting clients accepted over {turns} turns, 4 a turn at most");
    w.stop();
}

/// Wait (bounded) until the child is quiet; the close reasons since `m0` must be `closed`.
fn quiet_since(w: &Wsloop, m0: &Metrics, closed: &[(&str, u64)]) -> (usize, Metrics) {
    let end = w.wait_baseline();
    let m = w.wait_quiet();
    assert_eq!(m.closed_since(m0), deltas(closed));
    (end, m)
}

/// The backlog of the child's listener on `port` as the kernel has it (`ss -ltn`: Send-Q of
/// a listening socket), or `None` without `ss` (a note, or an error under CI).
fn kernel_backlog(port: u16) -> Option<u64> {
    let run = run_bounded(
        Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    let run = match run {
        Ok(r) if r.status.is_some_and(|s| s.success()) => r,
        _ => {
            missing(
                "listen backlog",
                "ss",
                "reads the kernel's backlog",
                "apt-get install iproute2",
            );
            return None;
        }
    };
    let line = run.stdout.lines().next().expect("the listener in ss");
    let cols: Vec<&str> = line.split_whitespace().collect();
    Some(cols[2].parse().expect("Send-Q"))
}

#[test]
fn the_listen_backlog_holds_what_it_says_and_is_capped_by_somaxconn() {
    const BACKLOG: usize = 8;
    let w = Wsloop::spawn("listen-backlog", &["--listen-backlog", "8"]);
    let m0 = w.metrics();
    if let Some(b) = kernel_backlog(w.addr.port()) {
        assert_eq!(b, BACKLOG as u64);
    }
    // Stopped, the child accepts nothing: the kernel completes backlog + 1 connections
    // (Linux's queue is full only past the backlog), then drops SYNs.
    w.freeze();
    let mut queued = Vec::new();
    let refused = loop {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        match s.connect_timeout(&w.addr.into(), Duration::from_millis(300)) {
            Ok(()) => queued.push(TcpStream::from(s)),
            Err(e) => break e,
        }
        assert!(
            queued.len() <= 4 * BACKLOG,
            "{} connections queued",
            queued.len()
        );
    };
    assert_eq!(refused.kind(), std::io::ErrorKind::TimedOut, "{refused}");
    assert_eq!(queued.len(), BACKLOG + 1);
    w.thaw();
    // Those queued are served.
    for s in &mut queued {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(&upgrade_request(w.addr)).unwrap();
    }
    upgraded_then_closed(queued);
    quiet_since(&w, &m0, &[("peer_closed", BACKLOG as u64 + 1)]);
    w.stop();

    // More than the kernel allows: net.core.somaxconn.
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("somaxconn")
        .trim()
        .parse()
        .unwrap();
    let asked = (somaxconn + 1).clamp(1024, 1 << 20).to_string();
    let w = Wsloop::spawn("listen-backlog-capped", &["--listen-backlog", &asked]);
    if let Some(b) = kernel_backlog(w.addr.port()) {
        assert_eq!(b, somaxconn, "asked for {asked}");
    }
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// The descriptor limit and the fd budget

fn soft_and_hard(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let n = |s: &str| s.parse().unwrap_or(u64::MAX); // "unlimited"
    (n(f[3]), n(f[4]))
}

/// The numbers of the binary's "fd budget" log line: (budget, RLIMIT_NOFILE, open, headroom,
/// max connections).
fn budget_line(w: &Wsloop) -> (u64, u64, u64, u64, u64) {
    let log = w.log();
    let line = log
        .lines()
        .find(|l| l.contains("fd budget "))
        .unwrap_or_else(|| panic!("no fd budget line:\n{log}"));
    let nums: Vec<u64> = line[line.find("fd budget ").unwrap()..]
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    (nums[0], nums[1], nums[2], nums[3], nums[4])
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_limit() {
    const LOW: u64 = 256;
    let hard = rlimit_support::nofile_limit().1;
    if hard <= LOW {
        println!("skipped: the hard RLIMIT_NOFILE ({hard}) leaves nothing to raise");
        return;
    }
    // Started with a soft limit of 256 and no --fd-limit.
    let w = Wsloop::spawn_args("fd-limit-raised", &[], Some(LOW));
    let (soft, child_hard) = soft_and_hard(w.pid);
    assert_eq!(child_hard, hard);
    assert_eq!(soft, hard, "the soft limit is the hard one");
    let said = format!("raised the soft RLIMIT_NOFILE from {LOW} to {hard}");
    assert!(w.log().contains(&said), "{said:?} not logged:\n{}", w.log());
    let m = w.metrics();
    assert_eq!(m.get("wsloop_fd_limit"), hard as f64);
    let (budget, limit, ..) = budget_line(&w);
    assert_eq!(limit, hard);
    assert!(budget > LOW, "a budget of {budget} from a limit of {limit}");
    w.stop();
}

#[test]
fn the_fd_budget_keeps_an_eighth_at_most_1024_for_answering_refused_clients() {
    let hard = rlimit_support::nofile_limit().1;
    // An eighth of a budget under 8192 is under 1024; of one over it, more: 1024 is kept.
    for limit in [2000, 20_000] {
        if limit > hard {
            println!("skipped --fd-limit {limit}: the hard RLIMIT_NOFILE is {hard}");
            continue;
        }
        let w = Wsloop::spawn_with_fd_limit("fd-budget", limit, &[]);
        let (budget, soft, open, headroom, max) = budget_line(&w);
        assert_eq!((soft, headroom), (limit, 32));
        // The soft limit, minus what was open at start, minus the headroom, minus one.
        assert_eq!(budget, limit - open - headroom - 1, "open {open}");
        assert_eq!(max, budget - (budget / 8).min(1024), "budget {budget}");
        let m = w.metrics();
        assert_eq!(m.get("wsloop_fd_budget"), budget as f64);
        assert_eq!(m.get("wsloop_connections_max"), max as f64);
        println!("--fd-limit {limit}: {open} open, budget {budget}, max connections {max}");
        w.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// The README's tables name tests that exist

/// The backticked names in the last column ("proved by") of the README's table whose header
/// starts with `header`: test names (snake case, three underscores at least) and name globs
/// (`fd_exhaustion_*`).
fn named_tests(readme: &str, header: &str) -> Vec<String> {
    let start = readme
        .find(header)
        .unwrap_or_else(|| panic!("no table {header:?}"));
    readme[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .flat_map(|l| {
            let last = l
                .trim_end_matches('|')
                .rsplit('|')
                .next()
                .unwrap_or_default();
            last.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|n| {
            let name = n.trim_end_matches('*');
            !n.starts_with("wsloop_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && (n.ends_with("_*") || n.matches('_').count() >= 3)
        })
        .collect()
}

/// Every `fn name(` in the Rust files under `dir`.
fn functions_in(dir: &std::path::Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            functions_in(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            out.extend(text.split("fn ").skip(1).filter_map(|rest| {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest[name.len()..].starts_with(['(', '<']).then_some(name)
            }));
        }
    }
}

#[test]
fn every_test_the_readme_tables_name_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut functions = Vec::new();
    functions_in(&root.join("tests"), &mut functions);
    functions_in(&root.join("src"), &mut functions);
    for header in [
        "| limit | default | flag |",
        "| threat | defence | default | proved by |",
    ] {
        let names = named_tests(&readme, header);
        assert!(names.len() >= 20, "{header}: {names:?}");
        for name in names {
            let found = match name.strip_suffix('*') {
                Some(prefix) => functions.iter().any(|f| f.starts_with(prefix)),
                None => functions.contains(&name),
            };
            assert!(found, "the README names {name}, which no test is called");
        }
    }
}
