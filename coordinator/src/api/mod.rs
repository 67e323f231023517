//! HTTP handlers and the router that maps paths to them.

pub mod agents;
pub mod error;
pub mod forward;
pub mod guard;
pub mod json;
pub mod ollama;
pub mod openai;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRef, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use crate::auth::Credentials;
use crate::balancer::ApiKind;
use crate::proxy::Proxy;
use crate::registry::Registry;

pub use json::BodyReadTimeout;

/// Registry bodies are small; anything larger is a mistake or an attack.
pub const REGISTRY_BODY_LIMIT: usize = 64 * 1024;

/// What handlers share: the registry, the proxy in front of the nodes, who
/// may do what, and how long a client may take to send a body.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub proxy: Arc<Proxy>,
    pub credentials: Arc<Credentials>,
    pub body_read_timeout: Duration,
}

impl FromRef<AppState> for Arc<Credentials> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.credentials)
    }
}

impl FromRef<AppState> for BodyReadTimeout {
    fn from_ref(state: &AppState) -> Self {
        BodyReadTimeout(state.body_read_timeout)
    }
}

impl FromRef<AppState> for Arc<Registry> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.registry)
    }
}

impl FromRef<AppState> for Arc<Proxy> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.proxy)
    }
}

/// The whole HTTP surface of the router.
pub fn app(state: AppState) -> Router {
    let registry_routes = Router::new()
        .route("/api/agents", get(agents::list))
        .route("/api/agents/register", post(agents::register))
        .route(
            "/api/agents/{id}",
            get(agents::show).put(agents::update).delete(agents::remove),
        )
        .route("/api/agents/{id}/heartbeat", post(agents::heartbeat))
        .route("/api/agents/{id}/drain", post(agents::drain))
        .layer(DefaultBodyLimit::max(REGISTRY_BODY_LIMIT));
    let mut llm_routes = Router::new()
        .route("/api/chat", post(ollama::proxy))
        .route("/api/generate", post(ollama::proxy))
        .route("/api/embed", post(ollama::proxy))
        .route("/api/embeddings", post(ollama::proxy))
        .route("/api/show", post(ollama::proxy))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route("/v1/chat/completions", post(openai::proxy))
        .route("/v1/completions", post(openai::proxy))
        .route("/v1/embeddings", post(openai::proxy))
        .route("/v1/models", get(openai::models))
        // The proxy reads bodies itself, up to its own limit.
        .layer(DefaultBodyLimit::disable());
    if state.credentials.clients_authenticated() {
        llm_routes = llm_routes.route_layer(middleware::from_fn_with_state(
            Arc::clone(&state.credentials),
            require_api_key,
        ));
    }
    Router::new()
        .route("/health", get(health))
        // Ollama's liveness probe stays open, as `/health` does.
        .route("/", get(ollama::root))
        .merge(registry_routes)
        .merge(llm_routes)
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}

/// The LLM routes when API keys are configured: a key, or an error in the
/// shape of the route's API.
async fn require_api_key(
    State(credentials): State<Arc<Credentials>>,
    request: Request,
    next: Next,
) -> Response {
    match credentials.check_client(request.headers().get(AUTHORIZATION)) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            let api = if request.uri().path().starts_with("/v1/") {
                ApiKind::OpenAi
            } else {
                ApiKind::Ollama
            };
            let mut response =
                forward::error(api, refusal.status(), refusal.code(), refusal.message());
            if refusal == crate::auth::Refusal::Unauthenticated {
                response.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
            }
            response
        }
    }
}

async fn health() -> impl axum::response::IntoResponse {
    STATUS_OK
}

/// `{"status":"ok"}`, made once: heartbeats and health checks are the
/// router's most frequent answers.
pub const STATUS_OK: ([(axum::http::HeaderName, &str); 1], &str) = (
    [(axum::http::header::CONTENT_TYPE, "application/json")],
    r#"{"status":"ok"}"#,
);
