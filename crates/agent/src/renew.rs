//! Certificate renewal: before its certificate runs out, the agent makes a fresh key pair,
//! sends a certificate signing request to the console
//! (`POST /api/v1/agents/{id}/certificate`, authenticated by its check-in token) and
//! replaces `agent.key` and `agent.pem` (both written completely as `<file>.next` first,
//! then renamed into place; an interruption between the renames is finished at the next
//! start, [`complete_interrupted`]). The connection to the broker picks the new pair up at its next connect.
//!
//! When: once less than a third of the certificate's lifetime (not-before to not-after) is
//! left ([`renewal_due_at`]); a failed attempt is retried after a tenth of the time left
//! (at least 30 s, at most an hour). A console that answers 401 or 404 (the agent was
//! removed) is logged as such: removal is not undone by renewing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use beckon_net::{ClientIdentity, TlsClient, TlsSettings};
use serde::Deserialize;
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::http::{self, Url};

/// Why a renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The agent has no console URL, client certificate or check-in token configured.
    #[error(
        "certificate renewal needs checkin.console_url, broker.client_cert/client_key and a check-in token: {0}"
    )]
    NotConfigured(String),
    /// The current certificate could not be read.
    #[error("cannot read the agent certificate {path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A key pair or request could not be made.
    #[error("making a key pair and certificate request: {0}")]
    Key(String),
    /// The console could not be reached.
    #[error("renewal at {url}: {source}")]
    Unreachable {
        /// The URL.
        url: String,
        /// What failed.
        source: http::HttpError,
    },
    /// The console refused (401: unknown or removed agent, wrong token; 422: bad request).
    #[error("the console refused the renewal (HTTP {status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The console's message.
        message: String,
    },
    /// The answer is not a usable certificate for our new key.
    #[error("the console's renewal answer is not usable: {0}")]
    BadAnswer(String),
    /// The new files could not be written.
    #[error("writing {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Validity of a certificate, unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start.
    pub not_before: i64,
    /// End.
    pub not_after: i64,
}

/// Reads the validity of the first certificate of a PEM file.
pub fn certificate_validity(path: &Path) -> Result<Validity, RenewError> {
    let bad = |reason: String| RenewError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let certs = beckon_pki::load_certificates(path).map_err(|e| bad(e.to_string()))?;
    let first = certs
        .first()
        .ok_or_else(|| bad("no certificate in the file".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref())
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    Ok(Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// When a certificate should be renewed: when a third of its lifetime is left.
pub fn renewal_due_at(v: Validity) -> i64 {
    let lifetime = (v.not_after - v.not_before).max(0);
    v.not_after - lifetime / 3
}

#[derive(Deserialize)]
struct RenewAnswer {
    agent_id: String,
    certificate: String,
}

/// Renews the certificate now: new key pair, CSR, the console signs, files replaced.
/// Returns the new certificate's validity.
pub async fn renew(config: &AgentConfig) -> Result<Validity, RenewError> {
    let (Some(cert_path), Some(key_path)) = (&config.broker.client_cert, &config.broker.client_key)
    else {
        return Err(RenewError::NotConfigured("no client certificate".into()));
    };
    let Some(base) = config.checkin.console_url.as_deref() else {
        return Err(RenewError::NotConfigured("no checkin.console_url".into()));
    };
    let token = config
        .checkin_token()
        .map_err(|e| RenewError::NotConfigured(e.to_string()))?
        .ok_or_else(|| RenewError::NotConfigured("no check-in token".into()))?;
    let base = Url::parse(base.trim_end_matches('/'))
        .map_err(|e| RenewError::NotConfigured(format!("checkin.console_url: {e}")))?;
    let url = base.with_path(&format!(
        "{}/api/v1/agents/{}/certificate",
        base.path.trim_end_matches('/'),
        config.agent_id
    ));
    let client = http::console_client(&url, config.checkin.ca_file.as_deref())
        .map_err(|e| RenewError::NotConfigured(format!("checkin.ca_file: {e}")))?;

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| RenewError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| RenewError::Key(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, config.agent_id.as_str());
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| RenewError::Key(e.to_string()))?;
    let key_pem = key.serialize_pem();
    let body = serde_json::to_vec(&serde_json::json!({ "csr": csr }))
        .map_err(|e| RenewError::Key(e.to_string()))?;
    let response = http::request(
        &client,
        &url,
        "POST",
        &[("Authorization", format!("Bearer {token}"))],
        &body,
        config.checkin.timeout,
    )
    .await
    .map_err(|source| RenewError::Unreachable {
        url: url.to_string(),
        source,
    })?;
    if !(200..300).contains(&response.status) {
        return Err(RenewError::Refused {
            status: response.status,
            message: response.error_message(),
        });
    }
    let answer: RenewAnswer = serde_json::from_slice(&response.body)
        .map_err(|e| RenewError::BadAnswer(format!("not a renewal answer: {e}")))?;
    if answer.agent_id != config.agent_id {
        return Err(RenewError::BadAnswer(format!(
            "it is for agent {:?}, not {:?}",
            answer.agent_id, config.agent_id
        )));
    }
    // rustls checks that the certificate carries our new public key; the broker's CA file
    // must still trust it.
    TlsClient::new(&TlsSettings {
        trust: config.broker.trust_anchors(),
        identity: Some(ClientIdentity::Pem {
            cert: answer.certificate.as_bytes().to_vec(),
            key: key_pem.as_bytes().to_vec(),
        }),
        ..TlsSettings::default()
    })
    .map_err(|e| RenewError::BadAnswer(format!("certificate: {e}")))?;
    let write = |path: &Path, text: &str, mode: u32| {
        beckon_pki::write_atomic(path, text.as_bytes(), mode).map_err(|e| RenewError::Write {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    };
    // Both new files complete beside the old ones first, then the key, then the certificate
    // take their place. A connect between the two renames reads a pair that does not load
    // and keeps the one it has in memory; a crash between them is finished by
    // [`complete_interrupted`] at the next start.
    let (key_next, cert_next) = (next_path(key_path), next_path(cert_path));
    write(&key_next, &key_pem, 0o600)?;
    write(&cert_next, &answer.certificate, 0o644)?;
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|e| RenewError::Write {
            path: to.to_owned(),
            reason: e.to_string(),
        })
    };
    rename(&key_next, key_path)?;
    rename(&cert_next, cert_path)?;
    certificate_validity(cert_path)
}

/// `<file>.next`: where a renewal puts a new file before it replaces `file`.
fn next_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    path.with_file_name(name)
}

/// Finishes or undoes a renewal that was interrupted (the process died between writing the
/// new key and certificate and putting both in place): when `<cert>.next` belongs to the key
/// in place, it takes the certificate's place; leftovers that do not match are removed (the
/// old pair is still whole then, and renewal runs again). Called before the agent loads its
/// certificate.
pub fn complete_interrupted(broker: &crate::config::BrokerConfig) {
    let (Some(cert), Some(key)) = (&broker.client_cert, &broker.client_key) else {
        return;
    };
    let (cert_next, key_next) = (next_path(cert), next_path(key));
    if !cert_next.exists() && !key_next.exists() {
        return;
    }
    let loads = |cert: &Path, key: &Path| {
        TlsClient::new(&TlsSettings {
            identity: Some(ClientIdentity::Files {
                cert: cert.to_owned(),
                key: key.to_owned(),
            }),
            ..TlsSettings::default()
        })
        .is_ok()
    };
    if key_next.exists() && cert_next.exists() {
        // Neither was moved yet: the old pair is whole; start again later.
        let _ = std::fs::remove_file(&key_next);
        let _ = std::fs::remove_file(&cert_next);
        tracing::warn!(certificate = %cert.display(), "an interrupted certificate renewal was dropped; the agent renews again");
    } else if cert_next.exists() && loads(&cert_next, key) {
        match std::fs::rename(&cert_next, cert) {
            Ok(()) => {
                tracing::info!(certificate = %cert.display(), "an interrupted certificate renewal was completed")
            }
            Err(e) => {
                tracing::warn!(certificate = %cert.display(), error = %e, "cannot complete an interrupted certificate renewal")
            }
        }
    } else {
        let _ = std::fs::remove_file(&cert_next);
        let _ = std::fs::remove_file(&key_next);
    }
}

/// Renews the certificate whenever it is due, until shutdown. Failures go to the log and,
/// when `state` is given, to the state folder (`beckon agent status` shows them).
pub async fn renewal_loop(
    config: Arc<AgentConfig>,
    state: Option<Arc<crate::state::StateStore>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(cert_path) = config.broker.client_cert.clone() else {
        return;
    };
    loop {
        let now = crate::timefmt::unix_now();
        let wait = match certificate_validity(&cert_path) {
            Ok(v) if renewal_due_at(v) <= now => match renew(&config).await {
                Ok(new) => {
                    tracing::info!(
                        not_after = %crate::timefmt::format_rfc3339(new.not_after),
                        "agent certificate renewed; the next connection uses it"
                    );
                    // Never renew in a tight loop, even with a strange lifetime.
                    Duration::from_secs(10)
                }
                Err(e) => {
                    let left = u64::try_from(v.not_after - now).unwrap_or(0);
                    let retry = Duration::from_secs((left / 10).clamp(30, 3600));
                    tracing::warn!(error = %e, retry_in = ?retry, "certificate renewal failed");
                    if let Some(state) = &state {
                        state
                            .record_error(format!("certificate renewal: {e}"))
                            .await;
                    }
                    retry
                }
            },
            Ok(v) => {
                // Wake at the due time, and at least every six hours (clock changes).
                let until = u64::try_from(renewal_due_at(v) - now).unwrap_or(0);
                Duration::from_secs(until.clamp(1, 6 * 3600))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the certificate's expiry");
                Duration::from_secs(3600)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(ca: &beckon_pki::CertificateAuthority) -> beckon_pki::IssuedCertificate {
        ca.issue_client(
            "pc-1",
            Some("acme"),
            Some("agent"),
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    #[test]
    fn an_interrupted_renewal_is_completed_or_dropped_never_left_half_done() {
        let ca =
            beckon_pki::CertificateAuthority::generate("t", Duration::from_secs(7200)).unwrap();
        let (old, new) = (pair(&ca), pair(&ca));
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("agent.pem"), dir.path().join("agent.key"));
        let mut broker: crate::config::BrokerConfig =
            toml::from_str("host = \"localhost\"").unwrap();
        broker.client_cert = Some(cert.clone());
        broker.client_key = Some(key.clone());
        let put = |path: &Path, text: &str| std::fs::write(path, text).unwrap();
        let read = |path: &Path| std::fs::read_to_string(path).unwrap();

        // Died after the key's rename: the certificate follows.
        put(&cert, &old.cert_pem);
        put(&key, &new.key_pem);
        put(&next_path(&cert), &new.cert_pem);
        complete_interrupted(&broker);
        assert_eq!(read(&cert), new.cert_pem);
        assert!(!next_path(&cert).exists());

        // Died before any rename: the old pair stays, the leftovers go.
        put(&cert, &old.cert_pem);
        put(&key, &old.key_pem);
        put(&next_path(&cert), &new.cert_pem);
        put(&next_path(&key), &new.key_pem);
        complete_interrupted(&broker);
        assert_eq!(
            (read(&cert), read(&key)),
            (old.cert_pem.clone(), old.key_pem.clone())
        );
        assert!(!next_path(&cert).exists() && !next_path(&key).exists());

        // A stray certificate that is not the key's: removed, the pair untouched.
        put(&next_path(&cert), &new.cert_pem);
        complete_interrupted(&broker);
        assert_eq!(read(&cert), old.cert_pem);
        assert!(!next_path(&cert).exists());
    }

    #[test]
    fn renewal_is_due_with_a_third_of_the_lifetime_left() {
        let v = Validity {
            not_before: 1000,
            not_after: 4000,
        };
        assert_eq!(renewal_due_at(v), 3000);
        let odd = Validity {
            not_before: 10,
            not_after: 5,
        };
        assert_eq!(
            renewal_due_at(odd),
            5,
            "a reversed validity is due at its end"
        );
    }
}
