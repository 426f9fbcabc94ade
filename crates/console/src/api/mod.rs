//! The HTTP API, `/api/v1`: JSON in and out, errors as `{"error": "..."}` with a 4xx status
//! that says whose fault it is. Routes are listed once in [`routes`]; the OpenAPI document
//! (`/api/v1/openapi.json`) is checked against that list by the tests.
//!
//! One file per capability: [`auth`] (users and sessions), [`oidc`] (single sign-on),
//! [`tokens`] (API tokens),
//! [`enrollment`] (enrollment tokens, enrollment, check-in, renewal, the tenant file),
//! [`agents`] (agents and groups), [`wol`] (Wake-on-LAN), [`calls`] (wake-up calls and their
//! live events), [`settings`] (settings, audit log, status) and [`metrics`] (Prometheus,
//! `/metrics`, beside the API). This file holds the router,
//! the error type and the extractors they share.

mod agents;
mod auth;
mod calls;
mod enrollment;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod metrics;
mod oidc;
pub mod openapi;
mod settings;
mod tokens;
mod users;
mod wol;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, COOKIE, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post};
use axum::{Json, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::guard::SessionUse;
use crate::model::*;
use crate::secrets::token_hash;
use crate::store::{NewAuditEntry, Principal, Store, StoreError, StoreResult};

use agents::*;
use auth::*;
use calls::*;
use enrollment::*;
use oidc::*;
use settings::*;
use tokens::*;
use users::*;
use wol::*;

pub(crate) use auth::ensure_first_user;
pub(crate) use tokens::create_api_token;

/// Name of the session cookie.
const SESSION_COOKIE: &str = "beckon_session";

/// An API error: a status and a message a person can act on.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// For 429: when to try again.
    retry_after: Option<std::time::Duration>,
    /// For 403: the role needed and the caller's.
    roles: Option<(Role, Role)>,
}

/// The body of every error answer.
#[derive(Serialize, schemars::JsonSchema)]
#[schemars(rename = "Error")]
struct ErrorBody {
    /// What went wrong and what to do, in words.
    error: String,
    /// With 403: the role the route needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    needs_role: Option<Role>,
    /// With 403: the caller's role.
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            roles: None,
        }
    }

    /// 429 with a `Retry-After` of `wait` (whole seconds, at least 1).
    fn too_many(message: impl Into<String>, wait: std::time::Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// A failure inside the console: logged in full, answered with a 500.
    fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(error = %message, "request failed inside the console");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            needs_role: self.roles.map(|(needed, _)| needed),
            role: self.roles.map(|(_, held)| held),
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            StoreError::Refused(_) => StatusCode::UNAUTHORIZED,
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::Unavailable { .. } => {
                tracing::error!(error = %e, "database unreachable");
                return Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the console cannot reach its database; it retries on every request: see the console's log",
                );
            }
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

/// The address a request came from (the TCP peer; a reverse proxy's own address behind
/// one). Unspecified when the router is driven without a connection (tests).
pub struct Source(pub std::net::IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |c| {
                c.0.ip()
            });
        Ok(Source(peer))
    }
}

/// An authenticated request (API token or session cookie): the console's state and who
/// asks, with their role. Routes take it as [`Viewer`], [`Operator`] or [`Admin`], which
/// answer 403 naming the missing role; they read and write the store through
/// [`Caller::run`], and record what they changed with [`Caller::audited`] (or
/// [`Caller::audit`] when the entry needs the result).
pub struct Caller {
    st: AppState,
    who: Principal,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let who = if let Some(token) = bearer(&parts.headers) {
            if !token.starts_with("bkt_") {
                return Err(ApiError::unauthorized(
                    "this bearer token is not an API token (they start with bkt_): create one on the API tokens page in the console (or POST /api/v1/api-tokens)",
                ));
            }
            let hash = token_hash(token);
            state.store.run(move |s| s.api_token(&hash)).await?
        } else if let Some(cookie) = session_cookie(&parts.headers) {
            let hash = token_hash(&cookie);
            let who = state.store.run(move |s| s.session(&hash, now_ms())).await?;
            let sessions = &state.sessions;
            let alive = match sessions.check(&hash, std::time::Instant::now()) {
                SessionUse::Live => true,
                SessionUse::Record => {
                    // Used here within the idle time; a failed write only delays the record.
                    let _ = state
                        .store
                        .run(move |s| s.record_session_use(&hash, now_ms()))
                        .await;
                    sessions.recorded(&hash, std::time::Instant::now());
                    true
                }
                SessionUse::Ask => {
                    let idle = state.config.session_idle_timeout;
                    let idle = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
                    let alive = state
                        .store
                        .run(move |s| s.resume_session(&hash, now_ms(), idle))
                        .await?;
                    if alive {
                        sessions.recorded(&hash, std::time::Instant::now());
                    }
                    alive
                }
            };
            if !alive {
                sessions.end(&hash);
                let _ = state.store.run(move |s| s.delete_session(&hash)).await;
                return Err(ApiError::unauthorized(
                    "the session ended after a time without use: log in again",
                ));
            }
            who
        } else {
            return Err(ApiError::unauthorized(
                "authentication required: send Authorization: Bearer <API token>, or log in (POST /api/v1/login)",
            ));
        };
        Ok(Caller {
            st: state.clone(),
            who,
        })
    }
}

/// The extractor of a caller with at least one role: `$name(Caller)`, dereferencing to it.
macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        pub struct $name(Caller);

        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
                let caller = Caller::from_request_parts(parts, state).await?;
                caller.require($role)?;
                Ok($name(caller))
            }
        }

        impl std::ops::Deref for $name {
            type Target = Caller;

            fn deref(&self) -> &Caller {
                &self.0
            }
        }
    };
}

role_extractor!(
    /// A caller with any role: reads.
    Viewer,
    Role::Viewer
);
role_extractor!(
    /// A caller with the operator role or more: wake-up calls and Wake-on-LAN.
    Operator,
    Role::Operator
);
role_extractor!(
    /// A caller with the admin role: settings, users, tokens, agents and groups.
    Admin,
    Role::Admin
);

/// The 403 of a caller without `role`: names the role and the caller's own.
fn forbidden(who: &Principal, role: Role) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "this needs the {} role; {} has the {} role: ask an admin",
            role.as_str(),
            who.name,
            who.role.as_str()
        ),
    );
    e.roles = Some((role, who.role));
    e
}

impl Caller {
    /// Refuses (403) a caller without at least `role`.
    fn require(&self, role: Role) -> ApiResult<()> {
        if self.who.role < role {
            return Err(forbidden(&self.who, role));
        }
        Ok(())
    }

    /// Runs `f` with the store on the blocking pool; a store error becomes its API error.
    async fn run<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> StoreResult<T> + Send + 'static,
    {
        Ok(self.st.store.run(f).await?)
    }

    /// Records `what` this caller did in the audit log. A failure to write it is
    /// logged, not answered: the change itself is done.
    async fn audit(&self, what: &'static str, detail: serde_json::Value) {
        write_audit(&self.st, self.who.name.clone(), what, detail).await;
    }

    /// Runs the change `f` with the store and, when it succeeded, records it in the audit
    /// log as `what` with `detail`.
    async fn audited<T, F>(
        &self,
        what: &'static str,
        detail: serde_json::Value,
        f: F,
    ) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> StoreResult<T> + Send + 'static,
    {
        let done = self.run(f).await?;
        self.audit(what, detail).await;
        Ok(done)
    }
}

/// Records in the audit log that `who` did `what`. A failure to write it is logged, not
/// answered: what was done is done.
async fn write_audit(st: &AppState, who: String, what: &'static str, detail: serde_json::Value) {
    let entry = NewAuditEntry {
        who,
        what: what.to_owned(),
        detail,
        at: now_ms(),
    };
    if let Err(e) = st.store.run(move |s| s.audit(entry)).await {
        tracing::warn!(error = %e, what, "could not write the audit log");
    }
}

/// One entry of [`routes`]: the path, then each `method(handler)`; every method is named
/// once, for the router and for the list the OpenAPI test compares.
macro_rules! route {
    ($path:literal, $method:ident($handler:expr) $(, $more:ident($more_handler:expr))* $(,)?) => {
        (
            $path,
            &[stringify!($method) $(, stringify!($more))*],
            $method($handler) $(.$more($more_handler))*,
        )
    };
}

/// Every route: path, methods, handler. The router and the OpenAPI test both read it.
pub fn routes() -> Vec<(
    &'static str,
    &'static [&'static str],
    MethodRouter<AppState>,
)> {
    vec![
        route!("/api/v1/openapi.json", get(openapi)),
        route!("/api/v1/login", post(login)),
        route!("/api/v1/logout", post(logout)),
        route!("/api/v1/oidc", get(oidc_info)),
        route!("/api/v1/oidc/login", get(oidc_login)),
        route!("/api/v1/oidc/callback", get(oidc_callback)),
        route!("/api/v1/users", get(list_users), post(create_user)),
        route!("/api/v1/users/{name}", patch(update_user)),
        route!("/api/v1/account", get(account)),
        route!("/api/v1/account/password", post(change_password)),
        route!("/api/v1/enroll", post(enroll)),
        route!("/api/v1/agents/{id}/checkin", post(checkin)),
        route!("/api/v1/agents/{id}/certificate", post(renew_certificate)),
        route!("/api/v1/tenant-file", get(get_tenant_file)),
        route!("/api/v1/revocations", get(revocations)),
        route!(
            "/api/v1/enrollment-tokens",
            get(list_enrollment_tokens),
            post(create_enrollment_token)
        ),
        route!(
            "/api/v1/enrollment-tokens/{id}",
            delete(revoke_enrollment_token)
        ),
        route!("/api/v1/agents", get(list_agents)),
        route!("/api/v1/agents/remove", post(remove_agents)),
        route!(
            "/api/v1/agents/{id}",
            get(get_agent),
            patch(update_agent),
            delete(revoke_agent)
        ),
        route!("/api/v1/agents/{id}/clone", delete(clear_clone_flag)),
        route!("/api/v1/agents/{id}/wol", get(wol_history), post(wol_now)),
        route!("/api/v1/groups", get(list_groups), post(create_group)),
        route!("/api/v1/groups/{name}", delete(delete_group)),
        route!("/api/v1/calls", get(list_calls), post(create_call)),
        route!("/api/v1/calls/{id}", get(get_call)),
        route!("/api/v1/calls/{id}/deliveries", get(call_deliveries)),
        route!("/api/v1/calls/{id}/events", get(call_events)),
        route!("/api/v1/events", get(all_events)),
        route!("/api/v1/settings", get(get_settings), put(put_settings)),
        route!("/api/v1/audit", get(audit_log)),
        route!("/api/v1/status", get(status)),
        route!(
            "/api/v1/api-tokens",
            get(list_api_tokens),
            post(create_api_token_route)
        ),
        route!("/api/v1/api-tokens/{id}", delete(revoke_api_token)),
    ]
}

/// Body limit of the routes that take a user name and password: 4 KiB.
pub const SMALL_BODY_BYTES: usize = 4 * 1024;

/// The largest body `path` accepts: small for login and users, `default` (the console's
/// `max_body_bytes`) for the rest.
fn body_limit(path: &str, default: usize) -> usize {
    match path {
        "/api/v1/login" | "/api/v1/logout" | "/api/v1/users" | "/api/v1/account/password" => {
            SMALL_BODY_BYTES.min(default)
        }
        _ => default,
    }
}

/// The API router with its body limits and JSON fallbacks.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let mut r = Router::new().route("/metrics", get(metrics::metrics));
    for (path, methods, handler) in routes() {
        // Counted under the route's template, with counters made now (no lock per request).
        let counted = state.metrics.route(path, methods);
        r = r.route(
            path,
            handler
                .layer(DefaultBodyLimit::max(body_limit(path, limit)))
                .layer(axum::middleware::from_fn(move |req, next| {
                    counted.clone().count(req, next)
                })),
        );
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
    Json(openapi::document())
}

/// The query of a list whose only parameter is how many to list.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    /// How many to list: 1 to 1000.
    limit: Option<u32>,
}

/// A list's `limit` parameter, `default` when absent; 1 to 1000.
fn check_limit(limit: Option<u32>, default: u32) -> ApiResult<u32> {
    let limit = limit.unwrap_or(default);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    Ok(limit)
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
