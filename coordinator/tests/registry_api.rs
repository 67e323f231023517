//! The registry's HTTP contract against the real router: the seed's
//! endpoints and fields, re-registration identity, update and delete, and
//! every kind of bad input answered by a JSON 4xx that changes nothing.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{client, config, data_dir_bytes, list, register, registration, TestRouter};

async fn started() -> (tempfile::TempDir, TestRouter, reqwest::Client) {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    (dir, router, client())
}

#[tokio::test]
async fn health_answers_while_serving() {
    let (_dir, router, client) = started().await;
    let response = client
        .get(router.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn registration_is_listed_with_every_seed_field() {
    let (_dir, router, client) = started().await;
    let response = client
        .post(router.url("/api/agents/register"))
        .json(&registration("server-01"))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::CREATED);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["status"], "registered");
    let id = answer["id"].as_str().expect("id");
    let parsed = uuid::Uuid::parse_str(id).expect("uuid");
    assert_eq!(parsed.get_version_num(), 4);

    let agents = list(&client, &router.base()).await;
    assert_eq!(agents.len(), 1);
    let agent = &agents[0];
    assert_eq!(agent["id"], id);
    assert_eq!(agent["machine_name"], "server-01");
    assert_eq!(agent["ip_address"], "127.0.0.2");
    assert_eq!(agent["port"], 11434);
    assert_eq!(agent["runtime_version"], "0.5.7");
    assert_eq!(agent["status"], "Online");
    assert_eq!(agent["system_info"]["cpu_cores"], 8);
    assert_eq!(agent["system_info"]["total_memory"], 16_777_216u64);
    assert_eq!(agent["models"], json!(["smollm2:135m"]));
    for field in ["registered_at", "last_seen"] {
        let text = agent[field].as_str().expect("timestamp");
        let time = chrono::DateTime::parse_from_rfc3339(text).expect("RFC 3339");
        assert_eq!(time.offset().local_minus_utc(), 0, "{field} is UTC");
    }

    let one: Value = client
        .get(router.url(&format!("/api/agents/{id}")))
        .send()
        .await
        .expect("show")
        .json()
        .await
        .expect("json");
    assert_eq!(&one, agent);
}

#[tokio::test]
async fn port_defaults_to_ollamas_and_models_to_none() {
    let (_dir, router, client) = started().await;
    let mut body = registration("seed-shape");
    body.as_object_mut().expect("object").remove("port");
    body.as_object_mut().expect("object").remove("models");
    register(&client, &router.base(), &body).await;
    let agents = list(&client, &router.base()).await;
    assert_eq!(agents[0]["port"], 11434);
    assert_eq!(agents[0]["models"], json!([]));
}

#[tokio::test]
async fn registering_again_keeps_the_id_and_refreshes_the_rest() {
    let (_dir, router, client) = started().await;
    let id = register(&client, &router.base(), &registration("gpu-1")).await;

    let mut again = registration("gpu-1");
    again["runtime_version"] = json!("0.6.0");
    again["ip_address"] = json!("127.0.0.3");
    again["models"] = json!(["llama3:8b"]);
    let response = client
        .post(router.url("/api/agents/register"))
        .json(&again)
        .send()
        .await
        .expect("register again");
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["id"], id.as_str());

    let agents = list(&client, &router.base()).await;
    assert_eq!(agents.len(), 1, "no duplicate");
    assert_eq!(agents[0]["runtime_version"], "0.6.0");
    assert_eq!(agents[0]["ip_address"], "127.0.0.3");
    assert_eq!(agents[0]["models"], json!(["llama3:8b"]));

    // The same machine with a second LLM server on another port is another node.
    let mut other_port = registration("gpu-1");
    other_port["port"] = json!(11435);
    let other = register(&client, &router.base(), &other_port).await;
    assert_ne!(other, id);
    assert_eq!(list(&client, &router.base()).await.len(), 2);
}

#[tokio::test]
async fn concurrent_registrations_of_one_machine_get_one_id() {
    let (_dir, router, client) = started().await;
    let url = router.base();
    let attempts = (0..32).map(|_| {
        let client = client.clone();
        let url = url.clone();
        async move { register(&client, &url, &registration("racer")).await }
    });
    let ids = futures::future::join_all(attempts).await;
    assert!(
        ids.windows(2).all(|pair| pair[0] == pair[1]),
        "one identity, one id"
    );
    assert_eq!(list(&client, &url).await.len(), 1);
}

#[tokio::test]
async fn heartbeat_updates_last_seen_and_takes_a_report() {
    let (_dir, router, client) = started().await;
    let id = register(&client, &router.base(), &registration("beater")).await;
    let before = list(&client, &router.base()).await[0]["last_seen"].clone();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let empty = client
        .post(router.url(&format!("/api/agents/{id}/heartbeat")))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(empty.status(), StatusCode::OK);
    let after = list(&client, &router.base()).await[0]["last_seen"].clone();
    assert_ne!(before, after, "last_seen moved");

    let report = json!({"models": ["a", "b"], "loaded_models": ["a"], "requests_in_flight": 3,
                        "llm_server_up": true, "cpu_usage_percent": 12.5, "memory_used": 1024});
    let response = client
        .post(router.url(&format!("/api/agents/{id}/heartbeat")))
        .json(&report)
        .send()
        .await
        .expect("heartbeat with report");
    assert_eq!(response.status(), StatusCode::OK);
    let agent = &list(&client, &router.base()).await[0];
    assert_eq!(agent["report"], report);

    // A later report without some fields keeps their last values.
    client
        .post(router.url(&format!("/api/agents/{id}/heartbeat")))
        .json(&json!({"requests_in_flight": 0}))
        .send()
        .await
        .expect("partial report");
    let agent = &list(&client, &router.base()).await[0];
    assert_eq!(agent["report"]["requests_in_flight"], 0);
    assert_eq!(agent["report"]["loaded_models"], json!(["a"]));
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404_and_400() {
    let (_dir, router, client) = started().await;
    let unknown = uuid::Uuid::new_v4();
    for (method, path) in [
        ("POST", format!("/api/agents/{unknown}/heartbeat")),
        ("GET", format!("/api/agents/{unknown}")),
        ("DELETE", format!("/api/agents/{unknown}")),
    ] {
        let response = client
            .request(method.parse().expect("method"), router.url(&path))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {path}");
        let body: Value = response.json().await.expect("json error");
        assert_eq!(body["error"]["code"], "not_found");
    }
    let response = client
        .put(router.url(&format!("/api/agents/{unknown}")))
        .json(&json!({"runtime_version": "1"}))
        .send()
        .await
        .expect("put");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    for path in [
        "/api/agents/not-a-uuid/heartbeat",
        "/api/agents/12345",
        "/api/agents/%00/heartbeat",
    ] {
        let response = client.post(router.url(path)).send().await.expect("request");
        let status = response.status();
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::METHOD_NOT_ALLOWED,
            "{path}: {status}"
        );
        let body: Value = response.json().await.expect("json error");
        assert!(body["error"]["code"].is_string());
    }
}

#[tokio::test]
async fn status_filter_lists_only_that_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.agent_timeout = Duration::from_millis(300);
    let router = TestRouter::start(cfg).await;
    let client = client();
    let quiet = register(&client, &router.base(), &registration("quiet")).await;
    let lively = register(&client, &router.base(), &registration("lively")).await;
    let url = router.base();
    support::eventually(
        Duration::from_secs(10),
        "quiet goes Offline while lively beats",
        || {
            let client = client.clone();
            let url = url.clone();
            let lively = lively.clone();
            async move {
                client
                    .post(format!("{url}/api/agents/{lively}/heartbeat"))
                    .send()
                    .await
                    .ok()?;
                let offline: Vec<Value> = client
                    .get(format!("{url}/api/agents?status=Offline"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (offline.len() == 1).then_some(())
            }
        },
    )
    .await;
    let online: Vec<Value> = client
        .get(router.url("/api/agents?status=Online"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let offline: Vec<Value> = client
        .get(router.url("/api/agents?status=offline"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(online.len(), 1);
    assert_eq!(online[0]["id"], lively.as_str());
    assert_eq!(offline[0]["id"], quiet.as_str());

    let bad = client
        .get(router.url("/api/agents?status=Sleeping"))
        .send()
        .await
        .expect("list");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn update_and_delete_are_durable() {
    let (dir, router, client) = started().await;
    let keep = register(&client, &router.base(), &registration("keep")).await;
    let gone = register(&client, &router.base(), &registration("gone")).await;

    let response = client
        .put(router.url(&format!("/api/agents/{keep}")))
        .json(
            &json!({"runtime_version": "9.9.9", "models": ["m1", "m2"], "ip_address": "127.0.0.4"}),
        )
        .send()
        .await
        .expect("put");
    assert_eq!(response.status(), StatusCode::OK);
    let updated: Value = response.json().await.expect("json");
    assert_eq!(updated["runtime_version"], "9.9.9");
    assert_eq!(updated["machine_name"], "keep", "identity unchanged");

    let response = client
        .delete(router.url(&format!("/api/agents/{gone}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = client
        .get(router.url(&format!("/api/agents/{gone}")))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    router.stop().await.expect("clean stop");
    let router = TestRouter::start(config(dir.path())).await;
    let agents = list(&client, &router.base()).await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["id"], keep.as_str());
    assert_eq!(agents[0]["runtime_version"], "9.9.9");
    assert_eq!(agents[0]["ip_address"], "127.0.0.4");
    assert_eq!(agents[0]["models"], json!(["m1", "m2"]));

    // A deleted machine that registers again is a new agent.
    let again = register(&client, &router.base(), &registration("gone")).await;
    assert_ne!(again, gone);
}

/// Each bad request, what it is, and the status it must get.
fn bad_requests() -> Vec<(&'static str, Vec<u8>, StatusCode)> {
    let body = |value: Value| serde_json::to_vec(&value).expect("json");
    let with = |field: &str, value: Value| {
        let mut request = registration("bad");
        request[field] = value;
        body(request)
    };
    let without = |field: &str| {
        let mut request = registration("bad");
        request.as_object_mut().expect("object").remove(field);
        body(request)
    };
    let mut negative_cores = registration("bad");
    negative_cores["system_info"]["cpu_cores"] = json!(-4);
    let mut negative_memory = registration("bad");
    negative_memory["system_info"]["total_memory"] = json!(-1);
    let huge_name = "n".repeat(common::MAX_MACHINE_NAME_BYTES + 1);
    vec![
        (
            "malformed JSON",
            b"{\"machine_name\": ".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "not JSON at all",
            b"machine_name=x".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        ("empty body", Vec::new(), StatusCode::BAD_REQUEST),
        (
            "a JSON array",
            b"[]".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("null", b"null".to_vec(), StatusCode::UNPROCESSABLE_ENTITY),
        (
            "missing machine_name",
            without("machine_name"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "missing ip_address",
            without("ip_address"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "missing system_info",
            without("system_info"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "missing runtime_version",
            without("runtime_version"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "machine_name a number",
            with("machine_name", json!(7)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "port a string",
            with("port", json!("11434")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "models not a list",
            with("models", json!("llama")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "empty machine_name",
            with("machine_name", json!("")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "blank machine_name",
            with("machine_name", json!("   ")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "over-long machine_name",
            with("machine_name", json!(huge_name)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "control characters in machine_name",
            with("machine_name", json!("a\nb")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "invalid IP",
            with("ip_address", json!("999.1.1.1")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "a host name for an IP",
            with("ip_address", json!("gpu.example")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unspecified IP",
            with("ip_address", json!("0.0.0.0")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "negative port",
            with("port", json!(-1)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "port zero",
            with("port", json!(0)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "port too large",
            with("port", json!(70000)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "negative cpu_cores",
            body(negative_cores),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "negative total_memory",
            body(negative_memory),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "empty model name",
            with("models", json!([""])),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown backend",
            with("backend", json!("tgi")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "oversized body",
            with("runtime_version", json!("v".repeat(100 * 1024))),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ]
}

#[tokio::test]
async fn bad_registrations_get_json_4xx_and_change_nothing() {
    let (dir, router, client) = started().await;
    let known = register(&client, &router.base(), &registration("known")).await;
    // A restart leaves a settled data dir (snapshot written, journal empty)
    // that nothing rewrites until a change is made.
    router.stop().await.expect("clean stop");
    let router = TestRouter::start(config(dir.path())).await;
    let listed_before = list(&client, &router.base()).await;
    let files_before = data_dir_bytes(dir.path());

    for (what, body, expected) in bad_requests() {
        let response = client
            .post(router.url("/api/agents/register"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), expected, "{what}");
        let error: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: error body is not JSON: {e}"));
        assert!(error["error"]["code"].is_string(), "{what}: {error}");
        assert!(error["error"]["message"].is_string(), "{what}: {error}");
    }

    // Bad heartbeats and updates of a known agent change nothing either.
    for body in [
        &b"{\"models\": 5}"[..],
        b"{\"cpu_usage_percent\": 250}",
        b"{not json",
        b"[1,2]",
    ] {
        let response = client
            .post(router.url(&format!("/api/agents/{known}/heartbeat")))
            .body(body.to_vec())
            .send()
            .await
            .expect("heartbeat");
        assert!(
            response.status().is_client_error(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    for body in [
        json!({"ip_address": "not-an-ip"}),
        json!({"models": [""]}),
        json!({"system_info": {"os": 1}}),
    ] {
        let response = client
            .put(router.url(&format!("/api/agents/{known}")))
            .json(&body)
            .send()
            .await
            .expect("put");
        assert!(response.status().is_client_error(), "{body}");
    }

    assert_eq!(list(&client, &router.base()).await, listed_before);
    assert_eq!(
        data_dir_bytes(dir.path()),
        files_before,
        "the data dir is byte-for-byte unchanged"
    );
}

/// Unknown paths and wrong methods also answer in JSON.
#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let (_dir, router, client) = started().await;
    let response = client
        .get(router.url("/no/such/route"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.json::<Value>().await.expect("json")["error"]["code"].is_string());
    let response = client
        .get(router.url("/api/agents/register"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(response.json::<Value>().await.expect("json")["error"]["code"].is_string());
}
