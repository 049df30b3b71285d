//! The process runs out of descriptors (something else in it leaked them all): accept fails with
//! EMFILE. The loop must answer the waiting clients (503 or a reset, never a hang), must not spin
//! on the failing accept, and must serve again as soon as descriptors are free.
//!
//! Alone in its test binary: it lowers this process's own RLIMIT_NOFILE and fills it.

mod common;

use common::*;
use socket2::{Domain, Socket, Type};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::Message as TMsg;
use wsloop::Config;

/// utime + stime of this process, in clock ticks, read through a file opened beforehand (no
/// descriptor is to be had when it is called).
fn cpu_ticks(stat_file: &mut File) -> u64 {
    use std::io::Seek;
    stat_file.rewind().unwrap();
    let mut stat = String::new();
    stat_file.read_to_string(&mut stat).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 of the whole line are 12 and 13 after "pid (comm) ".
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A client socket created now (while descriptors are available), connected later.
fn precreated() -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// What a client connecting while the server is out of descriptors gets.
#[derive(Debug, PartialEq)]
enum Answer {
    Refused503,
    ClosedOrReset,
}

/// Returns the client's stream too: dropping it would free a descriptor in this process, which
/// must stay out of them.
fn connect_and_read(s: Socket, addr: SocketAddr) -> (Answer, Duration, TcpStream) {
    let start = Instant::now();
    s.connect(&addr.into()).unwrap();
    let mut s: TcpStream = s.into();
    let _ = s.write_all(upgrade_request(addr).as_bytes());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("client hung or failed after {:?}: {e}", start.elapsed()),
        }
    }
    let answer = if buf.starts_with(b"HTTP/1.1 503") {
        Answer::Refused503
    } else {
        assert!(
            buf.is_empty(),
            "unexpected answer {:?}",
            String::from_utf8_lossy(&buf)
        );
        Answer::ClosedOrReset
    };
    (answer, start.elapsed(), s)
}

#[test]
fn accept_survives_emfile_without_spinning_and_recovers() {
    let _ = env_logger::builder().is_test(true).try_init();
    wsloop::sys::set_nofile_soft(64).unwrap();
    let server = TestServer::start(Config {
        fd_headroom: 8,
        raise_fd_limit: false,
        ..config()
    });
    // The loop is up and serving.
    let mut first = ws(server.addr);
    first.send(TMsg::text("before")).unwrap();
    assert_eq!(first.read().unwrap(), TMsg::text("before"));

    let waiting: Vec<Socket> = (0..6).map(|_| precreated()).collect();
    let mut stat_file = File::open("/proc/self/stat").unwrap();
    let tps = ticks_per_second();
    let held = precreated();
    // Something in the process takes every remaining descriptor.
    let mut hog = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => hog.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE));
                break;
            }
        }
        assert!(hog.len() < 100, "the limit of 64 did not hold");
    }

    // Clients arriving now are answered, not left hanging in the backlog.
    let mut answered = Vec::new();
    for s in waiting {
        let (answer, took, stream) = connect_and_read(s, server.addr);
        answered.push(stream);
        assert!(
            took < Duration::from_secs(2),
            "{answer:?} only after {took:?}"
        );
        assert_eq!(answer, Answer::Refused503);
    }
    let stats = server.stats();
    let emfile = stats.accept_errors[0];
    assert!(emfile >= 1, "accept saw EMFILE: {stats:?}");
    assert_eq!(stats.refused[0], 6, "each was refused as 'server full'");

    // While a client waits and the process stays out of descriptors, the loop retries with a
    // backoff instead of spinning on accept.
    held.connect(&server.addr.into()).unwrap();
    let (cpu0, wall0) = (cpu_ticks(&mut stat_file), Instant::now());
    thread::sleep(Duration::from_secs(2));
    let cpu = (cpu_ticks(&mut stat_file) - cpu0) as f64 / tps;
    let wall = wall0.elapsed().as_secs_f64();
    assert!(
        cpu < 0.25 * wall,
        "{cpu:.2} s of CPU in {wall:.2} s out of descriptors"
    );
    let mut held: TcpStream = held.into();
    let mut head = [0u8; 12];
    held.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 503", "the waiting client got its answer");
    let errors_while_out = server.stats().accept_errors[0] - emfile;
    assert!(
        errors_while_out <= 20,
        "{errors_while_out} failed accepts in 2 s: not backing off"
    );

    // Descriptors come back: serving resumes by itself.
    drop((hog, held, answered, stat_file));
    let deadline = Instant::now() + WAIT;
    let mut again = loop {
        if let Ok((mut w, _)) = tungstenite::connect(format!("ws://{}/", server.addr)) {
            if w.send(TMsg::text("after")).is_ok() {
                if let Ok(m) = w.read() {
                    assert_eq!(m, TMsg::text("after"));
                    break w;
                }
            }
        }
        assert!(Instant::now() < deadline, "not serving again");
        thread::sleep(Duration::from_millis(50));
    };
    again.close(None).unwrap();
    while again.read().is_ok() {}
    first.close(None).unwrap();
    while first.read().is_ok() {}
    drop((again, first));
    server.wait_quiet();
    assert_eq!(server.handle.query(|_, ctx| ctx.audit().unwrap()), Some(0));
    let stats = server.finish();
    assert!(!stats.accept_paused);
}
