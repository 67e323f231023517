//! What the Ollama and OpenAI routes answer a client that got something
//! wrong, or asked for something the fleet cannot give now: each in the
//! shape that API's official client parses, each saying what to do; model
//! names with and without Ollama's `:latest`. (`/metrics` read alike twice
//! is in `metrics_render.rs`, alone in its process.)

mod support;

use serde_json::{json, Value};
use support::{client, config, register_node, TestRouter};
use testkit::{StandIn, StandInOptions};

async fn post(router: &TestRouter, path: &str, body: &str) -> (u16, Value) {
    let response = client()
        .post(router.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("post");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

#[tokio::test]
async fn bodies_that_name_no_model_properly_get_a_message_that_says_what_to_send() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    for (body, says) in [
        (
            r#"{"model": 42}"#,
            r#""model" must be a string naming the model, not 42"#,
        ),
        (r#"{"model": {"name": "x"}}"#, r#""model" must be a string"#),
        (r#"{"model": ""}"#, r#""model" is empty"#),
        (r#"{"messages": []}"#, "names no model"),
        ("[1, 2]", "must be a JSON object"),
        ("\"llama3.2\"", "must be a JSON object"),
        ("{not json", "not valid JSON"),
        ("", "needs a JSON body"),
    ] {
        let (status, answer) = post(&router, "/api/chat", body).await;
        assert_eq!(status, 400, "{body}");
        let message = answer["error"]
            .as_str()
            .expect("Ollama's error is a string");
        assert!(message.contains(says), "{body}: {message}");
        assert!(
            !message.contains("not a JSON object") || body.starts_with('['),
            "{body}: {message}"
        );

        let (status, answer) = post(&router, "/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{body}");
        let message = answer["error"]["message"]
            .as_str()
            .expect("OpenAI's error object");
        assert!(message.contains(says), "{body}: {message}");
    }
}

#[tokio::test]
async fn wrong_methods_and_unknown_paths_answer_in_each_apis_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let http = client();
    let ollama = http.get(router.url("/api/chat")).send().await.expect("get");
    assert_eq!(ollama.status(), 405);
    let body: Value = ollama.json().await.expect("json");
    let message = body["error"]
        .as_str()
        .expect("Ollama's {\"error\": \"...\"}");
    assert!(message.contains("does not take GET"), "{message}");

    let openai = http
        .get(router.url("/v1/chat/completions"))
        .send()
        .await
        .expect("get");
    assert_eq!(openai.status(), 405);
    let body: Value = openai.json().await.expect("json");
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    let body: Value = http
        .post(router.url("/api/pull"))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert!(body["error"].is_string(), "{body}");
    let body: Value = http
        .get(router.url("/v1/files"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert!(body["error"]["message"].is_string(), "{body}");

    // The registry keeps its own shape.
    let body: Value = http
        .get(router.url("/api/agents/register"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
}

#[tokio::test]
async fn api_version_with_no_ollama_node_in_rotation_is_a_503() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let http = client();
    let response = http
        .get(router.url("/api/version"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().ok()),
        Some(Some("2"))
    );
    let body: Value = response.json().await.expect("json");
    assert!(body["error"]
        .as_str()
        .expect("Ollama's shape")
        .contains("no Ollama node"));

    let node = StandIn::spawn(StandInOptions::ollama("versioned", &["m"]))
        .await
        .expect("stand-in");
    register_node(&client(), &router, "versioned", node.address.port(), &["m"]).await;
    let body: Value = http
        .get(router.url("/api/version"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(body["version"], "0.5.7");
}

/// `llama3.2` and `llama3.2:latest` are one model to Ollama, whichever of
/// the two the node reports and the client asks for.
#[tokio::test]
async fn a_name_and_its_latest_tag_reach_the_same_node_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let untagged = StandIn::spawn(StandInOptions::ollama("untagged", &["llama3.2"]))
        .await
        .expect("stand-in");
    let tagged = StandIn::spawn(StandInOptions::ollama("tagged", &["qwen2:latest"]))
        .await
        .expect("stand-in");
    register_node(
        &client(),
        &router,
        "untagged",
        untagged.address.port(),
        &["llama3.2"],
    )
    .await;
    register_node(
        &client(),
        &router,
        "tagged",
        tagged.address.port(),
        &["qwen2:latest"],
    )
    .await;
    for (model, node) in [
        ("llama3.2", "untagged"),
        ("llama3.2:latest", "untagged"),
        ("qwen2", "tagged"),
        ("qwen2:latest", "tagged"),
    ] {
        let body = json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
        let (status, answer) = post(&router, "/api/chat", &body.to_string()).await;
        assert_eq!(status, 200, "{model}: {answer}");
        assert!(
            answer.to_string().contains(node),
            "{model} went to {answer}"
        );
    }
    let body = json!({"model": "qwen2:7b", "stream": false, "messages": []});
    let (status, _) = post(&router, "/api/chat", &body.to_string()).await;
    assert_eq!(status, 404, "another tag is another model");
}
