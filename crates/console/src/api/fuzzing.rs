//! Entry point of the console's fuzz target in `fuzz/` (feature "fuzzing"); not part of the
//! API: a request body (or query string) of arbitrary bytes through the extractor of each
//! route's request type, as the router runs it.

use axum::body::Body as HttpBody;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::de::DeserializeOwned;

use super::agents::{AgentQuery, AgentUpdate, NewGroup};
use super::auth::{LoginRequest, PasswordChange};
use super::calls::{DeliveriesQuery, NewCallRequest};
use super::enrollment::{
    CheckinRequest, EnrollRequest, NewEnrollmentTokenRequest, RenewRequest, check_inventory,
};
use super::tokens::NewApiTokenRequest;
use super::users::NewUserRequest;
use super::{ApiError, Body, LimitQuery, Query};
use crate::model::Inventory;
use crate::settings::Settings;

/// The first byte picks the request type; the rest is the body (or the query string).
pub async fn api_bodies(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % 17 {
        0 => read::<LoginRequest>(body).await.map(drop),
        1 => read::<NewUserRequest>(body).await.map(drop),
        2 => read::<PasswordChange>(body).await.map(drop),
        3 => read::<AgentUpdate>(body).await.map(drop),
        4 => read::<NewGroup>(body).await.map(drop),
        5 => read::<NewCallRequest>(body).await.map(drop),
        6 => read::<NewEnrollmentTokenRequest>(body).await.map(drop),
        7 => read::<EnrollRequest>(body).await.map(drop),
        8 => read::<RenewRequest>(body).await.map(drop),
        9 => read::<CheckinRequest>(body).await.map(drop),
        10 => read::<NewApiTokenRequest>(body).await.map(drop),
        11 => match read::<Settings>(body).await {
            Ok(settings) => {
                let _ = settings.validate();
                Ok(())
            }
            Err(e) => Err(e),
        },
        12 => read::<Inventory>(body)
            .await
            .and_then(|inventory| check_inventory(&inventory)),
        13 => query::<AgentQuery>(body).await,
        14 => query::<LimitQuery>(body).await,
        15 => match parsed_query::<DeliveriesQuery>(body).await {
            Some(Ok(q)) => q.checked().map(|q| {
                assert!((1..=crate::store::MAX_DELIVERY_PAGE).contains(&q.limit));
            }),
            Some(Err(e)) => Err(e),
            None => Ok(()),
        },
        // Without the JSON content type: refused before the body is read.
        _ => {
            let request = Request::post("/api/v1/login")
                .body(HttpBody::from(body.to_vec()))
                .expect("a request");
            let refused = Body::<LoginRequest>::from_request(request, &()).await.err();
            let refused = refused.expect("a body without its content type is refused");
            assert_eq!(refused.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
            Err(refused)
        }
    }
    .map_or_else(answered, drop);
}

/// A refusal is the client's fault, says why, and turns into a JSON answer.
fn answered(e: ApiError) {
    assert!(
        matches!(e.status.as_u16(), 400 | 413 | 415 | 422),
        "{}: {}",
        e.status,
        e.message
    );
    assert!(!e.message.is_empty());
    let response = e.into_response();
    assert!(response.status().is_client_error());
}

async fn read<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let request = Request::post("/api/v1/fuzz")
        .header("content-type", "application/json")
        .body(HttpBody::from(body.to_vec()))
        .expect("a request");
    Body::<T>::from_request(request, &()).await.map(|Body(v)| v)
}

async fn query<T: DeserializeOwned>(text: &[u8]) -> Result<(), ApiError> {
    parsed_query::<T>(text)
        .await
        .map_or(Ok(()), |r| r.map(drop))
}

/// The query string `text` through the API's extractor; `None` for bytes a client could not
/// send in a request line (refused before the API sees them).
async fn parsed_query<T: DeserializeOwned>(text: &[u8]) -> Option<Result<T, ApiError>> {
    let uri = format!("/api/v1/agents?{}", String::from_utf8_lossy(text));
    let request = Request::get(uri).body(HttpBody::empty()).ok()?;
    let (mut parts, _) = request.into_parts();
    Some(
        Query::<T>::from_request_parts(&mut parts, &())
            .await
            .map(|Query(v)| v),
    )
}
