//! What differs between operating systems, in one place: where the agent keeps its files and
//! who may read them, how it learns that it must stop, whether a process still runs, the
//! machine's name and inventory, the system's proxy setting, and how a command action reaches
//! `cmd.exe` or PowerShell.
//!
//! `unix.rs` serves Linux (and keeps to calls that exist on macOS too, with a fallback where
//! Linux files are read); `windows.rs` serves Windows. Both offer the same functions; the rest
//! of the crate calls them through this module only.

use std::path::PathBuf;

use serde::Deserialize;

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as os;

/// The agent as a Windows service (`windows-service`, whose entry point macro is `unsafe`).
#[cfg(windows)]
#[allow(unsafe_code)]
pub mod service;
#[cfg(windows)]
#[allow(unsafe_code)]
mod windows;
#[cfg(windows)]
use windows as os;

pub use os::{
    CONFIG_FILE, STATE_DIR, create_dir, gather_inventory, hostname, private_file_options,
    process_alive, release_idle_memory, system_proxy, wait_for_stop_signal,
};

/// The agent's default state folder: `/var/lib/beckon-agent` on Unix,
/// `%ProgramData%\Beckon` on Windows.
pub fn default_state_dir() -> PathBuf {
    os::default_state_dir()
}

/// The agent's default configuration file: `/etc/beckon-agent/agent.toml` on Unix,
/// `%ProgramData%\Beckon\agent.toml` on Windows.
pub fn default_config_file() -> PathBuf {
    os::default_config_file()
}

/// The interpreter a command action runs through, when it asks for one
/// (`actions.command.shell`); without it the program runs directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shell {
    /// `cmd.exe /D /S /C "<argv joined>"`.
    Cmd,
    /// `powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -Command "<argv joined>"`.
    Powershell,
}

/// The process a command action starts, and the name its messages use. `None` when `argv` is
/// empty.
pub fn action_command(
    shell: Option<Shell>,
    argv: &[String],
) -> Option<(String, tokio::process::Command)> {
    let (program, args) = argv.split_first()?;
    Some(match shell {
        None => {
            let mut command = tokio::process::Command::new(program);
            command.args(args);
            (program.clone(), command)
        }
        Some(Shell::Cmd) => {
            let mut command = tokio::process::Command::new("cmd.exe");
            os::cmd_line(&mut command, &command_line(argv));
            ("cmd.exe".to_owned(), command)
        }
        Some(Shell::Powershell) => {
            let mut command = tokio::process::Command::new("powershell.exe");
            command
                .args([
                    "-NoProfile",
                    "-NonInteractive",
                    "-ExecutionPolicy",
                    "Bypass",
                    "-Command",
                ])
                .arg(command_line(argv));
            ("powershell.exe".to_owned(), command)
        }
    })
}

/// `argv` as one line for an interpreter: words joined by spaces, a word holding a space or a
/// tab put in double quotes.
fn command_line(argv: &[String]) -> String {
    argv.iter()
        .map(|word| {
            if word.is_empty() || word.contains([' ', '\t']) {
                format!("\"{word}\"")
            } else {
                word.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn interpreter_lines_quote_words_with_spaces() {
        assert_eq!(
            command_line(&words(&[r"C:\Program Files\rmm\checkin.cmd", "--now", ""])),
            r#""C:\Program Files\rmm\checkin.cmd" --now """#
        );
        assert_eq!(command_line(&words(&["echo", "hi>x.txt"])), "echo hi>x.txt");
    }

    #[test]
    fn action_commands_name_the_program_that_runs() {
        assert!(action_command(None, &[]).is_none());
        let (name, _) = action_command(None, &words(&["/usr/bin/true"])).expect("direct");
        assert_eq!(name, "/usr/bin/true");
        let (name, _) = action_command(Some(Shell::Cmd), &words(&["echo", "hi"])).expect("cmd");
        assert_eq!(name, "cmd.exe");
        let (name, _) =
            action_command(Some(Shell::Powershell), &words(&["Get-Date"])).expect("powershell");
        assert_eq!(name, "powershell.exe");
    }

    #[test]
    fn shells_are_named_in_lowercase() {
        #[derive(Deserialize)]
        struct T {
            shell: Shell,
        }
        let t: T = toml::from_str("shell = \"powershell\"").expect("powershell");
        assert_eq!(t.shell, Shell::Powershell);
        let t: T = toml::from_str("shell = \"cmd\"").expect("cmd");
        assert_eq!(t.shell, Shell::Cmd);
        assert!(toml::from_str::<T>("shell = \"bash\"").is_err());
    }
}
