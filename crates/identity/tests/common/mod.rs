//! Test PKI: tenant CAs and client certificates with the subject convention
//! O = tenant, OU = role, CN = id.
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

/// 2026-11-27 00:00:00 UTC, inside every default validity period below.
pub const NOW: i64 = 1_795_737_600;

pub struct TestCa {
    pub pem: String,
    pub der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A CA named `CN=<cn>, O=<org>`.
    pub fn new(org: &str, cn: &str) -> Self {
        Self::with_validity(org, cn, (2020, 2040))
    }

    pub fn with_validity(org: &str, cn: &str, (from, to): (i32, i32)) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date_time_ymd(from, 1, 1);
        params.not_after = date_time_ymd(to, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate with the given subject parts (None: attribute left out).
    pub fn issue(&self, o: Option<&str>, ou: Option<&str>, cn: Option<&str>) -> Vec<u8> {
        self.issue_valid(o, ou, cn, (2025, 2030))
    }

    pub fn issue_valid(
        &self,
        o: Option<&str>,
        ou: Option<&str>,
        cn: Option<&str>,
        (from, to): (i32, i32),
    ) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        // rcgen starts with a default CN; this subject must hold only what the test asks.
        params.distinguished_name = DistinguishedName::new();
        if let Some(o) = o {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        if let Some(ou) = ou {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, ou);
        }
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.not_before = date_time_ymd(from, 1, 1);
        params.not_after = date_time_ymd(to, 1, 1);
        let key = KeyPair::generate().unwrap();
        params.signed_by(&key, &self.issuer).unwrap().der().to_vec()
    }

    pub fn agent(&self, tenant: &str, id: &str) -> Vec<u8> {
        self.issue(Some(tenant), Some("agent"), Some(id))
    }
}
