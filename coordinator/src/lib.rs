//! llm-router: one endpoint for a fleet of LLM servers. A durable registry
//! of nodes that knows who is alive, and a proxy that sends each Ollama or
//! OpenAI request to a node that can serve it. `main.rs` and the tests both
//! start it through [`run`].

pub mod api;
pub mod balancer;
pub mod config;
pub mod proxy;
pub mod registry;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api::{app, AppState};
pub use config::Config;
pub use registry::Registry;

/// Serves on `listener` until `shutdown` completes; then stops accepting,
/// lets open requests finish, flushes the store and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let data_dir = config.data_dir();
    let (store, writer, agents, report) = store::open(store::StoreOptions {
        data_dir: data_dir.clone(),
        snapshot_interval: config.flush_interval,
    })?;
    tracing::info!(
        data_dir = %data_dir.display(),
        agents = agents.len(),
        loaded_from = ?report.loaded_from,
        "Registry loaded."
    );
    let registry = Arc::new(Registry::new(agents, config.agent_timeout, store));

    let stop_tasks = CancellationToken::new();
    let sweeper = tokio::spawn(registry::run_sweeper(
        Arc::clone(&registry),
        config.flush_interval,
        stop_tasks.clone(),
    ));

    let address = listener.local_addr()?;
    tracing::info!(%address, "llm-router listening on http://{address}");
    let state = AppState {
        registry: Arc::clone(&registry),
        proxy: Arc::new(proxy::Proxy::new(
            Arc::clone(&registry),
            config.proxy_options(),
        )),
        max_request_body: config.max_request_body,
    };
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;

    tracing::info!("Shutting down: flushing the store.");
    // The proxy (and so its pooled connections) went with the app.
    stop_tasks.cancel();
    let _ = sweeper.await;
    let final_snapshot = registry.store().snapshot_now().await;
    // The writer thread ends once the last `Store` handle (the registry's) is gone.
    drop(registry);
    writer.join();
    served?;
    final_snapshot.map_err(|error| anyhow::anyhow!("final snapshot: {error}"))?;
    Ok(())
}
