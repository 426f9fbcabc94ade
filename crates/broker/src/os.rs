//! What the broker does differently by operating system, besides the descriptor limit
//! ([`crate::fdlimit`]): SIGHUP (Unix only; Windows has no such signal, certificate files are
//! still watched) and which accept errors mean "out of descriptors or buffers".

use std::io;

/// SIGHUP, registered while binding (before the caller reports ready), so that an early SIGHUP
/// reloads instead of terminating the process.
#[cfg(unix)]
pub(crate) struct Hangup(tokio::signal::unix::Signal);

#[cfg(unix)]
impl Hangup {
    pub(crate) fn register() -> Option<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(Self(s)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificate files are still watched");
                None
            }
        }
    }

    pub(crate) async fn recv(&mut self) {
        self.0.recv().await;
    }
}

/// Windows has no SIGHUP: nothing to register.
#[cfg(not(unix))]
pub(crate) struct Hangup;

#[cfg(not(unix))]
impl Hangup {
    pub(crate) fn register() -> Option<Self> {
        None
    }

    pub(crate) async fn recv(&mut self) {
        std::future::pending::<()>().await;
    }
}

/// Whether an accept error means the process ran out of descriptors (sockets) or buffers.
pub(crate) fn is_fd_exhaustion(e: &io::Error) -> bool {
    #[cfg(unix)]
    let codes = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM];
    // WSAEMFILE, WSAENOBUFS.
    #[cfg(not(unix))]
    let codes = [10024, 10055];
    e.raw_os_error().is_some_and(|code| codes.contains(&code))
}
