//! Forwarding a client request to a node: a pooled HTTP client, the
//! failover loop before the first byte, passive health marks, and the
//! answer streamed back as the node produces it.

mod body;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::uri::PathAndQuery;
use axum::http::{header, HeaderMap, HeaderName, Method, Request, Response, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::Full;

use body::UpstreamBody;
pub use body::{InFlightGuard, RequestTiming};
use upstream::UpstreamPool;

use crate::balancer::{ApiKind, Balancer, NoRoute, Policy};
use crate::registry::{Candidate, Registry};
use crate::telemetry;

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
    /// The largest client request body, in bytes (chat with images).
    pub max_request_body: usize,
    /// How long a client may take to send its whole request body.
    pub body_read_timeout: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            policy: Policy::RoundRobin,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            max_attempts: 3,
            max_request_body: 100 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(60),
        }
    }
}

/// One client request for [`Proxy::forward`].
pub struct ForwardRequest<'a> {
    pub api: ApiKind,
    /// The route, as an index into `telemetry::LLM_ROUTES`, for metrics.
    pub route: usize,
    pub path_and_query: &'a PathAndQuery,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    pub model: &'a str,
    /// When the request arrived, for its latency and time to first byte.
    pub started: std::time::Instant,
}

/// An answer from a node, and which node gave it.
pub struct Forwarded {
    pub response: Response<Body>,
    pub node: Arc<str>,
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
    upstream: Arc<UpstreamPool>,
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
        Proxy {
            registry,
            balancer: Balancer::new(options.policy),
            upstream: UpstreamPool::new(options.connect_timeout),
            options,
        }
    }

    pub fn max_request_body(&self) -> usize {
        self.options.max_request_body
    }

    pub fn body_read_timeout(&self) -> Duration {
        self.options.body_read_timeout
    }

    /// Sends the request to a node that serves `model` on `api`, failing
    /// over to the next candidate while nothing has reached the client.
    /// `route` labels the request's metrics; `started` is when it arrived.
    pub async fn forward(&self, request: ForwardRequest<'_>) -> Result<Forwarded, ProxyError> {
        let ForwardRequest {
            api,
            route,
            path_and_query,
            headers,
            body,
            model,
            started,
        } = request;
        let table = self.registry.routing_table();
        let plan = self
            .balancer
            .plan(&table, api, model, self.options.max_attempts)
            .map_err(ProxyError::NoRoute)?;
        drop(table);
        let mut last_server_error = None;
        let attempts = plan.len();
        let timing = RequestTiming { started, route };
        for candidate in plan {
            let answered = match self
                .attempt(&candidate, path_and_query, headers, body.clone(), timing)
                .await
            {
                Attempt::Answered(response) => Some(response),
                Attempt::ServerError(response) => {
                    self.registry.mark_unreachable(candidate.id);
                    last_server_error = Some((response, Arc::clone(&candidate.name)));
                    None
                }
                Attempt::Failed => {
                    self.registry.mark_unreachable(candidate.id);
                    None
                }
            };
            if let Some(response) = answered {
                telemetry::route_histograms(route)
                    .time_to_first_byte
                    .record(started.elapsed());
                return Ok(Forwarded {
                    response,
                    node: Arc::clone(&candidate.name),
                });
            }
            metrics::counter!(
                telemetry::FAILOVERS,
                "route" => telemetry::LLM_ROUTES[route.min(telemetry::LLM_ROUTES.len() - 1)],
                "node" => Arc::clone(&candidate.name),
            )
            .increment(1);
        }
        // Every node failed; a node's own 5xx says more than ours would.
        last_server_error
            .map(|(response, node)| Forwarded { response, node })
            .ok_or(ProxyError::AllFailed { attempts })
    }

    async fn attempt(
        &self,
        candidate: &Candidate,
        path_and_query: &PathAndQuery,
        headers: &HeaderMap,
        body: Bytes,
        timing: RequestTiming,
    ) -> Attempt {
        let in_flight = InFlightGuard::new(&candidate.in_flight);
        let build = || upstream_request(candidate, path_and_query, headers, body.clone());
        let sent = tokio::time::timeout(
            self.options.idle_timeout,
            self.upstream.send(candidate.address, build),
        )
        .await;
        let (response, connection) = match sent {
            Ok(Ok(answer)) => answer,
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
        if parts.headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
            for name in &HOP_BY_HOP {
                parts.headers.remove(name);
            }
        }
        let server_error = parts.status.is_server_error();
        // A 5xx is retried elsewhere; only an answer that stands is timed.
        let timing = (!server_error).then_some(timing);
        let body = Body::new(UpstreamBody::new(
            incoming,
            connection,
            self.options.idle_timeout,
            in_flight,
            timing,
        ));
        let response = Response::from_parts(parts, body);
        if server_error {
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

/// The request as the node gets it: origin-form path, the node's own Host,
/// the client's headers less the router's credentials and hop-by-hop ones.
fn upstream_request(
    candidate: &Candidate,
    path_and_query: &PathAndQuery,
    headers: &HeaderMap,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from(path_and_query.clone());
    let upstream_headers = request.headers_mut();
    upstream_headers.reserve(headers.len() + 1);
    upstream_headers.insert(header::HOST, candidate.host_header.clone());
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
    request
}

/// Maps a `NoRoute` to its status code.
pub fn no_route_status(no_route: &NoRoute) -> StatusCode {
    match no_route {
        NoRoute::UnknownModel => StatusCode::NOT_FOUND,
        NoRoute::NoNodes | NoRoute::ModelUnavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}
