//! The TLS client against an in-test rustls server with rcgen-made certificates: what it
//! negotiates and reports, and how each certificate problem is worded.

mod support;

use std::time::Duration;

use beckon_net::time::format_utc;
use beckon_net::{
    ClientIdentity, TlsClient, TlsConfigError, TlsError, TlsSettings, TlsVersion, TrustAnchors,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn client_trusting(ca: &TestCa) -> TlsClient {
    TlsClient::new(&TlsSettings {
        trust: TrustAnchors::CaPem(ca.pem().into_bytes()),
        ..TlsSettings::default()
    })
    .expect("TLS client")
}

async fn tcp(server: &TlsServer) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(server.addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

#[tokio::test]
async fn negotiates_alpn_mqtt_and_reports_the_session() {
    let ca = TestCa::new("Beckon test CA");
    let mut server = start_tls_server(server_config(
        ca.server_cert_valid(&["localhost", "127.0.0.1"], (2020, 1, 1), (2030, 6, 15)),
        &["mqtt", "http/1.1"],
    ))
    .await;
    let client = client_trusting(&ca);

    let (mut stream, info) = client
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect("handshake");
    assert_eq!(info.alpn.as_deref(), Some("mqtt"));
    assert_eq!(info.version, Some(TlsVersion::Tls13));
    let suite = info.cipher_suite.clone().expect("a cipher suite");
    assert!(suite.starts_with("TLS13_"), "{suite}");
    assert_eq!(
        info.peer_chain.len(),
        2,
        "leaf and CA: {:?}",
        info.peer_chain
    );
    assert!(info.peer_chain[0].subject.contains("test broker"));
    assert!(info.peer_chain[0].issuer.contains("Beckon test CA"));
    let expiry = format_utc(info.chain_expiry().expect("expiry"));
    assert!(expiry.starts_with("2030-06-15"), "{expiry}");

    // Bytes really cross the connection both ways.
    stream.write_all(b"\x10\x0cMQTT-ish").await.expect("write");
    let mut back = [0u8; 10];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&back, b"\x10\x0cMQTT-ish");
    drop(stream);
    assert_eq!(
        server.next_served().await,
        Served::Raw {
            alpn: Some("mqtt".into()),
            client_cert: false
        }
    );
}

#[tokio::test]
async fn connects_by_ip_address() {
    let ca = TestCa::new("CA");
    let server = start_tls_server(server_config(
        ca.server_cert(&["localhost", "127.0.0.1"]),
        &["mqtt"],
    ))
    .await;
    let (_stream, info) = client_trusting(&ca)
        .connect(tcp(&server).await, "127.0.0.1", &["mqtt"], WAIT)
        .await
        .expect("an IP address SAN matches");
    assert_eq!(info.server_name, "127.0.0.1");
}

#[tokio::test]
async fn falls_back_to_tls12_unless_the_minimum_forbids_it() {
    let ca = TestCa::new("CA");
    let tls12_only = || {
        server_config_versions(
            ca.server_cert(&["localhost"]),
            &["mqtt"],
            &[&rustls::version::TLS12],
        )
    };
    let server = start_tls_server(tls12_only()).await;
    let (_s, info) = client_trusting(&ca)
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect("TLS 1.2 is accepted by default");
    assert_eq!(info.version, Some(TlsVersion::Tls12));

    let strict = TlsClient::new(&TlsSettings {
        trust: TrustAnchors::CaPem(ca.pem().into_bytes()),
        min_version: TlsVersion::Tls13,
        ..TlsSettings::default()
    })
    .expect("client");
    let server = start_tls_server(tls12_only()).await;
    let err = strict
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect_err("TLS 1.3 required");
    assert!(matches!(err, TlsError::Incompatible { .. }), "{err}");
    assert!(err.to_string().contains("TLS 1.3 or newer"), "{err}");
}

#[tokio::test]
async fn wrong_host_name_names_both_names() {
    let ca = TestCa::new("CA");
    let server = start_tls_server(server_config(
        ca.server_cert(&["broker.example"]),
        &["mqtt"],
    ))
    .await;
    let err = client_trusting(&ca)
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect_err("name mismatch");
    assert!(matches!(err, TlsError::WrongHostName { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("does not name it"), "{text}");
    assert!(text.contains("(it names broker.example)"), "{text}");
    assert!(text.contains("localhost"), "{text}");
}

#[tokio::test]
async fn expired_certificate_gives_the_date() {
    let ca = TestCa::new("CA");
    let server = start_tls_server(server_config(
        ca.server_cert_valid(&["localhost"], (2019, 1, 1), (2021, 3, 4)),
        &["mqtt"],
    ))
    .await;
    let err = client_trusting(&ca)
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect_err("expired");
    assert!(matches!(err, TlsError::ExpiredCertificate { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("expired on 2021-03-04"), "{text}");
    assert!(text.contains("renew"), "{text}");
}

#[tokio::test]
async fn certificate_not_valid_yet_points_at_the_clock() {
    let ca = TestCa::new("CA");
    let server = start_tls_server(server_config(
        ca.server_cert_valid(&["localhost"], (2090, 1, 1), (2095, 1, 1)),
        &["mqtt"],
    ))
    .await;
    let err = client_trusting(&ca)
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect_err("not yet valid");
    assert!(
        matches!(err, TlsError::NotYetValidCertificate { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("clock"), "{err}");
}

#[tokio::test]
async fn certificate_from_another_ca_is_untrusted() {
    let ours = TestCa::new("our CA");
    let theirs = TestCa::new("someone else's CA");
    let server =
        start_tls_server(server_config(theirs.server_cert(&["localhost"]), &["mqtt"])).await;
    let err = client_trusting(&ours)
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect_err("untrusted");
    assert!(
        matches!(err, TlsError::UntrustedCertificate { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("not signed by a trusted CA"),
        "{err}"
    );
}

#[tokio::test]
async fn system_store_does_not_trust_a_private_ca() {
    let ca = TestCa::new("private CA");
    let server = start_tls_server(server_config(ca.server_cert(&["localhost"]), &["mqtt"])).await;
    match TlsClient::new(&TlsSettings::default()) {
        Ok(client) => {
            let err = client
                .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
                .await
                .expect_err("a private CA is not in the system store");
            assert!(
                matches!(err, TlsError::UntrustedCertificate { .. }),
                "{err}"
            );
        }
        // A machine without a CA bundle: the error must say what to install.
        Err(e) => {
            assert!(matches!(e, TlsConfigError::NoSystemRoots { .. }), "{e}");
            assert!(e.to_string().contains("ca-certificates"), "{e}");
        }
    }
}

#[tokio::test]
async fn server_refusing_alpn_mqtt_is_reported() {
    let ca = TestCa::new("CA");
    let server =
        start_tls_server(server_config(ca.server_cert(&["localhost"]), &["http/1.1"])).await;
    let err = client_trusting(&ca)
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect_err("no common ALPN");
    assert!(matches!(err, TlsError::AlpnRefused { .. }), "{err}");
    assert!(
        err.to_string().contains("application protocol mqtt"),
        "{err}"
    );
}

#[tokio::test]
async fn client_certificate_is_presented_when_configured() {
    let ca = TestCa::new("CA");
    let (cert, key) = ca.client_cert_pem("agent-42");
    let mut server = start_tls_server(mtls_server_config(
        ca.server_cert(&["localhost"]),
        &ca,
        &["mqtt"],
    ))
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cert_path = dir.path().join("agent.crt");
    let key_path = dir.path().join("agent.key");
    std::fs::write(&cert_path, cert).expect("write");
    std::fs::write(&key_path, key).expect("write");
    let client = TlsClient::new(&TlsSettings {
        trust: TrustAnchors::CaFile(ca.write_pem(dir.path(), "ca.pem")),
        identity: Some(ClientIdentity::Files {
            cert: cert_path,
            key: key_path,
        }),
        ..TlsSettings::default()
    })
    .expect("client with identity");
    let (mut stream, _) = client
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect("mutual TLS");
    stream.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    drop(stream);
    assert_eq!(
        server.next_served().await,
        Served::Raw {
            alpn: Some("mqtt".into()),
            client_cert: true
        }
    );
}

#[tokio::test]
async fn missing_client_certificate_is_worded_on_first_read() {
    let ca = TestCa::new("CA");
    let server = start_tls_server(mtls_server_config(
        ca.server_cert(&["localhost"]),
        &ca,
        &["mqtt"],
    ))
    .await;
    let client = client_trusting(&ca);
    // TLS 1.3: the client finishes its handshake before the server checks its certificate.
    let (mut stream, info) = client
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect("client side of the handshake completes");
    assert_eq!(info.version, Some(TlsVersion::Tls13));
    let _ = stream.write_all(b"\x10\x00").await;
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("in time")
        .expect_err("the server refuses");
    let worded =
        TlsError::from_stream_error("localhost", &err, client.min_version()).expect("a TLS error");
    assert!(
        matches!(worded, TlsError::ClientCertificateRequired { .. }),
        "{worded}"
    );
    assert!(
        worded.to_string().contains("requires a client certificate"),
        "{worded}"
    );
}

#[tokio::test]
async fn a_plain_http_port_is_not_tls() {
    let (addr, _task) =
        start_scripted_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
    let ca = TestCa::new("CA");
    let stream = TcpStream::connect(addr).await.expect("connect");
    let err = client_trusting(&ca)
        .connect(stream, "localhost", &["mqtt"], WAIT)
        .await
        .expect_err("not TLS");
    assert!(matches!(err, TlsError::NotTls { .. }), "{err}");
    assert!(err.to_string().contains("did not answer in TLS"), "{err}");
}

#[tokio::test]
async fn a_server_closing_during_the_handshake_is_reported() {
    let (addr, _task) = start_scripted_server(b"").await;
    let ca = TestCa::new("CA");
    let stream = TcpStream::connect(addr).await.expect("connect");
    let err = client_trusting(&ca)
        .connect(stream, "localhost", &["mqtt"], WAIT)
        .await
        .expect_err("closed");
    assert!(matches!(err, TlsError::Closed { .. }), "{err}");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let (addr, _task) = start_silent_server().await;
    let ca = TestCa::new("CA");
    let stream = TcpStream::connect(addr).await.expect("connect");
    let err = client_trusting(&ca)
        .connect(stream, "localhost", &["mqtt"], Duration::from_millis(300))
        .await
        .expect_err("silent");
    assert!(matches!(err, TlsError::TimedOut { .. }), "{err}");
}

#[test]
fn unreadable_or_empty_ca_files_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing-ca.pem");
    let err = TlsClient::new(&TlsSettings {
        trust: TrustAnchors::CaFile(missing.clone()),
        ..TlsSettings::default()
    })
    .expect_err("missing file");
    assert!(
        matches!(err, TlsConfigError::FileUnreadable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("missing-ca.pem"), "{err}");

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let err = TlsClient::new(&TlsSettings {
        trust: TrustAnchors::CaFile(empty),
        ..TlsSettings::default()
    })
    .expect_err("no certificate");
    assert!(err.to_string().contains("holds no certificate"), "{err}");
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused() {
    let ca = TestCa::new("CA");
    let (cert, _key) = ca.client_cert_pem("agent-1");
    let (_other_cert, other_key) = ca.client_cert_pem("agent-2");
    let err = TlsClient::new(&TlsSettings {
        trust: TrustAnchors::CaPem(ca.pem().into_bytes()),
        identity: Some(ClientIdentity::Pem {
            cert: cert.into_bytes(),
            key: other_key.into_bytes(),
        }),
        ..TlsSettings::default()
    })
    .expect_err("mismatched key");
    assert!(matches!(err, TlsConfigError::Rejected(_)), "{err}");
}

#[tokio::test]
async fn a_configuration_built_elsewhere_can_be_used() {
    let ca = TestCa::new("CA");
    let server = start_tls_server(server_config(ca.server_cert(&["localhost"]), &["mqtt"])).await;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(ca.root_store())
    .with_no_client_auth();
    let client = TlsClient::from_config(config, TlsVersion::Tls12);
    let (_stream, info) = client
        .connect(tcp(&server).await, "localhost", &["mqtt"], WAIT)
        .await
        .expect("handshake");
    assert_eq!(info.alpn.as_deref(), Some("mqtt"));
}
