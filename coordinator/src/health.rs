//! The prober: the router's own check of nodes it could not reach.
//!
//! A request that fails on a node (no connection, a 5xx, silence before the
//! answer) takes the node out of rotation (`Registry::mark_unreachable`).
//! Only this prober puts it back: its agent's heartbeats cannot, because an
//! agent that reaches its LLM server on loopback says nothing of whether
//! the router can (Ollama listens on 127.0.0.1 unless told otherwise). The
//! prober asks the server what any client would (`GET /api/version` of
//! Ollama, `GET /v1/models` of an OpenAI-compatible server), at the
//! address the router uses, with a backoff per node from 250 ms up to 10 s.

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

/// Runs the prober until `stop` is cancelled; the caller awaits it.
/// `node_ca`: trusted for nodes that speak HTTPS, as the proxy trusts them.
pub async fn run_prober(
    registry: Arc<Registry>,
    timeout: Duration,
    node_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    stop: CancellationToken,
) {
    let mut http = reqwest::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout)
        // A probe is a one-off: keep no connection to a node that failed.
        .pool_max_idle_per_host(0)
        .no_proxy();
    for certificate in &node_ca {
        if let Ok(certificate) = reqwest::Certificate::from_der(certificate) {
            http = http.add_root_certificate(certificate);
        }
    }
    let http = match http.build() {
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

/// Whether the node's LLM server answers the router with a success.
async fn probe(http: &reqwest::Client, target: &ProbeTarget) -> bool {
    let path = match target.backend {
        BackendKind::Ollama => "/api/version",
        BackendKind::OpenAi => "/v1/models",
    };
    let scheme = if target.tls { "https" } else { "http" };
    let url = format!("{scheme}://{}{path}", target.address);
    match http.get(&url).send().await {
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
