//! The `llm-router` command line: the bare command serves; `agents` and
//! `status` talk to a running router over its HTTP API, as tables for
//! people or `--json` for scripts.

use std::fmt::Write as _;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use common::{AgentStatus, AgentView, ErrorBody, NodeState};

use crate::Config;

#[derive(Debug, Parser)]
#[command(
    name = "llm-router",
    version,
    about = "One endpoint in front of a fleet of LLM servers. Without a command, serves.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(flatten)]
    pub serve: Config,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List, show or remove the agents of a running router.
    Agents {
        #[command(subcommand)]
        action: AgentsAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Whether a running router answers, its agents by status, and the
    /// routers that share its registry.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Copy a data dir's registry (snapshot and journal) into a database,
    /// keeping ids and secrets' hashes. Stop the router on that data dir
    /// first. Running it again changes nothing.
    Migrate {
        /// The data dir to copy from.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// The database to copy into (as the router's --database-url).
        #[arg(long, env = "LLM_ROUTER_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsAction {
    /// Every agent, oldest first (read from the router a page at a time).
    List {
        /// Only the first this many agents.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// One agent, with everything the router knows of it.
    Show { id: String },
    /// Forget an agent (it registers again, with a new id, if it is alive).
    Remove { id: String },
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The running router.
    #[arg(
        long,
        global = true,
        env = "LLM_ROUTER_URL",
        default_value = "http://127.0.0.1:8080",
        value_parser = common::url::parse_router_url
    )]
    pub router_url: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// The router's admin token, for `agents remove` when it requires one,
    /// and for every command when the router protects its listings.
    /// (Named apart from the server's `--admin-token`, a different argument.)
    #[arg(
        long,
        global = true,
        env = "LLM_ROUTER_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A PEM file of CA certificates to trust for an https:// router,
    /// besides the system's.
    #[arg(long, global = true, env = "LLM_ROUTER_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// Runs one command against a running router, printing to stdout.
pub async fn run_command(command: Command) -> anyhow::Result<()> {
    let output = match command {
        Command::Agents { action, client } => {
            let api = Api::new(
                &client.router_url,
                client.token.clone(),
                client.ca_cert.as_deref(),
            )?;
            let output = match action {
                AgentsAction::List { limit } => {
                    let agents = api.list_agents(limit.map(|limit| limit as usize)).await?;
                    if client.json {
                        serde_json::to_string_pretty(&agents)?
                    } else {
                        agents_table(&agents)
                    }
                }
                AgentsAction::Show { id } => {
                    let agent: serde_json::Value =
                        api.get_json(&format!("/api/agents/{id}")).await?;
                    serde_json::to_string_pretty(&agent)?
                }
                AgentsAction::Remove { id } => {
                    api.delete(&format!("/api/agents/{id}")).await?;
                    if client.json {
                        serde_json::json!({ "removed": id }).to_string()
                    } else {
                        format!("removed {id}")
                    }
                }
            };
            output
        }
        Command::Status { client } => {
            let api = Api::new(
                &client.router_url,
                client.token.clone(),
                client.ca_cert.as_deref(),
            )?;
            let agents = api.list_agents(None).await?;
            let routers: Option<common::RouterList> = api.get_json("/api/routers").await.ok();
            let status = Summary::of(&agents);
            if client.json {
                let mut json = status.to_json();
                json["routers"] = serde_json::to_value(&routers)?;
                serde_json::to_string_pretty(&json)?
            } else {
                let mut text = status.to_text(&client.router_url);
                if let Some(routers) = &routers {
                    text.push_str(&routers_text(routers));
                }
                text
            }
        }
        Command::Migrate {
            data_dir,
            database_url,
        } => migrate(&data_dir, &database_url).await?,
    };
    println!("{output}");
    Ok(())
}

/// `llm-router migrate`: the data dir is opened as a router would open
/// it (its lock taken, the journal replayed), then copied in.
async fn migrate(data_dir: &std::path::Path, database_url: &str) -> anyhow::Result<String> {
    let url = crate::store::postgres::DatabaseUrl::parse(database_url)?;
    if !data_dir.is_dir() {
        bail!(
            "--data-dir {}: no such directory; give the data dir of the router to copy from",
            data_dir.display()
        );
    }
    let (store, writer, agents, _report) = crate::store::open(crate::store::StoreOptions {
        data_dir: data_dir.to_path_buf(),
        snapshot_interval: std::time::Duration::from_secs(3600),
        snapshot_when_quiet: std::time::Duration::ZERO,
    })?;
    let copied = crate::store::postgres::copy_in(&url, &agents).await;
    drop(store);
    writer.join();
    let (copied, already, refused) = copied?;
    let mut text = format!(
        "copied {copied} agents from {} into {url}; {already} were there already",
        data_dir.display()
    );
    for id in refused {
        let _ = write!(
            text,
            "\nnot copied: agent {id}, whose machine and port another agent holds in the database"
        );
    }
    Ok(text)
}

fn routers_text(list: &common::RouterList) -> String {
    let alive = list.routers.iter().filter(|r| r.alive).count();
    let mut text = format!(
        "\nrouters:   {alive} alive of {} ({}{})",
        list.routers.len(),
        list.store,
        if list.database_reachable {
            ""
        } else {
            ", database unreachable"
        }
    );
    for router in &list.routers {
        let _ = write!(
            text,
            "\n  {} {} v{} started {} last seen {}{}",
            if router.alive { "alive" } else { "gone " },
            router.address,
            router.version,
            router.started_at.format("%Y-%m-%d %H:%M:%S"),
            router.last_seen.format("%H:%M:%S"),
            if router.this_router {
                " (this one)"
            } else {
                ""
            }
        );
    }
    text
}

struct Api {
    base: String,
    http: reqwest::Client,
    admin_token: Option<String>,
}

impl Api {
    fn new(
        base: &str,
        admin_token: Option<String>,
        ca_cert: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let mut http = reqwest::Client::builder();
        if let Some(path) = ca_cert {
            let pem =
                std::fs::read(path).with_context(|| format!("--ca-cert {}", path.display()))?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("--ca-cert {}: not PEM certificates", path.display()))?
            {
                http = http.add_root_certificate(certificate);
            }
        }
        Ok(Api {
            base: base.trim_end_matches('/').to_owned(),
            http: http.build().context("setting up HTTPS")?,
            admin_token,
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self
            .send(self.http.get(format!("{}{path}", self.base)))
            .await?;
        Ok(response.json().await?)
    }

    /// The agents, oldest first, read a page at a time (so that the router
    /// never builds more than one page): all of them, or the first `limit`.
    async fn list_agents(&self, limit: Option<usize>) -> anyhow::Result<Vec<AgentView>> {
        let mut agents: Vec<AgentView> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let wanted = limit.map_or(CLI_PAGE, |limit| (limit - agents.len()).min(CLI_PAGE));
            let mut path = format!("/api/agents?limit={wanted}");
            if let Some(cursor) = &after {
                path.push_str("&after=");
                path.push_str(cursor);
            }
            let response = self
                .send(self.http.get(format!("{}{path}", self.base)))
                .await?;
            after = response
                .headers()
                .get("x-next-cursor")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let page: Vec<AgentView> = response.json().await?;
            agents.extend(page);
            if after.is_none() || limit.is_some_and(|limit| agents.len() >= limit) {
                return Ok(agents);
            }
        }
    }

    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await?;
        Ok(())
    }

    /// Sends, and turns an error answer into its message.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let request = match &self.admin_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the router at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let message =
            serde_json::from_str::<ErrorBody>(&text).map_or(text, |body| body.error.message);
        bail!("the router answered {status}: {message}")
    }
}

/// Agents as a table; times as given (RFC 3339, UTC).
/// Agents per request of `agents list` and `status`.
const CLI_PAGE: usize = 1_000;

fn agents_table(agents: &[AgentView]) -> String {
    let header = [
        "ID",
        "NAME",
        "ADDRESS",
        "STATUS",
        "STATE",
        "LAST SEEN",
        "IN FLIGHT",
        "MODELS",
    ];
    let rows: Vec<[String; 8]> = agents
        .iter()
        .map(|view| {
            let agent = &view.agent;
            let status = match agent.status {
                AgentStatus::Online => "Online",
                AgentStatus::Offline => "Offline",
            };
            let models = agent
                .report
                .models
                .as_ref()
                .unwrap_or(&agent.models)
                .join(",");
            [
                agent.id.to_string(),
                agent.machine_name.clone(),
                format!("{}:{}", agent.ip_address, agent.port),
                status.to_owned(),
                view.state.to_string(),
                agent
                    .last_seen
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                view.in_flight.to_string(),
                models,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out.trim_end().to_owned()
}

/// Counts for `status`.
struct Summary {
    total: usize,
    online: usize,
    offline: usize,
    routable: usize,
    /// Agents in each state, in the order of `NodeState::ALL`.
    by_state: Vec<(NodeState, usize)>,
    in_flight: u64,
    models: Vec<String>,
}

impl Summary {
    fn of(agents: &[AgentView]) -> Self {
        let mut models: Vec<String> = agents
            .iter()
            .filter(|view| view.routable)
            .flat_map(|view| {
                view.agent
                    .report
                    .models
                    .clone()
                    .unwrap_or_else(|| view.agent.models.clone())
            })
            .collect();
        models.sort();
        models.dedup();
        Summary {
            total: agents.len(),
            online: agents
                .iter()
                .filter(|v| v.agent.status == AgentStatus::Online)
                .count(),
            offline: agents
                .iter()
                .filter(|v| v.agent.status == AgentStatus::Offline)
                .count(),
            routable: agents.iter().filter(|v| v.routable).count(),
            by_state: NodeState::ALL
                .iter()
                .map(|state| (*state, agents.iter().filter(|v| v.state == *state).count()))
                .collect(),
            in_flight: agents.iter().map(|v| v.in_flight).sum(),
            models,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let by_state: serde_json::Map<String, serde_json::Value> = self
            .by_state
            .iter()
            .map(|(state, count)| (state.to_string(), serde_json::json!(count)))
            .collect();
        serde_json::json!({
            "healthy": true,
            "agents": {"total": self.total, "online": self.online, "offline": self.offline, "routable": self.routable, "by_state": by_state},
            "requests_in_flight": self.in_flight,
            "models": self.models,
        })
    }

    fn to_text(&self, url: &str) -> String {
        let states: Vec<String> = self
            .by_state
            .iter()
            .filter(|(_, count)| *count > 0)
            .map(|(state, count)| format!("{count} {state}"))
            .collect();
        format!(
            "router:    {url} (answering)\nagents:    {} ({} Online, {} Offline)\nstates:    {}\nin flight: {}\nmodels:    {}",
            self.total,
            self.online,
            self.offline,
            if states.is_empty() { "none".to_owned() } else { states.join(", ") },
            self.in_flight,
            if self.models.is_empty() { "none".to_owned() } else { self.models.join(", ") }
        )
    }
}
