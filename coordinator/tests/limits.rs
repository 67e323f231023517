//! Limits against the real router: a cap on registered agents, and clients
//! that send a request head or body too slowly are cut off without holding
//! up anyone else.

mod common;

use std::time::Duration;

use common::{client, config, data_dir_bytes, registration, TestRouter};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn registering_past_the_cap_is_refused_clearly_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.max_agents = 2;
    let router = TestRouter::start(router_config).await;
    let (client, base) = (client(), router.url(""));
    common::register(&client, &base, &registration("gpu-a")).await;
    let b = common::register(&client, &base, &registration("gpu-b")).await;

    let before = data_dir_bytes(dir.path());
    let response = client
        .post(router.url("/api/agents/register"))
        .json(&registration("gpu-c"))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "agent_limit_reached");
    assert!(body["error"]["message"]
        .as_str()
        .expect("message")
        .contains("limit of 2"));
    assert_eq!(data_dir_bytes(dir.path()), before);
    assert_eq!(common::list(&client, &base).await.len(), 2);

    // A known machine registering again is not a new agent: still allowed.
    let response = client
        .post(router.url("/api/agents/register"))
        .json(&registration("gpu-a"))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::OK);
    // Room again after a delete.
    let status = client
        .delete(router.url(&format!("/api/agents/{b}")))
        .send()
        .await
        .expect("delete")
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    common::register(&client, &base, &registration("gpu-c")).await;
    router.stop().await.expect("clean stop");
}

/// Reads what the server sends until it closes the connection.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("the router closes a stalled connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn stalled_request_heads_are_cut_off_and_heartbeats_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.header_read_timeout = Duration::from_millis(300);
    let router = TestRouter::start(router_config).await;
    let (client, base) = (client(), router.url(""));
    let id = common::register(&client, &base, &registration("gpu-a")).await;

    // Many clients that start a request head and never finish it.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(router.address).await.expect("connect");
        stream
            .write_all(b"POST /api/agents/register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
            .await
            .expect("write");
        stalled.push(stream);
    }
    // Heartbeats are answered all the while.
    for _ in 0..20 {
        let status = client
            .post(router.url(&format!("/api/agents/{id}/heartbeat")))
            .send()
            .await
            .expect("heartbeat")
            .status();
        assert_eq!(status, StatusCode::OK);
    }
    // And every stalled connection is closed by the router.
    for stream in &mut stalled {
        let answer = read_until_closed(stream).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "a stalled head gets nothing or a 408, not a request: {answer:?}"
        );
    }
    router.stop().await.expect("clean stop");
}

#[tokio::test]
async fn stalled_request_bodies_get_408_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.body_read_timeout = Duration::from_millis(300);
    let router = TestRouter::start(router_config).await;
    let (client, base) = (client(), router.url(""));
    let id = common::register(&client, &base, &registration("gpu-a")).await;
    let before = data_dir_bytes(dir.path());

    for path in [
        "/api/agents/register".to_owned(),
        format!("/api/agents/{id}"),
        "/api/chat".to_owned(),
        "/v1/chat/completions".to_owned(),
    ] {
        let method = if path.ends_with(&id) { "PUT" } else { "POST" };
        let mut stream = TcpStream::connect(router.address).await.expect("connect");
        // The head promises 100 bytes; 10 come, then nothing.
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":"
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        let answer = read_until_closed(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{method} {path}: {answer:?}"
        );
        assert!(answer.contains("body_read_timeout") || answer.contains("did not arrive"));
    }
    assert_eq!(data_dir_bytes(dir.path()), before);
    let status = client
        .post(router.url(&format!("/api/agents/{id}/heartbeat")))
        .send()
        .await
        .expect("heartbeat")
        .status();
    assert_eq!(status, StatusCode::OK, "the router still serves");
    router.stop().await.expect("clean stop");
}

/// The header read timeout is about waiting for a request head: an answer
/// that takes longer than it, streamed or whole, is not cut, and the
/// connection then serves the next request.
#[tokio::test]
async fn answers_slower_than_the_header_timeout_are_not_cut() {
    use testkit::{StandIn, StandInOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.header_read_timeout = Duration::from_millis(300);
    let router = TestRouter::start(router_config).await;
    let mut options = StandInOptions::ollama("slow-node", &["smollm2:135m"]);
    options.chunks = 4;
    options.chunk_delay = Duration::from_millis(250);
    let standin = StandIn::spawn(options).await.expect("stand-in");
    let client = client();
    let mut node = registration("slow-node");
    node["ip_address"] = "127.0.0.1".into();
    node["port"] = standin.address.port().into();
    common::register(&client, &router.url(""), &node).await;

    for stream in [false, true, false] {
        let started = std::time::Instant::now();
        let response = client
            .post(router.url("/api/chat"))
            .json(&serde_json::json!({
                "model": "smollm2:135m",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            }))
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("the whole answer");
        assert!(
            text.contains("slow-node") && text.contains("\"done\":true"),
            "{text}"
        );
        assert!(
            started.elapsed() > Duration::from_millis(300),
            "the answer did take longer than the header timeout"
        );
    }
    router.stop().await.expect("clean stop");
}
