//! A test certificate authority issuing server and client certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A test certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server's certificate chain and key, as rustls and as PEM files want them.
pub struct ServerIdentity {
    /// Server certificate, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The server's private key.
    pub key: PrivateKeyDer<'static>,
    /// The chain in PEM.
    pub cert_pem: String,
    /// The key in PEM.
    pub key_pem: String,
}

impl TestCa {
    /// A self-signed CA named `CN=<name>`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate in DER.
    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).expect("write CA file");
        path
    }

    /// A server certificate for `names`, valid from `not_before` to `not_after` (y, m, d).
    pub fn server_cert_valid(
        &self,
        names: &[&str],
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> ServerIdentity {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "test broker");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &*self.issuer)
            .expect("server certificate");
        ServerIdentity {
            chain: vec![cert.der().clone(), self.issuer.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_pem: format!("{}{}", cert.pem(), self.issuer.pem()),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for `names`, valid 2020-01-01 to 2099-12-31.
    pub fn server_cert(&self, names: &[&str]) -> ServerIdentity {
        self.server_cert_valid(names, (2020, 1, 1), (2099, 12, 31))
    }

    /// A client certificate with `CN=<common_name>` and its key, in PEM.
    pub fn client_cert_pem(&self, common_name: &str) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("client key");
        let cert = params
            .signed_by(&key, &*self.issuer)
            .expect("client certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A client certificate `CN=<name>` written to `dir/{name}.pem` and its key to
    /// `dir/{name}.key`.
    pub fn write_client_cert(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.client_cert_pem(name);
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert).expect("write client certificate");
        std::fs::write(&key_path, key).expect("write client key");
        (cert_path, key_path)
    }

    /// The CA as a rustls root store (for a server that checks client certificates).
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der()).expect("add CA");
        roots
    }
}
