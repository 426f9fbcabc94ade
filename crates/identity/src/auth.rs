//! Authentication at CONNECT: client certificate and/or token to [`Identity`], client id
//! rules, tenant quota, and the refusal reasons with their MQTT reason codes.

use std::fmt;

use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::identity::{Identity, IdentityError, Role, TenantId};
use crate::tenant::{Credential, Tenant, TenantDirectory, serial_hex};
use crate::token::{TokenVerifier, VerifiedToken};

/// Why a CONNECT was refused. [`reason_code`](Self::reason_code) gives the MQTT 5 CONNACK
/// reason code, [`return_code_v3`](Self::return_code_v3) the MQTT 3.1.1 return code, and
/// `Display` a line for the broker log (never the secret itself).
///
/// Policy: credentials that fail to verify (a malformed, unknown, forged or expired token; a
/// certificate whose signature or validity is wrong) are "bad user name or password" (0x86);
/// credentials that verify but may not connect as what they claim (no credentials at all, a
/// certificate from a CA that is not its tenant's, an unknown tenant, certificate and token
/// naming different identities) are "not authorized" (0x87); a client id that is not the
/// identity's is 0x85; a full tenant quota is 0x97.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Neither a client certificate nor a password was presented.
    #[error(
        "no credentials: present a client certificate issued by the tenant's CA or a token as the MQTT password"
    )]
    NoCredentials,
    /// The password is not a Beckon token (wrong prefix, bad base64 or JSON, too long).
    #[error("token is malformed: {0}")]
    TokenMalformed(String),
    /// The token names a tenant that has no tenant file.
    #[error("token names tenant {0:?}, which is not configured on this broker")]
    TokenUnknownTenant(String),
    /// The token's key id is not among the tenant's token keys.
    #[error(
        "token key id {kid:?} is not a token key of tenant {tenant}: add it to the tenant file or issue a new token"
    )]
    TokenUnknownKey {
        /// The tenant.
        tenant: TenantId,
        /// The unknown key id.
        kid: String,
    },
    /// The token's signature does not verify with the named key.
    #[error("token signature does not verify with key {kid:?} of tenant {tenant}")]
    TokenBadSignature {
        /// The tenant.
        tenant: TenantId,
        /// The key id the token named.
        kid: String,
    },
    /// The token has expired.
    #[error("token of {identity} expired at unix time {expired_at} (now {now}): issue a new token")]
    TokenExpired {
        /// Who the token was for.
        identity: Identity,
        /// Its `exp` claim.
        expired_at: i64,
        /// The broker's clock.
        now: i64,
    },
    /// The token was issued in the future (beyond the allowed clock skew).
    #[error(
        "token of {identity} is issued at unix time {issued_at}, after now ({now}): check the clocks of console and broker"
    )]
    TokenNotYetValid {
        /// Who the token was for.
        identity: Identity,
        /// Its `iat` claim.
        issued_at: i64,
        /// The broker's clock.
        now: i64,
    },
    /// The token or certificate names an identity that breaks the identity rules.
    #[error("credentials name an invalid identity: {0}")]
    InvalidIdentity(IdentityError),
    /// The client certificate could not be parsed.
    #[error("client certificate is malformed: {0}")]
    CertificateMalformed(String),
    /// The subject does not carry exactly one O (tenant), OU (role) and CN (id).
    #[error(
        "client certificate subject {subject:?} does not name an identity: {reason} (expected O=<tenant>, OU=agent|server, CN=<id>)"
    )]
    CertificateSubject {
        /// The subject as text.
        subject: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// The certificate's O names a tenant that has no tenant file.
    #[error("client certificate names tenant {0:?}, which is not configured on this broker")]
    CertificateUnknownTenant(String),
    /// The certificate was not issued by any CA of the tenant it names.
    #[error(
        "client certificate for {identity} was issued by {issuer:?}, which is not a CA of tenant {}", identity.tenant
    )]
    CertificateUnknownCa {
        /// The identity the certificate claims.
        identity: Identity,
        /// Its issuer.
        issuer: String,
    },
    /// The certificate names one of the tenant's CAs as issuer but its signature does not verify.
    #[error(
        "client certificate for {identity} has a signature that does not verify with its tenant's CA {issuer:?}"
    )]
    CertificateBadSignature {
        /// The identity the certificate claims.
        identity: Identity,
        /// The CA it names.
        issuer: String,
    },
    /// The certificate (or its CA) is outside its validity period.
    #[error(
        "client certificate for {identity} is not valid now (unix {now}): valid from {not_before} to {not_after}; renew it"
    )]
    CertificateExpired {
        /// The identity the certificate claims.
        identity: Identity,
        /// Start of validity (unix seconds).
        not_before: i64,
        /// End of validity (unix seconds).
        not_after: i64,
        /// The broker's clock.
        now: i64,
    },
    /// The tenant CA that issued the certificate is outside its own validity period.
    #[error(
        "the CA {issuer:?} of tenant {} that issued the certificate for {identity} is not valid now (unix {now}): renew the tenant's CA", identity.tenant
    )]
    CaExpired {
        /// The identity the certificate claims.
        identity: Identity,
        /// The CA's subject.
        issuer: String,
        /// The broker's clock.
        now: i64,
    },
    /// The credential was revoked (a `[[revoked]]` entry of the tenant file, written by the
    /// console when an agent is removed).
    #[error(
        "{identity} (tenant {}, {} {}) is revoked: its {credential} is listed under [[revoked]] in the tenant file; enroll the agent again to give it a new identity", identity.tenant, identity.role, identity.id()
    )]
    Revoked {
        /// Who presented it.
        identity: Identity,
        /// Which credential (`certificate with serial ...`, `token issued at ...`).
        credential: String,
    },
    /// Certificate and token were both presented and name different identities.
    #[error("client certificate names {certificate} but the token names {token}")]
    CredentialsDisagree {
        /// The certificate's identity.
        certificate: Identity,
        /// The token's identity.
        token: Identity,
    },
    /// The MQTT client id is not the identity's id.
    #[error(
        "client id {client_id:?} does not match the authenticated identity {identity}: use client id {:?} or an empty one", identity.id()
    )]
    WrongClientId {
        /// The authenticated identity.
        identity: Identity,
        /// The client id sent in CONNECT.
        client_id: String,
    },
    /// The tenant already holds its maximum number of connections.
    #[error("tenant {tenant} already holds its quota of {max} connections")]
    QuotaExceeded {
        /// The tenant.
        tenant: TenantId,
        /// Its `max_connections`.
        max: u32,
    },
}

/// MQTT 5 CONNACK reason code "Client Identifier not valid".
pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
/// MQTT 5 CONNACK reason code "Bad User Name or Password".
pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
/// MQTT 5 reason code "Not authorized".
pub const NOT_AUTHORIZED: u8 = 0x87;
/// MQTT 5 CONNACK reason code "Quota exceeded".
pub const QUOTA_EXCEEDED: u8 = 0x97;

impl Refusal {
    /// The MQTT 5 CONNACK reason code.
    pub fn reason_code(&self) -> u8 {
        match self {
            Refusal::TokenMalformed(_)
            | Refusal::TokenUnknownTenant(_)
            | Refusal::TokenUnknownKey { .. }
            | Refusal::TokenBadSignature { .. }
            | Refusal::TokenExpired { .. }
            | Refusal::TokenNotYetValid { .. }
            | Refusal::InvalidIdentity(_)
            | Refusal::CertificateMalformed(_)
            | Refusal::CertificateBadSignature { .. }
            | Refusal::CertificateExpired { .. }
            | Refusal::CaExpired { .. } => BAD_USER_NAME_OR_PASSWORD,
            Refusal::NoCredentials
            | Refusal::CertificateSubject { .. }
            | Refusal::CertificateUnknownTenant(_)
            | Refusal::CertificateUnknownCa { .. }
            | Refusal::Revoked { .. }
            | Refusal::CredentialsDisagree { .. } => NOT_AUTHORIZED,
            Refusal::WrongClientId { .. } => CLIENT_IDENTIFIER_NOT_VALID,
            Refusal::QuotaExceeded { .. } => QUOTA_EXCEEDED,
        }
    }

    /// The MQTT 3.1.1 CONNACK return code: 2 identifier rejected, 3 server unavailable, 4 bad
    /// user name or password, 5 not authorized.
    pub fn return_code_v3(&self) -> u8 {
        match self.reason_code() {
            CLIENT_IDENTIFIER_NOT_VALID => 2,
            QUOTA_EXCEEDED => 3,
            BAD_USER_NAME_OR_PASSWORD => 4,
            _ => 5,
        }
    }
}

/// How a connection proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A client certificate issued by the tenant's CA.
    Certificate,
    /// A signed token as the MQTT password.
    Token,
    /// Both, naming the same identity.
    CertificateAndToken,
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMethod::Certificate => "certificate",
            AuthMethod::Token => "token",
            AuthMethod::CertificateAndToken => "certificate+token",
        })
    }
}

/// What a client presented at CONNECT.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The leaf of the client certificate chain (DER), already verified by the TLS layer
    /// against [`TenantDirectory::client_ca_certificates`].
    pub client_certificate: Option<&'a [u8]>,
    /// The MQTT password (a token). The user name is not used for authentication.
    pub password: Option<&'a [u8]>,
    /// The MQTT client id from CONNECT.
    pub client_id: &'a str,
}

/// A successful authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// Who is connecting.
    pub identity: Identity,
    /// The client id the session uses: always the identity's id. When the client sent an empty
    /// client id, the broker returns this one to MQTT 5 clients as Assigned Client Identifier.
    pub client_id: String,
    /// Whether the client sent an empty client id (so the id was assigned).
    pub client_id_assigned: bool,
    /// Whether the client id was the identity's probe id ([`probe_client_id`]): a diagnosis
    /// that may only connect and ping, beside the identity's own session.
    pub probe: bool,
    /// How the identity was proved.
    pub method: AuthMethod,
    /// When the token expires (unix seconds), if a token was used. Tokens are checked at
    /// CONNECT only; an established session outlives its token.
    pub token_expires_at: Option<i64>,
    /// When the token was issued (unix seconds), if a token was used: revocation lists
    /// name tokens by their issue time.
    pub token_issued_at: Option<i64>,
    /// The client certificate's serial number (canonical hex, see
    /// [`certificate_serial`](crate::certificate_serial)), if a certificate was used.
    pub certificate_serial: Option<String>,
}

/// Authenticates CONNECTs against a [`TenantDirectory`].
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    /// Token checks (clock-skew allowance).
    pub tokens: TokenVerifier,
}

impl Authenticator {
    /// Decides who is connecting, or why not. `now` is the broker's clock in unix seconds.
    ///
    /// With a certificate, the certificate decides; a password presented as well must be a
    /// token naming the same identity. Without a certificate, the password must be a token.
    /// Finally the client id must be the identity's id, or empty.
    pub fn authenticate(
        &self,
        directory: &TenantDirectory,
        credentials: &Credentials<'_>,
        now: i64,
    ) -> Result<Authenticated, Refusal> {
        let password = credentials.password.filter(|p| !p.is_empty());
        let (identity, method, token, serial) = match (credentials.client_certificate, password) {
            (None, None) => return Err(Refusal::NoCredentials),
            (Some(leaf), None) => {
                let (identity, serial) = certificate_identity(directory, leaf, now)?;
                check_revoked(directory, &identity, Credential::Certificate(&serial))?;
                (identity, AuthMethod::Certificate, None, Some(serial))
            }
            (None, Some(token)) => {
                let token = self.tokens.verify(directory, token, now)?;
                (token.identity.clone(), AuthMethod::Token, Some(token), None)
            }
            (Some(leaf), Some(token)) => {
                let (certificate, serial) = certificate_identity(directory, leaf, now)?;
                let token = self.tokens.verify(directory, token, now)?;
                if token.identity != certificate {
                    return Err(Refusal::CredentialsDisagree {
                        certificate,
                        token: token.identity,
                    });
                }
                check_revoked(directory, &certificate, Credential::Certificate(&serial))?;
                (
                    certificate,
                    AuthMethod::CertificateAndToken,
                    Some(token),
                    Some(serial),
                )
            }
        };
        if let Some(VerifiedToken { issued_at, .. }) = &token {
            check_revoked(directory, &identity, Credential::Token(*issued_at))?;
        }
        let token_expires_at = token.as_ref().map(|t| t.expires_at);
        let token_issued_at = token.map(|t| t.issued_at);
        let probe = credentials.client_id == probe_client_id(identity.id());
        let client_id_assigned = !probe && check_client_id(&identity, credentials.client_id)?;
        Ok(Authenticated {
            client_id: identity.id().to_owned(),
            identity,
            client_id_assigned,
            probe,
            method,
            token_expires_at,
            token_issued_at,
            certificate_serial: serial,
        })
    }
}

/// The client id with which `beckon doctor` probes as identity `id` (`<id>/doctor`; `/` is not
/// allowed in ids, so it names no identity of its own). The broker lets such a connection
/// connect and ping only: no publish, no subscription, no will, a fresh session of its own
/// (the identity's session is neither taken over nor resumed) and no presence event.
pub fn probe_client_id(id: &str) -> String {
    format!("{id}/doctor")
}

/// Checks the CONNECT client id against the identity: it must be the identity's id or empty
/// (then the broker assigns the id; returns `true`). An agent's client id is its identity.
pub fn check_client_id(identity: &Identity, client_id: &str) -> Result<bool, Refusal> {
    if client_id.is_empty() {
        Ok(true)
    } else if client_id == identity.id() {
        Ok(false)
    } else {
        Err(Refusal::WrongClientId {
            identity: identity.clone(),
            client_id: client_id.chars().take(200).collect(),
        })
    }
}

/// Refuses a credential that its tenant's `[[revoked]]` list names.
fn check_revoked(
    directory: &TenantDirectory,
    identity: &Identity,
    credential: Credential<'_>,
) -> Result<(), Refusal> {
    let revoked = directory
        .get(identity.tenant.as_str())
        .and_then(|t| t.revocation(identity.role, identity.id(), credential))
        .is_some();
    if revoked {
        return Err(Refusal::Revoked {
            identity: identity.clone(),
            credential: credential.to_string(),
        });
    }
    Ok(())
}

/// Checks the tenant's connection quota: `current` is how many connections the tenant holds
/// now, not counting the new one.
pub fn check_quota(tenant: &Tenant, current: usize) -> Result<(), Refusal> {
    match tenant.max_connections {
        Some(max) if current >= max as usize => Err(Refusal::QuotaExceeded {
            tenant: tenant.id.clone(),
            max,
        }),
        _ => Ok(()),
    }
}

fn single_attribute(
    subject: &str,
    label: &str,
    values: Vec<&x509_parser::x509::AttributeTypeAndValue<'_>>,
) -> Result<String, Refusal> {
    let bad = |reason: String| Refusal::CertificateSubject {
        subject: subject.to_owned(),
        reason,
    };
    match values.as_slice() {
        [one] => one
            .as_str()
            .map(str::to_owned)
            .map_err(|_| bad(format!("{label} is not a text string"))),
        [] => Err(bad(format!("{label} is missing"))),
        _ => Err(bad(format!("{label} appears {} times", values.len()))),
    }
}

/// Derives the identity from a client certificate (the leaf, DER) and checks that one of the
/// named tenant's CAs issued it: subject O = tenant, OU = role (`agent` or `server`), CN = id.
///
/// The TLS layer has already checked the chain against every tenant's CAs; this check binds
/// the certificate to *its* tenant, so that tenant A's CA cannot issue certificates for tenant
/// B. Validity of the leaf and the issuing CA is checked at `now` (unix seconds).
pub fn identity_from_certificate(
    directory: &TenantDirectory,
    leaf_der: &[u8],
    now: i64,
) -> Result<Identity, Refusal> {
    certificate_identity(directory, leaf_der, now).map(|(identity, _)| identity)
}

/// [`identity_from_certificate`], with the certificate's serial in canonical hex.
fn certificate_identity(
    directory: &TenantDirectory,
    leaf_der: &[u8],
    now: i64,
) -> Result<(Identity, String), Refusal> {
    let (_, leaf) = X509Certificate::from_der(leaf_der)
        .map_err(|e| Refusal::CertificateMalformed(e.to_string()))?;
    let name = leaf.subject();
    let subject = name.to_string();
    let tenant = single_attribute(&subject, "O", name.iter_organization().collect())?;
    let role = single_attribute(&subject, "OU", name.iter_organizational_unit().collect())?;
    let id = single_attribute(&subject, "CN", name.iter_common_name().collect())?;
    let tenant_id = TenantId::new(tenant.as_str()).map_err(Refusal::InvalidIdentity)?;
    let role: Role = role.parse().map_err(|e| Refusal::CertificateSubject {
        subject: subject.clone(),
        reason: format!("OU: {e}"),
    })?;
    let identity = Identity::new(tenant_id, role, id).map_err(Refusal::InvalidIdentity)?;
    let tenant = directory
        .get(identity.tenant.as_str())
        .ok_or_else(|| Refusal::CertificateUnknownTenant(identity.tenant.to_string()))?;

    let issuer = leaf.issuer();
    let candidates: Vec<_> = tenant
        .ca_certificates
        .iter()
        .filter(|ca| ca.subject_raw() == issuer.as_raw())
        .collect();
    if candidates.is_empty() {
        return Err(Refusal::CertificateUnknownCa {
            identity,
            issuer: issuer.to_string(),
        });
    }
    let signer = candidates.into_iter().find(|ca| {
        ca.with_public_key(|spki| leaf.verify_signature(Some(spki)).is_ok())
            .unwrap_or(false)
    });
    let Some(ca) = signer else {
        return Err(Refusal::CertificateBadSignature {
            identity,
            issuer: issuer.to_string(),
        });
    };
    let validity = leaf.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if now < not_before || now > not_after {
        return Err(Refusal::CertificateExpired {
            identity,
            not_before,
            not_after,
            now,
        });
    }
    if !ca.valid_at(now) {
        return Err(Refusal::CaExpired {
            identity,
            issuer: ca.subject().to_owned(),
            now,
        });
    }
    Ok((identity, serial_hex(leaf.raw_serial())))
}
