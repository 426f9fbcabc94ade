//! Agents and groups: the registry, its filters, editing and revoking agents.

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::*;
use crate::model::*;
use crate::store::AgentFilter;

// --- Agents and groups ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentQuery {
    search: Option<String>,
    group: Option<String>,
    presence: Option<Presence>,
    #[serde(default)]
    include_revoked: bool,
    limit: Option<u32>,
    #[serde(default)]
    offset: u32,
}

pub(super) async fn list_agents(
    a: Admin,
    Query(q): Query<AgentQuery>,
) -> ApiResult<Json<Vec<Agent>>> {
    let limit = check_limit(q.limit, 100)?;
    let filter = AgentFilter {
        search: q.search.filter(|s| !s.is_empty()),
        group: q.group,
        presence: q.presence,
        include_revoked: q.include_revoked,
        limit,
        offset: q.offset,
    };
    Ok(Json(a.run(move |s| s.list_agents(&filter)).await?))
}

pub(super) async fn get_agent(a: Admin, Path(id): Path<String>) -> ApiResult<Json<Agent>> {
    Ok(Json(a.run(move |s| s.agent(&id)).await?))
}

#[derive(Deserialize)]
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

pub(super) async fn revoke_agent(a: Admin, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let i = id.clone();
    a.audited("agent.revoke", json!({"id": id}), move |s| {
        s.revoke_agent(&i, now_ms())
    })
    .await?;
    // The broker learns it from its tenant file; the console restarts rewrite it too.
    match crate::tenant_file::publish(&a.st).await {
        Ok(written) => {
            tracing::info!(agent = %id, tenant_file_written = written, "agent removed: revoked");
        }
        Err(e) => {
            tracing::error!(agent = %id, error = %e, "agent revoked in the console, but the broker does not know yet: fix the tenant file path; it is written again at the next removal or start");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
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

pub(super) async fn list_groups(a: Admin) -> ApiResult<Json<Vec<Group>>> {
    Ok(Json(a.run(|s| s.list_groups()).await?))
}

pub(super) async fn delete_group(a: Admin, Path(name): Path<String>) -> ApiResult<StatusCode> {
    let detail = json!({"name": name});
    a.audited("group.delete", detail, move |s| s.delete_group(&name))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
