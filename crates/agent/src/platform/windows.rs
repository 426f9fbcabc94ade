//! Windows: the state folder under `%ProgramData%` with an access list for SYSTEM and the
//! Administrators only (`SetFileSecurityW`), Ctrl-C, Ctrl-Break, console close and shutdown as
//! stop signals, `OpenProcess` to see whether a process runs, and the inventory from the IP
//! helper API (`GetAdaptersAddresses`, through `network-interface`), and the system proxy from
//! the machine's WinHTTP default proxy (`WinHttpGetDefaultProxyConfiguration`).
//!
//! The one module of the crate with `unsafe`: a few Win32 calls, each commented.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::net::IpAddr;
use std::os::windows::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use network_interface::{Addr, NetworkInterface, NetworkInterfaceConfig as _};

use crate::inventory::{InterfaceAddress, Inventory, MAX_ADDRESSES, MAX_MACS, normalise_mac};

/// Default state folder when `%ProgramData%` is not set.
pub const STATE_DIR: &str = r"C:\ProgramData\Beckon";
/// Default configuration file when `%ProgramData%` is not set.
pub const CONFIG_FILE: &str = r"C:\ProgramData\Beckon\agent.toml";

pub(super) fn default_state_dir() -> PathBuf {
    match std::env::var_os("ProgramData") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("Beckon"),
        _ => PathBuf::from(STATE_DIR),
    }
}

pub(super) fn default_config_file() -> PathBuf {
    default_state_dir().join("agent.toml")
}

/// The state folder's access list in SDDL: protected (nothing inherited from
/// `%ProgramData%`), full control for SYSTEM (`SY`) and the Administrators (`BA`), inherited by
/// every file and folder inside it (`OICI`).
pub(crate) const PRIVATE_DACL: &str = "D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)";

/// Creates `dir` and its parents. A `mode` that gives nothing to group and others (0o700, the
/// state folder) becomes [`PRIVATE_DACL`] on the new folder: the Windows counterpart of 0700
/// for a service running as LocalSystem.
pub fn create_dir(dir: &Path, mode: u32) -> io::Result<()> {
    let existed = dir.is_dir();
    std::fs::create_dir_all(dir)?;
    if existed || mode & 0o077 != 0 {
        return Ok(());
    }
    set_dacl(dir, PRIVATE_DACL).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot limit the folder to SYSTEM and Administrators: {e}"),
        )
    })
}

fn wide(text: &OsStr) -> Vec<u16> {
    text.encode_wide().chain(Some(0)).collect()
}

/// Sets the access list of `path` from SDDL (`SetFileSecurityW`).
fn set_dacl(path: &Path, sddl: &str) -> io::Result<()> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::{
        DACL_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR,
        SetFileSecurityW,
    };
    let sddl = wide(OsStr::new(sddl));
    let path = wide(path.as_os_str());
    let mut descriptor: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: both strings are NUL-terminated UTF-16 that outlive the calls; the descriptor
    // the first call allocates is only passed to SetFileSecurityW and freed once, here.
    unsafe {
        if ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl.as_ptr(),
            SDDL_REVISION_1,
            &mut descriptor,
            std::ptr::null_mut(),
        ) == 0
        {
            return Err(io::Error::last_os_error());
        }
        let ok = SetFileSecurityW(
            path.as_ptr(),
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            descriptor,
        );
        let result = if ok == 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        LocalFree(descriptor);
        result
    }
}

/// The owner and access list of `path` in SDDL (`GetFileSecurityW`).
#[cfg(test)]
fn sddl_of(path: &Path) -> io::Result<String> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertSecurityDescriptorToStringSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::{
        DACL_SECURITY_INFORMATION, GetFileSecurityW, OWNER_SECURITY_INFORMATION,
    };
    let what = OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION;
    let path = wide(path.as_os_str());
    let mut buffer = vec![0u8; 4096];
    let mut needed = 0u32;
    let mut text: *mut u16 = std::ptr::null_mut();
    let mut len = 0u32;
    // SAFETY: the buffer is as long as we say; the string the second call allocates is read
    // within its length and freed once.
    unsafe {
        if GetFileSecurityW(
            path.as_ptr(),
            what,
            buffer.as_mut_ptr().cast(),
            buffer.len() as u32,
            &mut needed,
        ) == 0
        {
            return Err(io::Error::last_os_error());
        }
        if ConvertSecurityDescriptorToStringSecurityDescriptorW(
            buffer.as_mut_ptr().cast(),
            SDDL_REVISION_1,
            what,
            &mut text,
            &mut len,
        ) == 0
        {
            return Err(io::Error::last_os_error());
        }
        let sddl = String::from_utf16_lossy(std::slice::from_raw_parts(text, len as usize));
        LocalFree(text.cast());
        Ok(sddl.trim_end_matches('\0').to_owned())
    }
}

/// Options for the agent's private files: they inherit the state folder's access list.
pub fn private_file_options() -> OpenOptions {
    OpenOptions::new()
}

/// Whether process `pid` still runs (`OpenProcess`, then its exit code).
pub fn process_alive(pid: u32) -> bool {
    use windows_sys::Win32::Foundation::{CloseHandle, STILL_ACTIVE};
    use windows_sys::Win32::System::Threading::{
        GetExitCodeProcess, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    };
    // SAFETY: a handle OpenProcess returns is used for one query and closed once.
    unsafe {
        let handle = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid);
        if handle.is_null() {
            // No such process, or one we may not look at: an access error means it exists.
            return io::Error::last_os_error().raw_os_error() == Some(5);
        }
        let mut code = 0u32;
        let alive = GetExitCodeProcess(handle, &mut code) != 0 && code == STILL_ACTIVE as u32;
        CloseHandle(handle);
        alive
    }
}

/// Gives back what start-up left behind once the agent is idle: the working set is trimmed
/// (`SetProcessWorkingSetSize` with -1, -1), and the pages the agent uses again fault back in.
pub fn release_idle_memory() {
    use windows_sys::Win32::System::Threading::{GetCurrentProcess, SetProcessWorkingSetSize};
    // SAFETY: the pseudo handle of this process needs no closing; trimming the working set
    // changes no memory content.
    unsafe {
        SetProcessWorkingSetSize(GetCurrentProcess(), usize::MAX, usize::MAX);
    }
}

/// Returns on Ctrl-C, Ctrl-Break, the console closing, the system shutting down, or the
/// service control manager's Stop.
pub async fn wait_for_stop_signal() {
    use tokio::signal::windows::{ctrl_break, ctrl_c, ctrl_close, ctrl_shutdown};
    let service_stop = super::service::stop_requested();
    let (Ok(mut c), Ok(mut brk), Ok(mut close), Ok(mut shutdown)) =
        (ctrl_c(), ctrl_break(), ctrl_close(), ctrl_shutdown())
    else {
        // A service has no console: its stop comes from the manager.
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = service_stop.notified() => {}
        }
        return;
    };
    tokio::select! {
        _ = c.recv() => {}
        _ = brk.recv() => {}
        _ = close.recv() => {}
        _ = shutdown.recv() => {}
        () = service_stop.notified() => {}
    }
}

/// The system proxy for connections to `broker_host`: the machine's WinHTTP default proxy
/// (what `netsh winhttp set proxy` writes) and its bypass list. That is the setting a
/// LocalSystem service sees; the per-user Internet Options (WinINet) are not read.
pub fn system_proxy(broker_host: &str) -> crate::proxy::FoundProxy {
    match winhttp_default_proxy() {
        Ok((named, list, bypass)) => crate::proxy::from_winhttp(named, &list, &bypass, broker_host),
        Err(e) => crate::proxy::FoundProxy {
            proxy: None,
            source: format!("system proxy: the WinHTTP default proxy cannot be read ({e})"),
        },
    }
}

/// The WinHTTP default proxy: whether it is a named proxy, its proxy list and bypass list.
fn winhttp_default_proxy() -> io::Result<(bool, String, String)> {
    use windows_sys::Win32::Networking::WinHttp::{
        WINHTTP_ACCESS_TYPE_NAMED_PROXY, WINHTTP_PROXY_INFO, WinHttpGetDefaultProxyConfiguration,
    };
    let mut info = WINHTTP_PROXY_INFO {
        dwAccessType: 0,
        lpszProxy: std::ptr::null_mut(),
        lpszProxyBypass: std::ptr::null_mut(),
    };
    // SAFETY: `info` is a valid WINHTTP_PROXY_INFO; the strings the call allocates are read
    // and freed once by `take_global_string`.
    unsafe {
        if WinHttpGetDefaultProxyConfiguration(&mut info) == 0 {
            return Err(io::Error::last_os_error());
        }
        let list = take_global_string(info.lpszProxy);
        let bypass = take_global_string(info.lpszProxyBypass);
        Ok((
            info.dwAccessType == WINHTTP_ACCESS_TYPE_NAMED_PROXY,
            list,
            bypass,
        ))
    }
}

/// Reads a NUL-terminated UTF-16 string WinHTTP allocated with `GlobalAlloc`, and frees it.
///
/// # Safety
/// `text` is null or such a string, not used afterwards.
unsafe fn take_global_string(text: *mut u16) -> String {
    use windows_sys::Win32::Foundation::GlobalFree;
    if text.is_null() {
        return String::new();
    }
    // SAFETY: the caller hands a NUL-terminated string, read up to its NUL, then freed once.
    unsafe {
        let len = (0..).take_while(|&i| *text.add(i) != 0).count();
        let value = String::from_utf16_lossy(std::slice::from_raw_parts(text, len));
        GlobalFree(text.cast());
        value
    }
}

/// Sets the machine's WinHTTP default proxy as `netsh winhttp set proxy` does (`None`: direct
/// access, as `netsh winhttp reset proxy`); needs administrator rights. For tests.
#[cfg(test)]
fn set_winhttp_default_proxy(proxy: Option<(&str, &str)>) -> io::Result<()> {
    use windows_sys::Win32::Networking::WinHttp::{
        WINHTTP_ACCESS_TYPE_NAMED_PROXY, WINHTTP_ACCESS_TYPE_NO_PROXY, WINHTTP_PROXY_INFO,
        WinHttpSetDefaultProxyConfiguration,
    };
    let (mut list, mut bypass) = match proxy {
        Some((list, bypass)) => (wide(OsStr::new(list)), wide(OsStr::new(bypass))),
        None => (Vec::new(), Vec::new()),
    };
    let mut info = WINHTTP_PROXY_INFO {
        dwAccessType: if proxy.is_some() {
            WINHTTP_ACCESS_TYPE_NAMED_PROXY
        } else {
            WINHTTP_ACCESS_TYPE_NO_PROXY
        },
        lpszProxy: if proxy.is_some() {
            list.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        },
        lpszProxyBypass: if proxy.is_some() {
            bypass.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        },
    };
    // SAFETY: the strings are NUL-terminated UTF-16 that outlive the call, which copies them.
    if unsafe { WinHttpSetDefaultProxyConfiguration(&mut info) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The computer's name.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// This machine's inventory: name, Windows version (as `ver` prints it) and the addresses and
/// MACs of its network adapters.
pub fn gather_inventory() -> Inventory {
    let mut addresses = Vec::new();
    let mut macs = Vec::new();
    match NetworkInterface::show() {
        Ok(interfaces) => {
            for interface in interfaces {
                let mut has_address = false;
                for addr in &interface.addr {
                    let (address, prefix_len) = match addr {
                        Addr::V4(v4) => {
                            let ip = v4.ip;
                            if ip.is_loopback() || ip.is_link_local() || ip.is_unspecified() {
                                continue;
                            }
                            let prefix = v4.netmask.map_or(32, |m| u32::from(m).leading_ones());
                            (IpAddr::V4(ip), prefix as u8)
                        }
                        Addr::V6(v6) => {
                            let ip = v6.ip;
                            if ip.is_loopback() || (ip.segments()[0] & 0xffc0) == 0xfe80 {
                                continue;
                            }
                            // Windows' adapter list gives no IPv6 prefix here; /64 is the
                            // on-link prefix of nearly every IPv6 network.
                            let prefix = v6.netmask.map_or(64, |m| u128::from(m).leading_ones());
                            (IpAddr::V6(ip), prefix as u8)
                        }
                    };
                    has_address = true;
                    addresses.push(InterfaceAddress {
                        address,
                        prefix_len,
                    });
                }
                if has_address
                    && let Some(mac) = interface.mac_addr.as_deref().and_then(normalise_mac)
                {
                    macs.push(mac);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list the network adapters"),
    }
    addresses.sort();
    addresses.dedup();
    addresses.truncate(MAX_ADDRESSES);
    macs.sort();
    macs.dedup();
    macs.truncate(MAX_MACS);
    Inventory {
        hostname: hostname(),
        os: windows_version().unwrap_or_else(|| std::env::consts::OS.to_owned()),
        addresses,
        macs,
    }
}

/// `Microsoft Windows [Version 10.0.19045.3570]`, from `cmd /C ver`.
fn windows_version() -> Option<String> {
    let out = Command::new("cmd.exe")
        .args(["/D", "/C", "ver"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().filter(|c| !c.is_control()).take(200).collect())
}

/// `cmd.exe /D /S /C "<line>"`: with `/S`, cmd strips the outer quotes and runs the line as
/// written, whatever quotes it holds.
pub(super) fn cmd_line(command: &mut tokio::process::Command, line: &str) {
    command.args(["/D", "/S", "/C"]);
    command.raw_arg(format!("\"{line}\""));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trustees (SIDs or SDDL aliases) of the access entries in an SDDL string.
    fn trustees(sddl: &str) -> Vec<&str> {
        let dacl = sddl.split_once("D:").map_or("", |(_, d)| d);
        dacl.split('(')
            .filter_map(|ace| ace.strip_suffix(')')?.rsplit(';').next())
            .collect()
    }

    #[test]
    fn the_state_folder_is_for_system_and_administrators_only() {
        let base = tempfile::tempdir().expect("tempdir");
        let dir = base.path().join("state");
        create_dir(&dir, 0o700).expect("create and protect");
        let sddl = sddl_of(&dir).expect("read the access list");
        let owner = sddl
            .strip_prefix("O:")
            .and_then(|o| o.split("D:").next())
            .unwrap_or_default();
        let trustees = trustees(&sddl);
        assert!(trustees.contains(&"SY"), "SYSTEM: {sddl}");
        // Windows keeps the list as set: SYSTEM and the Administrators. Wine keeps Unix modes
        // instead and reads them back as SYSTEM and the owner; either way, no one else.
        assert!(
            trustees.iter().all(|t| ["SY", "BA", owner].contains(t)),
            "no one but SYSTEM, Administrators (and under Wine the owner): {sddl}"
        );
        // A folder anyone may read is created as usual.
        create_dir(&base.path().join("config"), 0o755).expect("create");
        assert!(base.path().join("config").is_dir());
    }

    #[test]
    fn this_process_runs_and_a_finished_one_does_not() {
        assert!(process_alive(std::process::id()));
        let mut child = Command::new("cmd.exe")
            .args(["/D", "/C", "exit 0"])
            .spawn()
            .expect("cmd.exe");
        let pid = child.id();
        child.wait().expect("wait");
        drop(child);
        assert!(!process_alive(pid));
    }

    #[tokio::test]
    async fn cmd_runs_the_line_as_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out file.txt");
        let argv = [
            "echo".to_owned(),
            "%BECKON_TEST%>".to_owned(),
            out.display().to_string(),
        ];
        let (name, mut command) =
            super::super::action_command(Some(super::super::Shell::Cmd), &argv).expect("argv");
        assert_eq!(name, "cmd.exe");
        let status = command
            .env("BECKON_TEST", "hello")
            .status()
            .await
            .expect("cmd.exe");
        assert!(status.success(), "{status}");
        let written = std::fs::read_to_string(&out).expect("the redirection wrote the file");
        assert_eq!(written.trim(), "hello");
    }

    /// Puts the WinHTTP default proxy back to direct access when the test ends, passed or
    /// not: the Wine prefix outlives the test.
    struct DirectAgain;

    impl Drop for DirectAgain {
        fn drop(&mut self) {
            let _ = set_winhttp_default_proxy(None);
        }
    }

    /// The machine's WinHTTP proxy, set as `netsh winhttp set proxy` sets it, is what the
    /// agent's system proxy finds, bypass list included; direct access means no proxy.
    #[test]
    fn the_system_proxy_is_the_winhttp_default_proxy() {
        let _direct_again = DirectAgain;
        set_winhttp_default_proxy(Some((
            "http=web.corp.example:80;https=127.0.0.1:3128",
            "<local>;*.internal.example",
        )))
        .expect("set the WinHTTP default proxy");
        let found = system_proxy("push.example.com");
        assert_eq!(
            found.proxy,
            Some(beckon_net::ProxyUrl::new("127.0.0.1", 3128)),
            "{found}"
        );
        assert!(found.source.contains("WinHTTP"), "{found}");
        // The same, through the setting the agent's configuration names.
        let setting = crate::proxy::ProxySetting::System;
        assert_eq!(
            crate::proxy::find(Some(&setting), "push.example.com").proxy,
            found.proxy
        );
        let bypassed = system_proxy("b1.internal.example");
        assert_eq!(bypassed.proxy, None, "{bypassed}");
        assert!(bypassed.source.contains("bypass"), "{bypassed}");
        assert_eq!(system_proxy("pushhost").proxy, None, "<local>");

        set_winhttp_default_proxy(None).expect("direct access");
        let direct = system_proxy("push.example.com");
        assert_eq!(direct.proxy, None, "{direct}");
    }

    #[test]
    fn the_inventory_names_this_machine() {
        let inventory = gather_inventory();
        assert!(!inventory.hostname.is_empty());
        assert!(inventory.os.contains("Windows"), "{}", inventory.os);
    }
}
