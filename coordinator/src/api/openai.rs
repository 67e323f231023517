//! The OpenAI-compatible API: generation routes forwarded to any node, and
//! `/v1/models` answered from the registry.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::json;

use super::forward::{forward, json_response};
use crate::balancer::ApiKind;
use crate::proxy::Proxy;
use crate::registry::Registry;

/// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
pub async fn proxy(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    forward(&proxy, ApiKind::OpenAi, request).await
}

/// `GET /v1/models`: every model some routable node serves, once.
pub async fn models(State(registry): State<Arc<Registry>>) -> Response {
    let table = registry.routing_table();
    let names: BTreeSet<&str> = table
        .serving(ApiKind::OpenAi)
        .flat_map(|c| c.models.iter().map(|m| &**m))
        .collect();
    let data: Vec<_> = names
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "llm-router"}))
        .collect();
    json_response(json!({ "object": "list", "data": data }))
}
