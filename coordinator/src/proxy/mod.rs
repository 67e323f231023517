//! Forwarding a client request to a node: a pooled HTTP client, the
//! failover loop before the first byte, passive health marks, and the
//! answer streamed back as the node produces it.

mod body;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub use body::InFlightGuard;
use body::UpstreamBody;

use crate::balancer::{ApiKind, Balancer, NoRoute, Policy};
use crate::registry::{Candidate, Registry};

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub policy: Policy,
    /// How long to wait for a TCP connection to a node.
    pub connect_timeout: Duration,
    /// How long a node may stay silent: before its answer starts, and
    /// between two chunks of it. A generation has no total limit.
    pub idle_timeout: Duration,
    /// Nodes tried for one request before giving up.
    pub max_attempts: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            policy: Policy::RoundRobin,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            max_attempts: 3,
        }
    }
}

/// Why a request could not be forwarded; the API layer shapes the answer
/// for the route's client (Ollama's or OpenAI's error body).
#[derive(Debug)]
pub enum ProxyError {
    NoRoute(NoRoute),
    /// Every node tried failed before answering.
    AllFailed {
        attempts: usize,
    },
}

pub struct Proxy {
    registry: Arc<Registry>,
    balancer: Balancer,
    client: Client<HttpConnector, Full<Bytes>>,
    options: ProxyOptions,
}

/// Hop-by-hop headers, which belong to one connection and are not passed on.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

impl Proxy {
    pub fn new(registry: Arc<Registry>, options: ProxyOptions) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(options.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Proxy {
            registry,
            balancer: Balancer::new(options.policy),
            client,
            options,
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Sends the request to a node that serves `model` on `api`, failing
    /// over to the next candidate while nothing has reached the client.
    pub async fn forward(
        &self,
        api: ApiKind,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
        model: &str,
    ) -> Result<Response<Body>, ProxyError> {
        let table = self.registry.routing_table();
        let plan = self
            .balancer
            .plan(&table, api, model, self.options.max_attempts)
            .map_err(ProxyError::NoRoute)?;
        drop(table);
        let mut last_server_error = None;
        let attempts = plan.len();
        for candidate in plan {
            match self
                .attempt(&candidate, path_and_query, headers, body.clone())
                .await
            {
                Attempt::Answered(response) => return Ok(response),
                Attempt::ServerError(response) => {
                    self.registry.mark_backend_unreachable(candidate.id);
                    last_server_error = Some(response);
                }
                Attempt::Failed => self.registry.mark_backend_unreachable(candidate.id),
            }
        }
        // Every node failed; a node's own 5xx says more than ours would.
        last_server_error.ok_or(ProxyError::AllFailed { attempts })
    }

    async fn attempt(
        &self,
        candidate: &Candidate,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Attempt {
        let in_flight = InFlightGuard::new(&candidate.in_flight);
        let request = match upstream_request(candidate, path_and_query, headers, body) {
            Ok(request) => request,
            Err(error) => {
                tracing::error!(agent_id = %candidate.id, %error, "Could not build the upstream request.");
                return Attempt::Failed;
            }
        };
        let sent =
            tokio::time::timeout(self.options.idle_timeout, self.client.request(request)).await;
        let response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                tracing::warn!(agent_id = %candidate.id, address = %candidate.address, %error, "Node failed before answering; trying the next.");
                return Attempt::Failed;
            }
            Err(_) => {
                tracing::warn!(agent_id = %candidate.id, address = %candidate.address, "Node timed out before answering; trying the next.");
                return Attempt::Failed;
            }
        };
        let (mut parts, incoming) = response.into_parts();
        for name in &HOP_BY_HOP {
            parts.headers.remove(name);
        }
        let body = Body::new(UpstreamBody::new(
            incoming,
            self.options.idle_timeout,
            in_flight,
        ));
        let response = Response::from_parts(parts, body);
        if response.status().is_server_error() {
            tracing::warn!(agent_id = %candidate.id, status = %response.status(), "Node answered with a server error; trying the next.");
            Attempt::ServerError(response)
        } else {
            Attempt::Answered(response)
        }
    }
}

enum Attempt {
    Answered(Response<Body>),
    ServerError(Response<Body>),
    Failed,
}

fn upstream_request(
    candidate: &Candidate,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, axum::http::Error> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}{path_and_query}", candidate.address));
    if let Some(upstream_headers) = builder.headers_mut() {
        for (name, value) in headers {
            // The router's own credentials and the connection's details stay here.
            if name == header::HOST
                || name == header::CONTENT_LENGTH
                || name == header::AUTHORIZATION
                || HOP_BY_HOP.contains(name)
            {
                continue;
            }
            upstream_headers.append(name, value.clone());
        }
        if !upstream_headers.contains_key(header::CONTENT_TYPE) {
            upstream_headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
        }
    }
    builder.body(Full::new(body))
}

/// Maps a `NoRoute` to its status code.
pub fn no_route_status(no_route: &NoRoute) -> StatusCode {
    match no_route {
        NoRoute::UnknownModel => StatusCode::NOT_FOUND,
        NoRoute::NoNodes | NoRoute::ModelUnavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}
