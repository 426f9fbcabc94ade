//! Wake-on-LAN: send magic packets to an agent now, and its history.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::json;

use super::*;
use crate::model::*;
use crate::{AppState, dispatch};

// --- Wake-on-LAN ---

pub(super) async fn wol_now(
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

pub(super) async fn wol_history(
    State(st): State<AppState>,
    _a: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<WolSend>>> {
    let i = id.clone();
    st.store.run(move |s| s.agent(&i)).await?;
    Ok(Json(st.store.run(move |s| s.wol_sends(&id, 100)).await?))
}
