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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// How long a client may take to send a request head, counted from when
    /// the connection starts waiting for one (at accept, and after each
    /// answer). So it also closes connections idle between requests: a slow
    /// or silent client holds a connection no longer than this.
    pub header_read_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` is cancelled, then waits for the
/// open connections to finish what they are doing.
pub async fn serve(
    listener: TcpListener,
    app: Router,
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
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it
                // was accepted: wait a moment rather than spin.
                tracing::warn!(%error, "Accept failed.");
                tokio::time::sleep(Duration::from_millis(10)).await;
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
        });
        let service = TrackingService {
            app: app.clone(),
            clock,
        };
        let connection = graceful.watch(builder.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "Client connection ended with an error.");
            }
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
}

impl ConnectionClock {
    fn new() -> Self {
        ConnectionClock {
            origin: Instant::now(),
            busy: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
        }
    }

    fn request_started(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    fn answer_finished(&self) {
        let since = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.store(since, Ordering::Relaxed);
        self.busy.store(false, Ordering::Relaxed);
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
            return Poll::Pending;
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
        Pin::new(&mut self.get_mut().stream).poll_write(context, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(context, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(context)
    }
}

/// The app as hyper calls it, marking the connection busy from a request's
/// head until its answer's body is done.
#[derive(Clone)]
struct TrackingService {
    app: Router,
    clock: Arc<ConnectionClock>,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for TrackingService {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedAnswer;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        self.clock.request_started();
        TrackedAnswer {
            answer: self.app.clone().call(request.map(Body::new)),
            clock: Some(Arc::clone(&self.clock)),
        }
    }
}

/// The app's answer, its body wrapped as a `TrackedBody` once it comes. A
/// named future rather than a boxed one: no allocation per request.
struct TrackedAnswer {
    answer: axum::routing::future::RouteFuture<Infallible>,
    clock: Option<Arc<ConnectionClock>>,
}

impl Future for TrackedAnswer {
    type Output = Result<hyper::Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Poll::Ready(Ok(response)) = Pin::new(&mut this.answer).poll(context) else {
            return Poll::Pending;
        };
        let clock = this.clock.take();
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
