//! The fd-leak alarm, with a leak injected into the server process: a handler that opens
//! `/dev/null` on the text message "leak" and keeps it, and drops every such file on "unleak".
//!
//! This file holds this one test on purpose. The audit counts every descriptor of the process
//! (`/proc/self/fd`), so no other test may run in this process, and this test's own client
//! sockets must be accounted for: every one of them is connected before the loop starts (the
//! kernel completes the TCP handshakes into the listen backlog), so they are among the
//! descriptors "open before the loop started", and stays open until the end. The server's side
//! of each is accepted later and owned by the loop, so the audit is exact: only the leak shows.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use wsloop::{Config, Decision, Handler, Message, Server, UpgradeRequest, WebSocket};

/// Echoes, and leaks a descriptor on request.
#[derive(Default)]
struct Leaky {
    files: Vec<File>,
}

impl Handler for Leaky {
    type Data = ();

    fn upgrade(&mut self, _req: &UpgradeRequest<'_>) -> Decision<()> {
        Decision::accept(())
    }

    fn on_message(&mut self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        match msg {
            Message::Text("leak") => {
                self.files
                    .push(File::open("/dev/null").expect("open /dev/null"));
                ws.send_text(&format!("leaked {}", self.files.len()));
            }
            Message::Text("unleak") => {
                self.files.clear();
                ws.send_text("unleaked");
            }
            _ => {
                ws.send(msg);
            }
        }
    }
}

/// A pair of connections made before the loop starts, to ask `/healthz` once on the WebSocket
/// listener and once on the metrics listener.
struct Probe {
    ws: TcpStream,
    admin: TcpStream,
}

fn say(client: &mut TcpStream, text: &str) -> String {
    client
        .write_all(&frame(true, OP_TEXT, text.as_bytes()))
        .unwrap();
    String::from_utf8(expect_frame(client, OP_TEXT)).unwrap()
}

/// Ask `/healthz` through both sockets of `probe`; both answers must be the same.
fn health(probe: &mut Probe, ws: SocketAddr, admin: SocketAddr) -> Response {
    let a = http_on(&mut probe.ws, &get_request(ws, "/healthz"));
    let b = http_on(&mut probe.admin, &get_request(admin, "/healthz"));
    assert_eq!((a.status, &a.body), (b.status, &b.body), "{a:?} {b:?}");
    a
}

fn audit_gauge(m: &str) -> f64 {
    parse_metrics(m).value("wsloop_fd_audit_difference", &[])
}

#[test]
fn an_fd_leak_in_the_process_raises_the_audit_alarm_and_clears() {
    let config = Config {
        audit_interval: Duration::from_millis(100),
        // The probes wait in their handshake until used.
        handshake_timeout: Duration::from_secs(60),
        ..config()
    };
    let mut server = Server::new(config, Leaky::default()).expect("server");
    let ws_addr = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let admin = server
        .listen_metrics("127.0.0.1:0".parse().unwrap())
        .unwrap();

    // Every socket of this test, before the loop starts.
    let mut client = tcp(ws_addr);
    client.set_nodelay(true).unwrap();
    let mut probes: Vec<Probe> = (0..4)
        .map(|_| Probe {
            ws: tcp(ws_addr),
            admin: tcp(admin),
        })
        .collect();

    let handle = server.handle();
    let (tx, done) = mpsc::channel();
    let thread = thread::spawn(move || {
        let _ = tx.send(server.run());
    });
    let stats = |what: &str, cond: &dyn Fn(i64) -> bool| {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = handle.stats().expect("loop is running");
            if cond(s.audit_difference) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    };
    let audit_now = || handle.query(|_, ctx| ctx.audit().unwrap()).unwrap();

    client
        .write_all(upgrade_request(ws_addr).as_bytes())
        .unwrap();
    let head = read_head(&mut client);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(say(&mut client, "echo"), "echo");

    // Nothing leaks: the audit balances, /healthz says ok on both listeners.
    assert_eq!(audit_now(), 0);
    assert_eq!(audit_gauge(&handle.metrics().unwrap()), 0.0);
    let h = health(&mut probes[0], ws_addr, admin);
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"), "{h:?}");
    // The periodic audit (every 100 ms) runs and still finds nothing.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(stats("no difference", &|d| d == 0).audit_difference, 0);

    // One descriptor leaks.
    assert_eq!(say(&mut client, "leak"), "leaked 1");
    assert_eq!(audit_now(), 1);
    assert_eq!(stats("the audit to see 1", &|d| d != 0).audit_difference, 1);
    assert_eq!(audit_gauge(&handle.metrics().unwrap()), 1.0);
    let h = health(&mut probes[1], ws_addr, admin);
    assert_eq!(h.status, 503, "{h:?}");
    assert!(
        h.body.ends_with('\n') && h.body.lines().count() == 1,
        "{h:?}"
    );
    assert!(h.body.contains("fd audit"), "{h:?}");
    assert!(h.body.contains("(+1)"), "{h:?}");

    // A second one: the difference is the number leaked.
    assert_eq!(say(&mut client, "leak"), "leaked 2");
    assert_eq!(stats("the audit to see 2", &|d| d == 2).audit_difference, 2);
    assert_eq!(audit_gauge(&handle.metrics().unwrap()), 2.0);
    let h = health(&mut probes[2], ws_addr, admin);
    assert_eq!(h.status, 503, "{h:?}");
    assert!(
        h.body.starts_with("fd audit: ") && h.body.contains("(+2)"),
        "{h:?}"
    );

    // Released: everything clears.
    assert_eq!(say(&mut client, "unleak"), "unleaked");
    assert_eq!(stats("the audit to clear", &|d| d == 0).audit_difference, 0);
    assert_eq!(audit_gauge(&handle.metrics().unwrap()), 0.0);
    assert_eq!(audit_now(), 0);
    let h = health(&mut probes[3], ws_addr, admin);
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"), "{h:?}");

    // Close the client properly, then let everything go.
    client.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut client).0, 1000);
    assert!(expect_eof(&mut client).is_empty());
    drop(client);
    drop(probes);
    // Quiet: no connection and no timer left.
    let deadline = Instant::now() + WAIT;
    loop {
        let s = handle.stats().expect("loop is running");
        if s.connections == 0 && s.timers == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not quiet: {s:?}");
        thread::sleep(Duration::from_millis(10));
    }
    handle.shutdown().unwrap();
    let result = done
        .recv_timeout(Duration::from_secs(10))
        .expect("run() did not return in time");
    result.expect("run() failed");
    thread.join().unwrap();
}
