//! The broker's tenant file for this console's tenant (`tenants/<tenant>.toml`, format in
//! `docs/tenants.md`): the tenant CA, the wake-up key as token key, and the `[[revoked]]`
//! credentials of removed agents. With `--broker-tenant-file` the console writes it
//! atomically (temporary file, then rename) at start and whenever an agent is removed; the
//! broker's folder polling picks the change up, refuses the revoked credentials and closes
//! their connections. Brokers that follow the revocation feed (`GET /api/v1/revocations`,
//! no size limit) need the file without revocations: `--tenant-file-without-revocations`,
//! `GET /api/v1/tenant-file?revoked=false`.

use std::fmt::Write as _;
use std::path::Path;

use crate::AppState;
use crate::store::{RevokedAgent, StoreError};

/// The file's text for `revoked` (see [`current`] for the one in force).
pub fn render(state: &AppState, revoked: &[RevokedAgent]) -> String {
    let key = state.signer.key();
    let mut text = format!(
        "# Written by the Beckon console for tenant {tenant}.\n[[ca]]\npem = \"\"\"\n{ca}\"\"\"\n\n[[token_key]]\nkid = \"{kid}\"\npublic_key = \"{pk}\"\n",
        tenant = state.tenant,
        ca = state.ca.cert_pem(),
        kid = key.kid(),
        pk = key.public_key().to_base64(),
    );
    if !revoked.is_empty() {
        text.push_str("\n# Removed agents: their certificates (by serial) and tokens issued until their removal.\n");
    }
    for r in revoked {
        // Agent ids have no control characters: quotes and backslashes are all TOML needs
        // escaped.
        let id = r.id.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = write!(text, "[[revoked]]\nid = \"{id}\"\n");
        if let Some(serials) = &r.serials {
            let list: Vec<String> = serials.iter().map(|s| format!("\"{s}\"")).collect();
            let _ = writeln!(text, "serials = [{}]", list.join(", "));
        }
        if let Some(at) = r.revoked_at {
            let _ = writeln!(text, "tokens_issued_until = {}", at.div_euclid(1000));
        }
        text.push('\n');
    }
    text
}

/// The tenant file without revocations, for brokers that follow the revocation feed.
pub fn without_revocations(state: &AppState) -> String {
    render(state, &[])
}

/// The tenant file as it should be now, with the revocations from the store.
pub async fn current(state: &AppState) -> Result<String, StoreError> {
    let now = crate::model::now_ms();
    let revoked = state.store.run(move |s| s.revocations(now)).await?;
    Ok(render(state, &revoked))
}

/// Why the tenant file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TenantFileWriteError {
    /// The revocations could not be read.
    #[error("reading the revocations: {0}")]
    Store(#[from] StoreError),
    /// The file could not be written.
    #[error("writing the broker's tenant file {path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Writes the tenant file to `--broker-tenant-file` (when set) if its content changed;
/// returns whether it was written.
pub async fn publish(state: &AppState) -> Result<bool, TenantFileWriteError> {
    let Some(path) = state.config.broker_tenant_file.clone() else {
        return Ok(false);
    };
    // One writer at a time: two removals at once must not interleave their files.
    static WRITING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _writing = WRITING.lock().await;
    let text = if state.config.tenant_file_revocations {
        current(state).await?
    } else {
        without_revocations(state)
    };
    tokio::task::spawn_blocking(move || write_if_changed(&path, &text))
        .await
        .map_err(|e| TenantFileWriteError::Write {
            path: String::new(),
            reason: e.to_string(),
        })?
}

fn write_if_changed(path: &Path, text: &str) -> Result<bool, TenantFileWriteError> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    let err = |reason: String| TenantFileWriteError::Write {
        path: path.display().to_string(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    // write_atomic: a temporary file beside it, then rename, so that the broker never
    // reads half a file.
    beckon_pki::write_atomic(path, text.as_bytes(), 0o644).map_err(|e| err(e.to_string()))?;
    Ok(true)
}
