//! Prometheus metrics at `GET /metrics`.
//!
//! Events (requests, failovers, store writes) are recorded through the
//! `metrics` facade into `metrics-exporter-prometheus`'s recorder as they
//! happen. Facts about the fleet (agents by status, requests in flight per
//! node, heartbeats received) are read from the registry when scraped, so
//! they cost nothing per heartbeat and never go stale when a node leaves.
//!
//! The recorder is global to the process (the facade's design): routers
//! embedded in one process, as some tests do, share it.

use std::fmt::Write as _;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "llm_router_requests_total";
pub const REQUEST_DURATION: &str = "llm_router_request_duration_seconds";
pub const TIME_TO_FIRST_BYTE: &str = "llm_router_time_to_first_byte_seconds";
pub const FAILOVERS: &str = "llm_router_failovers_total";
pub const STORE_WRITES: &str = "llm_router_store_writes_total";
pub const STORE_WRITE_DURATION: &str = "llm_router_store_write_duration_seconds";
pub const STORE_CHANGES: &str = "llm_router_store_changes_total";
pub const QUEUE_LENGTH: &str = "llm_router_queue_length";
pub const QUEUE_WAIT: &str = "llm_router_queue_wait_seconds";
pub const QUEUE_REFUSED: &str = "llm_router_queue_refused_total";

/// Latency buckets, in seconds: from a fast cached answer to a long generation.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

/// fsync takes from tens of microseconds to tens of milliseconds.
const STORE_BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder once per process; `None` if another recorder was
/// installed first (an embedding program's own), in which case `/metrics`
/// shows only the registry's facts.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(STORE_WRITE_DURATION.to_owned()),
                    &STORE_BUCKETS,
                )
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Suffix("_seconds".to_owned()),
                        &LATENCY_BUCKETS,
                    )
                })
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

const REQUESTS_HELP: &str =
    "Client requests on the LLM routes, by route, model, node and status code";
const FAILOVERS_HELP: &str =
    "Attempts that failed on a node (connect error, 5xx, silence) before any byte reached the client";

fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(REQUESTS, REQUESTS_HELP);
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "From a client request's arrival to the end of its answer (or the client leaving)"
    );
    describe_histogram!(
        TIME_TO_FIRST_BYTE,
        Unit::Seconds,
        "From a client request's arrival to its answer's head, ready to send"
    );
    describe_counter!(FAILOVERS, FAILOVERS_HELP);
    describe_counter!(
        STORE_WRITES,
        "Journal writes (one per group commit), by result"
    );
    describe_histogram!(
        STORE_WRITE_DURATION,
        Unit::Seconds,
        "Time of one journal write and its fdatasync"
    );
    describe_counter!(STORE_CHANGES, "Changes committed to the journal, by kind");
    metrics::describe_gauge!(
        QUEUE_LENGTH,
        "Requests waiting at the router for a node of their model to free a slot"
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "How long requests waited in the router's queue"
    );
    describe_counter!(
        QUEUE_REFUSED,
        "Requests answered 429 by the queue, by reason (full, timeout)"
    );
    metrics::gauge!(QUEUE_LENGTH).set(0.0);
}

/// The LLM routes metrics label requests with: a fixed set, so that each
/// route's histograms are looked up once rather than per request.
pub const LLM_ROUTES: [&str; 9] = [
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "other",
];

/// A route as an index into [`LLM_ROUTES`] (`other` for anything else).
pub fn route_index(path: &str) -> usize {
    LLM_ROUTES[..LLM_ROUTES.len() - 1]
        .iter()
        .position(|route| *route == path)
        .unwrap_or(LLM_ROUTES.len() - 1)
}

/// One route's histograms, made once: recording is then a lock-free push.
pub struct RouteHistograms {
    pub time_to_first_byte: metrics::Histogram,
    pub duration: metrics::Histogram,
}

/// The histograms of route `index` (see [`route_index`]).
pub fn route_histograms(index: usize) -> &'static RouteHistograms {
    static HISTOGRAMS: OnceLock<Vec<RouteHistograms>> = OnceLock::new();
    let all = HISTOGRAMS.get_or_init(|| {
        LLM_ROUTES
            .iter()
            .map(|route| RouteHistograms {
                time_to_first_byte: metrics::histogram!(TIME_TO_FIRST_BYTE, "route" => *route),
                duration: metrics::histogram!(REQUEST_DURATION, "route" => *route),
            })
            .collect()
    });
    &all[index.min(all.len() - 1)]
}

/// The traffic one node has had: its series of `llm_router_requests_total`
/// and `llm_router_failovers_total`. It lives beside the node's record in
/// the registry (not in the metrics recorder, which can never forget a
/// series), so a node's series leave `/metrics` when the node does.
#[derive(Debug, Default)]
pub struct NodeTraffic {
    /// Answers this node gave, by route, status and model.
    requests: std::sync::Mutex<foldhash::HashMap<(usize, u16, String), u64>>,
    /// Attempts that failed on this node, by route.
    failovers: [std::sync::atomic::AtomicU64; LLM_ROUTES.len()],
}

impl NodeTraffic {
    fn count_request(&self, route: usize, status: u16, model: String) {
        let mut requests = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *requests.entry((route, status, model)).or_insert(0) += 1;
    }

    /// Counts an attempt that failed on this node.
    pub fn count_failover(&self, route: usize) {
        self.failovers[route.min(LLM_ROUTES.len() - 1)]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The labels of one `llm_router_requests_total` series.
#[derive(PartialEq, Eq, Hash)]
struct RequestSeries {
    route: usize,
    status: u16,
    model: String,
    node: std::sync::Arc<str>,
}

thread_local! {
    /// Each event loop's handles to the request counters it has used:
    /// counting a request is then a hash lookup and an atomic add, not the
    /// building of a labelled key. Bounded by the label combinations seen.
    static REQUEST_COUNTERS: std::cell::RefCell<std::collections::HashMap<RequestSeries, metrics::Counter>> =
        std::cell::RefCell::default();
}

/// One client request's accounting on an LLM route: made when the request
/// arrives, filled in on the way (the model asked for, the node that
/// answered, the answer's status), and recorded once, when it is dropped:
/// for a proxied answer that is when its body ends or the client leaves;
/// for an answer the router makes itself, as soon as it is made.
#[derive(Debug)]
pub struct RequestAccount {
    route: usize,
    started: std::time::Instant,
    /// The model label (`(unknown)` for a model no node serves).
    model: String,
    /// The node that answered, and when its answer's head came.
    node: Option<(std::sync::Arc<NodeTraffic>, std::time::Duration)>,
    status: u16,
}

impl RequestAccount {
    /// A request on `path` arriving now.
    pub fn start(path: &str) -> Self {
        RequestAccount {
            route: route_index(path),
            started: std::time::Instant::now(),
            model: String::new(),
            node: None,
            status: 0,
        }
    }

    /// The route, as an index into [`LLM_ROUTES`].
    pub fn route(&self) -> usize {
        self.route
    }

    pub fn set_model(&mut self, label: String) {
        self.model = label;
    }

    /// The model asked for (what routing looks up).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Takes the model back, to name it in an error, leaving `label` as the
    /// one counted.
    pub fn relabel_model(&mut self, label: &str) -> String {
        std::mem::replace(&mut self.model, label.to_owned())
    }

    /// A node's answer head arrived: it is the one counted.
    pub fn answered_by(&mut self, node: &std::sync::Arc<NodeTraffic>, status: u16) {
        self.node = Some((std::sync::Arc::clone(node), self.started.elapsed()));
        self.status = status;
    }

    /// The router's own answer, whose status is the one counted; the
    /// account is recorded now.
    pub fn close(mut self, status: u16) {
        self.node = None;
        self.status = status;
    }
}

impl Drop for RequestAccount {
    fn drop(&mut self) {
        let model = std::mem::take(&mut self.model);
        match self.node.take() {
            // Latencies are those of answers that came from a node; the
            // router's own refusals would only blur them.
            Some((node, first_byte)) => {
                let histograms = route_histograms(self.route);
                histograms.time_to_first_byte.record(first_byte);
                histograms.duration.record(self.started.elapsed());
                node.count_request(self.route, self.status, model);
            }
            None => count_unanswered(self.route, self.status, model),
        }
    }
}

/// Counts a request no node answered, as `node="none"`.
fn count_unanswered(route: usize, status: u16, model: String) {
    let route = route.min(LLM_ROUTES.len() - 1);
    let series = RequestSeries {
        route,
        status,
        model,
        node: std::sync::Arc::from("none"),
    };
    REQUEST_COUNTERS.with(|counters| {
        let mut counters = counters.borrow_mut();
        if let Some(counter) = counters.get(&series) {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!(
            REQUESTS,
            "route" => LLM_ROUTES[series.route],
            "model" => series.model.clone(),
            "node" => std::sync::Arc::clone(&series.node),
            "status" => series.status.to_string(),
        );
        counter.increment(1);
        counters.insert(series, counter);
    });
}

/// What `/metrics` reports of the fleet, read when scraped.
#[derive(Debug, Default)]
pub struct FleetFacts {
    pub online: u64,
    pub offline: u64,
    pub routable: u64,
    pub heartbeats: u64,
    pub registrations: u64,
    /// Agents in each state, in the order of [`common::NodeState::ALL`].
    pub by_state: [u64; common::NodeState::ALL.len()],
    /// Every Online node, with the requests the router has in flight to it.
    pub nodes: Vec<NodeLoad>,
    /// Every registered node's name and traffic counters.
    pub traffic: Vec<(std::sync::Arc<str>, std::sync::Arc<NodeTraffic>)>,
}

#[derive(Debug)]
pub struct NodeLoad {
    pub id: uuid::Uuid,
    pub name: String,
    pub in_flight: u64,
}

/// Drains the histograms' lock-free buckets; the sweeper calls it
/// periodically, so memory stays bounded whether or not anyone scrapes.
pub fn upkeep() {
    if let Some(Some(handle)) = HANDLE.get() {
        handle.run_upkeep();
    }
}

/// The text of `/metrics`: the recorded events and the registry's facts,
/// metric families in name order and series in label order, as
/// Prometheus' own client libraries write them, so that two scrapes of
/// the same state read the same (the recorder keeps them in hash maps).
pub fn render(facts: &FleetFacts) -> String {
    let mut text = HANDLE
        .get()
        .and_then(Option::as_ref)
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    render_fleet(facts, &mut text);
    sorted_exposition(&text)
}

/// Every registered node's requests and failovers. Two nodes of one name
/// (two servers on one machine) share their series, as they share the label.
fn render_node_traffic(
    traffic: &[(std::sync::Arc<str>, std::sync::Arc<NodeTraffic>)],
    out: &mut String,
) {
    use std::collections::BTreeMap;
    let mut requests: BTreeMap<(&str, usize, &str, u16), u64> = BTreeMap::new();
    let mut failovers: BTreeMap<(&str, usize), u64> = BTreeMap::new();
    let guards: Vec<_> = traffic
        .iter()
        .map(|(name, node)| {
            let counts = node
                .requests
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (name, node, counts)
        })
        .collect();
    for (name, node, counts) in &guards {
        for ((route, status, model), count) in counts.iter() {
            *requests.entry((name, *route, model, *status)).or_insert(0) += count;
        }
        for (route, count) in node.failovers.iter().enumerate() {
            let count = count.load(std::sync::atomic::Ordering::Relaxed);
            if count > 0 {
                *failovers.entry((name, route)).or_insert(0) += count;
            }
        }
    }
    if !requests.is_empty() {
        let _ = writeln!(
            out,
            "# HELP {REQUESTS} {REQUESTS_HELP}\n# TYPE {REQUESTS} counter"
        );
        for ((node, route, model, status), count) in requests {
            let _ = writeln!(
                out,
                "{REQUESTS}{{route=\"{}\",model=\"{}\",node=\"{}\",status=\"{status}\"}} {count}",
                LLM_ROUTES[route],
                escape_label(model),
                escape_label(node),
            );
        }
    }
    if !failovers.is_empty() {
        let _ = writeln!(
            out,
            "# HELP {FAILOVERS} {FAILOVERS_HELP}\n# TYPE {FAILOVERS} counter"
        );
        for ((node, route), count) in failovers {
            let _ = writeln!(
                out,
                "{FAILOVERS}{{route=\"{}\",node=\"{}\"}} {count}",
                LLM_ROUTES[route],
                escape_label(node),
            );
        }
    }
}

/// The text format with its families sorted by name and, within each
/// family, its series by their labels. A histogram's or summary's lines for
/// one label set (`_bucket` by `le`, `_sum`, `_count`) stay together and in
/// their order.
fn sorted_exposition(text: &str) -> String {
    use std::collections::BTreeMap;
    #[derive(Default)]
    struct Family<'a> {
        header: Vec<&'a str>,
        series: BTreeMap<String, Vec<&'a str>>,
    }
    let mut families: BTreeMap<&str, Family> = BTreeMap::new();
    let mut current: Option<&str> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            if let Some(name) = comment.split_whitespace().nth(1) {
                // A family written by the recorder and by the registry (a
                // node's requests) has its header once.
                let header = &mut families.entry(name).or_default().header;
                if !header.contains(&line) {
                    header.push(line);
                }
                current = Some(name);
            }
            continue;
        }
        let sample_name = line.split(['{', ' ']).next().unwrap_or(line);
        let family = match current {
            Some(name) if sample_name.starts_with(name) => name,
            _ => {
                current = Some(sample_name);
                sample_name
            }
        };
        families
            .entry(family)
            .or_default()
            .series
            .entry(series_key(line))
            .or_default()
            .push(line);
    }
    let mut out = String::with_capacity(text.len());
    for family in families.values() {
        for line in family.header.iter().chain(family.series.values().flatten()) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A sample's label set without `le` and `quantile`, which tell apart the
/// lines of one histogram or summary series rather than series.
fn series_key(line: &str) -> String {
    let Some(open) = line.find('{') else {
        return String::new();
    };
    let Some(close) = line.rfind('}') else {
        return String::new();
    };
    let labels = &line[open + 1..close.max(open + 1)];
    let mut key = String::with_capacity(labels.len());
    let mut rest = labels;
    while !rest.is_empty() {
        // One `name="value"` pair; values escape quotes as \".
        let Some(equals) = rest.find("=\"") else {
            break;
        };
        let mut end = equals + 2;
        let bytes = rest.as_bytes();
        while end < bytes.len() && bytes[end] != b'"' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        let pair = &rest[..(end + 1).min(rest.len())];
        let name = &rest[..equals];
        if name != "le" && name != "quantile" {
            key.push_str(pair);
            key.push(',');
        }
        rest = rest.get(end + 1..).unwrap_or("").trim_start_matches(',');
    }
    key
}

fn render_fleet(facts: &FleetFacts, out: &mut String) {
    render_node_traffic(&facts.traffic, out);
    let _ = writeln!(
        out,
        "# HELP llm_router_agents Registered agents, by status\n# TYPE llm_router_agents gauge"
    );
    let _ = writeln!(
        out,
        "llm_router_agents{{status=\"Online\"}} {}",
        facts.online
    );
    let _ = writeln!(
        out,
        "llm_router_agents{{status=\"Offline\"}} {}",
        facts.offline
    );
    let _ = writeln!(
        out,
        "# HELP llm_router_agents_routable Agents the router would send a request to now (state serving)\n\
         # TYPE llm_router_agents_routable gauge\nllm_router_agents_routable {}",
        facts.routable
    );
    let _ = writeln!(
        out,
        "# HELP llm_router_agents_by_state Registered agents, by state (serving, draining, server_down, unreachable, offline)\n\
         # TYPE llm_router_agents_by_state gauge"
    );
    for (state, count) in common::NodeState::ALL.iter().zip(facts.by_state) {
        let _ = writeln!(
            out,
            "llm_router_agents_by_state{{state=\"{state}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP llm_router_heartbeats_total Heartbeats accepted\n\
         # TYPE llm_router_heartbeats_total counter\nllm_router_heartbeats_total {}",
        facts.heartbeats
    );
    let _ = writeln!(
        out,
        "# HELP llm_router_registrations_total Registrations accepted (new and known machines)\n\
         # TYPE llm_router_registrations_total counter\nllm_router_registrations_total {}",
        facts.registrations
    );
    let _ = writeln!(
        out,
        "# HELP llm_router_node_requests_in_flight Requests the router has in flight to each Online node\n\
         # TYPE llm_router_node_requests_in_flight gauge"
    );
    for node in &facts.nodes {
        let _ = writeln!(
            out,
            "llm_router_node_requests_in_flight{{node=\"{}\",agent_id=\"{}\"}} {}",
            escape_label(&node.name),
            node.id,
            node.in_flight
        );
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn families_and_series_are_sorted_and_histograms_kept_whole() {
        let text = "# TYPE zeta counter\nzeta{node=\"b\"} 1\nzeta{node=\"a\"} 2\n\n\
            # TYPE alpha histogram\n\
            alpha_bucket{route=\"y\",le=\"0.5\"} 1\nalpha_bucket{route=\"y\",le=\"+Inf\"} 1\n\
            alpha_sum{route=\"y\"} 0.1\nalpha_count{route=\"y\"} 1\n\
            alpha_bucket{route=\"x\",le=\"0.5\"} 0\nalpha_bucket{route=\"x\",le=\"+Inf\"} 2\n\
            alpha_sum{route=\"x\"} 3\nalpha_count{route=\"x\"} 2\n";
        let sorted = super::sorted_exposition(text);
        let lines: Vec<&str> = sorted.lines().collect();
        assert_eq!(
            lines,
            [
                "# TYPE alpha histogram",
                "alpha_bucket{route=\"x\",le=\"0.5\"} 0",
                "alpha_bucket{route=\"x\",le=\"+Inf\"} 2",
                "alpha_sum{route=\"x\"} 3",
                "alpha_count{route=\"x\"} 2",
                "alpha_bucket{route=\"y\",le=\"0.5\"} 1",
                "alpha_bucket{route=\"y\",le=\"+Inf\"} 1",
                "alpha_sum{route=\"y\"} 0.1",
                "alpha_count{route=\"y\"} 1",
                "# TYPE zeta counter",
                "zeta{node=\"a\"} 2",
                "zeta{node=\"b\"} 1",
            ]
        );
        assert_eq!(super::sorted_exposition(&sorted), sorted, "stable");
    }
}
