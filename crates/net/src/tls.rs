//! The TLS client: rustls with aws-lc-rs, ALPN chosen by the caller, the server's chain and
//! name checked against a configured CA or the operating system's store, an optional client
//! certificate, and errors in plain words for the doctor.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::time::{format_utc, system_time_from_unix};

/// A TLS client stream over `S`.
pub type TlsStream<S> = tokio_rustls::client::TlsStream<S>;

/// A TLS protocol version: the policy's own (see `beckon_pki::tls`).
pub use beckon_pki::TlsVersion;

/// Which certificate authorities the client trusts for the broker's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustAnchors {
    /// The operating system's store (on Linux, the distribution's CA bundle; `SSL_CERT_FILE`
    /// and `SSL_CERT_DIR` override it).
    System,
    /// The certificates in a PEM file (an enrolled agent's copy of its console's CA).
    CaFile(PathBuf),
    /// The certificates in a PEM file and the operating system's store: for an agent whose
    /// broker presents a certificate from a public CA while its console's CA stays trusted
    /// (a broker moved to a public certificate, or several brokers on either).
    CaFileAndSystem(PathBuf),
    /// PEM text held in memory.
    CaPem(Vec<u8>),
}

/// The client's own certificate and key, for brokers that authenticate clients by certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    /// PEM files: the certificate chain (leaf first) and the private key.
    Files {
        /// The certificate chain file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
    },
    /// PEM text held in memory.
    Pem {
        /// The certificate chain (leaf first).
        cert: Vec<u8>,
        /// The private key.
        key: Vec<u8>,
    },
}

/// How the TLS client is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Trusted certificate authorities. Default: the system store.
    pub trust: TrustAnchors,
    /// The client certificate, if the broker wants one. Default: none.
    pub identity: Option<ClientIdentity>,
    /// The oldest TLS version accepted; TLS 1.3 is always preferred. Default TLS 1.2.
    pub min_version: TlsVersion,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            trust: TrustAnchors::System,
            identity: None,
            min_version: TlsVersion::Tls12,
        }
    }
}

/// The TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A PEM file could not be read.
    #[error("cannot read the {what} file {}: {source}", path.display())]
    FileUnreadable {
        /// What the file was for ("CA", "client certificate", "client key").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// A PEM file or text holds no usable item of the kind needed.
    #[error("{what}: {detail}")]
    InvalidPem {
        /// Which input ("CA file /x", "client key (in memory)").
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The operating system's CA store is empty or unreadable.
    #[error(
        "no trusted CA certificates found in the system store ({detail}): install the ca-certificates package, or configure the broker's CA file"
    )]
    NoSystemRoots {
        /// What the loader reported.
        detail: String,
    },
    /// rustls rejected the configuration (for example a key that does not match its certificate).
    #[error("the TLS client configuration is invalid: {0}")]
    Rejected(#[source] rustls::Error),
}

/// The TLS handshake failed, classified for the operator.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The chain does not lead to a trusted CA.
    #[error(
        "the certificate of {server} is not signed by a trusted CA: give the client the broker's CA file (or add that CA to the system store); a TLS-intercepting proxy on the way also causes this"
    )]
    UntrustedCertificate {
        /// The server name checked.
        server: String,
    },
    /// A certificate in the chain has expired.
    #[error(
        "the certificate of {server} expired{}: renew the broker's certificate, or check this machine's clock",
        not_after.map(|t| format!(" on {}", format_utc(t))).unwrap_or_default()
    )]
    ExpiredCertificate {
        /// The server name checked.
        server: String,
        /// When it expired, when the verifier said.
        not_after: Option<SystemTime>,
    },
    /// A certificate in the chain is not valid yet.
    #[error(
        "the certificate of {server} is not valid yet{}: check this machine's clock",
        not_before.map(|t| format!(" (valid from {})", format_utc(t))).unwrap_or_default()
    )]
    NotYetValidCertificate {
        /// The server name checked.
        server: String,
        /// When it becomes valid, when the verifier said.
        not_before: Option<SystemTime>,
    },
    /// The certificate does not name the server the client asked for.
    #[error(
        "the certificate presented for {server} does not name it{}: connect with a name the certificate lists, or reissue the certificate with {server} in its subject alternative names",
        if presented.is_empty() { String::new() } else { format!(" (it names {})", presented.join(", ")) }
    )]
    WrongHostName {
        /// The server name checked.
        server: String,
        /// The names the certificate carries.
        presented: Vec<String>,
    },
    /// Any other problem with the server's certificate.
    #[error("the certificate of {server} is not acceptable: {detail}")]
    BadCertificate {
        /// The server name checked.
        server: String,
        /// What is wrong.
        detail: String,
    },
    /// The server requires a client certificate and none was presented.
    #[error(
        "{server} requires a client certificate and this client has none: enroll the agent (or configure its certificate and key)"
    )]
    ClientCertificateRequired {
        /// The server name.
        server: String,
    },
    /// The server rejected the client certificate.
    #[error(
        "{server} rejected this client's certificate ({alert:?}): it may be expired, revoked or from another CA; enroll the agent again"
    )]
    ClientCertificateRejected {
        /// The server name.
        server: String,
        /// The TLS alert it sent.
        alert: AlertDescription,
    },
    /// The server speaks none of the offered application protocols.
    #[error(
        "{server} does not accept the application protocol {offered} (ALPN) on this port: it is not a Beckon broker port, or it is an older broker"
    )]
    AlpnRefused {
        /// The server name.
        server: String,
        /// The protocols offered, comma separated.
        offered: String,
    },
    /// No TLS version or cipher suite in common.
    #[error(
        "no TLS version or cipher suite in common with {server} ({detail}); this client accepts {min} or newer with modern suites only"
    )]
    Incompatible {
        /// The server name.
        server: String,
        /// The minimum version configured.
        min: TlsVersion,
        /// What rustls said.
        detail: String,
    },
    /// The peer did not speak TLS.
    #[error(
        "{server} did not answer in TLS ({detail}): this port does not serve TLS (plain MQTT or HTTP?), or something on the way answers instead of the broker"
    )]
    NotTls {
        /// The server name.
        server: String,
        /// What rustls said.
        detail: String,
    },
    /// The peer closed the connection during the handshake.
    #[error(
        "{server} closed the connection during the TLS handshake: a firewall or proxy may block TLS on this port, or the broker refused this client"
    )]
    Closed {
        /// The server name.
        server: String,
    },
    /// Any other handshake failure.
    #[error("the TLS handshake with {server} failed: {detail}")]
    HandshakeFailed {
        /// The server name.
        server: String,
        /// What rustls said.
        detail: String,
    },
    /// The handshake did not finish in time.
    #[error("the TLS handshake with {server} did not finish within {} s", after.as_secs_f32())]
    TimedOut {
        /// The server name.
        server: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The server name is not a valid DNS name or IP address.
    #[error("{server:?} is not a valid server name for TLS (a DNS name or an IP address)")]
    InvalidServerName {
        /// The name given.
        server: String,
    },
    /// A system error on the socket.
    #[error("the TLS connection to {server} failed: {source}")]
    Io {
        /// The server name.
        server: String,
        /// The system's error.
        source: io::Error,
    },
}

impl TlsError {
    /// Classifies an error read from an established TLS stream. TLS 1.3 servers check the
    /// client certificate after the client has finished its handshake, so "client certificate
    /// required/rejected" shows up on the first read; this turns such an error into plain
    /// words. Returns `None` when the error is not a TLS error.
    pub fn from_stream_error(server: &str, error: &io::Error, min: TlsVersion) -> Option<Self> {
        let inner = error.get_ref()?.downcast_ref::<rustls::Error>()?;
        Some(from_rustls(server, inner, min, "mqtt"))
    }
}

/// One certificate the server presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The subject's distinguished name.
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// What a TLS handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSessionInfo {
    /// The server name that was checked.
    pub server_name: String,
    /// The protocol version.
    pub version: Option<TlsVersion>,
    /// The cipher suite, as IANA names it (e.g. `TLS13_AES_256_GCM_SHA384`).
    pub cipher_suite: Option<String>,
    /// The application protocol the server chose (ALPN), if any.
    pub alpn: Option<String>,
    /// The server's certificate chain, leaf first.
    pub peer_chain: Vec<PeerCertificate>,
}

impl TlsSessionInfo {
    /// The earliest end of validity in the server's chain: when the connection will stop working
    /// unless certificates are renewed.
    pub fn chain_expiry(&self) -> Option<SystemTime> {
        self.peer_chain.iter().map(|c| c.not_after).min()
    }
}

/// A client configuration and the ALPN list it offers.
type AlpnConfig = (Vec<Vec<u8>>, Arc<ClientConfig>);

/// A configured TLS client. Build once, connect many times (configurations per ALPN list are
/// cached, and TLS sessions are resumed across connections).
#[derive(Debug)]
pub struct TlsClient {
    base: Arc<ClientConfig>,
    min_version: TlsVersion,
    by_alpn: Mutex<Vec<AlpnConfig>>,
}

impl TlsClient {
    /// Loads the trust anchors and the client identity and builds the client.
    pub fn new(settings: &TlsSettings) -> Result<Self, TlsConfigError> {
        let roots = load_roots(&settings.trust)?;
        Self::with_verification(settings, beckon_pki::ServerVerification::Roots(roots))
    }

    /// Loads the client identity of `settings` and builds the client, checking the server's
    /// certificate as `verification` says (the trust anchors of `settings` are not read).
    pub fn with_verification(
        settings: &TlsSettings,
        verification: beckon_pki::ServerVerification,
    ) -> Result<Self, TlsConfigError> {
        let identity = settings.identity.as_ref().map(load_identity).transpose()?;
        let options = beckon_pki::ClientTlsOptions {
            min_version: settings.min_version,
            ..Default::default()
        };
        let config = beckon_pki::client_config(verification, identity, &options)
            .map_err(TlsConfigError::Rejected)?;
        Ok(Self::from_config(config, settings.min_version))
    }

    /// Wraps a rustls configuration built elsewhere (for example by the PKI crate). Its ALPN
    /// list is replaced per connection; `min_version` is only used in error messages, the
    /// versions are those `config` allows.
    pub fn from_config(config: ClientConfig, min_version: TlsVersion) -> Self {
        Self {
            base: Arc::new(config),
            min_version,
            by_alpn: Mutex::new(Vec::new()),
        }
    }

    /// The oldest TLS version this client accepts.
    pub fn min_version(&self) -> TlsVersion {
        self.min_version
    }

    /// The rustls configuration offering `alpn` (in order of preference).
    pub fn config_for(&self, alpn: &[&str]) -> Arc<ClientConfig> {
        let wanted: Vec<Vec<u8>> = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let mut cache = self.by_alpn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, config)) = cache.iter().find(|(k, _)| *k == wanted) {
            return Arc::clone(config);
        }
        let mut config = (*self.base).clone();
        config.alpn_protocols = wanted.clone();
        let config = Arc::new(config);
        cache.push((wanted, Arc::clone(&config)));
        config
    }

    /// Performs the TLS handshake on `stream` with `server_name` (a DNS name or an IP
    /// address), offering `alpn`, within `timeout`.
    pub async fn connect<S>(
        &self,
        stream: S,
        server_name: &str,
        alpn: &[&str],
        timeout: Duration,
    ) -> Result<(TlsStream<S>, TlsSessionInfo), TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let bare = server_name.trim_start_matches('[').trim_end_matches(']');
        let name =
            ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::InvalidServerName {
                server: server_name.to_owned(),
            })?;
        let connector = tokio_rustls::TlsConnector::from(self.config_for(alpn));
        let tls = match tokio::time::timeout(timeout, connector.connect(name, stream)).await {
            Err(_) => {
                return Err(TlsError::TimedOut {
                    server: bare.to_owned(),
                    after: timeout,
                });
            }
            Ok(Err(e)) => {
                let offered = alpn.join(", ");
                return Err(classify_handshake_error(
                    bare,
                    e,
                    self.min_version,
                    &offered,
                ));
            }
            Ok(Ok(tls)) => tls,
        };
        let info = session_info(bare, tls.get_ref().1);
        Ok((tls, info))
    }
}

fn session_info(server: &str, conn: &rustls::ClientConnection) -> TlsSessionInfo {
    TlsSessionInfo {
        server_name: server.to_owned(),
        version: match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => Some(TlsVersion::Tls13),
            Some(rustls::ProtocolVersion::TLSv1_2) => Some(TlsVersion::Tls12),
            _ => None,
        },
        cipher_suite: conn.negotiated_cipher_suite().map(|s| {
            s.suite()
                .as_str()
                .map_or_else(|| format!("{:?}", s.suite()), str::to_owned)
        }),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        peer_chain: conn
            .peer_certificates()
            .map(describe_chain)
            .unwrap_or_default(),
    }
}

/// Reads subject, issuer and validity of each certificate (those that fail to parse are left
/// out: the verifier already accepted them, so this is only for the report).
fn describe_chain(chain: &[CertificateDer<'_>]) -> Vec<PeerCertificate> {
    chain
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der.as_ref()).ok())
        .map(|(_, cert)| PeerCertificate {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: system_time_from_unix(cert.validity().not_before.timestamp()),
            not_after: system_time_from_unix(cert.validity().not_after.timestamp()),
        })
        .collect()
}

fn classify_handshake_error(
    server: &str,
    error: io::Error,
    min: TlsVersion,
    offered: &str,
) -> TlsError {
    if let Some(inner) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return from_rustls(server, inner, min, offered);
    }
    match error.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TlsError::Closed {
            server: server.to_owned(),
        },
        _ => TlsError::Io {
            server: server.to_owned(),
            source: error,
        },
    }
}

fn from_rustls(server: &str, error: &rustls::Error, min: TlsVersion, offered: &str) -> TlsError {
    let server = server.to_owned();
    match error {
        rustls::Error::InvalidCertificate(cert) => from_certificate_error(server, cert),
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => TlsError::ClientCertificateRequired { server },
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied => TlsError::ClientCertificateRejected {
                server,
                alert: *alert,
            },
            AlertDescription::NoApplicationProtocol => TlsError::AlpnRefused {
                server,
                offered: offered.to_owned(),
            },
            AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity => {
                TlsError::Incompatible {
                    server,
                    min,
                    detail: format!("the server sent the alert {alert:?}"),
                }
            }
            _ => TlsError::HandshakeFailed {
                server,
                detail: format!("the server sent the alert {alert:?}"),
            },
        },
        rustls::Error::NoApplicationProtocol => TlsError::AlpnRefused {
            server,
            offered: offered.to_owned(),
        },
        rustls::Error::PeerIncompatible(why) => TlsError::Incompatible {
            server,
            min,
            detail: format!("{why:?}"),
        },
        rustls::Error::InvalidMessage(why) => TlsError::NotTls {
            server,
            detail: format!("{why:?}"),
        },
        other => TlsError::HandshakeFailed {
            server,
            detail: other.to_string(),
        },
    }
}

fn from_certificate_error(server: String, error: &CertificateError) -> TlsError {
    let unix = |t: &rustls::pki_types::UnixTime| {
        system_time_from_unix(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
    };
    match error {
        CertificateError::UnknownIssuer => TlsError::UntrustedCertificate { server },
        CertificateError::Expired => TlsError::ExpiredCertificate {
            server,
            not_after: None,
        },
        CertificateError::ExpiredContext { not_after, .. } => TlsError::ExpiredCertificate {
            server,
            not_after: Some(unix(not_after)),
        },
        CertificateError::NotValidYet => TlsError::NotYetValidCertificate {
            server,
            not_before: None,
        },
        CertificateError::NotValidYetContext { not_before, .. } => {
            TlsError::NotYetValidCertificate {
                server,
                not_before: Some(unix(not_before)),
            }
        }
        CertificateError::NotValidForName => TlsError::WrongHostName {
            server,
            presented: Vec::new(),
        },
        CertificateError::NotValidForNameContext { presented, .. } => TlsError::WrongHostName {
            server,
            presented: presented.iter().map(|n| plain_name(n)).collect(),
        },
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            TlsError::BadCertificate {
                server,
                detail: String::from(
                    "it is not issued for TLS servers (extended key usage); reissue it as a server certificate",
                ),
            }
        }
        CertificateError::Revoked => TlsError::BadCertificate {
            server,
            detail: String::from("it has been revoked; install a new certificate on the broker"),
        },
        CertificateError::BadSignature => TlsError::BadCertificate {
            server,
            detail: String::from(
                "a signature in its chain does not verify; the chain is corrupt or mixed up",
            ),
        },
        other => TlsError::BadCertificate {
            server,
            detail: rustls::Error::InvalidCertificate(other.clone()).to_string(),
        },
    }
}

/// The verifier lists presented names in its debug form (`DnsName("a.example")`,
/// `IpAddress(192.0.2.1)`); an operator wants just the names.
fn plain_name(presented: &str) -> String {
    if let Some(dns) = presented
        .strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
    {
        return dns.to_owned();
    }
    if let Some(ip) = presented
        .strip_prefix("IpAddress(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return ip.to_owned();
    }
    presented.to_owned()
}

fn load_roots(trust: &TrustAnchors) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    match trust {
        TrustAnchors::System => add_system_roots(&mut roots)?,
        TrustAnchors::CaFile(path) => add_ca_file(&mut roots, path)?,
        TrustAnchors::CaPem(pem) => add_pem_roots(&mut roots, pem, "CA (in memory)")?,
        TrustAnchors::CaFileAndSystem(path) => {
            add_ca_file(&mut roots, path)?;
            // The CA file alone still lets the agent reach a broker on its console's CA.
            if let Err(e) = add_system_roots(&mut roots) {
                tracing::warn!(error = %e, "only the CA file is trusted");
            }
        }
    }
    Ok(roots)
}

fn add_system_roots(roots: &mut RootCertStore) -> Result<(), TlsConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let detail = if found.errors.is_empty() {
            String::from("none found")
        } else {
            found
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        };
        return Err(TlsConfigError::NoSystemRoots { detail });
    }
    Ok(())
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsConfigError> {
    let pem = std::fs::read(path).map_err(|source| TlsConfigError::FileUnreadable {
        what: "CA",
        path: path.to_owned(),
        source,
    })?;
    add_pem_roots(roots, &pem, &format!("CA file {}", path.display()))
}

fn add_pem_roots(roots: &mut RootCertStore, pem: &[u8], what: &str) -> Result<(), TlsConfigError> {
    let invalid = |detail: String| TlsConfigError::InvalidPem {
        what: what.to_owned(),
        detail,
    };
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| invalid(format!("not valid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("a certificate cannot be used as a CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid(String::from(
            "holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)",
        )));
    }
    Ok(())
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_identity(identity: &ClientIdentity) -> Result<Identity, TlsConfigError> {
    let read = |what: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|source| TlsConfigError::FileUnreadable {
            what,
            path: path.clone(),
            source,
        })
    };
    let (cert_pem, key_pem, cert_what, key_what) = match identity {
        ClientIdentity::Files { cert, key } => (
            read("client certificate", cert)?,
            read("client key", key)?,
            format!("client certificate file {}", cert.display()),
            format!("client key file {}", key.display()),
        ),
        ClientIdentity::Pem { cert, key } => (
            cert.clone(),
            key.clone(),
            String::from("client certificate (in memory)"),
            String::from("client key (in memory)"),
        ),
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::InvalidPem {
            what: cert_what.clone(),
            detail: format!("not valid PEM: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsConfigError::InvalidPem {
            what: cert_what,
            detail: String::from("holds no certificate"),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsConfigError::InvalidPem {
        what: key_what,
        detail: format!("holds no usable private key: {e}"),
    })?;
    Ok((chain, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presented_names_are_plain() {
        assert_eq!(plain_name("DnsName(\"broker.example\")"), "broker.example");
        assert_eq!(plain_name("IpAddress(192.0.2.1)"), "192.0.2.1");
        assert_eq!(plain_name("DirectoryName"), "DirectoryName");
    }
}
