//! Detecting and reading this node's LLM server: Ollama (`/api/version`,
//! `/api/tags`, `/api/ps`) or an OpenAI-compatible server (`/v1/models`,
//! and vLLM's `/version` where there is one).

use std::time::Duration;

use common::BackendKind;
use serde::Deserialize;

/// What a probe of the LLM server found.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    pub kind: BackendKind,
    pub version: String,
    pub models: Vec<String>,
    pub loaded_models: Vec<String>,
    /// Requests the server takes at once, where it says (llama.cpp's
    /// server: `total_slots` in `/props`).
    pub slots: Option<u32>,
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Up(ServerState),
    /// It took the connection but did not answer in time: busy (a server
    /// that answers its model list only between generations, as
    /// llama-cpp-python's does) rather than dead.
    Busy,
    /// Refused, or answered as neither kind.
    Down,
}

pub struct LlmServer {
    base_url: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct OllamaVersion {
    version: String,
}

#[derive(Deserialize)]
struct OllamaModels {
    #[serde(default)]
    models: Vec<OllamaModel>,
}

#[derive(Deserialize)]
struct OllamaModel {
    #[serde(default)]
    name: String,
    #[serde(default)]
    model: String,
}

/// llama.cpp's server: `GET /props`.
#[derive(Deserialize)]
struct LlamaCppProps {
    total_slots: Option<u32>,
}

#[derive(Deserialize)]
struct OpenAiModels {
    #[serde(default)]
    data: Vec<OpenAiModel>,
}

#[derive(Deserialize)]
struct OpenAiModel {
    id: String,
}

impl LlmServer {
    /// `ca_certificates`: trusted besides the system's, for a server over
    /// HTTPS whose certificate a private CA signed.
    pub fn new(
        base_url: String,
        ca_certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> anyhow::Result<Self> {
        let http = crate::http::client(
            Duration::from_secs(5),
            Duration::from_secs(2),
            ca_certificates,
            "the LLM server",
        )?;
        Ok(LlmServer { base_url, http })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Probes the server; `None` when it does not answer as either kind.
    pub async fn probe(&self) -> Option<ServerState> {
        match self.check().await {
            Probe::Up(state) => Some(state),
            Probe::Busy | Probe::Down => None,
        }
    }

    /// Probes the server, telling a busy one from a dead one.
    pub async fn check(&self) -> Probe {
        let busy = |error: &reqwest::Error| error.is_timeout() && !error.is_connect();
        let version = self.get_json::<OllamaVersion>("/api/version").await;
        if let Err(error) = &version {
            if busy(error) {
                return Probe::Busy;
            }
        }
        if let Ok(version) = version {
            let models = self
                .get_json::<OllamaModels>("/api/tags")
                .await
                .map(|list| names(list.models))
                .unwrap_or_default();
            let loaded_models = self
                .get_json::<OllamaModels>("/api/ps")
                .await
                .map(|list| names(list.models))
                .unwrap_or_default();
            return Probe::Up(ServerState {
                kind: BackendKind::Ollama,
                version: version.version,
                models,
                loaded_models,
                slots: None,
            });
        }
        let models = match self.get_json::<OpenAiModels>("/v1/models").await {
            Ok(models) => models,
            Err(error) if busy(&error) => return Probe::Busy,
            Err(_) => return Probe::Down,
        };
        let version = self
            .get_json::<OllamaVersion>("/version")
            .await
            .map(|v| v.version)
            .unwrap_or_else(|_| "openai-compatible".to_owned());
        let models: Vec<String> = models.data.into_iter().map(|m| m.id).collect();
        let slots = self
            .get_json::<LlamaCppProps>("/props")
            .await
            .ok()
            .and_then(|props| props.total_slots)
            .filter(|slots| *slots > 0);
        Probe::Up(ServerState {
            slots,
            kind: BackendKind::OpenAi,
            version,
            // An OpenAI-compatible server holds what it lists in memory.
            loaded_models: models.clone(),
            models,
        })
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
    ) -> Result<T, reqwest::Error> {
        self.http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }
}

fn names(models: Vec<OllamaModel>) -> Vec<String> {
    models
        .into_iter()
        .map(|m| if m.name.is_empty() { m.model } else { m.name })
        .filter(|name| !name.is_empty())
        .collect()
}
