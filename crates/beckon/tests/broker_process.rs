//! `beckon broker` as a process: first run, flags, config errors, SIGHUP reload and SIGTERM
//! drain. Children are killed on drop; every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_mqtt::{Connect, Packet, ProtocolVersion, ReasonCode, decode, encode};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use common::{Process, beckon_bin, beckon_command};

const WAIT: Duration = Duration::from_secs(15);

/// `beckon broker ARGS` started and reported ready.
fn start_broker(args: &[&str]) -> Process {
    let mut command = beckon_command(["broker"]);
    command
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::null());
    ready(Process::spawn("beckon broker", command))
}

fn ready(broker: Process) -> Process {
    broker.wait_stdout("beckon broker: ready", WAIT);
    broker
}

/// The rest of the stdout line starting with `prefix`.
fn line_after(broker: &Process, prefix: &str) -> String {
    let stdout = broker.stdout();
    stdout
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in {stdout:?}"))
        .trim()
        .to_owned()
}

fn tls_addr(broker: &Process) -> SocketAddr {
    line_after(broker, "beckon broker: MQTT over TLS on ")
        .parse()
        .expect("address")
}

fn plain_addr(broker: &Process) -> SocketAddr {
    line_after(broker, "beckon broker: plain MQTT on ")
        .parse()
        .expect("address")
}

fn connect_bytes(version: ProtocolVersion, id: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(
        &Packet::Connect(Box::new(Connect::new(version, id.to_owned(), 60))),
        version,
        &mut b,
    )
    .expect("encode");
    b.to_vec()
}

async fn recv<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Option<Packet> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(p) = decode(buf, ProtocolVersion::V5, 1 << 20).expect("valid") {
                return Some(p);
            }
            let mut chunk = [0u8; 2048];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("answer in time")
}

async fn mqtt_v5<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, id: &str) -> BytesMut {
    s.write_all(&connect_bytes(ProtocolVersion::V5, id))
        .await
        .expect("write");
    let mut buf = BytesMut::new();
    match recv(s, &mut buf).await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS, "{a:?}"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    buf
}

async fn ping<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, buf: &mut BytesMut) {
    s.write_all(&[0xC0, 0x00]).await.expect("write");
    assert_eq!(recv(s, buf).await, Some(Packet::PingResp));
}

fn tls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in beckon_pki::load_certificates(ca).expect("ca") {
        roots.add(c).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(tls_config(ca)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn bare_broker_creates_its_ca_once_and_serves_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8 path");
    let args = [
        "--data",
        data_arg,
        "--mqtts",
        "127.0.0.1:0",
        "--allow-anonymous",
    ];
    let mut broker = start_broker(&args);
    let ca = PathBuf::from(line_after(
        &broker,
        "beckon broker: clients must trust the CA certificate ",
    ));
    assert_eq!(ca, data.join("ca.pem"));
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert!(data.join(f).exists(), "{f} created");
    }
    let stdout = broker.stdout();
    assert!(
        stdout
            .iter()
            .any(|l| l.contains("file descriptor limit") && l.contains("connections")),
        "fd limit printed: {stdout:?}"
    );
    let ca_before = std::fs::read(&ca).expect("read");
    let addr = tls_addr(&broker);
    runtime().block_on(async {
        let mut tls = tls_connect(addr, &ca)
            .await
            .expect("TLS with the printed CA");
        let mut buf = mqtt_v5(&mut tls, "first").await;
        ping(&mut tls, &mut buf).await;
    });
    broker.signal("TERM");
    assert!(broker.wait_exit(WAIT).success());
    drop(broker);

    // Second run: same CA.
    let mut again = start_broker(&args);
    assert_eq!(std::fs::read(&ca).expect("read"), ca_before, "CA reused");
    again.signal("INT");
    assert!(again.wait_exit(WAIT).success());
}

#[test]
fn sigterm_drains_with_0x8b_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut broker = start_broker(&[
        "--data",
        data.to_str().expect("path"),
        "--mqtts",
        "off",
        "--mqtt",
        "127.0.0.1:0",
        "--allow-anonymous",
    ]);
    let addr = plain_addr(&broker);
    let rt = runtime();
    let (mut tcp, mut buf) = rt.block_on(async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let buf = mqtt_v5(&mut tcp, "drained").await;
        (tcp, buf)
    });
    broker.signal("TERM");
    rt.block_on(async {
        match recv(&mut tcp, &mut buf).await {
            Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode::SERVER_SHUTTING_DOWN),
            other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
        }
        assert_eq!(recv(&mut tcp, &mut buf).await, None);
    });
    let status = broker.wait_exit(WAIT);
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn sighup_reloads_certificates_without_dropping_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let day = Duration::from_secs(24 * 3600);
    let old_ca = beckon_pki::CertificateAuthority::generate("old", day).expect("ca");
    let new_ca = beckon_pki::CertificateAuthority::generate("new", day).expect("ca");
    let (old_ca_path, new_ca_path) = (dir.path().join("old-ca.pem"), dir.path().join("new-ca.pem"));
    std::fs::write(&old_ca_path, old_ca.cert_pem()).expect("write");
    std::fs::write(&new_ca_path, new_ca.cert_pem()).expect("write");
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    let names = vec!["localhost".to_owned()];
    old_ca
        .issue_server(&names, day)
        .expect("issue")
        .save(&cert, &key)
        .expect("save");
    // Polling off: only SIGHUP reloads.
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "[tls]\nreload_interval_secs = 0\n").expect("write");
    let mut broker = start_broker(&[
        "--config",
        config.to_str().expect("path"),
        "--data",
        dir.path().join("data").to_str().expect("path"),
        "--mqtts",
        "127.0.0.1:0",
        "--cert",
        cert.to_str().expect("path"),
        "--key",
        key.to_str().expect("path"),
        "--allow-anonymous",
    ]);
    let addr = tls_addr(&broker);
    let rt = runtime();
    let (mut live, mut live_buf) = rt.block_on(async {
        let mut tls = tls_connect(addr, &old_ca_path).await.expect("TLS");
        let buf = mqtt_v5(&mut tls, "live").await;
        (tls, buf)
    });
    new_ca
        .issue_server(&names, day)
        .expect("issue")
        .save(&cert, &key)
        .expect("save");
    // Not reloaded without the signal.
    std::thread::sleep(Duration::from_millis(1500));
    rt.block_on(async {
        assert!(
            tls_connect(addr, &new_ca_path).await.is_err(),
            "no reload before SIGHUP"
        );
    });
    broker.signal("HUP");
    rt.block_on(async {
        let deadline = Instant::now() + WAIT;
        while tls_connect(addr, &new_ca_path).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "new certificate never served after SIGHUP"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ping(&mut live, &mut live_buf).await;
    });
    broker.signal("TERM");
    assert!(broker.wait_exit(WAIT).success());
}

#[test]
fn bad_configuration_names_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broken.toml");
    std::fs::write(&config, "[limits]\nmax_conections = 3\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_beckon"))
        .args(["broker", "--config", config.to_str().expect("path")])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.toml") && err.contains("max_conections"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_beckon"))
        .args(["broker", "--mqtts", "8883"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("IP:PORT"));
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn running_out_of_file_descriptors_pauses_accepts_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.toml");
    // Above what 48 descriptors allow, so that accept() itself hits EMFILE.
    std::fs::write(&config, "[limits]\nmax_connections = 1000\n").expect("write");
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -n 48 && exec \"$0\" \"$@\"")
        .arg(beckon_bin())
        .args(["broker", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(dir.path().join("data"))
        .args([
            "--mqtts",
            "off",
            "--mqtt",
            "127.0.0.1:0",
            "--allow-anonymous",
        ])
        .env("RUST_LOG", "info")
        .stderr(stderr);
    let mut broker = ready(Process::spawn("beckon broker", command));
    let stdout = broker.stdout();
    assert!(
        stdout
            .iter()
            .any(|l| l.contains("file descriptor limit 48")),
        "{stdout:?}"
    );
    let addr = plain_addr(&broker);
    let pid = broker.id();
    let rt = runtime();
    rt.block_on(async {
        // Far more clients than descriptors: the broker serves what it can and pauses.
        let mut clients = Vec::new();
        for _ in 0..80 {
            let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
                .await
                .expect("connect in time (backlog)")
                .expect("connect");
            clients.push(tcp);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = cpu_ticks(pid);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used = cpu_ticks(pid) - before;
        // 2 s at 100 ticks/s: a spinning accept loop would use about 200 ticks.
        assert!(used < 100, "accept loop spins: {used} ticks in 2 s");
        assert!(broker.is_running(), "broker died");
        drop(clients);
        // Once descriptors are free again, a new client is served.
        let deadline = Instant::now() + WAIT;
        loop {
            let attempt = async {
                let mut tcp = TcpStream::connect(addr).await.ok()?;
                tcp.write_all(&connect_bytes(ProtocolVersion::V5, "after"))
                    .await
                    .ok()?;
                let mut buf = BytesMut::new();
                recv(&mut tcp, &mut buf).await
            };
            if let Ok(Some(Packet::ConnAck(a))) =
                tokio::time::timeout(Duration::from_secs(2), attempt).await
            {
                assert_eq!(a.code, ReasonCode::SUCCESS);
                break;
            }
            assert!(Instant::now() < deadline, "broker never recovered");
        }
    });
    let log = std::fs::read_to_string(&stderr_path).expect("log");
    assert!(log.contains("out of file descriptors"), "{log}");
    broker.signal("TERM");
    assert!(broker.wait_exit(WAIT).success());
}
