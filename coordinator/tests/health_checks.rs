//! The router's own health checks: a node whose server dies leaves the
//! rotation without waiting for its agent, and comes back within one
//! interval once its server answers again; a node whose server is merely
//! busy (llama-cpp-python answers probes only between generations) stays.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{agent_config, client, config, eventually, get_json, TestRouter};
use testkit::{StandIn, StandInOptions};

async fn state_of(router: &TestRouter, name: &str) -> Option<String> {
    let (_, agents) = get_json(&client(), router.url("/api/agents")).await;
    agents
        .as_array()?
        .iter()
        .find(|a| a["machine_name"] == name)
        .and_then(|a| a["state"].as_str().map(str::to_owned))
}

/// A real agent for a node, running until `stop`.
struct RunningAgent {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop: tokio_util::sync::CancellationToken,
    _state: tempfile::TempDir,
}

impl RunningAgent {
    /// Starts one heartbeating every `interval`, and waits until the
    /// router shows its node serving.
    async fn serving(
        router: &TestRouter,
        node_url: String,
        name: &str,
        interval: Duration,
    ) -> Self {
        let state = tempfile::tempdir().expect("state");
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(agent::run(
            agent_config(vec![router.url("")], node_url, name, interval, state.path()),
            stop.clone(),
        ));
        eventually(Duration::from_secs(5), "the node serving", || async {
            (state_of(router, name).await.as_deref() == Some("serving")).then_some(())
        })
        .await;
        RunningAgent {
            task,
            stop,
            _state: state,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

#[tokio::test]
async fn a_killed_server_leaves_the_rotation_and_returns_within_an_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = config(dir.path());
    settings.health_check_interval = Duration::from_secs(1);
    let router = TestRouter::start(settings).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let node = StandIn::serve(
        listener,
        StandInOptions::ollama("mortal", &["smollm2:135m"]),
    );
    // A heartbeat a minute: nothing the agent says helps within this test.
    let agent = RunningAgent::serving(&router, node.url(), "mortal", Duration::from_secs(60)).await;

    node.stop();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(4),
        "the dead node out of rotation",
        || async {
            (state_of(&router, "mortal").await.as_deref() == Some("unreachable")).then_some(())
        },
    )
    .await;
    println!(
        "out of rotation {:?} after its server died",
        killed.elapsed()
    );

    let listener = loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => break listener,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let _node = StandIn::serve(
        listener,
        StandInOptions::ollama("mortal", &["smollm2:135m"]),
    );
    let restarted = Instant::now();
    eventually(
        Duration::from_secs(2),
        "the node back within an interval",
        || async {
            (state_of(&router, "mortal").await.as_deref() == Some("serving")).then_some(())
        },
    )
    .await;
    println!("back {:?} after its server restarted", restarted.elapsed());
    let chat = client()
        .post(router.url("/api/chat"))
        .json(&json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("chat");
    assert_eq!(chat.status(), 200);
    agent.stop().await;
}

/// A 15-second generation on a server whose model list waits for it: the
/// router's checks and the agent's probes time out all along, and the node
/// stays in rotation, since the router has a request there.
#[tokio::test]
async fn a_busy_node_whose_probes_wait_behind_a_long_generation_stays_routable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = config(dir.path());
    settings.health_check_interval = Duration::from_secs(1);
    let router = TestRouter::start(settings).await;
    let options = StandInOptions {
        chunk_delay: Duration::from_millis(3_750),
        probes_wait_for_generation: true,
        ..StandInOptions::openai("llama-cpp-python", &["smollm2"])
    };
    let node = StandIn::spawn(options).await.expect("stand-in");
    let agent = RunningAgent::serving(
        &router,
        node.url(),
        "llama-cpp-python",
        Duration::from_millis(500),
    )
    .await;

    let generation = tokio::spawn({
        let url = router.url("/v1/chat/completions");
        async move {
            client()
                .post(url)
                .json(&json!({"model": "smollm2", "stream": true, "messages": [{"role": "user", "content": "a long story"}]}))
                .send()
                .await
                .expect("chat")
                .text()
                .await
                .expect("the whole stream")
        }
    });
    let began = Instant::now();
    let mut looked = 0;
    while !generation.is_finished() {
        assert_eq!(
            state_of(&router, "llama-cpp-python").await.as_deref(),
            Some("serving"),
            "a busy node left the rotation {:?} into a generation",
            began.elapsed()
        );
        looked += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let story = generation.await.expect("generation");
    assert!(story.contains("[DONE]"), "{story}");
    assert!(
        began.elapsed() >= Duration::from_secs(14),
        "the generation lasted {:?}",
        began.elapsed()
    );
    assert!(looked > 40);
    agent.stop().await;
}
