//! Beckon's own broker for a test (feature `broker`): bound on loopback ports in a folder of
//! its own and shut down on request, and tenants made in its tenants folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use beckon_broker::{Bound, BrokerConfig, Server, ServerHandle};
use beckon_identity::{KeyId, Role, SigningKey, TenantId, TokenSigner};
use beckon_pki::{CertificateAuthority, IssuedCertificate};

use crate::WAIT;

/// A Beckon broker running for a test, with the folder its data lives in.
pub struct RunningBroker {
    /// What it listens on.
    pub bound: Bound,
    handle: Option<ServerHandle>,
    dir: tempfile::TempDir,
}

impl RunningBroker {
    /// Binds `config` (whose folders lie inside `dir`, which lives as long as the broker);
    /// fails the test unless the broker is up within [`WAIT`].
    pub async fn start(config: BrokerConfig, dir: tempfile::TempDir) -> Self {
        let (bound, handle) = tokio::time::timeout(WAIT, Server::bind(config))
            .await
            .expect("broker starts in time")
            .expect("broker starts");
        Self {
            bound,
            handle: Some(handle),
            dir,
        }
    }

    /// The MQTT-over-TLS listener's address.
    pub fn mqtts(&self) -> SocketAddr {
        self.bound.mqtts.expect("the broker's TLS listener")
    }

    /// The plain MQTT listener's address.
    pub fn plain(&self) -> SocketAddr {
        self.bound.mqtt.expect("the broker's plain listener")
    }

    /// The shared (fallback) port's address.
    pub fn fallback(&self) -> SocketAddr {
        self.bound.fallback.expect("the broker's shared port")
    }

    /// The CA certificate file of the broker's generated server certificate.
    pub fn generated_ca(&self) -> PathBuf {
        self.bound
            .generated_ca
            .clone()
            .expect("the broker's generated CA")
    }

    /// The broker's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Controls the running broker.
    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("the broker is running")
    }

    /// Shuts the broker down (a second call does nothing); fails the test unless it stops
    /// cleanly within [`WAIT`].
    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(WAIT, h.shutdown())
                .await
                .expect("shutdown in time")
                .expect("clean shutdown");
        }
    }
}

/// A tenant made for a test in a broker's tenants folder: `{id}.toml` with its CA (for
/// client certificates, `{id}-ca.pem`) and its token key `k1`.
pub struct TestTenant {
    /// The tenant id.
    pub id: String,
    /// Issues the tenant's client certificates.
    pub ca: CertificateAuthority,
    /// Issues the tenant's tokens.
    pub signer: TokenSigner,
}

impl TestTenant {
    /// Writes tenant `id` into `folder`.
    pub fn create(folder: &Path, id: &str) -> Self {
        let ca =
            CertificateAuthority::generate(&format!("{id} agents CA"), Duration::from_secs(86_400))
                .expect("tenant CA");
        std::fs::write(folder.join(format!("{id}-ca.pem")), ca.cert_pem()).expect("write CA");
        let key = SigningKey::generate(KeyId::new("k1").expect("kid")).expect("key");
        let toml = format!(
            "name = \"{id}\"\n[[ca]]\nfile = \"{id}-ca.pem\"\n[[token_key]]\nkid = \"k1\"\npublic_key = \"{}\"\n",
            key.public_key().to_base64()
        );
        std::fs::write(folder.join(format!("{id}.toml")), toml).expect("write tenant");
        Self {
            id: id.to_owned(),
            ca,
            signer: TokenSigner::new(TenantId::new(id).expect("tenant id"), key),
        }
    }

    /// A token for identity `id` in `role`, valid for an hour from now.
    pub fn token(&self, role: Role, id: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let now = i64::try_from(now).expect("a plausible clock");
        self.signer.issue(role, id, now, 3600).expect("token")
    }

    /// A client certificate (O=tenant, OU=`role`, CN=`id`), valid for an hour.
    pub fn certificate(&self, role: &str, id: &str) -> IssuedCertificate {
        self.ca
            .issue_client(id, Some(&self.id), Some(role), Duration::from_secs(3600))
            .expect("client certificate")
    }
}
