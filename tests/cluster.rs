//! Several loops on one port (`Cluster`, `--threads`): connections spread over the loops, ids
//! name their loop, metrics add up, per-address limits hold for the process, a budget that does
//! not fit fails cleanly, and shutdown ends every loop and every connection.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use wsloop::{Cluster, Config, Message, SendStatus};

const LOOPS: usize = 2;

fn start(config: Config) -> (Cluster<Recorder>, Arc<Mutex<Rec>>, SocketAddr) {
    let rec = Arc::new(Mutex::new(Rec::default()));
    let shared = rec.clone();
    let cluster = Cluster::start(
        Config {
            threads: LOOPS,
            ..config
        },
        &["127.0.0.1:0".parse().unwrap()],
        None,
        move |_| Recorder::new(shared.clone(), Opts::default()),
    )
    .expect("start the cluster");
    let addr = cluster.local_addrs()[0];
    assert_ne!(addr.port(), 0);
    (cluster, rec, addr)
}

/// Wait (bounded) until the loops hold exactly `open` connections between them and no timer
/// (with the idle timeout off, as in `common::config`, an open connection has none): nothing is
/// left of the connections that ended.
fn wait_quiet(cluster: &Cluster<Recorder>, open: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = cluster.stats();
        let held: usize = stats.iter().map(|s| s.connections).sum();
        let timers: usize = stats.iter().map(|s| s.timers).sum();
        if held == open && timers == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{held} connections and {timers} timers held, expected {open} and none"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// `join` with a bound: a loop that never ends fails the test instead of hanging it.
fn join(cluster: Cluster<Recorder>) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(cluster.join());
    });
    rx.recv_timeout(Duration::from_secs(15))
        .expect("every loop ends after shutdown")
        .expect("the loops end without error");
}

/// Scrape `/metrics` until `cond` holds (other loops' figures may be up to 250 ms old).
fn wait_metrics(addr: SocketAddr, what: &str, cond: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = parse_metrics(&http_get(addr, "/metrics").body);
        if cond(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn per_loop(m: &Exposition, name: &str) -> Vec<f64> {
    (0..LOOPS)
        .map(|i| m.value(name, &[("loop", &i.to_string())]))
        .collect()
}

#[test]
fn loops_share_the_port_and_their_metrics_add_up() {
    const N: usize = 40;
    let (cluster, rec, addr) = start(config());
    let mut clients: Vec<Ws> = (0..N).map(|_| ws(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let text = format!("hello {i}");
        c.send(tungstenite::Message::text(text.clone())).unwrap();
        assert_eq!(c.read().unwrap(), tungstenite::Message::text(text));
    }
    // The kernel spread the clients over both loops (all 40 on one: odds 2^-39).
    let stats = cluster.stats();
    assert_eq!(stats.len(), LOOPS);
    let held: Vec<usize> = stats.iter().map(|s| s.connections).collect();
    assert_eq!(held.iter().sum::<usize>(), N, "{held:?}");
    assert!(
        held.iter().all(|n| *n > 0),
        "one loop got every client: {held:?}"
    );
    // Ids name their loop, and are unique over the cluster.
    let opens = rec.lock().unwrap().opens.clone();
    let mut on_loop = [0; LOOPS];
    for (id, _) in &opens {
        on_loop[id.loop_index()] += 1;
    }
    assert_eq!(on_loop.to_vec(), held, "ids by loop vs loops' counts");
    let mut ids: Vec<_> = opens.iter().map(|(id, _)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N);
    // A loop's handle reaches its own connections, and no other loop's.
    let (id, _) = opens[0];
    let other = &cluster.handles()[1 - id.loop_index()];
    let push = |h: &wsloop::LoopHandle<Recorder>| {
        h.query(move |_, ctx| ctx.send(id, Message::Text("pushed")))
            .unwrap()
    };
    assert_eq!(push(cluster.handle_of(id).unwrap()), SendStatus::Queued);
    assert_eq!(push(other), SendStatus::Closed, "another loop reached {id}");

    // The totals are the sums of the loops, in the metrics any loop serves.
    let m = wait_metrics(addr, "every loop's connections", |m| {
        m.value("wsloop_connections", &[("state", "open")]) == N as f64
    });
    let conns = per_loop(&m, "wsloop_per_loop_connections");
    let states: f64 = ["handshake", "open", "closing", "refusing"]
        .iter()
        .map(|s| m.value("wsloop_connections", &[("state", s)]))
        .sum();
    assert_eq!(conns.iter().sum::<f64>(), states, "{conns:?}");
    for (total, part) in [
        ("wsloop_connections_max", "wsloop_per_loop_connections_max"),
        ("wsloop_fd_budget", "wsloop_per_loop_fd_budget"),
    ] {
        let parts = per_loop(&m, part);
        assert_eq!(m.value(total, &[]), parts.iter().sum::<f64>(), "{total}");
        assert!((parts[0] - parts[1]).abs() <= 1.0, "{part}: {parts:?}");
    }
    assert_eq!(
        per_loop(&m, "wsloop_per_loop_messages_received_total")
            .iter()
            .sum::<f64>(),
        N as f64
    );
    assert_eq!(m.value("wsloop_messages_received_total", &[]), N as f64);
    // (The fd audit is checked with the binary in tests/attacks.rs: here the clients' own
    // descriptors are in the same process.)

    // Half leave with a close handshake; shutdown closes the rest with 1001 on both loops. The
    // pushed message reached one client, and one only.
    let mut pushed = 0;
    for c in clients.iter_mut().take(N / 2) {
        c.close(None).unwrap();
        if let Ok(tungstenite::Message::Text(t)) = c.read() {
            assert_eq!(t.as_str(), "pushed");
            pushed += 1;
            expect_close_reply(c);
        } else {
            // That read was the close reply; the end of the connection follows.
            assert!(read_until_closed(c).is_none(), "a second close frame");
        }
    }
    {
        let rec = rec.clone();
        let deadline = Instant::now() + WAIT;
        while rec.lock().unwrap().closes.len() < N / 2 {
            assert!(Instant::now() < deadline, "closes did not reach on_close");
            thread::sleep(Duration::from_millis(10));
        }
    }
    wait_quiet(&cluster, N / 2);
    cluster.shutdown();
    for c in clients.iter_mut().skip(N / 2) {
        let code = loop {
            match c.read() {
                Ok(tungstenite::Message::Close(f)) => break f.map(|f| f.code),
                Ok(tungstenite::Message::Text(t)) if t.as_str() == "pushed" => pushed += 1,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(code, Some(WsCloseCode::Away));
        assert!(read_until_closed(c).is_none(), "a second close frame");
    }
    assert_eq!(pushed, 1, "the message pushed to {id}");
    join(cluster);
    let rec = rec.lock().unwrap();
    assert_eq!(rec.opens.len(), N);
    check_open_close_pairs(&rec);
}

#[test]
fn per_address_limits_hold_over_all_loops() {
    const PER_IP: usize = 16;
    let (cluster, _rec, addr) = start(Config {
        max_connections_per_ip: PER_IP as u32,
        ..config()
    });
    let mut held: Vec<Ws> = (0..PER_IP).map(|_| ws(addr)).collect();
    let split: Vec<usize> = cluster.stats().iter().map(|s| s.connections).collect();
    // Each loop holds fewer than the limit (all 16 on one loop: odds 2^-15): with a table per
    // loop, either would admit the next clients.
    assert_eq!(split.iter().sum::<usize>(), PER_IP, "{split:?}");
    assert!(split.iter().all(|&n| n > 0 && n < PER_IP), "{split:?}");
    // Whichever loop the next clients land on, the address is full: the table is shared.
    for i in 0..6 {
        let r = http_request(addr, &upgrade_request(addr));
        assert_eq!(
            r.status, 503,
            "client {i} beyond the limit ({split:?}): {r:?}"
        );
    }
    // A connection leaving frees the address's slot on whichever loop comes next.
    let mut gone = held.pop().unwrap();
    close_client(&mut gone);
    let deadline = Instant::now() + WAIT;
    let mut again = loop {
        let mut s = tcp(addr);
        std::io::Write::write_all(&mut s, upgrade_request(addr).as_bytes()).unwrap();
        let head = read_head(&mut s);
        if head.starts_with("HTTP/1.1 101 ") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the freed slot never came back: {head:?}"
        );
        thread::sleep(Duration::from_millis(10));
    };
    let refused: u64 = cluster.stats().iter().map(|s| s.refused[1]).sum();
    assert!(refused >= 6, "refusals counted by the loops: {refused}");
    for mut c in held {
        close_client(&mut c);
    }
    std::io::Write::write_all(&mut again, &close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut again).0, 1000);
    expect_clean_eof(&mut again);
    wait_quiet(&cluster, 0);
    cluster.shutdown();
    join(cluster);
}

#[test]
fn a_budget_that_does_not_fit_fails_to_start_and_the_port_stays_exclusive() {
    let too_many = Cluster::start(
        Config {
            threads: LOOPS,
            max_connections: 1 << 24,
            ..config()
        },
        &["127.0.0.1:0".parse().unwrap()],
        None,
        |_| Recorder::new(Arc::default(), Opts::default()),
    );
    let e = too_many.err().expect("a budget that does not fit");
    assert!(
        matches!(&e, wsloop::Error::Config(c) if c.field == "max_connections"),
        "{e:?}"
    );
    assert!(e.to_string().contains("shared by 2 threads"), "{e}");
    let fewer_than_loops = Config {
        threads: 4,
        max_connections: 3,
        ..config()
    };
    assert!(fewer_than_loops.validate().is_err());

    // One loop does not set SO_REUSEPORT: a cluster cannot join its port, nor it a cluster's.
    let single = Cluster::start(config(), &["127.0.0.1:0".parse().unwrap()], None, |_| {
        Recorder::new(Arc::default(), Opts::default())
    })
    .unwrap();
    let port = single.local_addrs()[0];
    let e = Cluster::start(
        Config {
            threads: LOOPS,
            ..config()
        },
        &[port],
        None,
        |_| Recorder::new(Arc::default(), Opts::default()),
    )
    .err()
    .expect("the port is taken");
    match &e {
        wsloop::Error::Listen { addr, source } => {
            assert_eq!(*addr, port);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        }
        other => panic!("expected a listen error, got {other:?}"),
    }
    wait_quiet(&single, 0);
    single.shutdown();
    join(single);
}

#[test]
fn dropping_a_cluster_shuts_every_loop_down() {
    let (cluster, rec, addr) = start(config());
    let mut clients: Vec<Ws> = (0..8).map(|_| ws(addr)).collect();
    wait_quiet(&cluster, 8);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        drop(cluster);
        let _ = tx.send(());
    });
    for c in &mut clients {
        let code = loop {
            match c.read() {
                Ok(tungstenite::Message::Close(f)) => break f.map(|f| f.code),
                Ok(_) => continue,
                Err(e) => panic!("expected a close frame, got {e}"),
            }
        };
        assert_eq!(code, Some(WsCloseCode::Away));
        assert!(read_until_closed(c).is_none(), "a second close frame");
    }
    rx.recv_timeout(Duration::from_secs(15))
        .expect("drop returns once every loop has ended");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening after the drop"
    );
    check_open_close_pairs(&rec.lock().unwrap());
}

#[test]
fn a_loop_that_panics_ends_the_cluster_with_an_error() {
    // With catch_panics off a handler's panic unwinds out of its loop; the cluster reports it
    // and shuts the other loop down rather than running on with one loop gone.
    let (cluster, _rec, addr) = start(Config {
        catch_panics: false,
        ..config()
    });
    let mut bystanders: Vec<Ws> = (0..8).map(|_| ws(addr)).collect();
    let mut c = ws(addr);
    c.send(tungstenite::Message::text("panic-me")).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(cluster.join());
    });
    let e = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("join returns once every loop has ended")
        .expect_err("a panicked loop is an error");
    assert!(e.to_string().contains("panicked"), "{e}");
    // Every client's connection is gone: the panicked loop's closed by unwinding (no close
    // frame: the end of the connection, or a reset), the other loop's shut down with 1001. None
    // is left waiting (a read timeout fails the test).
    let mut away = 0;
    for (i, b) in bystanders.iter_mut().enumerate() {
        match b.read() {
            Ok(tungstenite::Message::Close(f)) => {
                assert_eq!(f.map(|f| f.code), Some(WsCloseCode::Away), "bystander {i}");
                assert!(read_until_closed(b).is_none(), "a second close frame");
                away += 1;
            }
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("bystander {i}: {other:?}"),
        }
    }
    println!("bystanders: {away} of 8 on the other loop got 1001");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening"
    );
}
