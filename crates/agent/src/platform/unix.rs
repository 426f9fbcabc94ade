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
