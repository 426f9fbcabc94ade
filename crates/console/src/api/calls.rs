//! Wake-up calls and their live events (server-sent events).

use std::convert::Infallible;

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;
use crate::model::*;
use crate::store::{
    DEFAULT_DELIVERY_PAGE, DeliveryPage, DeliveryQuery, MAX_DELIVERY_PAGE, NewCall,
};
use crate::{AppState, dispatch};

/// Agents of a call read per store trip when its Wake-on-LAN goes out: the first machines are
/// woken before the rest are read.
const WOL_AGENTS_PER_READ: usize = 1024;
/// Machines of a call woken at once: each takes `wol.repeats` packets 50 ms apart per MAC and
/// destination, so one after the other a call to 40,000 sleeping machines took over an hour.
const WOL_AT_ONCE: usize = 64;

// --- Wake-up calls ---

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewCallRequest {
    target: CallTarget,
    #[serde(default)]
    reason: String,
    action: Option<String>,
    expires_in_secs: Option<u32>,
    spread_secs: Option<u32>,
    /// Also send Wake-on-LAN to the addressed agents that are not online.
    #[serde(default)]
    wake_on_lan: bool,
}

/// A call just made.
#[derive(Serialize, JsonSchema)]
pub(super) struct CreatedCall {
    #[serde(flatten)]
    call: WakeCall,
    /// How many agents it addresses (the call's `targeted`). A call to more agents than
    /// one chunk (4,096) answers once its first chunk is recorded and its wake-ups are on
    /// their way: its counts then add up to fewer and grow as the rest is recorded.
    agents: usize,
}

pub(super) async fn create_call(
    a: Operator,
    Body(req): Body<NewCallRequest>,
) -> ApiResult<(StatusCode, Json<CreatedCall>)> {
    check_text(
        "reason",
        &req.reason,
        0,
        beckon_identity::wakeup::MAX_TEXT_LEN,
    )?;
    if let Some(a) = &req.action {
        check_text("action", a, 1, beckon_identity::wakeup::MAX_TEXT_LEN)?;
    }
    match &req.target {
        CallTarget::Agents(ids) if ids.is_empty() => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "target.agents is empty: name at least one agent id",
            ));
        }
        CallTarget::Agents(ids) if ids.len() > 100_000 => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "target.agents: at most 100000 ids; use a group or all",
            ));
        }
        CallTarget::Group(g) => check_group_name(g)?,
        _ => {}
    }
    let settings = a.run(|s| s.settings()).await?;
    let expiry = req
        .expires_in_secs
        .unwrap_or(settings.wakeup.default_expiry_secs);
    if !(10..=crate::settings::MAX_EXPIRY_SECS).contains(&expiry) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "expires_in_secs must be 10 to {}",
                crate::settings::MAX_EXPIRY_SECS
            ),
        ));
    }
    if req
        .spread_secs
        .is_some_and(|s| s > beckon_identity::wakeup::MAX_SPREAD_SECS)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "spread_secs must be at most 86400",
        ));
    }
    let now = now_ms();
    let call = NewCall {
        id: uuid::Uuid::now_v7().hyphenated().to_string(),
        created_by: a.who.name.clone(),
        reason: req.reason,
        action: req.action,
        target: req.target,
        expires_at: now + i64::from(expiry) * 1000,
        spread: req.spread_secs,
        default_spread: (
            settings.wakeup.spread_from_agents,
            settings.wakeup.spread_secs,
        ),
    };
    let (call, deliveries, targeted) = a
        .run(move |s| s.create_call_with_target(call, now, &mut dispatch::next_wakeup_id))
        .await?;
    a.st.metrics.call_made(deliveries.len());
    a.audit("call.create", json!({"id": call.id, "target": call.target}))
        .await;
    // Waits while the dispatcher's queue is full: the call is recorded, and a request that
    // waits here is the backpressure on the callers.
    let _ =
        a.st.dispatch
            .send(dispatch::Command::Publish(call.clone(), deliveries.clone()))
            .await;
    if targeted.len() > deliveries.len() {
        // The rest of a large call is recorded a chunk at a time, each sent as it commits.
        a.st.recording.notify_one();
    }
    if req.wake_on_lan {
        let st2 = a.st.clone();
        let call_id = call.id.clone();
        let ids = targeted.clone();
        tokio::spawn(async move {
            let wol = match st2.store.run(|s| s.settings()).await {
                Ok(settings) => settings.wol,
                Err(e) => {
                    tracing::warn!(error = %e, call = %call_id, "reading the Wake-on-LAN settings failed: no machine of the call is woken by Wake-on-LAN");
                    return;
                }
            };
            // A thousand agents per store trip, of which only those not online are read.
            for part in ids.chunks(WOL_AGENTS_PER_READ) {
                let part = part.to_vec();
                let asleep = match st2.store.run(move |s| s.agents_not_online(&part)).await {
                    Ok(asleep) => asleep,
                    Err(e) => {
                        tracing::warn!(error = %e, call = %call_id, "reading the agents to wake by Wake-on-LAN failed: some get none");
                        continue;
                    }
                };
                let (st2, call_id, wol) = (&st2, &call_id, &wol);
                futures_util::stream::iter(asleep)
                    .for_each_concurrent(WOL_AT_ONCE, |agent| async move {
                        let _ =
                            dispatch::wake_on_lan(st2, &agent, Some(call_id.clone()), wol).await;
                    })
                    .await;
            }
        });
    }
    let agents = targeted.len();
    Ok((StatusCode::CREATED, Json(CreatedCall { call, agents })))
}

pub(super) async fn list_calls(
    a: Viewer,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Vec<WakeCall>>> {
    let limit = check_limit(q.limit, 50)?;
    Ok(Json(a.run(move |s| s.list_calls(limit)).await?))
}

/// A call with its counts and the first page of where it stands for each agent.
#[derive(Serialize, JsonSchema)]
pub(super) struct CallWithDeliveries {
    #[serde(flatten)]
    call: WakeCall,
    /// The first agents addressed, in agent id order (at most 500): the counts say how many
    /// there are in all, `GET /api/v1/calls/{id}/deliveries` gives the rest.
    deliveries: Vec<CallDelivery>,
    /// The agent id to pass as `after` to `GET /api/v1/calls/{id}/deliveries` for the next
    /// page; `null` when `deliveries` holds every agent.
    next_after: Option<String>,
}

pub(super) async fn get_call(
    a: Viewer,
    Path(id): Path<String>,
) -> ApiResult<Json<CallWithDeliveries>> {
    let (call, page) = a
        .run(move |s| {
            let first = DeliveryQuery {
                limit: DEFAULT_DELIVERY_PAGE,
                ..Default::default()
            };
            Ok((s.call(&id)?, s.call_deliveries(&id, &first)?))
        })
        .await?;
    Ok(Json(CallWithDeliveries {
        call,
        deliveries: page.deliveries,
        next_after: page.next_after,
    }))
}

/// Which of a call's deliveries to list.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DeliveriesQuery {
    /// Only deliveries in this state.
    state: Option<CallState>,
    /// Only agents whose id sorts after this one: the `next_after` of the page before.
    after: Option<String>,
    /// How many at most: 500 when absent; above 5000 reads as 5000.
    limit: Option<u32>,
}

impl DeliveriesQuery {
    /// The store's query, or why the parameters are refused.
    pub(super) fn checked(self) -> Result<DeliveryQuery, ApiError> {
        if let Some(after) = &self.after {
            beckon_identity::validate_id(after)
                .map_err(|e| ApiError::bad_request(format!("after must be an agent id: {e}")))?;
        }
        if self.limit == Some(0) {
            return Err(ApiError::bad_request(format!(
                "limit must be 1 to {MAX_DELIVERY_PAGE}"
            )));
        }
        Ok(DeliveryQuery {
            state: self.state,
            after: self.after,
            limit: self
                .limit
                .unwrap_or(DEFAULT_DELIVERY_PAGE)
                .min(MAX_DELIVERY_PAGE),
        })
    }
}

pub(super) async fn call_deliveries(
    a: Viewer,
    Path(id): Path<String>,
    Query(q): Query<DeliveriesQuery>,
) -> ApiResult<Json<DeliveryPage>> {
    let query = q.checked()?;
    Ok(Json(a.run(move |s| s.call_deliveries(&id, &query)).await?))
}

pub(super) fn event_stream(
    st: &AppState,
    call_id: Option<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let rx = st.events.subscribe();
    let stop = st.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (rx, call_id, stop),
        |(mut rx, call_id, mut stop)| async move {
            loop {
                // The stream ends when the console stops, so that shutdown does not wait for
                // browsers to go away.
                let received = tokio::select! {
                    r = rx.recv() => r,
                    _ = dispatch::stopped(&mut stop) => return None,
                };
                match received {
                    Ok(ev) => {
                        if call_id.as_ref().is_some_and(|c| *c != ev.call_id) {
                            continue;
                        }
                        let data = serde_json::to_string(&ev).unwrap_or_default();
                        return Some((
                            Ok(Event::default().event("delivery").data(data)),
                            (rx, call_id, stop),
                        ));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let data = json!({"missed": n}).to_string();
                        return Some((
                            Ok(Event::default().event("lagged").data(data)),
                            (rx, call_id, stop),
                        ));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

pub(super) async fn call_events(a: Viewer, Path(id): Path<String>) -> ApiResult<Response> {
    let i = id.clone();
    a.run(move |s| s.call(&i)).await?;
    Ok(event_stream(&a.st, Some(id)).into_response())
}

pub(super) async fn all_events(a: Viewer) -> Response {
    event_stream(&a.st, None).into_response()
}
