//! The fuzz targets' checking functions, shared by the libFuzzer targets (`fuzz/fuzz_targets/`)
//! and the main crate's `tests/fuzz_replay.rs`, which replays every committed seed and
//! regression input through them on stable Rust without libFuzzer.
//!
//! Each target module has `run(data)`: it decodes the raw fuzzer bytes into the target's input
//! (one `decode` function, used by both the fuzzer and the replay) and panics on any violated
//! property. Depends on `wsloop` and `tungstenite`; `tls` also on `rustls` (a real client) and
//! `stats_alloc` (it counts the server's heap bytes).

pub mod connection;
pub mod extensions;
pub mod forwarded;
pub mod frame;
pub mod handshake;
pub mod inflate;
pub mod resp;
pub mod timer_wheel;
pub mod tls;
pub mod topics;
mod util;

/// A target's entry point: decodes the raw input and panics on a violated property.
pub type Check = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/seeds/` and `fuzz/regressions/`) and its
/// entry point.
pub const TARGETS: [(&str, Check); 10] = [
    ("handshake", handshake::run),
    ("frame", frame::run),
    ("connection", connection::run),
    ("timer_wheel", timer_wheel::run),
    ("forwarded", forwarded::run),
    ("topics", topics::run),
    ("extensions", extensions::run),
    ("inflate", inflate::run),
    ("tls", tls::run),
    ("resp", resp::run),
];
