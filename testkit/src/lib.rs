//! A stand-in LLM server for tests: what we do not ship (Ollama, or an
//! OpenAI-compatible server such as llama.cpp's or vLLM), speaking their real
//! HTTP protocols, streaming included (Ollama's NDJSON, OpenAI's server-sent
//! events). Its answers name the node, so a test can see where a request went;
//! `GET /standin/stats` counts requests, in-flight and cancelled streams.

// Handlers here return ready-made error responses; their size does not matter in a test server.
#![allow(clippy::result_large_err)]

pub mod postgres;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::BackendKind;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How a stand-in behaves.
#[derive(Debug, Clone)]
pub struct StandInOptions {
    /// Shown in every answer: "Hello from <name>".
    pub name: String,
    pub kind: BackendKind,
    pub models: Vec<String>,
    /// Models reported by Ollama's `/api/ps`.
    pub loaded_models: Vec<String>,
    pub version: String,
    /// How many content chunks a generation has.
    pub chunks: usize,
    /// Pause before each chunk, to make streaming and cancellation visible.
    pub chunk_delay: Duration,
    /// Hold every stream after its first chunk until `POST /standin/release`:
    /// a client that sees the first chunk before the release proves that
    /// nothing between them buffers the stream.
    pub gated: bool,
    /// Slots, as llama.cpp's server reports them at `GET /props`
    /// (`total_slots`); only an OpenAI-compatible stand-in has `/props`.
    pub slots: Option<u32>,
    /// llama-cpp-python's quirk: its model list (and version, props) are
    /// answered only once the generations running now have ended, so a
    /// health check during a long generation waits, or times out.
    pub probes_wait_for_generation: bool,
}

impl StandInOptions {
    pub fn ollama(name: &str, models: &[&str]) -> Self {
        StandInOptions {
            name: name.to_owned(),
            kind: BackendKind::Ollama,
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            loaded_models: Vec::new(),
            version: "0.5.7".to_owned(),
            chunks: 4,
            chunk_delay: Duration::ZERO,
            gated: false,
            slots: None,
            probes_wait_for_generation: false,
        }
    }

    pub fn openai(name: &str, models: &[&str]) -> Self {
        StandInOptions {
            kind: BackendKind::OpenAi,
            version: "0.6.4".to_owned(),
            ..Self::ollama(name, models)
        }
    }
}

/// Counters a test reads to see what reached this node.
#[derive(Debug, Default)]
pub struct StandInStats {
    pub requests: AtomicU64,
    pub generations_in_flight: AtomicU64,
    /// The most generations that were ever in flight at once.
    pub most_generations_at_once: AtomicU64,
    pub generations_completed: AtomicU64,
    /// Streams dropped before their last chunk: the client went away.
    pub generations_cancelled: AtomicU64,
    /// Client connections open now: a router's pooled connections show here
    /// until the router closes them.
    pub connections_open: Arc<AtomicU64>,
}

/// The stand-in's listener: counts each connection while it is open, and
/// speaks TLS when given a certificate (as a server started with its own
/// certificate does: vLLM's `--ssl-certfile`, llama.cpp's `--ssl-cert-file`).
struct CountingListener {
    listener: TcpListener,
    open: Arc<AtomicU64>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A client connection, counted until dropped (when either side closes it).
struct CountedStream {
    stream: ClientStream,
    open: Arc<AtomicU64>,
}

enum ClientStream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl ClientStream {
    fn pinned(&mut self) -> std::pin::Pin<&mut dyn AsyncStream> {
        match self {
            ClientStream::Plain(stream) => std::pin::Pin::new(stream),
            ClientStream::Tls(stream) => std::pin::Pin::new(stream.as_mut()),
        }
    }
}

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl tokio::io::AsyncRead for CountedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.stream.pinned().poll_read(context, buffer)
    }
}

impl tokio::io::AsyncWrite for CountedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.stream.pinned().poll_write(context, buffer)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.stream.pinned().poll_flush(context)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.stream.pinned().poll_shutdown(context)
    }
}

impl axum::serve::Listener for CountingListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, address) = axum::serve::Listener::accept(&mut self.listener).await;
            let stream = match &self.tls {
                None => ClientStream::Plain(stream),
                // A failed handshake (an untrusting client) is that client's.
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => ClientStream::Tls(Box::new(stream)),
                    Err(_) => continue,
                },
            };
            self.open.fetch_add(1, Ordering::SeqCst);
            let stream = CountedStream {
                stream,
                open: Arc::clone(&self.open),
            };
            return (stream, address);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl StandInStats {
    /// What `/standin/stats` answers, read in place.
    pub fn to_json_for_tests(&self) -> Value {
        self.to_json()
    }

    fn to_json(&self) -> Value {
        json!({
            "requests": self.requests.load(Ordering::SeqCst),
            "generations_in_flight": self.generations_in_flight.load(Ordering::SeqCst),
            "most_generations_at_once": self.most_generations_at_once.load(Ordering::SeqCst),
            "generations_completed": self.generations_completed.load(Ordering::SeqCst),
            "generations_cancelled": self.generations_cancelled.load(Ordering::SeqCst),
            "connections_open": self.connections_open.load(Ordering::SeqCst),
        })
    }
}

struct Shared {
    options: StandInOptions,
    stats: Arc<StandInStats>,
    /// Permits for gated streams to go on past their first chunk.
    gate: Arc<tokio::sync::Semaphore>,
    /// Held (shared) by each generation; a probe that waits for
    /// generations takes it whole.
    generating: Arc<tokio::sync::RwLock<()>>,
}

impl Shared {
    /// For a probe: waits until no generation runs, when the stand-in
    /// imitates a server that answers probes only between generations.
    async fn wait_for_generations(&self) {
        if self.options.probes_wait_for_generation {
            let _whole = self.generating.write().await;
        }
    }
}

/// A running stand-in. Dropping it stops the server.
pub struct StandIn {
    pub address: SocketAddr,
    pub stats: Arc<StandInStats>,
    task: JoinHandle<()>,
}

impl StandIn {
    /// Serves on `127.0.0.1:0`.
    pub async fn spawn(options: StandInOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Ok(Self::serve(listener, options))
    }

    /// Serves HTTPS on `127.0.0.1:0` with a PEM certificate and key.
    pub async fn spawn_tls(
        options: StandInOptions,
        cert_pem: &str,
        key_pem: &str,
    ) -> std::io::Result<Self> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let invalid = |error: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, error.to_string())
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| invalid(&error))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|error| invalid(&error))?;
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|error| invalid(&error))?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Ok(Self::serve_with(
            listener,
            options,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        ))
    }

    pub fn serve(listener: TcpListener, options: StandInOptions) -> Self {
        Self::serve_with(listener, options, None)
    }

    fn serve_with(
        listener: TcpListener,
        options: StandInOptions,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let address = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let stats = Arc::new(StandInStats::default());
        let app = router(Arc::new(Shared {
            options,
            stats: Arc::clone(&stats),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            generating: Arc::new(tokio::sync::RwLock::new(())),
        }));
        let listener = CountingListener {
            listener,
            open: Arc::clone(&stats.connections_open),
            tls,
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StandIn {
            address,
            stats,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops serving at once, dropping open connections, as a killed server would.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// llama.cpp's server: its slots (how many requests it takes at once);
/// 404 when the stand-in has none, as vLLM answers.
async fn llama_cpp_props(State(shared): State<Arc<Shared>>) -> Response {
    shared.wait_for_generations().await;
    match shared.options.slots {
        Some(slots) => Json(json!({"total_slots": slots, "chat_template": ""})).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let mut app = Router::new()
        .route("/v1/models", get(openai_models))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/completions", post(openai_completions))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/standin/stats", get(stats))
        .route("/standin/release", post(release));
    app = match shared.options.kind {
        BackendKind::Ollama => app
            .route("/", get(|| async { "Ollama is running" }))
            .route("/api/version", get(ollama_version))
            .route("/api/tags", get(ollama_tags))
            .route("/api/ps", get(ollama_ps))
            .route("/api/chat", post(ollama_chat))
            .route("/api/generate", post(ollama_generate))
            .route("/api/embed", post(ollama_embed))
            .route("/api/embeddings", post(ollama_embeddings))
            .route("/api/show", post(ollama_show)),
        // vLLM's version endpoint; llama.cpp's server has none, which the
        // agent also copes with.
        BackendKind::OpenAi => app
            .route("/version", get(ollama_version))
            .route("/props", get(llama_cpp_props)),
    };
    // Real servers take chat requests with large images.
    app.layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&shared),
            count_request,
        ))
        .with_state(shared)
}

/// Counts requests, and answers each with the length and FNV-1a hash of the
/// body it received, so a test can see a large body arrived intact.
async fn count_request(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.uri().path().starts_with("/standin/") {
        return next.run(request).await;
    }
    shared.stats.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let digest = format!("{} {:016x}", bytes.len(), fnv1a(&bytes));
    let mut response = next
        .run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await;
    if let Ok(value) = header::HeaderValue::from_str(&digest) {
        response.headers_mut().insert("x-standin-body", value);
    }
    response
}

/// FNV-1a, 64 bits: enough to tell two bodies apart in a test.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(shared.stats.to_json())
}

/// Lets every gated stream waiting now, and the next few, go on.
async fn release(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.gate.add_permits(1_000);
    Json(json!({ "released": true }))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The words of an answer: "Hello from <name>" then numbered filler.
fn answer_chunks(options: &StandInOptions) -> Vec<String> {
    (0..options.chunks.max(1))
        .map(|i| match i {
            0 => "Hello".to_owned(),
            1 => " from".to_owned(),
            2 => format!(" {}", options.name),
            n => format!(" {n}"),
        })
        .collect()
}

fn embedding_for(text: &str) -> Vec<f32> {
    let mut vector = [0f32; 8];
    for (i, byte) in text.bytes().enumerate() {
        vector[i % 8] += f32::from(byte) / 255.0;
    }
    vector.to_vec()
}

fn requested_model(body: &Value) -> Option<&str> {
    body.get("model").and_then(Value::as_str)
}

/// Checks the model against this node's list; the error is the one the
/// real server gives, in its own shape. Ollama takes a name with or
/// without its default tag (`llama3.2` is `llama3.2:latest`), on its own
/// API and on its `/v1` alike; an OpenAI-compatible server wants the name
/// exactly as it lists it.
fn check_model<'a>(shared: &Shared, body: &'a Value, openai: bool) -> Result<&'a str, Response> {
    let model = requested_model(body).unwrap_or_default();
    fn untagged(name: &str) -> &str {
        name.strip_suffix(":latest").unwrap_or(name)
    }
    let known = match shared.options.kind {
        BackendKind::Ollama => shared
            .options
            .models
            .iter()
            .any(|m| untagged(m.as_str()) == untagged(model)),
        BackendKind::OpenAi => shared.options.models.iter().any(|m| m == model),
    };
    if known {
        return Ok(model);
    }
    let message = format!("model '{model}' not found");
    let body = if openai {
        json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "model_not_found"}})
    } else {
        json!({ "error": message })
    };
    Err((StatusCode::NOT_FOUND, Json(body)).into_response())
}

/// Marks a generation in flight; if dropped before `finish`, it was cancelled.
struct GenerationGuard {
    stats: Arc<StandInStats>,
    finished: bool,
    _generating: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

impl GenerationGuard {
    fn new(shared: &Shared) -> Self {
        let stats = &shared.stats;
        let now = stats.generations_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats
            .most_generations_at_once
            .fetch_max(now, Ordering::SeqCst);
        GenerationGuard {
            stats: Arc::clone(stats),
            finished: false,
            _generating: Arc::clone(&shared.generating).try_read_owned().ok(),
        }
    }

    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for GenerationGuard {
    fn drop(&mut self) {
        self.stats
            .generations_in_flight
            .fetch_sub(1, Ordering::SeqCst);
        let counter = if self.finished {
            &self.stats.generations_completed
        } else {
            &self.stats.generations_cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// A streamed body: one frame per chunk after the configured delay, then
/// the closing frames. The guard lives inside the stream, so a client that
/// disconnects drops it early.
fn streamed(
    shared: &Shared,
    content_type: &'static str,
    frames: Vec<String>,
    closing: Vec<String>,
) -> Response {
    let delay = shared.options.chunk_delay;
    let gate = shared.options.gated.then(|| Arc::clone(&shared.gate));
    let guard = GenerationGuard::new(shared);
    let state = (frames.into_iter().enumerate(), closing, Some(guard), gate);
    let stream = futures::stream::unfold(
        state,
        move |(mut frames, closing, guard, gate)| async move {
            if let Some((index, frame)) = frames.next() {
                if let (1, Some(gate)) = (index, &gate) {
                    if let Ok(permit) = gate.acquire().await {
                        permit.forget();
                    }
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                return Some((
                    Ok::<_, std::convert::Infallible>(frame),
                    (frames, closing, guard, gate),
                ));
            }
            let guard = guard?;
            guard.finish();
            Some((Ok(closing.concat()), (frames, Vec::new(), None, gate)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(
            stream.map(|frame| frame.map(axum::body::Bytes::from)),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A whole answer after the same total delay a stream would take.
async fn unstreamed(shared: &Shared, body: Value) -> Response {
    let guard = GenerationGuard::new(shared);
    let total_delay = shared.options.chunk_delay * shared.options.chunks.max(1) as u32;
    if !total_delay.is_zero() {
        tokio::time::sleep(total_delay).await;
    }
    guard.finish();
    Json(body).into_response()
}

/// The parsed body and its model, or the error answer the real server gives.
fn generation_request(
    shared: &Shared,
    bytes: &[u8],
    openai: bool,
) -> Result<(Value, String), Response> {
    let body = parse_body(bytes)?;
    let model = check_model(shared, &body, openai)?.to_owned();
    Ok((body, model))
}

fn wants_stream(body: &Value, default: bool) -> bool {
    body.get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(default)
}

fn parse_body(bytes: &[u8]) -> Result<Value, Response> {
    serde_json::from_slice(bytes).map_err(|error| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": format!("invalid JSON: {error}") })),
        )
            .into_response()
    })
}

// ---- Ollama ----

async fn ollama_version(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.wait_for_generations().await;
    Json(json!({ "version": shared.options.version }))
}

fn ollama_model_entry(name: &str) -> Value {
    json!({
        "name": name, "model": name, "modified_at": now(), "size": 1_000_000,
        "digest": format!("sha256:{:064x}", name.len()),
        "details": {"parent_model": "", "format": "gguf", "family": "standin", "families": ["standin"],
                    "parameter_size": "135M", "quantization_level": "Q8_0"}
    })
}

async fn ollama_tags(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.wait_for_generations().await;
    let models: Vec<Value> = shared
        .options
        .models
        .iter()
        .map(|m| ollama_model_entry(m))
        .collect();
    Json(json!({ "models": models }))
}

async fn ollama_ps(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let models: Vec<Value> = shared
        .options
        .loaded_models
        .iter()
        .map(|m| {
            let mut entry = ollama_model_entry(m);
            entry["expires_at"] = json!(now());
            entry["size_vram"] = json!(0);
            entry
        })
        .collect();
    Json(json!({ "models": models }))
}

fn ollama_final_stats() -> Value {
    json!({"total_duration": 1000, "load_duration": 10, "prompt_eval_count": 3,
           "prompt_eval_duration": 100, "eval_count": 4, "eval_duration": 400})
}

async fn ollama_chat(State(shared): State<Arc<Shared>>, bytes: axum::body::Bytes) -> Response {
    let (body, model) = match generation_request(&shared, &bytes, false) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let chunks = answer_chunks(&shared.options);
    let mut closing = json!({"model": model, "created_at": now(),
        "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop"});
    merge(&mut closing, ollama_final_stats());
    if wants_stream(&body, true) {
        let frames = chunks
            .iter()
            .map(|c| ndjson(&json!({"model": model, "created_at": now(), "message": {"role": "assistant", "content": c}, "done": false})))
            .collect();
        streamed(
            &shared,
            "application/x-ndjson",
            frames,
            vec![ndjson(&closing)],
        )
    } else {
        closing["message"]["content"] = json!(chunks.concat());
        unstreamed(&shared, closing).await
    }
}

async fn ollama_generate(State(shared): State<Arc<Shared>>, bytes: axum::body::Bytes) -> Response {
    let (body, model) = match generation_request(&shared, &bytes, false) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let chunks = answer_chunks(&shared.options);
    let mut closing = json!({"model": model, "created_at": now(), "response": "", "done": true,
        "done_reason": "stop", "context": [1, 2, 3]});
    merge(&mut closing, ollama_final_stats());
    if wants_stream(&body, true) {
        let frames = chunks
            .iter()
            .map(|c| {
                ndjson(&json!({"model": model, "created_at": now(), "response": c, "done": false}))
            })
            .collect();
        streamed(
            &shared,
            "application/x-ndjson",
            frames,
            vec![ndjson(&closing)],
        )
    } else {
        closing["response"] = json!(chunks.concat());
        unstreamed(&shared, closing).await
    }
}

async fn ollama_embed(State(shared): State<Arc<Shared>>, bytes: axum::body::Bytes) -> Response {
    let (body, model) = match generation_request(&shared, &bytes, false) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let embeddings: Vec<Vec<f32>> = inputs.iter().map(|text| embedding_for(text)).collect();
    Json(
        json!({"model": model, "embeddings": embeddings, "total_duration": 100,
                "load_duration": 1, "prompt_eval_count": inputs.len()}),
    )
    .into_response()
}

async fn ollama_embeddings(
    State(shared): State<Arc<Shared>>,
    bytes: axum::body::Bytes,
) -> Response {
    let body = match parse_body(&bytes) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if let Err(response) = check_model(&shared, &body, false) {
        return response;
    }
    let prompt = body
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Json(json!({ "embedding": embedding_for(prompt) })).into_response()
}

async fn ollama_show(State(shared): State<Arc<Shared>>, bytes: axum::body::Bytes) -> Response {
    let mut body = match parse_body(&bytes) {
        Ok(body) => body,
        Err(response) => return response,
    };
    // Older clients send "name" rather than "model".
    if body.get("model").is_none() {
        if let Some(name) = body.get("name").cloned() {
            body["model"] = name;
        }
    }
    if let Err(response) = check_model(&shared, &body, false) {
        return response;
    }
    Json(json!({
        "modelfile": "# stand-in", "parameters": "", "template": "{{ .Prompt }}",
        "details": {"parent_model": "", "format": "gguf", "family": "standin", "families": ["standin"],
                    "parameter_size": "135M", "quantization_level": "Q8_0"},
        "model_info": {"general.architecture": "standin"},
        "capabilities": ["completion", "embedding"],
        "modified_at": now()
    }))
    .into_response()
}

// ---- OpenAI-compatible ----

async fn openai_models(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.wait_for_generations().await;
    let data: Vec<Value> = shared
        .options
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "standin"}))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn openai_chat(State(shared): State<Arc<Shared>>, bytes: axum::body::Bytes) -> Response {
    openai_generation(shared, bytes, true).await
}

async fn openai_completions(
    State(shared): State<Arc<Shared>>,
    bytes: axum::body::Bytes,
) -> Response {
    openai_generation(shared, bytes, false).await
}

async fn openai_generation(shared: Arc<Shared>, bytes: axum::body::Bytes, chat: bool) -> Response {
    let (body, model) = match generation_request(&shared, &bytes, true) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let id = format!("cmpl-{}", shared.stats.requests.load(Ordering::SeqCst));
    let created = unix_now();
    let chunks = answer_chunks(&shared.options);
    let (object, chunk_object) = if chat {
        ("chat.completion", "chat.completion.chunk")
    } else {
        ("text_completion", "text_completion")
    };
    if wants_stream(&body, false) {
        let choice = |content: &str, finish: Value| {
            if chat {
                json!({"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": content, "finish_reason": finish})
            }
        };
        let frame = |choice: Value| {
            sse(
                &json!({"id": id, "object": chunk_object, "created": created, "model": model, "choices": [choice]}),
            )
        };
        let frames = chunks
            .iter()
            .map(|c| frame(choice(c, Value::Null)))
            .collect();
        let closing = vec![
            frame(choice("", json!("stop"))),
            "data: [DONE]\n\n".to_owned(),
        ];
        streamed(&shared, "text/event-stream", frames, closing)
    } else {
        let text = chunks.concat();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "stop", "logprobs": null})
        };
        let usage = json!({"prompt_tokens": 3, "completion_tokens": chunks.len(), "total_tokens": 3 + chunks.len()});
        let answer = json!({"id": id, "object": object, "created": created, "model": model,
                            "choices": [choice], "usage": usage});
        unstreamed(&shared, answer).await
    }
}

async fn openai_embeddings(
    State(shared): State<Arc<Shared>>,
    bytes: axum::body::Bytes,
) -> Response {
    let (body, model) = match generation_request(&shared, &bytes, true) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) => items.iter().map(|i| i.to_string()).collect(),
        _ => Vec::new(),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| json!({"object": "embedding", "index": index, "embedding": embedding_for(text)}))
        .collect();
    Json(json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": inputs.len(), "total_tokens": inputs.len()}}))
    .into_response()
}

fn ndjson(value: &Value) -> String {
    format!("{value}\n")
}

fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

fn merge(target: &mut Value, extra: Value) {
    if let (Some(target), Value::Object(extra)) = (target.as_object_mut(), extra) {
        target.extend(extra);
    }
}
