//! The background thread that turns silent agents Offline, hands the store
//! their `last_seen` every flush interval, and keeps the metrics tidy.
//!
//! It is an OS thread rather than a task: a sweep over a large fleet takes
//! milliseconds, which on an event loop would stall every request queued
//! behind it.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Registry;

/// The running sweeper; `stop` ends it after one last flush of liveness, so
/// that the final snapshot has the latest times.
pub struct Sweeper {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Sweeper {
    /// Ticks at least every 500 ms (more often with a short timeout): a
    /// sweep, skipped while nobody can be late yet (`Registry::sweep`), and
    /// every `flush_interval` a flush of liveness to the store, skipped
    /// when no record was touched.
    pub fn start(registry: Arc<Registry>, flush_interval: Duration) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let sweep_every = (registry.agent_timeout() / 4)
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        let thread = std::thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || {
                let mut next_flush = Instant::now() + flush_interval;
                // Waiting on the channel doubles as a sleep that `stop` cuts short.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(sweep_every) {
                    let now = Instant::now();
                    registry.sweep(now);
                    if now >= next_flush {
                        registry.flush_liveness();
                        next_flush = now + flush_interval;
                    }
                    // Latency histograms gather samples lock-free; fold
                    // them in here so they stay small between scrapes.
                    crate::telemetry::upkeep();
                }
                registry.flush_liveness();
            })?;
        Ok(Sweeper { stop, thread })
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
