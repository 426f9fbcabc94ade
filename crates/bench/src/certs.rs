//! A throwaway CA and the certificates issued by it, for the brokers `compare` starts (and for
//! tests that need client certificates).
//!
//! Generated with rcgen directly: the project's PKI crate had not landed when the bench was
//! written. Both brokers get the same files, so neither gets a cheaper key.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// Server certificate files in a directory.
#[derive(Debug, Clone)]
pub struct ServerCerts {
    /// CA certificate (PEM), for the clients.
    pub ca: PathBuf,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// A client certificate and its key.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// The name the server certificate is issued to (besides 127.0.0.1).
pub const SERVER_NAME: &str = "localhost";

/// A CA kept in memory (ECDSA P-256).
pub struct BenchCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl BenchCa {
    /// A fresh CA.
    pub fn new() -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        params
            .distinguished_name
            .push(DnType::CommonName, "beckon bench CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Writes the CA certificate, then a server certificate for `localhost` and 127.0.0.1
    /// and its key, into `dir`.
    pub fn issue_server(&self, dir: &Path) -> anyhow::Result<ServerCerts> {
        let key = KeyPair::generate().context("generating the server key")?;
        let mut params =
            CertificateParams::new(vec![SERVER_NAME.to_owned()]).context("server parameters")?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the server certificate")?;
        let files = ServerCerts {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        write(&files.ca, &self.pem)?;
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }

    /// Writes a client certificate with common name `name` and its key into `dir`.
    pub fn issue_client(&self, dir: &Path, name: &str) -> anyhow::Result<ClientCert> {
        let key = KeyPair::generate().context("generating a client key")?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).context("client parameters")?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a client certificate")?;
        let files = ClientCert {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes a fresh CA and a server certificate into `dir`.
pub fn generate(dir: &Path) -> anyhow::Result<ServerCerts> {
    BenchCa::new()?.issue_server(dir)
}
