//! TLS end to end with the real binaries: the router serves HTTPS with a
//! certificate made here for 127.0.0.1; the CLI and an agent reach it with
//! that certificate as their CA; plain HTTP and an untrusted client fail.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use support::{eventually, registration, RouterProcess};
use testkit::{StandIn, StandInOptions};

/// A self-signed certificate for 127.0.0.1, its key, and where they are.
fn certificate(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, reqwest::Certificate) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("a certificate");
    let cert_pem = certified.cert.pem();
    let cert_path = dir.join("router.crt");
    let key_path = dir.join("router.key");
    std::fs::write(&cert_path, &cert_pem).expect("write cert");
    std::fs::write(&key_path, certified.key_pair.serialize_pem()).expect("write key");
    let trusted = reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("pem");
    (cert_path, key_path, trusted)
}

/// An agent (run in this process, as its binary runs it) that trusts `ca`.
fn agent_over_tls(
    router: &str,
    llm_server: &str,
    name: &str,
    token: Option<&str>,
    ca: &std::path::Path,
    state_dir: &std::path::Path,
) -> agent::AgentConfig {
    agent::AgentConfig {
        router_url: vec![router.to_owned()],
        backend_url: Some(llm_server.to_owned()),
        heartbeat_interval: Duration::from_millis(100),
        machine_name: Some(name.to_owned()),
        advertise_ip: None,
        log_format: agent::config::LogFormat::Text,
        token: token.map(str::to_owned),
        token_file: None,
        drain_timeout: Duration::from_secs(5),
        max_concurrency: None,
        ca_cert: Some(ca.to_owned()),
        state_dir: Some(state_dir.to_owned()),
    }
}

#[tokio::test]
async fn the_router_the_cli_and_an_agent_speak_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, trusted) = certificate(dir.path());
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let mut router = RouterProcess::spawn(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            &cert_arg,
            "--tls-key",
            &key_arg,
            "--agent-token",
            "tls-join-token",
        ],
    )
    .await;
    let base = format!("https://127.0.0.1:{}", router.address.port());

    let client = reqwest::Client::builder()
        .add_root_certificate(trusted)
        .build()
        .expect("client");
    let health = client
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("https");
    assert_eq!(health.status(), StatusCode::OK);
    // Not trusted: refused by the client. Plain HTTP: no answer.
    assert!(support::client()
        .get(format!("{base}/health"))
        .send()
        .await
        .is_err());
    assert!(support::client()
        .get(router.url("/health"))
        .send()
        .await
        .is_err());

    // A registration over TLS, with the join token.
    let registered = client
        .post(format!("{base}/api/agents/register"))
        .bearer_auth("tls-join-token")
        .json(&registration("tls-node"))
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), StatusCode::CREATED);

    // The CLI, trusting the certificate.
    let listed = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args([
            "agents",
            "list",
            "--json",
            "--router-url",
            &base,
            "--ca-cert",
            &cert_arg,
        ])
        .output()
        .await
        .expect("cli");
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let agents: Vec<Value> = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(agents[0]["machine_name"], "tls-node");
    let untrusted = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(["status", "--router-url", &base])
        .output()
        .await
        .expect("cli");
    assert!(
        !untrusted.status.success(),
        "an untrusted certificate is refused"
    );

    // An agent over TLS: registers, heartbeats, drains.
    let standin = StandIn::spawn(StandInOptions::ollama("tls-agent", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let agent_config = agent_over_tls(
        &base,
        &standin.url(),
        "tls-agent",
        Some("tls-join-token"),
        &cert,
        &dir.path().join("agent-state"),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent::run(agent_config, stop.clone()));
    let seen = eventually(
        Duration::from_secs(10),
        "the agent reports over TLS",
        || {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let agents: Vec<Value> = client
                    .get(format!("{base}/api/agents"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                agents.into_iter().find(|agent| {
                    agent["machine_name"] == "tls-agent" && agent["report"]["llm_server_up"] == true
                })
            }
        },
    )
    .await;
    stop.cancel();
    task.await.expect("agent task").expect("agent run");
    let after: Value = client
        .get(format!(
            "{base}/api/agents/{}",
            seen["id"].as_str().expect("id")
        ))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(after["draining"], true, "the drain went over TLS too");

    // The agent checks the router's certificate: without --ca-cert it
    // trusts only the system's roots, and refuses this one.
    let untrusting = agent::router_client::RouterClient::new(
        vec![base.clone()],
        Some("tls-join-token".to_owned()),
        Vec::new(),
    )
    .expect("client");
    let request: common::RegisterRequest =
        serde_json::from_value(registration("untrusting-node")).expect("request");
    let refused = untrusting
        .register(&request)
        .await
        .err()
        .expect("a certificate no trusted CA signed is refused");
    let mut reasons = refused.to_string();
    let mut source = std::error::Error::source(&refused);
    while let Some(cause) = source {
        reasons.push_str(": ");
        reasons.push_str(&cause.to_string());
        source = cause.source();
    }
    assert!(
        matches!(refused, agent::router_client::RouterError::Unreachable(_))
            && reasons.contains("UnknownIssuer"),
        "{reasons}"
    );

    let log = router.terminate().await;
    assert!(log.contains("listening on https://"), "{log}");
    assert!(!log.contains("tls-join-token"));
}

#[tokio::test]
async fn a_bad_certificate_or_key_stops_start_up_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _key, _) = certificate(dir.path());
    let other = tempfile::tempdir().expect("tempdir");
    let (_, other_key, _) = certificate(other.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    for (cert, key, says) in [
        (&garbage, &other_key, "--tls-cert"),
        (&cert, &garbage, "--tls-key"),
        (&cert, &other_key, "do not make a usable pair"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
            .args(["--port", "0", "--host", "127.0.0.1", "--tls-cert"])
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("run");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{says}: {stderr}");
    }
}

/// A node whose LLM server speaks HTTPS: its agent finds it at an https://
/// backend URL and registers it with `tls`; the router connects with TLS,
/// checking the node's certificate against `--node-ca-cert`, streaming
/// included. A router that does not trust the certificate does not send
/// prompts there.
#[tokio::test]
async fn nodes_that_speak_https_are_reached_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let (cert_pem, key_pem) = (certified.cert.pem(), certified.key_pair.serialize_pem());
    let ca_path = dir.path().join("node-ca.pem");
    std::fs::write(&ca_path, &cert_pem).expect("write");
    let standin = StandIn::spawn_tls(
        StandInOptions::ollama("secure-node", &["smollm2:135m"]),
        &cert_pem,
        &key_pem,
    )
    .await
    .expect("TLS stand-in");
    let ca_arg = ca_path.display().to_string();
    let mut router =
        RouterProcess::spawn(&dir.path().join("data"), &["--node-ca-cert", &ca_arg]).await;
    let (client, base) = (support::client(), router.url(""));

    let agent_config = agent_over_tls(
        &base,
        &format!("https://127.0.0.1:{}", standin.address.port()),
        "secure-node",
        None,
        &ca_path,
        &dir.path().join("agent-state"),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent::run(agent_config, stop.clone()));
    let node = eventually(
        Duration::from_secs(10),
        "the agent registers its https server",
        || {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let agents: Vec<Value> = client
                    .get(format!("{base}/api/agents"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                agents.into_iter().find(|agent| {
                    agent["machine_name"] == "secure-node"
                        && agent["report"]["llm_server_up"] == true
                })
            }
        },
    )
    .await;
    assert_eq!(node["tls"], true, "{node}");

    let answer: Value = client
        .post(format!("{base}/api/chat"))
        .json(&serde_json::json!({"model": "smollm2:135m", "messages": [], "stream": false}))
        .send()
        .await
        .expect("chat")
        .json()
        .await
        .expect("json");
    assert!(
        answer["message"]["content"]
            .as_str()
            .is_some_and(|text| text.contains("secure-node")),
        "{answer}"
    );
    let streamed = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "smollm2:135m", "messages": [], "stream": true}))
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("text");
    assert!(streamed.contains("data: [DONE]"), "{streamed}");
    stop.cancel();
    task.await.expect("agent task").expect("agent run");
    router.terminate().await;

    // A router that does not trust the node's certificate.
    let mut untrusting = RouterProcess::spawn(&dir.path().join("data-2"), &[]).await;
    let base = untrusting.url("");
    let mut body = registration("secure-node");
    body["ip_address"] = serde_json::json!("127.0.0.1");
    body["port"] = serde_json::json!(standin.address.port());
    body["tls"] = serde_json::json!(true);
    support::register(&client, &base, &body).await;
    let requests_before = standin.stats.to_json_for_tests()["requests"].clone();
    let refused = client
        .post(format!("{base}/api/chat"))
        .json(&serde_json::json!({"model": "smollm2:135m", "messages": [], "stream": false}))
        .send()
        .await
        .expect("chat");
    assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        standin.stats.to_json_for_tests()["requests"],
        requests_before,
        "no prompt reached it untrusted"
    );
    let log = untrusting.terminate().await;
    assert!(log.contains("TLS with the node"), "{log}");

    // The router's own health checks go out with the proxy's trust (one
    // read of the system's store, plus --node-ca-cert). With no agent, every
    // request the node answers from here on is a check.
    let mut checking = RouterProcess::spawn(
        &dir.path().join("data-3"),
        &["--node-ca-cert", &ca_arg, "--health-check-interval", "0.1"],
    )
    .await;
    let base = checking.url("");
    let id = support::register(&client, &base, &body).await;
    let requests = || {
        standin.stats.to_json_for_tests()["requests"]
            .as_u64()
            .expect("a count")
    };
    let before = requests();
    eventually(
        Duration::from_secs(10),
        "three health checks answered over TLS",
        || async { (requests() >= before + 3).then_some(()) },
    )
    .await;
    let (status, agent) = support::get_json(&client, format!("{base}/api/agents/{id}")).await;
    assert_eq!(status, 200, "{agent}");
    assert_eq!(
        agent["state"], "serving",
        "checks that pass keep it in: {agent}"
    );
    let log = checking.terminate().await;
    assert!(
        !log.contains("Could not start the health checks") && !log.contains("Health checks failed"),
        "{log}"
    );
}
