//! Choosing a node: the routing table (routable nodes indexed by model and
//! API), and the policies that pick among the candidates for one request.
//! It knows nothing of the registry, which builds the tables and keeps the
//! current one.

pub mod prefix;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use common::BackendKind;
use uuid::Uuid;

use crate::record::ModelList;

/// Which API a client request came in on: `/api/*` can go only to Ollama
/// nodes; `/v1/*` to any node (Ollama serves `/v1` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    Ollama,
    OpenAi,
}

impl ApiKind {
    pub fn serves(self, backend: BackendKind) -> bool {
        match self {
            ApiKind::Ollama => backend == BackendKind::Ollama,
            ApiKind::OpenAi => true,
        }
    }
}

/// How to pick among the candidates that hold a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Each candidate in turn (one atomic cursor for all event loops).
    RoundRobin,
    /// The candidate with the fewest requests in flight from this router.
    LeastBusy,
    /// The candidate that was sent the longest prefix of this prompt, when
    /// that prefix is worth it and the candidate is not overloaded; else
    /// the least busy (see [`CacheAware`]).
    CacheAware(CacheAware),
}

/// When the node holding a prompt's prefix wins over the least busy one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheAware {
    /// Bytes the prefix index may hold.
    pub memory_budget: usize,
    /// The shared prefix must cover at least this share of the prompt, in
    /// percent (SGLang's gateway starts from 50).
    pub min_match_percent: u32,
    /// A node holding the prefix whose capacity is unknown is passed over
    /// when it has more than this many requests in flight beyond the least
    /// busy candidate (a node that reports a capacity is taken while it
    /// has a free slot): a cold prompt elsewhere beats a queue here.
    pub max_extra_in_flight: u64,
}

impl Default for CacheAware {
    fn default() -> Self {
        CacheAware {
            memory_budget: 64 * 1024 * 1024,
            min_match_percent: 50,
            max_extra_in_flight: 0,
        }
    }
}

/// Why a request has nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// No routable node serves this API at all: 503.
    NoNodes,
    /// Nodes are up, none has the model: 404.
    UnknownModel,
    /// Nodes with the model exist but none can take a request now
    /// (draining, or their server failed): 503.
    ModelUnavailable,
}

/// The routable agents, indexed so that a pick is a hash lookup and a step
/// of a cursor. Built by the registry after each change that matters to
/// routing; never mutated after.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Shared, so that a request's plan costs one count per node.
    candidates: Vec<Arc<Candidate>>,
    models: foldhash::HashMap<String, ModelGroups>,
    /// Models held by Online nodes that cannot take requests now.
    unavailable_models: HashSet<String>,
    any_count: usize,
    ollama: Vec<u32>,
    /// How many routing changes the registry had counted when this was built.
    generation: u64,
}

/// Indices into `candidates` of the nodes that have one model, split by
/// whether they hold it in memory already.
#[derive(Debug, Default)]
struct ModelGroups {
    any_loaded: Group,
    any_cold: Group,
    ollama_loaded: Group,
    ollama_cold: Group,
}

/// Nodes that can take one kind of request: their indices, and beside them
/// their in-flight counters, so that least-busy scans one list of counters
/// rather than hopping through every candidate.
#[derive(Debug, Default)]
struct Group {
    members: Vec<u32>,
    in_flight: Vec<Arc<AtomicU64>>,
}

impl Group {
    fn push(&mut self, index: u32, candidate: &Candidate) {
        self.members.push(index);
        self.in_flight.push(Arc::clone(&candidate.in_flight));
    }

    fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

const NO_GROUP: &Group = &Group {
    members: Vec::new(),
    in_flight: Vec::new(),
};

impl ModelGroups {
    fn for_api(&self, api: ApiKind) -> (&Group, &Group) {
        match api {
            ApiKind::Ollama => (&self.ollama_loaded, &self.ollama_cold),
            ApiKind::OpenAi => (&self.any_loaded, &self.any_cold),
        }
    }
}

impl RoutingTable {
    pub fn build(candidates: Vec<Candidate>, unavailable_models: Vec<String>) -> Self {
        let mut models: foldhash::HashMap<String, ModelGroups> = foldhash::HashMap::default();
        let mut ollama = Vec::new();
        for (index, candidate) in candidates.iter().enumerate() {
            let index = index as u32;
            let is_ollama = candidate.backend == BackendKind::Ollama;
            if is_ollama {
                ollama.push(index);
            }
            let mut seen = HashSet::new();
            for model in candidate.models.iter() {
                let key = model_key(model);
                if !seen.insert(key) {
                    continue;
                }
                let loaded = candidate.loaded_models.iter().any(|m| model_key(m) == key);
                let groups = models.entry(key.to_owned()).or_default();
                if loaded {
                    groups.any_loaded.push(index, candidate);
                } else {
                    groups.any_cold.push(index, candidate);
                }
                if is_ollama {
                    if loaded {
                        groups.ollama_loaded.push(index, candidate);
                    } else {
                        groups.ollama_cold.push(index, candidate);
                    }
                }
            }
        }
        RoutingTable {
            any_count: candidates.len(),
            candidates: candidates.into_iter().map(Arc::new).collect(),
            models,
            unavailable_models: unavailable_models
                .iter()
                .map(|name| model_key(name).to_owned())
                .collect(),
            ollama,
            generation: 0,
        }
    }

    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every routable node.
    pub fn candidates(&self) -> &[Arc<Candidate>] {
        &self.candidates
    }

    /// Routable nodes that serve `api`.
    pub fn serving(&self, api: ApiKind) -> impl Iterator<Item = &Candidate> {
        self.candidates
            .iter()
            .map(Arc::as_ref)
            .filter(move |c| api.serves(c.backend))
    }

    /// The groups for a model; `name` and `name:latest` are one model, as
    /// they are to Ollama, whichever of the two the node reports and the
    /// client asks for.
    fn groups(&self, api: ApiKind, model: &str) -> Result<(&Group, &Group), NoRoute> {
        let key = model_key(model);
        let found = self.models.get(key).map(|groups| groups.for_api(api));
        if let Some((loaded, cold)) = found {
            if !loaded.is_empty() || !cold.is_empty() {
                return Ok((loaded, cold));
            }
        }
        if self.unavailable_models.contains(key) {
            return Err(NoRoute::ModelUnavailable);
        }
        let serving = match api {
            ApiKind::Ollama => self.ollama.len(),
            ApiKind::OpenAi => self.any_count,
        };
        if serving == 0 {
            Err(NoRoute::NoNodes)
        } else {
            Err(NoRoute::UnknownModel)
        }
    }
}

/// A routable agent as routing sees it: cheap to clone, immutable but for
/// its in-flight counter, which the router shares with the registry.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: Uuid,
    /// Its machine name, as metrics label it.
    pub name: Arc<str>,
    pub address: std::net::SocketAddr,
    pub backend: BackendKind,
    /// Its LLM server speaks HTTPS.
    pub tls: bool,
    /// Its LLM server's version, as registered.
    pub runtime_version: Arc<str>,
    pub models: ModelList,
    pub loaded_models: ModelList,
    /// Requests the router has in flight to this node.
    pub in_flight: Arc<AtomicU64>,
    /// The most it may have in flight there at once (0: no limit).
    pub capacity: u64,
    /// Its traffic counters, for `/metrics`.
    pub traffic: Arc<crate::telemetry::NodeTraffic>,
    /// `Host` for requests to it, made once here rather than per request.
    pub host_header: axum::http::HeaderValue,
}

/// A model's name as the table indexes it: Ollama's default tag dropped,
/// so that `llama3.2` and `llama3.2:latest` are one key.
pub fn model_key(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

/// A policy and its cursor (and, cache-aware, where prompts went).
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    cursor: AtomicUsize,
    prefixes: Option<prefix::PrefixIndex>,
}

impl Balancer {
    pub fn new(policy: Policy) -> Self {
        let prefixes = match policy {
            Policy::CacheAware(settings) => Some(prefix::PrefixIndex::new(settings.memory_budget)),
            _ => None,
        };
        Balancer {
            policy,
            cursor: AtomicUsize::new(0),
            prefixes,
        }
    }

    /// Whether plans use the prompt: only then is a [`prefix::PromptKey`]
    /// worth making for a request.
    pub fn wants_prompt(&self) -> bool {
        self.prefixes.is_some()
    }

    /// The nodes to try for one request, in order, at most `max_attempts`:
    /// the policy's choice first, then the rest of its group, then the
    /// nodes that would have to load the model.
    pub fn plan(
        &self,
        table: &RoutingTable,
        api: ApiKind,
        model: &str,
        prompt: Option<&prefix::PromptKey>,
        max_attempts: usize,
    ) -> Result<Vec<Arc<Candidate>>, NoRoute> {
        let (loaded, cold) = table.groups(api, model)?;
        let (preferred, fallback) = if loaded.is_empty() {
            (cold, NO_GROUP)
        } else {
            (loaded, cold)
        };
        let first = match (&self.policy, &self.prefixes, prompt) {
            (Policy::CacheAware(settings), Some(index), Some(prompt)) if !prompt.is_empty() => {
                let first = self.pick_for_prompt(table, preferred, index, settings, prompt);
                if let Some(position) = first {
                    let chosen = &table.candidates[preferred.members[position] as usize];
                    index.remember(prompt, prefix::node_key(&chosen.id));
                }
                first
            }
            _ => self.pick_in_group(preferred),
        }
        .ok_or(NoRoute::NoNodes)?;
        let members = &preferred.members;
        let rotated = members[first..].iter().chain(&members[..first]);
        Ok(rotated
            .chain(&fallback.members)
            .take(max_attempts.max(1))
            .map(|&i| Arc::clone(&table.candidates[i as usize]))
            .collect())
    }

    fn pick_in_group(&self, group: &Group) -> Option<usize> {
        match self.policy {
            Policy::RoundRobin => self.rotate(group.members.len()),
            Policy::LeastBusy | Policy::CacheAware(_) => self.least_busy(&group.in_flight),
        }
    }

    /// The member that holds the longest prefix of the prompt, if the
    /// prefix covers enough of it and that member is not much busier than
    /// the least busy; else the least busy (a new conversation spreads).
    fn pick_for_prompt(
        &self,
        table: &RoutingTable,
        group: &Group,
        index: &prefix::PrefixIndex,
        settings: &CacheAware,
        prompt: &prefix::PromptKey,
    ) -> Option<usize> {
        let least_busy = self.least_busy(&group.in_flight)?;
        let keys: Vec<u64> = group
            .members
            .iter()
            .map(|&i| prefix::node_key(&table.candidates[i as usize].id))
            .collect();
        let least_load = group.in_flight[least_busy].load(Ordering::Relaxed);
        // The longest worthwhile prefix on a node that can take the request
        // now: among the nodes holding one, the first such.
        let chosen = index.matches(prompt, &keys).into_iter().find(|found| {
            let worth_it =
                found.blocks * 100 >= prompt.blocks() * settings.min_match_percent as usize;
            let node = &table.candidates[group.members[found.position] as usize];
            let load = group.in_flight[found.position].load(Ordering::Relaxed);
            let free = if node.capacity > 0 {
                load < node.capacity
            } else {
                load <= least_load + settings.max_extra_in_flight
            };
            worth_it && free
        });
        Some(chosen.map_or(least_busy, |found| found.position))
    }

    /// The position of the smallest count, scanning from a rotating start
    /// (so that ties spread evenly) over the slice itself: no modulo, no
    /// bounds check per step, which keeps a thousand nodes near half a
    /// microsecond.
    fn least_busy(&self, counters: &[Arc<AtomicU64>]) -> Option<usize> {
        if counters.is_empty() {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % counters.len();
        let (head, tail) = counters.split_at(start);
        let (mut best, mut best_load) = (start, u64::MAX);
        for (offset, counter) in tail.iter().enumerate() {
            let load = counter.load(Ordering::Relaxed);
            if load < best_load {
                (best, best_load) = (start + offset, load);
                if load == 0 {
                    return Some(best);
                }
            }
        }
        for (position, counter) in head.iter().enumerate() {
            let load = counter.load(Ordering::Relaxed);
            if load < best_load {
                (best, best_load) = (position, load);
                if load == 0 {
                    break;
                }
            }
        }
        Some(best)
    }

    /// The next position in `0..len` in turn: one atomic cursor per
    /// balancer, shared by every event loop, so that successive requests
    /// for a model visit its nodes in order.
    fn rotate(&self, len: usize) -> Option<usize> {
        (len > 0).then(|| self.cursor.fetch_add(1, Ordering::Relaxed) % len)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use super::*;

    fn candidate(n: u8, backend: BackendKind, models: &[&str], loaded: &[&str]) -> Candidate {
        Candidate {
            id: uuid::Uuid::from_u128(u128::from(n)),
            name: Arc::from(format!("node-{n}")),
            address: std::net::SocketAddr::from(([127, 0, 0, n], 11434)),
            backend,
            tls: false,
            runtime_version: Arc::from("0.5.7"),
            models: models.iter().map(|m| Arc::from(*m)).collect(),
            loaded_models: loaded.iter().map(|m| Arc::from(*m)).collect(),
            in_flight: Arc::new(AtomicU64::new(0)),
            capacity: 0,
            traffic: Default::default(),
            host_header: axum::http::HeaderValue::from_static("127.0.0.1:11434"),
        }
    }

    /// The node routing would try first: the head of the plan production
    /// uses.
    fn first(
        balancer: &Balancer,
        table: &RoutingTable,
        api: ApiKind,
        model: &str,
    ) -> Result<Arc<Candidate>, NoRoute> {
        let plan = balancer.plan(table, api, model, None, 1)?;
        Ok(Arc::clone(&plan[0]))
    }

    #[test]
    fn cache_aware_keeps_a_prompt_where_its_prefix_is_unless_that_node_is_overloaded() {
        let table = RoutingTable::build(
            (2..5)
                .map(|n| candidate(n, BackendKind::Ollama, &["m"], &[]))
                .collect(),
            Vec::new(),
        );
        let balancer = Balancer::new(Policy::CacheAware(CacheAware::default()));
        let system = "A long system prompt. ".repeat(100);
        let turn = |n: usize| {
            let messages = format!("[{system}]") + &" more".repeat(n);
            prefix::PromptKey::of("m", &[messages.as_bytes()])
        };
        let plan = |key: &prefix::PromptKey| {
            let plan = balancer
                .plan(&table, ApiKind::Ollama, "m", Some(key), 1)
                .expect("a plan");
            Arc::clone(&plan[0])
        };
        let home = plan(&turn(0));
        for n in 1..5 {
            assert_eq!(plan(&turn(n)).id, home.id, "turn {n} stays");
        }
        // Busier than the least busy: a cold prompt elsewhere beats the
        // queue (its capacity unknown)...
        home.in_flight.store(1, Ordering::Relaxed);
        let elsewhere = plan(&turn(6));
        assert_ne!(elsewhere.id, home.id);
        // ...and that node now holds the prefix too: the next turn goes to
        // whichever holder is free.
        elsewhere.in_flight.store(1, Ordering::Relaxed);
        home.in_flight.store(0, Ordering::Relaxed);
        assert_eq!(plan(&turn(7)).id, home.id);
        elsewhere.in_flight.store(0, Ordering::Relaxed);
        home.in_flight.store(1, Ordering::Relaxed);
        assert_eq!(
            plan(&turn(8)).id,
            elsewhere.id,
            "the other holder, not a cold node"
        );
        home.in_flight.store(0, Ordering::Relaxed);
        // A new prompt goes to the least busy, never to a busy node.
        home.in_flight.store(3, Ordering::Relaxed);
        let fresh = prefix::PromptKey::of("m", &[b"an unrelated prompt"]);
        assert_ne!(plan(&fresh).id, home.id);
    }

    fn port_of(candidate: impl AsRef<Candidate>) -> u8 {
        match candidate.as_ref().address.ip() {
            std::net::IpAddr::V4(ip) => ip.octets()[3],
            std::net::IpAddr::V6(_) => 0,
        }
    }

    #[test]
    fn round_robin_visits_every_holder_of_the_model_in_turn() {
        let table = RoutingTable::build(
            vec![
                candidate(2, BackendKind::Ollama, &["m"], &[]),
                candidate(3, BackendKind::Ollama, &["m"], &[]),
                candidate(4, BackendKind::Ollama, &["other"], &[]),
            ],
            vec![],
        );
        let balancer = Balancer::new(Policy::RoundRobin);
        let picks: Vec<u8> = (0..4)
            .map(|_| port_of(first(&balancer, &table, ApiKind::Ollama, "m").expect("route")))
            .collect();
        assert_eq!(picks, [2, 3, 2, 3]);
    }

    #[test]
    fn nodes_holding_the_model_in_memory_are_preferred() {
        let table = RoutingTable::build(
            vec![
                candidate(2, BackendKind::Ollama, &["m"], &[]),
                candidate(3, BackendKind::Ollama, &["m"], &["m"]),
            ],
            vec![],
        );
        for policy in [Policy::RoundRobin, Policy::LeastBusy] {
            let balancer = Balancer::new(policy);
            for _ in 0..4 {
                assert_eq!(
                    port_of(first(&balancer, &table, ApiKind::Ollama, "m").expect("route")),
                    3
                );
            }
            let plan = balancer
                .plan(&table, ApiKind::Ollama, "m", None, 5)
                .expect("plan");
            assert_eq!(
                plan.iter().map(port_of).collect::<Vec<_>>(),
                [3, 2],
                "the cold node is the fallback"
            );
        }
    }

    #[test]
    fn least_busy_picks_the_fewest_in_flight() {
        let table = RoutingTable::build(
            vec![
                candidate(2, BackendKind::Ollama, &["m"], &[]),
                candidate(3, BackendKind::Ollama, &["m"], &[]),
                candidate(4, BackendKind::Ollama, &["m"], &[]),
            ],
            vec![],
        );
        table.candidates[0].in_flight.store(5, Ordering::Relaxed);
        table.candidates[1].in_flight.store(1, Ordering::Relaxed);
        table.candidates[2].in_flight.store(3, Ordering::Relaxed);
        let balancer = Balancer::new(Policy::LeastBusy);
        for _ in 0..5 {
            assert_eq!(
                port_of(first(&balancer, &table, ApiKind::Ollama, "m").expect("route")),
                3
            );
        }
    }

    #[test]
    fn api_kind_and_model_decide_the_candidates() {
        let table = RoutingTable::build(
            vec![
                candidate(2, BackendKind::OpenAi, &["vllm-model"], &[]),
                candidate(3, BackendKind::Ollama, &["llama3:latest"], &[]),
            ],
            vec!["resting-model".to_owned()],
        );
        let balancer = Balancer::new(Policy::RoundRobin);
        assert_eq!(
            first(&balancer, &table, ApiKind::OpenAi, "vllm-model").map(port_of),
            Ok(2)
        );
        assert_eq!(
            first(&balancer, &table, ApiKind::Ollama, "vllm-model").map(port_of),
            Err(NoRoute::UnknownModel),
            "/api routes only reach Ollama nodes"
        );
        assert_eq!(
            first(&balancer, &table, ApiKind::Ollama, "llama3").map(port_of),
            Ok(3),
            "no tag means :latest"
        );
        assert_eq!(
            first(&balancer, &table, ApiKind::OpenAi, "nope").map(port_of),
            Err(NoRoute::UnknownModel)
        );
        assert_eq!(
            first(&balancer, &table, ApiKind::OpenAi, "resting-model").map(port_of),
            Err(NoRoute::ModelUnavailable)
        );
        let empty = RoutingTable::default();
        assert_eq!(
            first(&balancer, &empty, ApiKind::OpenAi, "m").map(port_of),
            Err(NoRoute::NoNodes)
        );
    }

    #[test]
    fn a_name_and_its_latest_tag_are_one_model_both_ways() {
        let table = RoutingTable::build(
            vec![
                candidate(2, BackendKind::Ollama, &["llama3.2"], &["llama3.2:latest"]),
                candidate(3, BackendKind::Ollama, &["qwen2:latest"], &[]),
                candidate(4, BackendKind::Ollama, &["qwen2:0.5b"], &[]),
                candidate(5, BackendKind::Ollama, &["llama3.2:latest"], &[]),
            ],
            vec!["resting:latest".to_owned()],
        );
        let balancer = Balancer::new(Policy::RoundRobin);
        for (asked, node) in [
            ("llama3.2", 2),
            ("llama3.2:latest", 2),
            ("qwen2", 3),
            ("qwen2:latest", 3),
            ("qwen2:0.5b", 4),
        ] {
            assert_eq!(
                first(&balancer, &table, ApiKind::Ollama, asked).map(port_of),
                Ok(node),
                "{asked}"
            );
        }
        // Node 2's loaded list names the tag and its model list does not:
        // it still counts as holding the model, so it comes before node 5.
        let plan = balancer
            .plan(&table, ApiKind::Ollama, "llama3.2", None, 3)
            .expect("plan");
        assert_eq!(plan.iter().map(port_of).collect::<Vec<_>>(), [2, 5]);
        assert_eq!(
            first(&balancer, &table, ApiKind::Ollama, "resting").map(port_of),
            Err(NoRoute::ModelUnavailable)
        );
        assert_eq!(
            first(&balancer, &table, ApiKind::Ollama, "qwen2:1.5b").map(port_of),
            Err(NoRoute::UnknownModel),
            "another tag is another model"
        );
    }

    #[test]
    fn plan_is_bounded_and_starts_with_the_choice() {
        let nodes = (2..8)
            .map(|n| candidate(n, BackendKind::Ollama, &["m"], &[]))
            .collect();
        let table = RoutingTable::build(nodes, vec![]);
        let balancer = Balancer::new(Policy::RoundRobin);
        for turn in 0..6u8 {
            let plan = balancer
                .plan(&table, ApiKind::Ollama, "m", None, 3)
                .expect("plan");
            // Round-robin's choice this turn, then the next two in order:
            // bounded by max_attempts, no node twice.
            let expected: Vec<u8> = (0..3).map(|k| 2 + (turn + k) % 6).collect();
            assert_eq!(
                plan.iter().map(port_of).collect::<Vec<_>>(),
                expected,
                "turn {turn}"
            );
        }
        let everyone = balancer
            .plan(&table, ApiKind::Ollama, "m", None, 100)
            .expect("plan");
        let distinct: HashSet<u8> = everyone.iter().map(port_of).collect();
        assert_eq!(
            (everyone.len(), distinct.len()),
            (6, 6),
            "at most every node, once each"
        );
    }
}
