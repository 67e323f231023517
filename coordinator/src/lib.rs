//! llm-router: one endpoint for a fleet of LLM servers. A durable registry
//! of nodes that knows who is alive, and a proxy that sends each Ollama or
//! OpenAI request to a node that can serve it. `main.rs` and the tests both
//! start it through [`run`].

pub mod api;
pub mod auth;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod fields;
pub mod health;
pub mod listen;
pub mod node_address;
pub mod proxy;
pub mod record;
pub mod registry;
mod serve;
mod sharded;
pub mod store;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api::{app, AppState};
/// The HTTP types in the public API (`Candidate::host_header`).
pub use axum::http as axum_http;
pub use config::{Config, LogFormat};
pub use registry::Registry;

/// Starts `count` more event loops, each a single-threaded runtime on its
/// own OS thread with its own listening socket on the same address, as nginx
/// runs a worker per core: a client connection then lives on one thread from
/// accept to close, with its requests, their node connections and their
/// answers, and no request crosses threads. The caller's runtime is one more
/// loop. When `listener` was bound with `SO_REUSEPORT` (as `main` binds it),
/// the kernel spreads new connections evenly over the sockets; otherwise the
/// loops share the one socket.
fn spawn_event_loops(
    listener: &TcpListener,
    app: &api::App,
    proxy: &Arc<proxy::Proxy>,
    options: serve::ServeOptions,
    count: usize,
    stop: &CancellationToken,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    use std::os::fd::AsFd;
    let address = listener.local_addr()?;
    let mut handles = Vec::with_capacity(count);
    for n in 1..=count {
        let shared = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
        shared.set_nonblocking(true)?;
        let (app, stop, proxy, options) = (
            app.clone(),
            stop.clone(),
            Arc::clone(proxy),
            options.clone(),
        );
        let handle = std::thread::Builder::new()
            .name(format!("event-loop-{n}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => return tracing::error!(%error, "Could not start an event loop."),
                };
                let served = runtime.block_on(async move {
                    tokio::spawn(prune_node_connections(proxy, stop.clone()));
                    let listener = match listen::bind_reusing_port(address) {
                        Ok(own) => own,
                        Err(_) => TcpListener::from_std(shared)?,
                    };
                    serve::serve(listener, app, options, stop).await;
                    std::io::Result::Ok(())
                });
                if let Err(error) = served {
                    tracing::error!(%error, "An event loop failed.");
                }
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Why a node loaded from the store must stay out of rotation: the address
/// policy now refuses where it is (the policy changed, or the file was
/// edited). It stays out until it registers at an address the policy allows.
fn refusal_of(
    policy: &node_address::NodeAddressPolicy,
) -> impl Fn(std::net::SocketAddr) -> Option<String> + Sync + '_ {
    |address| {
        policy
            .check(address.ip(), address.port())
            .err()
            .map(|refusal| refusal.to_string())
    }
}

/// The connection caps: as configured, or from the descriptor limit. Half
/// of the descriptors go to clients; the rest stay for node connections,
/// the data files and the listening sockets. One address may hold a quarter
/// of the clients' share, so that one misbehaving client (or many silent
/// connections from one attacker) cannot take every slot.
fn connection_limits(config: &Config) -> serve::ConnectionLimits {
    let descriptors = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _hard)| soft);
    let total = match config.max_connections {
        0 => usize::try_from(descriptors / 2)
            .unwrap_or(usize::MAX)
            .max(16),
        n => n,
    };
    let per_client = match config.max_connections_per_client {
        0 => (total / 4).max(4),
        n => n,
    };
    tracing::info!(
        max_connections = total,
        max_connections_per_client = per_client,
        file_descriptors = descriptors,
        "Connection limits set."
    );
    serve::ConnectionLimits::new(total, per_client)
}

/// Each event loop's idle node connections are its own (thread-local), so
/// each loop prunes its own, every second, until it stops.
async fn prune_node_connections(proxy: Arc<proxy::Proxy>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => proxy.prune_idle_connections(),
        }
    }
}

/// Whoever can reach the port can register a node, and so receive prompts,
/// unless a join token is configured: say so loudly when that is not only
/// this machine.
fn warn_if_open_to_the_network(ip: std::net::IpAddr, credentials: &auth::Credentials) {
    if ip.is_loopback() {
        return;
    }
    if !credentials.agents_have_secrets() {
        tracing::warn!(
            listen_address = %ip,
            "SECURITY: listening on a non-loopback address with no join token and no \
             admin token. Anyone who can reach this port can register a node and \
             receive prompts, take over any node's identity, send heartbeats for it, \
             and drain or remove it. Set LLM_ROUTER_AGENT_TOKEN (or --agent-token) \
             and LLM_ROUTER_ADMIN_TOKEN (or --admin-token)."
        );
    } else if !credentials.registration_guarded() {
        tracing::warn!(
            listen_address = %ip,
            "SECURITY: listening on a non-loopback address with no join token. \
             Anyone who can reach this port can register a new node and receive \
             prompts for its models (registered nodes keep their identities). \
             Set LLM_ROUTER_AGENT_TOKEN (or --agent-token) to require one."
        );
    }
}

/// Serves on `listener` until `shutdown` completes; then stops accepting,
/// lets open requests finish, flushes the store and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let credentials = Arc::new(config.credentials()?);
    telemetry::install();
    let address = listener.local_addr()?;
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let database = config.database()?;
    let roster = Arc::new(store::RouterRoster::new(
        uuid::Uuid::new_v4(),
        advertised_address(scheme, address),
        env!("CARGO_PKG_VERSION").to_owned(),
        database.is_some(),
    ));
    let node_ca_certificates = match &config.node_ca_cert {
        Some(path) => tls::read_certificates(path, "--node-ca-cert")?,
        None => Vec::new(),
    };
    let node_tls = tls::NodeClientConfigLoading::start(node_ca_certificates);
    let node_addresses = Arc::new(node_address::NodeAddressPolicy::for_this_machine(
        address,
        config.node_networks.clone().unwrap_or_default().0,
    ));
    let (registry, durability) = {
        let hold_out = refusal_of(&node_addresses);
        match database {
            None => open_files(&config, &hold_out)?,
            Some(url) => open_database(&config, url, Arc::clone(&roster), &hold_out).await?,
        }
    };
    let node_tls = node_tls.wait();
    let sweeper =
        registry::Sweeper::start(Arc::clone(&registry), durability.flush_interval(&config))?;
    let stop_prober = CancellationToken::new();
    let prober = tokio::spawn(health::run_prober(
        Arc::clone(&registry),
        config.connect_timeout,
        Arc::clone(&node_tls),
        stop_prober.clone(),
    ));
    let health_checks = (!config.health_check_interval.is_zero()).then(|| {
        tokio::spawn(health::run_health_checks(
            Arc::clone(&registry),
            config.health_check_interval,
            Arc::clone(&node_tls),
            stop_prober.clone(),
        ))
    });
    // Also stops them if start-up fails below.
    let stop_prober = stop_prober.drop_guard();

    let connection_limits = Arc::new(connection_limits(&config));
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    warn_if_open_to_the_network(address.ip(), &credentials);
    // Last: tests and scripts take this line to mean the router is ready.
    tracing::info!(%address, "llm-router listening on {scheme}://{address}");
    let proxy = Arc::new(proxy::Proxy::new(
        Arc::clone(&registry),
        config.proxy_options(),
        node_tls,
    ));
    let forwarder = Arc::new(api::forward::Forwarder {
        proxy: Arc::clone(&proxy),
        max_request_body: config.max_request_body,
        body_read_timeout: config.body_read_timeout,
        body_budget: api::forward::BodyBudget::new(config.max_body_memory),
    });
    let state = AppState::new(api::SharedState {
        forwarder,
        origin_policy: Arc::new(api::origin::OriginPolicy {
            allowed_hosts: config
                .allowed_hosts
                .iter()
                .map(|host| host.trim().to_owned())
                .filter(|host| !host.is_empty())
                .collect(),
        }),
        node_addresses,
        credentials,
        body_read_timeout: config.body_read_timeout,
        registry: Arc::clone(&registry),
        routers: roster,
    });
    let app = app(state);
    let serve_options = serve::ServeOptions {
        header_read_timeout: config.header_read_timeout,
        send_timeout: config.send_timeout,
        limits: connection_limits,
        tls,
    };
    let stop_event_loops = CancellationToken::new();
    let event_loops = spawn_event_loops(
        &listener,
        &app,
        &proxy,
        serve_options.clone(),
        config.serving_threads() - 1,
        &stop_event_loops,
    )?;
    let stop_serving = stop_event_loops.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_serving.cancel();
    });
    tokio::spawn(prune_node_connections(proxy, stop_event_loops.clone()));
    serve::serve(listener, app, serve_options, stop_event_loops).await;
    for event_loop in event_loops {
        // Each stops accepting and lets its open requests finish.
        let _ = tokio::task::spawn_blocking(move || event_loop.join()).await;
    }

    drop(stop_prober);
    let _ = prober.await;
    if let Some(health_checks) = health_checks {
        let _ = health_checks.await;
    }
    tracing::info!("Shutting down: flushing the store.");
    // The proxy (and so its pooled connections) went with the app.
    let _ = tokio::task::spawn_blocking(move || sweeper.stop()).await;
    let final_snapshot = registry.snapshot_now().await;
    durability.stop_following();
    // The writer ends once the last store handle (the registry's) is gone.
    registry.release_at_shutdown();
    tokio::task::spawn_blocking(move || durability.join()).await?;
    final_snapshot.map_err(|error| anyhow::anyhow!("final snapshot: {error}"))?;
    Ok(())
}

/// What keeps the registry durable, to be stopped at shutdown.
enum Durability {
    Files(store::StoreWriter),
    Database {
        workers: store::postgres::PostgresWorkers,
        follower: registry::Follower,
    },
}

impl Durability {
    /// How often heartbeats heard here reach the store. With a shared
    /// database the other routers learn of them this way, so at most half
    /// a second, whatever `--flush-interval` says: an agent silent
    /// everywhere then goes Offline everywhere within `AGENT_TIMEOUT` plus
    /// one flush and one poll.
    fn flush_interval(&self, config: &Config) -> std::time::Duration {
        match self {
            Durability::Files(_) => config.flush_interval,
            Durability::Database { .. } => config.flush_interval.min(SHARED_STORE_INTERVAL),
        }
    }

    fn stop_following(&self) {
        if let Durability::Database { workers, .. } = self {
            workers.stop_feed();
        }
    }

    fn join(self) {
        match self {
            Durability::Files(writer) => writer.join(),
            Durability::Database { workers, follower } => {
                // The follower ends when the feed does, releasing its registry.
                follower.join();
                workers.join();
            }
        }
    }
}

/// The flush and poll interval of a shared database.
const SHARED_STORE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

fn open_files(
    config: &Config,
    hold_out: &registry::HoldOut<'_>,
) -> anyhow::Result<(Arc<Registry>, Durability)> {
    let data_dir = config.data_dir();
    let (store, writer, agents, report) = store::open(store::StoreOptions {
        data_dir: data_dir.clone(),
        snapshot_interval: config.snapshot_interval,
        snapshot_when_quiet: config.snapshot_when_quiet,
    })?;
    tracing::info!(
        data_dir = %data_dir.display(),
        agents = agents.len(),
        loaded_from = %report
            .loaded_from
            .as_ref()
            .map_or_else(|| "nothing (a new registry)".to_owned(), |path| path.display().to_string()),
        "Registry loaded."
    );
    let registry = Arc::new(Registry::new(
        agents,
        config.agent_timeout,
        config.max_agents,
        Box::new(store),
        hold_out,
    ));
    Ok((registry, Durability::Files(writer)))
}

async fn open_database(
    config: &Config,
    url: store::postgres::DatabaseUrl,
    roster: Arc<store::RouterRoster>,
    hold_out: &registry::HoldOut<'_>,
) -> anyhow::Result<(Arc<Registry>, Durability)> {
    let router = store::postgres::RouterIdentity {
        id: roster.this_router(),
        address: roster.this_address().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let (store, workers, loaded, news) = store::postgres::open(
        store::postgres::PostgresOptions {
            url: url.clone(),
            router,
            poll_interval: SHARED_STORE_INTERVAL,
            connect_timeout: config.connect_timeout,
        },
        roster,
    )
    .await?;
    tracing::info!(
        database = %url,
        agents = loaded.agents.len(),
        migrations_applied = loaded.migrations_applied,
        "Registry loaded from the shared database."
    );
    let registry = Arc::new(Registry::new(
        loaded.agents.into_iter().map(Arc::new).collect(),
        config.agent_timeout,
        config.max_agents,
        Box::new(store),
        hold_out,
    ));
    let follower = registry::Follower::start(Arc::clone(&registry), news)?;
    Ok((registry, Durability::Database { workers, follower }))
}

/// How the other routers and operators see this one: its listening
/// address, or the machine's name when it listens on every address.
fn advertised_address(scheme: &str, address: std::net::SocketAddr) -> String {
    if address.ip().is_unspecified() {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{scheme}://{host}:{}", address.port())
    } else {
        format!("{scheme}://{address}")
    }
}
