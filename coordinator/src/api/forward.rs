//! What the Ollama and OpenAI routes share: read the model from the body,
//! forward through the proxy, and shape errors the way each API's official
//! client expects them.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::balancer::Candidate;
use crate::balancer::{ApiKind, NoRoute};
use crate::proxy::{no_route_status, ForwardRequest, Forwarded, Proxy, ProxyError};
use crate::proxy::{BodyBudget, BodyReservation};
use crate::telemetry;

/// Forwards one client request; every failure answers in the route's shape.
/// The request is taken whole, so that its head is read in place rather
/// than cloned for extractors.
pub async fn forward(proxy: &Arc<Proxy>, api: ApiKind, request: Request) -> Response {
    let started = std::time::Instant::now();
    let route = telemetry::route_index(request.uri().path());
    let (response, model, node) = forward_counted(proxy, api, route, started, request).await;
    telemetry::count_request(
        route,
        response.status().as_u16(),
        model,
        node.as_deref().map(|node| &*node.traffic),
    );
    response
}

/// The model label of requests for a model no node serves.
const UNKNOWN_MODEL: &str = "(unknown)";

/// Forwards, and says for the request counter which model and which node.
async fn forward_counted(
    proxy: &Arc<Proxy>,
    api: ApiKind,
    route: usize,
    started: std::time::Instant,
    request: Request,
) -> (Response, String, Option<Arc<Candidate>>) {
    let no_node = || None;
    let (parts, body) = request.into_parts();
    if proxy.already_forwarded(&parts.headers) {
        let response = error(
            api,
            StatusCode::LOOP_DETECTED,
            "loop_detected",
            "this request has already passed through this router (its Via header names it): \
             a node's registered address leads back to a router. Correct that node's address, \
             or remove it (llm-router agents list shows each node's address)",
        );
        return (response, String::new(), no_node());
    }
    let declared_length = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    let read = super::json::within(
        proxy.body_read_timeout(),
        read_body(
            body,
            declared_length,
            proxy.max_request_body(),
            proxy.body_budget(),
        ),
    )
    .await;
    // Held until the request has been forwarded: the body's bytes count
    // against the budget while the router keeps them.
    let (body, _reservation) = match read {
        Ok(Ok(read)) => read,
        Err(_elapsed) => {
            let (code, message) = super::json::BODY_READ_TIMEOUT;
            let response = error(api, StatusCode::REQUEST_TIMEOUT, code, message);
            return (response, String::new(), no_node());
        }
        Ok(Err(BodyError::TooLarge)) => {
            let response = error(
                api,
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!(
                    "the request body is larger than this router takes ({} bytes, --max-request-body)",
                    proxy.max_request_body()
                ),
            );
            return (response, String::new(), no_node());
        }
        Ok(Err(BodyError::OverBudget)) => {
            let mut response = error(
                api,
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                "the router is holding as many request bodies as --max-body-memory allows; retry shortly",
            );
            retry_after(&mut response);
            return (response, String::new(), no_node());
        }
        Ok(Err(BodyError::Unreadable)) => {
            let response = error(
                api,
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body could not be read",
            );
            return (response, String::new(), no_node());
        }
    };
    let model = match model_of(&body) {
        Ok(model) => model,
        Err(message) => {
            let response = error(api, StatusCode::BAD_REQUEST, "invalid_request", &message);
            return (response, String::new(), no_node());
        }
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| axum::http::uri::PathAndQuery::from_static("/"));
    let forwarded = proxy
        .forward(ForwardRequest {
            api,
            route,
            path_and_query: &path_and_query,
            headers: &parts.headers,
            body,
            model: &model,
            started,
        })
        .await;
    match forwarded {
        Ok(Forwarded { response, node }) => (response, model, Some(node)),
        Err(ProxyError::NoRoute(no_route)) => {
            let message = match no_route {
                NoRoute::UnknownModel => format!("model '{model}' not found on any node"),
                NoRoute::ModelUnavailable => format!("no node can serve model '{model}' right now"),
                NoRoute::NoNodes => "no node is online".to_owned(),
            };
            let code = match no_route {
                NoRoute::UnknownModel => "model_not_found",
                NoRoute::ModelUnavailable | NoRoute::NoNodes => "no_available_node",
            };
            let mut response = error(api, no_route_status(&no_route), code, &message);
            if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                retry_after(&mut response);
            }
            // A model no node serves is whatever the client typed: as a
            // label it would let any client grow the metrics without end.
            let label = match no_route {
                NoRoute::ModelUnavailable => model,
                NoRoute::UnknownModel | NoRoute::NoNodes => UNKNOWN_MODEL.to_owned(),
            };
            (response, label, no_node())
        }
        Err(ProxyError::AllFailed { attempts }) => {
            let response = error(
                api,
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
                &format!("{attempts} node(s) failed to answer"),
            );
            (response, model, no_node())
        }
    }
}

enum BodyError {
    TooLarge,
    OverBudget,
    Unreadable,
}

/// Reads a request body whole, counting its bytes against the budget of
/// bodies held at once: a declared length up front (so a large upload is
/// refused before a byte of it is read), a chunked one as it arrives.
async fn read_body(
    body: Body,
    declared_length: Option<usize>,
    limit: usize,
    budget: &Arc<BodyBudget>,
) -> Result<(bytes::Bytes, BodyReservation), BodyError> {
    use http_body_util::BodyExt as _;
    if declared_length.is_some_and(|length| length > limit) {
        return Err(BodyError::TooLarge);
    }
    let mut body = body;
    let Some(mut reservation) = budget.reserve(declared_length.unwrap_or(0)) else {
        discard(&mut body, limit).await;
        return Err(BodyError::OverBudget);
    };
    let mut collected = bytes::BytesMut::with_capacity(declared_length.unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Unreadable)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if collected.len() + data.len() > limit {
            return Err(BodyError::TooLarge);
        }
        let needed = (collected.len() + data.len()).saturating_sub(reservation.bytes());
        if needed > 0 && !reservation.grow(needed) {
            drop((collected, reservation));
            discard(&mut body, limit).await;
            return Err(BodyError::OverBudget);
        }
        collected.extend_from_slice(&data);
    }
    Ok((collected.freeze(), reservation))
}

/// Reads the rest of a body refused for want of memory and throws it
/// away as it comes, so that the client, still sending, gets the 503
/// rather than a reset connection. Nothing of it is held.
async fn discard(body: &mut Body, limit: usize) {
    use http_body_util::BodyExt as _;
    let mut read = 0;
    while let Some(Ok(frame)) = body.frame().await {
        read += frame.data_ref().map_or(0, bytes::Buf::remaining);
        if read > limit {
            return;
        }
    }
}

/// The requested model: `model`, or `name` as older Ollama clients send to
/// `/api/show`. Other fields are skipped without being built. Each way a
/// body can be wrong gets a message that says what to send instead.
fn model_of(body: &[u8]) -> Result<String, String> {
    /// The two fields as whatever JSON they hold, so that a wrong type can
    /// be named; every other field is skipped unparsed.
    #[derive(Deserialize)]
    struct ModelField {
        model: Option<serde_json::Value>,
        name: Option<serde_json::Value>,
    }
    const EXAMPLE: &str = r#"{"model": "llama3.2", ...}"#;
    let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(format!(
            "the request needs a JSON body naming a model, such as {EXAMPLE}"
        ));
    };
    // Checked first: serde would read a JSON array as a struct's fields.
    if *first != b'{' {
        return Err(format!(
            "the body must be a JSON object naming a model, such as {EXAMPLE}"
        ));
    }
    let fields: ModelField = serde_json::from_slice(body)
        .map_err(|error| format!("the body is not valid JSON: {error}"))?;
    let (field, value) = match (fields.model, fields.name) {
        (Some(model), _) => ("model", model),
        (None, Some(name)) => ("name", name),
        (None, None) => {
            return Err(format!(
                "the body names no model: add \"model\", as in {EXAMPLE}"
            ))
        }
    };
    match value {
        serde_json::Value::String(model) if !model.trim().is_empty() => Ok(model),
        serde_json::Value::String(_) => Err(format!(
            "\"{field}\" is empty: name the model, as in {EXAMPLE}"
        )),
        other => {
            let mut shown = other.to_string();
            if shown.chars().count() > 64 {
                shown = shown.chars().take(61).chain("...".chars()).collect();
            }
            Err(format!(
                "\"{field}\" must be a string naming the model, not {shown}"
            ))
        }
    }
}

/// How long a client should wait before retrying a request that found no
/// node able to take it: about when the prober next tries an unreachable
/// node, and short enough that clients which honour `Retry-After` on 503
/// (the `openai` client does) retry within their own limits.
pub const RETRY_AFTER_SECONDS: u64 = 2;

/// Adds `Retry-After` to a 503 that a later attempt may not meet.
pub fn retry_after(response: &mut Response) {
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(RETRY_AFTER_SECONDS),
    );
}

/// An error in the shape the route's official client parses: Ollama's
/// `{"error": "..."}`, or OpenAI's error object.
pub fn error(api: ApiKind, status: StatusCode, code: &str, message: &str) -> Response {
    let body = match api {
        ApiKind::Ollama => json!({ "error": message }),
        ApiKind::OpenAi => json!({
            "error": {
                "message": message,
                "type": if status.is_server_error() { "server_error" } else { "invalid_request_error" },
                "param": null,
                "code": code,
            }
        }),
    };
    (status, Json(body)).into_response()
}

/// A JSON answer the router assembles itself.
pub fn json_response(value: serde_json::Value) -> Response<Body> {
    Json(value).into_response()
}
