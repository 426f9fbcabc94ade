//! API tokens: created (the secret shown once), listed, revoked.

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;
use crate::model::*;
use crate::secrets::{new_id, new_token, token_hash};
use crate::store::{NewApiToken, StoreError, StoreHandle};

/// Creates an API token with `role`, made by `created_by` (a principal's name; `None`: the
/// console itself), and returns its secret.
pub(crate) async fn create_api_token(
    store: &StoreHandle,
    name: &str,
    role: Role,
    created_by: Option<String>,
) -> Result<String, StoreError> {
    let token = new_token("bkt_");
    let new = NewApiToken {
        id: new_id(),
        hash: token_hash(&token),
        name: name.to_owned(),
        created_at: now_ms(),
        role,
        created_by,
    };
    store.run(move |s| s.create_api_token(new)).await?;
    Ok(token)
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewApiTokenRequest {
    name: String,
    /// Absent: the creator's own role.
    role: Option<Role>,
}

/// An API token just made, with its secret (shown this once).
#[derive(Serialize, JsonSchema)]
pub(super) struct CreatedApiToken {
    name: String,
    role: Role,
    /// The secret to send as `Authorization: Bearer <token>`.
    token: String,
    note: &'static str,
}

pub(super) async fn create_api_token_route(
    a: Admin,
    Body(req): Body<NewApiTokenRequest>,
) -> ApiResult<(StatusCode, Json<CreatedApiToken>)> {
    check_text("name", &req.name, 1, 100)?;
    let role = req.role.unwrap_or(a.who.role);
    if role > a.who.role {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "a token's role is at most its creator's: {} has the {} role, not {}",
                a.who.name,
                a.who.role.as_str(),
                role.as_str()
            ),
        ));
    }
    let by = Some(a.who.name.clone());
    let token = create_api_token(&a.st.store, &req.name, role, by).await?;
    let detail = json!({"name": req.name, "role": role});
    a.audit("api_token.create", detail).await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiToken {
            name: req.name,
            role,
            token,
            note: "shown once: store it now",
        }),
    ))
}

pub(super) async fn list_api_tokens(a: Viewer) -> ApiResult<Json<Vec<ApiToken>>> {
    Ok(Json(a.run(|s| s.list_api_tokens()).await?))
}

pub(super) async fn revoke_api_token(a: Admin, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let detail = json!({"id": id});
    a.audited("api_token.revoke", detail, move |s| s.revoke_api_token(&id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
