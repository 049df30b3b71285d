//! `timer_wheel` fuzz target; the checks live in `fuzz/checks/timer_wheel.rs`, shared with the main crate's
//! `tests/fuzz_replay.rs`.
#![no_main]

#[path = "../checks/mod.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::timer_wheel::run(data));
