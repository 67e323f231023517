//! Failover and timeouts of the proxy against misbehaving nodes that the
//! Python suite cannot easily stage: a node that accepts and never answers,
//! a node that answers 500, a node that stalls mid-stream.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{client, config, eventually, register_node, TestRouter};
use testkit::{StandIn, StandInOptions};

async fn agent(client: &reqwest::Client, router: &TestRouter, id: &str) -> Value {
    client
        .get(router.url(&format!("/api/agents/{id}")))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

async fn generate(
    client: &reqwest::Client,
    router: &TestRouter,
    stream: bool,
) -> reqwest::Response {
    client
        .post(router.url("/api/generate"))
        .json(&json!({"model": "m", "prompt": "x", "stream": stream}))
        .send()
        .await
        .expect("generate")
}

#[tokio::test]
async fn a_node_silent_before_its_first_byte_is_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.idle_timeout = Duration::from_millis(300);
    let router = TestRouter::start(cfg).await;
    let client = client();

    // Accepts connections, reads nothing, answers nothing.
    let black_hole = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let black_hole_port = black_hole.local_addr().expect("addr").port();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            held.push(socket);
        }
    });
    let healthy = StandIn::spawn(StandInOptions::ollama("healthy", &["m"]))
        .await
        .expect("stand-in");
    let silent_id = register_node(&client, &router, "silent", black_hole_port, &["m"]).await;
    register_node(&client, &router, "healthy", healthy.address.port(), &["m"]).await;

    for _ in 0..4 {
        let response = generate(&client, &router, false).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        assert!(body["response"].as_str().expect("text").contains("healthy"));
    }
    let silent = agent(&client, &router, &silent_id).await;
    assert_eq!(
        silent["routable"], false,
        "out of rotation after its first timeout"
    );
    assert_eq!(silent["in_flight"], 0);
}

#[tokio::test]
async fn a_node_answering_5xx_is_skipped_and_its_error_kept_when_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let client = client();

    let failing = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": "out of memory"})),
        )
    });
    let failing_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let failing_port = failing_listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(failing_listener, failing).await });
    let failing_id = register_node(&client, &router, "failing", failing_port, &["m"]).await;

    // Alone, the node's own 5xx reaches the client.
    let response = generate(&client, &router, false).await;
    assert_eq!(response.status(), 500);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "out of memory");

    // It is out of rotation now. A heartbeat saying its server is up does
    // not put it back: only the router's own probe can, and this server
    // fails that too (it answers 500 to everything).
    let beat = client
        .post(router.url(&format!("/api/agents/{failing_id}/heartbeat")))
        .json(&json!({"llm_server_up": true}))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(beat.status(), 200);
    let failing = agent(&client, &router, &failing_id).await;
    assert_eq!(failing["routable"], false, "{failing}");
    assert_eq!(failing["state"], "unreachable", "{failing}");
    let response = generate(&client, &router, false).await;
    assert_eq!(response.status(), 503, "its only node is out of rotation");
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );

    // With a healthy node beside it, no client sees an error.
    let healthy = StandIn::spawn(StandInOptions::ollama("healthy", &["m"]))
        .await
        .expect("stand-in");
    register_node(&client, &router, "healthy", healthy.address.port(), &["m"]).await;
    for _ in 0..4 {
        let response = generate(&client, &router, false).await;
        assert_eq!(
            response.status(),
            200,
            "the client sees no error while a node can serve"
        );
    }
    assert_eq!(
        agent(&client, &router, &failing_id).await["routable"],
        false
    );
}

/// A node whose generation failed once but whose server answers the
/// router's probe is back in rotation within the first probe's backoff,
/// with no heartbeat at all.
#[tokio::test]
async fn a_node_that_failed_returns_when_the_routers_probe_reaches_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let client = client();
    let failures_left = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1));
    let generations = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (left, served) = (failures_left.clone(), generations.clone());
    let flaky = axum::Router::new()
        .route(
            "/api/version",
            axum::routing::get(|| async { axum::Json(json!({"version": "0.5.7"})) }),
        )
        .route(
            "/api/generate",
            axum::routing::post(move || {
                let (left, served) = (left.clone(), served.clone());
                async move {
                    served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let failing = left
                        .fetch_update(
                            std::sync::atomic::Ordering::SeqCst,
                            std::sync::atomic::Ordering::SeqCst,
                            |n| n.checked_sub(1),
                        )
                        .is_ok();
                    if failing {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(json!({"error": "loading model"})),
                        )
                    } else {
                        (
                            axum::http::StatusCode::OK,
                            axum::Json(
                                json!({"model": "m", "response": "from flaky", "done": true}),
                            ),
                        )
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, flaky).await });
    let id = register_node(&client, &router, "flaky", port, &["m"]).await;

    assert_eq!(generate(&client, &router, false).await.status(), 503);
    assert_eq!(
        agent(&client, &router, &id).await["state"],
        "unreachable",
        "out of rotation after its failure"
    );
    let (client_ref, router_ref, id_ref) = (&client, &router, &id);
    eventually(
        Duration::from_secs(10),
        "the probe to put it back",
        || async move {
            (agent(client_ref, router_ref, id_ref).await["state"] == "serving").then_some(())
        },
    )
    .await;
    let response = generate(&client, &router, false).await;
    assert_eq!(response.status(), 200);
    assert!(response.text().await.expect("body").contains("from flaky"));
    assert_eq!(generations.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_stream_that_stalls_is_cut_after_the_idle_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.idle_timeout = Duration::from_millis(300);
    let router = TestRouter::start(cfg).await;
    let client = client();
    let mut options = StandInOptions::ollama("stalling", &["m"]);
    options.gated = true; // sends its first chunk, then waits for a release that never comes
    let stalling = StandIn::spawn(options).await.expect("stand-in");
    let id = register_node(
        &client,
        &router,
        "stalling",
        stalling.address.port(),
        &["m"],
    )
    .await;

    let response = generate(&client, &router, true).await;
    assert_eq!(response.status(), 200, "the answer had started");
    let mut stream = response.bytes_stream();
    use futures::StreamExt;
    let first = stream.next().await.expect("a first chunk").expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("Hello"));
    let mut cut = false;
    while let Some(chunk) = stream.next().await {
        if chunk.is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut, "the stream ends in an error, not a silent success");
    let router_ref = &router;
    let client_ref = &client;
    let id_ref = &id;
    eventually(Duration::from_secs(10), "the in-flight count to drop", || async move {
        (agent(client_ref, router_ref, id_ref).await["in_flight"] == 0).then_some(())
    })
    .await;
}

/// Two event loops and a slow first build of the routing table: every one
/// of a burst of first requests must be routed on a complete table (a race
/// once let a second loop use the empty table while the first built it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_never_see_an_empty_routing_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.threads = 2;
    let router = TestRouter::start(cfg).await;
    let client = client();
    let node = StandIn::spawn(StandInOptions::ollama("node", &["m"]))
        .await
        .expect("stand-in");
    for round in 0..3 {
        // Many agents make each rebuild take a while.
        let registrations =
            (0..700).map(|n| {
                let (client, router) = (&client, &router);
                let port = node.address.port();
                async move {
                    register_node(client, router, &format!("r{round}-n{n}"), port, &["m"]).await
                }
            });
        futures::future::join_all(registrations).await;
        let burst = (0..64).map(|_| async { generate(&client, &router, false).await.status() });
        let statuses = futures::future::join_all(burst).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "round {round}: {statuses:?}"
        );
    }
}

/// Connections to a node are pooled and reused: twenty requests in a row,
/// streamed and not, reach the node over one TCP connection. A relay in
/// front of the stand-in counts the connections the router opens.
#[tokio::test]
async fn connections_to_a_node_are_pooled_and_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let client = client();
    let node = StandIn::spawn(StandInOptions::ollama("pooled", &["m"]))
        .await
        .expect("stand-in");
    let relay = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let relay_port = relay.local_addr().expect("addr").port();
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&opened);
    let target = node.address;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = relay.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    register_node(&client, &router, "pooled", relay_port, &["m"]).await;
    for n in 0..20 {
        let response = generate(&client, &router, n % 2 == 0).await;
        assert_eq!(response.status(), 200);
        let body = response.text().await.expect("body");
        assert!(body.contains("pooled"), "{body}");
    }
    assert_eq!(
        opened.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one connection for every request"
    );
}
