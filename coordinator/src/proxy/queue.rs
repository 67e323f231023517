//! The queue at the router: requests for a model whose every node is at its
//! capacity wait here, in arrival order, and each slot a node frees goes to
//! the first waiter that node can serve.
//!
//! A waiter is woken (its turn came), not handed a node: it plans again and
//! reserves a slot like any request. A request that arrives while others
//! wait for its model queues behind them rather than taking a freed slot
//! first; a woken waiter that finds no slot (the table changed) goes back
//! to the front. A waiter that leaves (timeout, client gone) is removed at
//! once; one woken but gone before it used its turn passes the turn on.
//!
//! No turn is lost between a waiter's last look and its entry: the one who
//! frees a slot decrements the node's count, then looks at the queue; the
//! one who enters joins the queue, then looks at the nodes' counts again
//! (`Proxy::forward`), all sequentially consistent, so at least one of
//! them sees the other.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::balancer::{ApiKind, Candidate};

#[derive(Debug)]
pub struct WaitQueue {
    waiters: Mutex<VecDeque<Waiter>>,
    /// Requests that may wait at once (`--queue-size`; 0: none).
    limit: usize,
    /// How long one may wait (`--queue-timeout`).
    pub timeout: Duration,
    next_id: AtomicU64,
    /// How many wait now, read without the lock: with nobody waiting (the
    /// usual case) a request never touches the queue's mutex.
    waiting: std::sync::atomic::AtomicUsize,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    model: Arc<str>,
    api: ApiKind,
    wake: oneshot::Sender<()>,
}

/// Why a request could not wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRefusal {
    Full,
    TimedOut,
}

/// A place in the queue, held while waiting; dropping it leaves the queue.
pub struct Ticket<'a> {
    queue: &'a WaitQueue,
    id: u64,
    model: Arc<str>,
    woken: Option<oneshot::Receiver<()>>,
    entered: Instant,
}

impl WaitQueue {
    pub fn new(limit: usize, timeout: Duration) -> Self {
        WaitQueue {
            waiters: Mutex::new(VecDeque::new()),
            limit,
            timeout,
            next_id: AtomicU64::new(1),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiter>> {
        self.waiters
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Whether requests for this model already wait: a new one queues
    /// behind them.
    pub fn has_waiters_for(&self, model: &str, api: ApiKind) -> bool {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let key = crate::balancer::model_key(model);
        // Whatever API they came in on, they wait for the same nodes.
        let _ = api;
        self.lock().iter().any(|w| &*w.model == key)
    }

    /// Takes a place at the back (or, for a waiter whose turn found no
    /// slot, the front).
    pub fn enter(
        &self,
        model: &str,
        api: ApiKind,
        front: bool,
    ) -> Result<Ticket<'_>, QueueRefusal> {
        let mut waiters = self.lock();
        if waiters.len() >= self.limit {
            return Err(QueueRefusal::Full);
        }
        let (wake, woken) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let model: Arc<str> = Arc::from(crate::balancer::model_key(model));
        let waiter = Waiter {
            id,
            model: Arc::clone(&model),
            api,
            wake,
        };
        if front {
            waiters.push_front(waiter);
        } else {
            waiters.push_back(waiter);
        }
        self.counted(waiters.len());
        Ok(Ticket {
            queue: self,
            id,
            model,
            woken: Some(woken),
            entered: Instant::now(),
        })
    }

    /// A slot freed at `node`: the first waiter it can serve gets its turn.
    pub fn slot_freed(&self, node: &Candidate) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut waiters = self.lock();
        if waiters.is_empty() {
            return;
        }
        let serves = |waiter: &Waiter| {
            waiter.api.serves(node.backend)
                && node
                    .models
                    .iter()
                    .any(|m| crate::balancer::model_key(m) == &*waiter.model)
        };
        while let Some(position) = waiters.iter().position(serves) {
            let Some(waiter) = waiters.remove(position) else {
                break;
            };
            // A waiter whose request is gone cannot take it: the next can.
            if waiter.wake.send(()).is_ok() {
                break;
            }
        }
        self.counted(waiters.len());
    }

    /// A turn that was given and not used: to the next waiter for the
    /// same model.
    fn pass_on(&self, model: &str) {
        let mut waiters = self.lock();
        while let Some(position) = waiters.iter().position(|w| &*w.model == model) {
            let Some(waiter) = waiters.remove(position) else {
                break;
            };
            if waiter.wake.send(()).is_ok() {
                break;
            }
        }
        self.counted(waiters.len());
    }

    /// Keeps the lock-free count and the gauge equal to the queue's length.
    fn counted(&self, length: usize) {
        self.waiting.store(length, Ordering::SeqCst);
        metrics::gauge!(crate::telemetry::QUEUE_LENGTH).set(length as f64);
    }

    fn leave(&self, id: u64) -> bool {
        let mut waiters = self.lock();
        let Some(position) = waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        waiters.remove(position);
        self.counted(waiters.len());
        true
    }
}

impl Ticket<'_> {
    /// Waits for this request's turn, until `deadline`.
    pub async fn turn(&mut self, deadline: tokio::time::Instant) -> Result<(), QueueRefusal> {
        let Some(woken) = self.woken.as_mut() else {
            return Ok(());
        };
        let answer = tokio::time::timeout_at(deadline, woken).await;
        metrics::histogram!(crate::telemetry::QUEUE_WAIT).record(self.entered.elapsed());
        match answer {
            Ok(Ok(())) => {
                self.woken = None;
                Ok(())
            }
            // Dropped from the queue without a turn cannot happen while
            // the ticket lives; treat it as the end of the wait.
            Ok(Err(_)) | Err(_) => Err(QueueRefusal::TimedOut),
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // Still queued (timed out, or the client went away): leave. Given a
        // turn it never took up: pass it on.
        if !self.queue.leave(self.id) {
            if let Some(mut woken) = self.woken.take() {
                if woken.try_recv().is_ok() {
                    self.queue.pass_on(&self.model);
                }
            }
        }
    }
}
