//! Request extractors whose rejections are JSON `ApiError`s, so that a
//! malformed body, id or query gets the same clear 4xx as any other mistake.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::ApiError;

/// A JSON body that must be present.
pub struct JsonBody<T>(pub T);

/// A JSON body that may be absent (zero bytes or only white space).
pub struct OptionalJsonBody<T>(pub Option<T>);

/// How long a client may take to send a whole request body.
#[derive(Debug, Clone, Copy)]
pub struct BodyReadTimeout(pub Duration);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
    BodyReadTimeout: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let declared_json = declares_json(&request);
        let bytes = read_body(request, state).await?;
        if is_blank(&bytes) {
            return Err(ApiError::bad_request(
                "empty_body",
                "the request needs a JSON body",
            ));
        }
        if !declared_json {
            return Err(super::origin::unsupported_media_type());
        }
        parse(&bytes).map(JsonBody)
    }
}

impl<S, T> FromRequest<S> for OptionalJsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
    BodyReadTimeout: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let declared_json = declares_json(&request);
        let bytes = read_body(request, state).await?;
        if is_blank(&bytes) {
            return Ok(OptionalJsonBody(None));
        }
        if !declared_json {
            return Err(super::origin::unsupported_media_type());
        }
        parse(&bytes).map(|value| OptionalJsonBody(Some(value)))
    }
}

/// Whether the request says its body is JSON. A body without a type is
/// refused too: a web page can send one without asking the router first.
fn declares_json(request: &Request) -> bool {
    request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|value| super::origin::is_json(value.as_bytes()))
}

async fn read_body<S>(request: Request, state: &S) -> Result<Bytes, ApiError>
where
    S: Send + Sync,
    BodyReadTimeout: FromRef<S>,
{
    let BodyReadTimeout(limit) = BodyReadTimeout::from_ref(state);
    within(limit, Bytes::from_request(request, state))
        .await
        .map_err(|_elapsed| body_read_timed_out())?
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is larger than this route accepts",
                )
            } else {
                ApiError::bad_request("unreadable_body", rejection.body_text())
            }
        })
}

/// Runs `future` for at most `limit`. Most request bodies arrive with their
/// head, so the future is polled once before any timer is armed: the common
/// case costs no timer at all.
pub async fn within<F: Future>(
    limit: Duration,
    future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut future = std::pin::pin!(future);
    let first = std::future::poll_fn(|context| Poll::Ready(future.as_mut().poll(context))).await;
    match first {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => tokio::time::timeout(limit, future).await,
    }
}

/// The code and message when a client stops sending its body part way.
pub const BODY_READ_TIMEOUT: (&str, &str) = (
    "body_read_timeout",
    "the request body did not arrive in time",
);

/// The registry routes' answer to a body that did not arrive in time.
pub fn body_read_timed_out() -> ApiError {
    let (code, message) = BODY_READ_TIMEOUT;
    ApiError::new(StatusCode::REQUEST_TIMEOUT, code, message)
}

fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| {
        use serde_json::error::Category;
        match error.classify() {
            Category::Data => ApiError::unprocessable("invalid_body", error.to_string()),
            Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
                "invalid_json",
                format!("the body is not valid JSON: {error}"),
            ),
        }
    })
}

/// The `:id` path segment, parsed as an agent id.
pub struct AgentIdParam(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for AgentIdParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|rejection| ApiError::bad_request("invalid_id", rejection.body_text()))?;
        Uuid::parse_str(&raw).map(AgentIdParam).map_err(|_| {
            ApiError::bad_request("invalid_id", format!("{raw:?} is not an agent id (a UUID)"))
        })
    }
}
