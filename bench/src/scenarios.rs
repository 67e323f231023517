//! The scenarios of the performance issue. Each starts what it needs,
//! measures, and records named figures; every process stops with its handle.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::load::{self, get, post_json, Limit};
use crate::procs::{Binaries, Nginx};

pub struct Context {
    pub binaries: Binaries,
    pub seconds: f64,
    pub fleet: u64,
    pub heartbeat_connections: usize,
}

impl Context {
    pub(crate) fn measure_for(&self) -> Limit {
        Limit::Duration(Duration::from_secs_f64(self.seconds))
    }

    /// How long a one-connection latency measurement lasts: at most 3 s.
    pub(crate) fn one_connection(&self) -> Limit {
        Limit::Duration(Duration::from_secs_f64(self.seconds.min(3.0)))
    }
}

pub(crate) type Figures = BTreeMap<&'static str, f64>;

/// One target of the issue, judged on a median figure.
pub struct Target {
    pub description: &'static str,
    pub figure: &'static str,
    pub unit: &'static str,
    pub met: fn(f64) -> bool,
}

pub fn targets() -> Vec<Target> {
    vec![
        Target {
            description: "Registration storm, 10,000 agents over 256 connections: >= 5,000/s",
            figure: "storm_registrations_per_s",
            unit: "/s",
            met: |v| v >= 5_000.0,
        },
        Target {
            description: "Registration storm p99 <= 20 ms",
            figure: "storm_p99_ms",
            unit: "ms",
            met: |v| v <= 20.0,
        },
        Target {
            description:
                "Registration storm sustained across snapshots, 256 connections: p99 <= 20 ms",
            figure: "storm_sustained_p99_ms",
            unit: "ms",
            met: |v| v <= 20.0,
        },
        Target {
            description: "Heartbeats with the fleet registered: >= 50,000/s",
            figure: "heartbeats_per_s",
            unit: "/s",
            met: |v| v >= 50_000.0,
        },
        Target {
            description: "Heartbeat p99 <= 5 ms",
            figure: "heartbeat_p99_ms",
            unit: "ms",
            met: |v| v <= 5.0,
        },
        Target {
            description: "Heartbeats >= 70 % of GET /health in the same run (issue 16)",
            figure: "heartbeat_vs_health_pct",
            unit: "%",
            met: |v| v >= 70.0,
        },
        Target {
            description: "Memory with the fleet registered <= 200 MB",
            figure: "rss_fleet_mb",
            unit: "MB",
            met: |v| v <= 200.0,
        },
        Target {
            description: "Start-up loading the fleet <= 1 s",
            figure: "startup_fleet_ms",
            unit: "ms",
            met: |v| v <= 1_000.0,
        },
        Target {
            description: "Restart with the fleet, stop signal to serving <= 0.5 s",
            figure: "restart_fleet_ms",
            unit: "ms",
            met: |v| v <= 500.0,
        },
        Target {
            description: "GET /api/agents with the fleet (100,000) <= 250 ms",
            figure: "list_fleet_ms",
            unit: "ms",
            met: |v| v <= 250.0,
        },
        Target {
            description: "Memory after 20 listings of the fleet <= 150 MB",
            figure: "rss_after_20_listings_mb",
            unit: "MB",
            met: |v| v <= 150.0,
        },
        Target {
            description: "GET /api/agents with 10,000 agents <= 50 ms",
            figure: "list_10k_agents_ms",
            unit: "ms",
            met: |v| v <= 50.0,
        },
        Target {
            description: "Proxy throughput >= 80 % of nginx",
            figure: "proxy_router_vs_nginx_pct",
            unit: "%",
            met: |v| v >= 80.0,
        },
        Target {
            description: "Proxy throughput on /v1/chat/completions >= nginx's (ratio >= 1.0)",
            figure: "peers_router_vs_nginx",
            unit: "x",
            met: |v| v >= 1.0,
        },
        Target {
            description: "Proxy throughput >= 3x SGLang's model gateway (smg)",
            figure: "peers_router_vs_smg",
            unit: "x",
            met: |v| v >= 3.0,
        },
        Target {
            description: "Proxy throughput >= 3x sglang-router",
            figure: "peers_router_vs_sglang_router",
            unit: "x",
            met: |v| v >= 3.0,
        },
        Target {
            description: "Proxy throughput >= 3x vllm-router",
            figure: "peers_router_vs_vllm_router",
            unit: "x",
            met: |v| v >= 3.0,
        },
        Target {
            description: "Proxy latency added to p50 <= 200 us",
            figure: "latency_added_by_router_us",
            unit: "us",
            met: |v| v <= 200.0,
        },
        Target {
            description: "Streaming: first chunk within 1 ms of direct",
            figure: "ttfb_added_by_router_us",
            unit: "us",
            met: |v| v <= 1_000.0,
        },
        Target {
            description: "A node's server dies: no request to it after the first failure",
            figure: "node_dies_requests_after_failure",
            unit: "",
            met: |v| v == 0.0,
        },
        Target {
            description: "A node's server dies: zero client errors",
            figure: "node_dies_client_errors",
            unit: "",
            met: |v| v == 0.0,
        },
        Target {
            description: "An agent dies: Offline within AGENT_TIMEOUT (2 s) + 1 s",
            figure: "agent_offline_after_kill_s",
            unit: "s",
            met: |v| v <= 3.0,
        },
        Target {
            description: "Registration storm through one router on PostgreSQL: >= 5,000/s",
            figure: "pg_storm_registrations_per_s",
            unit: "/s",
            met: |v| v >= 5_000.0,
        },
        Target {
            description: "Registration storm on PostgreSQL p99 <= 50 ms",
            figure: "pg_storm_p99_ms",
            unit: "ms",
            met: |v| v <= 50.0,
        },
        Target {
            description:
                "Heartbeats: each of 3 routers on PostgreSQL >= 80 % of a file-store router",
            figure: "pg_heartbeat_vs_files_pct",
            unit: "%",
            met: |v| v >= 80.0,
        },
        Target {
            description: "A change at one router shows at another: p99 <= 1 s",
            figure: "pg_propagation_p99_ms",
            unit: "ms",
            met: |v| v <= 1_000.0,
        },
        Target {
            description: "A new router joins the 100,000-agent registry, serving within 2 s",
            figure: "pg_join_fleet_ms",
            unit: "ms",
            met: |v| v <= 2_000.0,
        },
        Target {
            description: "Churn of 1,000 agents under client load: zero client errors",
            figure: "churn_client_errors",
            unit: "",
            met: |v| v == 0.0,
        },
    ]
}

// ---- helpers ----

/// One request on a fresh connection; the status and the whole body.
pub(crate) async fn call(
    address: SocketAddr,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

fn registration(name: &str, ip: &str, port: u16, models: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "machine_name": name,
        "ip_address": ip,
        "port": port,
        "runtime_version": "0.5.7",
        "system_info": {"os": "Linux", "arch": "x86_64", "cpu_cores": 32, "total_memory": 137_438_953_472u64},
        "models": models,
    }))
    .unwrap_or_default()
}

/// A registered node's id.
pub(crate) async fn register(
    router: SocketAddr,
    name: &str,
    node: SocketAddr,
    models: &[&str],
) -> anyhow::Result<String> {
    let body = registration(name, &node.ip().to_string(), node.port(), models);
    let (status, answer) = call(router, post_json("/api/agents/register", body)).await?;
    if !(200..300).contains(&status) {
        bail!("registering {name}: {status}");
    }
    let answer: Value = serde_json::from_slice(&answer)?;
    answer["id"].as_str().map(str::to_owned).context("no id")
}

/// A fleet member's registration: a loopback address of its own (127/8).
pub(crate) fn fleet_registration(n: u64) -> Vec<u8> {
    let ip = format!(
        "127.{}.{}.{}",
        (n >> 16) & 0xff,
        (n >> 8) & 0xff,
        (n & 0xff).max(2)
    );
    registration(
        &format!("gpu-{n:06}"),
        &ip,
        11434,
        &["llama3.1:8b", "qwen2.5:7b"],
    )
}

/// What an agent sends with each heartbeat.
pub(crate) const HEARTBEAT_BODY: &[u8] = br#"{"models":["llama3.1:8b","qwen2.5:7b"],"loaded_models":["llama3.1:8b"],"requests_in_flight":1,"llm_server_up":true,"cpu_usage_percent":37.5,"memory_used":68719476736}"#;

const GENERATE_BODY: &[u8] = br#"{"model":"bench","prompt":"Why is the sky blue?","stream":false}"#;

pub(crate) fn check_clean(what: &str, result: &load::LoadResult) -> anyhow::Result<()> {
    if result.errors > 0 {
        bail!(
            "{what}: {} of {} requests failed",
            result.errors,
            result.requests
        );
    }
    Ok(())
}

pub(crate) fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

// ---- registry ----

/// A router for the fleet scenarios. The fleet's 100,000 addresses are
/// loopback addresses where nothing listens: health checks would spend the
/// run connecting to them (one check per node per interval), which a real
/// fleet pays for with real servers. The registry figures are measured
/// without them.
pub(crate) const FLEET_ROUTER_ARGS: &[&str] =
    &["--agent-timeout", "3600", "--health-check-interval", "0"];

/// Registration storm, listing, heartbeats against /health, memory, start-up.
pub async fn registry(context: &Context, work: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let data = work.join("registry-data");
    let (mut router, address) = context.binaries.router(&data, FLEET_ROUTER_ARGS, work)?;

    let storm_size = 10_000u64.min(context.fleet);
    let storm = load::run(
        address,
        256,
        Limit::Total(storm_size),
        Arc::new(|n| post_json("/api/agents/register", fleet_registration(n))),
    )
    .await;
    check_clean("registration storm", &storm)?;
    figures.insert("storm_registrations_per_s", storm.rate());
    figures.insert("storm_p99_ms", storm.p99_us() / 1_000.0);

    let mut list_times = Vec::new();
    for _ in 0..20 {
        let begun = Instant::now();
        let (status, body) = call(address, get("/api/agents")).await?;
        list_times.push(milliseconds(begun.elapsed()));
        if status != 200 || body.len() < 1_000 {
            bail!("listing failed: {status}");
        }
    }
    list_times.sort_by(f64::total_cmp);
    figures.insert("list_10k_agents_ms", list_times[list_times.len() / 2]);

    if context.fleet > storm_size {
        let rest = load::run(
            address,
            256,
            Limit::Total(context.fleet - storm_size),
            Arc::new(move |n| {
                post_json("/api/agents/register", fleet_registration(n + storm_size))
            }),
        )
        .await;
        check_clean("filling the fleet", &rest)?;
    }
    figures.insert("rss_fleet_registered_mb", router.rss_bytes() as f64 / 1e6);
    // The whole fleet listed 20 times (streamed; each ~44 MB): how long one
    // takes, and whether memory stays where the fleet put it.
    let mut list_times = Vec::new();
    let mut listed = Bytes::new();
    for _ in 0..20 {
        let begun = Instant::now();
        let (status, body) = call(address, get("/api/agents")).await?;
        list_times.push(milliseconds(begun.elapsed()));
        if status != 200 {
            bail!("listing the fleet failed: {status}");
        }
        listed = body;
    }
    list_times.sort_by(f64::total_cmp);
    figures.insert("list_fleet_ms", list_times[list_times.len() / 2]);
    figures.insert("rss_after_20_listings_mb", router.rss_bytes() as f64 / 1e6);
    let listed: Vec<Value> = serde_json::from_slice(&listed)?;
    if listed.len() as u64 != context.fleet {
        bail!(
            "{} agents listed, {} registered",
            listed.len(),
            context.fleet
        );
    }
    let ids: Arc<Vec<String>> = Arc::new(
        listed
            .iter()
            .filter_map(|a| a["id"].as_str().map(str::to_owned))
            .collect(),
    );
    drop(listed);

    let heartbeat_ids = Arc::clone(&ids);
    let heartbeat: load::MakeRequest = Arc::new(move |n| {
        let id = &heartbeat_ids[(n as usize).wrapping_mul(7_919) % heartbeat_ids.len()];
        post_json(
            &format!("/api/agents/{id}/heartbeat"),
            HEARTBEAT_BODY.to_vec(),
        )
    });
    let health: load::MakeRequest = Arc::new(|_| get("/health"));
    // Heartbeats and /health in turns, B H H B B H, as the proxy scenario
    // does: on this shared machine either rate alone drifts by a tenth
    // from one measurement to the next, and their ratio is the figure.
    // Each turn is a third of the measurement time, so that each load
    // lasts it in all, and /health goes last: the restart measured next
    // starts, as it did when the two ran one after the other, with the
    // heartbeats' liveness already handed to the store.
    let turn = Limit::Duration(Duration::from_secs_f64(context.seconds / 3.0));
    let mut totals: BTreeMap<&str, load::LoadResult> = BTreeMap::new();
    for name in [
        "heartbeats",
        "health",
        "health",
        "heartbeats",
        "heartbeats",
        "health",
    ] {
        let make = if name == "health" {
            &health
        } else {
            &heartbeat
        };
        let result = load::run(
            address,
            context.heartbeat_connections,
            turn,
            Arc::clone(make),
        )
        .await;
        check_clean(name, &result)?;
        load::add_turn(&mut totals, name, result);
    }
    let (Some(heartbeats), Some(health)) = (totals.remove("heartbeats"), totals.remove("health"))
    else {
        bail!("no heartbeat or /health turn was measured");
    };
    figures.insert("heartbeats_per_s", heartbeats.rate());
    figures.insert("heartbeat_p99_ms", heartbeats.p99_us() / 1_000.0);
    figures.insert("health_per_s", health.rate());
    figures.insert(
        "heartbeat_vs_health_pct",
        100.0 * heartbeats.rate() / health.rate(),
    );
    figures.insert("rss_fleet_mb", router.rss_bytes() as f64 / 1e6);

    // A restart, as an operator sees it: from the stop signal until the
    // new process serves (the old one writes its last snapshot first).
    let stopping = Instant::now();
    router.signal(Signal::SIGTERM);
    let status = router.wait_exit(Duration::from_secs(120))?;
    if !status.success() {
        bail!("router exited with {status}");
    }
    figures.insert("shutdown_fleet_ms", milliseconds(stopping.elapsed()));
    let begun = Instant::now();
    let (restarted, address) = context.binaries.router(&data, FLEET_ROUTER_ARGS, work)?;
    loop {
        if let Ok((200, _)) = call(address, get("/health")).await {
            break;
        }
        if begun.elapsed() > Duration::from_secs(60) {
            bail!("the router did not come back");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    figures.insert("startup_fleet_ms", milliseconds(begun.elapsed()));
    figures.insert("restart_fleet_ms", milliseconds(stopping.elapsed()));
    // Loading's transient buffers are freed within a moment; both counts.
    figures.insert("rss_at_start_peak_mb", restarted.rss_bytes() as f64 / 1e6);
    tokio::time::sleep(Duration::from_secs(2)).await;
    figures.insert("rss_after_restart_mb", restarted.rss_bytes() as f64 / 1e6);
    let (_, listed) = call(address, get("/api/agents?status=Online")).await?;
    let online = serde_json::from_slice::<Vec<Value>>(&listed)?.len() as u64;
    if online != context.fleet {
        bail!(
            "after the restart {online} of {} agents are Online",
            context.fleet
        );
    }
    Ok(())
}

// ---- storm ----

/// A registration storm sustained for twice the measuring time at 256
/// connections (about 200,000 registrations): long enough that the journal
/// passes 64 MiB and a snapshot of the growing registry is written while
/// the storm goes on. Its p99 is what a snapshot costs the commits.
pub async fn storm(context: &Context, work: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let (mut router, address) =
        context
            .binaries
            .router(&work.join("storm-data"), FLEET_ROUTER_ARGS, work)?;
    let storm = load::run(
        address,
        256,
        Limit::Duration(Duration::from_secs_f64(context.seconds * 2.0)),
        Arc::new(|n| post_json("/api/agents/register", fleet_registration(n))),
    )
    .await;
    check_clean("sustained registration storm", &storm)?;
    figures.insert("storm_sustained_per_s", storm.rate());
    figures.insert("storm_sustained_p99_ms", storm.p99_us() / 1_000.0);
    figures.insert("storm_sustained_registrations", storm.requests as f64);
    router.signal(Signal::SIGTERM);
    let _ = router.wait_exit(Duration::from_secs(120));
    Ok(())
}

// ---- proxy ----

/// Throughput and latency through the router and through nginx to the same
/// fixed-response server, and time to the first streamed chunk.
pub async fn proxy(context: &Context, work: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let nginx = Nginx::start(work)?;
    let (_router, address) =
        context
            .binaries
            .router(&work.join("proxy-data"), &["--agent-timeout", "3600"], work)?;
    register(address, "nginx", nginx.server, &["bench"]).await?;
    let generate = || -> load::MakeRequest {
        Arc::new(|_| post_json("/api/generate", GENERATE_BODY.to_vec()))
    };
    let (status, body) = call(address, post_json("/api/generate", GENERATE_BODY.to_vec())).await?;
    if status != 200 || body.as_ref() != crate::procs::FIXED_ANSWER.as_bytes() {
        bail!("the router does not pass nginx's answer through: {status} {body:?}");
    }

    let mut rates = BTreeMap::new();
    let direct = load::run(nginx.server, 64, context.measure_for(), generate()).await;
    check_clean("direct", &direct)?;
    rates.insert("direct", direct.rate());
    // nginx and the router in turns, in the order N R R N N R: the load on
    // this shared machine drifts, and this order gives each the same share
    // of early and late.
    let mut totals: BTreeMap<&str, load::LoadResult> = BTreeMap::new();
    for (name, target) in [
        ("nginx", nginx.proxy),
        ("router", address),
        ("router", address),
        ("nginx", nginx.proxy),
        ("nginx", nginx.proxy),
        ("router", address),
    ] {
        let result = load::run(target, 64, context.measure_for(), generate()).await;
        check_clean(name, &result)?;
        load::add_turn(&mut totals, name, result);
    }
    for (name, total) in &totals {
        rates.insert(name, total.rate());
    }
    figures.insert("proxy_direct_rps", rates["direct"]);
    figures.insert("proxy_nginx_rps", rates["nginx"]);
    figures.insert("proxy_router_rps", rates["router"]);
    figures.insert(
        "proxy_router_vs_nginx_pct",
        100.0 * rates["router"] / rates["nginx"],
    );

    let mut p50 = BTreeMap::new();
    for (name, target) in [
        ("direct", nginx.server),
        ("nginx", nginx.proxy),
        ("router", address),
    ] {
        let result = load::run(target, 1, context.one_connection(), generate()).await;
        check_clean(name, &result)?;
        p50.insert(name, result.p50_us());
    }
    figures.insert("latency_direct_p50_us", p50["direct"]);
    figures.insert("latency_nginx_p50_us", p50["nginx"]);
    figures.insert("latency_router_p50_us", p50["router"]);
    figures.insert("latency_added_by_router_us", p50["router"] - p50["direct"]);
    figures.insert("latency_added_by_nginx_us", p50["nginx"] - p50["direct"]);

    let (_standin, standin) =
        context
            .binaries
            .standin("streamer", &["--models", "stream", "--chunks", "32"], work)?;
    register(address, "streamer", standin, &["stream"]).await?;
    let stream_request = || {
        post_json(
            "/api/chat",
            br#"{"model":"stream","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
        )
    };
    let mut first_chunk = BTreeMap::new();
    for (name, target) in [("direct", standin), ("router", address)] {
        let mut times = Vec::new();
        for _ in 0..200 {
            let (first, _) = load::first_byte_and_total(target, stream_request())
                .await
                .context("a streamed chat")?;
            times.push(first.as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        first_chunk.insert(name, times[times.len() / 2]);
    }
    figures.insert("ttfb_direct_us", first_chunk["direct"]);
    figures.insert("ttfb_router_us", first_chunk["router"]);
    figures.insert(
        "ttfb_added_by_router_us",
        first_chunk["router"] - first_chunk["direct"],
    );
    Ok(())
}

// ---- failures ----

/// A node's server dies under load; an agent dies.
pub async fn failure(context: &Context, work: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let (_router, address) = context.binaries.router(
        &work.join("failure-data"),
        &["--agent-timeout", "3600"],
        work,
    )?;
    let (_healthy, healthy) = context
        .binaries
        .standin("healthy", &["--models", "bench"], work)?;
    let (mut victim_proc, victim) =
        context
            .binaries
            .standin("victim", &["--models", "bench"], work)?;
    register(address, "healthy", healthy, &["bench"]).await?;
    let victim_id = register(address, "victim", victim, &["bench"]).await?;

    let load_task = tokio::spawn(load::run(
        address,
        16,
        Limit::Duration(Duration::from_secs(4)),
        Arc::new(|_| post_json("/api/generate", GENERATE_BODY.to_vec())),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    victim_proc.child.kill()?;
    victim_proc.child.wait()?;
    // The requests in flight to it when it died fail (and fail over); the
    // first failure takes it out of rotation. Wait for that, then count
    // whatever still connects to its address: requests sent after it.
    let marked = Instant::now();
    loop {
        let (_, body) = call(address, get(&format!("/api/agents/{victim_id}"))).await?;
        if serde_json::from_slice::<Value>(&body)?["routable"] == false {
            break;
        }
        if marked.elapsed() > Duration::from_secs(10) {
            bail!("the dead node was never taken out of rotation");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let tombstone = bind_retrying(victim).await?;
    let after_failure = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&after_failure);
    // Only a client's request counts: the router's own health probe of the
    // dead node (`GET /api/version`, with backoff) is how it would learn
    // that the node is back, and must go on.
    let counting = tokio::spawn(async move {
        while let Ok((mut socket, _)) = tombstone.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt as _;
                let mut head = [0u8; 4];
                let read =
                    tokio::time::timeout(Duration::from_secs(1), socket.read_exact(&mut head))
                        .await;
                if !matches!(read, Ok(Ok(_)) if &head == b"GET ") {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let result = load_task.await?;
    counting.abort();
    figures.insert("node_dies_client_errors", result.errors as f64);
    figures.insert("node_dies_requests", result.requests as f64);
    figures.insert(
        "node_dies_requests_after_failure",
        after_failure.load(Ordering::Relaxed) as f64,
    );

    // An agent dies: the real agent beside a stand-in, killed with SIGKILL.
    let (_router, address) = context.binaries.router(
        &work.join("agent-dies-data"),
        &["--agent-timeout", "2"],
        work,
    )?;
    let (_node, node) = context
        .binaries
        .standin("mortal-node", &["--models", "m"], work)?;
    let agent = context
        .binaries
        .agent(address, node, "mortal", "0.5", work)?;
    let id = wait_for_agent(address, "mortal").await?;
    agent.signal(Signal::SIGKILL);
    let killed = Instant::now();
    loop {
        let (_, body) = call(address, get(&format!("/api/agents/{id}"))).await?;
        let view: Value = serde_json::from_slice(&body)?;
        if view["status"] == "Offline" {
            break;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("the dead agent never went Offline");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    figures.insert("agent_offline_after_kill_s", killed.elapsed().as_secs_f64());
    Ok(())
}

async fn bind_retrying(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let begun = Instant::now();
    loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => return Ok(listener),
            Err(error) if begun.elapsed() > Duration::from_secs(5) => return Err(error.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

async fn wait_for_agent(router: SocketAddr, name: &str) -> anyhow::Result<String> {
    let begun = Instant::now();
    loop {
        let (_, body) = call(router, get("/api/agents")).await?;
        let agents: Vec<Value> = serde_json::from_slice(&body)?;
        if let Some(agent) = agents
            .iter()
            .find(|a| a["machine_name"] == name && a["status"] == "Online")
        {
            return agent["id"].as_str().map(str::to_owned).context("id");
        }
        if begun.elapsed() > Duration::from_secs(30) {
            bail!("{name} never registered");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- churn ----

/// 1,000 agents leaving and joining continuously while clients send requests.
pub async fn churn(context: &Context, work: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let nginx = Nginx::start(work)?;
    let (_router, address) =
        context
            .binaries
            .router(&work.join("churn-data"), &["--agent-timeout", "3600"], work)?;
    let population = 1_000u64;
    let alive = Arc::new(Mutex::new(VecDeque::new()));
    for n in 0..population {
        let id = register(address, &format!("churn-{n}"), nginx.server, &["bench"]).await?;
        alive
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push_back(id);
    }
    let duration = Duration::from_secs_f64(context.seconds * 2.0);
    let clients = tokio::spawn(load::run(
        address,
        16,
        Limit::Duration(duration),
        Arc::new(|_| post_json("/api/generate", GENERATE_BODY.to_vec())),
    ));
    let next = Arc::new(AtomicU64::new(population));
    let operations = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut churners = Vec::new();
    for _ in 0..4 {
        let (alive, next, operations) = (
            Arc::clone(&alive),
            Arc::clone(&next),
            Arc::clone(&operations),
        );
        let server = nginx.server;
        churners.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let leaving = alive.lock().ok().and_then(|mut a| a.pop_front());
                if let Some(id) = leaving {
                    let request = Request::delete(format!("/api/agents/{id}"))
                        .header("host", "127.0.0.1")
                        .body(Full::new(Bytes::new()))?;
                    let (status, _) = call(address, request).await?;
                    if status != 204 {
                        bail!("leaving: {status}");
                    }
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let id = register(address, &format!("churn-{n}"), server, &["bench"]).await?;
                if let Ok(mut alive) = alive.lock() {
                    alive.push_back(id);
                }
                operations.fetch_add(2, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for churner in churners {
        churner.await??;
    }
    let result = clients.await?;
    figures.insert("churn_client_errors", result.errors as f64);
    figures.insert("churn_client_requests_per_s", result.rate());
    figures.insert(
        "churn_joins_and_leaves_per_s",
        operations.load(Ordering::Relaxed) as f64 / duration.as_secs_f64(),
    );
    Ok(())
}
