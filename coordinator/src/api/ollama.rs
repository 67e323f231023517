//! The Ollama API: generation routes forwarded to Ollama nodes, and the
//! listing routes answered from the registry (the union over routable nodes).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use serde_json::json;

use super::forward::{error, forward, json_response, retry_after, Forwarder};
use crate::balancer::ApiKind;
use crate::registry::Registry;

/// One Ollama generation route: forwarded to a node that serves the model.
macro_rules! ollama_route {
    ($name:ident, $path:literal, $summary:literal) => {
        #[doc = $summary]
        #[utoipa::path(post, path = $path, tag = "ollama",
            request_body(content = Object, description = "Ollama's request body; `model` picks the node"),
            security((), ("api_key" = [])),
            responses(
                (status = 200, description = "The node's answer, passed through as it arrives", body = Object),
                (status = 400, description = "No JSON body naming a model", body = Object, example = json!({"error": "the body names no model"})),
                (status = 401, description = "API keys are configured and none valid was sent", body = Object),
                (status = 404, description = "No node serves the model", body = Object),
                (status = 502, description = "Every node tried failed", body = Object),
                (status = 503, description = "No node can serve the model now", body = Object),
            ))]
        pub async fn $name(State(forwarder): State<Arc<Forwarder>>, request: Request) -> Response {
            forward(&forwarder, ApiKind::Ollama, request).await
        }
    };
}
ollama_route!(
    chat,
    "/api/chat",
    "A chat turn, streamed as NDJSON unless `stream` is false."
);
ollama_route!(
    generate,
    "/api/generate",
    "A completion, streamed as NDJSON unless `stream` is false."
);
ollama_route!(embed, "/api/embed", "Embeddings of one or more inputs.");
ollama_route!(
    embeddings,
    "/api/embeddings",
    "Embeddings (Ollama's older route)."
);
ollama_route!(
    show,
    "/api/show",
    "A model's details (`model`, or `name` as older clients send it)."
);

/// One model as Ollama lists it, serialized straight from borrowed names:
/// a listing over a large fleet costs its output, not a JSON tree per model.
#[derive(serde::Serialize)]
struct ModelEntry<'a> {
    name: &'a str,
    model: &'a str,
    modified_at: &'a str,
    size: u64,
    digest: &'a str,
    details: ModelDetails,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size_vram: Option<u64>,
}

/// Ollama's `details`, empty: agents report names only.
#[derive(serde::Serialize)]
struct ModelDetails {
    parent_model: &'static str,
    format: &'static str,
    family: &'static str,
    families: [&'static str; 0],
    parameter_size: &'static str,
    quantization_level: &'static str,
}

fn model_entry<'a>(name: &'a str, modified_at: &'a str) -> ModelEntry<'a> {
    ModelEntry {
        name,
        model: name,
        modified_at,
        size: 0,
        digest: "",
        details: ModelDetails {
            parent_model: "",
            format: "",
            family: "",
            families: [],
            parameter_size: "",
            quantization_level: "",
        },
        expires_at: None,
        size_vram: None,
    }
}

#[derive(serde::Serialize)]
struct ModelList<'a> {
    models: Vec<ModelEntry<'a>>,
}

/// `GET /api/tags`: every model some routable Ollama node serves, once.
#[utoipa::path(get, path = "/api/tags", tag = "ollama", security((), ("api_key" = [])),
    responses((status = 200, description = "Ollama's model list", body = Object)))]
pub async fn tags(State(registry): State<Arc<Registry>>) -> Response {
    let table = registry.routing_table();
    let names: BTreeSet<&str> = table
        .serving(ApiKind::Ollama)
        .flat_map(|c| c.models.iter().map(|m| &**m))
        .collect();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let models = names
        .into_iter()
        .map(|name| model_entry(name, &now))
        .collect();
    axum::Json(ModelList { models }).into_response()
}

/// `GET /api/ps`: every model some routable Ollama node holds in memory, once.
#[utoipa::path(get, path = "/api/ps", tag = "ollama", security((), ("api_key" = [])),
    responses((status = 200, description = "Ollama's list of loaded models", body = Object)))]
pub async fn ps(State(registry): State<Arc<Registry>>) -> Response {
    let table = registry.routing_table();
    let names: BTreeSet<&str> = table
        .serving(ApiKind::Ollama)
        .flat_map(|c| c.loaded_models.iter().map(|m| &**m))
        .collect();
    let now = chrono::Utc::now();
    let modified_at = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let expires =
        (now + chrono::Duration::minutes(5)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let models = names
        .into_iter()
        .map(|name| ModelEntry {
            expires_at: Some(&expires),
            size_vram: Some(0),
            ..model_entry(name, &modified_at)
        })
        .collect();
    axum::Json(ModelList { models }).into_response()
}

/// `GET /api/version`: the oldest Ollama version among the nodes in
/// rotation, so that a client never assumes a feature some node lacks.
/// With no Ollama node in rotation there is no Ollama version to give:
/// `503`, as every Ollama route answers then (the router's own version
/// would mislead a client that checks features by version).
#[utoipa::path(get, path = "/api/version", tag = "ollama", security((), ("api_key" = [])),
    responses(
        (status = 200, description = "The version", body = Object, example = json!({"version": "0.5.7"})),
        (status = 503, description = "No Ollama node is in rotation", body = Object, example = json!({"error": "no Ollama node is in rotation"})),
    ))]
pub async fn version(State(registry): State<Arc<Registry>>) -> Response {
    let table = registry.routing_table();
    let oldest = table
        .serving(ApiKind::Ollama)
        .map(|candidate| &*candidate.runtime_version)
        .min_by_key(|version| version_key(version));
    match oldest {
        Some(version) => json_response(json!({ "version": version })),
        None => {
            let mut response = error(
                ApiKind::Ollama,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_available_node",
                "no Ollama node is in rotation, so there is no Ollama version to report",
            );
            retry_after(&mut response);
            response
        }
    }
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
#[utoipa::path(get, path = "/", tag = "ollama",
    responses((status = 200, description = "Always", body = String, example = "Ollama is running")))]
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
