//! Durability of the registry.
//!
//! Two files in the data dir:
//! - `agents.json`, a pretty-printed JSON array of the agents: the readable
//!   snapshot, rewritten now and then (temp file, fsync, rename, fsync dir),
//!   the previous one kept as `agents.json.bak`;
//! - `agents.journal`, one JSON line per change since that snapshot,
//!   fsynced per batch (group commit) before any change in it is acknowledged.
//!
//! A second implementation, [`postgres`], keeps the registry in a
//! PostgreSQL database that several routers share (`--database-url`).
//!
//! One writer thread owns both files and its own copy of the committed
//! records. Callers send it a change and await its acknowledgement; it takes
//! everything that has queued up, appends it in one write and one fsync, then
//! answers them all. Start-up is `load`, which applies the corrupt-file policy
//! and replays the journal.

mod files;
mod inbox;
pub mod postgres;
mod stored;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::record::NodeFacts;
pub(crate) use files::spawn_loader;
pub use files::LoadReport;
pub use stored::{Change, Records, Seen, SharedRecords, StoredAgent};

/// A journal this large, and at least as large as the snapshot, is folded
/// into a snapshot at once. The second half is Redis's rule for its
/// append-only file (`auto-aof-rewrite-percentage 100`): a start-up then
/// replays at most as many bytes of journal as it parses of snapshot, and
/// a storm on a large fleet writes geometrically fewer snapshots. With 64
/// MiB alone, a storm growing the fleet to 440,000 agents wrote three in
/// 10 s (of 160,000, 320,000 and 440,000 agents), each taking most of a
/// core from the event loops on this two-core machine (issue 16, eleventh
/// session: the storm's p99 23.7, 24.8, 27.1 ms with the rule against
/// 28.6, 27.1, 31.5 without, alternated).
const JOURNAL_BYTES_BEFORE_SNAPSHOT: u64 = 64 * 1024 * 1024;
/// How many queued commands one group commit takes at most.
const MAX_BATCH: usize = 8_192;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {path} cannot be used: check that it is a directory this user can read and write, or choose another --data-dir")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data dir {path} is a file, not a directory: move it away or choose another --data-dir"
    )]
    DataDirIsFile { path: PathBuf },
    #[error("data dir {path} is in use by another llm-router{}: stop it, or give this one another --data-dir", holder.map(|pid| format!(" (PID {pid})")).unwrap_or_default())]
    DataDirInUse { path: PathBuf, holder: Option<u32> },
    #[error("writing the journal: {0}")]
    Journal(#[source] std::io::Error),
    #[error("writing the snapshot: {0}")]
    Snapshot(#[source] std::io::Error),
    #[error("the store's writer has stopped")]
    WriterStopped,
    /// The database could not take the change (it is unreachable, or the
    /// transaction failed): nothing of it was written.
    #[error("the registry database: {0}")]
    Database(String),
    /// Another router's change came first: the id was deleted, or another
    /// id holds the machine and port. `current` is the record that holds
    /// them now (with its change number), if any.
    #[error("another router changed this agent first")]
    Conflict {
        current: Option<(Arc<NodeFacts>, u64)>,
    },
}

/// A committed change's number in the store's order (0 where the store
/// keeps none, as the data files).
pub type ChangeNumber = u64;

enum Command {
    Commit {
        change: Change,
        ack: oneshot::Sender<Result<ChangeNumber, Arc<StoreError>>>,
    },
    Seen(Vec<Seen>),
    /// Write a snapshot now if anything changed since the last one (shutdown).
    Snapshot {
        ack: oneshot::Sender<Result<ChangeNumber, Arc<StoreError>>>,
    },
}

/// What the registry needs of durability, and all it may ask. Loading is
/// each implementation's own `open`, which hands the registry the records
/// it found. The journal-plus-snapshot files ([`FileStore`]) are the first
/// implementation; another store plugs in here without the registry
/// changing.
pub trait RegistryStore: Send + Sync {
    /// Queues a change and returns its acknowledgement, which resolves once
    /// the change is durable. Queueing is synchronous so that the registry
    /// can do it under its lock: the order of the durable record is then
    /// the order in which changes were applied.
    fn submit(&self, change: Change) -> Acknowledgement;

    /// Hands over liveness (last seen, status), unacknowledged: it is
    /// flushed every few seconds, and a crash loses at most that much.
    fn record_seen(&self, seen: Vec<Seen>);

    /// The last step of a clean shutdown: makes everything so far durable
    /// and quick to load, and says when it is. (The files fold the journal
    /// into a snapshot unless replaying it at the next start is cheaper.)
    fn snapshot_now(&self) -> Acknowledgement;
}

/// The answer to a change or a snapshot: resolves to `Ok` once durable.
pub struct Acknowledgement {
    state: AcknowledgementState,
    /// The writer to wake when this is first awaited (or dropped): a
    /// change queued under the registry's lock wakes the writer only once
    /// that lock is released (see `inbox`).
    wake_writer: Option<Arc<inbox::Inbox<Command>>>,
}

enum AcknowledgementState {
    Waiting(oneshot::Receiver<Result<ChangeNumber, Arc<StoreError>>>),
    Failed(Option<Arc<StoreError>>),
}

impl Acknowledgement {
    /// An acknowledgement that the store's writer will send.
    pub fn channel() -> (oneshot::Sender<Result<ChangeNumber, Arc<StoreError>>>, Self) {
        let (sender, receiver) = oneshot::channel();
        (
            sender,
            Acknowledgement {
                state: AcknowledgementState::Waiting(receiver),
                wake_writer: None,
            },
        )
    }

    /// A change the store could not even take.
    pub fn failed(error: StoreError) -> Self {
        Acknowledgement {
            state: AcknowledgementState::Failed(Some(Arc::new(error))),
            wake_writer: None,
        }
    }

    fn wake_writer_once(&mut self) {
        if let Some(inbox) = self.wake_writer.take() {
            inbox.wake();
        }
    }
}

impl Drop for Acknowledgement {
    fn drop(&mut self) {
        self.wake_writer_once();
    }
}

impl std::future::Future for Acknowledgement {
    type Output = Result<ChangeNumber, Arc<StoreError>>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        this.wake_writer_once();
        match &mut this.state {
            AcknowledgementState::Waiting(receiver) => std::pin::Pin::new(receiver)
                .poll(context)
                .map(|answer| answer.unwrap_or_else(|_| Err(Arc::new(StoreError::WriterStopped)))),
            AcknowledgementState::Failed(error) => std::task::Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| Arc::new(StoreError::WriterStopped)))),
        }
    }
}

/// The journal-plus-snapshot files in the data dir: the handle through
/// which the registry reaches the writer thread that owns them.
#[derive(Clone)]
pub struct FileStore {
    commands: Arc<Sender>,
}

/// The sending side of the writer's inbox; when the last `FileStore` lets
/// go of it, the writer drains the inbox, settles and stops.
struct Sender(Arc<inbox::Inbox<Command>>);

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The writer thread; joined on shutdown.
pub struct StoreWriter {
    thread: Option<JoinHandle<()>>,
}

pub struct StoreOptions {
    pub data_dir: PathBuf,
    /// How often a snapshot is written when something changed.
    pub snapshot_interval: Duration,
    /// A snapshot follows registrations, updates and deletions once they
    /// have been quiet this long (zero: only every `snapshot_interval`).
    pub snapshot_when_quiet: Duration,
}

/// The agents a load found, in the file's order: the writer's own records,
/// shared rather than copied.
pub type LoadedAgents = Vec<Arc<NodeFacts>>;

/// Loads the data dir (see `files::load` for the corrupt-file policy) and
/// starts the writer. Returns the agents found and what loading noticed.
pub fn open(
    options: StoreOptions,
) -> Result<(FileStore, StoreWriter, LoadedAgents, LoadReport), StoreError> {
    let (files, committed, report) = files::DataFiles::open(&options.data_dir)?;
    let snapshot_size = files.snapshot_bytes();
    // Shared, not copied: the registry copies an agent only when it
    // changes it, and the writer only when it changes one the registry
    // still shares.
    let agents = committed.shared().iter().cloned().collect();
    let inbox = Arc::new(inbox::Inbox::new());
    let mut writer = Writer {
        files,
        committed,
        inbox: Arc::clone(&inbox),
        snapshot_interval: options.snapshot_interval,
        snapshot_when_quiet: options.snapshot_when_quiet,
        unsnapshotted_change: None,
        snapshot_cost: Duration::ZERO,
        snapshot_size,
        snapshot_dirty: report.needs_snapshot(),
        background: None,
        // A load that replayed a journal (the last run did not stop cleanly)
        // folds it into a snapshot at once, in the background: a router that
        // keeps crashing must not let its journal, and so its start-up, grow
        // without end.
        last_snapshot: if report.needs_snapshot() {
            Instant::now()
                .checked_sub(options.snapshot_interval)
                .unwrap_or_else(Instant::now)
        } else {
            Instant::now()
        },
    };
    let thread = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            writer.run();
            // The router is ending: the OS takes the records' memory back at
            // once, where freeing 100,000 of them one by one took some 28 ms
            // of every restart. The data files close (and unlock) as usual.
            std::mem::forget(writer.committed);
        })
        .map_err(|source| StoreError::DataDir {
            path: options.data_dir.clone(),
            source,
        })?;
    Ok((
        FileStore {
            commands: Arc::new(Sender(inbox)),
        },
        StoreWriter {
            thread: Some(thread),
        },
        agents,
        report,
    ))
}

impl RegistryStore for FileStore {
    fn submit(&self, change: Change) -> Acknowledgement {
        let (ack, mut acknowledgement) = Acknowledgement::channel();
        match self.commands.0.push(Command::Commit { change, ack }) {
            Ok(()) => {
                acknowledgement.wake_writer = Some(Arc::clone(&self.commands.0));
                acknowledgement
            }
            Err(_) => Acknowledgement::failed(StoreError::WriterStopped),
        }
    }

    fn record_seen(&self, seen: Vec<Seen>) {
        if !seen.is_empty() {
            let _ = self.commands.0.send(Command::Seen(seen));
        }
    }

    /// Writes a snapshot now, if anything changed since the last one.
    fn snapshot_now(&self) -> Acknowledgement {
        let (ack, acknowledgement) = Acknowledgement::channel();
        match self.commands.0.send(Command::Snapshot { ack }) {
            Ok(()) => acknowledgement,
            Err(_) => Acknowledgement::failed(StoreError::WriterStopped),
        }
    }
}

impl StoreWriter {
    /// Waits for the writer to finish; it does once every `FileStore` handle is
    /// dropped, after a last snapshot.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A background snapshot's end: the segments it covered, whether it is in
/// place, and how long it took.
type SnapshotOutcome = (Vec<PathBuf>, Result<(), StoreError>, Duration);

struct Writer {
    files: files::DataFiles,
    /// The committed records, in the registry's compact form (their shared
    /// strings are the registry's own).
    committed: Records,
    inbox: Arc<inbox::Inbox<Command>>,
    snapshot_interval: Duration,
    snapshot_when_quiet: Duration,
    /// The latest registration, update or deletion, while no snapshot
    /// holds it yet (liveness does not count: it changes every flush).
    unsnapshotted_change: Option<Instant>,
    /// How long the last snapshot took to write.
    snapshot_cost: Duration,
    /// The size of `agents.json` as the last snapshot left it.
    snapshot_size: u64,
    snapshot_dirty: bool,
    last_snapshot: Instant,
    /// The snapshot being written beside the writer, and the segments it
    /// covers.
    background: Option<JoinHandle<SnapshotOutcome>>,
}

impl Writer {
    fn run(&mut self) {
        loop {
            let wait = self.until_next_snapshot();
            let mut batch = Vec::new();
            if self
                .inbox
                .receive(wait.max(Duration::from_millis(10)), MAX_BATCH, &mut batch)
                .is_err()
            {
                break;
            }
            self.handle_batch(batch);
        }
        // Every handle is gone: the router is shutting down.
        if let Err(error) = self.settle() {
            tracing::error!(%error, "Final snapshot failed; the journal still holds every change.");
        }
    }

    /// How long the writer may sleep before a snapshot falls due.
    fn until_next_snapshot(&self) -> Duration {
        let periodic = self
            .snapshot_interval
            .saturating_sub(self.last_snapshot.elapsed());
        match self.quiet_snapshot_at() {
            Some(at) => periodic.min(at.saturating_duration_since(Instant::now())),
            None => periodic,
        }
    }

    /// When a snapshot of recent registry changes falls due: once they
    /// have been quiet for `snapshot_when_quiet` (a storm never is, so it
    /// gets the periodic snapshots only), and no sooner after the last
    /// snapshot than ten times what that one took, so that a registry
    /// changing every few seconds does not spend its writer's disk on
    /// snapshots of a large fleet.
    fn quiet_snapshot_at(&self) -> Option<Instant> {
        if self.snapshot_when_quiet.is_zero() {
            return None;
        }
        let quiet = self.unsnapshotted_change? + self.snapshot_when_quiet;
        let spaced = self.last_snapshot + (self.snapshot_cost * 10).min(self.snapshot_interval);
        Some(quiet.max(spaced))
    }

    /// The end of a clean shutdown. Everything is durable in the journal
    /// already; a snapshot is written when the registry changed since the
    /// last one (so that agents.json shows it), or when the journal has
    /// grown as large as the snapshot. A restart waits for this stop's
    /// snapshot or the next start's replay, and a byte of journal costs at
    /// most what a byte of snapshot does (BENCHMARKS.md, "Restart", and
    /// since issue 16's seventh session less): so liveness alone, the
    /// usual case, is left to replay.
    fn settle(&mut self) -> Result<(), StoreError> {
        let _ = self.collect_snapshot(true);
        let worth_it = self.unsnapshotted_change.is_some()
            || self.snapshot_dirty
            || self.files.has_closed_segments()
            || self.files.journal_bytes() >= self.snapshot_size;
        if worth_it {
            self.snapshot_and_wait()
        } else {
            Ok(())
        }
    }

    fn handle_batch(&mut self, batch: Vec<Command>) {
        let mut changes = Vec::new();
        let mut commit_acks = Vec::new();
        let mut snapshot_acks: Vec<oneshot::Sender<_>> = Vec::new();
        for command in batch {
            match command {
                Command::Commit { change, ack } => {
                    changes.push(change);
                    commit_acks.push(ack);
                }
                // Liveness needs no acknowledgement: it rides with the batch.
                Command::Seen(agents) => changes.push(Change::Seen(agents)),
                Command::Snapshot { ack } => snapshot_acks.push(ack),
            }
        }

        if !changes.is_empty() {
            let started = Instant::now();
            let appended = self.files.append(&changes);
            record_write(&changes, appended.is_ok(), started.elapsed());
            match appended {
                Ok(()) => {
                    tracing::debug!(
                        changes = changes.len(),
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "Journal batch committed."
                    );
                    // Durable now: the waiting requests are answered
                    // before the writer's own copy catches up, which for a
                    // flush of a large fleet's liveness takes milliseconds.
                    for ack in commit_acks {
                        let _ = ack.send(Ok(0));
                    }
                    if changes
                        .iter()
                        .any(|change| !matches!(change, Change::Seen(_)))
                    {
                        self.unsnapshotted_change = Some(Instant::now());
                    }
                    self.committed.apply_all(changes);
                }
                Err(error) => {
                    let error = Arc::new(error);
                    for ack in commit_acks {
                        let _ = ack.send(Err(Arc::clone(&error)));
                    }
                }
            }
        }

        // A snapshot that finished meanwhile: its segments are gone.
        self.collect_snapshot(false);
        let due = self.pending() && self.last_snapshot.elapsed() >= self.snapshot_interval;
        let journal_full = journal_is_full(self.files.journal_bytes(), self.snapshot_size);
        let quiet = self
            .quiet_snapshot_at()
            .is_some_and(|at| at <= Instant::now());
        if snapshot_acks.is_empty() {
            if (due || journal_full || quiet) && self.background.is_none() {
                self.start_snapshot();
            }
            return;
        }
        let result = self.settle().map(|()| 0).map_err(Arc::new);
        for ack in snapshot_acks {
            let _ = ack.send(result.clone());
        }
    }

    fn pending(&self) -> bool {
        self.snapshot_dirty || self.files.journal_records() > 0 || self.files.has_closed_segments()
    }

    /// Rotates the journal and writes a snapshot of the records as they are
    /// now on a thread of its own: commits go on into the new journal
    /// meanwhile, and never wait behind the snapshot.
    fn start_snapshot(&mut self) {
        self.last_snapshot = Instant::now();
        let covered = match self.files.rotate() {
            Ok(covered) => covered,
            Err(error) => {
                return tracing::error!(%error, "Could not rotate the journal for a snapshot; it goes on growing, and nothing is lost.");
            }
        };
        self.snapshot_dirty = false;
        let unsnapshotted_change = self.unsnapshotted_change.take();
        let view = self.committed.shared();
        let dir = self.files.dir().to_path_buf();
        let started = std::thread::Builder::new()
            .name("store-snapshot".into())
            .spawn(move || {
                let begun = Instant::now();
                let result = files::write_snapshot(&dir, view, &covered);
                (covered, result, begun.elapsed())
            });
        match started {
            Ok(handle) => self.background = Some(handle),
            Err(error) => {
                self.snapshot_dirty = true;
                self.unsnapshotted_change = unsnapshotted_change;
                tracing::error!(%error, "Could not start the snapshot thread; the journal holds every change.");
            }
        }
    }

    /// Takes in a finished snapshot (or waits for the running one). Returns
    /// its outcome, if one was taken in.
    fn collect_snapshot(&mut self, wait: bool) -> Option<Result<(), StoreError>> {
        let running = self.background.as_ref()?;
        if !wait && !running.is_finished() {
            return None;
        }
        let handle = self.background.take()?;
        let (covered, result, cost) = handle.join().unwrap_or_else(|_| {
            (
                Vec::new(),
                Err(StoreError::Snapshot(std::io::Error::other(
                    "the snapshot thread panicked",
                ))),
                Duration::ZERO,
            )
        });
        self.snapshot_cost = cost;
        match &result {
            Ok(()) => {
                self.files.forget_segments(&covered);
                self.snapshot_size = self.files.snapshot_bytes();
            }
            Err(error) => {
                // The segments stay and the next snapshot covers them too.
                self.snapshot_dirty = true;
                tracing::error!(%error, "Snapshot failed; the journal still holds every change.");
            }
        }
        Some(result)
    }

    /// Everything durable so far in a snapshot, now (shutdown, or asked).
    fn snapshot_and_wait(&mut self) -> Result<(), StoreError> {
        let _ = self.collect_snapshot(true);
        if !self.pending() {
            return Ok(());
        }
        self.start_snapshot();
        self.collect_snapshot(true).unwrap_or(Ok(()))
    }
}

/// Whether a journal of `journal` bytes is folded into a snapshot now, the
/// last one having left `snapshot` bytes (see
/// [`JOURNAL_BYTES_BEFORE_SNAPSHOT`]).
fn journal_is_full(journal: u64, snapshot: u64) -> bool {
    journal >= JOURNAL_BYTES_BEFORE_SNAPSHOT && journal >= snapshot
}

/// Journal writes and their latency, for `/metrics`.
fn record_write(changes: &[Change], ok: bool, elapsed: Duration) {
    use crate::telemetry::{STORE_CHANGES, STORE_WRITES, STORE_WRITE_DURATION};
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(STORE_WRITES, "result" => result).increment(1);
    metrics::histogram!(STORE_WRITE_DURATION).record(elapsed);
    if ok {
        for change in changes {
            metrics::counter!(STORE_CHANGES, "kind" => change.kind()).increment(1);
        }
    }
}

/// Transactions of the database store and their latency, for `/metrics`
/// (the same series as the journal's writes).
pub(crate) fn record_postgres_write(changes: usize, ok: bool, elapsed: Duration) {
    use crate::telemetry::{STORE_WRITES, STORE_WRITE_DURATION};
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(STORE_WRITES, "result" => result).increment(1);
    metrics::histogram!(STORE_WRITE_DURATION).record(elapsed);
    if ok && changes > 0 {
        metrics::counter!(crate::telemetry::STORE_CHANGES, "kind" => "upsert_or_delete")
            .increment(changes as u64);
    }
}

/// One router of those sharing a registry, as `GET /api/routers` lists it.
#[derive(Debug, Clone)]
pub struct RouterRow {
    pub id: uuid::Uuid,
    pub address: String,
    pub version: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Its last heartbeat, on the database's clock.
    pub last_seen: chrono::DateTime<chrono::Utc>,
    /// Heard from within the last 10 s.
    pub alive: bool,
    /// How long ago its last heartbeat was, on the database's clock.
    pub silent_for: Duration,
}

/// The routers that share this registry: read from the database by the
/// feed, or only this one with the data files.
pub struct RouterRoster {
    this: RouterRow,
    shared: bool,
    rows: std::sync::Mutex<Vec<RouterRow>>,
    database_lost: std::sync::atomic::AtomicBool,
}

impl RouterRoster {
    pub fn new(id: uuid::Uuid, address: String, version: String, shared: bool) -> Self {
        let now = chrono::Utc::now();
        RouterRoster {
            this: RouterRow {
                id,
                address,
                version,
                started_at: now,
                last_seen: now,
                alive: true,
                silent_for: Duration::ZERO,
            },
            shared,
            rows: std::sync::Mutex::new(Vec::new()),
            database_lost: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn this_router(&self) -> uuid::Uuid {
        self.this.id
    }

    /// This router's address, as the others see it.
    pub fn this_address(&self) -> &str {
        &self.this.address
    }

    /// Several routers share the registry (a database store).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    pub(crate) fn replace(&self, rows: Vec<RouterRow>) {
        *self.rows.lock().unwrap_or_else(|p| p.into_inner()) = rows;
        self.database_lost
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn mark_database_lost(&self) {
        self.database_lost
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the database answered the last time it was asked (always
    /// true with the data files).
    pub fn database_reachable(&self) -> bool {
        !self
            .database_lost
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every router known, this one always among them.
    pub fn list(&self) -> Vec<RouterRow> {
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !rows.iter().any(|row| row.id == self.this.id) {
            let mut this = self.this.clone();
            this.last_seen = chrono::Utc::now();
            rows.insert(0, this);
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_folded_past_64_mib_and_past_the_snapshot_size() {
        const MIB: u64 = 1024 * 1024;
        // A small fleet: 64 MiB decides.
        assert!(!journal_is_full(63 * MIB, 10 * MIB));
        assert!(journal_is_full(64 * MIB, 10 * MIB));
        // A large one: the snapshot's size decides.
        assert!(!journal_is_full(100 * MIB, 230 * MIB));
        assert!(journal_is_full(230 * MIB, 230 * MIB));
        // No snapshot yet.
        assert!(journal_is_full(64 * MIB, 0));
    }
}
