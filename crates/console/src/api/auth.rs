//! Users and sessions: the first user, login, logout, password changes.

use axum::Json;
use axum::extract::State;
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;
use crate::metrics::Outcome;
use crate::model::*;
use crate::secrets::{PasswordCheck, hash_password, new_token, token_hash, verify_password};
use crate::store::{FailureKind, NewSession, StoreError, StoreHandle};
use crate::{AppState, ConsoleError, guard};

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

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginRequest {
    user: String,
    password: String,
}

pub(super) async fn login(
    State(st): State<AppState>,
    source: Source,
    body: Body<LoginRequest>,
) -> ApiResult<Response> {
    let metrics = st.metrics.clone();
    let answer = check_login(st, source, body).await;
    metrics.login(Outcome::of_status(match &answer {
        Ok(r) => r.status(),
        Err(e) => e.status,
    }));
    answer
}

/// Who logged in (the session is in the cookie).
#[derive(Serialize, JsonSchema)]
pub(super) struct LoggedIn {
    user: String,
}

/// A login, answered with a session cookie.
async fn check_login(
    st: AppState,
    Source(from): Source,
    Body(req): Body<LoginRequest>,
) -> ApiResult<Response> {
    // The failures of every console on the database count (crate::guard).
    let (user, address) = (req.user.clone(), from.to_string());
    let throttled = {
        let (user, address) = (user.clone(), address.clone());
        let now = now_ms();
        st.store
            .run(move |s| {
                Ok([
                    guard::check(s, FailureKind::LoginUser, &user, now)?,
                    guard::check(s, FailureKind::LoginAddress, &address, now)?,
                ])
            })
            .await?
    };
    if let Some(wait) = throttled.into_iter().filter_map(Result::err).max() {
        // No password work while throttled.
        return Err(ApiError::too_many(
            format!(
                "too many failed logins for this user or from this address: try again in {} s",
                wait.as_secs().max(1)
            ),
            wait,
        ));
    }
    if !password_is_right(&st, &req).await? {
        let (user_limited, address_limited) = st
            .store
            .run(move |s| {
                let now = now_ms();
                Ok((
                    guard::fail(s, FailureKind::LoginUser, &user, now)?,
                    guard::fail(s, FailureKind::LoginAddress, &address, now)?,
                ))
            })
            .await?;
        if user_limited || address_limited {
            tracing::warn!(user = %req.user, address = %from, "failed logins throttled");
            write_audit(
                &st,
                format!("address:{from}"),
                "login.throttled",
                json!({
                    "user": req.user,
                    "address": from.to_string(),
                    "by_user": user_limited,
                    "by_address": address_limited,
                    "failures": guard::FAILURES,
                    "window_secs": guard::WINDOW.as_secs(),
                }),
            )
            .await;
        }
        return Err(ApiError::unauthorized("wrong user name or password"));
    }
    st.store
        .run(move |s| s.clear_auth_failures(FailureKind::LoginUser, &user))
        .await?;
    let cookie = start_session(&st, &req.user).await?;
    write_audit(
        &st,
        format!("user:{}", req.user),
        "login",
        json!({"via": "password", "address": from.to_string()}),
    )
    .await;
    Ok(([(SET_COOKIE, cookie)], Json(LoggedIn { user: req.user })).into_response())
}

/// Records a new session of `user`; returns the `Set-Cookie` value that hands it to the
/// browser.
pub(super) async fn start_session(st: &AppState, user: &str) -> ApiResult<String> {
    let token = new_token("bks_");
    let now = now_ms();
    let lifetime = st.config.session_lifetime;
    let session = NewSession {
        hash: token_hash(&token),
        user: user.to_owned(),
        created_at: now,
        expires_at: now.saturating_add(i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX)),
    };
    st.store.run(move |s| s.create_session(session)).await?;
    Ok(format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        lifetime.as_secs(),
        if st.config.plain_http { "" } else { "; Secure" }
    ))
}

/// Whether `req` names a user and that user's password (rewriting a hash of the first
/// format). An unknown user costs the same work as a known one, so that timing does not
/// tell which names exist.
async fn password_is_right(st: &AppState, req: &LoginRequest) -> ApiResult<bool> {
    let user = req.user.clone();
    let stored = st.store.run(move |s| s.password_hash(&user)).await;
    let password = req.password.clone();
    let hash = match stored {
        Ok(hash) => hash,
        Err(StoreError::NotFound { .. }) => {
            let _ =
                tokio::task::spawn_blocking(move || verify_password(&password, &UNKNOWN_USER_HASH))
                    .await;
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    let (check, stored, password) =
        tokio::task::spawn_blocking(move || (verify_password(&password, &hash), hash, password))
            .await
            .map_err(|e| ApiError::internal(format!("checking the password stopped: {e}")))?;
    match check {
        PasswordCheck::Wrong => return Ok(false),
        PasswordCheck::RightOutdated => upgrade_hash(st, &req.user, stored, password).await,
        PasswordCheck::Right => {}
    }
    Ok(true)
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
        st.sessions.end(&hash);
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

#[derive(Deserialize, JsonSchema)]
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
    if stored == crate::oidc::SSO_PASSWORD_HASH {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "you sign in through single sign-on and have no password here: change it at the provider",
        ));
    }
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
