//! Generated bad input for every registry handler: register, list, show,
//! heartbeat, update, delete and drain, with bodies that are random bytes,
//! random JSON, or valid bodies with fields removed, retyped or added, and
//! ids that are known, unknown or not ids at all. At least 100,000 requests
//! go to the real router over HTTP. Every answer must be below 500 (a panic
//! would show as a dropped connection), every 4xx must be a JSON error, and
//! no rejected request may touch the store.
//!
//! `LLM_ROUTER_FUZZ_CASES` sets the number of requests (100,000 when unset).

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Map, Value};
use support::{config, registration, TestRouter};

/// Machines the test keeps registered; requests name them by index, so a
/// deleted one can be registered again under a new id.
const KNOWN: usize = 6;

#[derive(Debug, Clone)]
enum IdChoice {
    Known(usize),
    Unknown(u128),
    /// Path-safe text that is not a UUID (or, rarely, is one by chance).
    Garbage(String),
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Bytes(Vec<u8>),
    Json(Value),
}

#[derive(Debug, Clone)]
enum Route {
    Register,
    List(Option<String>),
    Show,
    Heartbeat,
    Update,
    Delete,
    Drain,
}

#[derive(Debug, Clone)]
struct FuzzRequest {
    route: Route,
    id: IdChoice,
    body: Body,
    content_type: Option<&'static str>,
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,24}".prop_map(Value::String),
        // Long strings, past the field limits.
        (200usize..2000).prop_map(|n| Value::String("x".repeat(n))),
        prop_oneof![
            Just("127.0.0.3"),
            Just("::1"),
            Just("0.0.0.0"),
            Just("224.0.0.1"),
            Just("not-an-ip"),
            Just("Online"),
            Just("openai"),
            Just("ollama"),
            Just(""),
            Just("\u{0000}\u{0007}"),
        ]
        .prop_map(|text| Value::String(text.to_owned())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A valid body of some route with a few fields removed, retyped or added.
fn mutated(valid: Value) -> impl Strategy<Value = Value> {
    let Value::Object(fields) = valid else {
        unreachable!("valid bodies are objects")
    };
    let keys: Vec<String> = fields.keys().cloned().collect();
    prop::collection::vec(
        (0..3u8, prop::sample::select(keys), ".{0,12}", json_value()),
        0..4,
    )
    .prop_map(move |mutations| {
        let mut fields: Map<String, Value> = fields.clone();
        for (kind, key, new_key, value) in mutations {
            match kind {
                0 => {
                    fields.remove(&key);
                }
                1 => {
                    fields.insert(key, value);
                }
                _ => {
                    fields.insert(new_key, value);
                }
            }
        }
        Value::Object(fields)
    })
}

fn valid_update() -> Value {
    serde_json::json!({
        "ip_address": "127.0.0.4",
        "runtime_version": "0.6.0",
        "system_info": {"os": "Linux", "arch": "aarch64", "cpu_cores": 4, "total_memory": 1024},
        "models": ["m1", "m2"],
        "backend": "openai"
    })
}

fn valid_report() -> Value {
    serde_json::json!({
        "models": ["m1"],
        "loaded_models": ["m1"],
        "requests_in_flight": 3,
        "llm_server_up": true,
        "cpu_usage_percent": 12.5,
        "memory_used": 1024
    })
}

fn body_for(valid: Value) -> impl Strategy<Value = Body> {
    prop_oneof![
        1 => Just(Body::None),
        2 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
        2 => json_value().prop_map(Body::Json),
        5 => mutated(valid).prop_map(Body::Json),
    ]
}

fn id_choice() -> impl Strategy<Value = IdChoice> {
    prop_oneof![
        6 => (0..KNOWN).prop_map(IdChoice::Known),
        2 => any::<u128>().prop_map(IdChoice::Unknown),
        // "." and ".." are dot segments: the client resolves them away
        // (`/api/agents/..` is sent as `/api/`), so they never reach the
        // router as an id.
        2 => "[A-Za-z0-9._~!$&'()*+,;=:@-]{1,60}"
            .prop_filter("a dot segment is not sent as an id", |text| text != "." && text != "..")
            .prop_map(IdChoice::Garbage),
    ]
}

fn request() -> impl Strategy<Value = FuzzRequest> {
    let route = prop_oneof![
        3 => Just(Route::Register),
        1 => proptest::option::of(".{0,16}").prop_map(Route::List),
        1 => Just(Route::Show),
        3 => Just(Route::Heartbeat),
        3 => Just(Route::Update),
        1 => Just(Route::Delete),
        1 => Just(Route::Drain),
    ];
    let content_type = prop_oneof![
        Just(None),
        Just(Some("application/json")),
        Just(Some("text/plain")),
        Just(Some("application/x-www-form-urlencoded")),
    ];
    (route, id_choice(), content_type)
        .prop_flat_map(|(route, id, content_type)| {
            let valid = match route {
                Route::Register => registration("fuzz-extra"),
                Route::Update => valid_update(),
                _ => valid_report(),
            };
            (Just(route), Just(id), Just(content_type), body_for(valid))
        })
        .prop_map(|(route, id, content_type, body)| FuzzRequest {
            route,
            id,
            body,
            content_type,
        })
}

/// Length and modification time of every file in the data dir: a journal
/// append, a truncation or a new snapshot changes one of them. (Whole bytes
/// would be exact, but the journal grows with every accepted change and
/// reading it after each of 100,000 requests would dominate the test.)
fn store_fingerprint(dir: &Path) -> Vec<(String, u64, SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            Some((
                entry.file_name().to_string_lossy().into_owned(),
                metadata.len(),
                metadata.modified().ok()?,
            ))
        })
        .collect();
    files.sort();
    files
}

struct Harness {
    client: reqwest::Client,
    base: String,
    data_dir: std::path::PathBuf,
    known: Mutex<Vec<String>>,
    counts: Mutex<[u64; 6]>,
}

impl Harness {
    async fn register_known(&self, index: usize) -> String {
        support::register(
            &self.client,
            &self.base,
            &registration(&format!("fuzz-known-{index}")),
        )
        .await
    }

    /// Removes the agents that accepted generated registrations created, so
    /// that the registry (and every list answer) stays small over 100,000
    /// requests.
    async fn prune(&self) {
        for agent in support::list(&self.client, &self.base).await {
            let name = agent["machine_name"].as_str().unwrap_or_default();
            if !name.starts_with("fuzz-known-") {
                let id = agent["id"].as_str().expect("id");
                let status = self
                    .client
                    .delete(format!("{}/api/agents/{id}", self.base))
                    .send()
                    .await
                    .expect("delete")
                    .status();
                assert!(status.is_success());
            }
        }
    }

    async fn check(&self, request: FuzzRequest) -> Result<(), TestCaseError> {
        let done: u64 = self.counts.lock().expect("counts").iter().sum();
        if done % 500 == 499 {
            self.prune().await;
        }
        let id = match &request.id {
            IdChoice::Known(index) => self.known.lock().expect("known")[*index].clone(),
            IdChoice::Unknown(bits) => uuid::Uuid::from_u128(*bits).to_string(),
            IdChoice::Garbage(text) => text.clone(),
        };
        let (method, path) = match &request.route {
            Route::Register => (reqwest::Method::POST, "/api/agents/register".to_owned()),
            Route::List(_) => (reqwest::Method::GET, "/api/agents".to_owned()),
            Route::Show => (reqwest::Method::GET, format!("/api/agents/{id}")),
            Route::Heartbeat => (reqwest::Method::POST, format!("/api/agents/{id}/heartbeat")),
            Route::Update => (reqwest::Method::PUT, format!("/api/agents/{id}")),
            Route::Delete => (reqwest::Method::DELETE, format!("/api/agents/{id}")),
            Route::Drain => (reqwest::Method::POST, format!("/api/agents/{id}/drain")),
        };
        let mut builder = self.client.request(method, format!("{}{path}", self.base));
        if let Route::List(Some(status)) = &request.route {
            builder = builder.query(&[("status", status)]);
        }
        if let Some(content_type) = request.content_type {
            builder = builder.header("content-type", content_type);
        }
        builder = match &request.body {
            Body::None => builder,
            Body::Bytes(bytes) => builder.body(bytes.clone()),
            Body::Json(value) => builder.body(value.to_string()),
        };
        let before = store_fingerprint(&self.data_dir);
        let response = builder
            .send()
            .await
            .map_err(|error| TestCaseError::fail(format!("no answer (a panic?): {error}")))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let bucket = (status.as_u16() / 100) as usize;
        self.counts.lock().expect("counts")[bucket.min(5)] += 1;
        prop_assert!(status.as_u16() < 500, "{status} for {request:?}: {text}");
        if status.is_client_error() {
            let body: Value = serde_json::from_str(&text)
                .map_err(|_| TestCaseError::fail(format!("a 4xx that is not JSON: {text}")))?;
            prop_assert!(body["error"]["code"].is_string(), "{text}");
            prop_assert_eq!(
                store_fingerprint(&self.data_dir),
                before,
                "a rejected request changed the store: {:?} -> {}",
                request,
                status
            );
        }
        if let (Route::Delete, IdChoice::Known(index), true) =
            (&request.route, &request.id, status.is_success())
        {
            let new_id = self.register_known(*index).await;
            self.known.lock().expect("known")[*index] = new_id;
        }
        Ok(())
    }
}

#[test]
fn registry_handlers_answer_generated_input_with_4xx_and_keep_the_store() {
    let cases: u32 = std::env::var("LLM_ROUTER_FUZZ_CASES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    // Only the requests themselves may write.
    router_config.flush_interval = Duration::from_secs(3600);
    router_config.snapshot_interval = Duration::from_secs(3600);
    // Each case compares the data dir before and after a rejected request;
    // a snapshot of earlier, accepted changes landing in between would be
    // the router's own doing, not the request's.
    router_config.snapshot_when_quiet = Duration::ZERO;
    let router = runtime.block_on(async { TestRouter::start(router_config).await });
    let harness = Arc::new(Harness {
        client: support::client(),
        base: router.url(""),
        data_dir: dir.path().to_path_buf(),
        known: Mutex::new(Vec::new()),
        counts: Mutex::new([0; 6]),
    });
    runtime.block_on(async {
        for index in 0..KNOWN {
            let id = harness.register_known(index).await;
            harness.known.lock().expect("known").push(id);
        }
    });

    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        // Each shrink step is an HTTP request; a bounded search reports a
        // failure in seconds instead of running for minutes.
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    });
    let result = runner.run(&request(), |request| {
        runtime.block_on(harness.check(request))
    });
    let counts = *harness.counts.lock().expect("counts");
    println!(
        "fuzz: {} requests: 2xx {}, 4xx {}, 5xx {}",
        counts.iter().sum::<u64>(),
        counts[2],
        counts[4],
        counts[5]
    );
    if let Err(failure) = result {
        panic!("{failure}");
    }
    assert!(counts.iter().sum::<u64>() >= u64::from(cases));
    assert!(
        counts[2] > 0 && counts[4] > 0,
        "both kinds of answer occurred"
    );
    runtime.block_on(async { router.stop().await.expect("clean stop") });
}
