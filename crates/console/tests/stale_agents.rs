//! Stale agents: not online and not seen for the setting `agents.stale_after_days` (default
//! 30). The API lists and counts them, and an admin removes them in one step. Last-seen times
//! are set in the database, as if the agents had been away that long.

mod common;

use axum::http::StatusCode;
use beckon_console::model::Role;
use common::Api;
use serde_json::{Value, json};

const DAY_MS: i64 = 24 * 3600 * 1000;

/// Sets when `id` was last seen (enrolled, checked in and changed presence) `days` ago, and
/// its presence.
fn seen(api: &Api, id: &str, days: i64, presence: &str) {
    let at = beckon_console::model::now_ms() - days * DAY_MS;
    let n = api.execute_sql(&format!(
        "UPDATE agents SET enrolled_at = {at}, last_checkin = {at}, presence_at = {at}, presence = '{presence}' WHERE id = '{id}'"
    ));
    assert_eq!(n, 1);
}

async fn stale_ids(api: &Api) -> Vec<String> {
    let (s, v) = api.call("GET", "/api/v1/agents?stale=true", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn stale_count(api: &Api) -> Value {
    let (_, status) = api.call("GET", "/api/v1/status", None).await;
    status["agents_stale"].clone()
}

#[tokio::test]
async fn agents_away_longer_than_the_setting_are_listed_counted_and_removed_in_one_step() {
    let api = common::start_with(|_| {}).await;
    let inv = json!({"hostname": "pc.example", "os": "Debian 13"});
    for id in [
        "gone-1",
        "gone-2",
        "online-old",
        "recent",
        "never-connected",
    ] {
        api.enroll(id, inv.clone()).await;
    }
    seen(&api, "gone-1", 40, "offline");
    seen(&api, "gone-2", 31, "unknown");
    seen(&api, "online-old", 90, "online");
    seen(&api, "recent", 29, "offline");
    assert_eq!(stale_ids(&api).await, ["gone-1", "gone-2"]);
    assert_eq!(stale_count(&api).await, 2);
    let (_, status) = api.call("GET", "/api/v1/status", None).await;
    assert_eq!(status["stale_after_days"], 30);

    // The setting decides.
    let (_, mut settings) = api.call("GET", "/api/v1/settings", None).await;
    assert_eq!(settings["agents"]["stale_after_days"], 30);
    settings["agents"]["stale_after_days"] = json!(35);
    let (s, v) = api
        .call("PUT", "/api/v1/settings", Some(settings.clone()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(stale_ids(&api).await, ["gone-1"]);
    assert_eq!(stale_count(&api).await, 1);
    settings["agents"]["stale_after_days"] = json!(0);
    let (s, v) = api
        .call("PUT", "/api/v1/settings", Some(settings.clone()))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("agents.stale_after_days"),
        "{v}"
    );
    settings["agents"]["stale_after_days"] = json!(30);
    api.call("PUT", "/api/v1/settings", Some(settings)).await;

    // Only an admin removes; the others see the list.
    let operator = api
        .handle
        .create_api_token_with_role("ops", Role::Operator)
        .await
        .unwrap();
    let ops = format!("Bearer {operator}");
    let stale = json!({"ids": stale_ids(&api).await});
    let (s, v) = api
        .call_as("GET", "/api/v1/agents?stale=true", None, Some(&ops))
        .await;
    assert_eq!((s, v.as_array().map(Vec::len)), (StatusCode::OK, Some(2)));
    let (s, v) = api
        .call_as(
            "POST",
            "/api/v1/agents/remove",
            Some(stale.clone()),
            Some(&ops),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(
        stale_ids(&api).await.len(),
        2,
        "a refused removal removes nothing"
    );

    let mut ids = stale.clone();
    ids["ids"]
        .as_array_mut()
        .unwrap()
        .push(json!("no-such-agent"));
    let (s, v) = api.call("POST", "/api/v1/agents/remove", Some(ids)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"removed": ["gone-1", "gone-2"], "not_found": ["no-such-agent"]})
    );
    assert!(stale_ids(&api).await.is_empty());
    assert_eq!(stale_count(&api).await, 0);
    let (_, left) = api.call("GET", "/api/v1/agents", None).await;
    let left: Vec<&str> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["never-connected", "online-old", "recent"]);
    let (_, gone) = api.call("GET", "/api/v1/agents/gone-1", None).await;
    assert_eq!(gone["revoked"], true);
    let (_, audit) = api.call("GET", "/api/v1/audit", None).await;
    for id in ["gone-1", "gone-2"] {
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["what"] == "agent.revoke" && e["detail"]["id"] == id),
            "{audit}"
        );
    }
    for bad in [json!({"ids": []}), json!({})] {
        let (s, v) = api.call("POST", "/api/v1/agents/remove", Some(bad)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    }
}
