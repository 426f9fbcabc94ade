//! Reading who a client certificate names.

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::PkiError;

/// The naming fields of a certificate's subject: Beckon issues client certificates with
/// O = tenant, OU = role, CN = id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertificateIdentity {
    /// Subject common name (CN).
    pub common_name: Option<String>,
    /// Subject organization (O).
    pub organization: Option<String>,
    /// Subject organizational unit (OU).
    pub org_unit: Option<String>,
}

/// Parses the subject of a DER certificate.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Result<CertificateIdentity, PkiError> {
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| PkiError::Parse(e.to_string()))?;
    let subject = x509.subject();
    Ok(CertificateIdentity {
        common_name: first(subject.iter_common_name()),
        organization: first(subject.iter_organization()),
        org_unit: first(subject.iter_organizational_unit()),
    })
}

fn first<'a, 'b: 'a>(
    mut it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'b>>,
) -> Option<String> {
    it.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
}
