//! Users and sessions: the first user, login, logout, password changes.

use axum::Json;
use axum::extract::State;
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::*;
use crate::model::*;
use crate::secrets::{PasswordCheck, hash_password, new_token, token_hash, verify_password};
use crate::store::{NewSession, StoreError, StoreHandle};
use crate::{AppState, ConsoleError};

// --- Users and sessions ---

/// Creates the first user with a random password when there is no user; returns the
/// password to print once.
pub(crate) async fn ensure_first_user(
    store: &StoreHandle,
    name: &str,
) -> Result<Option<String>, ConsoleError> {
    if store.run(|s| s.user_count()).await? > 0 {
        return Ok(None);
    }
    let password = new_token("")[..20].to_owned();
    let hash = {
        let p = password.clone();
        tokio::task::spawn_blocking(move || hash_password(&p))
            .await
            .map_err(|e| {
                ConsoleError::Config(format!("hashing the first user's password stopped: {e}"))
            })?
            .map_err(|e| ConsoleError::Config(e.to_string()))?
    };
    let name = name.to_owned();
    store
        .run(move |s| s.create_user(&name, &hash, Role::Admin, now_ms()))
        .await?;
    Ok(Some(password))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginRequest {
    user: String,
    password: String,
}

pub(super) async fn login(
    State(st): State<AppState>,
    Body(req): Body<LoginRequest>,
) -> ApiResult<Response> {
    let user = req.user.clone();
    let stored = st.store.run(move |s| s.password_hash(&user)).await;
    let password = req.password;
    let (check, stored, password) = match stored {
        Ok(hash) => {
            tokio::task::spawn_blocking(move || (verify_password(&password, &hash), hash, password))
                .await
                .map_err(|e| ApiError::internal(format!("checking the password stopped: {e}")))?
        }
        Err(StoreError::NotFound { .. }) => {
            // Same work as for a known user, so that timing does not tell which names exist.
            let _ =
                tokio::task::spawn_blocking(move || verify_password(&password, &UNKNOWN_USER_HASH))
                    .await;
            return Err(ApiError::unauthorized("wrong user name or password"));
        }
        Err(e) => return Err(e.into()),
    };
    match check {
        PasswordCheck::Wrong => {
            return Err(ApiError::unauthorized("wrong user name or password"));
        }
        PasswordCheck::RightOutdated => upgrade_hash(&st, &req.user, stored, password).await,
        PasswordCheck::Right => {}
    }
    let token = new_token("bks_");
    let now = now_ms();
    let session = NewSession {
        hash: token_hash(&token),
        user: req.user.clone(),
        created_at: now,
        expires_at: now + SESSION_TTL_MS,
    };
    st.store.run(move |s| s.create_session(session)).await?;
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        if st.config.plain_http { "" } else { "; Secure" }
    );
    Ok(([(SET_COOKIE, cookie)], Json(json!({ "user": req.user }))).into_response())
}

/// A hash no password matches, checked for unknown user names (so that they take as long
/// as known ones).
static UNKNOWN_USER_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    hash_password(&new_token("")).unwrap_or_else(|_| {
        "$argon2id$v=19$m=19456,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            .to_owned()
    })
});

/// Replaces a hash of the console's first format by a PHC string, after a login proved the
/// password. A failure is logged: the old hash still works, and the next login tries again.
async fn upgrade_hash(st: &AppState, user: &str, stored: String, password: String) {
    let upgraded = match hash(password).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(%user, error = ?e, "could not rehash a password in the PHC format");
            return;
        }
    };
    let name = user.to_owned();
    match st
        .store
        .run(move |s| s.upgrade_password_hash(&name, &stored, &upgraded))
        .await
    {
        Ok(_) => tracing::info!(%user, "password hash rewritten in the PHC string format"),
        Err(e) => tracing::warn!(%user, error = %e, "could not store the rehashed password"),
    }
}

pub(super) async fn logout(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(c) = session_cookie(&headers) {
        let hash = token_hash(&c);
        st.store.run(move |s| s.delete_session(&hash)).await?;
    }
    let cookie = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    Ok(([(SET_COOKIE, cookie)], StatusCode::NO_CONTENT).into_response())
}

/// Shortest password accepted.
pub(super) const MIN_PASSWORD_CHARS: usize = 10;

pub(super) fn check_password(password: &str) -> ApiResult<()> {
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > 1024 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the password must be {MIN_PASSWORD_CHARS} to 1024 characters long"),
        ));
    }
    Ok(())
}

pub(super) async fn hash(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::internal(format!("hashing the password stopped: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PasswordChange {
    current: String,
    new: String,
}

pub(super) async fn change_password(
    a: Viewer,
    Body(req): Body<PasswordChange>,
) -> ApiResult<StatusCode> {
    let Some(user) = a.who.name.strip_prefix("user:").map(str::to_owned) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "API tokens have no password: log in as the user to change it",
        ));
    };
    let u = user.clone();
    let stored = a.run(move |s| s.password_hash(&u)).await?;
    let current = req.current;
    let ok = tokio::task::spawn_blocking(move || verify_password(&current, &stored).is_right())
        .await
        .map_err(|e| ApiError::internal(format!("checking the password stopped: {e}")))?;
    if !ok {
        return Err(ApiError::unauthorized("the current password is wrong"));
    }
    check_password(&req.new)?;
    let hashed = hash(req.new).await?;
    a.audited("user.password", json!({"name": user}), move |s| {
        s.set_password(&user, &hashed)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
