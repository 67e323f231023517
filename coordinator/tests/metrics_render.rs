//! `/metrics` reads the same twice, families and series in order.
//!
//! Alone in its own test binary: the metrics recorder is global to a
//! process, so under plain `cargo test` (one process per test file, tests
//! in parallel threads) another test's traffic between the two scrapes
//! made them differ. nextest runs each test in its own process anyway.

mod support;

use serde_json::json;
use support::{client, config, metrics_text, register_node, TestRouter};
use testkit::{StandIn, StandInOptions};

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
            &client(),
            &router,
            &format!("counted-{n}"),
            node.address.port(),
            &["a", "b", "c"],
        )
        .await;
    }
    for model in ["c", "a", "b", "nope"] {
        let body = json!({"model": model, "stream": false, "messages": []});
        client()
            .post(router.url("/api/chat"))
            .json(&body)
            .send()
            .await
            .expect("chat");
    }
    let first = metrics_text(&client(), &router).await;
    let second = metrics_text(&client(), &router).await;
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
