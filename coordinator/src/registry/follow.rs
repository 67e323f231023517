//! Taking in what other routers committed to a shared store, and the
//! fleet-wide liveness rule.
//!
//! A change read back from the store is taken in only if its number is
//! higher than the record's (`stored_number`): the record then reflects the
//! latest committed change whichever router made it, and an echo of this
//! router's own change, or a stale read, changes nothing. What is not
//! stored stays as this router knows it: liveness, the heartbeat's report,
//! draining, reachability, requests in flight.
//!
//! Liveness: an agent is alive while any router hears it. A router that
//! reads "heard" for an agent counts it seen now, on its own monotonic
//! clock, so routers never compare wall clocks. While the database is
//! unreachable that news stops, which says nothing of the agents: sweeping
//! is frozen, and when news resumes every agent gets a fresh timeout.

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use chrono::{DateTime, Utc};
use common::AgentStatus;
use uuid::Uuid;

use super::{lock, AgentRecord, Registry};
use crate::record::NodeFacts;
use crate::store::postgres::{FleetNews, RemoteChange};
use crate::store::ChangeNumber;

/// The thread that applies the feed's news to the registry, so that a large
/// batch (a router catching up on 100,000 agents) never runs on an event
/// loop.
pub struct Follower {
    thread: JoinHandle<()>,
}

impl Follower {
    pub fn start(registry: Arc<Registry>, news: Receiver<FleetNews>) -> std::io::Result<Self> {
        let thread = std::thread::Builder::new()
            .name("store-follower".into())
            .spawn(move || {
                // Ends when the feed (the sender) is gone.
                while let Ok(item) = news.recv() {
                    match item {
                        FleetNews::Changed(changes) => registry.take_in(changes),
                        FleetNews::Heard(agents) => {
                            registry.heard_elsewhere(&agents, Instant::now())
                        }
                        FleetNews::Lost => registry.freeze_liveness(),
                        FleetNews::Restored => registry.thaw_liveness(Instant::now()),
                    }
                }
            })?;
        Ok(Follower { thread })
    }

    pub fn join(self) {
        let _ = self.thread.join();
    }
}

impl Registry {
    /// Changes committed to the shared store, oldest first.
    pub fn take_in(&self, changes: Vec<RemoteChange>) {
        let mut changed = false;
        for change in changes {
            changed |= match change {
                RemoteChange::Upsert(facts, number) => self.take_in_record(&facts, number),
                RemoteChange::Delete(id, number) => self.take_in_deletion(id, number),
            };
        }
        if changed {
            self.mark_routing_stale();
        }
    }

    /// A change of this router's committed as `number`: unless the feed
    /// already brought something newer, the record holds what was committed
    /// (another router's change may have been taken in while it waited).
    pub(super) fn settle(&self, committed: &NodeFacts, number: ChangeNumber) {
        if number == 0 {
            return;
        }
        let Ok(slot) = self.slot(committed.id) else {
            return;
        };
        let mut record = lock(&slot);
        if number > record.stored_number {
            record.stored_number = number;
            let moved = take_stored_fields(&mut record, committed);
            drop(record);
            if moved {
                lock(&self.probes).remove(&committed.id);
            }
            self.mark_routing_stale();
        }
    }

    /// A change of this router's lost to another router's: take in the
    /// record that won (`current`), or drop `our_id` if nothing holds it.
    pub(super) fn take_in_conflict(
        &self,
        current: Option<(Arc<NodeFacts>, ChangeNumber)>,
        identity: Option<(String, u16)>,
        our_id: Option<Uuid>,
    ) {
        match current {
            Some((facts, number)) => {
                if our_id.is_some_and(|id| id != facts.id) {
                    self.take_in_deletion(our_id.unwrap_or_default(), ChangeNumber::MAX);
                }
                self.take_in_record(&facts, number);
            }
            None => {
                let id = our_id.or_else(|| {
                    identity
                        .and_then(|identity| self.read_maps().by_identity.get(&identity).copied())
                });
                if let Some(id) = id {
                    self.take_in_deletion(id, ChangeNumber::MAX);
                }
            }
        }
        self.mark_routing_stale();
    }

    /// Returns whether routing may have changed. A known agent needs only
    /// the map's read lock (most news is of agents already here, this
    /// router's own changes among them); a new one takes the write lock.
    fn take_in_record(&self, facts: &Arc<NodeFacts>, number: ChangeNumber) -> bool {
        let known = self.read_maps().by_id.get(&facts.id).cloned();
        if let Some(slot) = known {
            return self.take_in_known(&slot, facts, number);
        }
        let identity = facts.identity();
        let mut maps = self.write_maps();
        if let Some(slot) = maps.by_id.get(&facts.id).cloned() {
            drop(maps);
            return self.take_in_known(&slot, facts, number);
        }
        // New here. Whatever id this machine and port had here lost to it
        // (deleted elsewhere, or a registration race this router lost).
        if let Some(previous) = maps.by_identity.get(&identity).copied() {
            maps.take(previous);
            lock(&self.probes).remove(&previous);
        }
        // The feed's record is this router's now: shared, not copied.
        let mut record = AgentRecord::new(Arc::clone(facts), Instant::now(), 1);
        record.stored_number = number;
        maps.by_identity.insert(identity, facts.id);
        maps.add(Arc::new(std::sync::Mutex::new(record)));
        true
    }

    fn take_in_known(
        &self,
        slot: &std::sync::Mutex<AgentRecord>,
        facts: &NodeFacts,
        number: ChangeNumber,
    ) -> bool {
        let mut record = lock(slot);
        if number <= record.stored_number {
            return false;
        }
        record.stored_number = number;
        record.revision += 1;
        let registered_at = record.agent.registered_at;
        let moved = take_stored_fields(&mut record, facts);
        drop(record);
        if facts.registered_at != registered_at {
            self.write_maps()
                .reorder(facts.id, registered_at, facts.registered_at);
        }
        if moved {
            lock(&self.probes).remove(&facts.id);
        }
        true
    }

    fn take_in_deletion(&self, id: Uuid, number: ChangeNumber) -> bool {
        let mut maps = self.write_maps();
        let Some(slot) = maps.by_id.get(&id).cloned() else {
            return false;
        };
        let identity = {
            let record = lock(&slot);
            if number < record.stored_number {
                return false;
            }
            record.agent.identity()
        };
        maps.take(id);
        if maps.by_identity.get(&identity) == Some(&id) {
            maps.by_identity.remove(&identity);
        }
        drop(maps);
        lock(&self.probes).remove(&id);
        tracing::info!(agent_id = %id, "Agent removed at another router.");
        true
    }

    /// Agents some router heard since the last news: seen now. Not marked
    /// for this router's own flush, so that news never echoes between
    /// routers and keeps a dead agent alive.
    pub fn heard_elsewhere(&self, agents: &[(Uuid, DateTime<Utc>)], now: Instant) {
        let maps = self.read_maps();
        let mut routing_changed = false;
        for (id, last_seen) in agents {
            let Some(slot) = maps.by_id.get(id) else {
                continue;
            };
            let mut record = lock(slot);
            record.last_seen_at = now;
            if *last_seen > record.agent.last_seen {
                Arc::make_mut(&mut record.agent).last_seen = *last_seen;
            }
            if record.agent.status == AgentStatus::Offline {
                Arc::make_mut(&mut record.agent).status = AgentStatus::Online;
                routing_changed = true;
                tracing::info!(agent_id = %id, "Agent back Online (heard at another router).");
            }
        }
        drop(maps);
        if routing_changed {
            self.mark_routing_stale();
        }
    }

    /// The database stopped answering: stop sweeping.
    pub fn freeze_liveness(&self) {
        self.liveness_frozen.store(true, Ordering::Release);
    }

    /// News resumes: every Online agent gets a full timeout from now, since
    /// heartbeats it sent elsewhere meanwhile were never read here.
    pub fn thaw_liveness(&self, now: Instant) {
        for slot in self.read_maps().by_id.values() {
            let mut record = lock(slot);
            if record.agent.status == AgentStatus::Online {
                record.last_seen_at = now;
            }
        }
        self.liveness_frozen.store(false, Ordering::Release);
    }
}

/// Lays the stored fields of `facts` over the record, keeping what this
/// router alone knows. Returns whether the node's address moved (its
/// reachability is then unknown again).
fn take_stored_fields(record: &mut AgentRecord, facts: &NodeFacts) -> bool {
    let moved = record.agent.ip_address != facts.ip_address || record.agent.port != facts.port;
    let agent = Arc::make_mut(&mut record.agent);
    agent.ip_address = facts.ip_address;
    agent.port = facts.port;
    agent.runtime_version = Arc::clone(&facts.runtime_version);
    agent.registered_at = facts.registered_at;
    agent.os = Arc::clone(&facts.os);
    agent.arch = Arc::clone(&facts.arch);
    agent.cpu_cores = facts.cpu_cores;
    agent.total_memory = facts.total_memory;
    agent.models = Arc::clone(&facts.models);
    agent.backend = facts.backend;
    agent.tls = facts.tls;
    agent.max_concurrency = facts.max_concurrency;
    agent.secret_digest = facts.secret_digest;
    if moved {
        record.unreachable = false;
    }
    moved
}
