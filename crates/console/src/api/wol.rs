//! Wake-on-LAN: send magic packets to an agent now, and its history.

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use serde_json::json;

use super::*;
use crate::dispatch;
use crate::model::*;

// --- Wake-on-LAN ---

pub(super) async fn wol_now(a: Operator, Path(id): Path<String>) -> ApiResult<Json<Vec<WolSend>>> {
    let agent = a.run(move |s| s.agent(&id)).await?;
    if agent.revoked {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("agent {:?} was revoked", agent.id),
        ));
    }
    let wol = a.run(|s| s.settings()).await?.wol;
    let sends = dispatch::wake_on_lan(&a.st, &agent, None, &wol).await?;
    if sends.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "agent {:?} has no MAC address or no destination: it reports MACs at check-in; add Wake-on-LAN addresses in the settings",
                agent.id
            ),
        ));
    }
    a.audit("agent.wol", json!({"id": agent.id})).await;
    Ok(Json(sends))
}

pub(super) async fn wol_history(
    a: Viewer,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<WolSend>>> {
    let i = id.clone();
    a.run(move |s| s.agent(&i)).await?;
    Ok(Json(a.run(move |s| s.wol_sends(&id, 100)).await?))
}
