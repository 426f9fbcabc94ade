//! Certificates for Beckon: a local certificate authority (ECDSA P-256), server and client
//! certificates issued by it, PEM files written atomically (keys owner-only), and rustls
//! server configurations that reload when their files change.
//!
//! All rustls `ServerConfig` construction lives in [`tls`], so that a move to a newer rustls
//! stays local to one module.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ca;
mod error;
mod files;
mod identity;
pub mod tls;

pub use ca::{
    BrokerCerts, CertificateAuthority, IssuedCertificate, RENEW_BEFORE, Reissue, ServerCertificate,
    ends_soon, ensure_broker_certs, not_after,
};
pub use error::PkiError;
pub use files::{load_certificates, load_private_key, write_atomic};
pub use identity::{CertificateIdentity, certificate_identity};
pub use tls::{
    ClientIdentity, ClientTlsOptions, KeyExchange, Observations, ReloadingServerConfig,
    ServerTlsOptions, ServerVerification, TlsFiles, TlsVersion, client_config, load_roots,
    observing_server_verifier, server_config, server_config_verifying, webpki_server_verifier,
};

/// Re-exported so that callers name the same rustls types as this crate.
pub use rustls;
