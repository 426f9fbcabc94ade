//! The HTTP API through the real router: routes vs the OpenAPI document, enrollment,
//! check-in, sessions, calls, settings, and bad input on every endpoint.

mod common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use beckon_console::{Console, ConsoleConfig};
use common::{Api, csr, login, request, session_cookie, with_cookie};
use serde_json::{Value, json};
use tower::ServiceExt;

async fn start() -> Api {
    common::start_with(|_| {}).await
}

fn inventory() -> Value {
    json!({
        "hostname": "pc-42.example",
        "os": "Debian 13",
        "addresses": [{"address": "192.168.1.23", "prefix_len": 24}],
        "macs": ["00:11:22:33:44:55"],
    })
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_routes() {
    let api = start().await;
    let (status, doc) = api.call_as("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((path.clone(), method.clone()));
        }
    }
    let mut routed = BTreeSet::new();
    for (path, methods, _) in beckon_console::api::routes() {
        for m in methods {
            routed.insert((path.to_owned(), m.to_string()));
        }
    }
    assert_eq!(documented, routed);
    // Every documented operation reaches a handler (no "no such route", no 405).
    for (path, method) in &documented {
        let uri = path.replace("{id}", "x").replace("{name}", "x");
        let req = Request::builder()
            .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
            .uri(uri)
            .header("authorization", format!("Bearer {}", api.token))
            .body(Body::empty())
            .unwrap();
        let resp = api.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        if resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "text/event-stream")
        {
            // A live stream never ends: reaching it is enough.
            assert_eq!(status, StatusCode::OK);
            continue;
        }
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("no such API route"),
            "{method} {path}: {text}"
        );
    }
    // And the others do not.
    let (status, body) = api.call("GET", "/api/v1/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("openapi.json"));
    let (status, body) = api.call("PUT", "/api/v1/agents", Some(json!({}))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn an_agent_enrolls_with_a_csr_gets_its_certificate_and_checks_in() {
    let api = start().await;
    let (s, _) = api
        .call("POST", "/api/v1/groups", Some(json!({"name": "laptops"})))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, t) = api
        .call(
            "POST",
            "/api/v1/enrollment-tokens",
            Some(json!({"label": "office", "groups": ["laptops"], "expires_in_secs": 3600})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let secret = t["token"].as_str().unwrap().to_owned();
    let (s, e) = api
        .enroll_unauthenticated(
            json!({"token": secret, "agent_id": "pc-42", "csr": csr(), "inventory": inventory()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
    assert_eq!(e["agent_id"], "pc-42");
    assert_eq!(e["tenant"], "default");
    assert!(e["ca"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    assert_eq!(e["wakeup_key"]["kid"], "console-1");
    assert!(!e["broker_endpoints"].as_array().unwrap().is_empty());
    // The certificate names the agent: CN = id, O = tenant, OU = agent.
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der =
        CertificateDer::from_pem_slice(e["certificate"].as_str().unwrap().as_bytes()).unwrap();
    let id = beckon_pki::certificate_identity(&der).unwrap();
    assert_eq!(id.common_name.as_deref(), Some("pc-42"));
    assert_eq!(id.organization.as_deref(), Some("default"));
    assert_eq!(id.org_unit.as_deref(), Some("agent"));

    // The one-time token is used up.
    let (s, err) = api
        .enroll_unauthenticated(json!({"token": secret, "agent_id": "pc-43", "csr": csr()}))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(err["error"].as_str().unwrap().contains("used up"), "{err}");

    let (s, a) = api.call("GET", "/api/v1/agents/pc-42", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(a["groups"], json!(["laptops"]));
    assert_eq!(a["hostname"], "pc-42.example");
    let (_, list) = api.call("GET", "/api/v1/agents?group=laptops", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, list) = api
        .call("GET", "/api/v1/agents?presence=online", None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 0);

    // Check-in with the token from enrollment, with the agent runtime's body.
    let checkin = format!("Bearer {}", e["checkin_token"].as_str().unwrap());
    let body = json!({"agent_id": "pc-42", "tenant": "default", "hostname": "pc-42.example", "wakeup_id": null, "at": "2026-11-27T10:00:00Z"});
    let (s, c) = api
        .call_as(
            "POST",
            "/api/v1/agents/pc-42/checkin",
            Some(body.clone()),
            Some(&checkin),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let (_, a) = api.call("GET", "/api/v1/agents/pc-42", None).await;
    assert!(a["last_checkin"].is_i64());
    // Wrong token, another agent's URL, no token: refused.
    for (path, auth) in [
        ("/api/v1/agents/pc-42/checkin", Some("Bearer bka_wrong")),
        ("/api/v1/agents/pc-43/checkin", Some(checkin.as_str())),
        ("/api/v1/agents/pc-42/checkin", None),
    ] {
        let (s, err) = api.call_as("POST", path, Some(json!({})), auth).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path} {auth:?}: {err}");
        assert!(err["error"].is_string());
    }
    // After revocation, check-in is refused.
    let (s, _) = api.call("DELETE", "/api/v1/agents/pc-42", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api
        .call_as(
            "POST",
            "/api/v1/agents/pc-42/checkin",
            Some(body),
            Some(&checkin),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    api.handle.shutdown().await;
}

#[tokio::test]
async fn users_log_in_with_a_session_cookie_and_log_out() {
    let api = start().await;
    let password = api.handle.initial_admin_password.clone().unwrap();
    let login = |pw: &str| login("admin", pw);
    let (s, _, body) = api.raw(login("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("wrong user name or password")
    );
    let (s, headers, _) = api.raw(login(&password)).await;
    assert_eq!(s, StatusCode::OK);
    let cookie = session_cookie(&headers);
    assert!(headers.iter().any(|(k, v)| k == "set-cookie"
        && v.contains("HttpOnly")
        && v.contains("SameSite=Strict")));
    let (s, _, _) = api
        .raw(with_cookie("GET", "/api/v1/agents", &cookie, None))
        .await;
    assert_eq!(s, StatusCode::OK);
    // Changing the password needs the current one, and ends the sessions.
    let change = |current: &str, new: &str| {
        let body = json!({"current": current, "new": new});
        with_cookie("POST", "/api/v1/account/password", &cookie, Some(body))
    };
    let (s, _, body) = api.raw(change("nope", "a long new password")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    let (s, _, body) = api.raw(change(&password, "short")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (s, _, _) = api.raw(change(&password, "a long new password")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, _) = api
        .raw(with_cookie("GET", "/api/v1/agents", &cookie, None))
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "sessions ended with the password change"
    );
    let (s, _, _) = api.raw(login(&password)).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the old password no longer works"
    );
    let (s, headers, _) = api.raw(login("a long new password")).await;
    assert_eq!(s, StatusCode::OK);
    let cookie = session_cookie(&headers);
    // A second user, made by an administrator.
    let (s, body) = api
        .call(
            "POST",
            "/api/v1/users",
            Some(json!({"name": "alice", "password": "alice's long password"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/users",
            Some(json!({"name": "alice", "password": "another long one"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/account/password",
            Some(json!({"current": "x", "new": "y"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "API tokens have no password");
    let (s, _, _) = api
        .raw(with_cookie("POST", "/api/v1/logout", &cookie, None))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, body) = api
        .raw(with_cookie("GET", "/api/v1/agents", &cookie, None))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("log in again"));
}

#[tokio::test]
async fn settings_are_validated_and_audited() {
    let api = start().await;
    let (s, before) = api.call("GET", "/api/v1/settings", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(before["wol"]["port"], 9);
    let mut new = before.clone();
    new["wol"]["addresses"] = json!(["10.1.255.255", "ff02::1"]);
    new["wol"]["repeats"] = json!(5);
    new["broker"]["endpoints"] = json!(["push.example.com:8883"]);
    let (s, saved) = api.call("PUT", "/api/v1/settings", Some(new.clone())).await;
    assert_eq!(s, StatusCode::OK, "{saved}");
    let (_, now) = api.call("GET", "/api/v1/settings", None).await;
    assert_eq!(now, new);
    let (_, audit) = api.call("GET", "/api/v1/audit", None).await;
    let whats: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["what"].as_str().unwrap())
        .collect();
    assert!(
        whats.contains(&"settings.wol") && whats.contains(&"settings.broker"),
        "{whats:?}"
    );
    assert!(audit[0]["who"].as_str().unwrap().starts_with("token:"));

    for (field, value, expect) in [
        ("port", json!(0), "wol.port"),
        ("repeats", json!(11), "wol.repeats"),
        ("addresses", json!(["0.0.0.0"]), "wol.addresses[0]"),
        ("addresses", json!(["not-an-ip"]), "does not fit"),
        ("secureon", json!("aa:bb"), "wol.secureon"),
    ] {
        let mut bad = new.clone();
        bad["wol"][field] = value;
        let (s, err) = api.call("PUT", "/api/v1/settings", Some(bad)).await;
        assert!(s.is_client_error(), "{field}: {s}");
        assert!(
            err["error"].as_str().unwrap().contains(expect),
            "{field}: {err}"
        );
    }
    let mut bad = new.clone();
    bad["wakeup"]["default_expiry_secs"] = json!(5);
    let (s, _) = api.call("PUT", "/api/v1/settings", Some(bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, after) = api.call("GET", "/api/v1/settings", None).await;
    assert_eq!(after, new, "refused settings changed nothing");
}

/// The proxy policy lets agents go direct unless an administrator forbids it: a fresh
/// console says so (the Settings page fills its checkbox from it, and saves what it shows),
/// and so does a saved proxy or a settings body that leaves the field or the group out.
#[tokio::test]
async fn the_proxy_policy_allows_going_direct_unless_forbidden() {
    let api = start().await;
    let (s, fresh) = api.call("GET", "/api/v1/settings", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        fresh["proxy"],
        json!({"url": "", "direct_fallback": true}),
        "a fresh console"
    );
    let answer = api.enroll("pc-1", inventory()).await;
    assert_eq!(answer["proxy"]["direct_fallback"], true, "{answer}");

    let mut body = fresh.clone();
    body["proxy"] = json!({"url": "http://proxy.example:3128"});
    let (s, saved) = api.call("PUT", "/api/v1/settings", Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{saved}");
    let want = json!({"url": "http://proxy.example:3128", "direct_fallback": true});
    assert_eq!(saved["proxy"], want, "a proxy saved without the field");
    assert_eq!(
        api.call("GET", "/api/v1/settings", None).await.1["proxy"],
        want
    );

    let mut body = fresh.clone();
    body["proxy"]["direct_fallback"] = json!(false);
    let (s, saved) = api.call("PUT", "/api/v1/settings", Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{saved}");
    assert_eq!(
        saved["proxy"]["direct_fallback"], false,
        "forbidden on purpose"
    );

    let mut body = fresh.clone();
    body.as_object_mut().unwrap().remove("proxy");
    let (s, saved) = api.call("PUT", "/api/v1/settings", Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{saved}");
    assert_eq!(
        saved["proxy"],
        json!({"url": "", "direct_fallback": true}),
        "settings without the proxy group"
    );
}

/// A proxy with credentials reaches enrolling agents whole, while the audit log names its user
/// only.
#[tokio::test]
async fn proxy_credentials_reach_agents_but_not_the_audit_log() {
    let api = start().await;
    let (_, mut body) = api.call("GET", "/api/v1/settings", None).await;
    let url = "http://agents:s3cret%40x@proxy.example:3128";
    body["proxy"] = json!({"url": url, "direct_fallback": true});
    let (s, saved) = api.call("PUT", "/api/v1/settings", Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{saved}");
    let answer = api.enroll("pc-1", inventory()).await;
    assert_eq!(answer["proxy"]["url"], url, "{answer}");
    let (_, audit) = api.call("GET", "/api/v1/audit", None).await;
    let entry = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["what"] == "settings.proxy")
        .expect("the change is audited");
    assert_eq!(
        entry["detail"]["new"]["url"], "http://agents@proxy.example:3128",
        "{entry}"
    );
    assert!(!audit.to_string().contains("s3cret"), "{audit}");
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let api = start().await;
    let secret = api.enrollment_token(json!({"max_uses": 0})).await;
    let (s, _) = api
        .enroll_unauthenticated(json!({"token": secret, "agent_id": "a1", "csr": csr()}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let snapshot = || async {
        (
            api.call("GET", "/api/v1/agents?include_revoked=true", None)
                .await
                .1,
            api.call("GET", "/api/v1/enrollment-tokens", None).await.1,
            api.call("GET", "/api/v1/groups", None).await.1,
            api.call("GET", "/api/v1/calls", None).await.1,
            api.call("GET", "/api/v1/settings", None).await.1,
        )
    };
    let before = snapshot().await;
    let token = format!("Bearer {}", api.token);
    let big = "x".repeat(100 * 1024);
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<String>,
        Option<&'a str>,
        StatusCode,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "GET",
            "/api/v1/agents",
            None,
            None,
            StatusCode::UNAUTHORIZED,
            "authentication required",
        ),
        (
            "GET",
            "/api/v1/agents",
            None,
            Some("Bearer bkt_nope"),
            StatusCode::UNAUTHORIZED,
            "not valid",
        ),
        (
            "GET",
            "/api/v1/agents",
            None,
            Some("Bearer something"),
            StatusCode::UNAUTHORIZED,
            "bkt_",
        ),
        (
            "POST",
            "/api/v1/groups",
            Some("{".into()),
            Some(&token),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        (
            "POST",
            "/api/v1/groups",
            Some(r#"{"name":"g","colour":1}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "colour",
        ),
        (
            "POST",
            "/api/v1/groups",
            Some(r#"{"name":"a b"}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not valid",
        ),
        (
            "POST",
            "/api/v1/groups",
            Some(format!(r#"{{"name":"g","description":"{big}"}}"#)),
            Some(&token),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too large",
        ),
        (
            "GET",
            "/api/v1/agents/zz",
            None,
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "PATCH",
            "/api/v1/agents/zz",
            Some(r#"{"name":"x"}"#.into()),
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "PATCH",
            "/api/v1/agents/a1",
            Some(r#"{"groups":["missing"]}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "create it first",
        ),
        (
            "DELETE",
            "/api/v1/agents/zz",
            None,
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "DELETE",
            "/api/v1/groups/zz",
            None,
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "DELETE",
            "/api/v1/enrollment-tokens/zz",
            None,
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "DELETE",
            "/api/v1/api-tokens/zz",
            None,
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "GET",
            "/api/v1/calls/zz",
            None,
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "GET",
            "/api/v1/calls/zz/events",
            None,
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "GET",
            "/api/v1/agents/zz/wol",
            None,
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "POST",
            "/api/v1/agents/zz/wol",
            None,
            Some(&token),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "GET",
            "/api/v1/agents?limit=0",
            None,
            Some(&token),
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "GET",
            "/api/v1/agents?presence=maybe",
            None,
            Some(&token),
            StatusCode::BAD_REQUEST,
            "query string",
        ),
        (
            "POST",
            "/api/v1/calls",
            Some(r#"{"target":{"agents":["zz"]}}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not enrolled",
        ),
        (
            "POST",
            "/api/v1/calls",
            Some(r#"{"target":{"agents":[]}}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "at least one",
        ),
        (
            "POST",
            "/api/v1/calls",
            Some(r#"{"target":{"group":"zz"}}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "does not exist",
        ),
        (
            "POST",
            "/api/v1/calls",
            Some(r#"{"target":"all","expires_in_secs":1}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "expires_in_secs",
        ),
        (
            "POST",
            "/api/v1/calls",
            Some(r#"{"target":"everyone"}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "does not fit",
        ),
        (
            "POST",
            "/api/v1/enroll",
            Some(format!(
                r#"{{"token":"{secret}","agent_id":"a/b","csr":"x"}}"#
            )),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "agent_id",
        ),
        (
            "POST",
            "/api/v1/enroll",
            Some(format!(
                r#"{{"token":"{secret}","agent_id":"a2","csr":"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----"}}"#
            )),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "csr",
        ),
        (
            "POST",
            "/api/v1/enroll",
            Some(format!(
                r#"{{"token":"{secret}","agent_id":"a2","csr":"x","inventory":{{"macs":["zz"]}}}}"#
            )),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "MAC",
        ),
        (
            "POST",
            "/api/v1/enroll",
            Some(r#"{"token":"bke_unknown","agent_id":"a2","csr":"x"}"#.into()),
            None,
            // The token is checked before anything else.
            StatusCode::UNAUTHORIZED,
            "not known",
        ),
        (
            "POST",
            "/api/v1/enroll",
            Some(format!(
                r#"{{"token":"{secret}","agent_id":"a1","csr":{}}}"#,
                serde_json::to_string(&csr()).unwrap()
            )),
            None,
            StatusCode::CONFLICT,
            "already enrolled",
        ),
        (
            "POST",
            "/api/v1/enrollment-tokens",
            Some(r#"{"groups":["missing"]}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "create it first",
        ),
        (
            "POST",
            "/api/v1/enrollment-tokens",
            Some(r#"{"expires_in_secs":0}"#.into()),
            Some(&token),
            StatusCode::UNPROCESSABLE_ENTITY,
            "at least 1",
        ),
    ];
    for (method, path, body, auth, want, text) in cases {
        let (status, _, body) = api.raw(request(method, path, auth, body)).await;
        assert_eq!(status, want, "{method} {path}: {body}");
        let msg = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no error in {body}"));
        assert!(
            msg.contains(text),
            "{method} {path}: {msg:?} lacks {text:?}"
        );
    }
    // Missing content type.
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/groups")
        .header("authorization", &token)
        .body(Body::from(r#"{"name":"g"}"#))
        .unwrap();
    let (s, _, body) = api.raw(req).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(body["error"].as_str().unwrap().contains("Content-Type"));
    assert_eq!(snapshot().await, before, "refused requests changed nothing");
}

#[tokio::test]
async fn calls_record_one_delivery_per_agent_and_show_their_states() {
    let api = start().await;
    let secret = api.enrollment_token(json!({"max_uses": 0})).await;
    for id in ["a1", "a2", "a3"] {
        let (s, _) = api
            .enroll_unauthenticated(json!({"token": secret, "agent_id": id, "csr": csr()}))
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    api.call("POST", "/api/v1/groups", Some(json!({"name": "g"})))
        .await;
    api.call("PATCH", "/api/v1/agents/a2", Some(json!({"groups": ["g"]})))
        .await;
    let (s, c) = api
        .create_call(json!({"target": {"group": "g"}, "reason": "policy-changed"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    assert_eq!(c["agents"], 1);
    assert_eq!(c["target"], "group g");
    assert_eq!(c["spread"], 0, "a small call acts at once");
    let (s, c) = api
        .create_call(json!({"target": "all", "reason": "inventory", "spread_secs": 30}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(c["agents"], 3);
    assert_eq!(c["spread"], 30);
    let got = api.get_call(c["id"].as_str().unwrap()).await;
    let deliveries = got["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 3);
    // Without a broker they stay queued.
    assert!(deliveries.iter().all(|d| d["state"] == "queued"));
    let (_, list) = api.call("GET", "/api/v1/calls", None).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (_, status) = api.call("GET", "/api/v1/status", None).await;
    assert_eq!(status["push_service"]["connected"], false);
    assert!(
        status["push_service"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Push service servers are not reachable")
    );
    // The dashboard names the store (never a password).
    let db = &status["database"];
    let url = db["url"].as_str().unwrap();
    match std::env::var(common::POSTGRES_VAR)
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(_) => {
            assert_eq!(db["kind"], "postgresql");
            assert!(url.starts_with("postgres"), "{url}");
        }
        None => {
            assert_eq!(db["kind"], "sqlite");
            assert!(
                url.starts_with("sqlite:") && url.ends_with("console.db"),
                "{url}"
            );
        }
    }
}

#[tokio::test]
async fn plain_http_is_refused_off_loopback_and_https_is_served_with_the_consoles_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ConsoleConfig::new(dir.path().join("data"));
    config.listen = "0.0.0.0:0".parse().unwrap();
    let err = Console::start(config.clone()).await.err().expect("refused");
    assert!(err.to_string().contains("loopback"), "{err}");

    config.listen = "127.0.0.1:0".parse().unwrap();
    config.plain_http = false;
    let handle = Console::start(config).await.unwrap();
    assert_eq!(handle.scheme, "https");
    use std::os::unix::fs::PermissionsExt;
    for key in [
        "tenant-ca.key",
        "wakeup-signing.key",
        "console-https.key",
        "console.db",
    ] {
        let mode = std::fs::metadata(dir.path().join("data").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let ca = std::fs::read(dir.path().join("data/tenant-ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(handle.local_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        connector.connect(name, tcp),
    )
    .await
    .unwrap()
    .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(
        b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut out),
    )
    .await
    .unwrap()
    .ok();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"openapi\":\"3.1.0\""));
    handle.shutdown().await;
}

#[tokio::test]
async fn the_tenant_file_loads_in_the_brokers_tenant_directory() {
    let api = start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("default.toml"), api.handle.tenant_file()).unwrap();
    let outcome = beckon_identity::TenantDirectory::load(dir.path());
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    let tenant = outcome.directory.get("default").expect("tenant loaded");
    assert_eq!(tenant.token_keys.len(), 1);
    assert_eq!(tenant.ca_certificates.len(), 1);
}

#[tokio::test]
async fn live_call_updates_stream_as_server_sent_events_and_overdue_calls_expire() {
    use beckon_console::model::{CallState, CallTarget, now_ms};
    use beckon_console::store::NewCall;
    use futures_util::StreamExt;
    let api = start().await;
    let (_, t) = api
        .call("POST", "/api/v1/enrollment-tokens", Some(json!({})))
        .await;
    let (s, _) = api
        .enroll_unauthenticated(json!({"token": t["token"], "agent_id": "pc-1", "csr": csr()}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // A call that expires in half a second (the API's minimum is 10 s), made in the store.
    let (call, _) = api
        .handle
        .state
        .store
        .run(|s| {
            let now = now_ms();
            let mut n = 0;
            s.create_call(
                NewCall {
                    id: "c-short".into(),
                    created_by: "test".into(),
                    reason: "r".into(),
                    action: None,
                    target: CallTarget::Agents(vec!["pc-1".into()]),
                    expires_at: now + 500,
                    spread: None,
                    default_spread: (50, 60),
                },
                now,
                &mut || {
                    n += 1;
                    format!("w{n}")
                },
            )
        })
        .await
        .unwrap();
    let req = Request::builder()
        .uri(format!("/api/v1/calls/{}/events", call.id))
        .header("authorization", format!("Bearer {}", api.token))
        .body(Body::empty())
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.into_body().into_data_stream();
    // Without a broker the call stays queued, then the dispatcher's sweep expires it.
    let frame = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&frame);
    assert!(text.contains("event: delivery"), "{text}");
    assert!(text.contains(r#""state":"expired""#), "{text}");
    assert!(text.contains(r#""agent_id":"pc-1""#), "{text}");
    let (_, got) = api.call("GET", "/api/v1/calls/c-short", None).await;
    assert_eq!(got["deliveries"][0]["state"], CallState::Expired.as_str());
}

/// A browser left on a live call page must not hold the console open: shutting down ends the
/// event streams, and the web UI is served by the same listener.
#[tokio::test]
async fn shutdown_ends_open_event_streams_and_the_ui_is_served_on_the_api_port() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let api = start().await;
    let addr = api.handle.local_addr;
    let token = api.token.clone();

    let mut page = tokio::net::TcpStream::connect(addr).await.unwrap();
    page.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), page.read_to_string(&mut text))
        .await
        .expect("the page within 10 s")
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text:.200}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'")
    );
    assert!(text.contains("/ui/app.js"));

    let mut sse = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /api/v1/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    sse.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sse.read(&mut buf))
        .await
        .expect("the stream's headers within 10 s")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.contains("text/event-stream"), "{head}");

    let Api {
        handle, dir: _dir, ..
    } = api;
    let stop = tokio::spawn(handle.shutdown());
    // The stream ends (EOF) instead of staying open until the shutdown gives up.
    let ended = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match sse.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the event stream stayed open after shutdown");
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("shutdown within 10 s")
        .unwrap();
}

#[tokio::test]
async fn a_password_hash_of_the_first_format_is_rewritten_as_phc_at_the_next_login() {
    use argon2::{Argon2, PasswordHash, PasswordVerifier};
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD_NO_PAD;

    let api = start().await;
    // A user stored by an older console: `argon2id$<salt>$<hash>`, default parameters.
    let salt = [42u8; 16];
    let mut out = [0u8; 32];
    Argon2::default()
        .hash_password_into(b"an old long password", &salt, &mut out)
        .unwrap();
    let old = format!(
        "argon2id${}${}",
        STANDARD_NO_PAD.encode(salt),
        STANDARD_NO_PAD.encode(out)
    );
    let stored = old.clone();
    api.handle
        .state
        .store
        .run(move |s| s.create_user("veteran", &stored, beckon_console::model::Role::Admin, 0))
        .await
        .unwrap();
    let login = |pw: &str| login("veteran", pw);
    let (s, _, _) = api.raw(login("not the password")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let read = || api.handle.state.store.run(|s| s.password_hash("veteran"));
    assert_eq!(
        read().await.unwrap(),
        old,
        "a wrong password changes nothing"
    );

    let (s, _, body) = api.raw(login("an old long password")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let upgraded = read().await.unwrap();
    assert!(
        upgraded.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{upgraded}"
    );
    let parsed = PasswordHash::new(&upgraded).unwrap();
    Argon2::default()
        .verify_password(b"an old long password", &parsed)
        .unwrap();
    // And the user still logs in with it.
    let (s, _, body) = api.raw(login("an old long password")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(read().await.unwrap(), upgraded, "a PHC hash stays as it is");
}

#[tokio::test]
async fn a_calls_deliveries_are_read_in_pages_by_state_and_bad_queries_are_refused() {
    let api = start().await;
    let secret = api.enrollment_token(json!({"max_uses": 0})).await;
    for id in ["a1", "a2", "a3", "a4", "a5"] {
        let (s, _) = api
            .enroll_unauthenticated(json!({"token": secret, "agent_id": id, "csr": csr()}))
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, c) = api
        .create_call(json!({"target": "all", "reason": "pages"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let id = c["id"].as_str().unwrap();
    // The call's page: its counts, the first page of deliveries, no next page for five.
    let got = api.get_call(id).await;
    assert_eq!(got["counts"], json!({"queued": 5}));
    assert_eq!(got["deliveries"].as_array().unwrap().len(), 5);
    assert_eq!(got["next_after"], Value::Null);

    let mut seen = Vec::new();
    let mut path = format!("/api/v1/calls/{id}/deliveries?limit=2");
    loop {
        let (s, page) = api.call("GET", &path, None).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let list = page["deliveries"].as_array().unwrap();
        assert!(list.len() <= 2);
        seen.extend(
            list.iter()
                .map(|d| d["agent_id"].as_str().unwrap().to_owned()),
        );
        match page["next_after"].as_str() {
            Some(next) => path = format!("/api/v1/calls/{id}/deliveries?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ["a1", "a2", "a3", "a4", "a5"]);
    let (_, queued) = api
        .call(
            "GET",
            &format!("/api/v1/calls/{id}/deliveries?state=queued&after=a3"),
            None,
        )
        .await;
    let ids: Vec<&str> = queued["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a4", "a5"]);
    let (_, none) = api
        .call(
            "GET",
            &format!("/api/v1/calls/{id}/deliveries?state=finished"),
            None,
        )
        .await;
    assert_eq!(none, json!({"deliveries": [], "next_after": null}));
    // A limit above the most reads as the most.
    let (s, _) = api
        .call(
            "GET",
            &format!("/api/v1/calls/{id}/deliveries?limit=1000000"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    for (query, says) in [
        ("state=done", "state"),
        ("after=a%2Fb", "after must be an agent id"),
        ("after=", "after must be an agent id"),
        ("limit=0", "limit must be 1 to 5000"),
        ("limit=-1", "limit"),
        ("page=2", "page"),
    ] {
        let (s, err) = api
            .call(
                "GET",
                &format!("/api/v1/calls/{id}/deliveries?{query}"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {err}");
        let text = err["error"].as_str().unwrap();
        assert!(text.contains(says), "{query}: {text}");
    }
    let (s, _) = api.call("GET", "/api/v1/calls/nope/deliveries", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
