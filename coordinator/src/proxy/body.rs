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

/// Counts one request in flight to a node. Dropping it is the only way the
/// count goes down, so completion, error and client disconnect (which drops
/// the response body) are one path and the count cannot drift.
#[derive(Debug)]
pub struct InFlightGuard {
    counter: Arc<AtomicU64>,
}

impl InFlightGuard {
    pub fn new(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            counter: Arc::clone(counter),
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error("the node sent nothing for {0:?}")]
    Idle(Duration),
    #[error("reading the node's answer: {0}")]
    Read(#[from] hyper::Error),
}

/// Dropping it (the client went away) drops the node's body, which closes
/// that connection: the node sees the disconnect and stops generating.
pub struct UpstreamBody {
    inner: Incoming,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _in_flight: InFlightGuard,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, idle_timeout: Duration, in_flight: InFlightGuard) -> Self {
        UpstreamBody {
            inner,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            _in_flight: in_flight,
        }
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + this.idle_timeout;
                this.idle.as_mut().reset(deadline);
                Poll::Ready(frame.map(|result| result.map_err(UpstreamBodyError::Read)))
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(UpstreamBodyError::Idle(this.idle_timeout))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
