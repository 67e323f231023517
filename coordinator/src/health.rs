//! The router's own checks of nodes: the prober, for nodes it could not
//! reach, and the health checks, of every node in rotation.
//!
//! A request that fails on a node (no connection, a 5xx, silence before the
//! answer) takes the node out of rotation (`Registry::mark_unreachable`).
//! Only this prober puts it back: its agent's heartbeats cannot, because an
//! agent that reaches its LLM server on loopback says nothing of whether
//! the router can (Ollama listens on 127.0.0.1 unless told otherwise). The
//! prober asks the server what any client would (`GET /api/version` of
//! Ollama, `GET /v1/models` of an OpenAI-compatible server), at the
//! address the router uses, with a backoff per node from 250 ms up to 10 s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::BackendKind;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::registry::{ProbeTarget, Registry};

/// Probes in flight at once, so that a fleet gone dark at once is probed
/// steadily rather than all together.
const MAX_CONCURRENT_PROBES: usize = 64;
/// How often the prober looks for due probes when none is scheduled.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// Consecutive failed health checks that take a node out of rotation.
pub const FAILURES_TO_LEAVE: u32 = 2;

/// The client probes go out on. `node_tls`: how nodes that speak HTTPS are
/// checked, as the proxy checks them.
fn probe_client(
    timeout: Duration,
    node_tls: &rustls::ClientConfig,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout)
        // A probe is a one-off: keep no connection to a node that failed.
        .pool_max_idle_per_host(0)
        .no_proxy()
        // The proxy's trust, not another read of the system's store.
        .use_preconfigured_tls(node_tls.clone())
        .build()
}

/// Runs the prober until `stop` is cancelled; the caller awaits it.
pub async fn run_prober(
    registry: Arc<Registry>,
    timeout: Duration,
    node_tls: Arc<rustls::ClientConfig>,
    stop: CancellationToken,
) {
    let http = match probe_client(timeout, &node_tls) {
        Ok(http) => http,
        Err(error) => {
            return tracing::error!(%error, "Could not start the node prober; unreachable nodes stay out of rotation.");
        }
    };
    let mut running: JoinSet<(ProbeTarget, bool)> = JoinSet::new();
    loop {
        let room = MAX_CONCURRENT_PROBES - running.len();
        let (due, next) = registry.probes_due(Instant::now(), room);
        for target in due {
            let http = http.clone();
            running.spawn(async move {
                let reached = probe(&http, &target).await;
                (target, reached)
            });
        }
        let wake = next
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(IDLE_TICK)
            .min(IDLE_TICK);
        tokio::select! {
            () = stop.cancelled() => break,
            Some(finished) = running.join_next(), if !running.is_empty() => {
                if let Ok((target, reached)) = finished {
                    registry.record_probe(&target, reached);
                }
            }
            () = tokio::time::sleep(wake) => {}
        }
    }
    running.shutdown().await;
}

/// What one health check of a node found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// It answered (anything below 500: a server that says "not found" is
    /// a server that runs).
    Up,
    /// Connected, but no answer in time: busy or dead, which only its load
    /// can tell.
    Slow,
    /// Refused, reset, or a 5xx.
    Down,
}

/// Checks every node in rotation every `interval` until `stop`: a node
/// whose server fails [`FAILURES_TO_LEAVE`] checks in a row leaves the
/// rotation (as a failed request would take it out; the prober brings it
/// back, within one interval, once it answers). A check that times out
/// while the router has requests in flight to the node is no failure: a
/// server busy generating (llama-cpp-python's answers its model list only
/// between generations) is not a dead one.
pub async fn run_health_checks(
    registry: Arc<Registry>,
    interval: Duration,
    node_tls: Arc<rustls::ClientConfig>,
    stop: CancellationToken,
) {
    // A check may take most of the interval, at most 5 s.
    let timeout = (interval * 3 / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let http = match probe_client(timeout, &node_tls) {
        Ok(http) => http,
        Err(error) => {
            return tracing::error!(%error, "Could not start the health checks; nodes leave the rotation only on failed requests.");
        }
    };
    registry.limit_probe_backoff(interval);
    let mut failures: HashMap<uuid::Uuid, u32> = HashMap::new();
    // The first round one interval after start, not at once: nodes that
    // just registered were just checked by their agents.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let table = registry.routing_table();
        let mut running: JoinSet<(uuid::Uuid, Health, bool)> = JoinSet::new();
        let mut checked = std::collections::HashSet::new();
        for node in table.candidates() {
            while running.len() >= MAX_CONCURRENT_PROBES {
                if let Some(Ok(outcome)) = running.join_next().await {
                    judge(&registry, &mut failures, outcome);
                }
            }
            let target = ProbeTarget {
                id: node.id,
                address: node.address,
                backend: node.backend,
                tls: node.tls,
            };
            checked.insert(node.id);
            let (http, in_flight) = (http.clone(), Arc::clone(&node.in_flight));
            running.spawn(async move {
                let health = check(&http, &target).await;
                // Busy: the router's own requests are there now.
                let busy = in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0;
                (target.id, health, busy)
            });
        }
        drop(table);
        loop {
            tokio::select! {
                () = stop.cancelled() => return running.shutdown().await,
                finished = running.join_next() => match finished {
                    Some(Ok(outcome)) => judge(&registry, &mut failures, outcome),
                    Some(Err(_)) => {}
                    None => break,
                },
            }
        }
        // Nodes gone from the rotation start over when they come back.
        failures.retain(|id, _| checked.contains(id));
    }
}

fn judge(
    registry: &Registry,
    failures: &mut HashMap<uuid::Uuid, u32>,
    (id, health, busy): (uuid::Uuid, Health, bool),
) {
    let failed = match health {
        Health::Up => false,
        Health::Slow => !busy,
        Health::Down => true,
    };
    if !failed {
        if health == Health::Up {
            failures.remove(&id);
        }
        return;
    }
    let count = failures.entry(id).or_insert(0);
    *count += 1;
    if *count >= FAILURES_TO_LEAVE {
        failures.remove(&id);
        tracing::warn!(agent_id = %id, ?health, "Health checks failed {FAILURES_TO_LEAVE} times in a row.");
        registry.mark_unreachable(id);
    }
}

fn probe_url(target: &ProbeTarget) -> String {
    let path = match target.backend {
        BackendKind::Ollama => "/api/version",
        BackendKind::OpenAi => "/v1/models",
    };
    let scheme = if target.tls { "https" } else { "http" };
    format!("{scheme}://{}{path}", target.address)
}

async fn check(http: &reqwest::Client, target: &ProbeTarget) -> Health {
    match http.get(probe_url(target)).send().await {
        Ok(response) if response.status().as_u16() < 500 => Health::Up,
        Ok(_) => Health::Down,
        Err(error) if error.is_timeout() && !error.is_connect() => Health::Slow,
        Err(_) => Health::Down,
    }
}

/// Whether the node's LLM server answers the router with a success.
async fn probe(http: &reqwest::Client, target: &ProbeTarget) -> bool {
    match http.get(probe_url(target)).send().await {
        Ok(response) if response.status().is_success() => true,
        Ok(response) => {
            tracing::debug!(agent_id = %target.id, address = %target.address, status = %response.status(), "Probe answered with an error.");
            false
        }
        Err(error) => {
            tracing::debug!(agent_id = %target.id, address = %target.address, %error, "Probe failed.");
            false
        }
    }
}
