//! Wire types: the JSON that crosses between the router, the agent, clients
//! and tests. Nothing here holds state; the router converts its internal
//! records into these at the edge. [`url`] holds the one other thing both
//! binaries share: how they read a router's URL from the command line.

pub mod cli;
pub mod rfc3339;
pub mod url;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The LLM server port an agent registers when it names none (Ollama's).
pub const DEFAULT_LLM_PORT: u16 = 11434;

/// The longest `machine_name` the router accepts, in bytes (a DNS name's limit).
pub const MAX_MACHINE_NAME_BYTES: usize = 253;

/// Host facts the agent gathers once at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SystemInfo {
    pub os: String,
    pub arch: String,
    pub cpu_cores: u32,
    /// Bytes.
    pub total_memory: u64,
}

/// Which HTTP API a node's LLM server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Ollama: serves `/api/*` and `/v1/*`.
    #[default]
    Ollama,
    /// An OpenAI-compatible server (llama.cpp's server, vLLM): `/v1/*` only.
    OpenAi,
}

/// `POST /api/agents/register`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterRequest {
    pub machine_name: String,
    /// The address at which the router reaches the node's LLM server.
    pub ip_address: String,
    /// The node's LLM server port.
    #[serde(default = "default_llm_port")]
    pub port: u16,
    pub runtime_version: String,
    pub system_info: SystemInfo,
    /// Model names the node serves.
    #[serde(default)]
    pub models: Vec<String>,
    /// The API its LLM server speaks; Ollama when absent.
    #[serde(default)]
    pub backend: BackendKind,
    /// The node's LLM server speaks HTTPS: the router connects to it with
    /// TLS, checking its certificate (the system's roots, or the router's
    /// `--node-ca-cert`) for `ip_address`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// Requests the node's LLM server takes at once (its slots); the router
    /// never sends it more. Absent: no limit known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// The secret this agent was given when its identity was first
    /// registered: registering a known `(machine_name, port)` again needs
    /// it (or the admin token), so that no one else can take the identity.
    /// Absent for a first registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_secret: Option<String>,
}

fn default_llm_port() -> u16 {
    DEFAULT_LLM_PORT
}

/// The answer to a registration: `201` for a new machine, `200` for a known one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterResponse {
    pub id: Uuid,
    /// Always `"registered"`: the answer's contract, which agents check.
    pub status: String,
    /// This agent's own credential for its heartbeats, updates, drain,
    /// delete and registering again: 256 random bits, given when the
    /// identity is first registered (and when the admin token registers it).
    /// Absent when the agent registered again with the secret it holds, and
    /// when the router has no agent credential configured. The router keeps
    /// only its hash, so it cannot be shown again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_secret: Option<String>,
}

/// What a node reports with each heartbeat. Every field is optional: an
/// empty body is a valid heartbeat, and an absent field keeps the last value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatReport {
    /// Models the node's LLM server can serve now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Models held in memory now (Ollama's `/api/ps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_models: Option<Vec<String>>,
    /// Requests the node's LLM server is working on, as the node sees them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_in_flight: Option<u32>,
    /// Whether the node's LLM server answered the agent's last probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_server_up: Option<bool>,
    /// Whole-host CPU use, percent (0 to 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage_percent: Option<f32>,
    /// Bytes of memory in use on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used: Option<u64>,
    /// Requests the node's LLM server takes at once, as now known (a
    /// server restarted with more slots); overrides the registered one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
}

/// `PUT /api/agents/:id`: the mutable fields; an absent field is unchanged.
/// The identity (`machine_name` and `port`) is not mutable: it is what makes a
/// re-registration find the same id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpdateAgentRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_info: Option<SystemInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
}

/// Liveness as the router sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum AgentStatus {
    Online,
    Offline,
}

/// Where a node stands for routing, in one word: the one definition of a
/// node's state that the API, the CLI, the dashboard and the metrics all
/// show. `status` (Online, Offline) is liveness alone; this says what the
/// router does with the node now. Read top-down: the first that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// No heartbeat within the timeout: the router sends it nothing.
    #[default]
    Offline,
    /// Online, but its agent said it is leaving: no new requests.
    Draining,
    /// Online, but its agent reports that its LLM server does not answer.
    ServerDown,
    /// Online, but the router's own request to its LLM server just failed
    /// (no connection, a 5xx, silence): out of rotation until the router's
    /// probe of the server succeeds, whatever heartbeats say.
    Unreachable,
    /// Online and in rotation: the router sends it requests.
    Serving,
}

impl NodeState {
    pub const ALL: [NodeState; 5] = [
        NodeState::Serving,
        NodeState::Draining,
        NodeState::ServerDown,
        NodeState::Unreachable,
        NodeState::Offline,
    ];

    /// The word the API uses (`serving`, `server_down`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Offline => "offline",
            NodeState::Draining => "draining",
            NodeState::ServerDown => "server_down",
            NodeState::Unreachable => "unreachable",
            NodeState::Serving => "serving",
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One agent as `GET /api/agents` lists it, and as `agents.json` stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    pub id: Uuid,
    pub machine_name: String,
    pub ip_address: String,
    pub port: u16,
    pub runtime_version: String,
    pub status: AgentStatus,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub registered_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub last_seen: DateTime<Utc>,
    pub system_info: SystemInfo,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub backend: BackendKind,
    /// What the latest heartbeat reported (empty before the first one).
    #[serde(default)]
    pub report: HeartbeatReport,
    /// The router reaches its LLM server over HTTPS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// Requests its LLM server takes at once, as registered (the report's,
    /// when there is one, is the one routing uses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
}

/// One agent as the API shows it: the stored record plus what the router
/// knows of it right now (not stored: it is rebuilt from live state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    #[serde(flatten)]
    pub agent: Agent,
    /// Requests the router has in flight to this node now.
    #[serde(default)]
    pub in_flight: u64,
    /// The node said it is leaving: it gets no new requests.
    #[serde(default)]
    pub draining: bool,
    /// Whether the router would send it a request now: exactly when
    /// `state` is `serving`, and exactly the nodes routing picks from.
    #[serde(default)]
    pub routable: bool,
    /// Where it stands for routing (see [`NodeState`]).
    #[serde(default)]
    pub state: NodeState,
}

/// The answer to `POST /api/agents/:id/drain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrainResponse {
    pub id: Uuid,
    pub draining: bool,
    pub in_flight: u64,
}

/// One router of those sharing a registry, as `GET /api/routers` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RouterView {
    pub id: Uuid,
    /// Where it listens, as it was started.
    pub address: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat row in the database (the database's clock).
    pub last_seen: DateTime<Utc>,
    /// Heard from within the last 10 seconds.
    pub alive: bool,
    /// The router that answered this request.
    pub this_router: bool,
}

/// The answer to `GET /api/routers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RouterList {
    /// `files` (the data dir; this router alone) or `postgres` (shared).
    pub store: String,
    /// Whether this router reaches the database now (always true for files).
    pub database_reachable: bool,
    pub routers: Vec<RouterView>,
}

/// The body of every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable, such as `invalid_body` or `not_found`.
    pub code: String,
    /// For people.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_register_body_parses_with_defaults() {
        let body = r#"{"machine_name":"server-01","ip_address":"127.0.0.2",
            "runtime_version":"0.1.0",
            "system_info":{"os":"Linux","arch":"x86_64","cpu_cores":8,"total_memory":16777216}}"#;
        let request: RegisterRequest = serde_json::from_str(body).expect("seed body parses");
        assert_eq!(request.port, DEFAULT_LLM_PORT);
        assert!(request.models.is_empty());
        assert_eq!(request.backend, BackendKind::Ollama);
    }

    #[test]
    fn empty_heartbeat_report_serializes_to_empty_object() {
        let text = serde_json::to_string(&HeartbeatReport::default()).expect("serializes");
        assert_eq!(text, "{}");
    }
}
