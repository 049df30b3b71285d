//! This process's descriptor limit (`RLIMIT_NOFILE`), for the tests and benchmarks that hold
//! thousands of connections: through `rustix`, since wsloop exports no system calls.
//!
//! Included by the test files that use it (`mod rlimit_support;`) and by the benches
//! (`#[path = "../tests/rlimit_support/mod.rs"]`).
#![allow(dead_code)]

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The soft and hard `RLIMIT_NOFILE`; `u64::MAX` stands for "unlimited".
pub fn nofile_limit() -> (u64, u64) {
    let lim = getrlimit(Resource::Nofile);
    (
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    )
}

/// Raise the soft `RLIMIT_NOFILE` to the hard one (an unlimited hard limit: to the kernel's
/// `fs.nr_open`). Returns the soft limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let lim = getrlimit(Resource::Nofile);
    let target = match lim.maximum {
        Some(hard) => hard,
        None => std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20),
    };
    if lim.current.is_none_or(|soft| soft >= target) {
        return Ok(lim.current.unwrap_or(u64::MAX));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: lim.maximum,
        },
    )?;
    Ok(target)
}
