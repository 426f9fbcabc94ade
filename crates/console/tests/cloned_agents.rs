//! Cloned identities through the API (on SQLite, and on PostgreSQL when the suite runs there):
//! two machines checking in by turns after takeovers flag the agent with both machines and the
//! fix, listed under `cloned=true` and audited; a machine that changes without takeovers is not
//! flagged; an admin clears the flag (a viewer may not), audited too.

mod common;

use axum::http::StatusCode;
use beckon_console::model::Role;
use common::Api;
use serde_json::{Value, json};

fn machine(hostname: &str, mac: &str) -> Value {
    json!({"hostname": hostname, "os": "Debian GNU/Linux 13 (trixie)", "macs": [mac],
           "addresses": [{"address": "10.0.0.7", "prefix_len": 24}]})
}

/// Checks `id` in as its agent does after being taken over (or not) on `inventory`.
async fn checkin(api: &Api, id: &str, token: &str, inventory: Value, taken_over: bool) {
    let body = json!({"agent_id": id, "inventory": inventory, "taken_over": taken_over});
    let (s, v) = api
        .call_as(
            "POST",
            &format!("/api/v1/agents/{id}/checkin"),
            Some(body),
            Some(&format!("Bearer {token}")),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

async fn cloned_ids(api: &Api) -> Vec<String> {
    let (s, v) = api.call("GET", "/api/v1/agents?cloned=true", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn audited(api: &Api, what: &str) -> Vec<Value> {
    let (_, log) = api.call("GET", "/api/v1/audit", None).await;
    log.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == what)
        .cloned()
        .collect()
}

#[tokio::test]
async fn two_machines_taking_turns_are_flagged_listed_audited_and_cleared() {
    let api = common::start_with(|_| {}).await;
    let (a, b) = (
        machine("pc-a", "02:00:00:00:00:0a"),
        machine("pc-b", "02:00:00:00:00:0b"),
    );
    let twin = api.enroll("twin", a.clone()).await;
    let twin_token = twin["checkin_token"].as_str().unwrap().to_owned();
    let docked = api.enroll("laptop", a.clone()).await;
    let laptop_token = docked["checkin_token"].as_str().unwrap().to_owned();

    // A laptop's network cards come and go (a docking station); nobody takes its session.
    let mut with_dock = a.clone();
    with_dock["macs"] = json!(["02:00:00:00:00:0a", "02:00:00:00:00:0d"]);
    for inv in [&with_dock, &a, &with_dock, &a] {
        checkin(&api, "laptop", &laptop_token, inv.clone(), false).await;
    }
    // The clone: pc-b takes the session, pc-a checks in, and back.
    checkin(&api, "twin", &twin_token, b.clone(), true).await;
    let (_, agent) = api.call("GET", "/api/v1/agents/twin", None).await;
    assert!(agent["cloned"].is_null(), "one change is no clone: {agent}");
    checkin(&api, "twin", &twin_token, a.clone(), true).await;
    assert_eq!(cloned_ids(&api).await, ["twin"]);

    let (_, agent) = api.call("GET", "/api/v1/agents/twin", None).await;
    let cloned = &agent["cloned"];
    assert!(cloned["detected_at"].is_i64(), "{agent}");
    let hosts: Vec<&str> = cloned["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["pc-a", "pc-b"], "last one first: {agent}");
    assert_eq!(cloned["machines"][1]["macs"], json!(["02:00:00:00:00:0b"]));
    assert!(
        cloned["fix"]
            .as_str()
            .unwrap()
            .contains("beckon agent enroll --force"),
        "{agent}"
    );
    // More turns keep both machines and are audited once.
    checkin(&api, "twin", &twin_token, b.clone(), true).await;
    let (_, agent) = api.call("GET", "/api/v1/agents/twin", None).await;
    assert_eq!(agent["cloned"]["machines"][0]["hostname"], "pc-b");
    assert_eq!(agent["cloned"]["machines"][1]["hostname"], "pc-a");
    let flagged = audited(&api, "agent.cloned").await;
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert_eq!(flagged[0]["who"], "agent:twin");
    assert_eq!(flagged[0]["detail"]["machines"], json!(["pc-a", "pc-b"]));

    // Only an admin clears the flag.
    let viewer = api
        .handle
        .create_api_token_with_role("monitor", Role::Viewer)
        .await
        .unwrap();
    let (s, _) = api
        .call_as(
            "DELETE",
            "/api/v1/agents/twin/clone",
            None,
            Some(&format!("Bearer {viewer}")),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, cleared) = api.call("DELETE", "/api/v1/agents/twin/clone", None).await;
    assert_eq!(s, StatusCode::OK, "{cleared}");
    assert!(cleared["cloned"].is_null(), "{cleared}");
    assert_eq!(cleared["hostname"], "pc-b", "the inventory stays");
    assert!(cloned_ids(&api).await.is_empty());
    assert_eq!(audited(&api, "agent.clone_cleared").await.len(), 1);
    let (s, _) = api
        .call("DELETE", "/api/v1/agents/nobody/clone", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The history went with the flag: one more change is no clone yet.
    checkin(&api, "twin", &twin_token, a.clone(), true).await;
    assert!(cloned_ids(&api).await.is_empty());
    api.handle.shutdown().await;
}
