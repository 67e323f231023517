//! Forwarding a client request to a node: a pooled HTTP client, the
//! failover loop before the first byte, passive health marks, and the
//! answer streamed back as the node produces it.

mod body;
pub mod queue;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::uri::PathAndQuery;
use axum::http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use bytes::Bytes;
use http_body_util::Full;

pub use body::InFlightGuard;
use body::UpstreamBody;
use upstream::UpstreamPool;

use crate::balancer::Candidate;
use crate::balancer::{ApiKind, Balancer, NoRoute, Policy};
use crate::registry::Registry;
use crate::telemetry::RequestAccount;

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
    /// How long an unused node connection is kept.
    pub node_keepalive: Duration,
    /// Unused node connections kept, at most, over the whole process.
    pub max_idle_node_connections: usize,
    /// Requests that may wait for a node at capacity (`--queue-size`).
    pub queue_size: usize,
    /// How long one may wait (`--queue-timeout`).
    pub queue_timeout: Duration,
}

/// One client request for [`Proxy::forward`].
pub struct ForwardRequest<'a> {
    pub api: ApiKind,
    pub path_and_query: &'a PathAndQuery,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    /// The prompt's block hashes, when the balancer routes on them.
    pub prompt: Option<crate::balancer::prefix::PromptKey>,
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
    /// Every node of the model is at capacity and the queue is full, or
    /// the wait ran past `--queue-timeout`.
    Queue(queue::QueueRefusal),
}

pub struct Proxy {
    registry: Arc<Registry>,
    balancer: Balancer,
    queue: Arc<queue::WaitQueue>,
    upstream: Arc<UpstreamPool>,
    options: ProxyOptions,
    /// This router's name in `Via` (RFC 9110, section 7.6.3): random per
    /// process, so that a request that comes back to the router that sent
    /// it (a node whose address leads to this router, directly or through
    /// other routers) is recognised and refused instead of looping.
    via_name: String,
    /// `1.1 <via_name>`, the value added to every forwarded request.
    via: HeaderValue,
}

/// Named, because `HOP_BY_HOP.len()` is not a constant: `HeaderName` has a
/// destructor, which a constant expression cannot run.
const HOP_BY_HOP_COUNT: usize = 8;

/// Hop-by-hop headers, which belong to one connection and are not passed on
/// (RFC 9110, section 7.6.1), beside those the `Connection` header names.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

impl Proxy {
    /// `node_tls`: how nodes that speak HTTPS are checked
    /// ([`crate::tls::node_client_config`]).
    pub fn new(
        registry: Arc<Registry>,
        options: ProxyOptions,
        node_tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        let via_name = format!("llm-router-{:016x}", rand::random::<u64>());
        let via = HeaderValue::try_from(format!("1.1 {via_name}"))
            .unwrap_or_else(|_| HeaderValue::from_static("1.1 llm-router"));
        Proxy {
            via_name,
            via,
            registry,
            balancer: Balancer::new(options.policy),
            queue: Arc::new(queue::WaitQueue::new(
                options.queue_size,
                options.queue_timeout,
            )),
            upstream: UpstreamPool::new(
                options.connect_timeout,
                options.node_keepalive,
                options.max_idle_node_connections,
                tokio_rustls::TlsConnector::from(node_tls),
            ),
            options,
        }
    }

    /// Whether this request has been through this very router already: its
    /// `Via` names us. Forwarding it again would make a loop.
    pub fn already_forwarded(&self, headers: &HeaderMap) -> bool {
        headers.get_all(header::VIA).iter().any(|value| {
            value.to_str().is_ok_and(|text| {
                text.split(',')
                    .any(|hop| hop.split_whitespace().nth(1) == Some(self.via_name.as_str()))
            })
        })
    }

    /// Closes this thread's idle node connections that are too old, closed by
    /// their node, or to an address no routable node has now (removed,
    /// moved, out of rotation). Each event loop calls it every second.
    pub fn prune_idle_connections(&self) {
        if !self.upstream.has_idle_on_this_thread() {
            return;
        }
        let table = self.registry.routing_table();
        let addresses: std::collections::HashSet<SocketAddr> = table
            .candidates()
            .iter()
            .map(|candidate| candidate.address)
            .collect();
        self.upstream.prune(|address| addresses.contains(&address));
    }

    /// Whether requests should bring their prompt's key (cache-aware).
    pub fn wants_prompt(&self) -> bool {
        self.balancer.wants_prompt()
    }

    /// Idle node connections now, over every thread.
    pub fn idle_node_connections(&self) -> usize {
        self.upstream.idle_connections()
    }

    /// Sends the request to a node that serves `model` on `api`, failing
    /// over to the next candidate while nothing has reached the client. The
    /// request's account goes with the answer's body, where it is recorded;
    /// when there is no answer it comes back with the error.
    pub async fn forward(
        &self,
        request: ForwardRequest<'_>,
        mut account: RequestAccount,
    ) -> Result<Response<Body>, (ProxyError, RequestAccount)> {
        let api = request.api;
        let deadline = tokio::time::Instant::now() + self.queue.timeout;
        // Set once this request has waited and been given its turn.
        let mut had_turn = false;
        loop {
            // A new request queues behind those already waiting for its
            // model, so that a freed slot goes to the first in line.
            let behind_others = !had_turn && self.queue.has_waiters_for(account.model(), api);
            if !behind_others {
                let mut tried = self
                    .try_plan(&request, account, self.options.max_attempts)
                    .await;
                if let Tried::AllAtCapacity(returned) = tried {
                    // The first few were full: look at every node before waiting.
                    tried = self.try_plan(&request, returned, usize::MAX).await;
                }
                match tried {
                    Tried::Done(result) => return result,
                    Tried::AllAtCapacity(returned) => account = returned,
                }
            }
            // Every node that can take it is at its capacity: wait for a slot.
            let mut ticket = match self.queue.enter(account.model(), api, had_turn) {
                Ok(ticket) => ticket,
                Err(refusal) => return Err((ProxyError::Queue(refusal), account)),
            };
            // A slot freed between the last look and joining the queue was
            // given to nobody: give it now (to the first in line).
            self.offer_free_slots(api, account.model());
            if let Err(refusal) = ticket.turn(deadline).await {
                return Err((ProxyError::Queue(refusal), account));
            }
            had_turn = true;
        }
    }

    /// Wakes a waiter for each node of the model that has a free slot now.
    fn offer_free_slots(&self, api: ApiKind, model: &str) {
        let table = self.registry.routing_table();
        if let Ok(plan) = self.balancer.plan(&table, api, model, None, usize::MAX) {
            for node in plan {
                if node.capacity > 0
                    && node.in_flight.load(std::sync::atomic::Ordering::SeqCst) < node.capacity
                {
                    self.queue.slot_freed(&node);
                }
            }
        }
    }

    /// One pass over a plan of at most `max_attempts` nodes, skipping those
    /// at capacity. Nodes that fail are marked and the next is tried.
    async fn try_plan(
        &self,
        request: &ForwardRequest<'_>,
        mut account: RequestAccount,
        max_attempts: usize,
    ) -> Tried {
        let ForwardRequest {
            api,
            path_and_query,
            headers,
            body,
            prompt,
        } = request;
        let plan = {
            let table = self.registry.routing_table();
            match self
                .balancer
                .plan(&table, *api, account.model(), prompt.as_ref(), max_attempts)
            {
                Ok(plan) => plan,
                Err(no_route) => return Tried::Done(Err((ProxyError::NoRoute(no_route), account))),
            }
        };
        // Boxed: it is rare, and a KB inline would be carried by every request.
        let mut last_server_error: Option<
            Box<(axum::http::response::Parts, UpstreamBody, Arc<Candidate>)>,
        > = None;
        let mut attempts = 0;
        for candidate in &plan {
            if attempts >= self.options.max_attempts {
                break;
            }
            let Some(in_flight) = InFlightGuard::reserve(candidate, &self.queue) else {
                continue;
            };
            attempts += 1;
            match self
                .attempt(candidate, in_flight, path_and_query, headers, body.clone())
                .await
            {
                Attempt::Answered(parts, body) => {
                    account.answered_by(&candidate.traffic, parts.status.as_u16());
                    return Tried::Done(Ok(Response::from_parts(
                        parts,
                        Body::new(body.with_account(account)),
                    )));
                }
                Attempt::ServerError(parts, body) => {
                    self.registry.mark_unreachable(candidate.id);
                    last_server_error = Some(Box::new((parts, body, Arc::clone(candidate))));
                }
                Attempt::Failed => self.registry.mark_unreachable(candidate.id),
            }
            candidate.traffic.count_failover(account.route());
        }
        if attempts == 0 {
            return Tried::AllAtCapacity(account);
        }
        // Every node failed; a node's own 5xx says more than ours would.
        Tried::Done(match last_server_error.map(|boxed| *boxed) {
            Some((parts, body, candidate)) => {
                account.answered_by(&candidate.traffic, parts.status.as_u16());
                Ok(Response::from_parts(
                    parts,
                    Body::new(body.with_account(account)),
                ))
            }
            None => Err((ProxyError::AllFailed { attempts }, account)),
        })
    }

    async fn attempt(
        &self,
        candidate: &Candidate,
        in_flight: InFlightGuard,
        path_and_query: &PathAndQuery,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Attempt {
        let build =
            || upstream_request(candidate, path_and_query, headers, body.clone(), &self.via);
        // Boxed: the exchange's state is 3.4 KB, and inline it would be part
        // of every future from here up to the handler's, each of which is
        // moved whole when it is awaited (and the handler's when axum boxes
        // it). With the pooled connection boxed too, the router's copying
        // fell from 7,600 to 3,300 instructions per request (callgrind).
        let exchange = Box::pin(self.upstream.send(
            upstream::NodeEndpoint {
                address: candidate.address,
                tls: candidate.tls,
            },
            build,
        ));
        let sent = tokio::time::timeout(self.options.idle_timeout, exchange).await;
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
        // Usually `Connection` alone is there: remove the names present
        // rather than looking all eight up.
        let mut present = [false; HOP_BY_HOP_COUNT];
        for name in parts.headers.keys() {
            if let Some(index) = HOP_BY_HOP.iter().position(|hop| hop == name) {
                present[index] = true;
            }
        }
        for (name, _) in HOP_BY_HOP
            .iter()
            .zip(present)
            .filter(|(_, present)| *present)
        {
            parts.headers.remove(name);
        }
        let body = UpstreamBody::new(incoming, connection, self.options.idle_timeout, in_flight);
        if parts.status.is_server_error() {
            tracing::warn!(agent_id = %candidate.id, status = %parts.status, "Node answered with a server error; trying the next.");
            Attempt::ServerError(parts, body)
        } else {
            Attempt::Answered(parts, body)
        }
    }
}

/// What one pass over a plan came to.
enum Tried {
    Done(Result<Response<Body>, (ProxyError, RequestAccount)>),
    /// Every node in the plan was at its capacity; nothing was tried.
    AllAtCapacity(RequestAccount),
}

enum Attempt {
    Answered(axum::http::response::Parts, UpstreamBody),
    ServerError(axum::http::response::Parts, UpstreamBody),
    Failed,
}

/// The request as the node gets it: origin-form path, the node's own Host,
/// the client's headers less the router's credentials and hop-by-hop ones.
fn upstream_request(
    candidate: &Candidate,
    path_and_query: &PathAndQuery,
    headers: &HeaderMap,
    body: Bytes,
    via: &HeaderValue,
) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from(path_and_query.clone());
    let upstream_headers = request.headers_mut();
    upstream_headers.reserve(headers.len() + 2);
    upstream_headers.insert(header::HOST, candidate.host_header.clone());
    // Headers the client's `Connection` names belong to its connection too.
    let named_by_connection = |name: &HeaderName| {
        headers.get_all(header::CONNECTION).iter().any(|value| {
            value.to_str().is_ok_and(|text| {
                text.split(',')
                    .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
            })
        })
    };
    let has_connection_header = headers.contains_key(header::CONNECTION);
    for (name, value) in headers {
        // The router's own credentials and the connection's details stay here.
        if name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::AUTHORIZATION
            || HOP_BY_HOP.contains(name)
            || (has_connection_header && named_by_connection(name))
        {
            continue;
        }
        upstream_headers.append(name, value.clone());
    }
    upstream_headers.append(header::VIA, via.clone());
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
