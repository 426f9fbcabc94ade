//! The fleet as agents of a tenant (`--tenant-dir`): the bench is tenant `bench`, with a token
//! key of its own. Each agent connects with its identity as client id and a signed token
//! (role agent) as password, the publishers as servers of the same tenant; the broker needs
//! only `tenants_dir` pointing at the folder that holds `bench.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use beckon_identity::{KeyId, Role, SigningKey, TenantId, TokenSigner};
use serde::{Deserialize, Serialize};

use crate::conn::{ClientError, Connector, Target};

/// The tenant the bench's agents belong to.
pub const TENANT: &str = "bench";
/// The id of the bench's token key, in the tenant file and in every token.
pub const KEY_ID: &str = "bench";
/// How long a token lives: a run, its storms and reconnections, well within one day.
pub const TOKEN_LIFETIME_SECS: u32 = 24 * 3600;
/// How long the bench waits for every node to know the tenant (a broker polls its tenant
/// folder every 5 s by default, so a file the bench just wrote takes that long).
const ADMISSION_WAIT: Duration = Duration::from_secs(30);

/// The tenant file the broker reads (`<tenant>.toml`).
pub fn tenant_file(dir: &Path) -> PathBuf {
    dir.join(format!("{TENANT}.toml"))
}

/// The bench's private token key beside it. Not `.toml`: the broker reads only `*.toml` files
/// of its tenant folder.
pub fn key_file(dir: &Path) -> PathBuf {
    dir.join(format!("{TENANT}.key"))
}

/// What a process needs to sign the tenant's tokens: the key file (the worker processes read
/// it themselves, so the key never travels in their configuration).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantAuth {
    /// The PKCS#8 Ed25519 key (absolute path).
    pub key_file: PathBuf,
}

impl TenantAuth {
    /// Reads the key and builds the tenant's token signer.
    pub fn signer(&self) -> anyhow::Result<TokenSigner> {
        let pkcs8 = std::fs::read(&self.key_file).with_context(|| {
            format!("reading the bench's token key {}", self.key_file.display())
        })?;
        let key = SigningKey::from_pkcs8(KeyId::new(KEY_ID)?, &pkcs8).with_context(|| {
            format!(
                "{} is not an Ed25519 key: remove it and {TENANT}.toml beside it to start afresh",
                self.key_file.display()
            )
        })?;
        Ok(TokenSigner::new(TenantId::new(TENANT)?, key))
    }
}

/// A token for `(bench, role, id)`, valid from now for [`TOKEN_LIFETIME_SECS`].
pub fn token(signer: &TokenSigner, role: Role, id: &str) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    signer
        .issue(role, id, now, TOKEN_LIFETIME_SECS)
        .with_context(|| format!("{role} id {id:?} of tenant {TENANT}"))
}

/// The text of the tenant file for `key`.
fn tenant_toml(key: &SigningKey) -> String {
    format!(
        "# Written by `beckon bench fleet --tenant-dir`: the tenant of its simulated agents.\n\
         # The private key is {TENANT}.key beside this file.\n\
         name = \"{TENANT}\"\n\n\
         [[token_key]]\n\
         kid = \"{KEY_ID}\"\n\
         public_key = \"{}\"\n",
        key.public_key().to_base64()
    )
}

/// Makes `dir/bench.toml` and `dir/bench.key`, or reuses them when both exist (so that
/// brokers already started with `tenants_dir = dir` accept the agents). Returns the key's
/// location and whether the tenant file was just written.
pub fn prepare(dir: &Path) -> anyhow::Result<(TenantAuth, bool)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the tenant folder {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("finding the tenant folder {}", dir.display()))?;
    let (toml_path, key_path) = (tenant_file(&dir), key_file(&dir));
    let auth = TenantAuth {
        key_file: key_path.clone(),
    };
    match (toml_path.exists(), key_path.exists()) {
        (true, true) => {
            let key = auth.signer()?;
            let public = key.key().public_key().to_base64();
            let text = std::fs::read_to_string(&toml_path)
                .with_context(|| format!("reading {}", toml_path.display()))?;
            if !text.contains(&public) {
                bail!(
                    "{} does not list the public key of {}: remove both to start afresh",
                    toml_path.display(),
                    key_path.display()
                );
            }
            Ok((auth, false))
        }
        (true, false) => bail!(
            "{} exists but not the bench's key {}: the bench cannot sign tokens for it; remove \
             {} (the bench then writes both) or give another --tenant-dir",
            toml_path.display(),
            key_path.display(),
            toml_path.display()
        ),
        (false, key_exists) => {
            if !key_exists {
                let pkcs8 = SigningKey::generate_pkcs8()?;
                beckon_pki::write_atomic(&key_path, &pkcs8, 0o600)
                    .with_context(|| format!("writing {}", key_path.display()))?;
            }
            let signer = auth.signer()?;
            // Written whole or not at all: brokers may read the folder at any moment.
            beckon_pki::write_atomic(&toml_path, tenant_toml(signer.key()).as_bytes(), 0o644)
                .with_context(|| format!("writing {}", toml_path.display()))?;
            Ok((auth, true))
        }
    }
}

/// Waits until every target admits the server identity `server_id` of the tenant, bounded:
/// a broker that does not know the tenant yet (it reloads its folder every few seconds) is
/// asked again; one that still refuses after the bound is named with the reason.
pub async fn await_admission(
    targets: &[Target],
    signer: &TokenSigner,
    server_id: &str,
) -> anyhow::Result<()> {
    let password = token(signer, Role::Server, server_id)?;
    let deadline = tokio::time::Instant::now() + ADMISSION_WAIT;
    for target in targets {
        let connector = Connector::new(target)
            .await
            .with_context(|| format!("broker {}:{}", target.host, target.port))?;
        loop {
            let error: ClientError =
                match connector.connect_as(None, server_id, Some(&password)).await {
                    Ok(conn) => {
                        conn.close().await;
                        break;
                    }
                    Err(e) => e,
                };
            // Only a refusal may pass: the broker has not loaded the tenant file yet.
            if !matches!(error, ClientError::Refused(_)) || tokio::time::Instant::now() >= deadline
            {
                bail!(
                    "broker {}:{} did not admit a server of the bench's tenant ({error}): is it \
                     started with tenants_dir = the folder of --tenant-dir? (refusals are \
                     retried for {ADMISSION_WAIT:?} while it loads the tenant file)",
                    target.host,
                    target.port
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use beckon_identity::{Authenticator, Credentials, TenantDirectory};

    use super::*;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    /// The folder the bench writes is one the broker's loader accepts, and an agent that
    /// presents its token with its id as client id is authenticated as that agent.
    #[test]
    fn the_tenant_folder_admits_the_bench_s_agents() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (auth, created) = prepare(dir.path()).expect("prepare");
        assert!(created);
        let loaded = TenantDirectory::load(dir.path());
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert!(loaded.directory.get(TENANT).is_some());

        let signer = auth.signer().expect("signer");
        let count = 1000;
        let started = std::time::Instant::now();
        let tokens: Vec<String> = (0..count)
            .map(|i| token(&signer, Role::Agent, &format!("bench-{i:06}")).expect("token"))
            .collect();
        let per_token = started.elapsed() / count;
        eprintln!("signing one token took {per_token:?}");
        let authenticated = Authenticator::default()
            .authenticate(
                &loaded.directory,
                &Credentials {
                    client_certificate: None,
                    password: Some(tokens[42].as_bytes()),
                    client_id: "bench-000042",
                },
                now(),
            )
            .expect("the agent's token is accepted");
        assert_eq!(authenticated.identity.role, Role::Agent);
        assert_eq!(authenticated.client_id, "bench-000042");
        assert!(!authenticated.client_id_assigned);
    }

    /// A second run reuses the key, so brokers that loaded the file go on accepting; a tenant
    /// file without its key, or with another key, is refused with a clear message.
    #[test]
    fn a_second_run_reuses_the_key_and_mismatches_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (first, _) = prepare(dir.path()).expect("first");
        let public = first.signer().expect("signer").key().public_key();
        let (second, created) = prepare(dir.path()).expect("second");
        assert!(!created, "the tenant file is reused");
        assert_eq!(second.signer().expect("signer").key().public_key(), public);

        std::fs::remove_file(key_file(dir.path())).expect("remove key");
        let error = prepare(dir.path()).expect_err("no key").to_string();
        assert!(error.contains("bench.key"), "{error}");

        let other = tempfile::tempdir().expect("temp dir");
        prepare(other.path()).expect("other");
        std::fs::copy(key_file(other.path()), key_file(dir.path())).expect("copy key");
        let error = prepare(dir.path()).expect_err("other key").to_string();
        assert!(error.contains("does not list the public key"), "{error}");
    }

    /// A key without its tenant file (removed by hand) gets the file written again.
    #[test]
    fn a_lone_key_gets_its_tenant_file_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (first, _) = prepare(dir.path()).expect("first");
        std::fs::remove_file(tenant_file(dir.path())).expect("remove toml");
        let (second, created) = prepare(dir.path()).expect("second");
        assert!(created);
        assert_eq!(
            second.signer().expect("signer").key().public_key(),
            first.signer().expect("signer").key().public_key()
        );
        let loaded = TenantDirectory::load(dir.path());
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    }
}
