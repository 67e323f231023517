//! Helpers shared by the integration tests: the real router in-process on
//! `127.0.0.1:0` (through the same `run` the binary calls) or as the real
//! binary, and polling with a deadline instead of sleeping.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::RegisterRequest;
use coordinator::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The real router running in this process.
pub struct TestRouter {
    pub address: SocketAddr,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestRouter {
    pub async fn start(config: Config) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        Self::start_on(listener, config)
    }

    /// Starts on a given address, for restarts on the same port.
    pub async fn start_at(address: SocketAddr, config: Config) -> Self {
        let listener = TcpListener::bind(address)
            .await
            .expect("bind the same port again");
        Self::start_on(listener, config)
    }

    pub fn start_on(listener: TcpListener, config: Config) -> Self {
        let address = listener.local_addr().expect("local addr");
        let data_dir = config.data_dir();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(coordinator::run(listener, config, async move {
            let _ = stopped.await;
        }));
        TestRouter {
            address,
            data_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// The base URL, for helpers that add paths themselves.
    pub fn base(&self) -> String {
        self.url("")
    }

    /// Graceful shutdown, as SIGTERM does; returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
            .take()
            .expect("running")
            .await
            .expect("router task")
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A config for a test: loopback, a free port, the given data dir.
pub fn config(data_dir: &Path) -> Config {
    Config::for_data_dir(data_dir)
}

/// The real `llm-router` binary, started with `--port 0`; its log names the port.
pub struct RouterProcess {
    pub child: tokio::process::Child,
    pub address: SocketAddr,
    /// Every log line, gathered as the router writes them.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The task gathering them; it ends when the router's stderr closes.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl RouterProcess {
    pub async fn spawn(data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::spawn_on_host(data_dir, "127.0.0.1", extra_args).await
    }

    /// Listens on `host` (tests still reach it over loopback).
    pub async fn spawn_on_host(data_dir: &Path, host: &str, extra_args: &[&str]) -> Self {
        Self::spawn_wrapped(&[], data_dir, host, extra_args).await
    }

    /// Listens on a given loopback port: a restart where agents expect it.
    pub async fn spawn_at_port(data_dir: &Path, port: u16, extra_args: &[&str]) -> Self {
        let port = port.to_string();
        let mut args = vec!["--port", port.as_str()];
        args.extend_from_slice(extra_args);
        Self::spawn_wrapped(&[], data_dir, "127.0.0.1", &args).await
    }

    /// Starts the router through a wrapper command that execs it (such as
    /// `prlimit --fsize=N --`), so that the pid is still the router's.
    pub async fn spawn_wrapped(
        wrapper: &[&str],
        data_dir: &Path,
        host: &str,
        extra_args: &[&str],
    ) -> Self {
        let router = env!("CARGO_BIN_EXE_llm-router");
        // Port 0 (a free one) unless the caller names one.
        let extra_args: Vec<&str> = if extra_args.contains(&"--port") {
            extra_args.to_vec()
        } else {
            [&["--port", "0"][..], extra_args].concat()
        };
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = tokio::process::Command::new(program);
                command.args(args).arg(router);
                command
            }
            None => tokio::process::Command::new(router),
        };
        let mut child = command
            .args(["--host", host, "--data-dir"])
            .arg(data_dir)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn llm-router");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&log);
        let address = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read log") {
                seen.lock().expect("log").push(line.clone());
                let rest = line
                    .split("listening on http://")
                    .nth(1)
                    .or_else(|| line.split("listening on https://").nth(1));
                if let Some(rest) = rest {
                    // Text logs end the address with a space, JSON ones with a quote.
                    let address: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect();
                    return address.parse::<SocketAddr>().expect("socket address");
                }
            }
            panic!("llm-router exited before listening");
        })
        .await
        .expect("llm-router did not start in time");
        // Keep draining the log so the child never blocks on a full pipe.
        let gathered = std::sync::Arc::clone(&log);
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                gathered.lock().expect("log").push(line);
            }
        });
        RouterProcess {
            child,
            address,
            log,
            reader: Some(reader),
        }
    }

    /// Stops the router as an operator would (SIGTERM) and returns its whole
    /// log, one line after another.
    pub async fn terminate(&mut self) -> String {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.finished_log().await.join("\n")
    }

    /// The whole log of a router that has exited: waits for the end of it.
    pub async fn finished_log(&mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.await;
        }
        self.log.lock().expect("log").clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id().expect("pid") as i32)
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A registration body in the seed's shape, with a loopback address.
pub fn registration(name: &str) -> Value {
    json!({
        "machine_name": name,
        "ip_address": "127.0.0.2",
        "port": 11434,
        "runtime_version": "0.5.7",
        "system_info": {"os": "Linux", "arch": "x86_64", "cpu_cores": 8, "total_memory": 16_777_216u64},
        "models": ["smollm2:135m"]
    })
}

pub fn typed_registration(name: &str) -> RegisterRequest {
    serde_json::from_value(registration(name)).expect("typed registration")
}

/// Registers and returns the id.
pub async fn register(client: &reqwest::Client, base: &str, body: &Value) -> String {
    let response = client
        .post(format!("{base}/api/agents/register"))
        .json(body)
        .send()
        .await
        .expect("register");
    assert!(
        response.status().is_success(),
        "register answered {}",
        response.status()
    );
    let answer: Value = response.json().await.expect("json");
    answer["id"].as_str().expect("id").to_owned()
}

/// Registers a node directly, as its agent would, at a loopback address.
pub async fn register_node(
    client: &reqwest::Client,
    router: &TestRouter,
    name: &str,
    port: u16,
    models: &[&str],
) -> String {
    register(
        client,
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

/// The router's `/metrics` text.
pub async fn metrics_text(client: &reqwest::Client, router: &TestRouter) -> String {
    client
        .get(router.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

pub async fn list(client: &reqwest::Client, base: &str) -> Vec<Value> {
    client
        .get(format!("{base}/api/agents"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("list json")
}

/// Polls `check` until it yields `Some`, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
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

/// The bytes of every file in a data dir, to show that nothing changed.
pub fn data_dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).unwrap_or_default(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Sends one request, with an optional JSON body and bearer token; the
/// status and the JSON answer (`null` when it is not JSON).
pub async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> (reqwest::StatusCode, Value) {
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request.json(body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// The real router on a shared PostgreSQL registry (`--database-url`); its
/// data dir goes with the returned guard.
pub async fn router_on_database(
    database: &str,
    extra: &[&str],
) -> (RouterProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = vec!["--database-url", database];
    args.extend_from_slice(extra);
    (RouterProcess::spawn(dir.path(), &args).await, dir)
}

/// GET: the status and the JSON body (`0` and null when nothing answered).
pub async fn get_json(http: &reqwest::Client, url: String) -> (u16, Value) {
    match http.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// Registers with a bearer credential; returns the id and the agent secret.
pub async fn register_with_token(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    body: &Value,
) -> (String, String) {
    let answer: Value = http
        .post(format!("{base}/api/agents/register"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    (
        answer["id"].as_str().expect("id").to_owned(),
        answer["agent_secret"].as_str().expect("secret").to_owned(),
    )
}

/// libfaketime, which the test command installs (Debian's `faketime`).
pub fn faketime_library() -> String {
    std::fs::read_dir("/usr/lib")
        .expect("read /usr/lib")
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("faketime/libfaketime.so.1"))
        .chain(std::iter::once("/usr/lib/faketime/libfaketime.so.1".into()))
        .find(|path| path.exists())
        .expect("libfaketime is installed (apt-get install faketime; scripts/test.sh does)")
        .to_string_lossy()
        .into_owned()
}

/// An agent (run in this process, as its binary runs it) for the LLM server
/// at `backend_url`, advertising 127.0.0.1, with its own state dir.
pub fn agent_config(
    router_urls: Vec<String>,
    backend_url: String,
    name: &str,
    heartbeat_interval: Duration,
    state_dir: &Path,
) -> agent::AgentConfig {
    agent::AgentConfig {
        state_dir: Some(state_dir.to_owned()),
        ca_cert: None,
        token: None,
        token_file: None,
        router_url: router_urls,
        backend_url: Some(backend_url),
        heartbeat_interval,
        machine_name: Some(name.to_owned()),
        advertise_ip: Some(std::net::IpAddr::from([127, 0, 0, 1])),
        drain_timeout: Duration::from_secs(1),
        max_concurrency: None,
        log_format: agent::config::LogFormat::Text,
    }
}
