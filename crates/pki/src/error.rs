//! Errors of the PKI crate. Each message names the file and what to do.

use std::path::PathBuf;

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read, written or renamed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was attempted ("reading", "writing", ...).
        action: &'static str,
        /// The file or folder concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key, or could not be parsed.
    #[error("{path}: {reason}")]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it and what to do.
        reason: String,
    },
    /// Certificate generation or signing failed.
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate, key or client CA (mismatched key, bad chain, ...).
    #[error("TLS configuration from {path}: {reason}")]
    Tls {
        /// The certificate or CA file the configuration came from.
        path: PathBuf,
        /// rustls' explanation.
        reason: String,
    },
    /// A certificate could not be parsed as X.509.
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    /// An argument was not acceptable (an empty name, a zero validity, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl PkiError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
