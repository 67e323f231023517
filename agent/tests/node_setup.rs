//! The agent binary on nodes set up the way Ollama users set them up:
//! `OLLAMA_HOST` in each of its forms, an LLM server that listens on
//! loopback only while the agent advertises another address, a server that
//! goes down and comes back, and an agent pointed at the wrong thing. The
//! router is the real one, started in this process through the same `run`
//! its binary calls; the LLM server is the stand-in.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use testkit::{StandIn, StandInOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;

struct Router {
    address: SocketAddr,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

impl Router {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut coordinator::Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let mut config = coordinator::Config::for_data_dir(dir.path());
        configure(&mut config);
        tokio::spawn(coordinator::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Router {
            address,
            _dir: dir,
            _stop: stop,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    async fn agent_named(&self, name: &str) -> Option<Value> {
        let agents: Vec<Value> = reqwest::get(self.url("/api/agents"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        agents
            .into_iter()
            .find(|agent| agent["machine_name"] == name)
    }

    async fn chat(&self, model: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url("/api/chat"))
            .json(&json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("chat")
    }
}

/// The agent binary, its log gathered line by line as it writes it.
struct AgentProcess {
    child: tokio::process::Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl AgentProcess {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router-agent"));
        command
            .args(args)
            .env_remove("OLLAMA_HOST")
            .env_remove("LLM_ROUTER_BACKEND_URL")
            .env_remove("LLM_ROUTER_URL")
            .env("RUST_LOG", "info")
            .env(
                "LLM_ROUTER_AGENT_STATE_DIR",
                std::env::temp_dir().join(format!("llm-router-agent-test-{}", std::process::id())),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawn llm-router-agent");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let gathered = Arc::clone(&log);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                gathered.lock().expect("log").push(line);
            }
        });
        AgentProcess { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    fn count(&self, text: &str) -> usize {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|line| line.contains(text))
            .count()
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Polls `check` every 25 ms until it yields `Some`, or panics after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn registered(router: &Router, name: &str) -> Value {
    eventually(Duration::from_secs(20), "the agent registers", || async {
        router
            .agent_named(name)
            .await
            .filter(|agent| agent["report"]["llm_server_up"] == true)
    })
    .await
}

/// `OLLAMA_HOST` as Ollama's documentation and its users write it, with no
/// `--backend-url`: the agent finds the server and registers its port.
#[tokio::test]
async fn every_form_of_ollama_host_finds_the_server() {
    let router = Router::start().await;
    let server = StandIn::spawn(StandInOptions::ollama("node", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let port = server.address.port();
    let forms = [
        format!("127.0.0.1:{port}"),
        format!("0.0.0.0:{port}"),
        format!(":{port}"),
        format!("http://127.0.0.1:{port}"),
        format!("\"0.0.0.0:{port}\""),
    ];
    for (n, form) in forms.iter().enumerate() {
        let name = format!("ollama-host-{n}");
        let agent = AgentProcess::spawn(
            &[
                "--router-url",
                &router.url(""),
                "--machine-name",
                &name,
                "--heartbeat-interval",
                "0.2",
            ],
            &[("OLLAMA_HOST", form)],
        );
        let listed = registered(&router, &name).await;
        assert_eq!(listed["port"], port, "OLLAMA_HOST={form}");
        assert_eq!(
            listed["models"],
            json!(["smollm2:135m"]),
            "OLLAMA_HOST={form}"
        );
        assert_eq!(listed["ip_address"], "127.0.0.1", "OLLAMA_HOST={form}");
        assert!(
            agent.log().contains("from=OLLAMA_HOST"),
            "the log says where the address came from: {}",
            agent.log()
        );
        agent.stop().await;
    }
}

/// Ollama's default setup: the server listens on 127.0.0.1 only, and the
/// agent advertises another address. The agent says what to change; the
/// router keeps the node out of rotation after its first failure, whatever
/// the heartbeats say, until it reaches the server itself.
#[tokio::test]
async fn a_server_on_loopback_only_is_kept_out_until_the_router_reaches_it() {
    let router = Router::start().await;
    let local_only = StandIn::spawn(StandInOptions::ollama("local-only", &["m"]))
        .await
        .expect("stand-in");
    let port = local_only.address.port();
    let agent = AgentProcess::spawn(
        &[
            "--router-url",
            &router.url(""),
            "--backend-url",
            &local_only.url(),
            "--advertise-ip",
            "127.0.0.2",
            "--machine-name",
            "loopback-only",
            "--heartbeat-interval",
            "0.1",
        ],
        &[],
    );
    let listed = registered(&router, "loopback-only").await;
    assert_eq!(listed["ip_address"], "127.0.0.2");
    eventually(Duration::from_secs(10), "the agent's warning", || async {
        (agent.count("the router cannot reach it") == 1).then_some(())
    })
    .await;
    let log = agent.log();
    assert!(
        log.contains("OLLAMA_HOST=0.0.0.0") && log.contains("--host 0.0.0.0"),
        "the warning says what to set: {log}"
    );

    // The first request finds out; the node leaves the rotation.
    assert_eq!(router.chat("m").await.status(), 502);
    let unreachable = router.agent_named("loopback-only").await.expect("listed");
    assert_eq!(unreachable["state"], "unreachable", "{unreachable}");
    assert_eq!(unreachable["routable"], false);
    // Heartbeats go on saying the server is up; the node stays out.
    let last_seen = unreachable["last_seen"].clone();
    eventually(Duration::from_secs(10), "heartbeats to go on", || async {
        router
            .agent_named("loopback-only")
            .await
            .filter(|agent| agent["last_seen"] != last_seen)
    })
    .await;
    for _ in 0..10 {
        let agent_now = router.agent_named("loopback-only").await.expect("listed");
        assert_eq!(agent_now["report"]["llm_server_up"], true);
        assert_eq!(agent_now["state"], "unreachable", "{agent_now}");
        let refused = router.chat("m").await;
        assert_eq!(refused.status(), 503, "known model, no node in rotation");
        assert_eq!(
            refused
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().ok()),
            Some(Some("2"))
        );
        let body: Value = refused.json().await.expect("json");
        assert!(body["error"].is_string(), "Ollama's error shape: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The server becomes reachable at the advertised address: the router's
    // probe finds it, without the agent doing anything.
    let reachable = tokio::net::TcpListener::bind(("127.0.0.2", port))
        .await
        .expect("bind the advertised address");
    let _now_reachable = StandIn::serve(reachable, StandInOptions::ollama("now-reachable", &["m"]));
    eventually(Duration::from_secs(20), "back in rotation", || async {
        router
            .agent_named("loopback-only")
            .await
            .filter(|agent| agent["state"] == "serving")
    })
    .await;
    let answer = router.chat("m").await;
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.expect("body").contains("now-reachable"));
    agent.stop().await;
}

/// The agent warns once when its LLM server stops answering and once when
/// it answers again, however many heartbeats pass in between.
#[tokio::test]
async fn the_server_going_down_and_coming_back_is_said_once_each() {
    let router = Router::start().await;
    let server = StandIn::spawn(StandInOptions::ollama("flapping", &["m"]))
        .await
        .expect("stand-in");
    let address = server.address;
    let agent = AgentProcess::spawn(
        &[
            "--router-url",
            &router.url(""),
            "--backend-url",
            &server.url(),
            "--machine-name",
            "flapping",
            "--heartbeat-interval",
            "0.1",
        ],
        &[],
    );
    registered(&router, "flapping").await;
    server.stop();
    drop(server);
    eventually(
        Duration::from_secs(20),
        "the router to see it down",
        || async {
            router
                .agent_named("flapping")
                .await
                .filter(|agent| agent["state"] == "server_down")
        },
    )
    .await;
    // Several more heartbeats while it is down.
    let last_seen = router.agent_named("flapping").await.expect("listed")["last_seen"].clone();
    eventually(Duration::from_secs(10), "more heartbeats", || async {
        router
            .agent_named("flapping")
            .await
            .filter(|agent| agent["last_seen"] != last_seen)
    })
    .await;
    let refused = router.chat("m").await;
    assert_eq!(refused.status(), 503, "its only node's server is down");
    assert!(refused.headers().contains_key("retry-after"));

    let listener = tokio::net::TcpListener::bind(address)
        .await
        .expect("the same port again");
    let _back = StandIn::serve(listener, StandInOptions::ollama("flapping", &["m"]));
    eventually(Duration::from_secs(20), "serving again", || async {
        router
            .agent_named("flapping")
            .await
            .filter(|agent| agent["state"] == "serving")
    })
    .await;
    assert_eq!(router.chat("m").await.status(), 200);
    assert_eq!(
        agent.count("The LLM server does not answer"),
        1,
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.count("The LLM server answers again"),
        1,
        "{}",
        agent.log()
    );
    assert!(
        agent
            .log()
            .lines()
            .filter(|line| line.contains("does not answer"))
            .all(|line| line.contains("WARN")),
        "at WARN, above INFO: {}",
        agent.log()
    );
    agent.stop().await;
}

/// An agent given an LLM server's address as the router's says so, rather
/// than that "the router does not know this agent".
#[tokio::test]
async fn an_agent_pointed_at_an_llm_server_says_it_is_not_a_router() {
    let server = StandIn::spawn(StandInOptions::ollama("not-a-router", &["m"]))
        .await
        .expect("stand-in");
    let agent = AgentProcess::spawn(
        &[
            "--router-url",
            &server.url(),
            "--backend-url",
            &server.url(),
            "--heartbeat-interval",
            "0.2",
        ],
        &[],
    );
    eventually(
        Duration::from_secs(20),
        "the agent's explanation",
        || async { (agent.count("so it is not an llm-router") > 0).then_some(()) },
    )
    .await;
    let log = agent.log();
    assert!(log.contains("--router-url"), "{log}");
    assert!(!log.contains("does not know this agent"), "{log}");
    agent.stop().await;
}

/// A router URL that cannot be right stops the agent at once, naming the
/// flag and the fix.
#[tokio::test]
async fn a_bad_router_url_is_refused_naming_the_flag() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router-agent"))
        .args(["--router-url", "http://127.0.0.1:99999"])
        .output()
        .await
        .expect("run the agent");
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("--router-url") && message.contains("from 1 to 65535"),
        "{message}"
    );
}

/// With the router's listings protected, an agent still drains properly on
/// SIGTERM: it reads its own record's in-flight count with its secret.
#[tokio::test]
async fn an_agent_drains_when_the_router_protects_its_listings() {
    let router = Router::start_with(|config| {
        config.agent_token = Some(coordinator::auth::Secret::new("drain-join-token"));
        config.admin_token = Some(coordinator::auth::Secret::new("drain-admin-token"));
        config.protect_listings = true;
    })
    .await;
    let standin = StandIn::spawn(StandInOptions::ollama("drainer", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let agent = AgentProcess::spawn(
        &[
            "--router-url",
            &router.url(""),
            "--backend-url",
            &standin.url(),
            "--machine-name",
            "drainer",
            "--heartbeat-interval",
            "0.2",
            "--token",
            "drain-join-token",
        ],
        &[],
    );
    eventually(Duration::from_secs(10), "the agent registers", || async {
        (agent.count("Registered with the router.") > 0).then_some(())
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.child.id().expect("pid")).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    eventually(
        Duration::from_secs(10),
        "the agent drains and stops",
        || async { (agent.count("Agent stopped.") > 0).then_some(()) },
    )
    .await;
    let log = agent.log();
    assert!(log.contains("Drained."), "{log}");
    assert!(!log.contains("Lost the router"), "{log}");
    agent.stop().await;
}
