//! Users and roles: who may do what. Admins create users with a role and change roles;
//! every caller can read its own role (the web console hides what the role cannot use).

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::{check_password, hash};
use super::*;
use crate::model::*;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewUserRequest {
    name: String,
    password: String,
    /// Absent: viewer, the least role.
    #[serde(default = "least_role")]
    role: Role,
}

fn least_role() -> Role {
    Role::Viewer
}

pub(super) async fn create_user(
    a: Admin,
    Body(req): Body<NewUserRequest>,
) -> ApiResult<(StatusCode, Json<User>)> {
    check_group_name(&req.name).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "user name must be 1 to 64 ASCII letters, digits, '-', '_' or '.'",
        )
    })?;
    check_password(&req.password)?;
    let hashed = hash(req.password).await?;
    let user = User {
        name: req.name,
        role: req.role,
        created_at: now_ms(),
        sso: false,
    };
    let u = user.clone();
    let detail = json!({"name": user.name, "role": user.role});
    a.audited("user.create", detail, move |s| {
        s.create_user(&u.name, &hashed, u.role, u.created_at)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

pub(super) async fn list_users(a: Viewer) -> ApiResult<Json<Vec<User>>> {
    Ok(Json(a.run(|s| s.list_users()).await?))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UserUpdate {
    role: Role,
}

/// A user's role after a change.
#[derive(Serialize, JsonSchema)]
pub(super) struct UserRole {
    name: String,
    role: Role,
}

pub(super) async fn update_user(
    a: Admin,
    Path(name): Path<String>,
    Body(req): Body<UserUpdate>,
) -> ApiResult<Json<UserRole>> {
    let n = name.clone();
    let before = a.run(move |s| s.set_user_role(&n, req.role)).await?;
    if before != req.role {
        let detail = json!({"name": name, "old": before, "new": req.role});
        a.audit("user.role", detail).await;
    }
    Ok(Json(UserRole {
        name,
        role: req.role,
    }))
}

/// Who the caller is and what it may do.
pub(super) async fn account(a: Viewer) -> Json<Principal> {
    Json(a.who.clone())
}
