//! API tokens: created (the secret shown once), listed, revoked.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::*;
use crate::AppState;
use crate::model::*;
use crate::secrets::{new_id, new_token, token_hash};
use crate::store::{StoreError, StoreHandle};

/// Creates an API token and returns its secret.
pub(crate) async fn create_api_token(
    store: &StoreHandle,
    name: &str,
) -> Result<String, StoreError> {
    let token = new_token("bkt_");
    let hash = token_hash(&token);
    let name = name.to_owned();
    store
        .run(move |s| s.create_api_token(&new_id(), &hash, &name, now_ms()))
        .await?;
    Ok(token)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewApiTokenRequest {
    name: String,
}

pub(super) async fn create_api_token_route(
    State(st): State<AppState>,
    Admin(who): Admin,
    Body(req): Body<NewApiTokenRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    check_text("name", &req.name, 1, 100)?;
    let token = create_api_token(&st.store, &req.name).await?;
    audit(&st, &who, "api_token.create", json!({"name": req.name})).await;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": req.name, "token": token, "note": "shown once: store it now"})),
    ))
}

pub(super) async fn list_api_tokens(
    State(st): State<AppState>,
    _a: Admin,
) -> ApiResult<Json<Vec<ApiToken>>> {
    Ok(Json(st.store.run(|s| s.list_api_tokens()).await?))
}

pub(super) async fn revoke_api_token(
    State(st): State<AppState>,
    Admin(who): Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let i = id.clone();
    st.store.run(move |s| s.revoke_api_token(&i)).await?;
    audit(&st, &who, "api_token.revoke", json!({"id": id})).await;
    Ok(StatusCode::NO_CONTENT)
}
