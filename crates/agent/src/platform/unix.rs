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
    page_out_program();
}

/// Asks the kernel to reclaim the resident pages of the executable's read-only mappings
/// (`MADV_PAGEOUT`, Linux 5.4; older kernels refuse and nothing happens). Pages other
/// processes map too are left alone by the kernel, and relocated (copied) pages would be
/// swapped, never lost: the advice changes no content.
#[cfg(target_os = "linux")]
fn page_out_program() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    for (start, end) in read_only_mappings_of(&maps, &exe) {
        // SAFETY: the range is a whole mapping of this process, and MADV_PAGEOUT never
        // changes what reads of it return.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT);
        }
    }
}

/// The address ranges of `/proc/self/maps` lines that map `file` without write permission.
#[cfg(any(target_os = "linux", test))]
fn read_only_mappings_of(maps: &str, file: &Path) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?.trim_start();
            if perms.as_bytes().get(1) != Some(&b'-') || Path::new(path) != file {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_programs_read_only_mappings_are_paged_out() {
        let maps = "\
55d0c0000000-55d0c0400000 r--p 00000000 fd:01 123  /usr/bin/beckon
55d0c0400000-55d0c1400000 r-xp 00400000 fd:01 123  /usr/bin/beckon
55d0c1400000-55d0c1500000 rw-p 01400000 fd:01 123  /usr/bin/beckon
55d0c2000000-55d0c2100000 rw-p 00000000 00:00 0    [heap]
7f0000000000-7f0000100000 r-xp 00000000 fd:01 456  /usr/lib/x86_64-linux-gnu/libc.so.6
";
        assert_eq!(
            read_only_mappings_of(maps, Path::new("/usr/bin/beckon")),
            vec![
                (0x55d0_c000_0000, 0x55d0_c040_0000),
                (0x55d0_c040_0000, 0x55d0_c140_0000)
            ]
        );
        assert!(read_only_mappings_of(maps, Path::new("/usr/bin/other")).is_empty());
    }

    #[test]
    fn releasing_idle_memory_leaves_the_program_working() {
        let before: Vec<u64> = (0..1000).collect();
        release_idle_memory();
        release_idle_memory();
        assert_eq!(before.iter().sum::<u64>(), 499_500);
        assert_eq!(hostname(), hostname(), "code runs again after the page-out");
    }
}
