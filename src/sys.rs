//! Everything wsloop asks of the operating system beyond what std, mio and socket2 offer: the
//! file-descriptor limit, the count of open descriptors, the kernel's listen backlog cap, a
//! socket's unacknowledged bytes, and giving free heap back. Every `unsafe` block of the
//! project lives here (the crate denies `unsafe_code` everywhere else, see `lib.rs`); the module
//! is private: tests and benchmarks make their own system calls through `rustix`.
// This module may open descriptors (Cargo.toml's [lints]): it reads /proc/self/fd and
// /proc/sys, each a descriptor for the length of one call (the count excludes its own).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::io;

/// The process's `RLIMIT_NOFILE`: (soft, hard). `u64::MAX` stands for "unlimited".
pub(crate) fn nofile_limit() -> io::Result<(u64, u64)> {
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
pub(crate) fn set_nofile_soft(soft: u64) -> io::Result<u64> {
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
pub(crate) fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = nofile_limit()?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    Ok((soft, set_nofile_soft(hard)?))
}

/// How many file descriptors the process has open right now, counted in `/proc/self/fd`
/// (not counting the descriptor used to read that directory).
pub(crate) fn open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// Bytes in socket `fd`'s send queue that the peer has not acknowledged yet (`SIOCOUTQ`).
pub(crate) fn unsent_bytes(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
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
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a plain integer and only walks the allocator's own state, which
    // it locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The kernel's cap on listen backlogs (`net.core.somaxconn`), if readable.
pub(crate) fn somaxconn() -> Option<u32> {
    read_number("/proc/sys/net/core/somaxconn")
}

fn nr_open() -> Option<u64> {
    read_number("/proc/sys/fs/nr_open")
}

fn read_number<T: std::str::FromStr>(path: &str) -> Option<T> {
    read_system_file(path)?.trim().parse().ok()
}

/// A small file of the kernel's (under `/proc` or `/sys`), read whole in one call (its
/// descriptor open only meanwhile); `None` if it cannot be read.
pub(crate) fn read_system_file(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A configuration file (a TLS certificate or key), read whole at start-up, before any loop
/// counts descriptors, or on a reload (its descriptor is open only meanwhile): a regular file
/// of at most 1 MiB, else an error.
pub(crate) fn read_config_file(path: &std::path::Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that a FIFO with no writer cannot hold the thread (a reload on SIGHUP
    // runs on the signal thread, which must stay free to shut the server down); then only a
    // regular file, read up to a bound, so that a path naming /dev/zero or a huge file cannot
    // make the process allocate without end.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {} MiB", MAX_CONFIG_FILE >> 20),
        ));
    }
    Ok(bytes)
}

/// The largest configuration file (a certificate chain or a key, PEM) read: 1 MiB, hundreds
/// of times a real chain.
const MAX_CONFIG_FILE: u64 = 1 << 20;

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
