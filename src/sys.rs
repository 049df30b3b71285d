//! Everything wsloop asks of the operating system beyond sockets: the file-descriptor limit and
//! the count of open descriptors; and, for the project's tests and benchmarks, signals to
//! child processes and CPU time. Every `unsafe` block of the project lives here.

use std::io;

/// The process's `RLIMIT_NOFILE`: (soft, hard). `u64::MAX` stands for "unlimited".
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit struct for the duration of the call, and
    // RLIMIT_NOFILE is a valid resource; getrlimit only writes into it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((to_u64(lim.rlim_cur), to_u64(lim.rlim_max)))
}

/// Set the soft `RLIMIT_NOFILE` to `soft` (at most the hard limit), leaving the hard limit.
/// Returns the soft limit now in force.
pub fn set_nofile_soft(soft: u64) -> io::Result<u64> {
    let (_, hard) = nofile_limit()?;
    let mut target = soft.min(hard);
    if target == u64::MAX {
        // "Unlimited" hard limit: the kernel still caps descriptors at fs.nr_open.
        target = nr_open().unwrap_or(1 << 20);
    }
    let lim = libc::rlimit {
        rlim_cur: target as libc::rlim_t,
        rlim_max: if hard == u64::MAX {
            libc::RLIM_INFINITY
        } else {
            hard as libc::rlim_t
        },
    };
    // SAFETY: `lim` is a valid rlimit struct that setrlimit only reads; the soft value does not
    // exceed the hard one, which is passed back unchanged.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit. Returns (old soft, new soft).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = nofile_limit()?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    Ok((soft, set_nofile_soft(hard)?))
}

/// How many file descriptors the process has open right now, counted in `/proc/self/fd`
/// (not counting the descriptor used to read that directory).
pub fn open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// Bytes in socket `fd`'s send queue that the peer has not acknowledged yet (`SIOCOUTQ`).
pub fn unsent_bytes(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ on Linux) writes one c_int through the pointer, which points
    // at `n`, alive and writable for the call; `fd` is borrowed open for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Give the allocator's free memory back to the system (glibc's `malloc_trim`; nothing
/// elsewhere).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a plain integer and only walks the allocator's own state, which
    // it locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Send `signal` to process `pid` (a negative `pid`: to the process group `-pid`). The caller
/// makes sure the pid is still its own (a child not yet reaped).
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    match unsafe { libc::kill(pid, signal) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Whether child `pid` has exited, without reaping it (`waitid` with `WNOWAIT`): its pid and
/// process group stay reserved until the caller waits for it.
pub fn child_exited(pid: u32) -> bool {
    // SAFETY: an all-zero siginfo_t is a valid value for waitid to overwrite.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t; the flags only query.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid succeeded, so `info` holds a SIGCHLD siginfo (or zeroes when no child
    // changed state), whose si_pid field is what it filled in.
    r == 0 && unsafe { info.si_pid() } != 0
}

/// Clock ticks per second, the unit of utime and stime in `/proc/PID/stat`.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// This process's CPU time so far, user and system together, in seconds (all its threads).
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage struct; RUSAGE_SELF is a valid target.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// The kernel's cap on listen backlogs (`net.core.somaxconn`), if readable.
pub fn somaxconn() -> Option<u32> {
    read_number("/proc/sys/net/core/somaxconn")
}

fn nr_open() -> Option<u64> {
    read_number("/proc/sys/fs/nr_open")
}

fn read_number<T: std::str::FromStr>(path: &str) -> Option<T> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn to_u64(v: libc::rlim_t) -> u64 {
    if v == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_fds_sees_a_new_descriptor() {
        let before = open_fds().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let during = open_fds().unwrap();
        drop(f);
        // Other test threads may open files too, so compare a held file against its release
        // a few times rather than once.
        assert!(during >= 1 && before >= 1, "{before} {during}");
        let mut seen_increase = during > before;
        for _ in 0..20 {
            let a = open_fds().unwrap();
            let f = std::fs::File::open("/dev/null").unwrap();
            let b = open_fds().unwrap();
            drop(f);
            seen_increase |= b == a + 1;
        }
        assert!(seen_increase);
    }

    #[test]
    fn nofile_limit_is_readable_and_ordered() {
        let (soft, hard) = nofile_limit().unwrap();
        assert!(soft <= hard);
        assert!(soft >= 3);
    }

    #[test]
    fn somaxconn_is_positive() {
        assert!(somaxconn().unwrap_or(1) > 0);
    }
}
