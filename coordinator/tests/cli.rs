//! The `llm-router` command line against a running router: `agents list`,
//! `show`, `remove` and `status`, as tables and as JSON; and JSON logs.

mod support;

use std::process::Output;

use serde_json::Value;
use support::{client, config, register, registration, TestRouter};

async fn llm_router(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(args)
        .env_remove("LLM_ROUTER_URL")
        .env_remove("LLM_ROUTER_ADMIN_TOKEN")
        .output()
        .await
        .expect("run llm-router")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn agents_list_show_remove_and_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let url = router.url("");
    let http = client();
    let first = register(&http, &url, &registration("gpu-east")).await;
    let second = register(&http, &url, &registration("gpu-west")).await;

    let listed: Vec<Value> = serde_json::from_str(&stdout(
        &llm_router(&["agents", "list", "--json", "--router-url", &url]).await,
    ))
    .expect("json");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["machine_name"], "gpu-east");

    let table = stdout(&llm_router(&["agents", "list", "--router-url", &url]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("STATUS"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "a header and a row per agent: {table}");
    assert!(
        lines[1].contains(&first) && lines[1].contains("gpu-east") && lines[1].contains("Online"),
        "{table}"
    );
    assert!(lines[1].contains("127.0.0.2:11434"), "{table}");

    let shown: Value = serde_json::from_str(&stdout(
        &llm_router(&["agents", "show", &second, "--router-url", &url]).await,
    ))
    .expect("json");
    assert_eq!(shown["id"], second.as_str());

    let status: Value = serde_json::from_str(&stdout(
        &llm_router(&["status", "--json", "--router-url", &url]).await,
    ))
    .expect("json");
    assert_eq!(status["agents"]["total"], 2);
    assert_eq!(status["agents"]["online"], 2);
    assert_eq!(status["models"], serde_json::json!(["smollm2:135m"]));
    let text = stdout(&llm_router(&["status", "--router-url", &url]).await);
    assert!(text.contains("2 (2 Online, 0 Offline"), "{text}");

    let removed = stdout(&llm_router(&["agents", "remove", &first, "--router-url", &url]).await);
    assert!(removed.contains(&first));
    let listed: Vec<Value> = serde_json::from_str(&stdout(
        &llm_router(&["agents", "list", "--json", "--router-url", &url]).await,
    ))
    .expect("json");
    assert_eq!(listed.len(), 1);

    // Errors say what the router said, and fail.
    let missing = llm_router(&["agents", "remove", &first, "--router-url", &url]).await;
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no agent with id"),
        "{missing:?}"
    );
    let malformed = llm_router(&["agents", "show", "not-an-id", "--router-url", &url]).await;
    assert!(!malformed.status.success());
    assert!(
        String::from_utf8_lossy(&malformed.stderr).contains("400"),
        "{malformed:?}"
    );
}

#[tokio::test]
async fn the_router_url_comes_from_the_environment_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(["status", "--json"])
        .env("LLM_ROUTER_URL", router.url(""))
        .output()
        .await
        .expect("run");
    let status: Value = serde_json::from_str(&stdout(&output)).expect("json");
    assert_eq!(status["agents"]["total"], 0);
}

#[tokio::test]
async fn an_unreachable_router_is_a_clear_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let output = llm_router(&["status", "--router-url", &format!("http://{closed}")]).await;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot reach the router"),
        "{output:?}"
    );
}

#[tokio::test]
async fn json_logs_are_one_json_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = support::RouterProcess::spawn(dir.path(), &["--log-format", "json"]).await;
    register(&client(), &router.url(""), &registration("logged")).await;
    nix::sys::signal::kill(router.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = router.child.wait().await.expect("wait");
    assert!(status.success());
    let lines = router.finished_log().await;
    assert!(!lines.is_empty());
    for line in &lines {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["fields"]["message"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("Agent registered.") && l.contains("agent_id")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn remove_takes_the_admin_token_when_the_router_requires_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.admin_token = Some(coordinator::auth::Secret::new("cli-admin-token"));
    let router = TestRouter::start(router_config).await;
    let id = register(&client(), &router.url(""), &registration("gpu-cli")).await;
    let url = router.url("");

    let refused = llm_router(&["agents", "remove", &id, "--router-url", &url]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(["agents", "remove", &id, "--router-url", &url])
        .env("LLM_ROUTER_ADMIN_TOKEN", "cli-admin-token")
        .output()
        .await
        .expect("run");
    assert!(stdout(&output).contains(&format!("removed {id}")));
    assert!(support::list(&client(), &url).await.is_empty());
}

/// `agents list` and `status` read a fleet larger than the CLI's page of
/// 1,000 a page at a time and still show every agent; `--limit` stops early.
#[tokio::test]
async fn list_and_status_read_a_large_fleet_a_page_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let url = router.url("");
    let http = client();
    let mut ids = Vec::new();
    for n in 0..1_003 {
        ids.push(register(&http, &url, &registration(&format!("gpu-{n:04}"))).await);
    }
    let listed: Vec<Value> = serde_json::from_str(&stdout(
        &llm_router(&["agents", "list", "--json", "--router-url", &url]).await,
    ))
    .expect("json");
    let listed: Vec<&str> = listed
        .iter()
        .map(|a| a["id"].as_str().expect("id"))
        .collect();
    assert_eq!(listed, ids, "every agent once, oldest first");

    let first: Vec<Value> = serde_json::from_str(&stdout(
        &llm_router(&[
            "agents",
            "list",
            "--json",
            "--limit",
            "3",
            "--router-url",
            &url,
        ])
        .await,
    ))
    .expect("json");
    let first: Vec<&str> = first
        .iter()
        .map(|a| a["id"].as_str().expect("id"))
        .collect();
    assert_eq!(first, ids[..3]);

    let status: Value = serde_json::from_str(&stdout(
        &llm_router(&["status", "--json", "--router-url", &url]).await,
    ))
    .expect("json");
    assert_eq!(status["agents"]["total"], 1_003);

    let refused = llm_router(&["agents", "list", "--limit", "0", "--router-url", &url]).await;
    assert!(!refused.status.success());
}
