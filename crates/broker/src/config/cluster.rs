//! `[cluster]`: the node's NATS servers, name, timings, TLS and credentials.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// `[cluster]`: this broker is one node of several sharing messages, client ids and presence
/// through NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server URLs, e.g. `["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]`. Required.
    pub nats: Vec<String>,
    /// This node's name, unique in the cluster; shown in presence events (`node`). Default:
    /// the host name.
    pub node: String,
    /// First token of every NATS subject, so that several Beckon clusters can share one NATS.
    /// Default `beckon`.
    pub name: String,
    /// How often the node says it is alive, in milliseconds. Default 1000.
    pub heartbeat_ms: u64,
    /// After how long without a heartbeat another node counts as gone and the identities it
    /// held are published as disconnected, in milliseconds. Default 5000.
    pub node_timeout_ms: u64,
    /// How long writing to NATS may take before the PUBACKs waiting on it are given up (the
    /// publishers are disconnected and resend), in milliseconds. Default 5000.
    pub flush_timeout_ms: u64,
    /// The CA certificates (PEM) that signed the NATS servers' certificates: when set, every
    /// connection to NATS uses TLS verified against them.
    pub ca: Option<PathBuf>,
    /// The NATS user (with `password`).
    pub user: Option<String>,
    /// The NATS user's password.
    pub password: Option<String>,
    /// A NATS token (instead of a user and password).
    pub token: Option<String>,
    /// A file holding the seed of an NKey user (`SU...`, as `nk -gen user` or `nsc` write it),
    /// instead of a user and password or a token; its public key (`U...`) goes into the
    /// nats-server `authorization { users }` block.
    pub nkey_seed_file: Option<PathBuf>,
    /// A NATS user credentials file (`.creds`, as `nsc generate creds` writes it: the user JWT
    /// its account signed and the user's NKey seed), for a nats-server in operator mode
    /// (decentralized accounts); instead of the other credentials.
    pub credentials_file: Option<PathBuf>,
    /// Allows NATS servers off loopback without TLS (messages and credentials in clear text
    /// on the network). Default false: such a configuration is refused.
    pub insecure: bool,
}

impl ClusterConfig {
    /// The NKey user seed from `nkey_seed_file`: its first line that is one (files written
    /// by `nsc` frame it with comment lines).
    fn nkey_seed(&self) -> Result<String, ConfigError> {
        let path = self
            .nkey_seed_file
            .as_deref()
            .unwrap_or_else(|| Path::new(""));
        let invalid = |reason: String| ConfigError::Invalid {
            key: "cluster.nkey_seed_file",
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
        let seed = text
            .lines()
            .map(str::trim)
            .find(|line| line.starts_with("SU"))
            .ok_or_else(|| {
                invalid(format!(
                    "{} holds no NKey user seed (a line starting with SU); make one with `nk -gen user` or nsc",
                    path.display()
                ))
            })?;
        nkeys::KeyPair::from_seed(seed)
            .map_err(|e| invalid(format!("{} holds no valid NKey seed: {e}", path.display())))?;
        Ok(seed.to_owned())
    }

    /// The user JWT and NKey seed of `credentials_file`, checked: both blocks present, the
    /// seed a valid user seed, the JWT three base64url parts whose claims name the seed's
    /// public key (a JWT and a seed from different files are refused here rather than by NATS).
    fn credentials(&self) -> Result<beckon_cluster::NatsAuth, ConfigError> {
        use base64::Engine;

        let path = self
            .credentials_file
            .as_deref()
            .unwrap_or_else(|| Path::new(""));
        let invalid = |reason: String| ConfigError::Invalid {
            key: "cluster.credentials_file",
            reason: format!("{}: {reason}", path.display()),
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot be read: {e}")))?;
        let jwt = creds_block(&text, "NATS USER JWT").ok_or_else(|| {
            invalid("holds no user JWT (between -----BEGIN NATS USER JWT----- and ------END NATS USER JWT------ lines); make the file with `nsc generate creds`".into())
        })?;
        let seed = creds_block(&text, "USER NKEY SEED").ok_or_else(|| {
            invalid("holds no user NKey seed (between -----BEGIN USER NKEY SEED----- and ------END USER NKEY SEED------ lines); make the file with `nsc generate creds`".into())
        })?;
        if !seed.starts_with("SU") {
            return Err(invalid(
                "holds no valid user NKey seed: a user's seed starts with SU".into(),
            ));
        }
        let pair = nkeys::KeyPair::from_seed(&seed)
            .map_err(|e| invalid(format!("holds no valid user NKey seed: {e}")))?;

        let not_a_jwt = |why: &str| {
            invalid(format!(
                "its user JWT is not a JWT (three base64url parts separated by dots): {why}"
            ))
        };
        let parts: Vec<&str> = jwt.split('.').collect();
        let [header, claims, signature] = parts[..] else {
            return Err(not_a_jwt(&format!("{} part(s)", parts.len())));
        };
        let decode = |part: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part.trim_end_matches('='))
        };
        for (name, part) in [("header", header), ("signature", signature)] {
            if part.is_empty() || decode(part).is_err() {
                return Err(not_a_jwt(&format!("its {name} is not base64url")));
            }
        }
        let claims: serde_json::Value = decode(claims)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| not_a_jwt("its claims are not base64url JSON"))?;
        let user = pair.public_key();
        match claims.get("sub").and_then(serde_json::Value::as_str) {
            Some(sub) if sub == user => {}
            sub => {
                return Err(invalid(format!(
                    "its user JWT is for {} but its seed is {user}'s: the two do not belong together",
                    sub.unwrap_or("no subject")
                )));
            }
        }
        Ok(beckon_cluster::NatsAuth::Credentials { jwt, seed })
    }

    /// TLS and credentials towards NATS, checked for contradictions and for clear text off
    /// this machine.
    pub fn security(&self) -> Result<beckon_cluster::NatsSecurity, ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let others = self.nkey_seed_file.is_some()
            || self.token.is_some()
            || self.user.is_some()
            || self.password.is_some();
        let auth = match (&self.user, &self.password, &self.token) {
            _ if self.credentials_file.is_some() && others => {
                return invalid(
                    "cluster.credentials_file",
                    "give one kind of NATS credentials: a credentials file, an NKey, a token, or a user and password"
                        .into(),
                );
            }
            _ if self.credentials_file.is_some() => self.credentials()?,
            (None, None, None) if self.nkey_seed_file.is_some() => {
                beckon_cluster::NatsAuth::NKey(self.nkey_seed()?)
            }
            _ if self.nkey_seed_file.is_some() => {
                return invalid(
                    "cluster.nkey_seed_file",
                    "give one kind of NATS credentials: a credentials file, an NKey, a token, or a user and password"
                        .into(),
                );
            }
            (None, None, None) => beckon_cluster::NatsAuth::None,
            (Some(user), Some(password), None) => beckon_cluster::NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (None, None, Some(token)) => beckon_cluster::NatsAuth::Token(token.clone()),
            (_, _, Some(_)) => {
                return invalid(
                    "cluster.token",
                    "give either a token or a user and password, not both".into(),
                );
            }
            _ => {
                return invalid(
                    "cluster.user",
                    "cluster.user and cluster.password go together".into(),
                );
            }
        };
        let security = beckon_cluster::NatsSecurity {
            ca: self.ca.clone(),
            auth,
        };
        let plain = beckon_cluster::security::plain_remote_servers(&self.nats, &security);
        if !plain.is_empty() && !self.insecure {
            return invalid(
                "cluster.ca",
                format!(
                    "NATS server {plain:?} is not on this machine and TLS is off: wake-ups and credentials would cross the network in clear text. Set cluster.ca to the CA file of the NATS servers' certificates (see docs/cluster.md), or insecure = true to accept clear text"
                ),
            );
        }
        if self.ca.is_none()
            && let Some(tls) = self.nats.iter().find(|u| u.starts_with("tls://"))
        {
            return invalid(
                "cluster.ca",
                format!(
                    "{tls} asks for TLS: set cluster.ca to the CA file of the NATS servers' certificates"
                ),
            );
        }
        Ok(security)
    }
}

/// The lines between `-----BEGIN {label}-----` and `------END {label}------` of a `.creds`
/// file, joined; `None` when the block is missing, unterminated or empty.
fn creds_block(text: &str, label: &str) -> Option<String> {
    let marker = |line: &str, what: &str| {
        line.starts_with("---") && line.trim_matches('-').trim() == format!("{what} {label}")
    };
    let mut lines = text.lines().map(str::trim);
    lines.find(|line| marker(line, "BEGIN"))?;
    let mut content = String::new();
    for line in lines {
        if marker(line, "END") {
            return (!content.is_empty()).then_some(content);
        }
        content.push_str(line);
    }
    None
}

/// The host name's first label, as a node name (`node-1` when there is none).
fn host_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = host
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    if name.is_empty() {
        "node-1".to_owned()
    } else {
        name
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats: Vec::new(),
            node: host_node_name(),
            name: "beckon".to_owned(),
            heartbeat_ms: 1000,
            node_timeout_ms: 5000,
            flush_timeout_ms: 5000,
            ca: None,
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            credentials_file: None,
            insecure: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BrokerConfig;

    /// The NATS security of a valid cluster config with `lines` under `[cluster]`, or the
    /// error of reading it.
    fn security_with(lines: &str) -> Result<beckon_cluster::NatsSecurity, String> {
        let toml = format!("[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\n{lines}");
        let mut c = BrokerConfig::from_toml(&toml).expect("toml");
        c.tenants_dir = Some("tenants".into());
        c.validate().map_err(|e| e.to_string())?;
        c.cluster
            .expect("cluster")
            .security()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_cluster_does_not_reach_nats_off_this_machine_in_clear_text() {
        let with = |toml: &str| {
            let mut c = BrokerConfig::from_toml(toml).expect("toml");
            c.tenants_dir = Some("tenants".into());
            c.validate().map(|()| c).map_err(|e| e.to_string())
        };
        let err = with("[cluster]\nnats = [\"nats://127.0.0.1:4222\", \"nats://10.0.0.5:4222\"]")
            .expect_err("clear text to 10.0.0.5");
        assert!(
            err.contains("cluster.ca") && err.contains("10.0.0.5"),
            "{err}"
        );
        assert!(with("[cluster]\nnats = [\"nats://10.0.0.5:4222\"]\ninsecure = true").is_ok());
        assert!(with("[cluster]\nnats = [\"nats://localhost:4222\"]").is_ok());
        let err = with("[cluster]\nnats = [\"tls://127.0.0.1:4222\"]").expect_err("tls without ca");
        assert!(err.contains("cluster.ca"), "{err}");

        let c = with("[cluster]\nnats = [\"nats://10.0.0.5:4222\"]\nca = \"nats-ca.pem\"\nuser = \"n1\"\npassword = \"pw\"")
            .expect("TLS and a user");
        let security = c.cluster.expect("cluster").security().expect("security");
        assert_eq!(security.ca, Some(PathBuf::from("nats-ca.pem")));
        assert_eq!(
            security.auth,
            beckon_cluster::NatsAuth::UserPassword {
                user: "n1".into(),
                password: "pw".into()
            }
        );
        let err = with("[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\nuser = \"n1\"")
            .expect_err("user without password");
        assert!(err.contains("cluster.user"), "{err}");
        let err = with("[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\nuser = \"n1\"\npassword = \"pw\"\ntoken = \"t\"")
            .expect_err("both");
        assert!(err.contains("cluster.token"), "{err}");
    }

    #[test]
    fn an_nkey_seed_file_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let with = security_with;
        let seed = nkeys::KeyPair::new_user().seed().expect("seed");
        let good = dir.path().join("node.nk");
        std::fs::write(&good, format!("# comment\n{seed}\n")).expect("write");
        let security = with(&format!("nkey_seed_file = {good:?}")).expect("nkey");
        assert_eq!(security.auth, beckon_cluster::NatsAuth::NKey(seed));
        for (name, content, says) in [
            ("missing.nk", None, "cannot read"),
            ("empty.nk", Some("no seed here\n"), "no NKey user seed"),
            ("bad.nk", Some("SUAAAA\n"), "no valid NKey seed"),
        ] {
            let path = dir.path().join(name);
            if let Some(content) = content {
                std::fs::write(&path, content).expect("write");
            }
            let err = with(&format!("nkey_seed_file = {path:?}")).expect_err(name);
            assert!(
                err.contains("cluster.nkey_seed_file") && err.contains(says),
                "{err}"
            );
        }
        let err =
            with(&format!("nkey_seed_file = {good:?}\ntoken = \"t\"")).expect_err("two kinds");
        assert!(err.contains("one kind of NATS credentials"), "{err}");
    }

    #[test]
    fn a_credentials_file_is_read_and_checked() {
        use base64::Engine;

        let dir = tempfile::tempdir().expect("tempdir");
        let with = |path: &Path, more: &str| {
            security_with(&format!("credentials_file = {path:?}\n{more}"))
        };
        // The shape of a user JWT; its signature is NATS' business, not checked here.
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwt_for = |subject: &str| {
            format!(
                "{}.{}.{}",
                b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
                b64(
                    format!(r#"{{"sub":"{subject}","nats":{{"type":"user","version":2}}}}"#)
                        .as_bytes()
                ),
                b64(&[7; 64])
            )
        };
        let creds = |jwt: &str, seed: &str| {
            format!(
                "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below can be used to sign and prove identity.\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            )
        };
        let user = nkeys::KeyPair::new_user();
        let (seed, jwt) = (user.seed().expect("seed"), jwt_for(&user.public_key()));
        let good = dir.path().join("node.creds");
        std::fs::write(&good, creds(&jwt, &seed)).expect("write");
        let security = with(&good, "").expect("credentials");
        assert_eq!(
            security.auth,
            beckon_cluster::NatsAuth::Credentials {
                jwt: jwt.clone(),
                seed: seed.clone()
            }
        );

        let account_seed = nkeys::KeyPair::new_account().seed().expect("seed");
        let stranger = jwt_for(&nkeys::KeyPair::new_user().public_key());
        let head = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
        let only_jwt =
            format!("-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n");
        let only_seed =
            format!("-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n");
        for (name, content, says) in [
            ("missing.creds", None, "cannot be read"),
            ("seed-only.creds", Some(only_seed), "holds no user JWT"),
            ("jwt-only.creds", Some(only_jwt), "holds no user NKey seed"),
            (
                "bad-seed.creds",
                Some(creds(&jwt, "SUAAAA")),
                "no valid user NKey seed",
            ),
            (
                "account-seed.creds",
                Some(creds(&jwt, &account_seed)),
                "no valid user NKey seed: a user's seed starts with SU",
            ),
            (
                "two-parts.creds",
                Some(creds(&format!("{head}.{}", b64(b"{}")), &seed)),
                "not a JWT",
            ),
            (
                "not-base64.creds",
                Some(creds(&format!("{head}.{}.c2!n", b64(b"{}")), &seed)),
                "not a JWT",
            ),
            (
                "not-json.creds",
                Some(creds(&format!("{head}.{}.c2ln", b64(b"not json")), &seed)),
                "its claims are not base64url JSON",
            ),
            (
                "stranger.creds",
                Some(creds(&stranger, &seed)),
                "do not belong together",
            ),
        ] {
            let path = dir.path().join(name);
            if let Some(content) = content {
                std::fs::write(&path, content).expect("write");
            }
            let err = with(&path, "").expect_err(name);
            assert!(
                err.contains("cluster.credentials_file")
                    && err.contains(name)
                    && err.contains(says),
                "{err}"
            );
            assert!(!err.contains(&seed), "the seed stays out of errors: {err}");
        }

        let nk = dir.path().join("node.nk");
        std::fs::write(&nk, format!("{seed}\n")).expect("write");
        for other in [
            format!("nkey_seed_file = {nk:?}"),
            "token = \"t\"".to_owned(),
            "user = \"n1\"\npassword = \"pw\"".to_owned(),
        ] {
            let err = with(&good, &other).expect_err(&other);
            assert!(
                err.contains("cluster.credentials_file")
                    && err.contains("one kind of NATS credentials"),
                "{err}"
            );
        }
    }
}
