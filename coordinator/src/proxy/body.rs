//! The body of a proxied answer: the node's body passed on frame by frame as
//! it arrives, with an idle timeout between frames, holding the node's
//! in-flight count for exactly as long as the answer lives.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::upstream::PooledConnection;

/// Counts one request in flight to a node. Dropping it is the only way the
/// count goes down, so completion, error and client disconnect (which drops
/// the response body) are one path and the count cannot drift. For a node
/// with a capacity, dropping it also gives the freed slot to the queue.
#[derive(Debug)]
pub struct InFlightGuard {
    counter: Arc<AtomicU64>,
    release: Option<(
        Arc<super::queue::WaitQueue>,
        Arc<crate::balancer::Candidate>,
    )>,
}

impl InFlightGuard {
    pub fn new(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            counter: Arc::clone(counter),
            release: None,
        }
    }

    /// A slot at `node`, if it has one free: never more in flight than its
    /// capacity (0: no limit), whatever the event loops do at once.
    pub fn reserve(
        node: &Arc<crate::balancer::Candidate>,
        queue: &Arc<super::queue::WaitQueue>,
    ) -> Option<Self> {
        if node.capacity == 0 {
            return Some(Self::new(&node.in_flight));
        }
        node.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < node.capacity).then_some(n + 1)
            })
            .ok()?;
        Some(InFlightGuard {
            counter: Arc::clone(&node.in_flight),
            release: Some((Arc::clone(queue), Arc::clone(node))),
        })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // Sequentially consistent with the queue's count (see `queue`).
        self.counter.fetch_sub(1, Ordering::SeqCst);
        if let Some((queue, node)) = &self.release {
            queue.slot_freed(node);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error("the node sent nothing for {0:?}")]
    Idle(Duration),
    #[error("reading the node's answer: {0}")]
    Read(#[from] hyper::Error),
}

/// It drives the node's connection while it is read. Dropping it (the
/// client went away) drops that connection, which closes it: the node sees
/// the disconnect and stops generating.
pub struct UpstreamBody {
    inner: Incoming,
    connection: PooledConnection,
    idle_timeout: Duration,
    /// Armed only once the node makes us wait: most answers are whole in
    /// the first read and need no timer at all.
    idle: Option<Pin<Box<Sleep>>>,
    _in_flight: InFlightGuard,
    /// The request's accounting, recorded when this body is dropped (read
    /// whole, cut, or abandoned by the client): set on the answer that
    /// stands, not on a 5xx that is retried elsewhere.
    account: Option<crate::telemetry::RequestAccount>,
}

impl UpstreamBody {
    pub fn new(
        inner: Incoming,
        connection: PooledConnection,
        idle_timeout: Duration,
        in_flight: InFlightGuard,
    ) -> Self {
        UpstreamBody {
            inner,
            connection,
            idle_timeout,
            idle: None,
            _in_flight: in_flight,
            account: None,
        }
    }

    /// This body is the request's answer: its accounting goes with it.
    pub fn with_account(mut self, account: crate::telemetry::RequestAccount) -> Self {
        self.account = Some(account);
        self
    }

    fn poll_inner(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(context) {
            return Poll::Ready(frame);
        }
        // Nothing buffered: let the connection read, then look again.
        self.connection.poll_drive(context);
        Pin::new(&mut self.inner).poll_frame(context)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Read whole, the connection can serve again; cut short, it is
        // dropped and so closed, which tells the node to stop.
        if self.inner.is_end_stream() {
            self.connection.release();
        }
        // The account, if any, is recorded as it drops with this body.
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match this.poll_inner(cx) {
            Poll::Ready(None) => {
                this.connection.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                // hyper stops polling a body whose end it knows (its length
                // was given), so the connection goes back on the last frame.
                if this.inner.is_end_stream() {
                    this.connection.release();
                } else if let Some(idle) = &mut this.idle {
                    idle.as_mut().reset(Instant::now() + this.idle_timeout);
                }
                Poll::Ready(Some(frame.map_err(UpstreamBodyError::Read)))
            }
            Poll::Pending => {
                let timeout = this.idle_timeout;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match idle.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(UpstreamBodyError::Idle(timeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
