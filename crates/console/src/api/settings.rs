//! Settings, the audit log and the console's status.

use std::collections::BTreeSet;

use axum::Json;
use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::Serialize;

use super::*;
use crate::model::*;

// --- Settings, audit, status ---

pub(super) async fn get_settings(a: Viewer) -> ApiResult<Json<crate::settings::Settings>> {
    Ok(Json(a.run(|s| s.settings()).await?))
}

pub(super) async fn put_settings(
    a: Admin,
    Body(new): Body<crate::settings::Settings>,
) -> ApiResult<Json<crate::settings::Settings>> {
    new.validate()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let who = a.who.name.clone();
    Ok(Json(
        a.run(move |s| s.put_settings(&new, &who, now_ms())).await?,
    ))
}

pub(super) async fn audit_log(
    a: Viewer,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(a.run(move |s| s.audit_log(limit)).await?))
}

/// The console's status, for the dashboard.
#[derive(Serialize, JsonSchema)]
pub(super) struct Status {
    /// The push-service connection; `null` if it cannot be read.
    push_service: Option<crate::PushStatus>,
    agents_online: u64,
    /// Agents not seen for `stale_after_days`; `null` if the database could not say.
    agents_stale: Option<u64>,
    /// The setting `agents.stale_after_days`.
    stale_after_days: Option<u32>,
    tenant: String,
    /// Every state a call's delivery can be in.
    call_states: BTreeSet<&'static str>,
    /// Certificates that expire soon, in words.
    certificate_warnings: Vec<String>,
    enrollment: EnrollmentHints,
    database: Database,
}

pub(super) async fn status(a: Viewer) -> Json<Status> {
    let push = a.st.push.lock().map(|p| p.clone()).ok();
    let online = a
        .run(|s| s.count_agents(Presence::Online))
        .await
        .unwrap_or(0);
    let states: BTreeSet<&str> = CallState::ALL.iter().map(|s| s.as_str()).collect();
    // Agents not seen for the setting agents.stale_after_days, for the dashboard.
    let stale_after = a.run(|s| s.settings()).await.ok().map(|s| s.agents);
    let stale = match &stale_after {
        Some(agents) => {
            let before = agents.stale_before(now_ms());
            a.run(move |s| s.count_stale_agents(before)).await.ok()
        }
        None => None,
    };
    Json(Status {
        push_service: push,
        agents_online: online,
        agents_stale: stale,
        stale_after_days: stale_after.map(|s| s.stale_after_days),
        tenant: a.st.tenant.as_str().to_owned(),
        call_states: states,
        certificate_warnings: crate::tls::certificate_warnings(&a.st.config),
        enrollment: enrollment_hints(&a.st),
        database: database(&a.st),
    })
}

/// Which store the console uses, for the dashboard (the URL without its password). When it
/// cannot be reached, every API call (this one included) answers 503 saying so.
#[derive(Serialize, JsonSchema)]
pub(super) struct Database {
    /// `sqlite` or `postgresql`.
    kind: &'static str,
    url: String,
}

fn database(st: &AppState) -> Database {
    let url = st.config.database();
    let kind = match &url {
        crate::store::DatabaseUrl::Sqlite(_) => "sqlite",
        crate::store::DatabaseUrl::Postgres(_) => "postgresql",
    };
    Database {
        kind,
        url: url.to_string(),
    }
}

/// What the Enrollment page needs for a working `beckon agent enroll` command: the
/// `--public-url` (`null`: the page uses its own address), and the CA that signed the
/// console's HTTPS certificate when the console generated it (agents pass it with `--ca`;
/// `null` for plain HTTP or a `--tls-cert` from a CA the system trusts).
#[derive(Serialize, JsonSchema)]
pub(super) struct EnrollmentHints {
    console_url: Option<String>,
    console_ca: Option<String>,
}

fn enrollment_hints(st: &AppState) -> EnrollmentHints {
    let own_ca = !st.config.plain_http && st.config.tls_files.is_none();
    EnrollmentHints {
        console_url: st.config.public_url.clone(),
        console_ca: own_ca.then(|| st.ca.cert_pem().to_owned()),
    }
}
