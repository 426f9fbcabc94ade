//! Real peers from Debian's packages, started on free loopback ports with a generated
//! configuration and killed on drop: tinyproxy, squid and Mosquitto.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ServerIdentity, TestCa, WAIT, free_port};

/// The program `name` from `PATH` or one of `places`; fails the test naming the Debian
/// `package` to install when it is not there.
pub fn find_program(name: &str, places: &[&str], package: &str) -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    candidates.extend(places.iter().map(PathBuf::from));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed, and this test needs the real one: install it with \
                 `apt-get install {package}` (the project's scripts/test installs it)"
            )
        })
}

/// Waits until something accepts TCP on `127.0.0.1:port`; fails the test after [`WAIT`] with
/// `output()` (what the program printed).
pub fn wait_listening(port: u16, what: &str, output: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on 127.0.0.1:{port} within {WAIT:?}; its output:\n{}",
            output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process with its folder and output log, killed on drop.
struct Peer {
    child: Child,
    dir: tempfile::TempDir,
}

impl Peer {
    fn spawn(program: &Path, args: &[&std::ffi::OsStr], dir: tempfile::TempDir) -> Self {
        let log = std::fs::File::create(dir.path().join("output.log")).expect("log file");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self { child, dir }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Debian's tinyproxy on a free loopback port, allowing CONNECT only to the given ports.
pub struct Tinyproxy {
    peer: Peer,
    /// The proxy's port on 127.0.0.1.
    pub port: u16,
}

impl Tinyproxy {
    /// Starts tinyproxy allowing CONNECT only to `connect_ports`, and waits until it listens.
    pub fn start(connect_ports: &[u16]) -> Self {
        let binary = find_program(
            "tinyproxy",
            &["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"],
            "tinyproxy",
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let mut config = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nLogLevel Info\n\
             PidFile \"{}\"\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
            dir.path().join("tinyproxy.pid").display()
        );
        for p in connect_ports {
            config.push_str(&format!("ConnectPort {p}\n"));
        }
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf, config).expect("write tinyproxy config");
        let peer = Peer::spawn(
            &binary,
            &["-d".as_ref(), "-c".as_ref(), conf.as_os_str()],
            dir,
        );
        let proxy = Self { peer, port };
        wait_listening(port, "tinyproxy", || proxy.output());
        proxy
    }

    /// What tinyproxy printed so far.
    pub fn output(&self) -> String {
        self.peer.output()
    }

    /// Kills it now (a proxy that goes away).
    pub fn stop(&mut self) {
        self.peer.stop();
    }
}

/// Debian's squid on a free loopback port, demanding Basic authentication (`basic_ncsa_auth`
/// with a password file of one user) and allowing CONNECT only to the given ports. A throwaway
/// instance: its configuration, pid file and log live in its own temporary folder.
pub struct Squid {
    peer: Peer,
    /// The proxy's port on 127.0.0.1.
    pub port: u16,
}

impl Squid {
    /// Starts squid with the one user `user`/`password`, allowing CONNECT only to
    /// `connect_ports`, and waits until it listens.
    pub fn start(user: &str, password: &str, connect_ports: &[u16]) -> Self {
        let binary = find_program("squid", &["/usr/sbin/squid"], "squid");
        let helper = find_program(
            "basic_ncsa_auth",
            &["/usr/lib/squid/basic_ncsa_auth"],
            "squid",
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        // Started as root, squid works as the `proxy` user: let it into its folder.
        set_mode(dir.path(), 0o777);
        let d = dir.path();
        readable_file(d, "passwords", &format!("{user}:{}\n", apr1_hash(password)));
        let port = free_port();
        let ports: Vec<String> = connect_ports.iter().map(u16::to_string).collect();
        let config = format!(
            "http_port 127.0.0.1:{port}\n\
             pid_filename {dir}/squid.pid\n\
             cache_log {dir}/output.log\n\
             access_log stdio:{dir}/access.log\n\
             coredump_dir {dir}\n\
             netdb_filename none\n\
             cache deny all\n\
             shutdown_lifetime 0 seconds\n\
             auth_param basic program {helper} {dir}/passwords\n\
             auth_param basic realm beckon-test\n\
             acl allowed_ports port {ports}\n\
             acl CONNECT method CONNECT\n\
             acl users proxy_auth REQUIRED\n\
             http_access deny CONNECT !allowed_ports\n\
             http_access allow users\n\
             http_access deny all\n",
            dir = d.display(),
            helper = helper.display(),
            ports = ports.join(" "),
        );
        let conf = readable_file(d, "squid.conf", &config);
        readable_file(d, "output.log", "");
        set_mode(&d.join("output.log"), 0o666);
        let peer = Peer::spawn(
            &binary,
            &["-N".as_ref(), "-f".as_ref(), conf.as_os_str()],
            dir,
        );
        let proxy = Self { peer, port };
        wait_listening(port, "squid", || proxy.output());
        proxy
    }

    /// What squid logged so far (its cache log, then its access log).
    pub fn output(&self) -> String {
        let access =
            std::fs::read_to_string(self.peer.dir.path().join("access.log")).unwrap_or_default();
        format!("{}\n--- access log ---\n{access}", self.peer.output())
    }
}

/// An Apache MD5 (`$apr1$`) password hash, which squid's `basic_ncsa_auth` reads, made by
/// `openssl passwd`.
fn apr1_hash(password: &str) -> String {
    let openssl = find_program("openssl", &["/usr/bin/openssl"], "openssl");
    let out = Command::new(openssl)
        .args(["passwd", "-apr1", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(format!("{password}\n").as_bytes())?;
            child.wait_with_output()
        })
        .expect("run openssl passwd");
    assert!(
        out.status.success(),
        "openssl passwd failed: {}",
        out.status
    );
    String::from_utf8(out.stdout)
        .expect("hash")
        .trim()
        .to_owned()
}

/// Debian's Mosquitto on a loopback port.
pub struct Mosquitto {
    peer: Peer,
    /// The first listener's port on 127.0.0.1.
    pub port: u16,
}

impl Mosquitto {
    /// Anonymous plain MQTT on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port(), "")
    }

    /// Anonymous plain MQTT on `port`, plus `extra` configuration lines (more listeners,
    /// say), and waits until `port` listens.
    pub fn start_on(port: u16, extra: &str) -> Self {
        Self::start_with(port, |_| {
            format!("allow_anonymous true\nlistener {port} 127.0.0.1\n{extra}")
        })
    }

    /// TLS on a free port with the server `identity`, and the one user `user`/`password`.
    pub fn start_tls(identity: &ServerIdentity, user: &str, password: &str) -> Self {
        Self::start_tls_checking(identity, None, user, password)
    }

    /// Like [`Mosquitto::start_tls`], also requiring a client certificate issued by
    /// `client_ca`.
    pub fn start_tls_requiring_client_cert(
        identity: &ServerIdentity,
        client_ca: &TestCa,
        user: &str,
        password: &str,
    ) -> Self {
        Self::start_tls_checking(identity, Some(client_ca), user, password)
    }

    fn start_tls_checking(
        identity: &ServerIdentity,
        client_ca: Option<&TestCa>,
        user: &str,
        password: &str,
    ) -> Self {
        let passwd = find_program(
            "mosquitto_passwd",
            &["/usr/bin/mosquitto_passwd"],
            "mosquitto",
        );
        let port = free_port();
        Self::start_with(port, |dir| {
            let cert = readable_file(dir, "server.pem", &identity.cert_pem);
            let key = readable_file(dir, "server.key", &identity.key_pem);
            let pwfile = readable_file(dir, "passwords", "");
            let status = Command::new(&passwd)
                .arg("-b")
                .arg(&pwfile)
                .arg(user)
                .arg(password)
                .stdin(Stdio::null())
                .status()
                .expect("run mosquitto_passwd");
            assert!(status.success(), "mosquitto_passwd failed: {status}");
            set_mode(&pwfile, 0o644);
            let client_certs = client_ca.map_or_else(String::new, |ca| {
                let cafile = readable_file(dir, "client-ca.pem", &ca.pem());
                format!("cafile {}\nrequire_certificate true\n", cafile.display())
            });
            format!(
                "listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\nallow_anonymous false\n\
                 password_file {}\n{client_certs}",
                cert.display(),
                key.display(),
                pwfile.display()
            )
        })
    }

    /// Mosquitto with the configuration `config(dir)` returns (its listeners; persistence
    /// and logging are added), waiting until `port` listens. `dir` is the broker's own
    /// folder, readable by Mosquitto's user, for certificates and password files.
    pub fn start_with(port: u16, config: impl FnOnce(&Path) -> String) -> Self {
        let binary = find_program("mosquitto", &["/usr/sbin/mosquitto"], "mosquitto");
        let dir = tempfile::tempdir().expect("temporary directory");
        // Mosquitto started as root drops to its own user: it must be able to read the files.
        set_mode(dir.path(), 0o755);
        let text = format!(
            "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n{}",
            config(dir.path())
        );
        let conf = readable_file(dir.path(), "mosquitto.conf", &text);
        let peer = Peer::spawn(&binary, &["-c".as_ref(), conf.as_os_str()], dir);
        let broker = Self { peer, port };
        wait_listening(port, "mosquitto", || broker.output());
        broker
    }

    /// The broker's folder (its configuration and files).
    pub fn dir(&self) -> &Path {
        self.peer.dir.path()
    }

    /// What Mosquitto printed so far.
    pub fn output(&self) -> String {
        self.peer.output()
    }

    /// Kills it now (a broker that goes away).
    pub fn stop(&mut self) {
        self.peer.stop();
    }
}

fn readable_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a configuration file");
    set_mode(&path, 0o644);
    path
}

/// Mosquitto runs on Linux only; a Windows build of the tests (the agent's, under Wine) has
/// no file modes to set.
fn set_mode(path: &Path, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
}
