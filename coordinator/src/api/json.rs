//! Request extractors whose rejections are JSON `ApiError`s, so that a
//! malformed body, id or query gets the same clear 4xx as any other mistake.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use bytes::BytesMut;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use uuid::Uuid;

use super::error::ApiError;
use super::REGISTRY_BODY_LIMIT;

/// A JSON body that must be present.
pub struct JsonBody<T>(pub T);

/// A JSON body that may be absent (zero bytes or only white space). It is
/// kept as bytes and parsed by the handler ([`OptionalJsonBody::parse`]),
/// so that what is parsed may borrow from the body rather than copy it.
pub struct OptionalJsonBody(Option<Bytes>);

impl OptionalJsonBody {
    /// The body as a `T`, or `None` when there was none.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<Option<T>, ApiError> {
        self.0.as_deref().map(parse).transpose()
    }
}

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

    /// As [`OptionalJsonBody`] reads it, with an absent body refused.
    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match OptionalJsonBody::from_request(request, state).await?.0 {
            Some(bytes) => parse(&bytes).map(JsonBody),
            None => Err(ApiError::bad_request(
                "empty_body",
                "the request needs a JSON body",
            )),
        }
    }
}

impl<S> FromRequest<S> for OptionalJsonBody
where
    S: Send + Sync,
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
        Ok(OptionalJsonBody(Some(bytes)))
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

/// Reads a registry body whole, at most [`REGISTRY_BODY_LIMIT`] bytes, within
/// the read timeout. The limit is checked here rather than by axum's
/// `DefaultBodyLimit` layer: the layer costs every registry request a boxed
/// future and an entry in the request's extensions, and only the routes that
/// read a body (through this function) need it.
async fn read_body<S>(request: Request, state: &S) -> Result<Bytes, ApiError>
where
    S: Send + Sync,
    BodyReadTimeout: FromRef<S>,
{
    let BodyReadTimeout(limit) = BodyReadTimeout::from_ref(state);
    within(
        limit,
        read_at_most(request.into_body(), REGISTRY_BODY_LIMIT),
    )
    .await
    .map_err(|_elapsed| body_read_timed_out())?
}

/// The body's bytes, refused once they pass `limit`. A body that arrives
/// in one piece (nearly every one: it comes with its head) is returned
/// as it came, without a copy.
async fn read_at_most(mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    if body.size_hint().lower() > limit as u64 {
        return Err(payload_too_large(limit));
    }
    let mut whole = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            ApiError::bad_request(
                "unreadable_body",
                format!("the request body could not be read: {error}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let length = joined.as_ref().map_or(whole.len(), BytesMut::len) + data.len();
        if length > limit {
            return Err(payload_too_large(limit));
        }
        match &mut joined {
            Some(joined) => joined.extend_from_slice(&data),
            None if whole.is_empty() => whole = data,
            None => {
                let mut both = BytesMut::with_capacity(length);
                both.extend_from_slice(&whole);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
        }
    }
    Ok(joined.map_or(whole, BytesMut::freeze))
}

fn payload_too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body is larger than the registry accepts ({limit} bytes)"),
    )
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

fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
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

/// The `{id}` path segment, parsed as an agent id. Read from the raw
/// (percent-decoded) parameters rather than through `Path<String>`, whose
/// serde deserializer and copy cost every heartbeat for nothing.
pub struct AgentIdParam(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for AgentIdParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request("invalid_id", rejection.body_text()))?;
        let raw = params
            .iter()
            .find_map(|(name, value)| (name == "id").then_some(value))
            .unwrap_or_default();
        Uuid::parse_str(raw).map(AgentIdParam).map_err(|_| {
            ApiError::bad_request("invalid_id", format!("{raw:?} is not an agent id (a UUID)"))
        })
    }
}
