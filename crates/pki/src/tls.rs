//! rustls server configurations: built from PEM files, and held in an [`ArcSwap`] so that a
//! new certificate takes effect for new connections without touching live ones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::PkiError;
use crate::files::{load_certificates, load_private_key};

/// The lowest TLS version a server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the newest both sides support is negotiated).
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// Choices for a server configuration besides its files.
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
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
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
    let versions: &[&'static rustls::SupportedProtocolVersion] = match options.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| PkiError::Tls {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certificates(ca_path)? {
                roots.add(cert).map_err(|e| PkiError::Tls {
                    path: ca_path.clone(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| PkiError::Tls {
                    path: ca_path.clone(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| PkiError::Tls {
            path: files.cert.clone(),
            reason: format!(
                "{e} (does {} hold the key of this certificate?)",
                files.key.display()
            ),
        })?;
    config.alpn_protocols = options.alpn.clone();
    // Stateless tickets let reconnecting agents resume without the server keeping a
    // per-client cache entry. If the ticketer cannot be made, full handshakes still work.
    if let Ok(ticketer) = rustls::crypto::aws_lc_rs::Ticketer::new() {
        config.ticketer = ticketer;
    }
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
