//! The HTTP/1.1 server loop: accept, serve each connection on the thread
//! that accepted it, and on shutdown stop accepting and let open
//! connections finish their requests.
//!
//! hyper's HTTP/1 server is used directly rather than through `axum::serve`:
//! every client of an LLM server speaks HTTP/1.1, the version sniffing of
//! the generic server costs a read per connection, and the direct builder
//! exposes the connection settings that limits need.
//!
//! The header read timeout is ours rather than hyper's. hyper's allocates
//! and registers a new timer for every request, which cost a fifth of the
//! heartbeat rate in the benchmarks. Ours is one timer per connection,
//! armed when the connection first waits for a request head and moved
//! only when it fires: per request, it costs a clock read.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::api::{App, AppFuture};

/// Connection settings.
#[derive(Clone)]
pub struct ServeOptions {
    /// How long a client may take to send a request head, counted from when
    /// the connection starts waiting for one (at accept, and after each
    /// answer). So it also closes connections idle between requests: a slow
    /// or silent client holds a connection no longer than this.
    pub header_read_timeout: Duration,
    /// How long a write to a client may wait for the client to read: past
    /// it the connection is closed, which ends the answer and so frees the
    /// node's generation and the request's in-flight count.
    pub send_timeout: Duration,
    /// Client connections open at once, shared by every event loop.
    pub limits: Arc<ConnectionLimits>,
    /// Serve HTTPS with this, when configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// How many client connections may be open: in all, and from one address.
/// Past either, a new connection is answered `503` and closed at once, so
/// that descriptors stay for the clients and agents already connected.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    /// 0: no limit per address.
    max_per_client: usize,
    total: AtomicUsize,
    per_client: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        ConnectionLimits {
            max_total,
            max_per_client,
            total: AtomicUsize::new(0),
            per_client: std::sync::Mutex::default(),
        }
    }

    /// A slot for a new connection from `client`, or why there is none.
    fn admit(self: &Arc<Self>, client: std::net::IpAddr) -> Result<ConnectionSlot, &'static str> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err("the router has as many connections open as --max-connections allows");
        }
        if self.max_per_client > 0 {
            let mut per_client = self
                .per_client
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let open = per_client.entry(client).or_insert(0);
            if *open >= self.max_per_client {
                drop(per_client);
                self.total.fetch_sub(1, Ordering::Relaxed);
                return Err("this address has as many connections open as --max-connections-per-client allows");
            }
            *open += 1;
        }
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            client,
        })
    }
}

/// One admitted connection; dropping it frees its place.
struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    client: std::net::IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
        if self.limits.max_per_client > 0 {
            let mut per_client = self
                .limits
                .per_client
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(open) = per_client.get_mut(&self.client) {
                *open -= 1;
                if *open == 0 {
                    per_client.remove(&self.client);
                }
            }
        }
    }
}

/// Answers a connection over the limits and closes it, without reading the
/// request: the client gets a reason rather than a reset.
fn shed(stream: TcpStream, reason: &str) {
    let body = format!(
        "{{\"error\":{{\"code\":\"too_many_connections\",\"message\":\"{reason}; retry later\"}}}}"
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // A fresh socket's send buffer takes this whole; if not, the client
    // gets a reset instead, which is what shedding would be anyway.
    let _ = stream.try_write(answer.as_bytes());
    tracing::debug!(reason, "Connection shed.");
}

/// Serves `app` on `listener` until `stop` is cancelled, then waits for the
/// open connections to finish what they are doing.
pub async fn serve(
    listener: TcpListener,
    app: App,
    options: ServeOptions,
    stop: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Small answers go out as one buffer rather than a vectored write.
    builder.writev(false);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it
                // was accepted: wait a moment rather than spin.
                tracing::warn!(%error, "Accept failed.");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let slot = match options.limits.admit(client.ip()) {
            Ok(slot) => slot,
            Err(reason) => {
                shed(stream, reason);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let clock = Arc::new(ConnectionClock::new());
        let io = TokioIo::new(HeadDeadline {
            stream,
            clock: Arc::clone(&clock),
            timeout: options.header_read_timeout,
            timer: None,
            send_timeout: options.send_timeout,
            write_stall: None,
            write_stalled: false,
        });
        let service = TrackingService {
            app: app.clone(),
            clock,
        };
        let Some(tls) = &options.tls else {
            let connection = graceful.watch(builder.serve_connection(io, service));
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "Client connection ended with an error.");
                }
                drop(slot);
            });
            continue;
        };
        // The handshake happens on the connection's own task; the head
        // deadline bounds it, as it bounds a silent plain connection.
        let (tls, watcher, builder) = (tls.clone(), graceful.watcher(), builder.clone());
        tokio::spawn(async move {
            let stream = match tls.accept(io.into_inner()).await {
                Ok(stream) => stream,
                Err(error) => {
                    return tracing::debug!(%error, "TLS handshake failed.");
                }
            };
            let connection = watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
            if let Err(error) = connection.await {
                tracing::debug!(%error, "Client connection ended with an error.");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Whether a connection is serving a request, and since when it has been
/// waiting for the next head. One connection lives on one thread; the
/// atomics are only there because hyper's connection futures must be `Send`.
struct ConnectionClock {
    origin: Instant,
    busy: AtomicBool,
    /// Nanoseconds after `origin` at which the wait for a head began.
    idle_since: AtomicU64,
    /// The read that found the connection busy, and so set no deadline: it
    /// is woken when the answer ends, to set one. Without this, hyper's read
    /// stays parked on the socket and an idle connection is never timed out.
    parked_read: std::sync::Mutex<Option<std::task::Waker>>,
    /// The current request has a body not yet read to its end.
    request_body_unread: AtomicBool,
}

impl ConnectionClock {
    fn new() -> Self {
        ConnectionClock {
            origin: Instant::now(),
            busy: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            parked_read: std::sync::Mutex::new(None),
            request_body_unread: AtomicBool::new(false),
        }
    }

    fn request_started(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    fn answer_finished(&self) {
        let since = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.store(since, Ordering::Relaxed);
        self.busy.store(false, Ordering::Relaxed);
        let parked = self
            .parked_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(waker) = parked {
            waker.wake();
        }
    }

    /// Remembers the read to wake when the answer ends.
    fn park_read(&self, waker: &std::task::Waker) {
        let mut parked = self
            .parked_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !parked.as_ref().is_some_and(|old| old.will_wake(waker)) {
            *parked = Some(waker.clone());
        }
    }

    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// When the current wait for a head runs out.
    fn head_deadline(&self, timeout: Duration) -> Instant {
        self.origin + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed)) + timeout
    }
}

/// The client's socket, failing reads with `TimedOut` once the connection
/// has waited longer than the timeout for a request head.
struct HeadDeadline {
    stream: TcpStream,
    clock: Arc<ConnectionClock>,
    timeout: Duration,
    /// Made when the connection first waits, then only moved when it fires.
    timer: Option<Pin<Box<Sleep>>>,
    send_timeout: Duration,
    /// Made when a write first finds the client not reading; moved at each
    /// new stall.
    write_stall: Option<Pin<Box<Sleep>>>,
    /// A write is waiting for the client now.
    write_stalled: bool,
}

impl HeadDeadline {
    /// What a write that made no progress returns: still pending, or, once
    /// the client has read nothing for the send timeout, an error that ends
    /// the connection.
    fn write_pending<T>(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let deadline = tokio::time::Instant::now() + self.send_timeout;
        let timer = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.write_stalled {
            self.write_stalled = true;
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(context).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing of its answer within the send timeout",
            )));
        }
        Poll::Pending
    }

    fn wrote<T>(
        &mut self,
        result: Poll<std::io::Result<T>>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        match result {
            Poll::Pending => self.write_pending(context),
            ready => {
                self.write_stalled = false;
                ready
            }
        }
    }
}

impl AsyncRead for HeadDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(read) = Pin::new(&mut this.stream).poll_read(context, buf) {
            return Poll::Ready(read);
        }
        // While a request is served, reads only watch for the client
        // leaving: no deadline then (a generation may take minutes).
        if this.clock.is_busy() {
            this.clock.park_read(context.waker());
            // The answer may have ended between the check and the parking.
            if this.clock.is_busy() {
                return Poll::Pending;
            }
        }
        let clock = &this.clock;
        let timeout = this.timeout;
        let timer = this.timer.get_or_insert_with(|| {
            Box::pin(tokio::time::sleep_until(
                clock.head_deadline(timeout).into(),
            ))
        });
        // The timer may be for an earlier wait: when it fires, look at the
        // current one, and either give up or move the timer to it.
        while timer.as_mut().poll(context).is_ready() {
            let deadline = clock.head_deadline(timeout);
            if Instant::now() >= deadline {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request head within the header read timeout",
                )));
            }
            timer.as_mut().reset(deadline.into());
        }
        Poll::Pending
    }
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(context, buf);
        this.wrote(result, context)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(context, bufs);
        this.wrote(result, context)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_flush(context);
        this.wrote(result, context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(context)
    }
}

/// The app as hyper calls it, marking the connection busy from a request's
/// head until its answer's body is done.
#[derive(Clone)]
struct TrackingService {
    app: App,
    clock: Arc<ConnectionClock>,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for TrackingService {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedAnswer;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        use http_body::Body as _;
        self.clock.request_started();
        let has_body = !request.body().is_end_stream();
        self.clock
            .request_body_unread
            .store(has_body, Ordering::Relaxed);
        let request = if has_body {
            let clock = Arc::clone(&self.clock);
            request.map(|inner| Body::new(RequestBody { inner, clock }))
        } else {
            request.map(Body::new)
        };
        TrackedAnswer {
            answer: self.app.call(request),
            clock: Some(Arc::clone(&self.clock)),
        }
    }
}

/// A request's body that tells its connection when it has been read to its
/// end. An answer given before that (a refusal, a body over the limit, one
/// that stalled) says `Connection: close`: hyper closes a connection whose
/// request body was left unread, but it notices only after it has written
/// the answer's head without saying so, and a client that pools connections
/// would send its next request into the closing one.
struct RequestBody {
    inner: hyper::body::Incoming,
    clock: Arc<ConnectionClock>,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(context);
        if matches!(frame, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.clock
                .request_body_unread
                .store(false, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The app's answer, its body wrapped as a `TrackedBody` once it comes. A
/// named future rather than a boxed one: no allocation per request.
struct TrackedAnswer {
    answer: AppFuture,
    clock: Option<Arc<ConnectionClock>>,
}

impl Future for TrackedAnswer {
    type Output = Result<hyper::Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Poll::Ready(mut response) = Pin::new(&mut this.answer).poll(context) else {
            return Poll::Pending;
        };
        let clock = this.clock.take();
        if clock
            .as_ref()
            .is_some_and(|clock| clock.request_body_unread.load(Ordering::Relaxed))
        {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, clock })))
    }
}

/// An answer's body that tells its connection when it is done (read whole,
/// or dropped because the client left).
struct TrackedBody {
    inner: Body,
    clock: Option<Arc<ConnectionClock>>,
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if let Some(clock) = self.clock.take() {
            clock.answer_finished();
        }
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
