//! Beckon's TLS policy: the one place that builds rustls configurations, server and client
//! (cipher suites and their order, key-exchange groups, protocol versions, session tickets
//! and storage, secret extraction, ALPN, trust anchors, client identities and the CAs client
//! certificates are verified against). The broker, the console, the agent's connection
//! ladder, the doctor and the bench all build theirs here, so that they cannot drift.
//!
//! Server configurations built from PEM files can be held in a [`ReloadingServerConfig`] so
//! that a new certificate takes effect for new connections without touching live ones.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

use crate::PkiError;
use crate::files::{load_certificates, load_private_key};

/// A TLS protocol version; as a minimum, it and every newer one are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3: the newest both sides support is negotiated).
    #[default]
    Tls12,
    /// TLS 1.3.
    Tls13,
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tls12 => "TLS 1.2",
            Self::Tls13 => "TLS 1.3",
        })
    }
}

impl TlsVersion {
    /// The versions allowed with this one as the minimum, newest first.
    fn and_newer(self) -> &'static [&'static SupportedProtocolVersion] {
        const FROM_TLS12: &[&SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        const FROM_TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
        match self {
            Self::Tls12 => FROM_TLS12,
            Self::Tls13 => FROM_TLS13,
        }
    }
}

/// Choices for a server configuration besides its certificate.
#[derive(Debug, Clone, Default)]
pub struct ServerTlsOptions {
    /// ALPN protocols offered, in preference order (e.g. `[b"mqtt"]`). A client that sends no
    /// ALPN is still accepted.
    pub alpn: Vec<Vec<u8>>,
    /// The lowest TLS version accepted.
    pub min_version: TlsVersion,
}

/// The files a server configuration is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf, PEM.
    pub key: PathBuf,
    /// CA certificates (PEM) whose client certificates are verified. Clients without a
    /// certificate are still accepted (they may authenticate otherwise); a client that shows
    /// a certificate not issued by one of these CAs fails the handshake.
    pub client_ca: Option<PathBuf>,
}

/// The server's provider: the default one with TLS 1.3's AES-128-GCM-SHA256 first. The
/// server picks in this order (see `ignore_client_order` below), because clients (rustls,
/// OpenSSL) list AES-256-GCM-SHA384 first, and its SHA-384 key schedule ran on aws-lc's
/// portable SHA-512 code here: about a tenth of the broker's CPU per TLS handshake. SHA-256
/// has hardware instructions on current CPUs, and AES-128-GCM, TLS 1.3's mandatory suite,
/// also encrypts every record faster.
fn server_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let first = TLS13_AES_128_GCM_SHA256.suite();
    provider.cipher_suites.sort_by_key(|s| s.suite() != first);
    Arc::new(provider)
}

/// Builds a server configuration from PEM files: TLS 1.3 and 1.2 (or 1.3 only) with the
/// aws-lc-rs provider's modern suites, stateless session tickets for resumption, the given
/// ALPN list, and an optional client-certificate verifier that allows unauthenticated
/// clients.
pub fn server_config(
    files: &TlsFiles,
    options: &ServerTlsOptions,
) -> Result<ServerConfig, PkiError> {
    let chain = load_certificates(&files.cert)?;
    let key = load_private_key(&files.key)?;
    let provider = server_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| PkiError::Tls {
        path: files.cert.clone(),
        reason: format!(
            "{e} (does {} hold the key of this certificate?)",
            files.key.display()
        ),
    })?;
    let client_roots = match &files.client_ca {
        None => None,
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certificates(ca_path)? {
                roots.add(cert).map_err(|e| PkiError::Tls {
                    path: ca_path.clone(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
            Some(roots)
        }
    };
    let mut config = build_server(
        provider,
        Arc::new(SingleCertAndKey::from(certified)),
        client_roots,
        options,
    )
    .map_err(|e| PkiError::Tls {
        path: files
            .client_ca
            .clone()
            .unwrap_or_else(|| files.cert.clone()),
        reason: e.to_string(),
    })?;
    // Stateless tickets let reconnecting agents resume without the server keeping a
    // per-client cache entry. If the ticketer cannot be made, full handshakes still work.
    if let Ok(ticketer) = rustls::crypto::aws_lc_rs::Ticketer::new() {
        config.ticketer = ticketer;
    }
    Ok(config)
}

/// The configuration `base` (built by [`server_config`]) with client certificates verified
/// against `client_roots` instead: the same certificate, suites, versions, ALPN and ticket
/// policy, and the same ticketer and session storage, so that a session resumes under
/// either. The broker's tenants bring their CAs this way.
pub fn server_config_verifying(
    base: &ServerConfig,
    client_roots: RootCertStore,
    min_version: TlsVersion,
) -> Result<ServerConfig, rustls::Error> {
    let options = ServerTlsOptions {
        alpn: base.alpn_protocols.clone(),
        min_version,
    };
    let mut config = build_server(
        base.crypto_provider().clone(),
        base.cert_resolver.clone(),
        Some(client_roots),
        &options,
    )?;
    config.ticketer = base.ticketer.clone();
    config.session_storage = base.session_storage.clone();
    Ok(config)
}

/// The server policy itself, around a certificate and optional client-certificate roots.
fn build_server(
    provider: Arc<CryptoProvider>,
    certificate: Arc<dyn ResolvesServerCert>,
    client_roots: Option<RootCertStore>,
    options: &ServerTlsOptions,
) -> Result<ServerConfig, rustls::Error> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(options.min_version.and_newer())?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(certificate);
    config.alpn_protocols.clone_from(&options.alpn);
    // Lets the broker take TLS 1.3 record protection over after the handshake (its own
    // record layer keeps far less per idle connection than rustls). This only permits the
    // owner of a connection to ask for its traffic keys; rustls never hands them out itself.
    config.enable_secret_extraction = true;
    // One ticket per handshake instead of rustls' two: a client resumes with one and gets a
    // fresh one each time, and each ticket costs a key derivation and an encryption on
    // every connect.
    config.send_tls13_tickets = 1;
    // The server's suite order (AES-128-GCM first, see `server_provider`) decides.
    config.ignore_client_order = true;
    Ok(config)
}

/// Which key-exchange groups a client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyExchange {
    /// The provider's default list (the post-quantum hybrid X25519MLKEM768 first).
    #[default]
    Default,
    /// X25519 alone: the same classic handshake on every connect (the bench measures it).
    X25519,
}

/// How a client checks the server's certificate.
#[derive(Debug)]
pub enum ServerVerification {
    /// webpki verification against these trust anchors.
    Roots(RootCertStore),
    /// A verifier of the caller's, built on [`webpki_server_verifier`] (the doctor's keeps
    /// the chain it was shown).
    Custom(Arc<dyn ServerCertVerifier>),
}

/// A client's certificate chain (leaf first) and its private key.
pub type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Choices for a client configuration besides its trust anchors and identity.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsOptions {
    /// The lowest TLS version accepted.
    pub min_version: TlsVersion,
    /// The newest TLS version offered: `None` is TLS 1.3; `Some(Tls12)` makes a TLS 1.2-only
    /// client, as old devices are (tests use it to play one).
    pub max_version: Option<TlsVersion>,
    /// ALPN protocols offered, in preference order.
    pub alpn: Vec<Vec<u8>>,
    /// The key-exchange groups offered.
    pub key_exchange: KeyExchange,
    /// No session resumption: every connect is a full handshake (the bench measures that
    /// case, and a cache shared by simulated agents would flatter one broker).
    pub full_handshakes: bool,
}

fn client_provider(key_exchange: KeyExchange) -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if key_exchange == KeyExchange::X25519 {
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    }
    Arc::new(provider)
}

/// rustls' webpki server verifier over `roots`, with the policy's provider.
pub fn webpki_server_verifier(
    roots: RootCertStore,
) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
    WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        client_provider(KeyExchange::Default),
    )
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))
}

/// What an [`observing_server_verifier`] saw: the chain of the last handshake (leaf first)
/// and why the last rejected certificate was rejected, for errors that name the certificate
/// (clients such as NATS' report a failed handshake only as an I/O error).
#[derive(Debug, Default)]
pub struct Observations {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    rejection: Mutex<Option<String>>,
}

impl Observations {
    /// The chain presented in the last handshake, leaf first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets the chain of the last handshake.
    pub fn clear(&self) {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Why the last rejected certificate was rejected, once.
    pub fn take_rejection(&self) -> Option<String> {
        self.rejection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// rustls' webpki verification over `roots` (as [`webpki_server_verifier`]), noting what it
/// sees in `observations`.
pub fn observing_server_verifier(
    roots: RootCertStore,
    observations: Arc<Observations>,
) -> Result<Arc<dyn ServerCertVerifier>, rustls::Error> {
    Ok(Arc::new(Observing {
        inner: webpki_server_verifier(roots)?,
        observations,
    }))
}

#[derive(Debug)]
struct Observing {
    inner: Arc<WebPkiServerVerifier>,
    observations: Arc<Observations>,
}

impl ServerCertVerifier for Observing {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        {
            let mut chain = self
                .observations
                .chain
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            chain.clear();
            chain.push(end_entity.clone().into_owned());
            chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        }
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(e) = &verified {
            *self
                .observations
                .rejection
                .lock()
                .unwrap_or_else(|e| e.into_inner()) =
                Some(format!("{e} (for {})", server_name.to_str()));
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds a client configuration: the aws-lc-rs provider's suites, the versions from
/// `options.min_version` on, the server checked by `server`, and `identity` shown when the
/// server asks for a certificate. Fails when rustls refuses the identity (a key that does
/// not match its certificate).
pub fn client_config(
    server: ServerVerification,
    identity: Option<ClientIdentity>,
    options: &ClientTlsOptions,
) -> Result<ClientConfig, rustls::Error> {
    const TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let versions = match options.max_version {
        Some(TlsVersion::Tls12) => TLS12_ONLY,
        _ => options.min_version.and_newer(),
    };
    let builder = ClientConfig::builder_with_provider(client_provider(options.key_exchange))
        .with_protocol_versions(versions)?;
    let builder = match server {
        ServerVerification::Roots(roots) => builder.with_root_certificates(roots),
        ServerVerification::Custom(verifier) => builder
            .dangerous()
            .with_custom_certificate_verifier(verifier),
    };
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
    };
    config.alpn_protocols.clone_from(&options.alpn);
    if options.full_handshakes {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(config)
}

/// The CA certificates of the PEM file `ca` as trust anchors (a service's own CA, such as
/// the NATS servers' of a cluster).
pub fn load_roots(ca: &Path) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(ca)? {
        roots.add(cert).map_err(|e| PkiError::Tls {
            path: ca.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// Modification time and length of a file, to notice a change cheaply.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A server configuration that can be replaced while connections use the old one.
///
/// Each new connection takes [`current`](Self::current); [`reload`](Self::reload) builds a
/// new configuration from the files and swaps it in. A file that fails to load keeps the old
/// configuration in force and logs why.
#[derive(Debug)]
pub struct ReloadingServerConfig {
    files: TlsFiles,
    options: ServerTlsOptions,
    current: ArcSwap<ServerConfig>,
    stamps: Mutex<Vec<Stamp>>,
}

impl ReloadingServerConfig {
    /// Loads the files once; fails when they are not usable.
    pub fn new(files: TlsFiles, options: ServerTlsOptions) -> Result<Self, PkiError> {
        let stamps = Self::stamps_of(&files);
        let config = server_config(&files, &options)?;
        Ok(Self {
            files,
            options,
            current: ArcSwap::from_pointee(config),
            stamps: Mutex::new(stamps),
        })
    }

    fn stamps_of(files: &TlsFiles) -> Vec<Stamp> {
        let mut s = vec![stamp(&files.cert), stamp(&files.key)];
        if let Some(ca) = &files.client_ca {
            s.push(stamp(ca));
        }
        s
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Builds a configuration from the files again and puts it in force. On failure the old
    /// configuration stays and the error is logged and returned.
    pub fn reload(&self) -> Result<(), PkiError> {
        let stamps = Self::stamps_of(&self.files);
        let result = server_config(&self.files, &self.options);
        // Remember the files' state either way: a broken file is reported once, not at every
        // poll, and a later fix changes the stamp again.
        if let Ok(mut s) = self.stamps.lock() {
            *s = stamps;
        }
        match result {
            Ok(config) => {
                self.current.store(Arc::new(config));
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    cert = %self.files.cert.display(),
                    error = %e,
                    "TLS certificate reload failed; the previous certificate stays in use"
                );
                Err(e)
            }
        }
    }

    /// Reloads when a file's modification time or length changed since the last load.
    /// Returns whether a reload was attempted (and its result).
    pub fn reload_if_changed(&self) -> Option<Result<(), PkiError>> {
        let now = Self::stamps_of(&self.files);
        let changed = self.stamps.lock().map(|s| *s != now).unwrap_or(true);
        changed.then(|| self.reload())
    }
}
