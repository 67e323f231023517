//! HTTP handlers and the router that maps paths to them.

pub mod agents;
pub mod error;
pub mod json;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::registry::Registry;

/// Registry bodies are small; anything larger is a mistake or an attack.
pub const REGISTRY_BODY_LIMIT: usize = 64 * 1024;

/// The whole HTTP surface of the router.
pub fn app(registry: Arc<Registry>) -> Router {
    let registry_routes = Router::new()
        .route("/api/agents", get(agents::list))
        .route("/api/agents/register", post(agents::register))
        .route(
            "/api/agents/{id}",
            get(agents::show).put(agents::update).delete(agents::remove),
        )
        .route("/api/agents/{id}/heartbeat", post(agents::heartbeat))
        .layer(DefaultBodyLimit::max(REGISTRY_BODY_LIMIT))
        .with_state(registry);
    Router::new()
        .route("/health", get(health))
        .merge(registry_routes)
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
