//! Single sign-on at the console's edge (the whole flow through a real OpenID provider is in
//! tests/e2e/test_oidc.py): every refused sign-in ends on the login page with its reason and
//! no session; users made by single sign-on keep the role of their last sign-in, cannot take
//! over a local user, have no password and no role an admin could change.

mod common;

use axum::http::StatusCode;
use beckon_console::model::{Role, now_ms};
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
        c.oidc = Some(common::oidc_config(format!("http://127.0.0.1:{port}")));
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
    // A query the console cannot read still ends on the login page.
    let (_, error, session) =
        follow(&api, "/api/v1/oidc/callback?code=a&state=s&state=t", None).await;
    assert!(error.contains("query string is not valid"), "{error}");
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

/// A provider that answers the token request with whatever ID token the test crafted: the
/// real provider of tests/e2e only ever signs good ones. Its keys: one P-256 key, `k1`.
struct CraftingProvider {
    issuer: String,
    key: jsonwebtoken::EncodingKey,
    id_token: std::sync::Arc<std::sync::Mutex<String>>,
}

impl CraftingProvider {
    async fn start() -> Self {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        use axum::routing::{get, post};
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let b64 = |b: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        };
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
            "alg": "ES256", "x": b64(&point[1..33]), "y": b64(&point[33..65])}]});
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let discovery = json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/auth"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
        });
        let id_token = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let served = id_token.clone();
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || async move { axum::Json(discovery) }),
            )
            .route("/jwks", get(move || async move { axum::Json(jwks) }))
            .route(
                "/token",
                post(move || async move {
                    let t = served.lock().unwrap().clone();
                    axum::Json(json!({"id_token": t, "token_type": "Bearer"}))
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            issuer,
            key: jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
            id_token,
        }
    }

    /// Signs `claims` with the provider's key (or `key`) and serves it at the next token
    /// request.
    fn serve(
        &self,
        alg: jsonwebtoken::Algorithm,
        key: Option<&jsonwebtoken::EncodingKey>,
        claims: &serde_json::Value,
    ) {
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some("k1".into());
        *self.id_token.lock().unwrap() =
            jsonwebtoken::encode(&header, claims, key.unwrap_or(&self.key)).unwrap();
    }
}

/// Starts a sign-in at the console: the nonce it sent to the provider and the callback to
/// come back to (with its state), with the state cookie.
async fn start_sign_in(api: &Api) -> (String, String, String) {
    let (status, headers, _) = api
        .respond(request("GET", "/api/v1/oidc/login", None, None))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let location = &headers.iter().find(|(k, _)| k == "location").unwrap().1;
    let query = location.split_once('?').unwrap().1;
    let params: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).unwrap().1.clone();
    assert_eq!(param("code_challenge_method"), "S256");
    let cookie = headers
        .iter()
        .find(|(k, v)| k == "set-cookie" && v.starts_with("beckon_oidc_state="))
        .map(|(_, v)| v.split(';').next().unwrap().to_owned())
        .unwrap();
    let callback = format!("/api/v1/oidc/callback?code=c0de&state={}", param("state"));
    (param("nonce"), callback, cookie)
}

#[tokio::test]
async fn only_an_id_token_signed_by_the_provider_for_this_sign_in_opens_a_session() {
    use jsonwebtoken::Algorithm::{ES256, HS256};
    let provider = CraftingProvider::start().await;
    let issuer = provider.issuer.clone();
    let api = common::start_with(|c| {
        c.public_url = Some("http://127.0.0.1:8080".into());
        c.oidc = Some(common::oidc_config(issuer));
    })
    .await;
    let now = now_ms() / 1000;
    let claims = |nonce: &str| {
        json!({"iss": provider.issuer, "aud": "beckon", "sub": "u-1", "preferred_username": "olivia",
               "groups": ["ops"], "nonce": nonce, "iat": now, "exp": now + 300})
    };
    let other_key = {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref())
    };
    let hmac = jsonwebtoken::EncodingKey::from_secret(b"secret").unwrap();
    type Craft<'a> = Box<
        dyn Fn(
                &str,
            ) -> (
                jsonwebtoken::Algorithm,
                Option<&'a jsonwebtoken::EncodingKey>,
                serde_json::Value,
            ) + 'a,
    >;
    let refused: Vec<(&str, Craft<'_>, &str)> = vec![
        (
            "another key",
            Box::new(|n| (ES256, Some(&other_key), claims(n))),
            "signature does not match",
        ),
        (
            "HMAC with the client secret",
            Box::new(|n| (HS256, Some(&hmac), claims(n))),
            "does not accept",
        ),
        (
            "another audience",
            Box::new(|n| {
                let mut c = claims(n);
                c["aud"] = json!("other-app");
                (ES256, None, c)
            }),
            "another client",
        ),
        (
            "another issuer",
            Box::new(|n| {
                let mut c = claims(n);
                c["iss"] = json!("https://evil.example");
                (ES256, None, c)
            }),
            "another issuer",
        ),
        (
            "expired",
            Box::new(|n| {
                let mut c = claims(n);
                c["exp"] = json!(now - 3600);
                (ES256, None, c)
            }),
            "expired",
        ),
        (
            "another sign-in's nonce",
            Box::new(|_| (ES256, None, claims("replayed"))),
            "nonce",
        ),
    ];
    for (what, craft, why) in refused {
        let (nonce, callback, cookie) = start_sign_in(&api).await;
        let (alg, key, c) = craft(&nonce);
        provider.serve(alg, key, &c);
        let (_, error, session) = follow(&api, &callback, Some(&cookie)).await;
        assert!(
            error.contains("ID token was refused") && error.contains(why),
            "{what}: {error}"
        );
        assert!(!session, "{what}: a session was opened");
    }

    // The same sign-in with a good token opens a session as operator; its state is spent.
    let (nonce, callback, cookie) = start_sign_in(&api).await;
    provider.serve(ES256, None, &claims(&nonce));
    let (location, error, session) = follow(&api, &callback, Some(&cookie)).await;
    assert_eq!(
        (location.as_str(), error.as_str(), session),
        ("/#/dashboard", "", true)
    );
    let (_, users) = api.call("GET", "/api/v1/users", None).await;
    assert!(
        users
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "olivia" && u["role"] == "operator")
    );
    let (_, error, session) = follow(&api, &callback, Some(&cookie)).await;
    assert!(
        error.contains("not started by this console") && !session,
        "{error}"
    );
}
