//! A closed-loop HTTP/1.1 load generator: N keep-alive connections, each
//! sending its next request as soon as the last answer is read whole, with
//! every latency recorded in an HDR histogram (microseconds).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Where every load writes each of its requests, when asked (`--trace-dir`):
/// a histogram says how slow the slowest 1 % were, a trace says when they
/// happened and on which connections (`scripts/latency-windows.py` reads
/// it).
static TRACE_DIR: OnceLock<PathBuf> = OnceLock::new();
static TRACES_WRITTEN: AtomicU64 = AtomicU64::new(0);

/// Each load from now on writes `DIR/load-NNN.tsv`, numbered in the order
/// the loads run: one line per request, its start (wall clock, in
/// microseconds since the Unix epoch, to lay beside `perf` or a router's
/// log), its latency in microseconds and its connection.
pub fn trace_into(dir: PathBuf) {
    let _ = TRACE_DIR.set(dir);
}

/// One request as the trace records it.
struct Traced {
    started_unix_us: u64,
    latency_us: u64,
}

fn unix_us(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64)
}

fn write_trace(dir: &std::path::Path, connections: &[Vec<Traced>]) -> std::io::Result<PathBuf> {
    let number = TRACES_WRITTEN.fetch_add(1, Ordering::Relaxed) + 1;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("load-{number:03}.tsv"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    writeln!(out, "start_unix_us\tlatency_us\tconnection")?;
    for (connection, requests) in connections.iter().enumerate() {
        for request in requests {
            writeln!(
                out,
                "{}\t{}\t{connection}",
                request.started_unix_us, request.latency_us
            )?;
        }
    }
    out.flush()?;
    Ok(path)
}

/// Builds request number `n`.
pub type MakeRequest = Arc<dyn Fn(u64) -> Request<Full<Bytes>> + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// Run for this long.
    Duration(Duration),
    /// Send this many requests in all.
    Total(u64),
}

pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn p50_us(&self) -> f64 {
        self.latency_us.value_at_quantile(0.5) as f64
    }

    pub fn p99_us(&self) -> f64 {
        self.latency_us.value_at_quantile(0.99) as f64
    }

    /// Adds another measurement of the same target: rates and percentiles
    /// then cover both, as one longer run would.
    pub fn merge(&mut self, other: &LoadResult) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
    }
}

/// Adds `result` to the total kept under `key` (turns of the same target
/// spread over a scenario), or starts that total.
pub fn add_turn<K: Ord>(
    totals: &mut std::collections::BTreeMap<K, LoadResult>,
    key: K,
    result: LoadResult,
) {
    match totals.get_mut(&key) {
        Some(total) => total.merge(&result),
        None => {
            totals.insert(key, result);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

pub fn post_json(path: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

/// Runs the load and merges what every connection saw.
pub async fn run(
    address: SocketAddr,
    connections: usize,
    limit: Limit,
    make: MakeRequest,
) -> LoadResult {
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = match limit {
        Limit::Duration(duration) => Some(started + duration),
        Limit::Total(_) => None,
    };
    let total = match limit {
        Limit::Total(total) => total,
        Limit::Duration(_) => u64::MAX,
    };
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (issued, make) = (Arc::clone(&issued), Arc::clone(&make));
        workers.push(tokio::spawn(async move {
            connection_loop(address, deadline, total, issued, make).await
        }));
    }
    let mut result = LoadResult {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: new_histogram(),
    };
    let mut traces = Vec::new();
    for worker in workers {
        if let Ok(seen) = worker.await {
            result.requests += seen.requests;
            result.errors += seen.errors;
            let _ = result.latency_us.add(seen.histogram);
            traces.extend(seen.trace);
        }
    }
    result.elapsed = started.elapsed();
    if let Some(dir) = TRACE_DIR.get() {
        match write_trace(dir, &traces) {
            Ok(path) => eprintln!(
                "   trace of {} requests: {}",
                result.requests,
                path.display()
            ),
            Err(error) => eprintln!(
                "   could not write the trace into {}: {error}",
                dir.display()
            ),
        }
    }
    result
}

/// What one connection saw.
struct ConnectionResult {
    requests: u64,
    errors: u64,
    histogram: Histogram<u64>,
    /// Each request, when tracing.
    trace: Option<Vec<Traced>>,
}

async fn connect(
    address: SocketAddr,
) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(sender)
}

async fn connection_loop(
    address: SocketAddr,
    deadline: Option<Instant>,
    total: u64,
    issued: Arc<AtomicU64>,
    make: MakeRequest,
) -> ConnectionResult {
    let mut histogram = new_histogram();
    let mut trace = TRACE_DIR.get().map(|_| Vec::new());
    let (mut requests, mut errors) = (0u64, 0u64);
    let mut sender = None;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let n = issued.fetch_add(1, Ordering::Relaxed);
        if n >= total {
            break;
        }
        if sender.is_none() {
            sender = connect(address).await;
        }
        let Some(current) = sender.as_mut() else {
            errors += 1;
            requests += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let request = make(n);
        let begun_wall = trace.as_ref().map(|_| SystemTime::now());
        let begun = Instant::now();
        let ok = match current.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                let body = response.into_body().collect().await.map(|b| b.to_bytes());
                if !status.is_success() && errors < 3 {
                    let text = body
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned());
                    eprintln!("   request failed: {status} {}", text.unwrap_or_default());
                }
                status.is_success() && body.is_ok()
            }
            Err(error) => {
                if errors < 3 {
                    eprintln!("   request failed: {error}");
                }
                false
            }
        };
        let latency_us = begun.elapsed().as_micros().max(1) as u64;
        let _ = histogram.record(latency_us);
        if let (Some(trace), Some(begun_wall)) = (trace.as_mut(), begun_wall) {
            trace.push(Traced {
                started_unix_us: unix_us(begun_wall),
                latency_us,
            });
        }
        requests += 1;
        if !ok {
            errors += 1;
            sender = None;
        }
    }
    ConnectionResult {
        requests,
        errors,
        histogram,
        trace,
    }
}

/// Time to the first body byte and to the end, for one streamed request.
pub async fn first_byte_and_total(
    address: SocketAddr,
    request: Request<Full<Bytes>>,
) -> Option<(Duration, Duration)> {
    let mut sender = connect(address).await?;
    let begun = Instant::now();
    let response = sender.send_request(request).await.ok()?;
    let mut body = response.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if frame.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
            first = Some(begun.elapsed());
        }
    }
    Some((first?, begun.elapsed()))
}
