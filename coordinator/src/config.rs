//! The router's configuration: one clap struct, every option a flag and an
//! environment variable with a documented default.

use common::cli::parse_seconds;
pub use common::cli::LogFormat;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::{self, Credentials, Secret};
use crate::balancer::{CacheAware, Policy};
use crate::proxy::ProxyOptions;

/// The server's options; the command line around them is `cli::Cli`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address or host name to listen on (a name is resolved at start; its
    /// first IPv4 address is used, else its first IPv6 one).
    #[arg(long, env = "LLM_ROUTER_HOST", default_value = "0.0.0.0", value_parser = parse_host)]
    pub host: String,

    /// Port to listen on (0 picks a free one; the log says which).
    #[arg(long, env = "LLM_ROUTER_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Where agents.json and its journal live [default: $HOME/.llm-router].
    #[arg(long, env = "LLM_ROUTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Seconds without a heartbeat after which an agent is Offline (fractions allowed).
    #[arg(long, env = "AGENT_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub agent_timeout: Duration,

    /// Seconds between writes of agents' last_seen to disk (to the journal).
    #[arg(long, env = "LLM_ROUTER_FLUSH_INTERVAL", default_value = "5", value_parser = parse_seconds)]
    pub flush_interval: Duration,

    /// Seconds between foldings of the journal into agents.json (sooner when it grows large).
    #[arg(long, env = "LLM_ROUTER_SNAPSHOT_INTERVAL", default_value = "60", value_parser = parse_seconds)]
    pub snapshot_interval: Duration,

    /// Seconds of quiet after registrations, updates or deletions before
    /// agents.json is rewritten to show them (0: only every snapshot
    /// interval). Heartbeats do not count; a storm that never goes quiet
    /// gets the interval's snapshots.
    #[arg(long, env = "LLM_ROUTER_SNAPSHOT_WHEN_QUIET", default_value = "2", value_parser = common::cli::parse_seconds_or_off)]
    pub snapshot_when_quiet: Duration,

    /// How to pick among the nodes that serve a model.
    #[arg(
        long,
        env = "LLM_ROUTER_BALANCER",
        value_enum,
        default_value = "round-robin"
    )]
    pub balancer: BalancerChoice,

    /// Seconds between the router's own checks of every node in rotation
    /// (`GET /api/version`, or `/v1/models`): two failed in a row take a
    /// node out until it answers again. A check that times out while the
    /// router has requests at the node is no failure (busy, not dead).
    /// 0: no checks; nodes then leave only on failed requests or their
    /// agents' reports.
    #[arg(long, env = "LLM_ROUTER_HEALTH_CHECK_INTERVAL", default_value = "10", value_parser = common::cli::parse_seconds_or_off)]
    pub health_check_interval: Duration,

    /// Requests that may wait at the router when every node of their model
    /// is at its capacity (`--max-concurrency` on the agent); one more is
    /// answered 429. 0: none wait.
    #[arg(long, env = "LLM_ROUTER_QUEUE_SIZE", default_value_t = 1024)]
    pub queue_size: usize,

    /// Seconds a request may wait in that queue before it is answered 429.
    #[arg(long, env = "LLM_ROUTER_QUEUE_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub queue_timeout: Duration,

    /// Bytes the cache-aware balancer may spend remembering where prompt
    /// prefixes went (about 40 bytes per 256 bytes of prompt; the oldest
    /// are forgotten first).
    #[arg(long, env = "LLM_ROUTER_CACHE_MEMORY", default_value_t = 64 * 1024 * 1024)]
    pub cache_memory: usize,

    /// Seconds to wait for a connection to a node before trying the next.
    #[arg(long, env = "LLM_ROUTER_CONNECT_TIMEOUT", default_value = "5", value_parser = parse_seconds)]
    pub connect_timeout: Duration,

    /// Seconds a node may stay silent, before its answer starts and between chunks.
    #[arg(long, env = "LLM_ROUTER_IDLE_TIMEOUT", default_value = "300", value_parser = parse_seconds)]
    pub idle_timeout: Duration,

    /// Bytes of client request bodies held at once, over every request; past
    /// it a request is answered 503 before its body is read.
    #[arg(long, env = "LLM_ROUTER_MAX_BODY_MEMORY", default_value_t = 1024 * 1024 * 1024)]
    pub max_body_memory: usize,

    /// Seconds an unused connection to a node is kept for the next request.
    #[arg(long, env = "LLM_ROUTER_NODE_KEEPALIVE", default_value = "60", value_parser = parse_seconds)]
    pub node_keepalive: Duration,

    /// Unused connections to nodes kept open, at most, over the whole router.
    #[arg(
        long,
        env = "LLM_ROUTER_MAX_IDLE_NODE_CONNECTIONS",
        default_value_t = 1024
    )]
    pub max_idle_node_connections: usize,

    /// Nodes tried for one request before the client gets an error.
    #[arg(long, env = "LLM_ROUTER_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_attempts: u16,

    /// Log lines as text for people, or JSON for log pipelines.
    #[arg(
        long,
        env = "LLM_ROUTER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Event loops serving requests, each on its own thread (0: one per CPU core).
    #[arg(long, env = "LLM_ROUTER_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Largest client request body on the LLM routes, in bytes (chat with images).
    #[arg(long, env = "LLM_ROUTER_MAX_REQUEST_BODY", default_value_t = 100 * 1024 * 1024)]
    pub max_request_body: usize,

    /// Networks nodes may be in, as CIDR, comma-separated (such as
    /// 10.0.0.0/8,fd00::/8) [default: any address a machine can have].
    #[arg(long, env = "LLM_ROUTER_NODE_NETWORKS", value_parser = parse_node_networks)]
    pub node_networks: Option<NodeNetworks>,

    /// Host names clients may reach the router by, comma-separated (such as
    /// router.lan,127.0.0.1); a request naming another is refused (421),
    /// which defeats DNS rebinding [default: any].
    #[arg(long, env = "LLM_ROUTER_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Client connections open at once, at most; past it a new connection is
    /// answered 503 and closed [default 0: half the file descriptor limit].
    #[arg(long, env = "LLM_ROUTER_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Client connections from one address, at most [default 0: a quarter
    /// of --max-connections].
    #[arg(
        long,
        env = "LLM_ROUTER_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 0
    )]
    pub max_connections_per_client: usize,

    /// Require the admin token or an API key to list agents, read /metrics
    /// and the dashboard's data (they show every node's address).
    #[arg(long, env = "LLM_ROUTER_PROTECT_LISTINGS")]
    pub protect_listings: bool,

    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, env = "LLM_ROUTER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "LLM_ROUTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// A PEM file of CA certificates to trust for nodes that speak HTTPS,
    /// besides the system's.
    #[arg(long, env = "LLM_ROUTER_NODE_CA_CERT")]
    pub node_ca_cert: Option<PathBuf>,

    /// Most agents the registry holds; registering one more is refused (503).
    #[arg(long, env = "LLM_ROUTER_MAX_AGENTS", default_value_t = 1_000_000)]
    pub max_agents: usize,

    /// Seconds a client may take to send a request's head; also how long an
    /// idle connection is kept (above the agents' 30 s heartbeat interval).
    #[arg(long, env = "LLM_ROUTER_HEADER_READ_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub header_read_timeout: Duration,

    /// Seconds a client may leave its answer unread before the router closes
    /// the connection (and so stops the node's generation).
    #[arg(long, env = "LLM_ROUTER_SEND_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub send_timeout: Duration,

    /// Seconds a client may take to send a request's whole body.
    #[arg(long, env = "LLM_ROUTER_BODY_READ_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub body_read_timeout: Duration,

    /// Join token: when set, registering needs it (Authorization: Bearer),
    /// and each agent then needs the secret its registration returned.
    #[arg(long, env = "LLM_ROUTER_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<Secret>,

    /// A file holding the join token (instead of --agent-token).
    #[arg(
        long,
        env = "LLM_ROUTER_AGENT_TOKEN_FILE",
        conflicts_with = "agent_token"
    )]
    pub agent_token_file: Option<PathBuf>,

    /// Client API keys, comma-separated: when set, the LLM routes need one.
    #[arg(
        long,
        env = "LLM_ROUTER_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<Secret>,

    /// A file of client API keys, one per line (added to --api-keys).
    #[arg(long, env = "LLM_ROUTER_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Admin token: when set, updating, draining and deleting agents need it
    /// (or, with a join token, the agent's own secret).
    #[arg(long, env = "LLM_ROUTER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// A file holding the admin token (instead of --admin-token).
    #[arg(
        long,
        env = "LLM_ROUTER_ADMIN_TOKEN_FILE",
        conflicts_with = "admin_token"
    )]
    pub admin_token_file: Option<PathBuf>,

    /// A PostgreSQL database to keep the registry in, shared by every
    /// router given the same URL: postgres://USER:PASSWORD@HOST:PORT/DB
    /// (sslmode=require, verify-full and sslrootcert=CA-FILE as libpq
    /// reads them). Without it, the data dir's files.
    #[arg(long, env = "LLM_ROUTER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,

    /// A file holding the database URL on its first line (instead of
    /// --database-url), so that its password is not on a command line.
    #[arg(
        long,
        env = "LLM_ROUTER_DATABASE_URL_FILE",
        conflicts_with = "database_url"
    )]
    pub database_url_file: Option<PathBuf>,
}

impl Config {
    /// The data dir: the flag, else `$HOME/.llm-router`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".llm-router")
        })
    }

    /// The address to listen on: `--host` (resolved when it is a name) and `--port`.
    pub fn listen_address(&self) -> anyhow::Result<SocketAddr> {
        resolve_host(&self.host, self.port)
    }

    /// How many event loops serve, the caller's runtime included.
    pub fn serving_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    pub fn proxy_options(&self) -> ProxyOptions {
        ProxyOptions {
            policy: self.balancer.policy(self.cache_memory),
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            max_attempts: usize::from(self.max_attempts),
            node_keepalive: self.node_keepalive,
            max_idle_node_connections: self.max_idle_node_connections,
            queue_size: self.queue_size,
            queue_timeout: self.queue_timeout,
        }
    }

    /// A configuration for tests and embedding: every default as the
    /// binary has it (the same clap definition, the environment included),
    /// then loopback, a free port, one event loop and the given data dir.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        /// The command line with nothing on it.
        #[derive(clap::Parser)]
        #[command(no_binary_name = true)]
        struct Defaults {
            #[command(flatten)]
            config: Config,
        }
        let mut config = <Defaults as clap::Parser>::try_parse_from(std::iter::empty::<String>())
            .map(|defaults| defaults.config)
            .unwrap_or_else(|error| panic!("the router's defaults do not parse here: {error}"));
        config.host = "127.0.0.1".to_owned();
        config.port = 0;
        config.threads = 1;
        config.data_dir = Some(data_dir.into());
        config
    }

    /// The shared database, if one is configured.
    pub fn database(&self) -> anyhow::Result<Option<crate::store::postgres::DatabaseUrl>> {
        use crate::store::postgres::DatabaseUrl;
        Ok(match (&self.database_url, &self.database_url_file) {
            (Some(url), _) => Some(DatabaseUrl::parse(url.expose())?),
            (None, Some(path)) => Some(DatabaseUrl::from_file(path)?),
            (None, None) => None,
        })
    }

    /// The credentials, read from flags, environment and files.
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        let join_token = token_from(self.agent_token.as_ref(), self.agent_token_file.as_deref())?;
        let admin_token = token_from(self.admin_token.as_ref(), self.admin_token_file.as_deref())?;
        let mut api_keys = self.api_keys.clone();
        if let Some(path) = &self.api_keys_file {
            api_keys.extend(auth::read_api_key_file(path)?);
        }
        let credentials = Credentials::new(join_token.as_ref(), &api_keys, admin_token.as_ref());
        if self.protect_listings {
            return credentials.protecting_listings();
        }
        Ok(credentials)
    }
}

/// A token given directly, else read from its file, else none.
fn token_from(
    token: Option<&Secret>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<Secret>> {
    match (token, file) {
        (Some(token), _) => Ok(Some(token.clone())),
        (None, Some(path)) => auth::read_secret_file(path).map(Some),
        (None, None) => Ok(None),
    }
}

/// `--host`: an IP address, or a name to resolve at start.
fn parse_host(text: &str) -> Result<String, String> {
    let host = text.trim().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("give an IP address (0.0.0.0 for every interface) or a host name".to_owned());
    }
    if host.parse::<IpAddr>().is_err()
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(format!("{text:?} is neither an IP address nor a host name"));
    }
    Ok(host.to_owned())
}

/// An IP address as it is, or a host name resolved: its first IPv4 address
/// (what clients that mean `localhost` reach first), else its first IPv6 one.
pub fn resolve_host(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addresses: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|error| anyhow::anyhow!("--host {host}: cannot resolve this name ({error}); give an IP address or a name this machine resolves"))?
        .collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or_else(|| addresses.first())
        .copied()
        .ok_or_else(|| {
            anyhow::anyhow!("--host {host}: the name resolves to no address; give an IP address")
        })
}

/// `--node-networks`, parsed.
#[derive(Debug, Clone, Default)]
pub struct NodeNetworks(pub Vec<ipnet::IpNet>);

fn parse_node_networks(text: &str) -> Result<NodeNetworks, String> {
    crate::node_address::parse_networks(text).map(NodeNetworks)
}

/// `--balancer`, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BalancerChoice {
    /// Each node that has the model in turn.
    RoundRobin,
    /// The node with the fewest requests in flight from this router.
    LeastBusy,
    /// The node that was sent the longest prefix of the prompt (its prompt
    /// cache holds it), if it can take the request now (a free slot, or no
    /// busier than the least busy), else the next node holding a prefix; a
    /// new prompt goes to the least busy.
    CacheAware,
}

impl BalancerChoice {
    /// The balancer's policy of this name. (A method here rather than a
    /// `From` impl, which would belong to the balancer's type and so make
    /// the balancer depend on the command line.)
    pub fn policy(self, cache_memory: usize) -> Policy {
        match self {
            BalancerChoice::RoundRobin => Policy::RoundRobin,
            BalancerChoice::LeastBusy => Policy::LeastBusy,
            BalancerChoice::CacheAware => Policy::CacheAware(CacheAware {
                memory_budget: cache_memory,
                ..CacheAware::default()
            }),
        }
    }
}
