//! llm-router-agent: runs beside a node's LLM server, registers it with the
//! router and keeps it alive with heartbeats.

pub mod address;
pub mod config;
mod http;
pub mod identity;
pub mod llm_server;
pub mod router_client;
pub mod run;
pub mod system;

pub use config::AgentConfig;
pub use run::run;
