//! The router's registry API as typed calls.

use std::time::Duration;

use common::{AgentView, DrainResponse, HeartbeatReport, RegisterRequest, RegisterResponse};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("the router does not know this agent")]
    UnknownAgent,
    /// A router always has a registration route; whatever answered 404 to
    /// one is something else, most often the LLM server itself.
    #[error("{url} answered 404 to POST /api/agents/register, so it is not an llm-router: point --router-url (LLM_ROUTER_URL) at the router, not at an LLM server")]
    NotARouter { url: String },
    #[error("the router answered 401: it refused the credential (the join token, or this agent's secret)")]
    Unauthorized,
    /// Registering a name and port the router knows, without its secret.
    #[error("the router refused the registration: {0}")]
    IdentityTaken(String),
    #[error("the router answered {status}: {body}")]
    Rejected {
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("the router is unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
}

pub struct RouterClient {
    /// The routers, in the order given; `current` is the one in use.
    base_urls: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
    http: reqwest::Client,
    /// The join token registration presents, when the router wants one.
    join_token: Option<String>,
}

/// What a registration returns: the id, and the agent's own secret for
/// every later call about it.
pub struct RegistrationAnswer {
    pub id: Uuid,
    pub secret: Option<String>,
}

impl RouterClient {
    /// `ca_certificates`: trusted besides the system's, for a router whose
    /// certificate a private CA (or the router itself) signed.
    pub fn new(
        base_urls: Vec<String>,
        join_token: Option<String>,
        ca_certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> anyhow::Result<Self> {
        let http = crate::http::client(
            Duration::from_secs(10),
            Duration::from_secs(3),
            ca_certificates,
            "the router",
        )?;
        if base_urls.is_empty() {
            anyhow::bail!("--router-url names no router");
        }
        Ok(RouterClient {
            base_urls,
            current: std::sync::atomic::AtomicUsize::new(0),
            http,
            join_token,
        })
    }

    /// The router in use.
    pub fn base_url(&self) -> &str {
        let current = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.base_urls[current % self.base_urls.len()]
    }

    /// After a failed call: a router that cannot be reached, times out or
    /// answers 5xx is left for the next one in the list (which, sharing the
    /// registry, knows this agent already).
    fn fail_over_after<T>(&self, result: Result<T, RouterError>) -> Result<T, RouterError> {
        let leave = match &result {
            Err(RouterError::Unreachable(_)) => true,
            Err(RouterError::Rejected { status, .. }) => status.is_server_error(),
            _ => false,
        };
        if leave && self.base_urls.len() > 1 {
            let from = self.base_url().to_owned();
            self.current
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(from = %from, to = %self.base_url(), "The router does not answer; moving to the next one.");
        }
        result
    }

    pub async fn register(
        &self,
        request: &RegisterRequest,
    ) -> Result<RegistrationAnswer, RouterError> {
        let result = self.try_register(request).await;
        self.fail_over_after(result)
    }

    async fn try_register(
        &self,
        request: &RegisterRequest,
    ) -> Result<RegistrationAnswer, RouterError> {
        let response = with_bearer(
            self.http
                .post(format!("{}/api/agents/register", self.base_url()))
                .json(request),
            self.join_token.as_deref(),
        )
        .send()
        .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(RouterError::NotARouter {
                url: self.base_url().to_owned(),
            });
        }
        let answer: RegisterResponse = check(response).await?.json().await?;
        Ok(RegistrationAnswer {
            id: answer.id,
            secret: answer.agent_secret,
        })
    }

    pub async fn heartbeat(
        &self,
        id: Uuid,
        secret: Option<&str>,
        report: &HeartbeatReport,
    ) -> Result<(), RouterError> {
        let result = self.try_heartbeat(id, secret, report).await;
        self.fail_over_after(result)
    }

    async fn try_heartbeat(
        &self,
        id: Uuid,
        secret: Option<&str>,
        report: &HeartbeatReport,
    ) -> Result<(), RouterError> {
        let response = with_bearer(
            self.http
                .post(format!("{}/api/agents/{id}/heartbeat", self.base_url()))
                .json(report),
            secret,
        )
        .send()
        .await?;
        check(response).await.map(drop)
    }
}

fn with_bearer(request: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

impl RouterClient {
    /// Tells the router this node is leaving: no new requests.
    pub async fn drain(
        &self,
        id: Uuid,
        secret: Option<&str>,
    ) -> Result<DrainResponse, RouterError> {
        let response = with_bearer(
            self.http
                .post(format!("{}/api/agents/{id}/drain", self.base_url())),
            secret,
        )
        .send()
        .await?;
        Ok(check(response).await?.json().await?)
    }

    /// Requests the router has in flight to this node now. The secret reads
    /// its own record when the router protects its listings.
    pub async fn in_flight(&self, id: Uuid, secret: Option<&str>) -> Result<u64, RouterError> {
        let response = with_bearer(
            self.http
                .get(format!("{}/api/agents/{id}", self.base_url())),
            secret,
        )
        .send()
        .await?;
        let view: AgentView = check(response).await?.json().await?;
        Ok(view.in_flight)
    }
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, RouterError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(RouterError::UnknownAgent);
    }
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(RouterError::Unauthorized);
    }
    let body = response.text().await.unwrap_or_default();
    if status == reqwest::StatusCode::CONFLICT {
        let message = serde_json::from_str::<common::ErrorBody>(&body)
            .map(|error| error.error.message)
            .unwrap_or(body);
        return Err(RouterError::IdentityTaken(message));
    }
    Err(RouterError::Rejected { status, body })
}
