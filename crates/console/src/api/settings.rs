//! Settings, the audit log and the console's status.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::*;
use crate::AppState;
use crate::model::*;

// --- Settings, audit, status ---

pub(super) async fn get_settings(
    State(st): State<AppState>,
    _a: Admin,
) -> ApiResult<Json<crate::settings::Settings>> {
    Ok(Json(st.store.run(|s| s.settings()).await?))
}

pub(super) async fn put_settings(
    State(st): State<AppState>,
    Admin(who): Admin,
    Body(new): Body<crate::settings::Settings>,
) -> ApiResult<Json<crate::settings::Settings>> {
    new.validate()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let who = who.name;
    Ok(Json(
        st.store
            .run(move |s| s.put_settings(&new, &who, now_ms()))
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    limit: Option<u32>,
}

pub(super) async fn audit_log(
    State(st): State<AppState>,
    _a: Admin,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(st.store.run(move |s| s.audit_log(limit)).await?))
}

pub(super) async fn status(State(st): State<AppState>, _a: Admin) -> Json<serde_json::Value> {
    let push = st.push.lock().map(|p| p.clone()).ok();
    let online = st
        .store
        .run(|s| s.count_agents(Presence::Online))
        .await
        .unwrap_or(0);
    let states: BTreeSet<&str> = CallState::ALL.iter().map(|s| s.as_str()).collect();
    Json(json!({
        "push_service": push,
        "agents_online": online,
        "tenant": st.tenant.as_str(),
        "call_states": states,
        "certificate_warnings": crate::tls::certificate_warnings(&st.config),
    }))
}
