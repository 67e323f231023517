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

use crate::balancer::prefix::PromptKey;
use crate::balancer::{ApiKind, NoRoute};
use crate::proxy::{no_route_status, ForwardRequest, Proxy, ProxyError};
use crate::telemetry::RequestAccount;

/// What the LLM routes need besides the proxy: how much of a request body
/// the router takes, how long it waits for one, and how many bytes of
/// bodies it holds at once. The API layer reads bodies; the proxy gets them
/// whole.
pub struct Forwarder {
    pub proxy: Arc<Proxy>,
    /// The largest request body, in bytes (`--max-request-body`).
    pub max_request_body: usize,
    /// How long a client may take to send its whole body.
    pub body_read_timeout: std::time::Duration,
    /// Bytes of bodies held at once (`--max-body-memory`).
    pub body_budget: Arc<BodyBudget>,
}

/// Forwards one client request; every failure answers in the route's shape.
/// The request is taken whole, so that its head is read in place rather
/// than cloned for extractors. Its account is made here and recorded once:
/// with the answer's body when a node answers, at once when the router
/// answers itself.
pub async fn forward(forwarder: &Forwarder, api: ApiKind, request: Request) -> Response {
    let mut account = RequestAccount::start(request.uri().path());
    let (parts, body) = request.into_parts();
    if forwarder.proxy.already_forwarded(&parts.headers) {
        return answer(account, loop_detected(api));
    }
    // Held until the request has been forwarded: the body's bytes count
    // against the budget while the router keeps them.
    let (body, _reservation) = match read_within_limits(forwarder, &parts.headers, body).await {
        Ok(read) => read,
        Err(refusal) => return answer(account, refusal.answer(api, forwarder)),
    };
    let model = match model_of(&body) {
        Ok(model) => model,
        Err(message) => {
            return answer(
                account,
                error(api, StatusCode::BAD_REQUEST, "invalid_request", &message),
            )
        }
    };
    let prompt = forwarder
        .proxy
        .wants_prompt()
        .then(|| prompt_key(parts.uri.path(), &model, &body))
        .flatten();
    // The account carries the model from here: routing reads it there.
    account.set_model(model);
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| axum::http::uri::PathAndQuery::from_static("/"));
    let request = ForwardRequest {
        api,
        path_and_query: &path_and_query,
        headers: &parts.headers,
        body,
        prompt,
    };
    match forwarder.proxy.forward(request, account).await {
        Ok(response) => response,
        Err((ProxyError::NoRoute(no_route), mut account)) => {
            // A model no node serves is whatever the client typed: as a
            // label it would let any client grow the metrics without end.
            let model = match no_route {
                NoRoute::ModelUnavailable => account.model().to_owned(),
                NoRoute::UnknownModel | NoRoute::NoNodes => account.relabel_model(UNKNOWN_MODEL),
            };
            answer(account, no_route_answer(api, &model, &no_route))
        }
        Err((ProxyError::Queue(refusal), account)) => {
            use crate::proxy::queue::QueueRefusal;
            let (code, message, reason) = match refusal {
                QueueRefusal::Full => (
                    "queue_full",
                    "every node that serves this model is at its capacity and the router's queue is full (--queue-size); retry shortly",
                    "full",
                ),
                QueueRefusal::TimedOut => (
                    "queue_timeout",
                    "every node that serves this model stayed at its capacity for as long as this router lets a request wait (--queue-timeout); retry shortly",
                    "timeout",
                ),
            };
            metrics::counter!(crate::telemetry::QUEUE_REFUSED, "reason" => reason).increment(1);
            let mut response = error(api, StatusCode::TOO_MANY_REQUESTS, code, message);
            retry_after(&mut response);
            answer(account, response)
        }
        Err((ProxyError::AllFailed { attempts }, account)) => answer(
            account,
            error(
                api,
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
                &format!("{attempts} node(s) failed to answer"),
            ),
        ),
    }
}

/// The model label of requests for a model no node serves.
const UNKNOWN_MODEL: &str = "(unknown)";

/// An answer the router makes itself: its account is recorded now.
fn answer(account: RequestAccount, response: Response) -> Response {
    account.close(response.status().as_u16());
    response
}

fn loop_detected(api: ApiKind) -> Response {
    error(
        api,
        StatusCode::LOOP_DETECTED,
        "loop_detected",
        "this request has already passed through this router (its Via header names it): \
         a node's registered address leads back to a router. Correct that node's address, \
         or remove it (llm-router agents list shows each node's address)",
    )
}

/// Why no node could be asked, in the route's own error shape: 404 for a
/// model no node has, 503 with `Retry-After` when its nodes are out of
/// rotation or there are none.
fn no_route_answer(api: ApiKind, model: &str, no_route: &NoRoute) -> Response {
    let (code, message) = match no_route {
        NoRoute::UnknownModel => (
            "model_not_found",
            format!("model '{model}' not found on any node"),
        ),
        NoRoute::ModelUnavailable => (
            "no_available_node",
            format!("no node can serve model '{model}' right now"),
        ),
        NoRoute::NoNodes => ("no_available_node", "no node is online".to_owned()),
    };
    let mut response = error(api, no_route_status(no_route), code, &message);
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        retry_after(&mut response);
    }
    response
}

/// Reads the body within the size limit, the read timeout and the budget.
async fn read_within_limits(
    forwarder: &Forwarder,
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Result<(bytes::Bytes, BodyReservation), BodyError> {
    let declared_length = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    super::json::within(
        forwarder.body_read_timeout,
        read_body(
            body,
            declared_length,
            forwarder.max_request_body,
            &forwarder.body_budget,
        ),
    )
    .await
    .unwrap_or(Err(BodyError::TimedOut))
}

impl BodyError {
    fn answer(self, api: ApiKind, forwarder: &Forwarder) -> Response {
        match self {
            BodyError::TimedOut => {
                let (code, message) = super::json::BODY_READ_TIMEOUT;
                error(api, StatusCode::REQUEST_TIMEOUT, code, message)
            }
            BodyError::TooLarge => error(
                api,
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!(
                    "the request body is larger than this router takes ({} bytes, --max-request-body)",
                    forwarder.max_request_body
                ),
            ),
            BodyError::OverBudget => {
                let mut response = error(
                    api,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_busy",
                    "the router is holding as many request bodies as --max-body-memory allows; retry shortly",
                );
                retry_after(&mut response);
                response
            }
            BodyError::Unreadable => error(
                api,
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body could not be read",
            ),
        }
    }
}

/// The bytes of request bodies the router holds now, against a ceiling, so
/// that clients sending large bodies slowly cannot make it hold more memory
/// than the operator allowed.
#[derive(Debug)]
pub struct BodyBudget {
    capacity: usize,
    used: std::sync::atomic::AtomicUsize,
}

impl BodyBudget {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(BodyBudget {
            capacity,
            used: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Room for `bytes`, held until the reservation is dropped; `None` when
    /// the budget has not that much left.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<BodyReservation> {
        let mut reservation = BodyReservation {
            budget: Arc::clone(self),
            bytes: 0,
        };
        reservation.grow(bytes).then_some(reservation)
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Bytes of the body budget one request holds.
#[derive(Debug)]
pub struct BodyReservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyReservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `more` bytes as well, if the budget has them.
    pub fn grow(&mut self, more: usize) -> bool {
        use std::sync::atomic::Ordering;
        let granted = self
            .budget
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(more)
                    .filter(|total| *total <= self.budget.capacity)
            })
            .is_ok();
        if granted {
            self.bytes += more;
        }
        granted
    }
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

enum BodyError {
    TimedOut,
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

/// The key cache-aware routing goes by: the prompt as the server will see
/// it, in order (the system prompt, the messages or the prompt, images by
/// their bytes), for the four generation routes. Each part is taken as its
/// JSON text, unparsed: a conversation's next turn repeats the earlier
/// messages byte for byte, so its key begins with the earlier turn's.
fn prompt_key(path: &str, model: &str, body: &[u8]) -> Option<PromptKey> {
    use serde_json::value::RawValue;
    #[derive(Deserialize)]
    struct PromptFields<'a> {
        #[serde(borrow)]
        system: Option<&'a RawValue>,
        #[serde(borrow)]
        messages: Option<&'a RawValue>,
        #[serde(borrow)]
        prompt: Option<&'a RawValue>,
        #[serde(borrow)]
        images: Option<&'a RawValue>,
    }
    if !matches!(
        path,
        "/api/chat" | "/api/generate" | "/v1/chat/completions" | "/v1/completions"
    ) {
        return None;
    }
    let fields: PromptFields<'_> = serde_json::from_slice(body).ok()?;
    let parts: Vec<&[u8]> = [fields.system, fields.messages, fields.prompt, fields.images]
        .into_iter()
        .flatten()
        .map(|raw| raw.get().as_bytes())
        .collect();
    (!parts.is_empty()).then(|| PromptKey::of(model, &parts))
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
