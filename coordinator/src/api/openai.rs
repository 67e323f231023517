//! The OpenAI-compatible API: generation routes forwarded to any node, and
//! `/v1/models` answered from the registry.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse as _, Response};

use super::forward::{forward, Forwarder};
use crate::balancer::ApiKind;
use crate::registry::Registry;

/// One OpenAI generation route: forwarded to a node that serves the model.
macro_rules! openai_route {
    ($name:ident, $path:literal, $summary:literal) => {
        #[doc = $summary]
        #[utoipa::path(post, path = $path, tag = "openai",
            request_body(content = Object, description = "OpenAI's request body; `model` picks the node"),
            security((), ("api_key" = [])),
            responses(
                (status = 200, description = "The node's answer, passed through as it arrives (SSE when streaming)", body = Object),
                (status = 400, description = "No JSON body naming a model", body = Object),
                (status = 401, description = "API keys are configured and none valid was sent", body = Object),
                (status = 404, description = "No node serves the model", body = Object),
                (status = 502, description = "Every node tried failed", body = Object),
                (status = 503, description = "No node can serve the model now", body = Object),
            ))]
        pub async fn $name(State(forwarder): State<Arc<Forwarder>>, request: Request) -> Response {
            forward(&forwarder, ApiKind::OpenAi, request).await
        }
    };
}
openai_route!(
    chat_completions,
    "/v1/chat/completions",
    "A chat completion."
);
openai_route!(completions, "/v1/completions", "A text completion.");
openai_route!(embeddings, "/v1/embeddings", "Embeddings.");

/// `GET /v1/models`: every model some routable node serves, once.
#[utoipa::path(get, path = "/v1/models", tag = "openai", security((), ("api_key" = [])),
    responses((status = 200, description = "OpenAI's model list", body = Object)))]
pub async fn models(State(registry): State<Arc<Registry>>) -> Response {
    let table = registry.routing_table();
    let names: BTreeSet<&str> = table
        .serving(ApiKind::OpenAi)
        .flat_map(|c| c.models.iter().map(|m| &**m))
        .collect();
    #[derive(serde::Serialize)]
    struct Model<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'static str,
    }
    #[derive(serde::Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Model<'a>>,
    }
    let data = names
        .into_iter()
        .map(|id| Model {
            id,
            object: "model",
            created: 0,
            owned_by: "llm-router",
        })
        .collect();
    axum::Json(List {
        object: "list",
        data,
    })
    .into_response()
}
