//! The agent against the real router and a stand-in LLM server: it detects
//! the server, registers what it serves, heartbeats its report, registers
//! again when the router forgot it, and outlives router downtime.

mod support;

use std::time::Duration;

use agent::AgentConfig;
use serde_json::{json, Value};
use support::{client, config, eventually, list, TestRouter};
use testkit::{StandIn, StandInOptions};
use tokio_util::sync::CancellationToken;

/// Runs the agent in this process through the same `run` its binary calls.
struct RunningAgent {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Its own state dir, unless the test gave one.
    _state_dir: Option<tempfile::TempDir>,
}

impl RunningAgent {
    fn start(router_url: String, backend_url: String, name: &str) -> Self {
        Self::start_with_token(router_url, backend_url, name, None)
    }

    fn start_with_token(
        router_url: String,
        backend_url: String,
        name: &str,
        token: Option<&str>,
    ) -> Self {
        let state_dir = tempfile::tempdir().expect("tempdir");
        let mut agent = Self::start_in(router_url, backend_url, name, token, state_dir.path());
        agent._state_dir = Some(state_dir);
        agent
    }

    /// With the state dir the test gives, so that a restarted agent finds
    /// the secret its last run kept.
    fn start_in(
        router_url: String,
        backend_url: String,
        name: &str,
        token: Option<&str>,
        state_dir: &std::path::Path,
    ) -> Self {
        let config = AgentConfig {
            state_dir: Some(state_dir.to_owned()),
            ca_cert: None,
            token: token.map(str::to_owned),
            token_file: None,
            router_url: router_url.split(',').map(str::to_owned).collect(),
            backend_url: Some(backend_url),
            heartbeat_interval: Duration::from_millis(100),
            machine_name: Some(name.to_owned()),
            advertise_ip: None,
            drain_timeout: Duration::from_secs(5),
            max_concurrency: None,
            log_format: agent::config::LogFormat::Text,
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(agent::run(config, stop.clone()));
        RunningAgent {
            stop,
            task,
            _state_dir: None,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the agent stops promptly")
            .expect("agent task")
            .expect("agent run");
    }
}

async fn agent_named(client: &reqwest::Client, base: &str, name: &str) -> Option<Value> {
    list(client, base)
        .await
        .into_iter()
        .find(|a| a["machine_name"] == name)
}

#[tokio::test]
async fn agent_registers_its_ollama_server_and_reports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let mut options = StandInOptions::ollama("node-a", &["smollm2:135m", "qwen2:0.5b"]);
    options.loaded_models = vec!["smollm2:135m".to_owned()];
    let standin = StandIn::spawn(options).await.expect("stand-in");
    let agent = RunningAgent::start(router.url(""), standin.url(), "node-a");
    let client = client();
    let base = router.url("");

    let registered = eventually(
        Duration::from_secs(10),
        "the agent registers and reports",
        || {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let agent = agent_named(&client, &base, "node-a").await?;
                agent["report"]["loaded_models"].is_array().then_some(agent)
            }
        },
    )
    .await;
    assert_eq!(registered["runtime_version"], "0.5.7");
    assert_eq!(registered["port"], standin.address.port());
    assert_eq!(registered["ip_address"], "127.0.0.1");
    assert_eq!(registered["backend"], "ollama");
    assert_eq!(registered["models"], json!(["smollm2:135m", "qwen2:0.5b"]));
    assert_eq!(
        registered["report"]["loaded_models"],
        json!(["smollm2:135m"])
    );
    assert_eq!(registered["report"]["llm_server_up"], true);
    assert!(
        registered["system_info"]["cpu_cores"]
            .as_u64()
            .expect("cores")
            >= 1
    );
    assert!(
        registered["system_info"]["total_memory"]
            .as_u64()
            .expect("memory")
            > 0
    );
    assert!(!registered["system_info"]["os"]
        .as_str()
        .expect("os")
        .is_empty());
    agent.stop().await;
}

#[tokio::test]
async fn agent_detects_an_openai_compatible_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let standin = StandIn::spawn(StandInOptions::openai("node-v", &["SmolLM2-135M"]))
        .await
        .expect("stand-in");
    let agent = RunningAgent::start(router.url(""), standin.url(), "node-v");
    let (client, base) = (client(), router.url(""));
    let registered = eventually(Duration::from_secs(10), "the agent registers", || {
        let (client, base) = (client.clone(), base.clone());
        async move { agent_named(&client, &base, "node-v").await }
    })
    .await;
    assert_eq!(registered["backend"], "openai");
    assert_eq!(registered["runtime_version"], "0.6.4");
    assert_eq!(registered["models"], json!(["SmolLM2-135M"]));
    agent.stop().await;
}

#[tokio::test]
async fn agent_registers_again_when_the_router_lost_its_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let address = router.address;
    let standin = StandIn::spawn(StandInOptions::ollama("node-b", &["m"]))
        .await
        .expect("stand-in");
    let agent = RunningAgent::start(router.url(""), standin.url(), "node-b");
    let client = client();
    let base = router.url("");
    eventually(Duration::from_secs(10), "first registration", || {
        let (client, base) = (client.clone(), base.clone());
        async move { agent_named(&client, &base, "node-b").await }
    })
    .await;
    router.stop().await.expect("stop");

    // A new router on the same address with an empty data dir.
    let empty = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start_at(address, config(empty.path())).await;
    let again = eventually(Duration::from_secs(15), "the agent registers again", || {
        let (client, base) = (client.clone(), base.clone());
        async move { agent_named(&client, &base, "node-b").await }
    })
    .await;
    assert_eq!(again["status"], "Online");
    agent.stop().await;
    router.stop().await.expect("stop");
}

#[tokio::test]
async fn agent_outlives_router_downtime_and_keeps_its_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let address = router.address;
    let standin = StandIn::spawn(StandInOptions::ollama("node-c", &["m"]))
        .await
        .expect("stand-in");
    let agent = RunningAgent::start(router.url(""), standin.url(), "node-c");
    let client = client();
    let base = router.url("");
    let first = eventually(Duration::from_secs(10), "registration", || {
        let (client, base) = (client.clone(), base.clone());
        async move { agent_named(&client, &base, "node-c").await }
    })
    .await;
    router.stop().await.expect("stop");

    // Several heartbeat intervals with no router at all.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !agent.task.is_finished(),
        "the agent does not exit while the router is away"
    );

    let router = TestRouter::start_at(address, config(dir.path())).await;
    let before = first["last_seen"].as_str().expect("last_seen").to_owned();
    let back = eventually(Duration::from_secs(15), "heartbeats resume", || {
        let (client, base, before) = (client.clone(), base.clone(), before.clone());
        async move {
            let agent = agent_named(&client, &base, "node-c").await?;
            (agent["last_seen"].as_str()? != before).then_some(agent)
        }
    })
    .await;
    assert_eq!(back["id"], first["id"], "same identity after the downtime");
    assert_eq!(list(&client, &base).await.len(), 1, "no duplicate");
    agent.stop().await;
    router.stop().await.expect("stop");
}

#[tokio::test]
async fn agent_keeps_beating_and_says_so_while_its_llm_server_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let standin = StandIn::spawn(StandInOptions::ollama("node-d", &["m"]))
        .await
        .expect("stand-in");
    let agent = RunningAgent::start(router.url(""), standin.url(), "node-d");
    let (client, base) = (client(), router.url(""));
    eventually(Duration::from_secs(10), "reported up", || {
        let (client, base) = (client.clone(), base.clone());
        async move {
            (agent_named(&client, &base, "node-d").await?["report"]["llm_server_up"] == true)
                .then_some(())
        }
    })
    .await;
    standin.stop();
    let down = eventually(Duration::from_secs(15), "reported down", || {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let agent = agent_named(&client, &base, "node-d").await?;
            (agent["report"]["llm_server_up"] == false).then_some(agent)
        }
    })
    .await;
    assert_eq!(
        down["status"], "Online",
        "the node itself is alive and says its server is down"
    );
    agent.stop().await;
}

#[tokio::test]
async fn agent_with_the_join_token_registers_heartbeats_and_drains_with_its_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.agent_token = Some(coordinator::auth::Secret::new("fleet-join-token"));
    let router = TestRouter::start(router_config).await;
    let standin = StandIn::spawn(StandInOptions::ollama("node-s", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let outsider = RunningAgent::start_with_token(
        router.url(""),
        standin.url(),
        "node-outsider",
        Some("not-the-token"),
    );
    let agent = RunningAgent::start_with_token(
        router.url(""),
        standin.url(),
        "node-s",
        Some("fleet-join-token"),
    );
    let (client, base) = (client(), router.url(""));
    // Heartbeats carry reports only when the secret is accepted.
    let first = eventually(Duration::from_secs(10), "the agent reports", || {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let agent = agent_named(&client, &base, "node-s").await?;
            agent["report"]["llm_server_up"]
                .is_boolean()
                .then_some(agent)
        }
    })
    .await;
    let later = eventually(Duration::from_secs(10), "more heartbeats land", || {
        let (client, base, seen) = (client.clone(), base.clone(), first["last_seen"].clone());
        async move {
            let agent = agent_named(&client, &base, "node-s").await?;
            (agent["last_seen"] != seen).then_some(agent)
        }
    })
    .await;
    assert_eq!(later["id"], first["id"]);
    assert_eq!(later["status"], "Online");
    // The drain on shutdown needs the secret too: it lands.
    agent.stop().await;
    let drained = agent_named(&client, &base, "node-s").await.expect("listed");
    assert_eq!(drained["draining"], true, "the drain was accepted");
    assert!(
        agent_named(&client, &base, "node-outsider").await.is_none(),
        "an agent with a wrong join token never gets in"
    );
    outsider.stop().await;
}

/// A restarted agent finds its secret in its state dir and keeps its
/// identity; another agent claiming the same name and port (a fresh state
/// dir, as an impostor or a reinstalled machine has) is refused until an
/// operator removes the old agent, and then gets an identity of its own.
#[tokio::test]
async fn a_restarted_agent_keeps_its_identity_and_no_other_agent_can_take_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.agent_token = Some(coordinator::auth::Secret::new("fleet-join-token"));
    let router = TestRouter::start(router_config).await;
    let standin = StandIn::spawn(StandInOptions::ollama("node-k", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let (client, base) = (client(), router.url(""));
    let state_dir = tempfile::tempdir().expect("state dir");
    let start = |state: &std::path::Path| {
        RunningAgent::start_in(
            router.url(""),
            standin.url(),
            "node-k",
            Some("fleet-join-token"),
            state,
        )
    };
    let reports = |since: Value| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let agent = agent_named(&client, &base, "node-k").await?;
            (agent["report"]["llm_server_up"] == true && agent["last_seen"] != since)
                .then_some(agent)
        }
    };

    let agent = start(state_dir.path());
    let first = eventually(Duration::from_secs(10), "the agent reports", || {
        reports(Value::Null)
    })
    .await;
    agent.stop().await;
    let kept: Vec<_> = std::fs::read_dir(state_dir.path())
        .expect("state dir")
        .map(|entry| entry.expect("entry").path())
        .collect();
    assert_eq!(kept.len(), 1, "one secret file: {kept:?}");
    let text = std::fs::read_to_string(&kept[0]).expect("secret file");
    assert!(text.contains(first["id"].as_str().expect("id")), "{text}");

    // Restarted with its state dir: same id, and its heartbeats (which need
    // the secret) land again.
    let agent = start(state_dir.path());
    let again = eventually(
        Duration::from_secs(10),
        "the restarted agent reports",
        || reports(first["last_seen"].clone()),
    )
    .await;
    assert_eq!(again["id"], first["id"]);
    assert_eq!(
        again["draining"], false,
        "registering again ended the drain"
    );
    agent.stop().await;

    // Another agent under the same name and port, without the secret.
    let impostor_dir = tempfile::tempdir().expect("state dir");
    let impostor = start(impostor_dir.path());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = agent_named(&client, &base, "node-k").await.expect("listed");
    assert_eq!(still["id"], first["id"]);
    assert_eq!(still["draining"], true, "the impostor changed nothing");
    assert_eq!(
        std::fs::read_dir(impostor_dir.path()).expect("dir").count(),
        0,
        "the impostor was given no secret"
    );

    // The operator frees the identity: the next attempt gets a new one.
    let removed = client
        .delete(format!(
            "{base}/api/agents/{}",
            first["id"].as_str().expect("id")
        ))
        .send()
        .await
        .expect("delete");
    // No admin token is configured here, so the delete needs the agent's own
    // secret: read it from the file, as an operator on that machine could.
    assert_eq!(removed.status(), reqwest::StatusCode::UNAUTHORIZED);
    let stored: Value = serde_json::from_str(&text).expect("json");
    let removed = client
        .delete(format!(
            "{base}/api/agents/{}",
            first["id"].as_str().expect("id")
        ))
        .bearer_auth(stored["agent_secret"].as_str().expect("secret"))
        .send()
        .await
        .expect("delete");
    assert_eq!(removed.status(), reqwest::StatusCode::NO_CONTENT);
    let newcomer = eventually(Duration::from_secs(10), "the newcomer registers", || {
        reports(Value::Null)
    })
    .await;
    assert_ne!(newcomer["id"], first["id"]);
    impostor.stop().await;
}

/// Given several routers, the agent keeps to the first, and when it stops
/// answering moves to the next within a few heartbeat intervals (and
/// registers there, since these two routers do not share a registry).
#[tokio::test]
async fn an_agent_given_two_routers_moves_to_the_second_when_the_first_dies() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let first = TestRouter::start(config(dir_a.path())).await;
    let second = TestRouter::start(config(dir_b.path())).await;
    let standin = StandIn::spawn(StandInOptions::ollama("node-two", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let agent = RunningAgent::start(
        format!("{},{}", first.url(""), second.url("")),
        standin.url(),
        "node-two",
    );
    let (client, first_base, second_base) = (client(), first.url(""), second.url(""));
    let reporting = |base: String| {
        let client = client.clone();
        async move {
            let agent = agent_named(&client, &base, "node-two").await?;
            (agent["report"]["llm_server_up"] == true).then_some(agent)
        }
    };
    eventually(
        Duration::from_secs(10),
        "the agent reports to the first router",
        || reporting(first_base.clone()),
    )
    .await;
    assert!(
        agent_named(&client, &second_base, "node-two")
            .await
            .is_none(),
        "it keeps to one router"
    );
    first.stop().await.expect("the first router stops");
    eventually(
        Duration::from_secs(10),
        "the agent moves to the second router",
        || reporting(second_base.clone()),
    )
    .await;
    agent.stop().await;
}
