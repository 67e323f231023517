//! The registry in PostgreSQL, shared by any number of routers
//! (`--database-url`).
//!
//! Each router keeps the whole registry in memory, as with the data files,
//! and runs three connections, each owned by one task on the store's own
//! thread:
//! - the **writer** commits changes in batches, one transaction per batch
//!   (group commit, as the file store batches its fsyncs), and the
//!   heartbeats this router heard, in one statement per flush;
//! - the **feed** follows what every router commits: woken by
//!   `NOTIFY llm_router_changes`, and polling every `poll_interval` in case
//!   a notification or the connection was lost; it also keeps this router's
//!   row in `llm_router_routers` alive and reads the others';
//! - a short-lived one at start that applies migrations and loads.
//!
//! Order: every change and every batch of heartbeats draws a number from
//! one sequence while holding one advisory lock ([`schema::CHANGE_LOCK`]),
//! so numbers commit in the order drawn; a router that has read everything
//! up to n has missed nothing below it. The feed reads `> n` and moves n.
//!
//! Liveness across routers never compares wall clocks: a router that reads
//! that agent X was heard (its `heard_seq` moved) counts X as seen *now*, on
//! its own monotonic clock.

mod feed;
mod schema;
mod url;
mod writer;

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Acknowledgement, Change, RegistryStore, Seen, StoreError, StoredAgent};
use crate::record::NodeFacts;
pub use feed::{FleetNews, RemoteChange};
pub use url::{DatabaseUrl, DatabaseUrlError, Verification};

/// How long one statement may take before the connection is taken for
/// lost (a database that hangs rather than refuses).
const STATEMENT_DEADLINE: Duration = Duration::from_secs(10);

/// This router, as the others see it in `llm_router_routers`.
#[derive(Debug, Clone)]
pub struct RouterIdentity {
    pub id: Uuid,
    pub address: String,
    pub version: String,
}

pub struct PostgresOptions {
    pub url: DatabaseUrl,
    pub router: RouterIdentity,
    /// How often the feed looks for changes without a notification.
    pub poll_interval: Duration,
    pub connect_timeout: Duration,
}

/// The handle through which the registry reaches the writer task.
#[derive(Clone)]
pub struct PostgresStore {
    commands: mpsc::UnboundedSender<writer::Command>,
}

/// The store's thread; `stop` ends the feed, lets the writer finish what
/// is queued, and joins.
pub struct PostgresWorkers {
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

/// What loading found.
pub struct Loaded {
    pub agents: Vec<NodeFacts>,
    pub migrations_applied: usize,
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Database(error.to_string())
}

/// Connects, applies migrations, loads every agent, and starts the writer
/// and the feed. What the feed reads arrives on the returned channel.
pub async fn open(
    options: PostgresOptions,
    roster: Arc<super::RouterRoster>,
) -> Result<
    (
        PostgresStore,
        PostgresWorkers,
        Loaded,
        std::sync::mpsc::Receiver<FleetNews>,
    ),
    StoreError,
> {
    let url = options.url.clone();
    let (mut client, connection) = tokio::time::timeout(options.connect_timeout, url.connect())
        .await
        .map_err(|_| {
            StoreError::Database(format!(
                "no answer from the database at {url} within {:?}",
                options.connect_timeout
            ))
        })?
        .map_err(|error| {
            StoreError::Database(format!("cannot connect to {url}: {}", error_text(&error)))
        })?;
    let driver = tokio::spawn(connection);
    let migrations_applied = schema::migrate(&mut client).await.map_err(|error| {
        StoreError::Database(format!("applying migrations: {}", error_text(&error)))
    })?;
    let (agents, marks) = load(&mut client).await.map_err(|error| {
        StoreError::Database(format!("loading the registry: {}", error_text(&error)))
    })?;
    drop(client);
    let _ = driver.await;

    let (commands, receiver) = mpsc::unbounded_channel();
    let (news_sender, news) = std::sync::mpsc::channel();
    let stop = CancellationToken::new();
    let thread = {
        let stop = stop.clone();
        let url = options.url.clone();
        let router = options.router.clone();
        let (poll_interval, connect_timeout) = (options.poll_interval, options.connect_timeout);
        std::thread::Builder::new()
            .name("postgres-store".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        return tracing::error!(%error, "Could not start the database store's runtime.")
                    }
                };
                runtime.block_on(async move {
                    let feed = tokio::spawn(feed::run(feed::FeedOptions {
                        url: url.clone(),
                        marks,
                        news: news_sender,
                        router,
                        roster,
                        poll_interval,
                        connect_timeout,
                        stop: stop.clone(),
                    }));
                    writer::run(url, receiver, connect_timeout).await;
                    stop.cancel();
                    let _ = feed.await;
                });
            })
            .map_err(unavailable)?
    };
    Ok((
        PostgresStore { commands },
        PostgresWorkers {
            stop,
            thread: Some(thread),
        },
        Loaded {
            agents,
            migrations_applied,
        },
        news,
    ))
}

/// Where the feed starts reading: everything up to these was loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadMarks {
    pub changes: i64,
    pub heard: i64,
}

/// Every agent, with its liveness columns, in one snapshot, and the marks
/// from which the feed goes on.
async fn load(
    client: &mut tokio_postgres::Client,
) -> Result<(Vec<NodeFacts>, ReadMarks), tokio_postgres::Error> {
    let transaction = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let rows = transaction
        .query(
            "SELECT record, online, last_seen, change_seq, heard_seq FROM llm_router_agents",
            &[],
        )
        .await?;
    let deleted: Option<i64> = transaction
        .query_one("SELECT max(change_seq) FROM llm_router_deleted", &[])
        .await?
        .get(0);
    transaction.commit().await?;
    let mut marks = ReadMarks {
        changes: deleted.unwrap_or(0),
        heard: 0,
    };
    let mut agents = Vec::with_capacity(rows.len());
    for row in rows {
        marks.changes = marks.changes.max(row.get::<_, i64>(3));
        marks.heard = marks.heard.max(row.get::<_, i64>(4));
        if let Some(facts) = facts_from_row(row.get(0), row.get(1), row.get(2)) {
            agents.push(facts);
        }
    }
    Ok((agents, marks))
}

/// A stored record with the liveness columns laid over it. A record that
/// does not parse (written by hand) is skipped with a warning rather than
/// stopping the router.
fn facts_from_row(
    record: serde_json::Value,
    online: bool,
    last_seen: DateTime<Utc>,
) -> Option<NodeFacts> {
    match StoredAgent::deserialize(&record) {
        Ok(mut stored) => {
            stored.status = if online {
                common::AgentStatus::Online
            } else {
                common::AgentStatus::Offline
            };
            stored.last_seen = last_seen;
            Some(stored.into_facts())
        }
        Err(error) => {
            tracing::warn!(%error, "Skipped a stored agent that does not parse.");
            None
        }
    }
}

/// The error's own text and, for a server error, PostgreSQL's message.
fn error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{error}: {}", db.message()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

impl RegistryStore for PostgresStore {
    fn submit(&self, change: Change) -> Acknowledgement {
        let (ack, acknowledgement) = Acknowledgement::channel();
        match self.commands.send(writer::Command::Commit { change, ack }) {
            Ok(()) => acknowledgement,
            Err(_) => Acknowledgement::failed(StoreError::WriterStopped),
        }
    }

    fn record_seen(&self, seen: Vec<Seen>) {
        if !seen.is_empty() {
            let _ = self.commands.send(writer::Command::Seen(seen));
        }
    }

    fn snapshot_now(&self) -> Acknowledgement {
        let (ack, acknowledgement) = Acknowledgement::channel();
        match self.commands.send(writer::Command::Flush { ack }) {
            Ok(()) => acknowledgement,
            Err(_) => Acknowledgement::failed(StoreError::WriterStopped),
        }
    }
}

impl PostgresWorkers {
    /// Stops the feed and waits for the writer to finish; it does once
    /// every `PostgresStore` handle is dropped.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.stop.cancel();
    }

    /// Stops following the other routers (the first step of a shutdown).
    pub fn stop_feed(&self) {
        self.stop.cancel();
    }
}

/// Copies a registry into the database (`llm-router migrate`), keeping ids
/// and secrets' hashes. Agents already there (same id) are left as they
/// are, so running it twice changes nothing. Returns (copied, already
/// there, refused because another id holds the same machine and port).
pub async fn copy_in(
    url: &DatabaseUrl,
    agents: &[Arc<NodeFacts>],
) -> Result<(usize, usize, Vec<Uuid>), StoreError> {
    let (mut client, connection) = url.connect().await.map_err(|error| {
        StoreError::Database(format!("cannot connect to {url}: {}", error_text(&error)))
    })?;
    let driver = tokio::spawn(connection);
    schema::migrate(&mut client).await.map_err(|error| {
        StoreError::Database(format!("applying migrations: {}", error_text(&error)))
    })?;
    let transaction = client
        .transaction()
        .await
        .map_err(|e| unavailable(error_text(&e)))?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&schema::CHANGE_LOCK])
        .await
        .map_err(|e| unavailable(error_text(&e)))?;
    let present: HashSet<Uuid> = transaction
        .query(
            "SELECT id FROM llm_router_agents UNION SELECT id FROM llm_router_deleted",
            &[],
        )
        .await
        .map_err(|e| unavailable(error_text(&e)))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let (mut copied, mut already, mut refused) = (0, 0, Vec::new());
    for facts in agents {
        if present.contains(&facts.id) {
            already += 1;
            continue;
        }
        let record = serde_json::to_value(StoredAgent::from(&**facts)).map_err(unavailable)?;
        let inserted = transaction
            .execute(
                "INSERT INTO llm_router_agents
                    (id, machine_name, port, record, change_seq, last_seen, online)
                 VALUES ($1, $2, $3, $4, nextval('llm_router_change_seq'), $5, $6)
                 ON CONFLICT DO NOTHING",
                &[
                    &facts.id,
                    &&*facts.machine_name,
                    &i32::from(facts.port),
                    &record,
                    &facts.last_seen,
                    &(facts.status == common::AgentStatus::Online),
                ],
            )
            .await
            .map_err(|e| unavailable(error_text(&e)))?;
        if inserted == 1 {
            copied += 1;
        } else {
            refused.push(facts.id);
        }
    }
    if copied > 0 {
        transaction
            .execute("SELECT pg_notify($1, '')", &[&schema::CHANGE_CHANNEL])
            .await
            .map_err(|e| unavailable(error_text(&e)))?;
    }
    transaction
        .commit()
        .await
        .map_err(|e| unavailable(error_text(&e)))?;
    drop(client);
    let _ = driver.await;
    Ok((copied, already, refused))
}
