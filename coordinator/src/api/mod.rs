//! HTTP handlers and the router that maps paths to them.

pub mod agents;
pub mod dashboard;
pub mod error;
pub mod forward;
pub mod guard;
pub mod json;
pub mod ollama;
pub mod openai;
pub mod origin;

use std::sync::Arc;
use std::time::Duration;

use crate::node_address::NodeAddressPolicy;

use axum::extract::{FromRef, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Credentials;
use crate::balancer::ApiKind;
use crate::registry::Registry;

pub use json::BodyReadTimeout;

/// Registry bodies are small; anything larger is a mistake or an attack
/// (enforced where they are read: [`json`]).
pub const REGISTRY_BODY_LIMIT: usize = 32 * 1024;

/// What handlers share, behind one `Arc`: axum clones the state for every
/// request (and every middleware), and one reference count is cheaper than
/// seven (their increments and decrements were 2 % of the proxy's CPU in
/// a profile under load).
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

impl AppState {
    pub fn new(shared: SharedState) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// What handlers share: the registry, the proxy in front of the nodes, who
/// may do what, and how long a client may take to send a body.
pub struct SharedState {
    pub registry: Arc<Registry>,
    /// The LLM routes: the proxy and the limits on the bodies they read.
    pub forwarder: Arc<forward::Forwarder>,
    /// Which requests a browser may have been made to send (see `origin`).
    pub origin_policy: Arc<origin::OriginPolicy>,
    /// Where nodes may be (see `node_address`).
    pub node_addresses: Arc<NodeAddressPolicy>,
    pub credentials: Arc<Credentials>,
    pub body_read_timeout: Duration,
    /// The routers sharing the registry (this one alone with the files).
    pub routers: Arc<crate::store::RouterRoster>,
}

impl FromRef<AppState> for Arc<Credentials> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.credentials)
    }
}

impl FromRef<AppState> for BodyReadTimeout {
    fn from_ref(state: &AppState) -> Self {
        BodyReadTimeout(state.body_read_timeout)
    }
}

impl FromRef<AppState> for Arc<crate::store::RouterRoster> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.routers)
    }
}

impl FromRef<AppState> for Arc<Registry> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.registry)
    }
}

impl FromRef<AppState> for Arc<NodeAddressPolicy> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.node_addresses)
    }
}

impl FromRef<AppState> for Arc<forward::Forwarder> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.forwarder)
    }
}

/// The whole HTTP surface of the router. Every route is added through
/// `routes!`, which takes its path and method from the handler's
/// `#[utoipa::path]`: the OpenAPI document served at `/openapi.json` is made
/// from the same declarations as the routing, so the two cannot drift.
pub fn app(state: AppState) -> App {
    let origin_policy = Arc::clone(&state.origin_policy);
    let (router, openapi) = documented_routes(&state).split_for_parts();
    let openapi_json: Arc<str> = openapi_with_itself(openapi).into();
    let routes = router
        .route(
            "/openapi.json",
            get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    openapi_json.to_string(),
                )
            }),
        )
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state);
    App {
        routes,
        origin_policy,
    }
}

/// The routes behind the origin guard ([`origin`]), which every request
/// passes first, whatever its path. The guard is a plain check before
/// routing rather than a middleware layer: axum wraps each route in a
/// layer, and `from_fn`'s boxed future and service clone per request were
/// 1.1 µs of the proxy's 21.6 µs of CPU per request (5 %).
#[derive(Clone)]
pub struct App {
    routes: Router,
    origin_policy: Arc<origin::OriginPolicy>,
}

impl App {
    /// Answers `request`: refused by the guard at once, or routed.
    pub fn call(&self, request: Request) -> AppFuture {
        if let Err(error) = origin::check(
            &self.origin_policy,
            request.method(),
            request.uri().path(),
            request.headers(),
        ) {
            return AppFuture::Refused(Some(error::in_shape_of(request.uri(), error)));
        }
        use tower_service::Service;
        AppFuture::Routed(self.routes.clone().call(request))
    }
}

/// The answer of [`App::call`]: a named future rather than a boxed one, so
/// that a request allocates none for it.
pub enum AppFuture {
    Routed(axum::routing::future::RouteFuture<std::convert::Infallible>),
    Refused(Option<Response>),
}

impl std::future::Future for AppFuture {
    type Output = Response;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Response> {
        match self.get_mut() {
            AppFuture::Routed(routed) => std::pin::Pin::new(routed)
                .poll(context)
                .map(|Ok(response)| response),
            // Taken on the one poll that answers; a poll after that (a
            // caller's mistake) gets a 500 rather than a panic.
            AppFuture::Refused(answer) => {
                std::task::Poll::Ready(answer.take().unwrap_or_else(|| {
                    axum::response::IntoResponse::into_response(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    )
                }))
            }
        }
    }
}

fn documented_routes(state: &AppState) -> OpenApiRouter<AppState> {
    let registry_routes = OpenApiRouter::new()
        .routes(routes!(agents::list))
        .routes(routes!(agents::register))
        .routes(routes!(agents::show, agents::update, agents::remove))
        .routes(routes!(agents::heartbeat))
        .routes(routes!(agents::drain))
        .routes(routes!(agents::routers));
    let mut llm_routes = OpenApiRouter::new()
        .routes(routes!(ollama::chat))
        .routes(routes!(ollama::generate))
        .routes(routes!(ollama::embed))
        .routes(routes!(ollama::embeddings))
        .routes(routes!(ollama::show))
        .routes(routes!(ollama::tags))
        .routes(routes!(ollama::ps))
        .routes(routes!(ollama::version))
        .routes(routes!(openai::chat_completions))
        .routes(routes!(openai::completions))
        .routes(routes!(openai::embeddings))
        .routes(routes!(openai::models));
    if state.credentials.clients_authenticated() {
        llm_routes = llm_routes.route_layer(middleware::from_fn_with_state(
            Arc::clone(&state.credentials),
            require_api_key,
        ));
    }
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(dashboard::metrics))
        .routes(routes!(dashboard::index))
        .routes(routes!(dashboard::script))
        .routes(routes!(dashboard::style))
        // Ollama's liveness probe stays open, as `/health` does.
        .routes(routes!(ollama::root))
        .merge(registry_routes)
        .merge(llm_routes)
}

/// The document, with its own route added, as JSON text.
fn openapi_with_itself(mut openapi: utoipa::openapi::OpenApi) -> String {
    use utoipa::openapi::path::{HttpMethod, OperationBuilder};
    use utoipa::openapi::ResponseBuilder;
    let operation = OperationBuilder::new()
        .summary(Some("This document"))
        .tag("router")
        .response(
            "200",
            ResponseBuilder::new().description("The OpenAPI document of every route"),
        )
        .build();
    openapi
        .paths
        .add_path_operation("/openapi.json", vec![HttpMethod::Get], operation);
    openapi.to_json().unwrap_or_else(|_| "{}".to_owned())
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "llm-router",
        description = "One endpoint in front of a fleet of LLM servers: a registry of nodes \
            (their agents register and heartbeat) and a proxy for Ollama and OpenAI clients. \
            Credentials are off until configured; each is sent as `Authorization: Bearer`."
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "registry", description = "Agents register, heartbeat and leave; operators list and manage them"),
        (name = "ollama", description = "Ollama's API, forwarded to a node that serves the model"),
        (name = "openai", description = "OpenAI's API, forwarded to a node that serves the model"),
        (name = "router", description = "The router itself"),
    )
)]
struct ApiDoc;

/// The four credentials, all HTTP bearer tokens.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, description) in [
            (
                "join_token",
                "The join token (LLM_ROUTER_AGENT_TOKEN), when configured",
            ),
            (
                "agent_secret",
                "The agent's own secret, from its registration",
            ),
            (
                "admin_token",
                "The admin token (LLM_ROUTER_ADMIN_TOKEN), when configured",
            ),
            (
                "api_key",
                "A client API key (LLM_ROUTER_API_KEYS), when configured",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(description))
                        .build(),
                ),
            );
        }
    }
}

/// The LLM routes when API keys are configured: a key, or an error in the
/// shape of the route's API.
async fn require_api_key(
    State(credentials): State<Arc<Credentials>>,
    request: Request,
    next: Next,
) -> Response {
    match credentials.check_client(
        request
            .headers()
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    ) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            let api = if request.uri().path().starts_with("/v1/") {
                ApiKind::OpenAi
            } else {
                ApiKind::Ollama
            };
            let refused = error::ApiError::from(refusal);
            error::challenge_if_unauthorized(forward::error(
                api,
                refused.status,
                refused.code,
                &refused.message,
            ))
        }
    }
}

/// Whether the router is up.
#[utoipa::path(get, path = "/health", tag = "router",
    responses((status = 200, description = "Up", body = Object, example = json!({"status": "ok"}))))]
async fn health() -> impl axum::response::IntoResponse {
    STATUS_OK
}

/// `{"status":"ok"}`, made once: heartbeats and health checks are the
/// router's most frequent answers.
pub const STATUS_OK: ([(axum::http::HeaderName, &str); 1], &str) = (
    [(axum::http::header::CONTENT_TYPE, "application/json")],
    r#"{"status":"ok"}"#,
);
