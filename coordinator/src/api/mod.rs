//! HTTP handlers and the router that maps paths to them.

pub mod agents;
pub mod error;
pub mod forward;
pub mod json;
pub mod ollama;
pub mod openai;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::{get, post};
use axum::Router;

use crate::proxy::Proxy;
use crate::registry::Registry;

/// Registry bodies are small; anything larger is a mistake or an attack.
pub const REGISTRY_BODY_LIMIT: usize = 64 * 1024;

/// What handlers share: the registry and the proxy in front of the nodes.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub proxy: Arc<Proxy>,
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
    let llm_routes = Router::new()
        .route("/", get(ollama::root))
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
    Router::new()
        .route("/health", get(health))
        .merge(registry_routes)
        .merge(llm_routes)
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
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
