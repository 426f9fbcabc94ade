//! Tenants and the folder of tenant files they are loaded from (`tenants/<id>.toml`, format in
//! `docs/tenants.md`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::identity::{Role, TenantId, validate_id};
use crate::keys::{KeyId, PublicKey};

/// Largest tenant file or CA file read, in bytes: anything bigger is a mistake.
pub const MAX_TENANT_FILE_LEN: u64 = 1024 * 1024;

/// A CA certificate that issues a tenant's client certificates, with the parts the certificate
/// check needs kept ready.
#[derive(Clone)]
pub struct CaCertificate {
    der: Vec<u8>,
    subject: String,
    subject_raw: Vec<u8>,
    spki_raw: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

/// Why a CA certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    /// The text holds no PEM `CERTIFICATE` block.
    #[error("no PEM CERTIFICATE block found")]
    NoCertificate,
    /// A PEM block could not be decoded.
    #[error("PEM block {index} could not be read: {reason}")]
    BadPem {
        /// Which block (0-based).
        index: usize,
        /// What went wrong.
        reason: String,
    },
    /// The DER is not an X.509 certificate.
    #[error("certificate {index} is not valid X.509: {reason}")]
    BadCertificate {
        /// Which certificate (0-based).
        index: usize,
        /// What went wrong.
        reason: String,
    },
    /// The certificate is not a CA (basicConstraints CA:TRUE missing).
    #[error(
        "certificate {index} ({subject}) is not a CA certificate (basicConstraints CA:TRUE is missing): list the CA that issues the client certificates, not a client certificate"
    )]
    NotACa {
        /// Which certificate (0-based).
        index: usize,
        /// Its subject.
        subject: String,
    },
}

impl CaCertificate {
    /// Parses one DER certificate and checks that it is a CA.
    pub fn from_der(der: Vec<u8>) -> Result<Self, CaError> {
        Self::from_der_at(der, 0)
    }

    fn from_der_at(der: Vec<u8>, index: usize) -> Result<Self, CaError> {
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| CaError::BadCertificate {
            index,
            reason: e.to_string(),
        })?;
        let subject = cert.subject().to_string();
        if !cert.is_ca() {
            return Err(CaError::NotACa { index, subject });
        }
        let subject_raw = cert.subject().as_raw().to_vec();
        let spki_raw = cert.public_key().raw.to_vec();
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        Ok(Self {
            der,
            subject,
            subject_raw,
            spki_raw,
            not_before,
            not_after,
        })
    }

    /// Parses every `CERTIFICATE` block of a PEM text (other blocks are skipped).
    pub fn from_pem(pem: &str) -> Result<Vec<Self>, CaError> {
        let mut out = Vec::new();
        for (index, block) in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).enumerate() {
            let block = block.map_err(|e| CaError::BadPem {
                index,
                reason: e.to_string(),
            })?;
            if block.label == "CERTIFICATE" {
                out.push(Self::from_der_at(block.contents, index)?);
            }
        }
        if out.is_empty() {
            return Err(CaError::NoCertificate);
        }
        Ok(out)
    }

    /// The certificate in DER, for the TLS layer's list of client-certificate roots.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The subject, for log lines.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub(crate) fn subject_raw(&self) -> &[u8] {
        &self.subject_raw
    }

    /// Whether the CA certificate itself is valid at `now` (unix seconds).
    pub(crate) fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// Parses the stored public key (cheap: no signature math).
    pub(crate) fn with_public_key<T>(
        &self,
        f: impl FnOnce(&x509_parser::x509::SubjectPublicKeyInfo<'_>) -> T,
    ) -> Option<T> {
        x509_parser::x509::SubjectPublicKeyInfo::from_der(&self.spki_raw)
            .ok()
            .map(|(_, spki)| f(&spki))
    }
}

impl fmt::Debug for CaCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaCertificate")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// One tenant: its CAs for mTLS agents, its token keys, its quota.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// The tenant id (the file name without `.toml`).
    pub id: TenantId,
    /// A display name for logs and the console.
    pub name: Option<String>,
    /// CAs whose certificates authenticate this tenant's clients.
    pub ca_certificates: Vec<CaCertificate>,
    /// Ed25519 public keys that sign this tenant's tokens, by key id.
    pub token_keys: BTreeMap<KeyId, PublicKey>,
    /// Most simultaneous connections the tenant may hold on one broker node; `None`: no quota.
    pub max_connections: Option<u32>,
    /// Revoked credentials (`[[revoked]]`), by role and id: the broker refuses them at
    /// CONNECT and closes their connections when the list grows.
    pub revoked: BTreeMap<(Role, String), Revocation>,
}

/// The revoked credentials of one identity (a `[[revoked]]` entry of a tenant file).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Revocation {
    /// Serial numbers (canonical hex, see [`certificate_serial`]) of the revoked
    /// certificates; `None`: every certificate of the identity.
    pub serials: Option<std::collections::BTreeSet<String>>,
    /// Tokens issued at or before this time (unix seconds, the `iat` claim) are revoked;
    /// `None`: every token of the identity.
    pub tokens_issued_until: Option<i64>,
}

/// Which credential a connection presented, as far as revocation is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// A certificate with this serial (canonical hex).
    Certificate(&'a str),
    /// A token issued at this time (unix seconds).
    Token(i64),
}

impl fmt::Display for Credential<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Certificate(serial) => write!(f, "certificate with serial {serial}"),
            Credential::Token(iat) => write!(f, "token issued at unix time {iat}"),
        }
    }
}

impl Revocation {
    /// Whether this entry revokes `credential`.
    pub fn revokes(&self, credential: Credential<'_>) -> bool {
        match credential {
            Credential::Certificate(serial) => self
                .serials
                .as_ref()
                .is_none_or(|serials| serials.contains(serial)),
            Credential::Token(iat) => self.tokens_issued_until.is_none_or(|until| iat <= until),
        }
    }
}

/// The canonical form of a certificate serial number: lowercase hex of its bytes without
/// leading zero bytes or separators (`5f1c0a...`). Accepts what operators paste (colons,
/// upper case, a leading `0x`); `None` when it is not hex or longer than 20 bytes (RFC 5280).
pub fn canonical_serial(text: &str) -> Option<String> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let hex: String = t
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = hex.trim_start_matches('0');
    // Whole bytes: an odd count gets its leading zero back.
    let canonical = if trimmed.is_empty() {
        "00".to_owned()
    } else if trimmed.len() % 2 == 1 {
        format!("0{trimmed}")
    } else {
        trimmed.to_owned()
    };
    (canonical.len() <= 40).then_some(canonical)
}

/// The serial number of a certificate (DER) in canonical hex, as [`canonical_serial`] writes
/// it; `None` when the DER is not a certificate.
pub fn certificate_serial(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(serial_hex(cert.raw_serial()))
}

pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let hex: String = raw[start..].iter().map(|b| format!("{b:02x}")).collect();
    if hex.is_empty() { "00".into() } else { hex }
}

impl Tenant {
    /// A tenant with no CA, no key and no quota (add them with the fields).
    pub fn new(id: TenantId) -> Self {
        Self {
            id,
            name: None,
            ca_certificates: Vec::new(),
            token_keys: BTreeMap::new(),
            max_connections: None,
            revoked: BTreeMap::new(),
        }
    }

    /// The revocation entry that refuses `credential` of the identity `(role, id)`, if any.
    pub fn revocation(
        &self,
        role: Role,
        id: &str,
        credential: Credential<'_>,
    ) -> Option<&Revocation> {
        self.revoked
            .get(&(role, id.to_owned()))
            .filter(|r| r.revokes(credential))
    }
}

/// A problem with one tenant file; the other files load regardless.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {reason}", file.display(), key.as_ref().map(|k| format!(": {k}")).unwrap_or_default())]
pub struct TenantFileError {
    /// The file (or the folder, when it cannot be listed).
    pub file: PathBuf,
    /// The key inside the file (`ca[1].file`, `token_key[0].public_key`), when known.
    pub key: Option<String>,
    /// What is wrong and, where it helps, what to do.
    pub reason: String,
}

impl TenantFileError {
    fn new(file: &Path, key: Option<String>, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            key,
            reason: reason.into(),
        }
    }
}

/// The result of loading or reloading a tenant folder.
#[derive(Debug)]
pub struct LoadOutcome {
    /// The tenants that loaded (on a reload, tenants whose file broke keep their last good
    /// version).
    pub directory: TenantDirectory,
    /// One entry per file that could not be used.
    pub errors: Vec<TenantFileError>,
}

/// Size and modification time of each file a directory was loaded from: a cheap way for a
/// poller to see that something changed.
type Fingerprint = BTreeMap<PathBuf, Option<(SystemTime, u64)>>;

/// All tenants, by id. Cheap to clone (tenants are shared).
#[derive(Debug, Clone, Default)]
pub struct TenantDirectory {
    tenants: BTreeMap<TenantId, Arc<Tenant>>,
    folder: Option<PathBuf>,
    fingerprint: Fingerprint,
}

impl TenantDirectory {
    /// A directory built in memory (embedded setups, tests).
    pub fn from_tenants(tenants: impl IntoIterator<Item = Tenant>) -> Self {
        Self {
            tenants: tenants
                .into_iter()
                .map(|t| (t.id.clone(), Arc::new(t)))
                .collect(),
            folder: None,
            fingerprint: Fingerprint::new(),
        }
    }

    /// Loads every `*.toml` file of `folder`. Files with errors are reported and skipped; the
    /// valid ones load.
    pub fn load(folder: impl AsRef<Path>) -> LoadOutcome {
        Self::default().reload_from(folder.as_ref())
    }

    /// Loads the folder again. A tenant whose file now has an error keeps its previous version
    /// (an operator's typo must not lock a whole tenant out); a deleted file removes its tenant.
    /// A directory built with [`from_tenants`](Self::from_tenants) is returned unchanged.
    pub fn reload(&self) -> LoadOutcome {
        match &self.folder {
            Some(folder) => self.reload_from(&folder.clone()),
            None => LoadOutcome {
                directory: self.clone(),
                errors: Vec::new(),
            },
        }
    }

    /// Reloads only when a tenant file or a CA file it names was added, removed or changed
    /// since the last load; `None` otherwise. The broker calls this every few seconds.
    pub fn reload_if_changed(&self) -> Option<LoadOutcome> {
        let folder = self.folder.as_ref()?;
        let mut now = Fingerprint::new();
        if let Ok(files) = list_tenant_files(folder) {
            for f in files {
                now.insert(f.clone(), stamp(&f));
            }
        }
        // Referenced CA files: keep the ones recorded at the last load.
        for path in self.fingerprint.keys() {
            if path.extension().is_none_or(|e| e != "toml") {
                now.insert(path.clone(), stamp(path));
            }
        }
        (now != self.fingerprint).then(|| self.reload())
    }

    fn reload_from(&self, folder: &Path) -> LoadOutcome {
        let mut errors = Vec::new();
        let mut fingerprint = Fingerprint::new();
        let files = match list_tenant_files(folder) {
            Ok(files) => files,
            Err(e) => {
                errors.push(TenantFileError::new(
                    folder,
                    None,
                    format!("cannot list the tenant folder: {e}; tenants are unchanged"),
                ));
                let mut directory = self.clone();
                directory.folder = Some(folder.to_path_buf());
                return LoadOutcome { directory, errors };
            }
        };
        let mut tenants = BTreeMap::new();
        for file in files {
            fingerprint.insert(file.clone(), stamp(&file));
            let stem = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            let id = match TenantId::new(stem) {
                Ok(id) => id,
                Err(e) => {
                    errors.push(TenantFileError::new(
                        &file,
                        None,
                        format!("the file name must be <tenant id>.toml: {e}"),
                    ));
                    continue;
                }
            };
            match load_tenant_file(&file, folder, id.clone(), &mut fingerprint) {
                Ok(tenant) => {
                    tenants.insert(id, Arc::new(tenant));
                }
                Err(mut e) => {
                    if let Some(previous) = self.tenants.get(&id) {
                        e.reason
                            .push_str("; the previous version of this tenant stays in use");
                        tenants.insert(id, previous.clone());
                    }
                    errors.push(e);
                }
            }
        }
        LoadOutcome {
            directory: Self {
                tenants,
                folder: Some(folder.to_path_buf()),
                fingerprint,
            },
            errors,
        }
    }

    /// The tenant with this id.
    pub fn get(&self, id: &str) -> Option<&Tenant> {
        self.tenants.get(id).map(|t| &**t)
    }

    /// All tenants, ordered by id.
    pub fn iter(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.values().map(|t| &**t)
    }

    /// Number of tenants.
    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    /// Whether there is no tenant at all.
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// Every tenant's CA certificates in DER: the roots the TLS layer accepts client
    /// certificates from. Which tenant a certificate belongs to is decided afterwards by
    /// [`identity_from_certificate`](crate::identity_from_certificate).
    pub fn client_ca_certificates(&self) -> Vec<&[u8]> {
        self.iter()
            .flat_map(|t| t.ca_certificates.iter().map(CaCertificate::der))
            .collect()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn list_tenant_files(folder: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(folder)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Editors leave hidden swap and backup files next to the ones being edited.
        if name.starts_with('.') || !name.ends_with(".toml") || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

fn read_limited(path: &Path) -> Result<String, String> {
    let meta = fs::metadata(path).map_err(|e| e.to_string())?;
    // A device or a pipe has no size to check and may never end (`/dev/zero`) or block.
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    let len = meta.len();
    if len > MAX_TENANT_FILE_LEN {
        return Err(format!(
            "{len} bytes is larger than the {MAX_TENANT_FILE_LEN}-byte limit"
        ));
    }
    fs::read_to_string(path).map_err(|e| e.to_string())
}

/// The TOML shape of a tenant file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    name: Option<String>,
    max_connections: Option<u32>,
    #[serde(default)]
    ca: Vec<CaEntry>,
    #[serde(default)]
    token_key: Vec<TokenKeyEntry>,
    #[serde(default)]
    revoked: Vec<RevokedEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedEntry {
    id: String,
    role: Option<String>,
    serials: Option<Vec<String>>,
    tokens_issued_until: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaEntry {
    file: Option<PathBuf>,
    pem: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenKeyEntry {
    kid: String,
    public_key: String,
}

fn load_tenant_file(
    file: &Path,
    folder: &Path,
    id: TenantId,
    fingerprint: &mut Fingerprint,
) -> Result<Tenant, TenantFileError> {
    let text = read_limited(file)
        .map_err(|e| TenantFileError::new(file, None, format!("cannot read: {e}")))?;
    parse_tenant_file(&text, file, folder, id, fingerprint)
}

/// The tenant of the text of `file`; `ca` files are read relative to `folder`.
pub(crate) fn parse_tenant_file(
    text: &str,
    file: &Path,
    folder: &Path,
    id: TenantId,
    fingerprint: &mut Fingerprint,
) -> Result<Tenant, TenantFileError> {
    let err = |key: Option<String>, reason: String| TenantFileError::new(file, key, reason);
    let parsed: TenantFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let reason = match line {
            Some(line) => format!("line {line}: {}", e.message().trim()),
            None => e.message().trim().to_owned(),
        };
        err(None, reason)
    })?;
    let mut tenant = Tenant::new(id);
    tenant.name = parsed.name;
    if parsed.max_connections == Some(0) {
        return Err(err(
            Some("max_connections".into()),
            "0 would refuse every connection; remove the key for no quota".into(),
        ));
    }
    tenant.max_connections = parsed.max_connections;
    for (i, ca) in parsed.ca.into_iter().enumerate() {
        let (key, pem) = match (ca.file, ca.pem) {
            (Some(path), None) => {
                let path = if path.is_absolute() {
                    path
                } else {
                    folder.join(path)
                };
                fingerprint.insert(path.clone(), stamp(&path));
                let key = format!("ca[{i}].file");
                let pem = read_limited(&path).map_err(|e| {
                    err(
                        Some(key.clone()),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                (key, pem)
            }
            (None, Some(pem)) => (format!("ca[{i}].pem"), pem),
            _ => {
                return Err(err(
                    Some(format!("ca[{i}]")),
                    "give exactly one of `file` (a PEM file) or `pem` (the PEM text)".into(),
                ));
            }
        };
        let cas = CaCertificate::from_pem(&pem).map_err(|e| err(Some(key), e.to_string()))?;
        tenant.ca_certificates.extend(cas);
    }
    for (i, entry) in parsed.token_key.into_iter().enumerate() {
        let kid = KeyId::new(entry.kid)
            .map_err(|e| err(Some(format!("token_key[{i}].kid")), e.to_string()))?;
        let key = PublicKey::from_base64(&entry.public_key)
            .map_err(|e| err(Some(format!("token_key[{i}].public_key")), e.to_string()))?;
        if tenant.token_keys.insert(kid.clone(), key).is_some() {
            return Err(err(
                Some(format!("token_key[{i}].kid")),
                format!("key id \"{kid}\" appears twice; key ids must be unique within a tenant"),
            ));
        }
    }
    for (i, entry) in parsed.revoked.into_iter().enumerate() {
        let key = |field: &str| Some(format!("revoked[{i}].{field}"));
        validate_id(&entry.id).map_err(|e| err(key("id"), e.to_string()))?;
        let role = match entry.role.as_deref() {
            None => Role::Agent,
            Some(r) => r.parse().map_err(|e| err(key("role"), format!("{e}")))?,
        };
        let serials = match entry.serials {
            None => None,
            Some(list) => {
                let mut set = std::collections::BTreeSet::new();
                for (j, s) in list.iter().enumerate() {
                    let canonical = canonical_serial(s).ok_or_else(|| {
                        err(
                            Some(format!("revoked[{i}].serials[{j}]")),
                            format!(
                                "{s:?} is not a certificate serial: write it in hex (up to 20 bytes, colons allowed)"
                            ),
                        )
                    })?;
                    set.insert(canonical);
                }
                Some(set)
            }
        };
        let revocation = Revocation {
            serials,
            tokens_issued_until: entry.tokens_issued_until,
        };
        if tenant
            .revoked
            .insert((role, entry.id.clone()), revocation)
            .is_some()
        {
            return Err(err(
                key("id"),
                format!(
                    "{role}/{} appears twice; give each identity one [[revoked]] entry",
                    entry.id
                ),
            ));
        }
    }
    Ok(tenant)
}
