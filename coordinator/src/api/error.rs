//! The one error type every handler returns: a status code and the JSON body
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use common::{ErrorBody, ErrorDetail};

use crate::auth::Refusal;
use crate::balancer::ApiKind;
use crate::registry::RegistryError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable and machine-readable.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        challenge_if_unauthorized((self.status, Json(body)).into_response())
    }
}

/// A 401 says how to authenticate (`WWW-Authenticate: Bearer`), whatever
/// the shape of its body.
pub fn challenge_if_unauthorized(mut response: Response) -> Response {
    if response.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

impl From<crate::fields::FieldError> for ApiError {
    fn from(error: crate::fields::FieldError) -> Self {
        Self::unprocessable("invalid_field", error.to_string())
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let status = match refusal {
            Refusal::Unauthenticated => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden => StatusCode::FORBIDDEN,
        };
        Self::new(status, refusal.code(), refusal.message())
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::NotFound(id) => Self::not_found(format!("no agent with id {id}")),
            RegistryError::WrongSecret => Refusal::Unauthenticated.into(),
            RegistryError::IdentityTaken {
                id,
                machine_name,
                port,
            } => Self::new(
                StatusCode::CONFLICT,
                "identity_taken",
                format!(
                    "machine {machine_name:?} on port {port} is registered to agent {id}; registering it \
                     again needs that agent's secret (the agent keeps it in its state dir) or the \
                     admin token. To give the name to another machine, remove the old agent first: \
                     llm-router agents remove {id}"
                ),
            ),
            RegistryError::Full(limit) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "agent_limit_reached",
                format!(
                    "the registry holds its limit of {limit} agents; remove one or raise --max-agents"
                ),
            ),
            RegistryError::Store(store_error) => {
                // The cause stays in the log; the client learns only that the
                // change was not made and may be retried.
                tracing::error!(error = %store_error, "Store write failed; change rolled back.");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the change could not be made durable and was not applied; retry later",
                )
            }
        }
    }
}

/// The fallback for unknown paths, so that they too answer in JSON, in the
/// shape of the API the path belongs to.
pub async fn route_not_found(uri: Uri) -> Response {
    in_shape_of(
        &uri,
        ApiError::not_found(format!("no such route: {}", uri.path())),
    )
}

/// The fallback for a known path called with the wrong method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let allowed = if llm_api_of(uri.path()).is_some() {
        "the Ollama and OpenAI routes take POST, except the listings (GET /api/tags, /api/ps, /api/version, /v1/models)"
    } else {
        "see /openapi.json for the methods each route takes"
    };
    in_shape_of(
        &uri,
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} does not take {method}: {allowed}", uri.path()),
        ),
    )
}

/// The Ollama and OpenAI routes answer in the shape their official clients
/// parse; the registry and everything else in its own.
pub fn in_shape_of(uri: &Uri, error: ApiError) -> Response {
    match llm_api_of(uri.path()) {
        Some(api) => super::forward::error(api, error.status, error.code, &error.message),
        None => error.into_response(),
    }
}

/// The client API a path belongs to, if any: `/v1/...` is OpenAI's,
/// `/api/...` Ollama's, except the registry's `/api/agents...`.
fn llm_api_of(path: &str) -> Option<ApiKind> {
    if path == "/v1" || path.starts_with("/v1/") {
        Some(ApiKind::OpenAi)
    } else if path.starts_with("/api/")
        && path != "/api/agents"
        && !path.starts_with("/api/agents/")
    {
        Some(ApiKind::Ollama)
    } else {
        None
    }
}
