//! A throwaway CA and server certificate for the brokers `compare` starts.
//!
//! Generated with rcgen directly: the project's PKI crate had not landed when the bench was
//! written. Both brokers get the same files, so neither gets a cheaper key.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// Certificate files in a directory.
#[derive(Debug, Clone)]
pub struct ServerCerts {
    /// CA certificate (PEM), for the clients.
    pub ca: PathBuf,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// The name the server certificate is issued to (besides 127.0.0.1).
pub const SERVER_NAME: &str = "localhost";

/// Writes a fresh ECDSA P-256 CA and a server certificate for `localhost` and 127.0.0.1.
pub fn generate(dir: &Path) -> anyhow::Result<ServerCerts> {
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "beckon bench CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().context("generating the server key")?;
    let mut params =
        CertificateParams::new(vec![SERVER_NAME.to_owned()]).context("server parameters")?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the server certificate")?;

    let files = ServerCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    };
    write(&files.ca, ca_cert.pem())?;
    write(&files.cert, cert.pem())?;
    write(&files.key, key.serialize_pem())?;
    Ok(files)
}
