//! The agent's life: register, then heartbeat every interval; register again
//! when the router has forgotten us or the LLM server changed; back off with
//! jitter while the router is away, never giving up.

use std::net::IpAddr;
use std::time::Duration;

use common::{BackendKind, HeartbeatReport, RegisterRequest};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::address::{ServerAddress, ServerHost};
use crate::config::AgentConfig;
use crate::identity::IdentityFile;
use crate::llm_server::{LlmServer, Probe, ServerState};
use crate::router_client::{RouterClient, RouterError};
use crate::system::{host_name, HostProbe};

/// What the router knows of us since the last registration.
struct Registered {
    id: Uuid,
    /// This agent's own credential, from the registration's answer.
    secret: Option<String>,
    /// The LLM server as it was when we registered; a change means registering again.
    backend: Option<(BackendKind, String)>,
}

/// Runs until `shutdown` is cancelled. Errors only on a configuration that
/// cannot work (an unparsable URL); an unreachable router is waited out.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let join_token = config.join_token()?;
    let router_urls = config.router_urls();
    for router_url in &router_urls {
        warn_if_secrets_in_clear(router_url, join_token.is_some());
    }
    // Routers given together share one registry, and so one identity: the
    // secret file is named after all of them, in any order.
    let mut identity_key = router_urls.clone();
    identity_key.sort();
    // Read once: both clients trust the same `--ca-cert`.
    let ca_certificates = config.ca_certificates()?;
    let router = RouterClient::new(router_urls, join_token, ca_certificates.clone())?;
    let (server, server_source, server_warning) = config.backend_address()?;
    if let Some(warning) = server_warning {
        tracing::warn!("{warning}");
    }
    let llm_server = LlmServer::new(server.url.clone(), ca_certificates)?;
    let machine_name = config.machine_name.clone().unwrap_or_else(host_name);
    let identity = IdentityFile::open(
        &config.state_dir(),
        &identity_key.join(","),
        &machine_name,
        server.port,
    )?;
    // The secret this identity was given, kept across restarts: registering
    // the identity again needs it when the router has agent credentials.
    let mut secret = identity.load();
    let mut host = HostProbe::new();
    let system_info = host.system_info();
    let mut backoff = Backoff::new(config.heartbeat_interval);
    let mut registered: Option<Registered> = None;
    let mut server_was_up: Option<bool> = None;
    // The address last checked for reachability, so the check (and its
    // warning) runs once per address rather than at every registration.
    let mut checked_address: Option<IpAddr> = None;
    tracing::info!(router = %router.base_url(), llm_server = %llm_server.base_url(), from = %server_source, machine_name = machine_name.as_str(), "Agent starting.");

    // The last state the server showed: a busy server keeps it.
    let mut last_state: Option<ServerState> = None;
    loop {
        let state = match llm_server.check().await {
            Probe::Up(state) => Some(state),
            Probe::Busy => last_state.clone(),
            Probe::Down => None,
        };
        last_state.clone_from(&state);
        report_server_change(&mut server_was_up, state.is_some(), llm_server.base_url());
        let delay = match &registered {
            Some(current) if !server_changed(current, state.as_ref()) => {
                let report = heartbeat_report(state.as_ref(), &mut host, config.max_concurrency);
                match router
                    .heartbeat(current.id, current.secret.as_deref(), &report)
                    .await
                {
                    Ok(()) => {
                        backoff.reset();
                        config.heartbeat_interval
                    }
                    Err(RouterError::UnknownAgent) => {
                        tracing::warn!(agent_id = %current.id, "The router no longer knows this agent; registering again.");
                        registered = None;
                        continue;
                    }
                    Err(RouterError::Unauthorized) => {
                        // Another registration under our name took a new
                        // secret, or the router's secrets were reset.
                        tracing::warn!(agent_id = %current.id, "The router refused this agent's secret; registering again.");
                        registered = None;
                        backoff.next_delay()
                    }
                    Err(error) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "Heartbeat failed.");
                        delay
                    }
                }
            }
            _ => {
                // The router in use now: the local address toward it is
                // the one it will see.
                let advertised = match reqwest::Url::parse(router.base_url()) {
                    Ok(router_url) => advertised_ip(&config, &server.host, &router_url).await,
                    Err(error) => Err(error.into()),
                };
                if let Ok(ip) = &advertised {
                    if state.is_some() && checked_address != Some(*ip) {
                        checked_address = Some(*ip);
                        warn_if_unreachable_at(*ip, &server).await;
                    }
                }
                let request = advertised.map(|ip| RegisterRequest {
                    agent_secret: secret.clone(),
                    tls: server.is_https(),
                    ..register_request(
                        &machine_name,
                        ip,
                        server.port,
                        &system_info,
                        state.as_ref(),
                        config.max_concurrency,
                    )
                });
                let result = match request {
                    Ok(request) => router.register(&request).await.map_err(anyhow::Error::from),
                    Err(error) => Err(error),
                };
                match result {
                    Ok(registration) => {
                        let id = registration.id;
                        tracing::info!(agent_id = %id, llm_server_up = state.is_some(), "Registered with the router.");
                        // A new secret replaces ours; no secret in the
                        // answer means the router kept the one we sent (or
                        // has none configured).
                        if let Some(new_secret) = registration.secret {
                            if let Err(error) = identity.save(id, &new_secret).await {
                                tracing::error!("{error:#}; after a restart this agent will not be able to register as {machine_name} again until an operator removes it (llm-router agents remove {id}).");
                            }
                            secret = Some(new_secret);
                        }
                        registered = Some(Registered {
                            id,
                            secret: secret.clone(),
                            backend: state.as_ref().map(|s| (s.kind, s.version.clone())),
                        });
                        backoff.reset();
                        // Send the first report (loaded models, load) right away.
                        Duration::ZERO
                    }
                    Err(error) => {
                        let taken = matches!(
                            error.downcast_ref::<RouterError>(),
                            Some(RouterError::IdentityTaken(_))
                        );
                        if taken {
                            // Retrying soon cannot help: it takes an operator.
                            let delay = config.heartbeat_interval.max(backoff.next_delay());
                            tracing::error!(secret_file = %identity.path().display(), retry_in_ms = delay.as_millis() as u64, "{error}");
                            delay
                        } else {
                            let delay = backoff.next_delay();
                            tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "Registration failed.");
                            delay
                        }
                    }
                }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    if let Some(current) = registered {
        drain(
            &router,
            current.id,
            current.secret.as_deref(),
            config.drain_timeout,
        )
        .await;
    }
    tracing::info!("Agent stopped.");
    Ok(())
}

/// Tells the router we are leaving, then waits (at most `timeout`) for the
/// requests it has in flight to this node to finish. A router that cannot
/// be reached has nothing in flight to wait for.
async fn drain(router: &RouterClient, id: Uuid, secret: Option<&str>, timeout: Duration) {
    let started = tokio::time::Instant::now();
    match router.drain(id, secret).await {
        Ok(answer) => tracing::info!(agent_id = %id, in_flight = answer.in_flight, "Draining."),
        Err(error) => {
            tracing::warn!(%error, "Could not tell the router we are leaving; stopping now.");
            return;
        }
    }
    loop {
        match router.in_flight(id, secret).await {
            Ok(0) => {
                tracing::info!(agent_id = %id, "Drained.");
                return;
            }
            Ok(in_flight) if started.elapsed() < timeout => {
                tracing::debug!(in_flight, "Waiting for requests in flight.");
            }
            Ok(in_flight) => {
                tracing::warn!(
                    in_flight,
                    "Drain timeout reached; stopping with requests in flight."
                );
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "Lost the router while draining; stopping now.");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Says, once each time, that the LLM server stopped or started answering:
/// the router then routes around the node, and an operator should know why.
fn report_server_change(was_up: &mut Option<bool>, up: bool, url: &str) {
    match (*was_up, up) {
        (Some(true) | None, false) => tracing::warn!(
            llm_server = %url,
            "The LLM server does not answer; the router is told, and sends this node nothing until it does. Is it running, and at this address?"
        ),
        (Some(false), true) => {
            tracing::warn!(llm_server = %url, "The LLM server answers again.")
        }
        _ => {}
    }
    *was_up = Some(up);
}

/// Warns, with what to do, when the server answers the agent but not at the
/// address the router will use: the usual case is Ollama's default setup,
/// which listens on 127.0.0.1 only. The router finds out too (the node's
/// first request fails and the router keeps it out of rotation until it
/// reaches it), but only the agent can say why.
async fn warn_if_unreachable_at(ip: IpAddr, server: &ServerAddress) {
    let local_only = match &server.host {
        ServerHost::Ip(configured) => *configured != ip,
        ServerHost::Name(_) | ServerHost::AnyInterface => true,
    };
    if !local_only || ip.is_unspecified() {
        return;
    }
    let address = std::net::SocketAddr::new(ip, server.port);
    let connected = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(address),
    )
    .await;
    if matches!(connected, Ok(Ok(_))) {
        return;
    }
    tracing::warn!(
        llm_server = %server.url,
        advertised = %address,
        "The LLM server answers at {} but not at {address}, the address the router will use: the router cannot reach it. \
         Ollama listens on 127.0.0.1 only unless OLLAMA_HOST says otherwise: run `systemctl edit ollama`, add \
         [Service] Environment=\"OLLAMA_HOST=0.0.0.0\", then `systemctl restart ollama`. For llama.cpp's server \
         or vLLM, start it with --host 0.0.0.0. Then open port {} to the router host (for example `ufw allow {}/tcp`), \
         and check from the router host with `curl http://{address}/`. If the router must use another address, \
         set --advertise-ip.",
        server.url,
        server.port,
        server.port,
    );
}

/// A join token and the agent's secret sent over plain HTTP to another
/// machine can be read by anyone on the way.
fn warn_if_secrets_in_clear(router_url: &str, has_token: bool) {
    let Ok(url) = reqwest::Url::parse(router_url) else {
        return;
    };
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => true,
    };
    if has_token && url.scheme() == "http" && !loopback {
        tracing::warn!(router = router_url, "SECURITY: the join token and this agent's secret go to the router over plain http://; serve the router with --tls-cert and --tls-key and use an https:// URL.");
    }
}

/// The LLM server came up, or came back as another kind or version.
fn server_changed(registered: &Registered, state: Option<&ServerState>) -> bool {
    match (state, &registered.backend) {
        (None, _) => false,
        (Some(state), Some((kind, version))) => state.kind != *kind || state.version != *version,
        (Some(_), None) => true,
    }
}

fn register_request(
    machine_name: &str,
    ip: IpAddr,
    port: u16,
    system_info: &common::SystemInfo,
    state: Option<&ServerState>,
    max_concurrency: Option<u32>,
) -> RegisterRequest {
    RegisterRequest {
        machine_name: machine_name.to_owned(),
        ip_address: ip.to_string(),
        port,
        runtime_version: state.map_or_else(|| "unknown".to_owned(), |s| s.version.clone()),
        system_info: system_info.clone(),
        models: state.map(|s| s.models.clone()).unwrap_or_default(),
        backend: state.map(|s| s.kind).unwrap_or_default(),
        tls: false,
        max_concurrency: max_concurrency.or(state.and_then(|s| s.slots)),
        agent_secret: None,
    }
}

/// `max_concurrency`: the operator's `--max-concurrency`, which wins over
/// what the server says of its slots.
fn heartbeat_report(
    state: Option<&ServerState>,
    host: &mut HostProbe,
    max_concurrency: Option<u32>,
) -> HeartbeatReport {
    let (cpu, memory) = host.load();
    HeartbeatReport {
        models: state.map(|s| s.models.clone()),
        loaded_models: state.map(|s| s.loaded_models.clone()),
        requests_in_flight: None,
        llm_server_up: Some(state.is_some()),
        cpu_usage_percent: Some(cpu),
        memory_used: Some(memory),
        max_concurrency: max_concurrency.or(state.and_then(|s| s.slots)),
    }
}

/// The address the router should use for our LLM server: the override; else
/// the server's configured host when the router could reach it (not
/// loopback, not every interface); else the local address of a socket
/// connected to the router, which is the address the router sees us at. No
/// outside address is ever probed.
async fn advertised_ip(
    config: &AgentConfig,
    server_host: &ServerHost,
    router_url: &reqwest::Url,
) -> anyhow::Result<IpAddr> {
    if let Some(ip) = config.advertise_ip {
        return Ok(ip);
    }
    if let Some(ip) = routable_server_ip(server_host).await {
        return Ok(ip);
    }
    let host = router_url
        .host_str()
        .unwrap_or("127.0.0.1")
        .trim_matches(['[', ']']);
    let port = router_url.port_or_known_default().unwrap_or(8080);
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    Ok(stream.local_addr()?.ip())
}

async fn routable_server_ip(host: &ServerHost) -> Option<IpAddr> {
    let routable = |ip: &IpAddr| !ip.is_loopback() && !ip.is_unspecified();
    match host {
        ServerHost::AnyInterface => None,
        ServerHost::Ip(ip) => Some(*ip).filter(routable),
        ServerHost::Name(name) => {
            let mut addresses = tokio::net::lookup_host((name.as_str(), 0)).await.ok()?;
            addresses
                .find(|address| routable(&address.ip()))
                .map(|address| address.ip())
        }
    }
}

/// Capped exponential backoff with full jitter: retries spread out, so a
/// fleet does not hammer a router that has just come back.
struct Backoff {
    attempt: u32,
    cap: Duration,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(250);

    fn new(heartbeat_interval: Duration) -> Self {
        Backoff {
            attempt: 0,
            cap: heartbeat_interval.clamp(Duration::from_secs(1), Duration::from_secs(30)),
        }
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = Self::BASE
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let low = ceiling / 2;
        rand::thread_rng().gen_range(low..=ceiling)
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_under_its_cap() {
        let mut backoff = Backoff::new(Duration::from_secs(4));
        let first = backoff.next_delay();
        assert!(first <= Backoff::BASE);
        for _ in 0..40 {
            assert!(backoff.next_delay() <= Duration::from_secs(4));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Backoff::BASE);
    }

    #[tokio::test]
    async fn loopback_and_every_interface_are_not_advertised() {
        for host in [
            "127.0.0.1",
            "127.0.0.5:11434",
            "0.0.0.0",
            "::",
            ":11434",
            "localhost",
        ] {
            let (address, _) = crate::address::parse_server_address(host).expect(host);
            assert_eq!(routable_server_ip(&address.host).await, None, "{host}");
        }
    }
}
