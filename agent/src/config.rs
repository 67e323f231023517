//! The agent's configuration: one clap struct, flags and environment.

use common::cli::parse_seconds;
pub use common::cli::LogFormat;
use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

use crate::address::{parse_server_address, ServerAddress};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "llm-router-agent",
    version,
    about = "Registers this node's LLM server with llm-router and keeps it alive."
)]
pub struct AgentConfig {
    /// The router's base URL; several, comma-separated, for routers that
    /// share one registry: the agent keeps to one and moves to the next
    /// when it stops answering.
    #[arg(
        long,
        env = "LLM_ROUTER_URL",
        default_value = "http://127.0.0.1:8080",
        value_delimiter = ',',
        value_parser = common::url::parse_router_url
    )]
    pub router_url: Vec<String>,

    /// This node's LLM server, written as Ollama's OLLAMA_HOST is (0.0.0.0,
    /// HOST:PORT, http://HOST:PORT) [env: LLM_ROUTER_BACKEND_URL, else
    /// OLLAMA_HOST] [default: 127.0.0.1:11434].
    #[arg(long)]
    pub backend_url: Option<String>,

    /// Seconds between heartbeats (fractions allowed).
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "30", value_parser = parse_seconds)]
    pub heartbeat_interval: Duration,

    /// The name this node registers under [default: the host name].
    #[arg(long, env = "LLM_ROUTER_MACHINE_NAME")]
    pub machine_name: Option<String>,

    /// The address the router should use to reach the LLM server [default: detected].
    #[arg(long, env = "LLM_ROUTER_ADVERTISE_IP")]
    pub advertise_ip: Option<IpAddr>,

    /// Log lines as text for people, or JSON for log pipelines.
    #[arg(
        long,
        env = "LLM_ROUTER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// The router's join token, when it requires one to register.
    #[arg(long, env = "LLM_ROUTER_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// A file holding the join token (instead of --token).
    #[arg(long, env = "LLM_ROUTER_AGENT_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<std::path::PathBuf>,

    /// Seconds to wait on shutdown for the router's requests to this node to finish.
    #[arg(long, env = "LLM_ROUTER_DRAIN_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub drain_timeout: Duration,

    /// Requests this node's LLM server takes at once: the router never
    /// sends it more, and queues the rest. Without it, what the server
    /// says (llama.cpp's slots in `/props`), else no limit.
    #[arg(long, env = "LLM_ROUTER_MAX_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: Option<u32>,

    /// A PEM file of CA certificates to trust for an https:// router, besides
    /// the system's (for a router whose certificate a private CA signed).
    #[arg(long, env = "LLM_ROUTER_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,

    /// Where the agent keeps its secret across restarts [default:
    /// $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/llm-router-agent,
    /// else ~/.local/state/llm-router-agent].
    #[arg(long, env = "LLM_ROUTER_AGENT_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,
}

impl AgentConfig {
    /// The flag, else `LLM_ROUTER_BACKEND_URL`, else `OLLAMA_HOST` (which
    /// Ollama users already set), else Ollama's default; each read the way
    /// Ollama reads `OLLAMA_HOST` (see `address`). Also says where the
    /// value came from and any warning about it.
    pub fn backend_address(&self) -> anyhow::Result<(ServerAddress, String, Option<String>)> {
        let (raw, source) = if let Some(flag) = &self.backend_url {
            (flag.clone(), "--backend-url")
        } else if let Some(value) = non_empty_env("LLM_ROUTER_BACKEND_URL") {
            (value, "LLM_ROUTER_BACKEND_URL")
        } else if let Some(value) = non_empty_env("OLLAMA_HOST") {
            (value, "OLLAMA_HOST")
        } else {
            ("127.0.0.1:11434".to_owned(), "the default")
        };
        let (address, warning) =
            parse_server_address(&raw).map_err(|problem| anyhow::anyhow!("{source}: {problem}"))?;
        Ok((address, format!("{source} ({raw})"), warning))
    }

    /// The join token: the flag or its variable, else the file's text.
    pub fn join_token(&self) -> anyhow::Result<Option<String>> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Some(token.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|error| anyhow::anyhow!("reading {}: {error}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        match token {
            Some(token) if token.is_empty() => anyhow::bail!("the join token must not be empty"),
            token => Ok(token),
        }
    }

    /// The certificates of `--ca-cert`, if given.
    pub fn ca_certificates(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let Some(path) = &self.ca_cert else {
            return Ok(Vec::new());
        };
        let pem = std::fs::read(path)
            .map_err(|error| anyhow::anyhow!("--ca-cert {}: {error}", path.display()))?;
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|error| {
                anyhow::anyhow!(
                    "--ca-cert {}: not PEM certificates: {error}",
                    path.display()
                )
            })?;
        if certificates.is_empty() {
            anyhow::bail!(
                "--ca-cert {}: the file holds no PEM certificate",
                path.display()
            );
        }
        Ok(certificates)
    }

    pub fn state_dir(&self) -> std::path::PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(crate::identity::default_state_dir)
    }

    pub fn router_urls(&self) -> Vec<String> {
        self.router_url.clone()
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::AgentConfig;

    #[test]
    fn router_url_takes_one_router_or_several() {
        let one =
            AgentConfig::try_parse_from(["llm-router-agent", "--router-url", "127.0.0.1:8080"])
                .expect("parses");
        assert_eq!(one.router_urls(), ["http://127.0.0.1:8080"]);
        let several = AgentConfig::try_parse_from([
            "llm-router-agent",
            "--router-url",
            "http://127.0.0.1:8080,https://127.0.0.2:8443/",
        ])
        .expect("parses");
        assert_eq!(
            several.router_urls(),
            ["http://127.0.0.1:8080", "https://127.0.0.2:8443"]
        );
        let error = AgentConfig::try_parse_from([
            "llm-router-agent",
            "--router-url",
            "http://127.0.0.1:8080,http://127.0.0.1:99999",
        ])
        .expect_err("the second is refused");
        assert!(error.to_string().contains("--router-url"), "{error}");
    }
}
