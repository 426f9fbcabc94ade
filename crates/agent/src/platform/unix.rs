//! Linux and other Unix systems: 0700 folders and 0600 files, SIGTERM and Ctrl-C, `/proc`
//! where Linux has it (with a fallback for systems without it, such as macOS).

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::inventory::Inventory;

/// Default state folder.
pub const STATE_DIR: &str = "/var/lib/beckon-agent";
/// Default configuration file of the packaged agent.
pub const CONFIG_FILE: &str = "/etc/beckon-agent/agent.toml";

pub(super) fn default_state_dir() -> PathBuf {
    PathBuf::from(STATE_DIR)
}

pub(super) fn default_config_file() -> PathBuf {
    PathBuf::from(CONFIG_FILE)
}

/// The system proxy for connections to `broker_host`: the environment's `https_proxy` /
/// `all_proxy` and `no_proxy`, as curl reads them.
pub fn system_proxy(broker_host: &str) -> crate::proxy::FoundProxy {
    crate::proxy::from_env(|name| std::env::var(name).ok(), broker_host)
}

/// Creates `dir` and its parents with Unix permissions `mode` (0o700 for the state folder).
pub fn create_dir(dir: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// Options for a file only the agent's user may read (mode 0600).
pub fn private_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(0o600);
    options
}

/// Whether process `pid` still runs: `/proc/<pid>` on Linux, `kill -0` elsewhere.
pub fn process_alive(pid: u32) -> bool {
    if Path::new("/proc/self").exists() {
        return Path::new(&format!("/proc/{pid}")).exists();
    }
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Returns on SIGTERM or Ctrl-C (SIGINT).
pub async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The host name: the kernel's (Linux), `/etc/hostname`, else `uname -n`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            let out = std::process::Command::new("uname")
                .arg("-n")
                .output()
                .ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_default()
}

/// This machine's inventory, read from `/proc`, `/sys` and `/etc` (gaps where a system has
/// none of them).
pub fn gather_inventory() -> Inventory {
    let mut inventory = Inventory::gather_from(Path::new("/"));
    if inventory.hostname.is_empty() {
        inventory.hostname = hostname();
    }
    inventory
}

/// `cmd.exe` exists on Windows only: this is what a Unix agent tries (and reports failing).
pub(super) fn cmd_line(command: &mut tokio::process::Command, line: &str) {
    command.args(["/D", "/S", "/C", line]);
}

/// Gives back what start-up left behind once the agent is idle (connected, nothing to do):
/// the pages of this program's own code, read-only data and relocation table that start-up
/// touched and the idle agent does not use (the one binary also carries the console and the
/// broker). What the agent needs again comes back from the file on its next use. Linux only;
/// a no-op elsewhere. (The heap is not trimmed: the idle agent's is a few hundred KiB, and
/// `malloc_trim` gave back 16 KiB of it.)
pub fn release_idle_memory() {
    #[cfg(target_os = "linux")]
    drop_program_pages();
}

/// Drops the resident pages of the executable's mappings that hold nothing but the file's
/// own bytes (`MADV_DONTNEED`): read-only ones in which `/proc/self/smaps` counts no
/// anonymous (copied, e.g. relocated) page. They stay in the page cache as any file's pages
/// do, reclaimable, and fault back in from it. (`MADV_PAGEOUT` would reclaim them at once,
/// but the kernel does it only for a process that owns the file or may write it: not for the
/// agent's service user.)
#[cfg(target_os = "linux")]
fn drop_program_pages() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    for (start, end) in file_only_mappings_of(&smaps, &exe) {
        // SAFETY: the range is a whole mapping of this process, read-only and without a
        // copied page, so every page read after the advice comes from the file with the same
        // bytes as before; nothing here can write to it in between.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// The address ranges of the `/proc/self/smaps` mappings of `file` without write permission
/// and with `Anonymous: 0 kB`.
#[cfg(any(target_os = "linux", test))]
fn file_only_mappings_of(smaps: &str, file: &Path) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    // The read-only mapping of `file` whose fields are being read.
    let mut current = None;
    for line in smaps.lines() {
        if let Some(anonymous) = line.strip_prefix("Anonymous:") {
            let none = anonymous.split_whitespace().next() == Some("0");
            if let (Some(range), true) = (current.take(), none) {
                found.push(range);
            }
            continue;
        }
        let mut fields = line.splitn(6, ' ');
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            // A field line ("Rss:   12 kB"), not the head of a mapping.
            continue;
        };
        let path = fields.nth(3).map(str::trim_start);
        current = (perms.as_bytes().get(1) == Some(&b'-') && path.map(Path::new) == Some(file))
            .then_some((start, end));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_mappings_of_the_program_without_copied_pages_are_dropped() {
        let smaps = "\
55d0c0000000-55d0c0400000 r--p 00000000 fd:01 123  /usr/bin/beckon
Rss:                1200 kB
Anonymous:             0 kB
55d0c0400000-55d0c1400000 r-xp 00400000 fd:01 123  /usr/bin/beckon
Rss:                9000 kB
Anonymous:             0 kB
55d0c1400000-55d0c1480000 r--p 01400000 fd:01 123  /usr/bin/beckon
Rss:                 700 kB
Anonymous:           700 kB
55d0c1480000-55d0c1500000 rw-p 01480000 fd:01 123  /usr/bin/beckon
Anonymous:            28 kB
55d0c2000000-55d0c2100000 rw-p 00000000 00:00 0    [heap]
Anonymous:           300 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 456  /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
";
        assert_eq!(
            file_only_mappings_of(smaps, Path::new("/usr/bin/beckon")),
            vec![
                (0x55d0_c000_0000, 0x55d0_c040_0000),
                (0x55d0_c040_0000, 0x55d0_c140_0000)
            ],
            "the relocated read-only part, the writable data and other files stay"
        );
        assert!(file_only_mappings_of(smaps, Path::new("/usr/bin/other")).is_empty());
    }

    /// The resident file pages of this test program, from `/proc/self/status`.
    #[cfg(target_os = "linux")]
    fn rss_file_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("RssFile")
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_idle_memory_drops_program_pages_and_the_program_keeps_working() {
        let name = hostname();
        let before = rss_file_kib();
        release_idle_memory();
        let after = rss_file_kib();
        assert!(
            after < before,
            "resident file pages {before} KiB before, {after} KiB after"
        );
        let numbers: Vec<u64> = (0..1000).collect();
        assert_eq!(numbers.iter().sum::<u64>(), 499_500);
        assert_eq!(
            hostname(),
            name,
            "code runs again after its pages were dropped"
        );
    }
}
