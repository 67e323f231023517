//! `--balancer cache-aware` against stand-ins: every turn of a
//! conversation goes to the node that has its prefix, while conversations
//! spread over the nodes; on all four generation routes, streamed or not.

mod support;

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};
use support::{client, config, register, TestRouter};
use testkit::{StandIn, StandInOptions};

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

async fn router_and_nodes() -> (TestRouter, Vec<StandIn>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = config(dir.path());
    settings.balancer = coordinator::config::BalancerChoice::CacheAware;
    let router = TestRouter::start(settings).await;
    let http = client();
    let mut nodes = Vec::new();
    for name in NODES {
        let node = StandIn::spawn(StandInOptions::ollama(name, &["smollm2:135m"]))
            .await
            .expect("stand-in");
        let port: u16 = node.address.port();
        register(
            &http,
            &router.url(""),
            &json!({
                "machine_name": name, "ip_address": "127.0.0.1", "port": port,
                "runtime_version": "0.5.7", "models": ["smollm2:135m"],
                "system_info": {"os": "Linux", "arch": "x86_64", "cpu_cores": 2, "total_memory": 1024},
            }),
        )
        .await;
        nodes.push(node);
    }
    (router, nodes, dir)
}

/// Which stand-in answered: its answers say "Hello from <name>".
fn answered_by(text: &str) -> String {
    NODES
        .iter()
        .find(|name| text.contains(*name))
        .map(|name| (*name).to_owned())
        .unwrap_or_else(|| panic!("no node named in {text:?}"))
}

/// A system prompt of about 1,500 tokens, different per conversation.
fn system_prompt(conversation: usize) -> String {
    format!("You are assistant number {conversation}. ")
        + &"Keep answers short and exact. ".repeat(200)
}

#[tokio::test]
async fn each_conversation_keeps_to_one_node_and_conversations_spread() {
    let (router, _nodes, _dir) = router_and_nodes().await;
    let http = client();
    // Not a multiple of the node count, so that plain rotation would move
    // each conversation from node to node.
    let conversations = 5;
    let mut histories: Vec<Vec<Value>> = (0..conversations)
        .map(|c| vec![json!({"role": "system", "content": system_prompt(c)})])
        .collect();
    let mut where_each_went: HashMap<usize, HashSet<String>> = HashMap::new();
    // Turns interleaved: every conversation's first turn, then every second...
    for turn in 0..5 {
        for (conversation, history) in histories.iter_mut().enumerate() {
            history.push(json!({"role": "user", "content": format!("question {turn}")}));
            // Alternate the routes and streaming: the key is the prompt.
            let (path, body) = if (conversation + turn) % 2 == 0 {
                (
                    "/api/chat",
                    json!({"model": "smollm2:135m", "stream": turn % 3 == 0, "messages": history}),
                )
            } else {
                (
                    "/v1/chat/completions",
                    json!({"model": "smollm2:135m", "stream": turn % 3 == 1, "messages": history}),
                )
            };
            let text = http
                .post(router.url(path))
                .json(&body)
                .send()
                .await
                .expect("chat")
                .text()
                .await
                .expect("text");
            let node = answered_by(&text);
            history.push(json!({"role": "assistant", "content": format!("Hello from {node}")}));
            where_each_went
                .entry(conversation)
                .or_default()
                .insert(node);
        }
    }
    for (conversation, nodes) in &where_each_went {
        assert_eq!(
            nodes.len(),
            1,
            "conversation {conversation} went to {nodes:?}"
        );
    }
    let used: HashSet<&String> = where_each_went.values().flatten().collect();
    assert_eq!(
        used.len(),
        NODES.len(),
        "5 conversations over 3 idle nodes use all of them"
    );
}

/// Completions and generate: a prompt that grows from a shared document
/// keeps to its node; an unrelated prompt is free to go elsewhere.
#[tokio::test]
async fn growing_prompts_on_generate_and_completions_keep_to_their_node() {
    let (router, _nodes, _dir) = router_and_nodes().await;
    let http = client();
    for (path, field) in [("/api/generate", "prompt"), ("/v1/completions", "prompt")] {
        let document = format!("{path}: ") + &"A long shared document. ".repeat(300);
        let mut went = HashSet::new();
        for step in 0..4 {
            let prompt = format!("{document}{}", " and more".repeat(step));
            let text = http
                .post(router.url(path))
                .json(&json!({"model": "smollm2:135m", "stream": step % 2 == 0, field: prompt}))
                .send()
                .await
                .expect("generate")
                .text()
                .await
                .expect("text");
            went.insert(answered_by(&text));
        }
        assert_eq!(went.len(), 1, "{path}: {went:?}");
    }
}
