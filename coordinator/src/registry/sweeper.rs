//! The background task that turns silent agents Offline and hands the store
//! their `last_seen` now and then.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Registry;

/// Sweeps at least every second (more often with a short timeout) and
/// flushes liveness to the store every `flush_interval`, until `shutdown`;
/// then flushes once more so that the final snapshot has the latest times.
pub async fn run_sweeper(
    registry: Arc<Registry>,
    flush_interval: Duration,
    shutdown: CancellationToken,
) {
    let sweep_every =
        (registry.agent_timeout() / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let mut sweep_tick = tokio::time::interval(sweep_every);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush_tick = tokio::time::interval(flush_interval);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sweep_tick.tick() => {
                registry.sweep(Instant::now());
            }
            _ = flush_tick.tick() => registry.flush_liveness(),
        }
    }
    registry.flush_liveness();
}
