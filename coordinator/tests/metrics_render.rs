//! `/metrics` reads the same twice, families and series in order.
//!
//! Alone in its own test binary: the metrics recorder is global to a
//! process, so under plain `cargo test` (one process per test file, tests
//! in parallel threads) another test's traffic between the two scrapes
//! made them differ. nextest runs each test in its own process anyway.

mod support;

use serde_json::{json, Value};
use support::{client, config, register, TestRouter};
use testkit::{StandIn, StandInOptions};

async fn register_node(router: &TestRouter, name: &str, port: u16, models: &[&str]) -> String {
    register(
        &client(),
        &router.url(""),
        &json!({
            "machine_name": name,
            "ip_address": "127.0.0.1",
            "port": port,
            "runtime_version": "0.5.7",
            "system_info": {"os": "Linux", "arch": "x86_64", "cpu_cores": 2, "total_memory": 1024},
            "models": models,
        }),
    )
    .await
}

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

/// Two scrapes of an unchanged router read the same, families in name order.
#[tokio::test]
async fn metrics_read_the_same_twice_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let node = StandIn::spawn(StandInOptions::ollama("counted", &["a", "b", "c"]))
        .await
        .expect("stand-in");
    for n in 0..5 {
        register_node(
            &router,
            &format!("counted-{n}"),
            node.address.port(),
            &["a", "b", "c"],
        )
        .await;
    }
    for model in ["c", "a", "b", "nope"] {
        let body = json!({"model": model, "stream": false, "messages": []});
        post(&router, "/api/chat", &body.to_string()).await;
    }
    let scrape = || async {
        client()
            .get(router.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    };
    let first = scrape().await;
    let second = scrape().await;
    assert_eq!(first, second, "the same state reads the same");
    let families: Vec<&str> = first
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let mut sorted = families.clone();
    sorted.sort_unstable();
    assert_eq!(families, sorted, "families in name order");
    assert!(families.len() >= 8, "{families:?}");
    let requests: Vec<&str> = first
        .lines()
        .filter(|line| line.starts_with("llm_router_requests_total{"))
        .collect();
    let mut sorted_requests = requests.clone();
    sorted_requests.sort_unstable();
    assert_eq!(requests, sorted_requests, "series in label order");
}
