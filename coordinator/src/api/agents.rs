//! The registry endpoints: register, list, show, heartbeat, update, delete.
//! Handlers are thin: validate, call the registry, shape the answer.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use common::{Agent, AgentView, DrainResponse, ErrorBody};
use common::{AgentStatus, HeartbeatReport, RegisterRequest, RegisterResponse, UpdateAgentRequest};
use serde::Deserialize;

use super::error::ApiError;
use super::guard::{
    AuthorizedAgent, JoinAllowed, ListingAllowed, RecordReadable, SelfOnly, SelfOrAdmin,
};
use super::json::{AgentIdParam, JsonBody, OptionalJsonBody};
use crate::auth::{Credentials, JoinAccess, TokenDigest};
use crate::fields::{check_models, check_system_info, check_text};
use crate::node_address::NodeAddressPolicy;
use crate::record::ReportUpdate;
use crate::registry::{
    AgentUpdate, IdentityProof, ListCursor, RegisterOutcome, Registration, Registry,
};

/// Register a machine, or register a known one again (same id).
#[utoipa::path(post, path = "/api/agents/register", tag = "registry",
    request_body = RegisterRequest,
    security((), ("join_token" = [])),
    responses(
        (status = 201, description = "A new machine: its id and secret", body = RegisterResponse),
        (status = 200, description = "A known machine (same name and port), with its secret: same id", body = RegisterResponse),
        (status = 400, description = "Not JSON, or an empty body", body = ErrorBody),
        (status = 401, description = "The join token is missing or wrong", body = ErrorBody),
        (status = 403, description = "Another kind of credential", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 409, description = "A known machine, without its agent's secret", body = ErrorBody),
        (status = 413, description = "The body is over 32 KiB", body = ErrorBody),
        (status = 422, description = "A missing or invalid field", body = ErrorBody),
        (status = 503, description = "The store cannot write, or the agent limit is reached", body = ErrorBody),
    ))]
pub async fn register(
    State(registry): State<Arc<Registry>>,
    State(credentials): State<Arc<Credentials>>,
    State(node_addresses): State<Arc<NodeAddressPolicy>>,
    JoinAllowed(access): JoinAllowed,
    JsonBody(request): JsonBody<RegisterRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let presented_secret = request
        .agent_secret
        .as_deref()
        .map(|secret| TokenDigest::of(secret.as_bytes()));
    let registration = validate_registration(request, &node_addresses)?;
    let proof = match access {
        JoinAccess::Admin => IdentityProof::Admin,
        // A secret means something only when agents must present one.
        JoinAccess::Joined if credentials.agents_have_secrets() => {
            IdentityProof::AgentSecret(presented_secret)
        }
        JoinAccess::Joined => IdentityProof::Open,
    };
    let (id, outcome, secret) = registry.register(registration, proof).await?;
    let status = match outcome {
        RegisterOutcome::Created => StatusCode::CREATED,
        RegisterOutcome::Refreshed => StatusCode::OK,
    };
    Ok((
        status,
        Json(RegisterResponse {
            id,
            status: "registered".to_owned(),
            agent_secret: secret.map(|secret| secret.expose().to_owned()),
        }),
    ))
}

/// The routers sharing this registry: with a database, every router whose
/// heartbeat row is less than an hour old (`alive` when under 10 s); with
/// the data files, this router alone.
#[utoipa::path(get, path = "/api/routers", tag = "registry",
    responses((status = 200, description = "The routers", body = common::RouterList)))]
pub async fn routers(
    State(roster): State<Arc<crate::store::RouterRoster>>,
    _: ListingAllowed,
) -> Json<common::RouterList> {
    let this = roster.this_router();
    Json(common::RouterList {
        store: if roster.is_shared() {
            "postgres"
        } else {
            "files"
        }
        .to_owned(),
        database_reachable: roster.database_reachable(),
        routers: roster
            .list()
            .into_iter()
            .map(|row| common::RouterView {
                this_router: row.id == this,
                id: row.id,
                address: row.address,
                version: row.version,
                started_at: row.started_at,
                last_seen: row.last_seen,
                alive: row.alive,
            })
            .collect(),
    })
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// A listing's query, checked.
struct ListRequest {
    status: Option<AgentStatus>,
    after: Option<ListCursor>,
    /// A page's size; `None` for the whole listing, streamed.
    limit: Option<usize>,
}

impl ListQuery {
    fn validate(self) -> Result<ListRequest, ApiError> {
        let status = match self
            .status
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => None,
            Some("online") => Some(AgentStatus::Online),
            Some("offline") => Some(AgentStatus::Offline),
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("status must be Online or Offline, not {other:?}"),
                ))
            }
        };
        let after = match self.after.as_deref() {
            None => None,
            Some(text) => Some(ListCursor::decode(text).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_cursor",
                    format!("after={text:?} is not a cursor this router gave; start again without `after`"),
                )
            })?),
        };
        let limit = match self.limit.as_deref() {
            None => None,
            Some(text) => match text.parse::<usize>() {
                Ok(limit @ 1..=MAX_PAGE) => Some(limit),
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!("limit must be a whole number from 1 to {MAX_PAGE}, not {text:?}"),
                    ))
                }
            },
        };
        Ok(ListRequest {
            status,
            after,
            limit,
        })
    }
}

/// The most agents one page may hold: a page is built in memory before it
/// is sent (its `Link` must precede it), the whole listing never is.
pub const MAX_PAGE: usize = 10_000;

/// Agents serialised per chunk of a streamed listing.
const CHUNK_AGENTS: usize = 256;

/// Every agent, or those of one status, oldest registration first; all at
/// once (streamed), or a page at a time with `limit` and `after`.
#[utoipa::path(get, path = "/api/agents", tag = "registry",
    params(
        ("status" = Option<String>, Query, description = "Online or Offline (any case)"),
        ("limit" = Option<u32>, Query, description = "At most this many agents (1 to 10000); without it, every agent, streamed"),
        ("after" = Option<String>, Query, description = "The cursor a previous page's `Link` (or `X-Next-Cursor`) gave: the page starts after it"),
    ),
    responses(
        (status = 200, description = "The agents. When another page follows, `Link` names it (rel=\"next\") and `X-Next-Cursor` holds its cursor; the last page has neither", body = Vec<AgentView>,
            headers(
                ("Link" = String, description = "`</api/agents?limit=N&after=CURSOR>; rel=\"next\"` when more agents follow"),
                ("X-Next-Cursor" = String, description = "The cursor for `after`, when more agents follow"),
            )),
        (status = 400, description = "An unknown status, a limit out of range, or a cursor this router did not give", body = ErrorBody),
    ))]
pub async fn list(
    State(registry): State<Arc<Registry>>,
    _: ListingAllowed,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))?;
    let ListRequest {
        status,
        after,
        limit,
    } = query.validate()?;
    let json = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    let Some(limit) = limit else {
        return Ok((
            json,
            Body::new(StreamedListing::new(registry, status, after)),
        )
            .into_response());
    };
    let page = registry.list_page(status, after, limit);
    let mut response = (json, Json(page.agents)).into_response();
    if let Some(next) = page.next {
        let cursor = next.encode();
        let mut link = format!("</api/agents?limit={limit}&after={cursor}");
        if let Some(status) = status {
            link.push_str(&format!("&status={status:?}"));
        }
        link.push_str(">; rel=\"next\"");
        let headers = response.headers_mut();
        // Both are plain ASCII: digits, hex and the fixed text above.
        if let (Ok(link), Ok(cursor)) =
            (HeaderValue::from_str(&link), HeaderValue::from_str(&cursor))
        {
            headers.insert(header::LINK, link);
            headers.insert(NEXT_CURSOR, cursor);
        }
    }
    Ok(response)
}

const NEXT_CURSOR: HeaderName = HeaderName::from_static("x-next-cursor");

/// The whole listing as a JSON array, produced a chunk of agents at a time
/// as the client reads: memory stays one chunk however large the fleet,
/// and a slow reader holds no lock (each chunk reads its own page).
struct StreamedListing {
    registry: Arc<Registry>,
    status: Option<AgentStatus>,
    after: Option<ListCursor>,
    opened: bool,
    finished: bool,
}

impl StreamedListing {
    fn new(
        registry: Arc<Registry>,
        status: Option<AgentStatus>,
        after: Option<ListCursor>,
    ) -> Self {
        StreamedListing {
            registry,
            status,
            after,
            opened: false,
            finished: false,
        }
    }

    fn next_chunk(&mut self) -> Bytes {
        let page = self
            .registry
            .list_page(self.status, self.after, CHUNK_AGENTS);
        let mut chunk = Vec::with_capacity(page.agents.len() * 512 + 2);
        if !self.opened {
            chunk.push(b'[');
        }
        for agent in &page.agents {
            let before = chunk.len();
            if self.opened {
                chunk.push(b',');
            }
            // An agent view always serialises (no map has non-string keys);
            // were one not to, it is left out rather than cut the array.
            // sonic-rs: serde_json's bytes, in two thirds of the time.
            if let Err(error) = sonic_rs::to_writer(&mut chunk, agent) {
                chunk.truncate(before);
                tracing::error!(%error, agent_id = %agent.agent.id, "An agent could not be listed.");
                continue;
            }
            self.opened = true;
        }
        self.opened = true;
        match page.next {
            Some(next) => self.after = Some(next),
            None => {
                chunk.push(b']');
                self.finished = true;
            }
        }
        Bytes::from(chunk)
    }
}

impl http_body::Body for StreamedListing {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.finished {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(this.next_chunk()))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}

/// One agent.
#[utoipa::path(get, path = "/api/agents/{id}", tag = "registry",
    params(("id" = Uuid, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 400, description = "A malformed id", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
    ))]
pub async fn show(
    State(registry): State<Arc<Registry>>,
    _: RecordReadable,
    AgentIdParam(id): AgentIdParam,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(registry.get(id)?))
}

/// A sign of life, with an optional report (an empty body is valid).
#[utoipa::path(post, path = "/api/agents/{id}/heartbeat", tag = "registry",
    params(("id" = Uuid, Path, description = "The agent's id")),
    request_body(content = Option<HeartbeatReport>, description = "What the node reports; absent fields keep their last value"),
    security((), ("agent_secret" = [])),
    responses(
        (status = 200, description = "Recorded", body = Object, example = json!({"status": "ok"})),
        (status = 400, description = "Not JSON, or a malformed id", body = ErrorBody),
        (status = 401, description = "Not this agent's secret", body = ErrorBody),
        (status = 403, description = "Another kind of credential", body = ErrorBody),
        (status = 404, description = "No such agent: register again", body = ErrorBody),
        (status = 422, description = "An invalid field", body = ErrorBody),
    ))]
pub async fn heartbeat(
    State(registry): State<Arc<Registry>>,
    AuthorizedAgent(id, _): AuthorizedAgent<SelfOnly>,
    body: OptionalJsonBody,
) -> Result<impl IntoResponse, ApiError> {
    let report: Option<ReportUpdate<'_>> = body.parse()?;
    if let Some(report) = &report {
        validate_report(report)?;
    }
    registry.heartbeat(id, report)?;
    Ok(super::STATUS_OK)
}

/// Change an agent's mutable fields (not its name or port).
#[utoipa::path(put, path = "/api/agents/{id}", tag = "registry",
    params(("id" = Uuid, Path, description = "The agent's id")),
    request_body = UpdateAgentRequest,
    security((), ("admin_token" = []), ("agent_secret" = [])),
    responses(
        (status = 200, description = "The agent as updated", body = Agent),
        (status = 400, description = "Not JSON, an empty body or a malformed id", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "Another kind of credential", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
        (status = 422, description = "An invalid field", body = ErrorBody),
        (status = 503, description = "The store cannot write", body = ErrorBody),
    ))]
pub async fn update(
    State(registry): State<Arc<Registry>>,
    State(node_addresses): State<Arc<NodeAddressPolicy>>,
    AuthorizedAgent(id, _): AuthorizedAgent<SelfOrAdmin>,
    JsonBody(request): JsonBody<UpdateAgentRequest>,
) -> Result<impl IntoResponse, ApiError> {
    // The port is part of the identity and never changes: the address is
    // checked with it.
    let port = registry.get(id)?.agent.port;
    let update = validate_update(request, &node_addresses, port)?;
    Ok(Json(registry.update(id, update).await?))
}

/// Forget an agent.
#[utoipa::path(delete, path = "/api/agents/{id}", tag = "registry",
    params(("id" = Uuid, Path, description = "The agent's id")),
    security((), ("admin_token" = []), ("agent_secret" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "A malformed id", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "Another kind of credential", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
        (status = 503, description = "The store cannot write", body = ErrorBody),
    ))]
pub async fn remove(
    State(registry): State<Arc<Registry>>,
    AuthorizedAgent(id, _): AuthorizedAgent<SelfOrAdmin>,
) -> Result<impl IntoResponse, ApiError> {
    registry.remove(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn validate_registration(
    request: RegisterRequest,
    node_addresses: &NodeAddressPolicy,
) -> Result<Registration, ApiError> {
    let mut registration = Registration::try_from(request)?;
    registration.ip_address = node_addresses
        .check(registration.ip_address, registration.port)
        .map_err(|refusal| invalid("ip_address", &refusal.to_string()))?;
    Ok(registration)
}

fn validate_update(
    request: UpdateAgentRequest,
    node_addresses: &NodeAddressPolicy,
    port: u16,
) -> Result<AgentUpdate, ApiError> {
    if let Some(version) = &request.runtime_version {
        check_text("runtime_version", version)?;
    }
    if let Some(system_info) = &request.system_info {
        check_system_info(system_info)?;
    }
    if let Some(models) = &request.models {
        check_models("models", models)?;
    }
    Ok(AgentUpdate {
        ip_address: request
            .ip_address
            .as_deref()
            .map(|ip| node_address(ip, port, node_addresses))
            .transpose()?,
        runtime_version: request.runtime_version,
        system_info: request.system_info,
        models: request.models,
        backend: request.backend,
    })
}

fn validate_report(report: &ReportUpdate<'_>) -> Result<(), ApiError> {
    if let Some(models) = &report.models {
        check_models("models", models)?;
    }
    if let Some(models) = &report.loaded_models {
        check_models("loaded_models", models)?;
    }
    if let Some(cpu) = report.cpu_usage_percent {
        if !cpu.is_finite() || !(0.0..=100.0).contains(&cpu) {
            return Err(invalid(
                "cpu_usage_percent",
                "must be a number from 0 to 100",
            ));
        }
    }
    Ok(())
}

/// An address the router can send requests to: not unspecified, not multicast.
/// A node's address, in canonical form, if the policy lets a node be there.
fn node_address(
    text: &str,
    port: u16,
    node_addresses: &NodeAddressPolicy,
) -> Result<IpAddr, ApiError> {
    let ip: IpAddr = text
        .trim()
        .parse()
        .map_err(|_| invalid("ip_address", &format!("{text:?} is not an IP address")))?;
    node_addresses
        .check(ip, port)
        .map_err(|refusal| invalid("ip_address", &refusal.to_string()))
}

fn invalid(field: &str, problem: &str) -> ApiError {
    ApiError::unprocessable("invalid_field", format!("{field}: {problem}"))
}

/// The node is leaving: it gets no new requests.
#[utoipa::path(post, path = "/api/agents/{id}/drain", tag = "registry",
    params(("id" = Uuid, Path, description = "The agent's id")),
    security((), ("admin_token" = []), ("agent_secret" = [])),
    responses(
        (status = 200, description = "Draining, with the requests still in flight", body = DrainResponse),
        (status = 400, description = "A malformed id", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "Another kind of credential", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
    ))]
pub async fn drain(
    State(registry): State<Arc<Registry>>,
    AuthorizedAgent(id, _): AuthorizedAgent<SelfOrAdmin>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(registry.drain(id)?))
}

#[cfg(test)]
mod tests {
    /// The listing is written with sonic-rs for speed; clients get
    /// serde_json's bytes all the same: the same escapes for quotes,
    /// backslashes and control characters, non-ASCII as it is, the same
    /// digits for floats.
    #[test]
    fn a_listed_agent_is_written_as_serde_json_writes_it() {
        let tricky = "q\"b\\s/\u{0}\u{1f}\n\t\r\u{8}\u{c}\u{7f}é漢😀\u{2028}</script>";
        for (cpu, memory) in [
            (37.5, 68_719_476_736u64),
            (0.1, 0),
            (1e-7, u64::MAX),
            (f32::MAX, 1),
            (100.0, 42),
        ] {
            let view: common::AgentView = serde_json::from_value(serde_json::json!({
                "id": uuid::Uuid::new_v4(),
                "machine_name": tricky,
                "ip_address": "127.0.0.2",
                "port": 11434,
                "runtime_version": tricky,
                "status": "Online",
                "registered_at": "2026-12-02T11:45:50.787175482Z",
                "last_seen": "1969-12-31T23:59:59.999Z",
                "system_info": {"os": tricky, "arch": "x86_64", "cpu_cores": 32, "total_memory": memory},
                "models": [tricky, "llama3.1:8b", ""],
                "backend": "openai",
                "report": {
                    "models": [tricky],
                    "loaded_models": [],
                    "requests_in_flight": 3,
                    "llm_server_up": false,
                    "cpu_usage_percent": cpu,
                    "memory_used": memory,
                },
                "tls": true,
                "max_concurrency": 4,
                "in_flight": 2,
                "draining": true,
                "routable": false,
                "state": "draining",
            }))
            .expect("a view");
            let by_serde = serde_json::to_string(&view).expect("json");
            let by_sonic = sonic_rs::to_string(&view).expect("json");
            assert_eq!(by_sonic, by_serde);
        }
    }
}
