//! Connections to nodes: pooled per node address, and driven by the task
//! that uses them.
//!
//! hyper's usual client spawns a task per connection and hands every request
//! and answer across a channel to it: two task wake-ups per request, often on
//! the other core. Here the request's own task polls the connection while it
//! waits for the answer's head, and the answer's body keeps polling it while
//! the body streams; when the body ends the connection goes back to the pool.
//! A body dropped early (the client went away) drops the connection, which
//! closes it, so the node sees the disconnect and stops generating.
//!
//! Idle connections are kept per thread: the router serves each client
//! connection on one thread from accept to close (one event loop per core),
//! and a node connection stays with the thread whose event loop owns it.
//! They are bounded three ways, so that they cannot eat the process's file
//! descriptors: at most [`MAX_IDLE_PER_NODE`] per node and thread, at most
//! `max_idle` in the whole process, and none older than `idle_timeout`.
//! Each event loop runs [`UpstreamPool::prune`] every second, which also
//! closes at once the connections of nodes that were removed or moved, and
//! those the node has closed (which would otherwise sit in CLOSE-WAIT).

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Io = TokioIo<NodeStream>;

/// Where a node's LLM server is, and whether it speaks HTTPS: the key of
/// its pooled connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeEndpoint {
    pub address: SocketAddr,
    pub tls: bool,
}

/// A connection to a node: plain TCP, or TLS over it.
pub enum NodeStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for NodeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            NodeStream::Plain(stream) => Pin::new(stream).poll_read(context, buffer),
            NodeStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl tokio::io::AsyncWrite for NodeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            NodeStream::Plain(stream) => Pin::new(stream).poll_write(context, buffer),
            NodeStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, buffer),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            NodeStream::Plain(stream) => Pin::new(stream).poll_flush(context),
            NodeStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            NodeStream::Plain(stream) => Pin::new(stream).poll_shutdown(context),
            NodeStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }
}

/// Idle connections kept per node; more than the busiest node needs at once
/// is wasted file descriptors.
const MAX_IDLE_PER_NODE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connecting: timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the node closed the connection before answering")]
    Closed,
    #[error("TLS with the node: {0}")]
    Tls(#[source] std::io::Error),
}

/// One HTTP/1.1 connection to a node: the request half and the connection
/// future that does its I/O. Kept boxed from its opening to its close: it
/// is some 700 bytes, and it moves into the pool, out of it, into the
/// request and into the answer's body for every request.
pub struct UpstreamConnection {
    sender: SendRequest<Full<Bytes>>,
    connection: Connection<Io, Full<Bytes>>,
    /// Taken from the pool rather than opened for this request.
    reused: bool,
}

/// A connection waiting in the pool, and since when.
struct IdleConnection {
    connection: Box<UpstreamConnection>,
    since: Instant,
}

thread_local! {
    static IDLE: RefCell<foldhash::HashMap<NodeEndpoint, Vec<IdleConnection>>> = RefCell::default();
}

pub struct UpstreamPool {
    connect_timeout: Duration,
    /// How long a connection may wait in the pool.
    idle_timeout: Duration,
    /// Idle connections in the whole process, at most.
    max_idle: usize,
    /// Idle connections now, over every thread's pool.
    idle_count: AtomicUsize,
    /// For nodes that speak HTTPS.
    tls: tokio_rustls::TlsConnector,
}

impl UpstreamPool {
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
        tls: tokio_rustls::TlsConnector,
    ) -> Arc<Self> {
        Arc::new(UpstreamPool {
            connect_timeout,
            idle_timeout,
            max_idle,
            idle_count: AtomicUsize::new(0),
            tls,
        })
    }

    /// Whether this thread keeps any idle connection.
    pub fn has_idle_on_this_thread(&self) -> bool {
        IDLE.with_borrow(|idle| !idle.is_empty())
    }

    /// Idle connections now, over every thread.
    pub fn idle_connections(&self) -> usize {
        self.idle_count.load(Ordering::Relaxed)
    }

    /// Closes this thread's idle connections that are too old, that the node
    /// has closed, or whose node `keep` no longer names (removed, or at
    /// another address now).
    pub fn prune(&self, keep: impl Fn(SocketAddr) -> bool) {
        let now = Instant::now();
        let mut closed = 0;
        IDLE.with_borrow_mut(|idle| {
            idle.retain(|endpoint, connections| {
                let before = connections.len();
                if keep(endpoint.address) {
                    connections.retain_mut(|idle| {
                        now.duration_since(idle.since) < self.idle_timeout
                            && still_open(&mut idle.connection)
                    });
                } else {
                    connections.clear();
                }
                closed += before - connections.len();
                !connections.is_empty()
            });
        });
        self.idle_count.fetch_sub(closed, Ordering::Relaxed);
    }

    /// Sends the request `build` makes to `address` and returns the answer's
    /// head; its body comes with the connection that must keep being polled
    /// to read it.
    pub async fn send(
        self: &Arc<Self>,
        address: NodeEndpoint,
        build: impl Fn() -> Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, PooledConnection), UpstreamError> {
        // The rare steps (opening a connection, TLS included, and the retry)
        // are boxed, so that their state is not part of every request's.
        let connection = match self.checkout(address) {
            Some(connection) => connection,
            None => Box::pin(self.connect(address)).await?,
        };
        match self.send_on(address, connection, build()).await {
            // A pooled connection the node closed meanwhile may show it only
            // when used; that says nothing of the node, so the request goes
            // again, once, on a new connection.
            Err((UpstreamError::Http(_) | UpstreamError::Closed, true)) => {
                let fresh = Box::pin(self.connect(address)).await?;
                Box::pin(self.send_on(address, fresh, build()))
                    .await
                    .map_err(|(error, _)| error)
            }
            other => other.map_err(|(error, _)| error),
        }
    }

    async fn send_on(
        self: &Arc<Self>,
        address: NodeEndpoint,
        mut connection: Box<UpstreamConnection>,
        request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, PooledConnection), (UpstreamError, bool)> {
        let reused = connection.reused;
        let UpstreamConnection {
            sender,
            connection: driver,
            ..
        } = &mut *connection;
        // Wait until the connection takes a request, driving it meanwhile.
        drive_until(driver, sender.ready())
            .await
            .map_err(|error| (error, reused))?;
        let answer = sender.send_request(request);
        let response = drive_until(driver, answer)
            .await
            .map_err(|error| (error, reused))?;
        Ok((
            response,
            PooledConnection {
                connection: Some(connection),
                pool: Arc::clone(self),
                address,
            },
        ))
    }

    fn checkout(&self, address: NodeEndpoint) -> Option<Box<UpstreamConnection>> {
        IDLE.with_borrow_mut(|idle| {
            let connections = idle.get_mut(&address)?;
            while let Some(IdleConnection {
                mut connection,
                since,
            }) = connections.pop()
            {
                self.idle_count.fetch_sub(1, Ordering::Relaxed);
                if since.elapsed() < self.idle_timeout && still_open(&mut connection) {
                    connection.reused = true;
                    return Some(connection);
                }
            }
            None
        })
    }

    fn checkin(&self, address: NodeEndpoint, connection: Box<UpstreamConnection>) {
        if connection.sender.is_closed() {
            return;
        }
        // Counted before it is kept, so that threads checking in at once
        // cannot pass the cap together.
        if self.idle_count.fetch_add(1, Ordering::Relaxed) >= self.max_idle {
            self.idle_count.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        IDLE.with_borrow_mut(|idle| {
            let connections = idle.entry(address).or_default();
            if connections.len() < MAX_IDLE_PER_NODE {
                connections.push(IdleConnection {
                    connection,
                    since: Instant::now(),
                });
            } else {
                self.idle_count.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }

    async fn connect(
        &self,
        endpoint: NodeEndpoint,
    ) -> Result<Box<UpstreamConnection>, UpstreamError> {
        let connected = async {
            let stream = TcpStream::connect(endpoint.address)
                .await
                .map_err(UpstreamError::Connect)?;
            let _ = stream.set_nodelay(true);
            if !endpoint.tls {
                return Ok::<_, UpstreamError>(NodeStream::Plain(stream));
            }
            // Nodes register by address: their certificate must name it.
            let name = rustls::pki_types::ServerName::IpAddress(endpoint.address.ip().into());
            let stream = self
                .tls
                .connect(name, stream)
                .await
                .map_err(UpstreamError::Tls)?;
            Ok(NodeStream::Tls(Box::new(stream)))
        };
        let stream = tokio::time::timeout(self.connect_timeout, connected)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(self.connect_timeout))??;
        // Requests go out as one buffer rather than a vectored write.
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await?;
        Ok(Box::new(UpstreamConnection {
            sender,
            connection,
            reused: false,
        }))
    }
}

/// Whether an idle connection is still usable: one poll shows a close the
/// node made while nobody was looking (and lets hyper close our end).
fn still_open(connection: &mut UpstreamConnection) -> bool {
    let mut context = Context::from_waker(std::task::Waker::noop());
    let ended = Pin::new(&mut connection.connection)
        .poll(&mut context)
        .is_ready();
    !ended && !connection.sender.is_closed()
}

/// Polls `future` to completion while also polling the connection that
/// makes it progress. The connection ending first is an error, unless the
/// future got its result on the way: a node that answers with
/// `Connection: close` ends the connection in the same poll that delivers
/// the answer, and that answer is good.
async fn drive_until<T>(
    driver: &mut Connection<Io, Full<Bytes>>,
    future: impl Future<Output = Result<T, hyper::Error>>,
) -> Result<T, UpstreamError> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|context| {
        if let Poll::Ready(result) = future.as_mut().poll(context) {
            return Poll::Ready(result.map_err(UpstreamError::Http));
        }
        let ended = match Pin::new(&mut *driver).poll(context) {
            Poll::Ready(Ok(())) => UpstreamError::Closed,
            Poll::Ready(Err(error)) => UpstreamError::Http(error),
            Poll::Pending => return Poll::Pending,
        };
        if let Poll::Ready(result) = future.as_mut().poll(context) {
            return Poll::Ready(result.map_err(UpstreamError::Http));
        }
        Poll::Ready(Err(ended))
    })
    .await
}

/// A connection in use by one answer's body. `poll` drives it; `release`
/// returns it to the pool once the body has ended; dropping it closes it.
pub struct PooledConnection {
    connection: Option<Box<UpstreamConnection>>,
    pool: Arc<UpstreamPool>,
    address: NodeEndpoint,
}

impl PooledConnection {
    /// Lets the connection do its I/O. Once it has ended it is not polled again.
    pub fn poll_drive(&mut self, context: &mut Context<'_>) {
        if let Some(connection) = &mut self.connection {
            if Pin::new(&mut connection.connection)
                .poll(context)
                .is_ready()
            {
                self.connection = None;
            }
        }
    }

    /// The body ended: the connection can serve another request.
    pub fn release(&mut self) {
        if let Some(connection) = self.connection.take() {
            self.pool.checkin(self.address, connection);
        }
    }
}
