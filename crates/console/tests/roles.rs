//! Roles: every route refuses (403, naming the role) a caller without the role the OpenAPI
//! document says it needs; admins manage users and roles, every change audited; a token is
//! held to its creator's role; a database from before roles keeps its users as admins.

mod common;

use axum::http::StatusCode;
use beckon_console::model::Role;
use common::{Api, login, request, session_cookie, with_cookie};
use serde_json::{Value, json};
use tower::ServiceExt;

async fn start() -> Api {
    common::start_with(|_| {}).await
}

/// Status and, unless it is a live event stream, the JSON body of `method path` as `auth`.
async fn status_of(
    api: &Api,
    method: &str,
    path: &str,
    auth: &str,
    body: bool,
) -> (StatusCode, Value) {
    let req = request(method, path, Some(auth), body.then(|| "{}".to_owned()));
    let resp = api.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    if resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "text/event-stream")
    {
        return (status, Value::Null);
    }
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn each_route_refuses_a_caller_without_its_role_with_a_403_naming_it() {
    let api = start().await;
    let mut tokens = Vec::new();
    for role in Role::ALL {
        let secret = api
            .handle
            .create_api_token_with_role(role.as_str(), role)
            .await
            .unwrap();
        tokens.push((role, format!("Bearer {secret}")));
    }
    let (_, doc) = api.call_as("GET", "/api/v1/openapi.json", None, None).await;
    let mut refused = [0; 3];
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let Some(needs) = op["x-beckon-role"].as_str() else {
                assert!(
                    op["security"].is_null(),
                    "{method} {path} needs login but names no role"
                );
                continue;
            };
            let needs = Role::parse(needs).unwrap();
            let uri = path.replace("{id}", "x").replace("{name}", "x");
            let body = op["requestBody"].is_object();
            for (role, auth) in &tokens {
                let (status, answer) =
                    status_of(&api, &method.to_uppercase(), &uri, auth, body).await;
                if *role < needs {
                    assert_eq!(
                        status,
                        StatusCode::FORBIDDEN,
                        "{role:?}: {method} {path}: {answer}"
                    );
                    let error = answer["error"].as_str().unwrap();
                    assert!(
                        error.contains(&format!("this needs the {} role", needs.as_str())),
                        "{method} {path}: {error}"
                    );
                    assert_eq!(answer["needs_role"], needs.as_str());
                    assert_eq!(answer["role"], role.as_str());
                    refused[*role as usize] += 1;
                } else if path != "/api/v1/account/password" {
                    // (API tokens have no password: that route refuses them for that reason.)
                    assert_ne!(
                        status,
                        StatusCode::FORBIDDEN,
                        "{role:?}: {method} {path}: {answer}"
                    );
                }
            }
        }
    }
    // Viewers are refused every change; operators only what is not waking.
    assert!(refused[0] >= 14, "{refused:?}");
    assert!(refused[1] >= 12 && refused[1] < refused[0], "{refused:?}");
    assert_eq!(refused[2], 0);
}

/// `method path` with the session `cookie` and an optional JSON body: status and body.
async fn as_session(
    api: &Api,
    method: &str,
    path: &str,
    cookie: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (status, _, body) = api.raw(with_cookie(method, path, cookie, body)).await;
    (status, body)
}

async fn log_in(api: &Api, user: &str, password: &str) -> String {
    let (s, headers, body) = api.raw(login(user, password)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    session_cookie(&headers)
}

#[tokio::test]
async fn admins_create_users_with_roles_and_change_them_audited() {
    let api = start().await;
    let user = |name: &str, role: Option<&str>| {
        let mut body = json!({"name": name, "password": format!("{name}'s long password")});
        if let Some(r) = role {
            body["role"] = json!(r);
        }
        body
    };
    let (s, v) = api
        .call("POST", "/api/v1/users", Some(user("vera", None)))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["role"], "viewer",
        "a user made without a role is a viewer"
    );
    let (s, v) = api
        .call(
            "POST",
            "/api/v1/users",
            Some(user("otto", Some("operator"))),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = api
        .call("POST", "/api/v1/users", Some(user("x", Some("root"))))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["error"].as_str().unwrap().contains("root"), "{v}");

    let vera = log_in(&api, "vera", "vera's long password").await;
    let otto = log_in(&api, "otto", "otto's long password").await;
    let (_, me) = as_session(&api, "GET", "/api/v1/account", &vera, None).await;
    assert_eq!(me, json!({"name": "user:vera", "role": "viewer"}));

    // A viewer reads but does not wake; an operator wakes but does not change settings.
    let call = json!({"target": {"agents": ["nobody"]}});
    let (s, v) = as_session(&api, "POST", "/api/v1/calls", &vera, Some(call.clone())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("this needs the operator role")
    );
    let (s, _) = as_session(&api, "GET", "/api/v1/calls", &vera, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = as_session(&api, "POST", "/api/v1/calls", &otto, Some(call.clone())).await;
    assert_ne!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = as_session(
        &api,
        "PATCH",
        "/api/v1/users/vera",
        &otto,
        Some(json!({"role": "admin"})),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "an operator does not promote: {v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("this needs the admin role")
    );

    // Promoted, vera's open session may wake at once.
    let (s, v) = api
        .call(
            "PATCH",
            "/api/v1/users/vera",
            Some(json!({"role": "operator"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = as_session(&api, "POST", "/api/v1/calls", &vera, Some(call)).await;
    assert_ne!(s, StatusCode::FORBIDDEN, "{v}");
    let (_, users) = api.call("GET", "/api/v1/users", None).await;
    let roles: Vec<(&str, &str)> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["name"].as_str().unwrap(), u["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [
            ("admin", "admin"),
            ("otto", "operator"),
            ("vera", "operator")
        ]
    );
    let (s, _) = api
        .call(
            "PATCH",
            "/api/v1/users/nobody",
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The only admin stays admin.
    let (s, v) = api
        .call(
            "PATCH",
            "/api/v1/users/admin",
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["error"].as_str().unwrap().contains("only admin"), "{v}");

    let (_, audit) = api.call("GET", "/api/v1/audit", None).await;
    let has = |what: &str, detail: Value| {
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["what"] == what && e["detail"] == detail && e["who"] == "token:tests")
    };
    assert!(
        has("user.create", json!({"name": "vera", "role": "viewer"})),
        "{audit}"
    );
    assert!(
        has("user.create", json!({"name": "otto", "role": "operator"})),
        "{audit}"
    );
    assert!(
        has(
            "user.role",
            json!({"name": "vera", "old": "viewer", "new": "operator"})
        ),
        "{audit}"
    );
}

#[tokio::test]
async fn an_api_token_is_held_to_its_creators_role() {
    let api = start().await;
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/users",
            Some(json!({"name": "ada", "password": "ada's long password", "role": "admin"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let ada = log_in(&api, "ada", "ada's long password").await;
    let (s, made) = as_session(
        &api,
        "POST",
        "/api/v1/api-tokens",
        &ada,
        Some(json!({"name": "ci"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    assert_eq!(
        made["role"], "admin",
        "a token takes its creator's role by default"
    );
    let ci = format!("Bearer {}", made["token"].as_str().unwrap());
    let (s, made) = as_session(
        &api,
        "POST",
        "/api/v1/api-tokens",
        &ada,
        Some(json!({"name": "monitor", "role": "viewer"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let monitor = format!("Bearer {}", made["token"].as_str().unwrap());
    let (s, v) = api
        .call_as("PUT", "/api/v1/settings", Some(json!({})), Some(&monitor))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (_, listed) = api.call("GET", "/api/v1/api-tokens", None).await;
    let monitor_row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "monitor")
        .unwrap();
    assert_eq!(monitor_row["role"], "viewer");
    assert_eq!(monitor_row["created_by"], "user:ada");

    // Ada demoted: her admin token is a viewer's now.
    let (s, _) = api
        .call(
            "PATCH",
            "/api/v1/users/ada",
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = api.call_as("GET", "/api/v1/account", None, Some(&ci)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"name": "token:ci", "role": "viewer"}));
    let (s, v) = api
        .call_as("DELETE", "/api/v1/agents/x", None, Some(&ci))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // And as a viewer she makes no token above her role.
    let (s, v) = as_session(
        &api,
        "POST",
        "/api/v1/api-tokens",
        &ada,
        Some(json!({"name": "more", "role": "admin"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
}

/// Not async: PostgreSQL's synchronous client may not run on a runtime's thread.
#[test]
fn users_of_a_database_from_before_roles_become_admins() {
    use beckon_console::store::*;

    let dir = tempfile::tempdir().unwrap();
    let url = common::reopenable_database(dir.path());
    let open = common::open_store;
    let store = open(&url);
    store.create_user("old", "hash", Role::Viewer, 1).unwrap();
    drop(store);
    // Back to the schema before roles, as an older console left it (without what came
    // after roles: several consoles' leases, sessions' last use, failed authentications,
    // and what the versions from the calls' kept counts on added).
    common::step_back_before(&url, 8);
    let undo = "DROP TABLE auth_failures; \
                DROP INDEX calls_expires_at; ALTER TABLE calls DROP COLUMN dispatcher; \
                ALTER TABLE agents DROP COLUMN previous_inventory; \
                ALTER TABLE agents DROP COLUMN inventory_changed_at; \
                ALTER TABLE agents DROP COLUMN clone_detected_at; \
                DROP TABLE console_leases; ALTER TABLE sessions DROP COLUMN last_used_at; \
                ALTER TABLE users DROP COLUMN role; ALTER TABLE api_tokens DROP COLUMN role; \
                ALTER TABLE api_tokens DROP COLUMN created_by;";
    let expected = match &url {
        DatabaseUrl::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute_batch(&format!("{undo} PRAGMA user_version = 3;"))
                .unwrap();
            SCHEMA_VERSION
        }
        DatabaseUrl::Postgres(u) => {
            let u = u.clone();
            std::thread::spawn(move || {
                let mut client = postgres::Client::connect(&u, postgres::NoTls).unwrap();
                client
                    .batch_execute(&format!("{undo} UPDATE schema_version SET version = 1;"))
                    .unwrap();
            })
            .join()
            .unwrap();
            POSTGRES_SCHEMA_VERSION
        }
    };
    let store = open(&url);
    assert_eq!(store.schema_version().unwrap(), expected);
    let users = store.list_users().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(
        (users[0].name.as_str(), users[0].role),
        ("old", Role::Admin)
    );
}
