//! The HTTP API, `/api/v1`: JSON in and out, errors as `{"error": "..."}` with a 4xx status
//! that says whose fault it is. Routes are listed once in [`routes`]; the OpenAPI document
//! (`/api/v1/openapi.json`) is checked against that list by the tests.

use std::collections::BTreeSet;
use std::convert::Infallible;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::header::{AUTHORIZATION, COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::model::*;
use crate::secrets::{hash_password, new_id, new_token, token_hash, verify_password};
use crate::store::{
    AgentFilter, CertificateRecord, NewAgent, NewCall, NewEnrollmentToken, Principal, StoreError,
    StoreHandle,
};
use crate::{AppState, ConsoleError, dispatch};

/// Session lifetime: 12 hours.
const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// Name of the session cookie.
const SESSION_COOKIE: &str = "beckon_session";

/// An API error: a status and a message a person can act on.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            StoreError::Refused(_) => StatusCode::UNAUTHORIZED,
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => {
                tracing::error!(error = %e, "store failure");
                return Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the console could not read or write its database; see the console's log",
                );
            }
        };
        Self::new(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose rejections (malformed JSON, wrong fields, too large, wrong content
/// type) come back as JSON errors.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let message = match &r {
        JsonRejection::MissingJsonContentType(_) => {
            "send the body as JSON with the header Content-Type: application/json".to_owned()
        }
        JsonRejection::JsonSyntaxError(e) => {
            format!("the body is not valid JSON: {}", e.body_text())
        }
        JsonRejection::JsonDataError(e) => {
            format!("the JSON does not fit this request: {}", e.body_text())
        }
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
            "the body is too large for the console's request limit".to_owned()
        }
        other => other.body_text(),
    };
    ApiError::new(status, message)
}

/// Query parameters whose rejections come back as JSON errors.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::bad_request(format!("the query string is not valid: {}", e.body_text()))
            })
    }
}

/// An authenticated administrator (API token or session cookie).
pub struct Admin(pub Principal);

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(COOKIE).iter().find_map(|v| {
        v.to_str().ok()?.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == SESSION_COOKIE).then(|| v.to_owned())
        })
    })
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        if let Some(token) = bearer(&parts.headers) {
            if !token.starts_with("bkt_") {
                return Err(ApiError::unauthorized(
                    "this bearer token is not an API token (they start with bkt_): create one under API tokens",
                ));
            }
            let hash = token_hash(token);
            let p = state.store.run(move |s| s.api_token(&hash)).await?;
            return Ok(Admin(p));
        }
        if let Some(cookie) = session_cookie(&parts.headers) {
            let hash = token_hash(&cookie);
            let p = state.store.run(move |s| s.session(&hash, now_ms())).await?;
            return Ok(Admin(p));
        }
        Err(ApiError::unauthorized(
            "authentication required: send Authorization: Bearer <API token>, or log in (POST /api/v1/login)",
        ))
    }
}

/// Every route: path, methods, handler. The router and the OpenAPI test both read it.
pub fn routes() -> Vec<(
    &'static str,
    &'static [&'static str],
    MethodRouter<AppState>,
)> {
    vec![
        ("/api/v1/openapi.json", &["get"], get(openapi)),
        ("/api/v1/login", &["post"], post(login)),
        ("/api/v1/logout", &["post"], post(logout)),
        ("/api/v1/users", &["post"], post(create_user)),
        ("/api/v1/account/password", &["post"], post(change_password)),
        ("/api/v1/enroll", &["post"], post(enroll)),
        ("/api/v1/agents/{id}/checkin", &["post"], post(checkin)),
        (
            "/api/v1/agents/{id}/certificate",
            &["post"],
            post(renew_certificate),
        ),
        ("/api/v1/tenant-file", &["get"], get(get_tenant_file)),
        (
            "/api/v1/enrollment-tokens",
            &["get", "post"],
            get(list_enrollment_tokens).post(create_enrollment_token),
        ),
        (
            "/api/v1/enrollment-tokens/{id}",
            &["delete"],
            delete(revoke_enrollment_token),
        ),
        ("/api/v1/agents", &["get"], get(list_agents)),
        (
            "/api/v1/agents/{id}",
            &["get", "patch", "delete"],
            get(get_agent).patch(update_agent).delete(revoke_agent),
        ),
        (
            "/api/v1/agents/{id}/wol",
            &["get", "post"],
            get(wol_history).post(wol_now),
        ),
        (
            "/api/v1/groups",
            &["get", "post"],
            get(list_groups).post(create_group),
        ),
        ("/api/v1/groups/{name}", &["delete"], delete(delete_group)),
        (
            "/api/v1/calls",
            &["get", "post"],
            get(list_calls).post(create_call),
        ),
        ("/api/v1/calls/{id}", &["get"], get(get_call)),
        ("/api/v1/calls/{id}/events", &["get"], get(call_events)),
        ("/api/v1/events", &["get"], get(all_events)),
        (
            "/api/v1/settings",
            &["get", "put"],
            get(get_settings).put(put_settings),
        ),
        ("/api/v1/audit", &["get"], get(audit_log)),
        ("/api/v1/status", &["get"], get(status)),
        (
            "/api/v1/api-tokens",
            &["get", "post"],
            get(list_api_tokens).post(create_api_token_route),
        ),
        (
            "/api/v1/api-tokens/{id}",
            &["delete"],
            delete(revoke_api_token),
        ),
    ]
}

/// The API router with its body limit and JSON fallbacks.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let mut r = Router::new();
    for (path, _, handler) in routes() {
        r = r.route(path, handler);
    }
    r.fallback(|| async {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no such API route: see /api/v1/openapi.json for the routes",
        )
    })
    .method_not_allowed_fallback(|| async {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "this route does not take that HTTP method: see /api/v1/openapi.json",
        )
    })
    .layer(DefaultBodyLimit::max(limit))
    .with_state(state)
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

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
            .map_err(|e| ConsoleError::Config(e.to_string()))?
            .map_err(ConsoleError::Config)?
    };
    let name = name.to_owned();
    store
        .run(move |s| s.create_user(&name, &hash, now_ms()))
        .await?;
    Ok(Some(password))
}

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
struct LoginRequest {
    user: String,
    password: String,
}

async fn login(State(st): State<AppState>, Body(req): Body<LoginRequest>) -> ApiResult<Response> {
    let user = req.user.clone();
    let stored = st.store.run(move |s| s.password_hash(&user)).await;
    let password = req.password;
    let ok = match stored {
        Ok(hash) => tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false),
        Err(StoreError::NotFound { .. }) => {
            // Same work as for a known user, so that timing does not tell which names exist.
            let _ = tokio::task::spawn_blocking(move || {
                verify_password(
                    &password,
                    "argon2id$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                )
            })
            .await;
            false
        }
        Err(e) => return Err(e.into()),
    };
    if !ok {
        return Err(ApiError::unauthorized("wrong user name or password"));
    }
    let token = new_token("bks_");
    let hash = token_hash(&token);
    let user = req.user.clone();
    let now = now_ms();
    st.store
        .run(move |s| s.create_session(&hash, &user, now, now + SESSION_TTL_MS))
        .await?;
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        if st.config.plain_http { "" } else { "; Secure" }
    );
    Ok(([(SET_COOKIE, cookie)], Json(json!({ "user": req.user }))).into_response())
}

async fn logout(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(c) = session_cookie(&headers) {
        let hash = token_hash(&c);
        st.store.run(move |s| s.delete_session(&hash)).await?;
    }
    let cookie = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    Ok(([(SET_COOKIE, cookie)], StatusCode::NO_CONTENT).into_response())
}

/// Shortest password accepted.
const MIN_PASSWORD_CHARS: usize = 10;

fn check_password(password: &str) -> ApiResult<()> {
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > 1024 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the password must be {MIN_PASSWORD_CHARS} to 1024 characters long"),
        ));
    }
    Ok(())
}

async fn hash(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUserRequest {
    name: String,
    password: String,
}

async fn create_user(
    State(st): State<AppState>,
    Admin(who): Admin,
    Body(req): Body<NewUserRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    check_group_name(&req.name).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "user name must be 1 to 64 ASCII letters, digits, '-', '_' or '.'",
        )
    })?;
    check_password(&req.password)?;
    let hashed = hash(req.password).await?;
    let name = req.name.clone();
    st.store
        .run(move |s| s.create_user(&name, &hashed, now_ms()))
        .await?;
    audit(&st, &who, "user.create", json!({"name": req.name})).await;
    Ok((StatusCode::CREATED, Json(json!({"name": req.name}))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    current: String,
    new: String,
}

async fn change_password(
    State(st): State<AppState>,
    Admin(who): Admin,
    Body(req): Body<PasswordChange>,
) -> ApiResult<StatusCode> {
    let Some(user) = who.name.strip_prefix("user:").map(str::to_owned) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "API tokens have no password: log in as the user to change it",
        ));
    };
    let u = user.clone();
    let stored = st.store.run(move |s| s.password_hash(&u)).await?;
    let current = req.current;
    let ok = tokio::task::spawn_blocking(move || verify_password(&current, &stored))
        .await
        .unwrap_or(false);
    if !ok {
        return Err(ApiError::unauthorized("the current password is wrong"));
    }
    check_password(&req.new)?;
    let hashed = hash(req.new).await?;
    let u = user.clone();
    st.store.run(move |s| s.set_password(&u, &hashed)).await?;
    audit(&st, &who, "user.password", json!({"name": user})).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewApiTokenRequest {
    name: String,
}

async fn create_api_token_route(
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

async fn list_api_tokens(State(st): State<AppState>, _a: Admin) -> ApiResult<Json<Vec<ApiToken>>> {
    Ok(Json(st.store.run(|s| s.list_api_tokens()).await?))
}

async fn revoke_api_token(
    State(st): State<AppState>,
    Admin(who): Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let i = id.clone();
    st.store.run(move |s| s.revoke_api_token(&i)).await?;
    audit(&st, &who, "api_token.revoke", json!({"id": id})).await;
    Ok(StatusCode::NO_CONTENT)
}

async fn audit(st: &AppState, who: &Principal, what: &'static str, detail: serde_json::Value) {
    let who = who.name.clone();
    if let Err(e) = st
        .store
        .run(move |s| s.audit(&who, what, detail, now_ms()))
        .await
    {
        tracing::warn!(error = %e, what, "could not write the audit log");
    }
}

fn check_text(field: &str, value: &str, min: usize, max: usize) -> ApiResult<()> {
    let len = value.chars().count();
    if len < min || len > max || value.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{field} must be {min} to {max} characters without control characters"),
        ));
    }
    Ok(())
}

fn check_group_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "group name {name:?} is not valid: use 1 to 64 ASCII letters, digits, '-', '_' or '.'"
            ),
        ));
    }
    Ok(())
}

// --- Enrollment ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEnrollmentTokenRequest {
    #[serde(default)]
    label: String,
    /// Lifetime in seconds; absent: never expires.
    expires_in_secs: Option<u64>,
    /// Use limit; absent: one-time (1). 0 means unlimited.
    max_uses: Option<u32>,
    #[serde(default)]
    groups: Vec<String>,
}

async fn create_enrollment_token(
    State(st): State<AppState>,
    Admin(who): Admin,
    Body(req): Body<NewEnrollmentTokenRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    check_text("label", &req.label, 0, 200)?;
    for g in &req.groups {
        check_group_name(g)?;
    }
    let now = now_ms();
    let expires_at = match req.expires_in_secs {
        None => None,
        Some(0) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "expires_in_secs must be at least 1 (omit it for a token that does not expire)",
            ));
        }
        Some(s) if s > 10 * 365 * 24 * 3600 => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "expires_in_secs must be at most ten years",
            ));
        }
        Some(s) => Some(now + s as i64 * 1000),
    };
    let max_uses = match req.max_uses {
        None => Some(1),
        Some(0) => None,
        Some(n) => Some(n),
    };
    let secret = new_token("bke_");
    let new = NewEnrollmentToken {
        id: new_id(),
        hash: token_hash(&secret),
        label: req.label,
        created_by: who.name.clone(),
        expires_at,
        max_uses,
        groups: req.groups,
    };
    let token = st
        .store
        .run(move |s| s.create_enrollment_token(new))
        .await?;
    audit(
        &st,
        &who,
        "enrollment_token.create",
        json!({"id": token.id}),
    )
    .await;
    let mut body = serde_json::to_value(&token).unwrap_or_default();
    body["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(body)))
}

async fn list_enrollment_tokens(
    State(st): State<AppState>,
    _a: Admin,
) -> ApiResult<Json<Vec<EnrollmentToken>>> {
    Ok(Json(st.store.run(|s| s.list_enrollment_tokens()).await?))
}

async fn revoke_enrollment_token(
    State(st): State<AppState>,
    Admin(who): Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let i = id.clone();
    st.store.run(move |s| s.revoke_enrollment_token(&i)).await?;
    audit(&st, &who, "enrollment_token.revoke", json!({"id": id})).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    token: String,
    /// The id the agent asks for; absent: the console makes one.
    agent_id: Option<String>,
    /// A PEM certificate signing request for the agent's own key pair.
    csr: String,
    name: Option<String>,
    #[serde(default)]
    inventory: Inventory,
}

fn check_inventory(inv: &Inventory) -> ApiResult<()> {
    check_text("inventory.hostname", &inv.hostname, 0, 253)?;
    check_text("inventory.os", &inv.os, 0, 200)?;
    if inv.addresses.len() > 64 || inv.macs.len() > 32 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "inventory: at most 64 addresses and 32 MAC addresses",
        ));
    }
    for a in &inv.addresses {
        let max = if a.address.is_ipv4() { 32 } else { 128 };
        if a.prefix_len > max {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "inventory.addresses: prefix length {} is too long for {}",
                    a.prefix_len, a.address
                ),
            ));
        }
    }
    for m in &inv.macs {
        m.parse::<crate::wol::MacAddress>().map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("inventory.macs: {e}"),
            )
        })?;
    }
    Ok(())
}

/// What an agent gets back from enrollment.
#[derive(Serialize)]
struct EnrollResponse {
    agent_id: String,
    tenant: String,
    certificate: String,
    ca: String,
    broker_endpoints: Vec<String>,
    proxy: crate::settings::ProxySettings,
    wakeup_key: serde_json::Value,
    checkin_token: String,
    checkin_url: String,
}

async fn enroll(
    State(st): State<AppState>,
    headers: HeaderMap,
    Body(req): Body<EnrollRequest>,
) -> ApiResult<(StatusCode, Json<EnrollResponse>)> {
    if !req.token.starts_with("bke_") {
        return Err(ApiError::unauthorized(
            "the enrollment token is not valid (they start with bke_): ask an administrator for one",
        ));
    }
    let agent_id = match req.agent_id {
        Some(id) => {
            beckon_identity::validate_id(&id).map_err(|e| {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("agent_id: {e}"))
            })?;
            id
        }
        None => uuid::Uuid::now_v7().hyphenated().to_string(),
    };
    check_inventory(&req.inventory)?;
    let name = req
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| {
            if req.inventory.hostname.is_empty() {
                agent_id.clone()
            } else {
                req.inventory.hostname.clone()
            }
        });
    check_text("name", &name, 1, 200)?;
    // Sign first: a bad CSR must not use up the token.
    let (certificate, record) = sign_agent_csr(&st, &req.csr, &agent_id)?;
    let checkin_token = new_token("bka_");
    let new = NewAgent {
        id: agent_id.clone(),
        name,
        inventory: req.inventory,
        secret_hash: token_hash(&checkin_token),
        certificate: Some(record),
    };
    let token_h = token_hash(&req.token);
    let agent = st
        .store
        .run(move |s| s.enroll_agent(&token_h, new, now_ms()))
        .await?;
    let settings = st.store.run(|s| s.settings()).await?;
    let broker_endpoints = if settings.broker.endpoints.is_empty() {
        st.config.default_broker_endpoints.clone()
    } else {
        settings.broker.endpoints.clone()
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = if st.config.plain_http {
        "http"
    } else {
        "https"
    };
    tracing::info!(agent = %agent.id, "agent enrolled");
    Ok((
        StatusCode::CREATED,
        Json(EnrollResponse {
            agent_id: agent.id,
            tenant: st.tenant.to_string(),
            certificate: certificate.cert_pem,
            ca: st.ca.cert_pem().to_owned(),
            broker_endpoints,
            proxy: settings.proxy,
            wakeup_key: json!({
                "kid": st.signer.key().kid().as_str(),
                "public_key": st.signer.key().public_key().to_base64(),
            }),
            checkin_token,
            checkin_url: format!("{scheme}://{host}"),
        }),
    ))
}

/// The agent certificate for `csr` (a PEM signing request, checked for size and form first)
/// issued by the tenant CA to `agent_id`, and its serial and validity to record.
fn sign_agent_csr(
    st: &AppState,
    csr: &str,
    agent_id: &str,
) -> ApiResult<(beckon_pki::IssuedCertificate, CertificateRecord)> {
    if csr.len() > 16 * 1024 || !csr.contains("CERTIFICATE REQUEST") {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "csr must be a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)",
        ));
    }
    let certificate = st
        .ca
        .issue_client_for_csr(
            csr,
            agent_id,
            Some(st.tenant.as_str()),
            Some("agent"),
            st.config.agent_certificate_validity,
        )
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("csr could not be signed: {e}"),
            )
        })?;
    let record = certificate_record(&certificate)?;
    Ok((certificate, record))
}

/// Serial and validity of a certificate the console just issued.
fn certificate_record(issued: &beckon_pki::IssuedCertificate) -> ApiResult<CertificateRecord> {
    let internal = |what: &str| {
        tracing::error!(what, "a certificate the console issued cannot be read back");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the console could not read the certificate it issued; see the console's log",
        )
    };
    let der = issued.cert_der().map_err(|_| internal("pem"))?;
    let serial = beckon_identity::certificate_serial(&der).ok_or_else(|| internal("serial"))?;
    let not_after = beckon_pki::not_after(&der)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .ok_or_else(|| internal("not_after"))?;
    Ok(CertificateRecord {
        serial,
        issued_at: now_ms(),
        not_after,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewRequest {
    /// A PEM certificate signing request for a fresh key pair.
    csr: String,
}

/// A renewed agent certificate.
#[derive(Serialize)]
struct RenewResponse {
    agent_id: String,
    certificate: String,
    ca: String,
    /// End of the new certificate's validity, unix ms.
    not_after: Millis,
}

/// Renews an agent's certificate: authenticated by its check-in token, refused for revoked
/// and unknown agents; the new certificate is recorded (so that removing the agent revokes
/// it too). The old one stays valid until it expires.
async fn renew_certificate(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(req): Body<RenewRequest>,
) -> ApiResult<Json<RenewResponse>> {
    let Some(token) = bearer(&headers) else {
        return Err(ApiError::unauthorized(
            "certificate renewal needs Authorization: Bearer <the checkin_token from enrollment>",
        ));
    };
    let hash = token_hash(token);
    let i = id.clone();
    st.store.run(move |s| s.agent_by_secret(&i, &hash)).await?;
    let (certificate, record) = sign_agent_csr(&st, &req.csr, &id)?;
    let not_after = record.not_after;
    let i = id.clone();
    st.store
        .run(move |s| s.record_certificate(&i, &record))
        .await?;
    tracing::info!(agent = %id, "agent certificate renewed");
    Ok(Json(RenewResponse {
        agent_id: id,
        certificate: certificate.cert_pem,
        ca: st.ca.cert_pem().to_owned(),
        not_after,
    }))
}

/// The broker's tenant file for this tenant, with the revocations in force (TOML).
async fn get_tenant_file(State(st): State<AppState>, _a: Admin) -> ApiResult<Response> {
    let text = crate::tenant_file::current(&st).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/toml; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The check-in body: the agent runtime's fields, plus an optional fresh inventory.
#[derive(Deserialize)]
struct CheckinRequest {
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    wakeup_id: Option<String>,
    #[serde(default)]
    inventory: Option<Inventory>,
}

async fn checkin(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(req): Body<CheckinRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    let Some(token) = bearer(&headers) else {
        return Err(ApiError::unauthorized(
            "check-in needs Authorization: Bearer <the checkin_token from enrollment>",
        ));
    };
    if req.agent_id.as_deref().is_some_and(|a| a != id) {
        return Err(ApiError::bad_request(
            "agent_id in the body differs from the one in the URL",
        ));
    }
    if let Some(inv) = &req.inventory {
        check_inventory(inv)?;
    }
    let hash = token_hash(token);
    let i = id.clone();
    st.store.run(move |s| s.agent_by_secret(&i, &hash)).await?;
    let inv = req.inventory;
    let agent = st
        .store
        .run(move |s| s.record_checkin(&id, inv, now_ms()))
        .await?;
    Ok(Json(json!({
        "agent_id": agent.id,
        "last_checkin": agent.last_checkin,
        "wakeup_id": req.wakeup_id,
    })))
}

// --- Agents and groups ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentQuery {
    search: Option<String>,
    group: Option<String>,
    presence: Option<Presence>,
    #[serde(default)]
    include_revoked: bool,
    limit: Option<u32>,
    #[serde(default)]
    offset: u32,
}

async fn list_agents(
    State(st): State<AppState>,
    _a: Admin,
    Query(q): Query<AgentQuery>,
) -> ApiResult<Json<Vec<Agent>>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    let filter = AgentFilter {
        search: q.search.filter(|s| !s.is_empty()),
        group: q.group,
        presence: q.presence,
        include_revoked: q.include_revoked,
        limit,
        offset: q.offset,
    };
    Ok(Json(st.store.run(move |s| s.list_agents(&filter)).await?))
}

async fn get_agent(
    State(st): State<AppState>,
    _a: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Agent>> {
    Ok(Json(st.store.run(move |s| s.agent(&id)).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentUpdate {
    name: Option<String>,
    groups: Option<Vec<String>>,
}

async fn update_agent(
    State(st): State<AppState>,
    Admin(who): Admin,
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
    let agent = st
        .store
        .run(move |s| s.update_agent(&id, req.name, req.groups))
        .await?;
    audit(&st, &who, "agent.update", detail).await;
    Ok(Json(agent))
}

async fn revoke_agent(
    State(st): State<AppState>,
    Admin(who): Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let i = id.clone();
    st.store.run(move |s| s.revoke_agent(&i, now_ms())).await?;
    audit(&st, &who, "agent.revoke", json!({"id": id})).await;
    // The broker learns it from its tenant file; the console restarts rewrite it too.
    match crate::tenant_file::publish(&st).await {
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
struct NewGroup {
    name: String,
    #[serde(default)]
    description: String,
}

async fn create_group(
    State(st): State<AppState>,
    Admin(who): Admin,
    Body(req): Body<NewGroup>,
) -> ApiResult<(StatusCode, Json<Group>)> {
    check_group_name(&req.name)?;
    check_text("description", &req.description, 0, 500)?;
    let name = req.name.clone();
    let g = st
        .store
        .run(move |s| s.create_group(&req.name, &req.description, now_ms()))
        .await?;
    audit(&st, &who, "group.create", json!({"name": name})).await;
    Ok((StatusCode::CREATED, Json(g)))
}

async fn list_groups(State(st): State<AppState>, _a: Admin) -> ApiResult<Json<Vec<Group>>> {
    Ok(Json(st.store.run(|s| s.list_groups()).await?))
}

async fn delete_group(
    State(st): State<AppState>,
    Admin(who): Admin,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let n = name.clone();
    st.store.run(move |s| s.delete_group(&n)).await?;
    audit(&st, &who, "group.delete", json!({"name": name})).await;
    Ok(StatusCode::NO_CONTENT)
}

// --- Wake-on-LAN ---

async fn wol_now(
    State(st): State<AppState>,
    Admin(who): Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<WolSend>>> {
    let agent = st.store.run(move |s| s.agent(&id)).await?;
    if agent.revoked {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("agent {:?} was revoked", agent.id),
        ));
    }
    let sends = dispatch::wake_on_lan(&st, &agent, None).await?;
    if sends.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "agent {:?} has no MAC address or no destination: it reports MACs at check-in; add Wake-on-LAN addresses in the settings",
                agent.id
            ),
        ));
    }
    audit(&st, &who, "agent.wol", json!({"id": agent.id})).await;
    Ok(Json(sends))
}

async fn wol_history(
    State(st): State<AppState>,
    _a: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<WolSend>>> {
    let i = id.clone();
    st.store.run(move |s| s.agent(&i)).await?;
    Ok(Json(st.store.run(move |s| s.wol_sends(&id, 100)).await?))
}

// --- Wake-up calls ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCallRequest {
    target: CallTarget,
    #[serde(default)]
    reason: String,
    action: Option<String>,
    expires_in_secs: Option<u32>,
    spread_secs: Option<u32>,
    /// Also send Wake-on-LAN to the addressed agents that are not online.
    #[serde(default)]
    wake_on_lan: bool,
}

async fn create_call(
    State(st): State<AppState>,
    Admin(who): Admin,
    Body(req): Body<NewCallRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    check_text(
        "reason",
        &req.reason,
        0,
        beckon_identity::wakeup::MAX_TEXT_LEN,
    )?;
    if let Some(a) = &req.action {
        check_text("action", a, 1, beckon_identity::wakeup::MAX_TEXT_LEN)?;
    }
    match &req.target {
        CallTarget::Agents(ids) if ids.is_empty() => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "target.agents is empty: name at least one agent id",
            ));
        }
        CallTarget::Agents(ids) if ids.len() > 100_000 => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "target.agents: at most 100000 ids; use a group or all",
            ));
        }
        CallTarget::Group(g) => check_group_name(g)?,
        _ => {}
    }
    let settings = st.store.run(|s| s.settings()).await?;
    let expiry = req
        .expires_in_secs
        .unwrap_or(settings.wakeup.default_expiry_secs);
    if !(10..=crate::settings::MAX_EXPIRY_SECS).contains(&expiry) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "expires_in_secs must be 10 to {}",
                crate::settings::MAX_EXPIRY_SECS
            ),
        ));
    }
    if req
        .spread_secs
        .is_some_and(|s| s > beckon_identity::wakeup::MAX_SPREAD_SECS)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "spread_secs must be at most 86400",
        ));
    }
    let now = now_ms();
    let call = NewCall {
        id: uuid::Uuid::now_v7().hyphenated().to_string(),
        created_by: who.name.clone(),
        reason: req.reason,
        action: req.action,
        target: req.target,
        expires_at: now + i64::from(expiry) * 1000,
        spread: req.spread_secs,
        default_spread: (
            settings.wakeup.spread_from_agents,
            settings.wakeup.spread_secs,
        ),
    };
    let (call, deliveries) = st
        .store
        .run(move |s| {
            let mut next_id = move || {
                beckon_identity::wakeup::new_wakeup_id(now_ms())
                    .unwrap_or_else(|_| uuid::Uuid::now_v7().hyphenated().to_string())
            };
            s.create_call(call, now, &mut next_id)
        })
        .await?;
    audit(
        &st,
        &who,
        "call.create",
        json!({"id": call.id, "target": call.target}),
    )
    .await;
    let _ = st
        .dispatch
        .send(dispatch::Command::Publish(call.clone(), deliveries.clone()));
    if req.wake_on_lan {
        let st2 = st.clone();
        let call_id = call.id.clone();
        let ids: Vec<String> = deliveries.iter().map(|d| d.agent_id.clone()).collect();
        tokio::spawn(async move {
            for id in ids {
                let Ok(agent) = st2.store.run(move |s| s.agent(&id)).await else {
                    continue;
                };
                if agent.presence != Presence::Online {
                    let _ = dispatch::wake_on_lan(&st2, &agent, Some(call_id.clone())).await;
                }
            }
        });
    }
    let mut body = serde_json::to_value(&call).unwrap_or_default();
    body["agents"] = json!(deliveries.len());
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallsQuery {
    limit: Option<u32>,
}

async fn list_calls(
    State(st): State<AppState>,
    _a: Admin,
    Query(q): Query<CallsQuery>,
) -> ApiResult<Json<Vec<WakeCall>>> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    Ok(Json(st.store.run(move |s| s.list_calls(limit)).await?))
}

async fn get_call(
    State(st): State<AppState>,
    _a: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let (call, deliveries) = st.store.run(move |s| s.call(&id)).await?;
    let mut body = serde_json::to_value(&call).unwrap_or_default();
    body["deliveries"] = serde_json::to_value(&deliveries).unwrap_or_default();
    Ok(Json(body))
}

fn event_stream(
    st: &AppState,
    call_id: Option<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let rx = st.events.subscribe();
    let stop = st.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (rx, call_id, stop),
        |(mut rx, call_id, mut stop)| async move {
            loop {
                // The stream ends when the console stops, so that shutdown does not wait for
                // browsers to go away.
                let received = tokio::select! {
                    r = rx.recv() => r,
                    _ = dispatch::stopped(&mut stop) => return None,
                };
                match received {
                    Ok(ev) => {
                        if call_id.as_ref().is_some_and(|c| *c != ev.call_id) {
                            continue;
                        }
                        let data = serde_json::to_string(&ev).unwrap_or_default();
                        return Some((
                            Ok(Event::default().event("delivery").data(data)),
                            (rx, call_id, stop),
                        ));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let data = json!({"missed": n}).to_string();
                        return Some((
                            Ok(Event::default().event("lagged").data(data)),
                            (rx, call_id, stop),
                        ));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn call_events(
    State(st): State<AppState>,
    _a: Admin,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let i = id.clone();
    st.store.run(move |s| s.call(&i)).await?;
    Ok(event_stream(&st, Some(id)).into_response())
}

async fn all_events(State(st): State<AppState>, _a: Admin) -> Response {
    event_stream(&st, None).into_response()
}

// --- Settings, audit, status ---

async fn get_settings(
    State(st): State<AppState>,
    _a: Admin,
) -> ApiResult<Json<crate::settings::Settings>> {
    Ok(Json(st.store.run(|s| s.settings()).await?))
}

async fn put_settings(
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
struct AuditQuery {
    limit: Option<u32>,
}

async fn audit_log(
    State(st): State<AppState>,
    _a: Admin,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(st.store.run(move |s| s.audit_log(limit)).await?))
}

async fn status(State(st): State<AppState>, _a: Admin) -> Json<serde_json::Value> {
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
    }))
}
