//! Node capacity and the queue at the router: a node is never sent more
//! requests at once than it takes; the rest wait at the router, in order,
//! and a full queue or a long wait is a 429 with Retry-After in each API's
//! error shape, never a 5xx.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{client, config, eventually, metrics_text, register, TestRouter};
use testkit::{StandIn, StandInOptions};

async fn slow_node(name: &str, chunk_delay: Duration) -> (StandIn, u16) {
    let options = StandInOptions {
        chunk_delay,
        ..StandInOptions::ollama(name, &["smollm2:135m"])
    };
    let node = StandIn::spawn(options).await.expect("stand-in");
    let port = node.address.port();
    (node, port)
}

async fn register_with_capacity(
    router: &TestRouter,
    name: &str,
    port: u16,
    capacity: u32,
) -> String {
    register(
        &client(),
        &router.url(""),
        &json!({
            "machine_name": name, "ip_address": "127.0.0.1", "port": port,
            "runtime_version": "0.5.7", "models": ["smollm2:135m"],
            "system_info": {"os": "Linux", "arch": "x86_64", "cpu_cores": 2, "total_memory": 1024},
            "max_concurrency": capacity,
        }),
    )
    .await
}

fn chat_body() -> Value {
    json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}]})
}

/// One chat request, not streamed: its status and JSON body (null when
/// the body is not JSON).
async fn chat(http: reqwest::Client, url: String) -> (u16, Value) {
    let response = http
        .post(url)
        .json(&chat_body())
        .send()
        .await
        .expect("chat");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The value of the first `/metrics` line that starts with `series`
/// followed by a space or a label set; NaN when there is none.
async fn metric(router: &TestRouter, series: &str) -> f64 {
    metrics_text(&client(), router)
        .await
        .lines()
        .filter_map(|line| line.strip_prefix(series))
        .find(|rest| rest.starts_with([' ', '{']))
        .and_then(|rest| rest.rsplit(' ').next())
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

async fn queue_length(router: &TestRouter) -> f64 {
    metric(router, "llm_router_queue_length").await
}

#[tokio::test]
async fn a_node_of_capacity_one_never_takes_two_and_every_queued_request_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let (node, port) = slow_node("one-slot", Duration::from_millis(40)).await;
    let id = register_with_capacity(&router, "one-slot", port, 1).await;
    let (_, agent) = support::get_json(&client(), router.url(&format!("/api/agents/{id}"))).await;
    assert_eq!(
        agent["max_concurrency"], 1,
        "the listing shows the capacity: {agent}"
    );

    let http = client();
    let requests = (0..8).map(|n| {
        let path = if n % 2 == 0 {
            "/api/chat"
        } else {
            "/v1/chat/completions"
        };
        chat(http.clone(), router.url(path))
    });
    let statuses: Vec<u16> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(|(status, _)| status)
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let stats = node.stats.to_json_for_tests();
    assert_eq!(stats["most_generations_at_once"], 1, "{stats}");
    assert_eq!(stats["generations_completed"], 8, "{stats}");
    assert_eq!(queue_length(&router).await, 0.0);
    // The waits are in /metrics (and, as their mean, on the dashboard).
    let waited = metric(&router, "llm_router_queue_wait_seconds_count").await;
    assert!(waited >= 1.0, "queue waits counted: {waited}");
}

#[tokio::test]
async fn a_full_queue_and_a_long_wait_answer_429_with_retry_after_in_each_apis_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = config(dir.path());
    settings.queue_size = 1;
    settings.queue_timeout = Duration::from_millis(1500);
    let router = TestRouter::start(settings).await;
    // One generation takes about 2 s: 4 chunks, 500 ms apart.
    let (_node, port) = slow_node("busy", Duration::from_millis(500)).await;
    register_with_capacity(&router, "busy", port, 1).await;
    let http = client();

    let running = tokio::spawn(chat(http.clone(), router.url("/api/chat")));
    eventually(
        Duration::from_secs(5),
        "the first request at the node",
        || {
            let (http, url) = (http.clone(), router.url("/api/agents"));
            async move {
                let (_, agents) = support::get_json(&http, url).await;
                (agents[0]["in_flight"] == 1).then_some(())
            }
        },
    )
    .await;
    let queued = tokio::spawn(chat(http.clone(), router.url("/v1/chat/completions")));
    eventually(Duration::from_secs(5), "one request queued", || async {
        (queue_length(&router).await == 1.0).then_some(())
    })
    .await;

    // The queue holds one: the next is refused at once, in Ollama's shape...
    let full = http
        .post(router.url("/api/chat"))
        .json(&chat_body())
        .send()
        .await
        .expect("chat");
    assert_eq!(full.status(), 429);
    assert!(full.headers().contains_key("retry-after"));
    let body: Value = full.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("--queue-size")),
        "{body}"
    );
    // ...and in OpenAI's.
    let full = http
        .post(router.url("/v1/chat/completions"))
        .json(&chat_body())
        .send()
        .await
        .expect("chat");
    assert_eq!(full.status(), 429);
    let body: Value = full.json().await.expect("json");
    assert_eq!(body["error"]["code"], "queue_full", "{body}");

    // The queued one waited past --queue-timeout: 429, not a 5xx.
    let (status, body) = queued.await.expect("queued");
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "queue_timeout", "{body}");
    assert_eq!(running.await.expect("running").0, 200);
    assert_eq!(queue_length(&router).await, 0.0);
}

/// A client that gives up while queued leaves the queue at once.
#[tokio::test]
async fn a_client_that_leaves_while_queued_leaves_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    // Four chunks a second apart: the slot stays taken for about 4 s.
    let (_node, port) = slow_node("held", Duration::from_secs(1)).await;
    register_with_capacity(&router, "held", port, 1).await;
    let http = client();
    let running = tokio::spawn(chat(http.clone(), router.url("/api/chat")));
    // Waited for, not slept for: the impatient request must be the one queued.
    eventually(
        Duration::from_secs(5),
        "the first request holds the node's one slot",
        || async {
            (metric(&router, "llm_router_node_requests_in_flight").await == 1.0).then_some(())
        },
    )
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    let giving_up = tokio::spawn({
        let url = router.url("/api/chat");
        async move { impatient.post(url).json(&chat_body()).send().await }
    });
    eventually(
        Duration::from_secs(1),
        "the impatient request queued",
        || async { (queue_length(&router).await == 1.0).then_some(()) },
    )
    .await;
    assert!(
        giving_up.await.expect("task").is_err(),
        "the impatient client timed out"
    );
    // Long before the running request ends (about 4 s in) and frees the slot.
    eventually(
        Duration::from_secs(1),
        "the queue is empty again",
        || async { (queue_length(&router).await == 0.0).then_some(()) },
    )
    .await;
    assert!(!running.is_finished(), "the slot is still taken");
    assert_eq!(running.await.expect("running").0, 200);
}

/// The agent reads llama.cpp's slots from `/props` and reports them; the
/// router then holds the node to them.
#[tokio::test]
async fn the_agent_reports_llama_cpp_slots_as_the_nodes_capacity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let options = StandInOptions {
        slots: Some(2),
        ..StandInOptions::openai("llama-cpp", &["smollm2"])
    };
    let node = StandIn::spawn(options).await.expect("stand-in");
    let state = tempfile::tempdir().expect("state");
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(agent::run(
        support::agent_config(
            vec![router.url("")],
            node.url(),
            "llama-cpp",
            Duration::from_millis(100),
            state.path(),
        ),
        stop.clone(),
    ));
    let http = client();
    eventually(Duration::from_secs(5), "the slots reported", || {
        let (http, url) = (http.clone(), router.url("/api/agents"));
        async move {
            let (_, agents) = support::get_json(&http, url).await;
            (agents[0]["max_concurrency"] == 2 && agents[0]["report"]["max_concurrency"] == 2)
                .then_some(())
        }
    })
    .await;
    stop.cancel();
    let _ = agent.await;
}
