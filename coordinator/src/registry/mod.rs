//! The in-memory registry: every agent by id, its liveness, and a cached list
//! of routable candidates for routing.
//!
//! Locking: one `std::sync::RwLock` over the two maps (by id, by identity)
//! and one `Mutex` per agent for what changes often (liveness, reports). A
//! heartbeat takes the map's read lock and its own agent's mutex, so
//! heartbeats from different agents never wait on each other; only
//! registrations and deletions take the write lock. No lock is held across
//! an `.await`: every method that waits on the store drops its guards first.
//! `std` locks, not `tokio` ones, because every critical section is short
//! and synchronous.

mod follow;
mod listing;
mod sweeper;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::Utc;
use common::{Agent, AgentStatus, AgentView, BackendKind, DrainResponse, NodeState, SystemInfo};
use uuid::Uuid;

use crate::auth::{Secret, TokenDigest};
use crate::balancer::{Candidate, RoutingTable};
use crate::store::{Change, ChangeNumber, RegistryStore, Seen, StoreError};
pub use crate::telemetry::{FleetFacts, NodeLoad};

pub use crate::record::{ModelList, NodeFacts, Registration};
pub use follow::Follower;
pub use listing::{ListCursor, ListPage};
pub use sweeper::Sweeper;

use crate::record::{intern, intern_models, ReportUpdate};

/// What a registration proved about the identity it names.
#[derive(Debug, Clone, Copy)]
pub enum IdentityProof {
    /// No agent credential is configured: agents have no secrets, and any
    /// caller may register any identity.
    Open,
    /// Agents have secrets; the caller is let in to register and presented
    /// this agent secret (or none). A new identity gets a secret; a known
    /// one needs its own.
    AgentSecret(Option<TokenDigest>),
    /// The admin token: any identity, which gets a new secret.
    Admin,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no agent with id {0}")]
    NotFound(Uuid),
    /// A registration of a known identity without that agent's secret.
    #[error("machine {machine_name:?} on port {port} is registered to agent {id}, and this registration does not carry that agent's secret")]
    IdentityTaken {
        id: Uuid,
        machine_name: String,
        port: u16,
    },
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// The credential presented is not this agent's secret.
    #[error("not this agent's secret")]
    WrongSecret,
    /// The registry holds `max_agents` already.
    #[error("the registry is full: it holds its limit of {0} agents")]
    Full(usize),
}

/// A validated `PUT`: absent fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct AgentUpdate {
    pub ip_address: Option<IpAddr>,
    pub runtime_version: Option<String>,
    pub system_info: Option<SystemInfo>,
    pub models: Option<Vec<String>>,
    pub backend: Option<BackendKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    Created,
    Refreshed,
}

pub struct Registry {
    maps: RwLock<Maps>,
    agent_timeout: Duration,
    max_agents: usize,
    store: Box<dyn RegistryStore>,
    /// Routable agents indexed for routing, rebuilt lazily after
    /// a change that matters to routing (counted in `routing_changes`).
    routing: ArcSwap<RoutingTable>,
    routing_changes: AtomicU64,
    rebuild: Mutex<()>,
    /// Accepted heartbeats and registrations, for `/metrics`.
    heartbeats: AtomicU64,
    registrations: AtomicU64,
    /// When to probe each unreachable node next. Only unreachable nodes are
    /// here, so the prober never scans the fleet. Taken after an agent's
    /// mutex, never before.
    probes: Mutex<HashMap<Uuid, ProbeSchedule>>,
    /// News from the other routers sharing the store has stopped (their
    /// database is unreachable): no agent is swept Offline until it is back.
    liveness_frozen: std::sync::atomic::AtomicBool,
    /// No Online agent can have been silent past the timeout before this:
    /// the oldest sign of life the last sweep found, plus the timeout. A
    /// sign of life is always stamped with the time it arrives, later than
    /// that, so sweeps before it would find nothing, and are skipped. A
    /// sweep of a large fleet locks every agent's record in turn (30 ms of
    /// CPU at 400,000 agents, twice a second), and a storm of new agents,
    /// or a fleet that heartbeats well within its timeout, need one only
    /// about once a timeout. `None`: sweep.
    sweep_due: Mutex<Option<Instant>>,
    /// A heartbeat or a sweep marked some record `touched` since the last
    /// flush of liveness; without one the flush has nothing to hand over
    /// and skips its pass over the fleet.
    touched_since_flush: std::sync::atomic::AtomicBool,
    /// The longest wait between two probes of an unreachable node, in
    /// milliseconds: [`PROBE_BACKOFF_CAP`], or the health-check interval
    /// when shorter, so that a server that comes back is back within it.
    probe_backoff_cap_ms: AtomicU64,
}

/// An unreachable node the prober is to try again.
#[derive(Debug, Clone)]
struct ProbeSchedule {
    target: ProbeTarget,
    /// Failed probes since the node became unreachable.
    failures: u32,
    next_at: Instant,
}

/// What the prober needs to reach one node's LLM server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub id: Uuid,
    pub address: std::net::SocketAddr,
    pub backend: BackendKind,
    pub tls: bool,
}

/// The first probe of a node that just failed comes this soon; each
/// failure doubles the wait, up to [`PROBE_BACKOFF_CAP`].
pub const PROBE_BACKOFF_FIRST: Duration = Duration::from_millis(250);
pub const PROBE_BACKOFF_CAP: Duration = Duration::from_secs(10);
/// A probe taken by the prober is not handed out again until it reports.
const PROBE_IN_PROGRESS: Duration = Duration::from_secs(3600);

fn probe_backoff(failures: u32, cap: Duration) -> Duration {
    PROBE_BACKOFF_FIRST
        .saturating_mul(1 << failures.min(16))
        .min(cap)
}

#[derive(Default)]
struct Maps {
    /// Changed only through [`Maps::add`] and [`Maps::take`], which keep
    /// `listing_order` in step. Hashed with foldhash: every heartbeat looks
    /// here, and the keys are random ids the router made, not names a
    /// client chose (`by_identity` keeps SipHash for those).
    /// Both maps are sharded, so that no insert under the write lock grows
    /// a whole fleet's table at once (see `sharded`).
    by_id: SlotsById,
    /// `(machine_name, port)` is a node's identity across restarts.
    by_identity: IdsByIdentity,
    /// Every id in listing order (oldest registration first), so that a
    /// page of the listing is a range, not a sort of the fleet.
    listing_order: std::collections::BTreeSet<ListCursor>,
}

type SlotsById =
    crate::sharded::ShardedMap<Uuid, Arc<Mutex<AgentRecord>>, foldhash::fast::RandomState>;
type IdsByIdentity = crate::sharded::ShardedMap<(String, u16), Uuid, std::hash::RandomState>;

/// Everything the router knows of one agent.
#[derive(Debug, Clone)]
struct AgentRecord {
    /// Loaded, it is shared with the store's records until either side
    /// changes it (`Arc::make_mut`), so that a start-up does not copy the
    /// whole fleet; the first heartbeat after it makes the copy. A change
    /// made here hands the store a copy of its own, as before, so that
    /// heartbeats after a registration copy nothing.
    agent: Arc<NodeFacts>,
    /// Monotonic time of the last sign of life: what liveness is decided on.
    last_seen_at: Instant,
    /// Bumped by every durable change, so that a failed commit rolls back
    /// only if nothing newer has landed on top of it.
    revision: u64,
    /// The store's number of the latest committed change this record
    /// reflects (0 with the data files): a change read back from a shared
    /// store is taken in only if it is newer.
    stored_number: ChangeNumber,
    /// `last_seen` moved since the store was last told.
    touched: bool,
    /// Requests the router has in flight to this node (not stored).
    in_flight: Arc<AtomicU64>,
    /// Its requests and failovers, for `/metrics` (not stored; gone with it).
    traffic: Arc<crate::telemetry::NodeTraffic>,
    /// The node said it is leaving (not stored; cleared when it registers).
    draining: bool,
    /// A request from the router to its LLM server failed; out of rotation
    /// until the router's own probe reaches the server again, whatever the
    /// agent's heartbeats say (not stored).
    unreachable: bool,
}

impl AgentRecord {
    fn new(agent: Arc<NodeFacts>, last_seen_at: Instant, revision: u64) -> Self {
        AgentRecord {
            agent,
            last_seen_at,
            revision,
            stored_number: 0,
            touched: false,
            in_flight: Arc::new(AtomicU64::new(0)),
            traffic: Arc::default(),
            draining: false,
            unreachable: false,
        }
    }

    /// The node's state, decided here only (see `NodeState`); the listing,
    /// the metrics and the routing table all read it from here.
    fn state(&self) -> NodeState {
        if self.agent.status == AgentStatus::Offline {
            NodeState::Offline
        } else if self.draining {
            NodeState::Draining
        } else if self.agent.report.llm_server_up == Some(false) {
            NodeState::ServerDown
        } else if self.unreachable || self.agent.ip_address.is_unspecified() {
            // An unspecified address (only from a hand-edited file) cannot
            // be reached either.
            NodeState::Unreachable
        } else {
            NodeState::Serving
        }
    }

    fn is_routable(&self) -> bool {
        self.state() == NodeState::Serving
    }

    fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.agent.ip_address, self.agent.port)
    }

    fn view(&self) -> AgentView {
        let state = self.state();
        AgentView {
            agent: self.agent.to_wire(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            draining: self.draining,
            routable: state == NodeState::Serving,
            state,
        }
    }
}

/// Why a node at this address must stay out of rotation (the address
/// policy's refusal), or `None` when it may be used.
pub type HoldOut<'a> = dyn Fn(std::net::SocketAddr) -> Option<String> + Sync + 'a;

impl Registry {
    /// Builds the registry from the agents the store loaded. Each gets one
    /// full `agent_timeout` of grace from now, so a router restart does not
    /// mark the fleet Offline. A node loaded at an address `hold_out`
    /// refuses (the policy changed, or the file was edited) stays out of
    /// rotation, with no probe to bring it back, until it registers or is
    /// updated at an address the policy allows; it is checked as its record
    /// is built, where a pass over the fleet afterwards took 10 to 27 ms of
    /// a start (issue 16, twelfth session).
    pub fn new(
        loaded: Vec<Arc<NodeFacts>>,
        agent_timeout: Duration,
        max_agents: usize,
        store: Box<dyn RegistryStore>,
        hold_out: &HoldOut,
    ) -> Self {
        let maps = Maps::loaded(loaded, Instant::now(), hold_out);
        Registry {
            maps: RwLock::new(maps),
            agent_timeout,
            max_agents,
            store,
            routing: ArcSwap::from_pointee(RoutingTable::default()),
            // Above the empty table's 0, so the first reader builds one.
            routing_changes: AtomicU64::new(1),
            rebuild: Mutex::new(()),
            heartbeats: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
            probes: Mutex::new(HashMap::new()),
            liveness_frozen: std::sync::atomic::AtomicBool::new(false),
            sweep_due: Mutex::new(None),
            touched_since_flush: std::sync::atomic::AtomicBool::new(false),
            probe_backoff_cap_ms: AtomicU64::new(PROBE_BACKOFF_CAP.as_millis() as u64),
        }
    }

    /// Shutdown's last step: lets go of the store, so that its writer
    /// finishes, and when this is the registry's last holder leaves the
    /// records' memory to the OS, which takes it back with the process
    /// (freeing 100,000 records one by one took some 18 ms of a restart).
    pub fn release_at_shutdown(self: Arc<Self>) {
        if let Ok(registry) = Arc::try_unwrap(self) {
            let Registry {
                store,
                maps,
                routing,
                ..
            } = registry;
            drop(store);
            std::mem::forget((maps, routing));
        }
    }

    pub fn agent_timeout(&self) -> Duration {
        self.agent_timeout
    }

    /// Probes of an unreachable node back off to at most `cap` (never
    /// beyond [`PROBE_BACKOFF_CAP`]).
    pub fn limit_probe_backoff(&self, cap: Duration) {
        let cap = cap.clamp(PROBE_BACKOFF_FIRST, PROBE_BACKOFF_CAP);
        self.probe_backoff_cap_ms
            .store(cap.as_millis() as u64, Ordering::Relaxed);
    }

    fn probe_backoff_cap(&self) -> Duration {
        Duration::from_millis(self.probe_backoff_cap_ms.load(Ordering::Relaxed))
    }

    /// Registers a node, or refreshes it when `(machine_name, port)` is known:
    /// a restarted node keeps its id. Whether it gets a secret, and who may
    /// register a known identity again, `proof` decides (see
    /// [`IdentityProof`]); a new secret is returned here (only its digest is
    /// kept) and retires the old one. Returns once the change is durable.
    pub async fn register(
        &self,
        registration: Registration,
        proof: IdentityProof,
    ) -> Result<(Uuid, RegisterOutcome, Option<Secret>), RegistryError> {
        // With a shared store another router may have registered this
        // machine (or deleted its id) a moment ago: take in what won, and
        // decide again on the registry as it now is.
        let mut attempts = 0;
        loop {
            match self.register_once(&registration, proof).await {
                Err(RegistryError::Store(error)) if attempts < 3 => {
                    let StoreError::Conflict { current } = &*error else {
                        return Err(RegistryError::Store(error));
                    };
                    attempts += 1;
                    let identity = (registration.machine_name.clone(), registration.port);
                    self.take_in_conflict(current.clone(), Some(identity), None);
                }
                answer => return answer,
            }
        }
    }

    async fn register_once(
        &self,
        registration: &Registration,
        proof: IdentityProof,
    ) -> Result<(Uuid, RegisterOutcome, Option<Secret>), RegistryError> {
        let now_wall = Utc::now();
        let now = Instant::now();
        let fresh_secret = || {
            let (secret, digest) = crate::auth::new_agent_secret();
            (Some(secret), Some(digest))
        };
        let identity = (registration.machine_name.clone(), registration.port);
        let address = std::net::SocketAddr::new(registration.ip_address, registration.port);
        let (id, outcome, committed, rollback, secret) = {
            let mut maps = self.write_maps();
            if let Some(&id) = maps.by_identity.get(&identity) {
                let Some(slot) = maps.by_id.get(&id).cloned() else {
                    return Err(RegistryError::NotFound(id));
                };
                // The map's write guard stays held: a concurrent delete of
                // this agent must land in the journal before or after this
                // refresh, never between lookup and commit.
                let mut record = lock(&slot);
                let (secret, secret_digest) = match proof {
                    IdentityProof::Open => (None, None),
                    IdentityProof::Admin => fresh_secret(),
                    IdentityProof::AgentSecret(presented) => match record.agent.secret_digest {
                        // Its own agent, back: it keeps the secret it holds.
                        Some(held)
                            if presented.is_some_and(|presented| held.matches(&presented)) =>
                        {
                            (None, Some(held))
                        }
                        Some(_) => {
                            return Err(RegistryError::IdentityTaken {
                                id,
                                machine_name: registration.machine_name.clone(),
                                port: registration.port,
                            })
                        }
                        // Registered while agents had no secrets: the first
                        // registration under credentials claims it.
                        None => fresh_secret(),
                    },
                };
                let previous = record.clone();
                let moved = record.address() != address;
                let agent = Arc::make_mut(&mut record.agent);
                agent.refresh(registration, now_wall);
                agent.secret_digest = secret_digest;
                record.last_seen_at = now;
                record.revision += 1;
                // A node that registers has (re)started: it is not leaving.
                // Whether the router can reach it is for the router to find
                // out: at a new address the old failure says nothing; at the
                // same one, the prober tries it at once.
                record.draining = false;
                if moved {
                    record.unreachable = false;
                    lock(&self.probes).remove(&id);
                } else if record.unreachable {
                    self.schedule_probe(&record, now);
                }
                let facts = Arc::new(NodeFacts::clone(&record.agent));
                let committed = self.store.submit(Change::Upsert(Arc::clone(&facts)));
                (
                    id,
                    RegisterOutcome::Refreshed,
                    (committed, facts),
                    Rollback::Restore(slot.clone(), Box::new(previous)),
                    secret,
                )
            } else {
                if maps.by_id.len() >= self.max_agents {
                    return Err(RegistryError::Full(self.max_agents));
                }
                let id = Uuid::new_v4();
                let (secret, secret_digest) = match proof {
                    IdentityProof::Open => (None, None),
                    IdentityProof::Admin | IdentityProof::AgentSecret(_) => fresh_secret(),
                };
                let mut agent = NodeFacts::registered(id, registration, now_wall);
                agent.secret_digest = secret_digest;
                let facts = Arc::new(agent.clone());
                let committed = self.store.submit(Change::Upsert(Arc::clone(&facts)));
                let record = AgentRecord::new(Arc::new(agent), now, 1);
                maps.add(Arc::new(Mutex::new(record)));
                maps.by_identity.insert(identity, id);
                (
                    id,
                    RegisterOutcome::Created,
                    (committed, facts),
                    Rollback::Remove(id, 1),
                    secret,
                )
            }
        };
        self.mark_routing_stale();
        let (committed, facts) = committed;
        match committed.await {
            Ok(number) => self.settle(&facts, number),
            Err(error) => {
                self.roll_back(rollback);
                return Err(RegistryError::Store(error));
            }
        }
        self.registrations.fetch_add(1, Ordering::Relaxed);
        let machine_name = &registration.machine_name;
        match outcome {
            RegisterOutcome::Created => {
                tracing::info!(agent_id = %id, machine_name = machine_name.as_str(), %address, "Agent registered.")
            }
            RegisterOutcome::Refreshed => {
                tracing::info!(agent_id = %id, machine_name = machine_name.as_str(), %address, "Agent registered again; same id kept.")
            }
        }
        Ok((id, outcome, secret))
    }

    /// Checks that `presented` is the digest of this agent's secret, in
    /// constant time. An agent with no secret on record (registered before
    /// secrets existed) has to register again to get one.
    pub fn verify_agent_secret(
        &self,
        id: Uuid,
        presented: &TokenDigest,
    ) -> Result<(), RegistryError> {
        let slot = self.slot(id)?;
        let record = lock(&slot);
        match &record.agent.secret_digest {
            Some(digest) if digest.matches(presented) => Ok(()),
            _ => Err(RegistryError::WrongSecret),
        }
    }

    /// Records a sign of life and what the node reports. No disk I/O: the
    /// store learns `last_seen` from the sweeper's periodic flush.
    pub fn heartbeat(
        &self,
        id: Uuid,
        report: Option<ReportUpdate<'_>>,
    ) -> Result<(), RegistryError> {
        let slot = self.slot(id)?;
        let mut record = lock(&slot);
        record.last_seen_at = Instant::now();
        record.touched = true;
        self.note_touched();
        let agent = Arc::make_mut(&mut record.agent);
        agent.last_seen = Utc::now();
        let mut routing_changed = false;
        if agent.status == AgentStatus::Offline {
            agent.status = AgentStatus::Online;
            routing_changed = true;
            tracing::info!(agent_id = %id, "Agent back Online.");
        }
        // A heartbeat never puts an unreachable node back in rotation: the
        // agent reaching its server says nothing of whether the router can
        // (a server listening on loopback only answers the agent alone).
        // Its server coming back up is a reason to probe now, though.
        let server_came_up = agent.report.llm_server_up == Some(false)
            && report.as_ref().and_then(|r| r.llm_server_up) == Some(true);
        if let Some(report) = report {
            routing_changed |= agent.report.merge(report);
        }
        if record.unreachable && server_came_up {
            self.schedule_probe(&record, Instant::now());
        }
        drop(record);
        if routing_changed {
            self.mark_routing_stale();
        }
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counts and per-node load for `/metrics`.
    pub fn fleet_facts(&self) -> FleetFacts {
        let slots: Vec<_> = self.read_maps().by_id.values().cloned().collect();
        let mut facts = FleetFacts {
            heartbeats: self.heartbeats.load(Ordering::Relaxed),
            registrations: self.registrations.load(Ordering::Relaxed),
            ..FleetFacts::default()
        };
        for slot in slots {
            let record = lock(&slot);
            let state = record.state();
            if let Some(index) = NodeState::ALL.iter().position(|s| *s == state) {
                facts.by_state[index] += 1;
            }
            facts.traffic.push((
                Arc::from(&*record.agent.machine_name),
                Arc::clone(&record.traffic),
            ));
            match record.agent.status {
                AgentStatus::Online => {
                    facts.online += 1;
                    facts.nodes.push(NodeLoad {
                        id: record.agent.id,
                        name: String::from(&*record.agent.machine_name),
                        in_flight: record.in_flight.load(Ordering::Relaxed),
                    });
                }
                AgentStatus::Offline => facts.offline += 1,
            }
            if state == NodeState::Serving {
                facts.routable += 1;
            }
        }
        facts
    }

    /// Updates the mutable fields of an agent. Returns once durable.
    pub async fn update(&self, id: Uuid, update: AgentUpdate) -> Result<Agent, RegistryError> {
        let slot = self.slot(id)?;
        let (agent, committed, previous) = {
            let mut record = lock(&slot);
            let previous = record.clone();
            if update
                .ip_address
                .is_some_and(|ip| ip != record.agent.ip_address)
            {
                record.unreachable = false;
                lock(&self.probes).remove(&id);
            }
            let agent = Arc::make_mut(&mut record.agent);
            if let Some(ip) = update.ip_address {
                agent.ip_address = ip;
            }
            if let Some(version) = update.runtime_version {
                agent.runtime_version = intern(&version);
            }
            if let Some(system_info) = update.system_info {
                agent.os = intern(&system_info.os);
                agent.arch = intern(&system_info.arch);
                agent.cpu_cores = system_info.cpu_cores;
                agent.total_memory = system_info.total_memory;
            }
            if let Some(models) = update.models {
                agent.models = intern_models(&models);
            }
            if let Some(backend) = update.backend {
                agent.backend = backend;
            }
            record.revision += 1;
            let facts = Arc::new(NodeFacts::clone(&record.agent));
            let committed = self.store.submit(Change::Upsert(Arc::clone(&facts)));
            (record.agent.to_wire(), (committed, facts), previous)
        };
        self.mark_routing_stale();
        let (committed, facts) = committed;
        match committed.await {
            Ok(number) => self.settle(&facts, number),
            Err(error) => {
                self.roll_back(Rollback::Restore(slot, Box::new(previous)));
                if let StoreError::Conflict { current } = &*error {
                    // Deleted at another router, or its machine and port
                    // went to another id there: this id is gone.
                    self.take_in_conflict(current.clone(), None, Some(id));
                    return Err(RegistryError::NotFound(id));
                }
                return Err(RegistryError::Store(error));
            }
        }
        tracing::info!(agent_id = %id, "Agent updated.");
        Ok(agent)
    }

    /// Removes an agent. Returns once durable.
    pub async fn remove(&self, id: Uuid) -> Result<(), RegistryError> {
        let (slot, committed) = {
            let mut maps = self.write_maps();
            let Some(slot) = maps.take(id) else {
                return Err(RegistryError::NotFound(id));
            };
            let identity = {
                let record = lock(&slot);
                record.agent.identity()
            };
            if maps.by_identity.get(&identity) == Some(&id) {
                maps.by_identity.remove(&identity);
            }
            (slot, self.store.submit(Change::Delete(id)))
        };
        lock(&self.probes).remove(&id);
        self.mark_routing_stale();
        if let Err(error) = committed.await {
            self.roll_back(Rollback::Reinsert(slot));
            return Err(RegistryError::Store(error));
        }
        tracing::info!(agent_id = %id, "Agent removed.");
        Ok(())
    }

    pub fn get(&self, id: Uuid) -> Result<AgentView, RegistryError> {
        let slot = self.slot(id)?;
        let view = lock(&slot).view();
        Ok(view)
    }

    /// The node is leaving: it gets no new requests from now on. Its
    /// in-flight requests go on; the answer says how many there are.
    pub fn drain(&self, id: Uuid) -> Result<DrainResponse, RegistryError> {
        let slot = self.slot(id)?;
        let mut record = lock(&slot);
        if !record.draining {
            record.draining = true;
            tracing::info!(agent_id = %id, "Agent draining: no new requests.");
        }
        let answer = DrainResponse {
            id,
            draining: true,
            in_flight: record.in_flight.load(Ordering::Relaxed),
        };
        drop(record);
        self.mark_routing_stale();
        Ok(answer)
    }

    /// A request to this node's LLM server failed before its first byte:
    /// out of rotation at once, until the router's own probe reaches the
    /// server again (see [`Registry::probes_due`]).
    pub fn mark_unreachable(&self, id: Uuid) {
        let Ok(slot) = self.slot(id) else { return };
        let mut record = lock(&slot);
        if !record.unreachable {
            record.unreachable = true;
            tracing::warn!(
                agent_id = %id,
                machine_name = &*record.agent.machine_name,
                address = %record.address(),
                "The router could not get an answer from this node's LLM server; out of rotation until the router reaches it again."
            );
            let mut probes = lock(&self.probes);
            probes.insert(
                id,
                ProbeSchedule {
                    target: ProbeTarget {
                        id,
                        address: record.address(),
                        backend: record.agent.backend,
                        tls: record.agent.tls,
                    },
                    failures: 0,
                    next_at: Instant::now() + PROBE_BACKOFF_FIRST,
                },
            );
        }
        drop(record);
        self.mark_routing_stale();
    }

    /// The unreachable nodes whose next probe is due, at most `limit`; each
    /// is not handed out again until [`Registry::record_probe`] reports on
    /// it. Also when the next one falls due, for the prober's sleep.
    pub fn probes_due(&self, now: Instant, limit: usize) -> (Vec<ProbeTarget>, Option<Instant>) {
        let mut probes = lock(&self.probes);
        let mut due = Vec::new();
        let mut next = None::<Instant>;
        for schedule in probes.values_mut() {
            if schedule.next_at <= now && due.len() < limit {
                due.push(schedule.target.clone());
                schedule.next_at = now + PROBE_IN_PROGRESS;
            } else {
                next = Some(next.map_or(schedule.next_at, |n| n.min(schedule.next_at)));
            }
        }
        (due, next)
    }

    /// The outcome of a probe. A success puts the node back in rotation
    /// (if it is still at the probed address); a failure doubles the wait
    /// for the next probe, up to [`PROBE_BACKOFF_CAP`].
    pub fn record_probe(&self, target: &ProbeTarget, reached: bool) {
        let now = Instant::now();
        if !reached {
            if let Some(schedule) = lock(&self.probes).get_mut(&target.id) {
                if schedule.target == *target {
                    schedule.failures = schedule.failures.saturating_add(1);
                    schedule.next_at =
                        now + probe_backoff(schedule.failures, self.probe_backoff_cap());
                }
            }
            return;
        }
        let Ok(slot) = self.slot(target.id) else {
            lock(&self.probes).remove(&target.id);
            return;
        };
        let mut record = lock(&slot);
        let mut probes = lock(&self.probes);
        if probes.get(&target.id).is_some_and(|s| s.target == *target) {
            probes.remove(&target.id);
        }
        drop(probes);
        if record.address() != target.address {
            return;
        }
        // The router reached the server itself: it is up, whatever the
        // agent last said (its next heartbeat may be a minute away).
        let mut changed = false;
        if record.agent.report.llm_server_up == Some(false) {
            Arc::make_mut(&mut record.agent).report.llm_server_up = Some(true);
            changed = true;
        }
        if record.unreachable {
            record.unreachable = false;
            changed = true;
            tracing::info!(
                agent_id = %target.id,
                machine_name = &*record.agent.machine_name,
                address = %target.address,
                "The router reaches this node's LLM server again; back in rotation."
            );
        }
        drop(record);
        if changed {
            self.mark_routing_stale();
        }
    }

    /// Probe this unreachable node at `at` rather than at its backoff's end.
    /// The caller holds the agent's mutex (agent, then probes).
    fn schedule_probe(&self, record: &AgentRecord, at: Instant) {
        let id = record.agent.id;
        let target = ProbeTarget {
            id,
            address: record.address(),
            backend: record.agent.backend,
            tls: record.agent.tls,
        };
        let mut probes = lock(&self.probes);
        let schedule = probes.entry(id).or_insert_with(|| ProbeSchedule {
            target: target.clone(),
            failures: 0,
            next_at: at,
        });
        schedule.target = target;
        // One that is in progress reports soon; leave it be.
        if schedule.next_at <= at + PROBE_BACKOFF_CAP {
            schedule.next_at = schedule.next_at.min(at);
        }
    }

    /// Routable agents indexed for routing; rebuilt only after a change that
    /// matters to routing, so that picking a node costs no scan.
    ///
    /// A table records the count of routing changes it was built after; a
    /// reader whose table is older than the latest change waits for (or
    /// makes) a newer one, so no request is routed on a table that misses a
    /// change made before the request began.
    pub fn routing_table(&self) -> Arc<RoutingTable> {
        let table = self.routing.load_full();
        if table.generation() == self.routing_changes.load(Ordering::Acquire) {
            return table;
        }
        let _one_rebuilder = lock(&self.rebuild);
        let table = self.routing.load_full();
        let changes = self.routing_changes.load(Ordering::Acquire);
        if table.generation() == changes {
            return table;
        }
        // Read before the scan: a change during it makes this table old.
        let fresh = Arc::new(self.build_routing_table().with_generation(changes));
        self.routing.store(Arc::clone(&fresh));
        fresh
    }

    /// Marks Offline every Online agent silent for longer than the timeout,
    /// measured on the monotonic clock. Returns how many changed. Skips the
    /// pass when none can be late yet (see `sweep_due`).
    pub fn sweep(&self, now: Instant) -> usize {
        if self.liveness_frozen.load(Ordering::Acquire) {
            return 0;
        }
        let mut due = lock(&self.sweep_due);
        if due.is_some_and(|due| now < due) {
            return 0;
        }
        let slots: Vec<_> = self.read_maps().by_id.values().cloned().collect();
        let mut changed = 0;
        // A caller may sweep at a time of its choosing (tests do): an agent
        // registered after this sweep is stamped no earlier than the real
        // clock's now.
        let mut oldest_online = now.min(Instant::now());
        for slot in slots {
            let mut record = lock(&slot);
            if record.agent.status != AgentStatus::Online {
                continue;
            }
            if now.saturating_duration_since(record.last_seen_at) > self.agent_timeout {
                Arc::make_mut(&mut record.agent).status = AgentStatus::Offline;
                record.touched = true;
                changed += 1;
                tracing::warn!(agent_id = %record.agent.id, machine_name = &*record.agent.machine_name, "Agent Offline: no heartbeat within the timeout.");
            } else {
                oldest_online = oldest_online.min(record.last_seen_at);
            }
        }
        *due = Some(oldest_online + self.agent_timeout);
        drop(due);
        if changed > 0 {
            self.note_touched();
            self.mark_routing_stale();
        }
        changed
    }

    fn note_touched(&self) {
        // Read first: the flag is nearly always set already, and a write
        // would move its cache line between the cores on every heartbeat.
        if !self.touched_since_flush.load(Ordering::Relaxed) {
            self.touched_since_flush.store(true, Ordering::Release);
        }
    }

    /// Hands the store every `last_seen` and status that moved since the
    /// last call, for its next snapshot.
    pub fn flush_liveness(&self) {
        // Cleared before the pass: a record touched during it sets the flag
        // again, and the next flush takes it.
        if !self.touched_since_flush.swap(false, Ordering::AcqRel) {
            crate::record::prune_interned();
            return;
        }
        let slots: Vec<_> = self.read_maps().by_id.values().cloned().collect();
        let seen: Vec<Seen> = slots
            .iter()
            .filter_map(|slot| {
                let mut record = lock(slot);
                std::mem::take(&mut record.touched)
                    .then(|| Seen(record.agent.id, record.agent.last_seen, record.agent.status))
            })
            .collect();
        self.store.record_seen(seen);
        crate::record::prune_interned();
    }

    /// Leaves the store durable and quick to load, and waits for it: the
    /// last step of a clean shutdown, after liveness was flushed.
    pub async fn snapshot_now(&self) -> Result<(), Arc<StoreError>> {
        self.store.snapshot_now().await.map(|_| ())
    }

    fn slot(&self, id: Uuid) -> Result<Arc<Mutex<AgentRecord>>, RegistryError> {
        self.read_maps()
            .by_id
            .get(&id)
            .cloned()
            .ok_or(RegistryError::NotFound(id))
    }

    fn mark_routing_stale(&self) {
        self.routing_changes.fetch_add(1, Ordering::AcqRel);
    }

    fn build_routing_table(&self) -> RoutingTable {
        let slots: Vec<_> = self.read_maps().by_id.values().cloned().collect();
        let mut candidates = Vec::new();
        let mut unavailable_models = Vec::new();
        for slot in &slots {
            let record = lock(slot);
            let agent = &record.agent;
            let models = agent.serving_models();
            // The listing's `routable` is this same test: the table holds
            // exactly the nodes listed as routable.
            if !record.is_routable() {
                if agent.status == AgentStatus::Online {
                    unavailable_models.extend(models.iter().map(|m| m.to_string()));
                }
                continue;
            }
            let address = record.address();
            // A socket address always makes a valid header value.
            let host_header = axum::http::HeaderValue::from_str(&address.to_string())
                .unwrap_or_else(|_| axum::http::HeaderValue::from_static("localhost"));
            candidates.push(Candidate {
                id: agent.id,
                name: Arc::from(&*agent.machine_name),
                address,
                host_header,
                backend: agent.backend,
                tls: agent.tls,
                runtime_version: Arc::clone(&agent.runtime_version),
                models: Arc::clone(models),
                loaded_models: agent
                    .report
                    .loaded_models
                    .clone()
                    .unwrap_or_else(|| Arc::from([])),
                in_flight: Arc::clone(&record.in_flight),
                capacity: agent.capacity(),
                traffic: Arc::clone(&record.traffic),
            });
        }
        // A stable order keeps round-robin fair across rebuilds.
        candidates.sort_by_key(|candidate| candidate.id);
        RoutingTable::build(candidates, unavailable_models)
    }

    fn roll_back(&self, rollback: Rollback) {
        match rollback {
            Rollback::Remove(id, revision) => {
                let mut maps = self.write_maps();
                let still_ours = maps
                    .by_id
                    .get(&id)
                    .is_some_and(|slot| lock(slot).revision == revision);
                if still_ours {
                    if let Some(slot) = maps.take(id) {
                        let record = lock(&slot);
                        maps.by_identity.remove(&record.agent.identity());
                    }
                }
            }
            Rollback::Restore(slot, previous) => {
                let mut record = lock(&slot);
                if record.revision == previous.revision + 1 {
                    *record = *previous;
                }
            }
            Rollback::Reinsert(slot) => {
                let mut maps = self.write_maps();
                let (id, identity) = {
                    let record = lock(&slot);
                    (record.agent.id, record.agent.identity())
                };
                if !maps.by_identity.contains_key(&identity) {
                    maps.by_identity.insert(identity, id);
                    maps.add(slot);
                }
            }
        }
        self.mark_routing_stale();
    }

    fn read_maps(&self) -> RwLockReadGuard<'_, Maps> {
        // A poisoned lock means a panic elsewhere already; the maps are
        // still consistent because no method panics between its writes.
        self.maps
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn write_maps(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

enum Rollback {
    Remove(Uuid, u64),
    Restore(Arc<Mutex<AgentRecord>>, Box<AgentRecord>),
    Reinsert(Arc<Mutex<AgentRecord>>),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}
