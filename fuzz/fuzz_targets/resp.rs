//! `resp` fuzz target; the checks live in `fuzz/checks/resp.rs`, shared with the main
//! crate's `tests/fuzz_replay.rs`.
#![no_main]

#[path = "../checks/mod.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::resp::run(data));
