//! Driving wsloop step by step from the host's own loop, next to a timer of the host's.
//!
//! `Server::turn(timeout)` runs one poll-and-dispatch round. The host chooses the timeout: here
//! it waits no longer than its own next tick, so both the WebSocket traffic and the host's
//! timer are served from one thread. A zero timeout busy-polls for the lowest latency, at the
//! price of a whole core.
//!
//! Run: `cargo run --release --example step`, then talk to ws://127.0.0.1:9002/.
// Example code (see Cargo.toml's [lints]): it stops on the first error, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::{Duration, Instant};
use wsloop::{Config, Decision, Handler, Message, Server, UpgradeRequest, WebSocket};

struct Echo;

impl Handler for Echo {
    type Data = ();
    fn upgrade(&mut self, _req: &UpgradeRequest<'_>) -> Decision<()> {
        Decision::accept(())
    }
    fn on_message(&mut self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }
}

fn main() -> Result<(), wsloop::Error> {
    let mut server = Server::new(Config::default(), Echo)?;
    let addr = server.listen("127.0.0.1:9002".parse().unwrap())?;
    println!("echo on ws://{addr}/ for 10 s, driven step by step");
    let period = Duration::from_secs(1);
    let stop = Instant::now() + Duration::from_secs(10);
    let mut next_tick = Instant::now() + period;
    let handle = server.handle();
    loop {
        // Wait for sockets no longer than until the host's own next deadline.
        let wait = next_tick.saturating_duration_since(Instant::now());
        if !server.turn(Some(wait))? {
            break; // shut down and drained
        }
        if Instant::now() >= next_tick {
            next_tick += period;
            let s = server.stats();
            println!(
                "host tick: {} connections, {} messages",
                s.connections, s.messages_received
            );
        }
        if Instant::now() >= stop {
            handle.shutdown().expect("the loop is running");
        }
    }
    Ok(())
}
