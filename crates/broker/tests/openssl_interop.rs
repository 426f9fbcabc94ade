//! Interop with OpenSSL's `s_client` on TLS 1.3: key updates in both directions in the
//! middle of an MQTT session, on the broker's own record layer. `s_client` runs as a child
//! process with piped stdin and stdout; every wait is bounded and the child is killed at the
//! end, so the test cannot hang.

mod common;

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beckon_broker::{BrokerConfig, Listen, Server};
use beckon_mqtt::{Connect, Packet, ProtocolVersion, QoS, encode};
use bytes::{Bytes, BytesMut};

use common::{WAIT, publish_packet, subscribe_packet};

/// `openssl s_client` in its interactive mode, where a line `k` sends a KeyUpdate and `K`
/// one that requests an update back. `-msg` prints every TLS message sent (`>>>`) and
/// received (`<<<`), application data goes to stdout as it is.
struct SClient {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
}

impl SClient {
    fn start(port: u16, ca: &std::path::Path) -> Self {
        let mut child = Command::new("openssl")
            .args(["s_client", "-tls1_3", "-msg", "-servername", "localhost"])
            .arg("-connect")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-CAfile")
            .arg(ca)
            .args(["-verify_return_error", "-alpn", "mqtt"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client runs (install OpenSSL's command line tool)");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&out);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                sink.lock().expect("output").extend_from_slice(&buf[..n]);
            }
        });
        Self { child, stdin, out }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).expect("write to s_client");
        self.stdin.flush().expect("flush");
    }

    fn send_packet(&mut self, packet: &Packet) {
        let mut b = BytesMut::new();
        encode(packet, ProtocolVersion::V311, &mut b).expect("encode");
        self.send(&b);
    }

    /// How often `needle` occurs in what s_client printed.
    fn count(&self, needle: &[u8]) -> usize {
        let out = self.out.lock().expect("output");
        out.windows(needle.len()).filter(|w| *w == needle).count()
    }

    /// Waits until `needle` was printed `times` times.
    fn wait_for(&self, what: &str, needle: &[u8], times: usize) {
        let deadline = Instant::now() + WAIT;
        while self.count(needle) < times {
            if Instant::now() > deadline {
                let out = self.out.lock().expect("output");
                panic!(
                    "{what}: not seen in time; s_client printed:\n{}",
                    String::from_utf8_lossy(&out)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The line `-msg` prints for a KeyUpdate, sent (`>>>`) or received (`<<<`).
fn key_update(direction: &str) -> Vec<u8> {
    format!("{direction} TLS 1.3, Handshake [length 0005], KeyUpdate").into_bytes()
}

const CONNACK_ACCEPTED: &[u8] = &[0x20, 0x02, 0x00, 0x00];
const PINGRESP: &[u8] = &[0xd0, 0x00];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_updates_both_ways_with_openssl_s_client_mid_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = BrokerConfig {
        data_dir: dir.path().join("data"),
        ..BrokerConfig::default()
    };
    config.listeners.mqtts = Listen(Some("127.0.0.1:0".parse().expect("addr")));
    config.listeners.mqtt = Listen(None);
    config.allow_anonymous = true;
    let (bound, handle) = Server::bind(config).await.expect("server starts");
    let port = bound.mqtts.expect("TLS listener").port();
    let ca = bound.generated_ca.clone().expect("generated CA");

    let session = tokio::task::spawn_blocking(move || {
        let mut client = SClient::start(port, &ca);
        client.send_packet(&Packet::Connect(Box::new(Connect::new(
            ProtocolVersion::V311,
            "openssl-key-update",
            60,
        ))));
        client.wait_for("CONNACK", CONNACK_ACCEPTED, 1);
        client.send_packet(&subscribe_packet(
            1,
            &["interop/key-update"],
            QoS::AtMostOnce,
        ));
        client.wait_for("SUBACK", &[0x90, 0x03, 0x00, 0x01, 0x00], 1);

        // The client moves to a new sending key; the broker must read on with it.
        client.send(b"k\n");
        client.wait_for("the client's KeyUpdate", &key_update(">>>"), 1);
        client.send_packet(&Packet::PingReq);
        client.wait_for("PINGRESP after the client's key update", PINGRESP, 1);

        // The client asks for an update back: the broker answers with its own KeyUpdate and
        // sends under its new key from then on.
        client.send(b"K\n");
        client.wait_for("the requesting KeyUpdate", &key_update(">>>"), 2);
        client.wait_for("the broker's KeyUpdate", &key_update("<<<"), 1);
        let payload = Bytes::from_static(b"after both key updates");
        client.send_packet(&publish_packet(
            "interop/key-update",
            QoS::AtMostOnce,
            0,
            payload,
        ));
        client.wait_for(
            "the message back through the broker",
            b"after both key updates",
            1,
        );
        client.send_packet(&Packet::PingReq);
        client.wait_for("PINGRESP under the new keys", PINGRESP, 2);
    });
    tokio::time::timeout(Duration::from_secs(60), session)
        .await
        .expect("the session ends in time")
        .expect("the session");
    tokio::time::timeout(WAIT, handle.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
}
