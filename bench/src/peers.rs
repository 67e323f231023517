//! The field's routers side by side: llm-router, nginx as a plain reverse
//! proxy, and the Rust LLM routers on PyPI (SGLang's model gateway `smg`,
//! `sglang-router`, `vllm-router`), each in front of the same nginx
//! fixed-response server, driven by the same load on the OpenAI route they
//! all serve. Each peer runs in its regular mode (round robin, workers
//! checked at `GET /health`) with a metrics port of its own, since they all
//! bind one by default. nginx's TCP relay runs beside them as the ceiling
//! (see [`Relay`]): the most any proxy can reach here, and so the most any
//! router can be ahead of a peer. Each is loaded at 64 and 256 connections,
//! and its CPU per request is read from `/proc`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::load::{self, post_json, Limit};
use crate::procs::{cpu_time, free_port, wait_for_port, CpuTime, Nginx, Proc, Relay};
use crate::scenarios::{call, check_clean, register, Context, Figures};

/// The one request every router here serves the same way.
const CHAT_BODY: &[u8] =
    br#"{"model":"bench","messages":[{"role":"user","content":"Why is the sky blue?"}]}"#;
const CHAT_PATH: &str = "/v1/chat/completions";

/// The peers, as their console scripts are named.
pub const PEERS: [&str; 3] = ["smg", "sglang-router", "vllm-router"];

/// Connections of the loaded turns: the suite's usual 64, and 256, where
/// each router's queueing shows.
const CONNECTIONS: [usize; 2] = [64, 256];

/// Load before the measured turns, for every contender alike.
const WARM_UP: Duration = Duration::from_secs(3);

/// A figure's name made at run time ("peers_smg_rps"), kept for the life of
/// the process since figures are keyed by `&'static str`; each name is made
/// once however many runs ask for it.
fn figure(name: String) -> &'static str {
    static NAMES: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = names.get(name.as_str()) {
        return known;
    }
    let made: &'static str = Box::leak(name.into_boxed_str());
    names.insert(made);
    made
}

/// How a contender's figures are named: `sglang-router` as `sglang_router`.
fn stem(contender: &str) -> String {
    contender.replace('-', "_")
}

/// Starts one peer in front of `worker`; answers once it routes.
fn start_peer(
    bin_dir: &Path,
    name: &str,
    worker: SocketAddr,
    work: &Path,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let binary = bin_dir.join(name);
    if !binary.exists() {
        bail!(
            "{} is missing: scripts/bench.sh installs the peers (pip install smg sglang-router vllm-router) into a virtualenv; pass its bin directory as --peers-dir",
            binary.display()
        );
    }
    let port = free_port()?;
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut command = Command::new(&binary);
    if name != "vllm-router" {
        command.arg("launch");
    }
    command
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--worker-urls")
        .arg(format!("http://{worker}"))
        .args(["--policy", "round_robin", "--log-level"])
        // vllm-router took the Python spelling.
        .arg(if name == "vllm-router" {
            "warning"
        } else {
            "warn"
        })
        .args(["--prometheus-host", "127.0.0.1", "--prometheus-port"])
        .arg(free_port()?.to_string());
    let proc = Proc::spawn(name, command, work)?;
    wait_for_port(address)?;
    Ok((proc, address))
}

/// Waits until a router answers the chat request with 200 (its first
/// health round over).
async fn wait_routing(name: &str, address: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = call(address, post_json(CHAT_PATH, CHAT_BODY.to_vec())).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} did not route the chat request within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn peers(
    context: &Context,
    peers_dir: &Path,
    work: &Path,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let nginx = Nginx::start(work)?;
    let relay = Relay::start(work, nginx.server)?;
    let (router_proc, router) = context.binaries.router(
        &work.join("peers-data"),
        &["--agent-timeout", "3600", "--health-check-interval", "0"],
        work,
    )?;
    register(router, "nginx", nginx.server, &["bench"]).await?;
    let chat = || -> load::MakeRequest { Arc::new(|_| post_json(CHAT_PATH, CHAT_BODY.to_vec())) };

    // One connection, straight to the server: what every router adds to.
    let direct = load::run(nginx.server, 1, context.one_connection(), chat()).await;
    check_clean("direct", &direct)?;
    figures.insert("peers_direct_p50_us", direct.p50_us());

    // The router, nginx and the relay run a turn before each peer's (so
    // three each, spread over the scenario as the machine's load drifts),
    // and each peer is started only for its own turn: their health checks
    // would otherwise take CPU from the others' turns.
    let mut loaded: BTreeMap<(usize, &str), load::LoadResult> = BTreeMap::new();
    let mut single: BTreeMap<&str, load::LoadResult> = BTreeMap::new();
    // CPU time the contender's processes used at 64 connections, and the
    // requests they served meanwhile.
    let mut cpu: BTreeMap<&str, (CpuTime, u64)> = BTreeMap::new();
    for peer in PEERS {
        for name in ["router", "nginx", "relay", peer] {
            let (proc, address, pid) = match name {
                "router" => (None, router, router_proc.child.id()),
                "nginx" => (None, nginx.proxy, nginx.proxy_proc.child.id()),
                "relay" => (None, relay.address, relay.proc.child.id()),
                peer => {
                    let (proc, address) = start_peer(peers_dir, peer, nginx.server, work)?;
                    let pid = proc.child.id();
                    (Some(proc), address, pid)
                }
            };
            wait_routing(name, address).await?;
            // Every contender gets the same unmeasured warm-up: a peer just
            // started answered its first seconds 5 to 25 % slower (smg
            // 20.7k/s, then 23.2k/s, then 27.5k/s in three 4 s wrk runs).
            let warm_up =
                load::run(address, CONNECTIONS[0], Limit::Duration(WARM_UP), chat()).await;
            check_clean(name, &warm_up).with_context(|| format!("{name} warming up"))?;
            for connections in CONNECTIONS {
                let cpu_before = cpu_time(pid);
                let result = load::run(address, connections, context.measure_for(), chat()).await;
                let cpu_used = cpu_time(pid) - cpu_before;
                check_clean(name, &result)
                    .with_context(|| format!("{name} under {connections} connections"))?;
                if connections == CONNECTIONS[0] {
                    let total = cpu.entry(name).or_default();
                    total.0 += cpu_used;
                    total.1 += result.requests;
                }
                load::add_turn(&mut loaded, (connections, name), result);
            }
            let alone = load::run(address, 1, context.one_connection(), chat()).await;
            check_clean(name, &alone).with_context(|| format!("{name} at one connection"))?;
            drop(proc);
            load::add_turn(&mut single, name, alone);
        }
    }
    for ((connections, name), result) in &loaded {
        let stem = stem(name);
        let router_rate = loaded[&(*connections, "router")].rate();
        if *connections == CONNECTIONS[0] {
            figures.insert(figure(format!("peers_{stem}_rps")), result.rate());
            figures.insert(figure(format!("peers_{stem}_p50_us")), result.p50_us());
            figures.insert(figure(format!("peers_{stem}_p99_us")), result.p99_us());
            figures.insert(
                figure(format!("peers_{stem}_added_p50_us")),
                single[name].p50_us() - direct.p50_us(),
            );
            // Split, because the kernel's share (the socket calls) is the
            // same for every proxy: what differs is the user-space share.
            let (used, requests) = cpu[name];
            let per_request_us = |seconds: f64| seconds * 1e6 / requests.max(1) as f64;
            figures.insert(
                figure(format!("peers_{stem}_cpu_us")),
                per_request_us(used.user + used.kernel),
            );
            figures.insert(
                figure(format!("peers_{stem}_cpu_user_us")),
                per_request_us(used.user),
            );
            figures.insert(
                figure(format!("peers_{stem}_cpu_kernel_us")),
                per_request_us(used.kernel),
            );
            if *name != "router" {
                figures.insert(
                    figure(format!("peers_router_vs_{stem}")),
                    router_rate / result.rate(),
                );
            }
            // The most any proxy could be ahead of this one here.
            if *name != "relay" {
                figures.insert(
                    figure(format!("peers_relay_vs_{stem}")),
                    loaded[&(*connections, "relay")].rate() / result.rate(),
                );
            }
        } else {
            figures.insert(
                figure(format!("peers_{stem}_rps_{connections}")),
                result.rate(),
            );
            if *name != "router" {
                figures.insert(
                    figure(format!("peers_router_vs_{stem}_{connections}")),
                    router_rate / result.rate(),
                );
            }
        }
    }
    Ok(())
}

/// Where the peers are unless `--peers-dir` says: the virtualenv
/// scripts/bench.sh makes.
pub fn default_peers_dir() -> PathBuf {
    std::env::var_os("PEERS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/llm-router-bench/peers")
        })
        .join("bin")
}
