//! The local certificate authority and the certificates it issues.

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType,
};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{PkiError, files::write_atomic};

/// Validity of a CA that [`ensure_broker_certs`] creates (10 years).
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of a server certificate that [`ensure_broker_certs`] creates (2 years).
const SERVER_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// A generated server certificate closer than this to its end is issued again at start, and
/// a status warns about a certificate renewed by hand.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Backdating of `not_before`, so that peers with a clock slightly behind accept new
/// certificates.
const BACKDATE: Duration = Duration::from_secs(3600);

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM. Empty when the certificate was issued for a CSR: the key
    /// then never left its owner.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("IssuedCertificate")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl IssuedCertificate {
    /// Writes the certificate (mode 0644) and the key (mode 0600) atomically.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_atomic(key_path, self.key_pem.as_bytes(), 0o600)?;
        write_atomic(cert_path, self.cert_pem.as_bytes(), 0o644)
    }

    /// The certificate as DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| PkiError::Parse(e.to_string()))
    }
}

/// A local certificate authority: ECDSA P-256, path length 0 (it signs leaves only).
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new CA named `common_name` (O=Beckon), valid from now for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, PkiError> {
        if common_name.trim().is_empty() {
            return Err(PkiError::Invalid("the CA needs a common name".into()));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Beckon");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, validity)?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem =
            fs::read_to_string(cert_path).map_err(|e| PkiError::io("reading", cert_path, e))?;
        let key_pem =
            fs::read_to_string(key_path).map_err(|e| PkiError::io("reading", key_path, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Pem {
            path: key_path.to_owned(),
            reason: format!("not a usable CA private key: {e}"),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Pem {
            path: cert_path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
        // The key must be the certificate's: otherwise everything it signs fails to verify.
        let der = pem_cert_der(&cert_pem, cert_path)?;
        let (_, x509) =
            X509Certificate::from_der(der.as_ref()).map_err(|e| PkiError::Parse(e.to_string()))?;
        if x509.public_key().subject_public_key.data.as_ref() != issuer.key().der_bytes() {
            return Err(PkiError::Pem {
                path: key_path.to_owned(),
                reason: format!(
                    "this key does not belong to the CA certificate {}",
                    cert_path.display()
                ),
            });
        }
        Ok(Self {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// Writes the CA certificate (0644) and key (0600) atomically.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_atomic(key_path, self.key_pem.as_bytes(), 0o600)?;
        write_atomic(cert_path, self.cert_pem.as_bytes(), 0o644)
    }

    /// The CA certificate, PEM (what clients add to their trust store).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names and IP addresses, each becomes a SAN; the
    /// first is also the common name), with the ServerAuth extended key usage.
    pub fn issue_server(
        &self,
        names: &[String],
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let first = names.first().ok_or_else(|| {
            PkiError::Invalid("a server certificate needs at least one name".into())
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first.as_str());
        params.distinguished_name = dn;
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(|_| {
                    PkiError::Invalid(format!("{name:?} is neither a DNS name nor an IP address"))
                })?),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, validity)
    }

    /// A client certificate with the ClientAuth extended key usage, naming its holder:
    /// CN = `common_name` (the identity), O = `organization` (the tenant), OU = `org_unit`
    /// (the role).
    pub fn issue_client(
        &self,
        common_name: &str,
        organization: Option<&str>,
        org_unit: Option<&str>,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let params = client_params(common_name, organization, org_unit)?;
        self.issue(params, validity)
    }

    /// Like [`issue_client`](Self::issue_client) for a key pair that never leaves its owner:
    /// signs the public key of a PEM certificate signing request. The subject is set by the
    /// CA from the arguments; whatever the request asks for is ignored. The returned
    /// `key_pem` is empty.
    pub fn issue_client_for_csr(
        &self,
        csr_pem: &str,
        common_name: &str,
        organization: Option<&str>,
        org_unit: Option<&str>,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = client_params(common_name, organization, org_unit)?;
        set_validity(&mut params, validity)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: String::new(),
        })
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        set_validity(&mut params, validity)?;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn client_params(
    common_name: &str,
    organization: Option<&str>,
    org_unit: Option<&str>,
) -> Result<CertificateParams, PkiError> {
    if common_name.trim().is_empty() {
        return Err(PkiError::Invalid(
            "a client certificate needs a common name (the identity)".into(),
        ));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    if let Some(ou) = org_unit {
        dn.push(DnType::OrganizationalUnitName, ou);
    }
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A random 127-bit serial. RFC 5280 wants serials unique per CA; rcgen's default derives
/// the serial from the public key, so a key signed twice (an agent that retries its
/// enrollment, or renews, with the same key) would get the serial of its first certificate,
/// and the console's list of issued certificates (revocation) would collide.
fn set_unique_serial(params: &mut CertificateParams) -> Result<(), PkiError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| PkiError::Invalid("no random bytes for a certificate serial".into()))?;
    // Positive (top bit clear) and of full length (next bit set).
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&bytes));
    Ok(())
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), PkiError> {
    set_unique_serial(params)?;
    if validity.is_zero() {
        return Err(PkiError::Invalid(
            "validity must be longer than zero".into(),
        ));
    }
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::Invalid("the system clock is before 1970".into()))?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    // Backdated by at most a quarter of the validity: a short-lived certificate (tests) keeps
    // most of its lifetime ahead of it, which is what renewal ("a third left") measures.
    params.not_before = epoch + since_epoch.saturating_sub(BACKDATE.min(validity / 4));
    params.not_after = epoch + since_epoch + validity;
    Ok(())
}

fn pem_cert_der(pem: &str, path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem {
        path: path.to_owned(),
        reason: format!("no PEM certificate: {e}"),
    })
}

/// The end of a certificate's validity.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, PkiError> {
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| PkiError::Parse(e.to_string()))?;
    let ts = x509.validity().not_after.timestamp();
    Ok(if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH
    })
}

/// Where the broker's generated certificates are, and whether this run created them.
#[derive(Debug, Clone)]
pub struct BrokerCerts {
    /// `ca.pem`: give it to clients as their trust anchor.
    pub ca_cert: PathBuf,
    /// `ca.key` (0600).
    pub ca_key: PathBuf,
    /// `server.pem`.
    pub server_cert: PathBuf,
    /// `server.key` (0600).
    pub server_key: PathBuf,
    /// True when this call created the CA (first run).
    pub created_ca: bool,
    /// True when this call issued the server certificate (first run, or renewal near expiry).
    pub issued_server: bool,
}

/// Makes sure the data folder holds a CA (`ca.pem`, `ca.key`) and a server certificate for
/// `names` signed by it (`server.pem`, `server.key`): creates them on first run, reuses them
/// after, and issues the server certificate again when it is missing or ends within 30 days.
/// The folder is created (0700) when missing.
pub fn ensure_broker_certs(data_dir: &Path, names: &[String]) -> Result<BrokerCerts, PkiError> {
    create_private_dir(data_dir)?;
    let mut out = BrokerCerts {
        ca_cert: data_dir.join("ca.pem"),
        ca_key: data_dir.join("ca.key"),
        server_cert: data_dir.join("server.pem"),
        server_key: data_dir.join("server.key"),
        created_ca: false,
        issued_server: false,
    };
    let ca = if out.ca_cert.exists() || out.ca_key.exists() {
        CertificateAuthority::load(&out.ca_cert, &out.ca_key)?
    } else {
        let ca = CertificateAuthority::generate("Beckon local CA", CA_VALIDITY)?;
        ca.save(&out.ca_cert, &out.ca_key)?;
        out.created_ca = true;
        ca
    };
    let server = ServerCertificate {
        cert: out.server_cert.clone(),
        key: out.server_key.clone(),
        names: names.to_vec(),
        validity: SERVER_VALIDITY,
    };
    // A new CA did not sign the certificate that may be there.
    let reissued = if out.created_ca {
        server.issue(&ca)?;
        Some(Reissue::Missing)
    } else {
        server.ensure(&ca)?
    };
    out.issued_server = reissued.is_some();
    Ok(out)
}

/// Why [`ServerCertificate::ensure`] issued the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reissue {
    /// The certificate or its key was not there (first start), or could not be read.
    Missing,
    /// Its names (subject alternative names) are not the configured ones.
    Names,
    /// It ends within [`RENEW_BEFORE`] (30 days), or has ended.
    Expiring,
}

impl std::fmt::Display for Reissue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Missing => "there was none",
            Self::Names => "its names differ from the configured ones",
            Self::Expiring => "it ends within 30 days",
        })
    }
}

/// A server certificate file that a CA of this installation issues and keeps current: the
/// broker's and the console's generated certificates.
#[derive(Debug, Clone)]
pub struct ServerCertificate {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, 0600).
    pub key: PathBuf,
    /// DNS names and IP addresses it must carry (in this order; the first is the CN).
    pub names: Vec<String>,
    /// Validity of a newly issued certificate.
    pub validity: Duration,
}

impl ServerCertificate {
    /// Issues the certificate from `ca` when it is missing or unreadable, when its names are
    /// not [`names`](Self::names) (compared as a set), or when it ends within 30 days; keeps
    /// it otherwise. Returns why it was issued, `None` when kept.
    pub fn ensure(&self, ca: &CertificateAuthority) -> Result<Option<Reissue>, PkiError> {
        let reason = match self.current() {
            None => Some(Reissue::Missing),
            Some((_, end)) if end <= SystemTime::now() + RENEW_BEFORE => Some(Reissue::Expiring),
            Some((names, _)) if names != name_set(&self.names) => Some(Reissue::Names),
            Some(_) => None,
        };
        if reason.is_some() {
            self.issue(ca)?;
        }
        Ok(reason)
    }

    /// Issues the certificate from `ca` whatever is there.
    pub fn issue(&self, ca: &CertificateAuthority) -> Result<(), PkiError> {
        ca.issue_server(&self.names, self.validity)?
            .save(&self.cert, &self.key)
    }

    /// The names and the end of the certificate on disk, `None` when it or its key is missing
    /// or unreadable.
    fn current(&self) -> Option<(BTreeSet<String>, SystemTime)> {
        if !self.key.exists() {
            return None;
        }
        let certs = crate::files::load_certificates(&self.cert).ok()?;
        let leaf = certs.first()?;
        Some((subject_alt_names(leaf).ok()?, not_after(leaf).ok()?))
    }
}

/// Whether a certificate ends within 30 days (or has ended): when [`ServerCertificate::ensure`]
/// issues it again, and when a status should warn about one that is renewed by hand.
pub fn ends_soon(cert: &CertificateDer<'_>) -> Result<bool, PkiError> {
    Ok(not_after(cert)? <= SystemTime::now() + RENEW_BEFORE)
}

/// The names as a certificate carries them: IP addresses in their canonical text, DNS names
/// in lower case.
fn name_set(names: &[String]) -> BTreeSet<String> {
    names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => n.to_ascii_lowercase(),
        })
        .collect()
}

/// The DNS names and IP addresses of a certificate's subject alternative names.
fn subject_alt_names(cert: &CertificateDer<'_>) -> Result<BTreeSet<String>, PkiError> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| PkiError::Parse(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let mut names = BTreeSet::new();
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        match name {
            GeneralName::DNSName(dns) => {
                names.insert(dns.to_ascii_lowercase());
            }
            GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).map(IpAddr::from).ok(),
                    16 => <[u8; 16]>::try_from(*bytes).map(IpAddr::from).ok(),
                    _ => None,
                };
                if let Some(ip) = ip {
                    names.insert(ip.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(names)
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| PkiError::io("creating the data folder", dir, e))
}
