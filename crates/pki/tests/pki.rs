//! The local CA, certificate files and rustls configurations, checked with real in-memory TLS
//! handshakes.

use std::sync::Arc;
use std::time::Duration;

use beckon_pki::rustls::pki_types::{CertificateDer, ServerName};
use beckon_pki::rustls::{self, ClientConfig, ClientConnection, RootCertStore, ServerConnection};
use beckon_pki::{
    CertificateAuthority, IssuedCertificate, ReloadingServerConfig, ServerTlsOptions, TlsFiles,
    TlsVersion, certificate_identity, ensure_broker_certs, load_certificates, server_config,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

fn der(issued: &IssuedCertificate) -> CertificateDer<'static> {
    issued.cert_der().expect("der")
}

fn client_config(ca: &CertificateAuthority, client: Option<&IssuedCertificate>) -> ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca der"))
        .expect("add root");
    let builder = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(
                vec![der(c)],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
                    .expect("key"),
            )
            .expect("client auth"),
    }
}

/// Runs a handshake in memory; returns the server side for inspection.
fn handshake(
    client_cfg: ClientConfig,
    server_cfg: Arc<rustls::ServerConfig>,
    name: &str,
) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
    let mut client = ClientConnection::new(
        Arc::new(client_cfg),
        ServerName::try_from(name.to_owned()).expect("server name"),
    )?;
    let mut server = ServerConnection::new(server_cfg)?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("client write");
        }
        if !buf.is_empty() {
            server.read_tls(&mut buf.as_slice()).expect("server read");
            server.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).expect("server write");
        }
        if !buf.is_empty() {
            client.read_tls(&mut buf.as_slice()).expect("client read");
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok((client, server));
        }
    }
    panic!("handshake did not finish in 20 rounds");
}

struct Setup {
    _dir: tempfile::TempDir,
    ca: CertificateAuthority,
    files: TlsFiles,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::generate("test CA", 30 * DAY).expect("ca");
    let server = ca.issue_server(&names(), 30 * DAY).expect("server cert");
    let files = TlsFiles {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        client_ca: Some(dir.path().join("ca.pem")),
    };
    server.save(&files.cert, &files.key).expect("save server");
    ca.save(&dir.path().join("ca.pem"), &dir.path().join("ca.key"))
        .expect("save ca");
    Setup {
        _dir: dir,
        ca,
        files,
    }
}

fn mqtt_options() -> ServerTlsOptions {
    ServerTlsOptions {
        alpn: vec![b"mqtt".to_vec()],
        min_version: TlsVersion::Tls12,
    }
}

#[test]
fn server_certificate_verifies_for_dns_and_ip_names() {
    let s = setup();
    let cfg = Arc::new(server_config(&s.files, &mqtt_options()).expect("server config"));
    for name in ["localhost", "127.0.0.1", "::1"] {
        let (client, server) =
            handshake(client_config(&s.ca, None), cfg.clone(), name).expect("handshake");
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert!(
            server.peer_certificates().is_none(),
            "no client certificate"
        );
    }
    // A name that is not in the certificate is refused by the client.
    let err = handshake(client_config(&s.ca, None), cfg, "example.com").expect_err("bad name");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[test]
fn tls13_only_refuses_a_tls12_client() {
    let s = setup();
    let options = ServerTlsOptions {
        min_version: TlsVersion::Tls13,
        ..mqtt_options()
    };
    let cfg = Arc::new(server_config(&s.files, &options).expect("server config"));
    let mut roots = RootCertStore::empty();
    roots
        .add(load_certificates(s.files.client_ca.as_ref().expect("ca")).expect("ca")[0].clone())
        .expect("root");
    let tls12_client = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    assert!(handshake(tls12_client, cfg, "localhost").is_err());
}

#[test]
fn client_certificate_names_tenant_role_and_id() {
    let s = setup();
    let cfg = Arc::new(server_config(&s.files, &mqtt_options()).expect("server config"));
    let client_cert =
        s.ca.issue_client("agent-42", Some("tenant-a"), Some("agent"), DAY)
            .expect("client cert");
    let (_, server) =
        handshake(client_config(&s.ca, Some(&client_cert)), cfg, "localhost").expect("mTLS");
    let peer = server.peer_certificates().expect("client certificate seen");
    let id = certificate_identity(&peer[0]).expect("identity");
    assert_eq!(id.common_name.as_deref(), Some("agent-42"));
    assert_eq!(id.organization.as_deref(), Some("tenant-a"));
    assert_eq!(id.org_unit.as_deref(), Some("agent"));
}

#[test]
fn client_certificate_from_another_ca_fails_the_handshake() {
    let s = setup();
    let cfg = Arc::new(server_config(&s.files, &mqtt_options()).expect("server config"));
    let stranger = CertificateAuthority::generate("stranger", DAY).expect("ca");
    let foreign = stranger
        .issue_client("agent-1", None, None, DAY)
        .expect("client cert");
    assert!(handshake(client_config(&s.ca, Some(&foreign)), cfg, "localhost").is_err());
}

#[test]
fn csr_is_signed_with_the_subject_the_ca_chooses() {
    let s = setup();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "i-want-to-be-admin");
    let csr = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let issued =
        s.ca.issue_client_for_csr(&csr, "agent-7", Some("tenant-b"), Some("agent"), DAY)
            .expect("signed");
    assert!(issued.key_pem.is_empty());
    let id = certificate_identity(&der(&issued)).expect("identity");
    assert_eq!(id.common_name.as_deref(), Some("agent-7"));
    assert_eq!(id.organization.as_deref(), Some("tenant-b"));
}

#[test]
fn a_key_signed_twice_gets_two_serials() {
    let s = setup();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let serial = |issued: &IssuedCertificate| {
        let der = der(issued);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("certificate");
        cert.raw_serial().to_vec()
    };
    let first =
        s.ca.issue_client_for_csr(&csr, "agent-7", None, None, DAY)
            .expect("first");
    let again =
        s.ca.issue_client_for_csr(&csr, "agent-7", None, None, DAY)
            .expect("again");
    assert_ne!(serial(&first), serial(&again));
    assert_eq!(serial(&first).len(), 16);
}

#[test]
fn ca_saves_and_loads_with_owner_only_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::generate("roundtrip", DAY).expect("ca");
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    ca.save(&cert, &key).expect("save");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "CA key must be owner-only");
    }
    let loaded = CertificateAuthority::load(&cert, &key).expect("load");
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    // A certificate issued by the loaded CA verifies against the original CA certificate.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let files = TlsFiles {
        cert: dir2.path().join("s.pem"),
        key: dir2.path().join("s.key"),
        client_ca: None,
    };
    loaded
        .issue_server(&names(), DAY)
        .expect("issue")
        .save(&files.cert, &files.key)
        .expect("save");
    let cfg = Arc::new(server_config(&files, &mqtt_options()).expect("config"));
    handshake(client_config(&ca, None), cfg, "localhost").expect("handshake");

    // A key of another CA is refused with the file named.
    let other = CertificateAuthority::generate("other", DAY).expect("ca");
    let other_key = dir.path().join("other.key");
    other
        .save(&dir.path().join("other.pem"), &other_key)
        .expect("save");
    let err = CertificateAuthority::load(&cert, &other_key).expect_err("mismatched key");
    assert!(err.to_string().contains("other.key"), "{err}");
}

#[test]
fn ensure_broker_certs_creates_once_then_reuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let first = ensure_broker_certs(&data, &names()).expect("first run");
    assert!(first.created_ca && first.issued_server);
    let before: Vec<_> = [
        &first.ca_cert,
        &first.ca_key,
        &first.server_cert,
        &first.server_key,
    ]
    .iter()
    .map(|p| std::fs::read(p).expect("read"))
    .collect();
    let second = ensure_broker_certs(&data, &names()).expect("second run");
    assert!(!second.created_ca && !second.issued_server);
    let after: Vec<_> = [
        &second.ca_cert,
        &second.ca_key,
        &second.server_cert,
        &second.server_key,
    ]
    .iter()
    .map(|p| std::fs::read(p).expect("read"))
    .collect();
    assert_eq!(before, after, "files are reused unchanged");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [&second.ca_key, &second.server_key] {
            let mode = std::fs::metadata(key).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }
    // The generated pair works as a server configuration trusted by the generated CA.
    let ca = CertificateAuthority::load(&second.ca_cert, &second.ca_key).expect("ca");
    let files = TlsFiles {
        cert: second.server_cert.clone(),
        key: second.server_key.clone(),
        client_ca: Some(second.ca_cert.clone()),
    };
    let cfg = Arc::new(server_config(&files, &mqtt_options()).expect("config"));
    handshake(client_config(&ca, None), cfg, "127.0.0.1").expect("handshake");
}

#[test]
fn mismatched_key_is_refused_with_the_files_named() {
    let s = setup();
    let other = s.ca.issue_server(&names(), DAY).expect("other");
    let other_key = s.files.key.with_file_name("other.key");
    other
        .save(&s.files.cert.with_file_name("other.pem"), &other_key)
        .expect("save");
    let files = TlsFiles {
        key: other_key,
        ..s.files.clone()
    };
    let err = server_config(&files, &mqtt_options()).expect_err("mismatch");
    let msg = err.to_string();
    assert!(
        msg.contains("server.pem") && msg.contains("other.key"),
        "{msg}"
    );
}

#[test]
fn reload_swaps_on_good_files_and_keeps_the_old_on_bad_ones() {
    let s = setup();
    let holder = ReloadingServerConfig::new(s.files.clone(), mqtt_options()).expect("holder");
    let first = holder.current();
    assert!(holder.reload_if_changed().is_none(), "nothing changed yet");

    // A broken certificate file: the old configuration stays.
    std::fs::write(&s.files.cert, "garbage\n").expect("write");
    let result = holder.reload_if_changed().expect("change noticed");
    assert!(result.is_err());
    assert!(Arc::ptr_eq(&first, &holder.current()), "old config kept");
    assert!(
        holder.reload_if_changed().is_none(),
        "a broken file is reported once"
    );

    // A new valid certificate (a different CA) is taken for new handshakes.
    let new_ca = CertificateAuthority::generate("new CA", DAY).expect("ca");
    new_ca
        .issue_server(&names(), DAY)
        .expect("issue")
        .save(&s.files.cert, &s.files.key)
        .expect("save");
    holder
        .reload_if_changed()
        .expect("change noticed")
        .expect("reload ok");
    let second = holder.current();
    assert!(!Arc::ptr_eq(&first, &second));
    handshake(client_config(&new_ca, None), second, "localhost").expect("new cert in use");
    assert!(handshake(client_config(&s.ca, None), holder.current(), "localhost").is_err());
}

/// A server certificate is kept while it carries the configured names and has more than 30
/// days left; a change of names or a short remaining validity issues it again.
#[test]
fn server_certificate_is_reissued_on_name_change_and_near_expiry() {
    use beckon_pki::{Reissue, ServerCertificate};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::generate("test CA", Duration::from_secs(3600 * 24 * 400))
        .expect("ca");
    let mut server = ServerCertificate {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        names: vec!["localhost".into(), "127.0.0.1".into()],
        validity: Duration::from_secs(365 * 24 * 3600),
    };
    let read = |p: &std::path::Path| std::fs::read(p).expect("read");
    assert_eq!(server.ensure(&ca).expect("first"), Some(Reissue::Missing));
    let first = read(&server.cert);
    // The same names in another order and spelling: kept.
    server.names = vec!["127.0.0.1".into(), "LOCALHOST".into()];
    assert_eq!(server.ensure(&ca).expect("again"), None);
    assert_eq!(read(&server.cert), first);
    // A new name: issued again, with it.
    server.names = vec!["console.example.com".into(), "127.0.0.1".into()];
    assert_eq!(server.ensure(&ca).expect("renamed"), Some(Reissue::Names));
    let renamed = load_certificates(&server.cert).expect("load");
    let identity = certificate_identity(&renamed[0]).expect("identity");
    assert_eq!(identity.common_name.as_deref(), Some("console.example.com"));
    assert_ne!(read(&server.cert), first);
    // A certificate issued for ten days is within 30 days of its end: issued again at every
    // start, and said to end soon.
    server.validity = Duration::from_secs(10 * 24 * 3600);
    assert_eq!(
        server.ensure(&ca).expect("kept"),
        None,
        "validity alone changes nothing"
    );
    std::fs::remove_file(&server.key).expect("remove key");
    assert_eq!(server.ensure(&ca).expect("no key"), Some(Reissue::Missing));
    let short = read(&server.cert);
    assert!(beckon_pki::ends_soon(&load_certificates(&server.cert).expect("load")[0]).unwrap());
    assert_eq!(
        server.ensure(&ca).expect("near end"),
        Some(Reissue::Expiring)
    );
    assert_ne!(read(&server.cert), short);
    assert!(!beckon_pki::ends_soon(&renamed[0]).unwrap());
}
