//! The process's file descriptor limit, which bounds how many connections one broker holds.
//!
//! This is the only module with `unsafe`: `getrlimit`/`setrlimit` through `libc`, plain
//! system calls on a stack value. Windows has no such limit: there both calls say so.
#![allow(unsafe_code)]

/// Descriptors kept for listeners, certificate and data files, logs and the runtime.
pub const RESERVED_FDS: u64 = 64;

/// Soft and hard `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The limit in force.
    pub soft: u64,
    /// The ceiling the soft limit may be raised to.
    pub hard: u64,
}

impl FdLimit {
    /// Connections the limit leaves room for.
    pub fn connection_room(&self) -> u64 {
        self.soft.saturating_sub(RESERVED_FDS).max(1)
    }
}

/// Reads `RLIMIT_NOFILE`.
#[cfg(unix)]
pub fn read() -> std::io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(FdLimit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Raises the soft limit to the hard limit (what an unprivileged process may do) and returns
/// the limit in force afterwards.
#[cfg(unix)]
pub fn raise_to_hard() -> std::io::Result<FdLimit> {
    let current = read()?;
    if current.soft >= current.hard {
        return Ok(current);
    }
    let lim = libc::rlimit {
        rlim_cur: current.hard,
        rlim_max: current.hard,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    read()
}

/// Windows bounds sockets by memory, not by a descriptor limit.
#[cfg(not(unix))]
pub fn read() -> std::io::Result<FdLimit> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "no file descriptor limit on this system",
    ))
}

/// Windows bounds sockets by memory, not by a descriptor limit.
#[cfg(not(unix))]
pub fn raise_to_hard() -> std::io::Result<FdLimit> {
    read()
}

#[cfg(all(test, unix))]
mod tests {
    #[test]
    fn limit_is_readable_and_sane() {
        let lim = super::read().expect("getrlimit");
        assert!(lim.soft >= 1 && lim.soft <= lim.hard, "{lim:?}");
    }
}
