//! The doctor's TLS client: the agent's (same trust anchors, same client certificate, the same
//! webpki verification), plus a record of the chain the broker presented, so that a failed
//! check can say which certificate expired, who issued an untrusted one, and which names a
//! certificate carries.

use std::sync::Arc;
use std::time::SystemTime;

use beckon_net::time::{format_utc, system_time_from_unix};
use beckon_net::{TlsClient, TlsConfigError, TlsSettings, TrustAnchors};
use beckon_pki::{Observations, observing_server_verifier};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::report::CertificateFacts;

/// The TLS client the doctor connects with.
#[derive(Debug)]
pub(crate) struct ProbeTls {
    /// The client, built on the recording verifier.
    pub client: TlsClient,
    seen: Arc<Observations>,
    /// Subjects of the configured CA certificates (for "the CA file does not sign ...").
    pub ca_subjects: Vec<String>,
}

impl ProbeTls {
    /// Loads trust anchors and identity as the agent does (`beckon_net::TlsClient::new`
    /// checks them first, so a bad file is reported in the agent's words).
    pub fn new(settings: &TlsSettings) -> Result<Self, TlsConfigError> {
        TlsClient::new(settings)?;
        let (roots, ca_subjects) = load_roots(&settings.trust)?;
        let seen = Arc::new(Observations::default());
        let verifier = observing_server_verifier(roots, Arc::clone(&seen)).map_err(|e| {
            TlsConfigError::InvalidPem {
                what: String::from("trusted CA certificates"),
                detail: e.to_string(),
            }
        })?;
        let client = TlsClient::with_verification(
            settings,
            beckon_pki::ServerVerification::Custom(verifier),
        )?;
        Ok(Self {
            client,
            seen,
            ca_subjects,
        })
    }

    /// Forgets the chain of the previous handshake.
    pub fn clear(&self) {
        self.seen.clear();
    }

    /// The chain the broker presented in the last handshake, described.
    pub fn last_chain(&self) -> Vec<CertificateFacts> {
        self.seen
            .chain()
            .iter()
            .filter_map(|der| describe(der))
            .collect()
    }
}

/// Subject, issuer, validity and names of a certificate; `None` if it does not parse.
pub(crate) fn describe(der: &CertificateDer<'_>) -> Option<CertificateFacts> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Some(CertificateFacts {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: format_utc(system_time_from_unix(
            cert.validity().not_before.timestamp(),
        )),
        not_after: format_utc(system_time_from_unix(cert.validity().not_after.timestamp())),
        names,
    })
}

/// Whether a certificate's end of validity (as reported) is before now.
pub(crate) fn has_expired(not_after: &str) -> bool {
    format_utc(SystemTime::now()).as_str() > not_after
}

/// Whether a certificate's start of validity (as reported) is after now.
pub(crate) fn not_yet_valid(not_before: &str) -> bool {
    format_utc(SystemTime::now()).as_str() < not_before
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

fn invalid(what: &str, detail: impl Into<String>) -> TlsConfigError {
    TlsConfigError::InvalidPem {
        what: what.to_owned(),
        detail: detail.into(),
    }
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::FileUnreadable {
        what,
        path: path.to_owned(),
        source,
    })
}

fn load_roots(trust: &TrustAnchors) -> Result<(RootCertStore, Vec<String>), TlsConfigError> {
    let mut roots = RootCertStore::empty();
    let mut subjects = Vec::new();
    let pem_roots =
        |pem: &[u8], what: &str, roots: &mut RootCertStore, subjects: &mut Vec<String>| {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| invalid(what, format!("not valid PEM: {e}")))?;
                if let Some(facts) = describe(&cert) {
                    subjects.push(facts.subject);
                }
                roots.add(cert).map_err(|e| {
                    invalid(what, format!("a certificate cannot be used as a CA: {e}"))
                })?;
            }
            Ok::<(), TlsConfigError>(())
        };
    let (file, system) = match trust {
        TrustAnchors::System => (None, true),
        TrustAnchors::CaFile(path) => (Some(path), false),
        TrustAnchors::CaFileAndSystem(path) => (Some(path), true),
        TrustAnchors::CaPem(pem) => {
            pem_roots(pem, "CA (in memory)", &mut roots, &mut subjects)?;
            (None, false)
        }
    };
    if let Some(path) = file {
        let pem = read("CA", path)?;
        pem_roots(
            &pem,
            &format!("CA file {}", path.display()),
            &mut roots,
            &mut subjects,
        )?;
    }
    if system {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
    }
    if roots.is_empty() {
        return Err(invalid("trusted CA certificates", "none could be loaded"));
    }
    Ok((roots, subjects))
}
