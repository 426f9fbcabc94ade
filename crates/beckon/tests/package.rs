//! The Debian package of scripts/package as an operator meets it: built from the binary under
//! test, installed with `dpkg -i` into this machine, its files where the package says,
//! its units the files of dist/ and accepted by `systemd-analyze verify` (and rated by
//! `systemd-analyze security`), the broker starting with the shipped configuration and `beckon
//! up` answering from the installed binary, a changed conffile kept by a reinstall and by
//! `dpkg -r`, and nothing left after `dpkg --purge`.
//!
//! Needs root and Debian's dpkg, dpkg-dev and systemd (for systemd-analyze; systemd need not
//! run). It refuses to start when the machine already has Beckon installed or its folders
//! (/etc/beckon, /var/lib/beckon...), which the purge at the end would delete. The package is
//! purged when the test ends, failed or not.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Process, Up, beckon_bin, command_of, free_port, succeeded};

const LIMIT: Duration = Duration::from_secs(120);
const INSTALLED: &str = "/usr/bin/beckon";
const UNITS: [&str; 3] = ["beckon-broker", "beckon-console", "beckon-agent"];
const CONFFILES: [&str; 2] = ["broker.toml", "console.env"];
/// Where Beckon keeps things on a host: the purge deletes them all.
const BECKON_PATHS: [&str; 8] = [
    "/etc/beckon",
    "/etc/beckon-agent",
    "/var/lib/beckon",
    "/var/lib/beckon-console",
    "/var/lib/beckon-agent",
    "/var/lib/private/beckon",
    "/var/lib/private/beckon-console",
    "/var/lib/private/beckon-agent",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `program args` to its end; its output, after checking that it succeeded.
fn run(program: &str, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    succeeded(command, LIMIT)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The package's state as dpkg records it ("install ok installed"), or None when dpkg knows no
/// package beckon.
fn package_status() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "beckon"])
        .stderr(Stdio::null())
        .output()
        .expect("dpkg-query");
    let status = stdout(&out);
    (out.status.success() && status != "unknown ok not-installed").then_some(status)
}

/// The installed package: purged on drop, so that a failed test leaves nothing behind.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        // No panic here: this may run while a failed assertion unwinds.
        let _ = Command::new("timeout")
            .args(["120", "dpkg", "--purge", "beckon"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
    }
}

#[test]
fn the_debian_package_installs_verifies_runs_and_purges() {
    let uid = stdout(&run("id", &["-u"]));
    assert_eq!(uid, "0", "dpkg -i needs root: run this test as root");
    assert_eq!(
        package_status(),
        None,
        "a package beckon is on this machine: this test would replace it and purge it"
    );
    for path in BECKON_PATHS {
        assert!(
            !Path::new(path).exists(),
            "{path} exists: this test's purge would delete it"
        );
    }
    let repo = repo();
    let dist = repo.join("dist");

    // Built from the binary under test, named as Debian names packages.
    let out_dir = tempfile::tempdir().unwrap();
    let script = repo.join("scripts/package");
    let binary = beckon_bin();
    let mut package = Command::new(&script);
    package
        .args(["--binary", &binary, "--out"])
        .arg(out_dir.path())
        // gzip instead of xz: the same package, and a third of a minute less for the debug
        // binary on a busy machine.
        .env("DPKG_DEB_COMPRESSOR_TYPE", "gzip");
    let built = succeeded(package, LIMIT);
    let version = env!("CARGO_PKG_VERSION");
    let arch = stdout(&run("dpkg", &["--print-architecture"]));
    let deb = out_dir.path().join(format!("beckon_{version}_{arch}.deb"));
    assert_eq!(stdout(&built), deb.to_str().unwrap(), "the path it prints");
    let deb = deb.to_str().unwrap().to_owned();

    let _installed = Installed;
    run("dpkg", &["-i", &deb]);
    assert_eq!(package_status().as_deref(), Some("install ok installed"));

    // The files: the binary, the units and the configuration of dist/ as they are (one place).
    let installed_version = run(INSTALLED, &["--version"]);
    assert_eq!(stdout(&installed_version), format!("beckon {version}"));
    for unit in UNITS {
        let file = format!("/usr/lib/systemd/system/{unit}.service");
        let shipped = std::fs::read(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
        let source = std::fs::read(dist.join(format!("{unit}.service"))).unwrap();
        assert!(shipped == source, "{file} differs from dist/{unit}.service");
    }
    let conffiles = stdout(&run("dpkg-query", &["-W", "-f=${Conffiles}", "beckon"]));
    for name in CONFFILES {
        let file = format!("/etc/beckon/{name}");
        assert!(
            std::fs::read(&file).unwrap() == std::fs::read(dist.join(name)).unwrap(),
            "{file} differs from dist/{name}"
        );
        assert!(
            conffiles.contains(&file),
            "{file} is not a conffile: {conffiles}"
        );
    }
    for doc in ["copyright", "changelog.gz", "deployment.md"] {
        let file = format!("/usr/share/doc/beckon/{doc}");
        assert!(Path::new(&file).is_file(), "{file} is missing");
    }

    // The units as systemd reads them: valid (each ExecStart names the installed binary), and
    // sandboxed (exposure 2.0 or less on systemd's scale of 10; 1.4 to 1.7 today).
    for unit in UNITS {
        let file = format!("/usr/lib/systemd/system/{unit}.service");
        let verify = run("systemd-analyze", &["verify", &file]);
        let said = format!(
            "{}{}",
            stdout(&verify),
            String::from_utf8_lossy(&verify.stderr)
        );
        assert_eq!(said.trim(), "", "systemd-analyze verify {file}");
        run(
            "systemd-analyze",
            &["security", "--offline=yes", "--threshold=20", &file],
        );
    }

    // The broker's unit starts it with the shipped configuration: it must load.
    let data = tempfile::tempdir().unwrap();
    let mqtts = format!("127.0.0.1:{}", free_port());
    let mut broker = command_of(INSTALLED, ["broker", "--config", "/etc/beckon/broker.toml"]);
    broker
        .arg("--data")
        .arg(data.path().join("broker"))
        .args(["--mqtts", &mqtts])
        .stderr(Stdio::piped());
    let broker = Process::spawn("installed beckon broker", broker);
    broker.wait_stdout("beckon broker: ready", Duration::from_secs(40));
    drop(broker);

    // `beckon up` from the installed binary answers: the admin logs in, the console reaches
    // its broker.
    let up = Up::start_bin(INSTALLED, &data.path().join("up"), 0, true);
    let password = up
        .password()
        .unwrap_or_else(|| panic!("no admin password printed: {:?}", up.stdout));
    let cookie = up.login(&password);
    up.wait_push_connected(&cookie);
    drop(up);

    // A changed conffile survives a reinstall (the upgrade path of the maintainer scripts)
    // and a removal; the purge deletes it with everything else.
    let env_file = "/etc/beckon/console.env";
    let changed = "BECKON_CONSOLE_LISTEN=0.0.0.0:8080\n";
    std::fs::write(env_file, changed).unwrap();
    run("dpkg", &["-i", &deb]);
    assert_eq!(std::fs::read_to_string(env_file).unwrap(), changed);
    run("dpkg", &["-r", "beckon"]);
    assert!(!Path::new(INSTALLED).exists(), "dpkg -r left {INSTALLED}");
    assert_eq!(std::fs::read_to_string(env_file).unwrap(), changed);
    assert_eq!(
        package_status().as_deref(),
        Some("deinstall ok config-files")
    );
    run("dpkg", &["--purge", "beckon"]);
    assert_eq!(
        package_status(),
        None,
        "dpkg --purge left the package known"
    );
    for path in BECKON_PATHS.iter().chain(&[
        "/usr/lib/systemd/system/beckon-broker.service",
        "/usr/share/doc/beckon",
    ]) {
        assert!(!Path::new(path).exists(), "dpkg --purge left {path}");
    }
}
