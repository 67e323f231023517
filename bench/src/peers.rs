//! The field's routers side by side: llm-router, nginx as a plain reverse
//! proxy, and the Rust LLM routers on PyPI (SGLang's model gateway `smg`,
//! `sglang-router`, `vllm-router`), each in front of the same nginx
//! fixed-response server, driven by the same load on the OpenAI route they
//! all serve. Each peer runs in its regular mode (round robin, workers
//! checked at `GET /health`) with a metrics port of its own, since they all
//! bind one by default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::load::{self, post_json, Limit};
use crate::procs::{free_port, wait_for_port, Nginx, Proc};
use crate::scenarios::{call, check_clean, register, Context, Figures};

/// The one request every router here serves the same way.
const CHAT_BODY: &[u8] =
    br#"{"model":"bench","messages":[{"role":"user","content":"Why is the sky blue?"}]}"#;
const CHAT_PATH: &str = "/v1/chat/completions";

/// The peers, as their console scripts are named.
pub const PEERS: [&str; 3] = ["smg", "sglang-router", "vllm-router"];

/// The figure names for each contender, fixed here so that they are
/// `&'static str` like every other figure.
struct Names {
    rps: &'static str,
    p50: &'static str,
    p99: &'static str,
    added: &'static str,
    ratio: &'static str,
}

fn names(contender: &str) -> Names {
    match contender {
        "router" => Names {
            rps: "peers_router_rps",
            p50: "peers_router_p50_us",
            p99: "peers_router_p99_us",
            added: "peers_router_added_p50_us",
            ratio: "",
        },
        "nginx" => Names {
            rps: "peers_nginx_rps",
            p50: "peers_nginx_p50_us",
            p99: "peers_nginx_p99_us",
            added: "peers_nginx_added_p50_us",
            ratio: "peers_router_vs_nginx",
        },
        "smg" => Names {
            rps: "peers_smg_rps",
            p50: "peers_smg_p50_us",
            p99: "peers_smg_p99_us",
            added: "peers_smg_added_p50_us",
            ratio: "peers_router_vs_smg",
        },
        "sglang-router" => Names {
            rps: "peers_sglang_router_rps",
            p50: "peers_sglang_router_p50_us",
            p99: "peers_sglang_router_p99_us",
            added: "peers_sglang_router_added_p50_us",
            ratio: "peers_router_vs_sglang_router",
        },
        _ => Names {
            rps: "peers_vllm_router_rps",
            p50: "peers_vllm_router_p50_us",
            p99: "peers_vllm_router_p99_us",
            added: "peers_vllm_router_added_p50_us",
            ratio: "peers_router_vs_vllm_router",
        },
    }
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
    let (_router, router) = context.binaries.router(
        &work.join("peers-data"),
        &["--agent-timeout", "3600", "--health-check-interval", "0"],
        work,
    )?;
    register(router, "nginx", nginx.server, &["bench"]).await?;
    let chat = || -> load::MakeRequest { Arc::new(|_| post_json(CHAT_PATH, CHAT_BODY.to_vec())) };

    // One connection, straight to the server: what every router adds to.
    let direct = load::run(
        nginx.server,
        1,
        Limit::Duration(one_connection(context)),
        chat(),
    )
    .await;
    check_clean("direct", &direct)?;
    figures.insert("peers_direct_p50_us", direct.p50_us());

    // The router and nginx run a turn before each peer's (so three each,
    // spread over the scenario as the machine's load drifts), and each peer
    // is started only for its own turn: their health checks would
    // otherwise take CPU from the others' turns.
    let mut loaded: BTreeMap<&str, load::LoadResult> = BTreeMap::new();
    let mut single: BTreeMap<&str, load::LoadResult> = BTreeMap::new();
    for peer in PEERS {
        for name in ["router", "nginx", peer] {
            let (proc, address) = match name {
                "router" => (None, router),
                "nginx" => (None, nginx.proxy),
                peer => {
                    let (proc, address) = start_peer(peers_dir, peer, nginx.server, work)?;
                    (Some(proc), address)
                }
            };
            wait_routing(name, address).await?;
            let under_load = load::run(address, 64, context.measure_for(), chat()).await;
            check_clean(name, &under_load)
                .with_context(|| format!("{name} under 64 connections"))?;
            let alone =
                load::run(address, 1, Limit::Duration(one_connection(context)), chat()).await;
            check_clean(name, &alone).with_context(|| format!("{name} at one connection"))?;
            drop(proc);
            for (results, result) in [(&mut loaded, under_load), (&mut single, alone)] {
                match results.get_mut(name) {
                    Some(total) => total.merge(&result),
                    None => {
                        results.insert(name, result);
                    }
                }
            }
        }
    }
    let router_rate = loaded["router"].rate();
    for (name, result) in &loaded {
        let names = names(name);
        figures.insert(names.rps, result.rate());
        figures.insert(names.p50, result.p50_us());
        figures.insert(names.p99, result.p99_us());
        figures.insert(names.added, single[name].p50_us() - direct.p50_us());
        if *name != "router" {
            figures.insert(names.ratio, router_rate / result.rate());
        }
    }
    Ok(())
}

fn one_connection(context: &Context) -> Duration {
    Duration::from_secs_f64(context.seconds.min(3.0))
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
