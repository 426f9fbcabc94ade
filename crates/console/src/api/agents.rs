//! Agents and groups: the registry, its filters, editing and revoking agents.

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;
use crate::model::*;
use crate::store::{AgentFilter, StoreError};

// --- Agents and groups ---

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentQuery {
    /// Text in the id, name, host name, an address or a MAC address.
    search: Option<String>,
    /// Only members of this group.
    group: Option<String>,
    /// Only agents with this presence.
    presence: Option<Presence>,
    /// Only agents not seen for the setting `agents.stale_after_days`.
    #[serde(default)]
    stale: bool,
    /// Only agents whose identity is in use on two machines.
    #[serde(default)]
    cloned: bool,
    /// Also revoked (removed) agents.
    #[serde(default)]
    include_revoked: bool,
    /// How many to list: 1 to 1000, default 100.
    limit: Option<u32>,
    /// How many to skip first.
    #[serde(default)]
    offset: u32,
}

pub(super) async fn list_agents(
    a: Viewer,
    Query(q): Query<AgentQuery>,
) -> ApiResult<Json<Vec<Agent>>> {
    let limit = check_limit(q.limit, 100)?;
    let stale_before = if q.stale {
        Some(stale_before(&a).await?)
    } else {
        None
    };
    let filter = AgentFilter {
        search: q.search.filter(|s| !s.is_empty()),
        group: q.group,
        presence: q.presence,
        stale_before,
        cloned: q.cloned,
        include_revoked: q.include_revoked,
        limit,
        offset: q.offset,
    };
    Ok(Json(a.run(move |s| s.list_agents(&filter)).await?))
}

pub(super) async fn get_agent(a: Viewer, Path(id): Path<String>) -> ApiResult<Json<Agent>> {
    Ok(Json(a.run(move |s| s.agent(&id)).await?))
}

/// Clears the cloned flag (after one of the machines enrolled again); if both machines still
/// use the identity, their next takeovers flag it again.
pub(super) async fn clear_clone_flag(a: Admin, Path(id): Path<String>) -> ApiResult<Json<Agent>> {
    let detail = json!({"id": id});
    let agent = a
        .audited("agent.clone_cleared", detail, move |s| {
            s.clear_clone_flag(&id)
        })
        .await?;
    Ok(Json(agent))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentUpdate {
    name: Option<String>,
    groups: Option<Vec<String>>,
}

pub(super) async fn update_agent(
    a: Admin,
    Path(id): Path<String>,
    Body(req): Body<AgentUpdate>,
) -> ApiResult<Json<Agent>> {
    if let Some(n) = &req.name {
        check_text("name", n, 1, 200)?;
    }
    if let Some(gs) = &req.groups {
        for g in gs {
            check_group_name(g)?;
        }
    }
    let detail = json!({"id": id, "name": req.name, "groups": req.groups});
    let agent = a
        .audited("agent.update", detail, move |s| {
            s.update_agent(&id, req.name, req.groups)
        })
        .await?;
    Ok(Json(agent))
}

/// Agents last seen before this time are stale now (the setting `agents.stale_after_days`).
pub(super) async fn stale_before(a: &Caller) -> ApiResult<Millis> {
    let settings = a.run(|s| s.settings()).await?;
    Ok(settings.agents.stale_before(now_ms()))
}

pub(super) async fn revoke_agent(a: Admin, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let i = id.clone();
    a.audited("agent.revoke", json!({"id": id}), move |s| {
        s.revoke_agent(&i, now_ms())
    })
    .await?;
    publish_revocations(&a, &[id]).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Tells the broker about removed agents through its tenant file (console restarts rewrite
/// it too), and drops the relays read before their removal.
async fn publish_revocations(a: &Caller, ids: &[String]) {
    a.st.relays.forget().await;
    match crate::tenant_file::publish(&a.st).await {
        Ok(written) => {
            tracing::info!(agents = ?ids, tenant_file_written = written, "agents removed: revoked");
        }
        Err(e) => {
            tracing::error!(agents = ?ids, error = %e, "agents revoked in the console, but the broker does not know yet: fix the tenant file path; it is written again at the next removal or start");
        }
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RemoveAgents {
    /// 1 to 1000 agent ids.
    ids: Vec<String>,
}

/// What a removal of many agents did.
#[derive(Serialize, JsonSchema)]
pub(super) struct RemovedAgents {
    /// The agents removed now.
    removed: Vec<String>,
    /// The ids unknown or already removed.
    not_found: Vec<String>,
}

/// Removes (revokes) many agents in one step, e.g. the stale ones: each as `DELETE
/// /agents/{id}` does, with one tenant file update. Ids unknown or already removed are
/// listed as `not_found`; the others are removed.
pub(super) async fn remove_agents(
    a: Admin,
    Body(req): Body<RemoveAgents>,
) -> ApiResult<Json<RemovedAgents>> {
    if req.ids.is_empty() || req.ids.len() > 1000 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ids: give 1 to 1000 agent ids",
        ));
    }
    // A failure stops the removal; those removed before it are still audited and published.
    let (removed, not_found, failed) = a
        .run(move |s| {
            let (mut removed, mut not_found) = (Vec::new(), Vec::new());
            for id in req.ids {
                match s.revoke_agent(&id, now_ms()) {
                    Ok(()) => removed.push(id),
                    Err(StoreError::NotFound { .. }) => not_found.push(id),
                    Err(e) => return Ok((removed, not_found, Some(e))),
                }
            }
            Ok((removed, not_found, None))
        })
        .await?;
    for id in &removed {
        a.audit("agent.revoke", json!({"id": id})).await;
    }
    if !removed.is_empty() {
        publish_revocations(&a, &removed).await;
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(Json(RemovedAgents { removed, not_found }))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewGroup {
    name: String,
    #[serde(default)]
    description: String,
}

pub(super) async fn create_group(
    a: Admin,
    Body(req): Body<NewGroup>,
) -> ApiResult<(StatusCode, Json<Group>)> {
    check_group_name(&req.name)?;
    check_text("description", &req.description, 0, 500)?;
    let detail = json!({"name": req.name});
    let g = a
        .audited("group.create", detail, move |s| {
            s.create_group(&req.name, &req.description, now_ms())
        })
        .await?;
    Ok((StatusCode::CREATED, Json(g)))
}

pub(super) async fn list_groups(a: Viewer) -> ApiResult<Json<Vec<Group>>> {
    Ok(Json(a.run(|s| s.list_groups()).await?))
}

pub(super) async fn delete_group(a: Admin, Path(name): Path<String>) -> ApiResult<StatusCode> {
    let detail = json!({"name": name});
    a.audited("group.delete", detail, move |s| s.delete_group(&name))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
