//! The queue from the registry to the store's writer thread.
//!
//! A change is queued under the registry's write lock, so that the journal
//! holds changes in the order the registry applied them. Waking the writer
//! is left for after that lock is released ([`Inbox::push`], then
//! [`Inbox::wake`]): a wake is a system call, and the woken writer often
//! takes the CPU from the thread that woke it at once. With a channel that
//! woke the writer on send, that thread then sat descheduled holding the
//! write lock, and every other registration, and every heartbeat queued
//! behind a waiting writer, stood still with it (issue 16, eleventh
//! session: 1,545 of an event loop's context switches in 3 s of storm fell
//! inside that send).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub(super) struct Inbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    queued: Vec<T>,
    /// The writer is waiting on `ready` (or about to): a wake must notify.
    writer_waiting: bool,
    /// Every sending handle is gone: the writer drains what is left, then
    /// stops.
    closed: bool,
}

/// The writer's queue is closed and empty.
#[derive(Debug)]
pub(super) struct Closed;

impl<T> Inbox<T> {
    pub(super) fn new() -> Self {
        Inbox {
            state: Mutex::new(State {
                queued: Vec::new(),
                writer_waiting: false,
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    /// Queues `item` without waking the writer; the caller must call
    /// [`Inbox::wake`] once it holds no lock that matters.
    pub(super) fn push(&self, item: T) -> Result<(), Closed> {
        let mut state = self.lock();
        if state.closed {
            return Err(Closed);
        }
        state.queued.push(item);
        Ok(())
    }

    /// Queues `item` and wakes the writer.
    pub(super) fn send(&self, item: T) -> Result<(), Closed> {
        self.push(item)?;
        self.wake();
        Ok(())
    }

    /// Wakes the writer if it waits. Cheap when it does not: a storm keeps
    /// the writer busy, and then no wake is a system call.
    pub(super) fn wake(&self) {
        let mut state = self.lock();
        if std::mem::take(&mut state.writer_waiting) {
            drop(state);
            self.ready.notify_one();
        }
    }

    /// No more items will come: the writer takes what is queued, then
    /// [`Inbox::receive`] says `Closed`.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Waits up to `timeout` for something queued, then moves up to `max`
    /// items into `batch` (none on a timeout). `Closed` once every handle
    /// is gone and nothing is left.
    pub(super) fn receive(
        &self,
        timeout: Duration,
        max: usize,
        batch: &mut Vec<T>,
    ) -> Result<(), Closed> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.queued.is_empty() && !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            state.writer_waiting = true;
            state = self
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(|poison| poison.into_inner())
                .0;
            state.writer_waiting = false;
        }
        if state.queued.is_empty() {
            return Err(Closed);
        }
        if state.queued.len() <= max && batch.is_empty() {
            std::mem::swap(&mut state.queued, batch);
        } else {
            let take = state.queued.len().min(max);
            batch.extend(state.queued.drain(..take));
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock leaves a consistent queue: every
        // critical section is one push, swap or flag.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_pushed_item_waits_for_its_wake_and_none_is_lost() {
        let inbox = Arc::new(Inbox::new());
        let writer = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                loop {
                    let mut batch = Vec::new();
                    match inbox.receive(Duration::from_secs(30), 7, &mut batch) {
                        Ok(()) => seen.extend(batch),
                        Err(Closed) => return seen,
                    }
                }
            })
        };
        let senders: Vec<_> = (0..4)
            .map(|sender| {
                let inbox = Arc::clone(&inbox);
                std::thread::spawn(move || {
                    for n in 0..5_000u32 {
                        inbox.push(sender * 10_000 + n).expect("open");
                        inbox.wake();
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.join().expect("sender");
        }
        inbox.close();
        let seen = writer.join().expect("writer");
        assert_eq!(seen.len(), 20_000);
        // Each sender's items arrive in the order it pushed them.
        for sender in 0..4u32 {
            let mine: Vec<_> = seen.iter().filter(|&&n| n / 10_000 == sender).collect();
            assert!(mine.windows(2).all(|pair| pair[0] < pair[1]));
        }
    }

    #[test]
    fn a_writer_that_waits_wakes_on_wake_and_times_out_without() {
        let inbox = Arc::new(Inbox::<u8>::new());
        let mut batch = Vec::new();
        let started = Instant::now();
        inbox
            .receive(Duration::from_millis(50), 10, &mut batch)
            .expect("received");
        assert!(batch.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(50));

        let writer = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                let mut batch = Vec::new();
                inbox
                    .receive(Duration::from_secs(60), 10, &mut batch)
                    .expect("received");
                batch
            })
        };
        // Wait until the writer sleeps, then hand it one item.
        while !inbox.lock().writer_waiting {
            std::thread::yield_now();
        }
        inbox.push(9).expect("open");
        inbox.wake();
        assert_eq!(writer.join().expect("writer"), vec![9]);
    }

    #[test]
    fn a_closed_inbox_refuses_items_and_ends_after_the_last() {
        let inbox = Inbox::new();
        inbox.send(1).expect("open");
        inbox.close();
        assert!(inbox.push(2).is_err());
        let mut batch = Vec::new();
        inbox
            .receive(Duration::from_secs(1), 10, &mut batch)
            .expect("received");
        assert_eq!(batch, vec![1]);
        assert!(inbox
            .receive(Duration::from_secs(1), 10, &mut batch)
            .is_err());
    }
}
