//! A panicking handler leaks nothing: the process's descriptors return exactly to their
//! baseline. Alone in its test binary, so no other test opens descriptors meanwhile.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use std::io::Write;
use tungstenite::Message as TMsg;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn panics_leave_no_descriptor_behind() {
    // The default hook may symbolize a backtrace (RUST_BACKTRACE), and std keeps the executable
    // it read debug info from open afterwards: a descriptor of std's, not wsloop's. Print the
    // message only.
    std::panic::set_hook(Box::new(|info| eprintln!("panic (expected): {info}")));
    let server = TestServer::start(config());
    // One connection first, so that the loop has started (and opened its spare descriptor).
    let mut first = ws(server.addr);
    first.send(TMsg::text("hello")).unwrap();
    assert_eq!(first.read().unwrap(), TMsg::text("hello"));
    close_client(&mut first);
    drop(first);
    server.wait_quiet();
    let baseline = open_fds();
    let mut others: Vec<Ws> = (0..3).map(|_| ws(server.addr)).collect();
    for round in 0..5 {
        let mut victim = raw_ws(server.addr);
        victim
            .write_all(&frame(true, OP_TEXT, b"panic-me"))
            .unwrap();
        assert_eq!(expect_close(&mut victim).0, 1011);
        expect_clean_eof(&mut victim);
        for w in &mut others {
            let text = format!("round {round}");
            w.send(TMsg::text(text.clone())).unwrap();
            assert_eq!(w.read().unwrap(), TMsg::text(text));
        }
    }
    for mut w in others {
        close_client(&mut w);
    }
    server.wait_quiet();
    assert_eq!(server.handle.query(|_, ctx| ctx.audit().unwrap()), Some(0));
    assert_eq!(open_fds(), baseline, "descriptors back to the baseline");
    let stats = server.finish();
    assert_eq!(stats.handler_panics, 5);
}
