//! The OpenAPI document at `/openapi.json`: it lists exactly the router's
//! surface, and every operation it lists is a real route of the running
//! router.

mod support;

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use support::{client, config, registration, TestRouter};

/// The public surface, as users and agents call it.
const SURFACE: [(&str, &str); 27] = [
    ("get", "/"),
    ("get", "/health"),
    ("get", "/openapi.json"),
    ("get", "/api/agents"),
    ("post", "/api/agents/register"),
    ("get", "/api/agents/{id}"),
    ("put", "/api/agents/{id}"),
    ("delete", "/api/agents/{id}"),
    ("post", "/api/agents/{id}/heartbeat"),
    ("post", "/api/agents/{id}/drain"),
    ("get", "/api/routers"),
    ("post", "/api/chat"),
    ("post", "/api/generate"),
    ("post", "/api/embed"),
    ("post", "/api/embeddings"),
    ("post", "/api/show"),
    ("get", "/api/tags"),
    ("get", "/api/ps"),
    ("get", "/api/version"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/embeddings"),
    ("get", "/v1/models"),
    ("get", "/metrics"),
    ("get", "/dashboard"),
    ("get", "/dashboard/app.js"),
    ("get", "/dashboard/style.css"),
];

#[tokio::test]
async fn openapi_document_describes_exactly_the_routes_that_exist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let client = client();
    let response = client
        .get(router.url("/openapi.json"))
        .send()
        .await
        .expect("openapi");
    assert_eq!(response.status(), StatusCode::OK);
    let document: Value = response.json().await.expect("json");
    assert!(document["openapi"]
        .as_str()
        .expect("version")
        .starts_with("3."));

    let documented: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|key| ["get", "post", "put", "delete", "patch"].contains(&key.as_str()))
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = SURFACE
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    assert_eq!(
        documented, expected,
        "the document lists the whole surface, and only it"
    );

    // Every documented operation is a real route: never the router's
    // "no such route" or "method not allowed" answer.
    let id = support::register(&client, &router.url(""), &registration("gpu-doc")).await;
    for (method, path) in &documented {
        let url = router.url(&path.replace("{id}", &id));
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let response = client
            .request(method.clone(), &url)
            .send()
            .await
            .expect("request");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && !body.contains("no such route"),
            "{method} {path} is documented but not served: {status} {body}"
        );
    }

    // The wire types are described, and the secret hash is not among them.
    let schemas = document["components"]["schemas"]
        .as_object()
        .expect("schemas");
    for name in [
        "RegisterRequest",
        "RegisterResponse",
        "HeartbeatReport",
        "AgentView",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(name), "schema {name}");
    }
    assert!(!document.to_string().contains("secret_hash"));
    let schemes = document["components"]["securitySchemes"]
        .as_object()
        .expect("security");
    for name in ["join_token", "agent_secret", "admin_token", "api_key"] {
        assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
    }
    router.stop().await.expect("clean stop");
}
