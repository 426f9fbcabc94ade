//! Single sign-on routes: what the login page offers, the start of a sign-in (a redirect to
//! the provider) and the callback the provider sends the browser back to. Every failure of
//! the callback ends on the login page with its message (`/?sso_error=...#/login`).

use axum::extract::State;
use axum::http::header::{LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::start_session;
use super::*;
use crate::oidc::{OidcError, SIGN_IN_TIMEOUT};
use crate::store::StoreError;

/// The cookie that binds a sign-in to the browser that started it (its state): a callback
/// carrying another browser's state is refused, so nobody can log a victim into their own
/// account. `SameSite=Lax`: the provider's redirect back is a cross-site navigation.
const STATE_COOKIE: &str = "beckon_oidc_state";

/// Whether the login page offers single sign-on, and under which name.
#[derive(Serialize, JsonSchema)]
pub(super) struct OidcInfo {
    enabled: bool,
    /// With `enabled`: the provider's name ("Sign in with ...").
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
    /// With `enabled`: where the sign-in starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    login_url: Option<&'static str>,
}

pub(super) async fn oidc_info(State(st): State<AppState>) -> Json<OidcInfo> {
    Json(OidcInfo {
        enabled: st.oidc.is_some(),
        provider: st.oidc.as_ref().map(|o| o.config().provider_name.clone()),
        login_url: st.oidc.as_ref().map(|_| "/api/v1/oidc/login"),
    })
}

fn redirect(to: &str, cookie: Option<String>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().append(SET_COOKIE, c);
    }
    r
}

/// The login page with `message` shown; the state cookie is cleared.
fn to_login_page(message: &str) -> Response {
    let query = serde_urlencoded::to_string([("sso_error", message)]).unwrap_or_default();
    let mut r = redirect(&format!("/?{query}#/login"), None);
    r.headers_mut().append(
        SET_COOKIE,
        HeaderValue::from_static(
            "beckon_oidc_state=; HttpOnly; SameSite=Lax; Path=/api/v1/oidc; Max-Age=0",
        ),
    );
    r
}

/// Sends the browser to the provider's sign-in page.
pub(super) async fn oidc_login(State(st): State<AppState>, Source(from): Source) -> Response {
    let Some(oidc) = &st.oidc else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "single sign-on is not configured on this console (see --oidc-issuer): log in with a user name and password",
        )
        .into_response();
    };
    match oidc.begin(from).await {
        Ok((url, state)) => {
            let cookie = format!(
                "{STATE_COOKIE}={state}; HttpOnly; SameSite=Lax; Path=/api/v1/oidc; Max-Age={}{}",
                SIGN_IN_TIMEOUT.as_secs(),
                if st.config.plain_http { "" } else { "; Secure" }
            );
            redirect(&url, Some(cookie))
        }
        Err(e) => {
            tracing::warn!(error = %e, "single sign-on could not start");
            to_login_page(&e.to_string())
        }
    }
}

/// What the provider sends back: a code and the state, or an error.
#[derive(Deserialize, JsonSchema)]
pub(super) struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    /// The issuer that answered (RFC 9207), when the provider says.
    iss: Option<String>,
}

fn state_cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(COOKIE).iter().find_map(|v| {
        v.to_str().ok()?.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == STATE_COOKIE).then(|| v.to_owned())
        })
    })
}

/// Finishes a sign-in: the user gets a session with the role their claim maps to, and
/// lands on the dashboard; or the login page says why not.
pub(super) async fn oidc_callback(
    State(st): State<AppState>,
    Source(from): Source,
    headers: HeaderMap,
    cb: Result<Query<Callback>, ApiError>,
) -> Response {
    let cb = match cb {
        Ok(Query(cb)) => cb,
        Err(e) => return to_login_page(&e.message),
    };
    let Some(oidc) = st.oidc.clone() else {
        return to_login_page("single sign-on is not configured on this console");
    };
    let provider = oidc.config().provider_name.clone();
    // An answer from another provider (mix-up attack, RFC 9207) is not this sign-in's.
    if cb
        .iss
        .as_ref()
        .is_some_and(|iss| *iss != oidc.config().issuer)
    {
        return to_login_page(&OidcError::UnknownState.to_string());
    }
    if let Some(code) = cb.error {
        let e = OidcError::Refused {
            provider,
            code,
            description: cb.error_description,
        };
        return to_login_page(&e.to_string());
    }
    let (Some(code), Some(state)) = (cb.code, cb.state) else {
        return to_login_page(
            "the provider sent the browser back without a code and state: sign in again",
        );
    };
    if state_cookie(&headers).as_deref() != Some(state.as_str()) {
        return to_login_page(&OidcError::UnknownState.to_string());
    }
    let signed_in = match oidc.finish(&state, &code).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, address = %from, "single sign-on refused");
            if let OidcError::NoRole { user, values, .. } = &e {
                write_audit(
                    &st,
                    format!("address:{from}"),
                    "login.refused",
                    json!({"via": "oidc", "user": user, "claim_values": values, "why": "no mapped role"}),
                )
                .await;
            }
            return to_login_page(&e.to_string());
        }
    };
    let (name, role) = (signed_in.name.clone(), signed_in.role);
    let before = match st
        .store
        .run(move |s| s.sign_in_sso_user(&name, role, now_ms()))
        .await
    {
        Ok(before) => before,
        Err(e @ StoreError::Conflict(_)) => return to_login_page(&e.to_string()),
        Err(e) => return to_login_page(&ApiError::from(e).message),
    };
    let cookie = match start_session(&st, &signed_in.name).await {
        Ok(c) => c,
        Err(e) => return to_login_page(&e.message),
    };
    write_audit(
        &st,
        format!("user:{}", signed_in.name),
        "login",
        json!({
            "via": "oidc",
            "provider": provider,
            "subject": signed_in.subject,
            "role": signed_in.role,
            "role_before": before,
            "address": from.to_string(),
        }),
    )
    .await;
    let mut r = redirect("/#/dashboard", Some(cookie));
    r.headers_mut().append(
        SET_COOKIE,
        HeaderValue::from_static(
            "beckon_oidc_state=; HttpOnly; SameSite=Lax; Path=/api/v1/oidc; Max-Age=0",
        ),
    );
    r
}
