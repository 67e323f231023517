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

use crate::balancer::{ApiKind, NoRoute};
use crate::proxy::{no_route_status, ForwardRequest, Forwarded, Proxy, ProxyError};
use crate::registry::Candidate;
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
    let read = super::json::within(
        proxy.body_read_timeout(),
        axum::body::to_bytes(body, proxy.max_request_body()),
    )
    .await;
    let body = match read {
        Ok(Ok(body)) => body,
        Err(_elapsed) => {
            let (code, message) = super::json::BODY_READ_TIMEOUT;
            let response = error(api, StatusCode::REQUEST_TIMEOUT, code, message);
            return (response, String::new(), no_node());
        }
        Ok(Err(read_error)) => {
            let too_large = std::error::Error::source(&read_error)
                .is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
            let response = if too_large {
                error(
                    api,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is too large",
                )
            } else {
                error(
                    api,
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the request body could not be read",
                )
            };
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
