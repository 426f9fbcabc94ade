//! `TrustAnchors::CaFileAndSystem`: an agent that keeps its console's CA and also trusts the
//! system store reaches a broker on either. The "system store" is a PEM file named by
//! `SSL_CERT_FILE`: the test runs itself again as a child process with it set (the
//! environment of a running test process is not to be changed).

mod support;

use beckon_net::{TlsClient, TlsError, TlsSettings, TrustAnchors};
use support::*;
use tokio::net::TcpStream;

async fn handshake(client: &TlsClient, server: &TlsServer) -> Result<(), TlsError> {
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    client
        .connect(tcp, "localhost", &["mqtt"], WAIT)
        .await
        .map(|_| ())
}

const CHILD: &str = "BECKON_TEST_SYSTEM_ROOTS_CHILD";

#[test]
fn the_ca_file_and_the_system_store_are_both_trusted() {
    if std::env::var_os(CHILD).is_some() {
        return tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(check_both_trusted());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "the_ca_file_and_the_system_store_are_both_trusted",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .env("SSL_CERT_FILE", dir.path().join("system-store.pem"))
        .env_remove("SSL_CERT_DIR")
        .output()
        .expect("run the test binary");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the check ran: {text}");
}

async fn check_both_trusted() {
    let dir = std::path::PathBuf::from(std::env::var_os(CHILD).expect("folder"));
    let console_ca = TestCa::new("Beckon tenant CA");
    let public_ca = TestCa::new("Public web CA");
    let ca_file = console_ca.write_pem(&dir, "ca.pem");
    public_ca.write_pem(&dir, "system-store.pem");

    let on_console_ca = start_tls_server(server_config(
        console_ca.server_cert(&["localhost"]),
        &["mqtt"],
    ))
    .await;
    let on_public_ca = start_tls_server(server_config(
        public_ca.server_cert(&["localhost"]),
        &["mqtt"],
    ))
    .await;
    let client = |trust| {
        TlsClient::new(&TlsSettings {
            trust,
            ..TlsSettings::default()
        })
        .expect("TLS client")
    };

    let both = client(TrustAnchors::CaFileAndSystem(ca_file.clone()));
    handshake(&both, &on_console_ca)
        .await
        .expect("a broker on the console's CA");
    handshake(&both, &on_public_ca)
        .await
        .expect("a broker with a public certificate");

    // Without the switch, the public certificate is refused: what the switch is for.
    let file_only = client(TrustAnchors::CaFile(ca_file));
    handshake(&file_only, &on_console_ca)
        .await
        .expect("console CA");
    let refused = handshake(&file_only, &on_public_ca).await;
    assert!(
        matches!(refused, Err(TlsError::UntrustedCertificate { .. })),
        "{refused:?}"
    );
}
