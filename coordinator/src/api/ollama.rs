//! The Ollama API: generation routes forwarded to Ollama nodes, and the
//! listing routes answered from the registry (the union over routable nodes).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use common::{AgentStatus, BackendKind};
use serde_json::json;

use super::forward::{forward, json_response};
use crate::balancer::ApiKind;
use crate::proxy::Proxy;
use crate::registry::Registry;

/// `POST /api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`, `/api/show`.
pub async fn proxy(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    forward(&proxy, ApiKind::Ollama, request).await
}

fn model_entry(name: &str) -> serde_json::Value {
    json!({
        "name": name,
        "model": name,
        "modified_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "size": 0,
        "digest": "",
        "details": {"parent_model": "", "format": "", "family": "", "families": [], "parameter_size": "", "quantization_level": ""}
    })
}

/// `GET /api/tags`: every model some routable Ollama node serves, once.
pub async fn tags(State(registry): State<Arc<Registry>>) -> Response {
    let table = registry.routing_table();
    let names: BTreeSet<&str> = table
        .serving(ApiKind::Ollama)
        .flat_map(|c| c.models.iter().map(|m| &**m))
        .collect();
    let models: Vec<_> = names.into_iter().map(model_entry).collect();
    json_response(json!({ "models": models }))
}

/// `GET /api/ps`: every model some routable Ollama node holds in memory, once.
pub async fn ps(State(registry): State<Arc<Registry>>) -> Response {
    let table = registry.routing_table();
    let names: BTreeSet<&str> = table
        .serving(ApiKind::Ollama)
        .flat_map(|c| c.loaded_models.iter().map(|m| &**m))
        .collect();
    let expires = (chrono::Utc::now() + chrono::Duration::minutes(5))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let models: Vec<_> = names
        .into_iter()
        .map(|name| {
            let mut entry = model_entry(name);
            entry["expires_at"] = json!(expires);
            entry["size_vram"] = json!(0);
            entry
        })
        .collect();
    json_response(json!({ "models": models }))
}

/// `GET /api/version`: the oldest Ollama version in the fleet, so that a
/// client never assumes a feature some node lacks; the router's own version
/// when no Ollama node is Online.
pub async fn version(State(registry): State<Arc<Registry>>) -> Response {
    let oldest = registry
        .list(Some(AgentStatus::Online))
        .into_iter()
        .filter(|view| view.agent.backend == BackendKind::Ollama)
        .map(|view| view.agent.runtime_version)
        .min_by(|a, b| version_key(a).cmp(&version_key(b)));
    let version = oldest.unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
    json_response(json!({ "version": version }))
}

/// "0.5.10" sorts after "0.5.9": compare the numeric parts.
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse().unwrap_or(0))
        .collect()
}

/// `GET /`: what Ollama answers, for tools that check the server is there.
pub async fn root() -> &'static str {
    "Ollama is running"
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_compare_numerically() {
        assert!(super::version_key("0.5.10") > super::version_key("0.5.9"));
        assert!(super::version_key("0.12.0") > super::version_key("0.5.7"));
    }
}
