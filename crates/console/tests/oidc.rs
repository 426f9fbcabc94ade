//! Single sign-on at the console's edge (the whole flow through a real OpenID provider is in
//! tests/e2e/test_oidc.py): every refused sign-in ends on the login page with its reason and
//! no session; users made by single sign-on keep the role of their last sign-in, cannot take
//! over a local user, have no password and no role an admin could change.

mod common;

use axum::http::StatusCode;
use beckon_console::model::{Role, now_ms};
use beckon_console::oidc::{ClientSecret, OidcConfig};
use beckon_console::store::StoreError;
use common::{Api, login, request};
use serde_json::json;

/// A console whose provider listens nowhere (a port just closed).
async fn start_with_provider_down() -> Api {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    common::start_with(|c| {
        c.public_url = Some("http://127.0.0.1:8080".into());
        c.oidc = Some(OidcConfig {
            issuer: format!("http://127.0.0.1:{port}"),
            client_id: "beckon".into(),
            client_secret: ClientSecret("secret".into()),
            provider_name: "Example ID".into(),
            roles_claim: "groups".into(),
            role_map: vec![("ops".into(), Role::Operator)],
            scopes: vec!["openid".into()],
            ca_file: None,
        });
    })
    .await
}

/// Where a GET of `path` (with `cookie`) sends the browser, the `sso_error` it carries
/// (decoded), and whether it hands out a session.
async fn follow(api: &Api, path: &str, cookie: Option<&str>) -> (String, String, bool) {
    let mut req = request("GET", path, None, None);
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().unwrap());
    }
    let (status, headers, _) = api.respond(req).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{path}");
    let location = headers
        .iter()
        .find(|(k, _)| k == "location")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let error = location
        .strip_prefix("/?")
        .and_then(|q| q.split('#').next())
        .and_then(|q| {
            serde_urlencoded::from_str::<Vec<(String, String)>>(q)
                .ok()?
                .into_iter()
                .find(|(k, _)| k == "sso_error")
                .map(|(_, v)| v)
        })
        .unwrap_or_default();
    let session = headers.iter().any(|(k, v)| {
        k == "set-cookie" && v.starts_with("beckon_session=") && !v.contains("Max-Age=0")
    });
    (location, error, session)
}

#[tokio::test]
async fn refused_sign_ins_end_on_the_login_page_with_the_reason() {
    let api = start_with_provider_down().await;
    let (_, info) = api.call_as("GET", "/api/v1/oidc", None, None).await;
    assert_eq!(info["enabled"], true);
    assert_eq!(info["provider"], "Example ID");

    let (location, error, session) = follow(&api, "/api/v1/oidc/login", None).await;
    assert!(location.ends_with("#/login"), "{location}");
    assert!(
        error.contains("the sign-in provider failed")
            && error.contains("/.well-known/openid-configuration"),
        "{error}"
    );
    assert!(!session);

    // A callback whose state this browser did not start, with or without a state cookie.
    for cookie in [None, Some("beckon_oidc_state=forged")] {
        let (_, error, session) = follow(
            &api,
            "/api/v1/oidc/callback?code=stolen&state=forged",
            cookie,
        )
        .await;
        assert!(error.contains("not started by this console"), "{error}");
        assert!(!session);
    }
    // The user cancelled at the provider.
    let (_, error, session) = follow(
        &api,
        "/api/v1/oidc/callback?error=access_denied&error_description=End-User+aborted&state=s",
        None,
    )
    .await;
    assert_eq!(
        error,
        "Example ID refused the sign-in: access_denied (End-User aborted)"
    );
    assert!(!session);
    // An answer naming another issuer (RFC 9207).
    let (_, error, _) = follow(
        &api,
        "/api/v1/oidc/callback?code=c&state=s&iss=https%3A%2F%2Fevil.example",
        Some("beckon_oidc_state=s"),
    )
    .await;
    assert!(error.contains("not started by this console"), "{error}");
}

#[tokio::test]
async fn without_single_sign_on_the_login_page_offers_only_passwords() {
    let api = common::start_with(|_| {}).await;
    let (_, info) = api.call_as("GET", "/api/v1/oidc", None, None).await;
    assert_eq!(info, json!({"enabled": false}));
    let (status, body) = api.call_as("GET", "/api/v1/oidc/login", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["error"].as_str().unwrap().contains("--oidc-issuer"),
        "{body}"
    );
}

#[tokio::test]
async fn sso_users_take_their_role_from_each_sign_in_and_never_a_local_user() {
    let api = common::start_with(|_| {}).await;
    let store = api.handle.state.store.clone();
    let first = store
        .run(|s| s.sign_in_sso_user("olivia", Role::Viewer, now_ms()))
        .await
        .unwrap();
    assert_eq!(first, None, "made on the first sign-in");
    let again = store
        .run(|s| s.sign_in_sso_user("olivia", Role::Operator, now_ms()))
        .await
        .unwrap();
    assert_eq!(
        again,
        Some(Role::Viewer),
        "the role of the last sign-in is replaced"
    );

    let (_, users) = api.call("GET", "/api/v1/users", None).await;
    let olivia = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "olivia")
        .unwrap();
    assert_eq!(olivia["role"], "operator");
    assert_eq!(olivia["sso"], true);
    let admin = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "admin")
        .unwrap();
    assert_eq!(admin["sso"], false);

    // The provider owns the role.
    let (status, body) = api
        .call(
            "PATCH",
            "/api/v1/users/olivia",
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("at the provider"),
        "{body}"
    );

    // No password matches, not even the marker itself.
    for password in ["!oidc", "", "olivia's password"] {
        let (status, _, _) = api.raw(login("olivia", password)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{password:?}");
    }

    // A provider's user named like a local user is refused, and the local user is untouched.
    let err = store
        .run(|s| s.sign_in_sso_user("admin", Role::Viewer, now_ms()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("local user")),
        "{err}"
    );
    let (_, users) = api.call("GET", "/api/v1/users", None).await;
    assert!(
        users
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "admin" && u["role"] == "admin" && u["sso"] == false)
    );
}
