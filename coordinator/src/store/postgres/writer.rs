//! The writer task: takes every change queued since its last transaction
//! and commits them in one (group commit), with the heartbeats this router
//! heard since the last flush. A change is acknowledged only once its
//! transaction committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::AgentStatus;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use super::schema::{CHANGE_CHANNEL, CHANGE_LOCK, HEARD_LOCK};
use super::{error_text, facts_from_row, DatabaseUrl, STATEMENT_DEADLINE};
use crate::record::NodeFacts;
use crate::store::{Change, Seen, StoreError, StoredAgent};

/// How many queued commands one transaction takes at most.
const MAX_BATCH: usize = 4_096;
/// After a failed connection attempt, changes are refused at once for this
/// long rather than each waiting for its own attempt.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

type Ack = oneshot::Sender<Result<u64, Arc<StoreError>>>;

pub enum Command {
    Commit {
        change: Change,
        ack: Ack,
    },
    Seen(Vec<Seen>),
    /// Write what is pending now (shutdown).
    Flush {
        ack: Ack,
    },
}

/// One connection and its prepared statements.
struct Connection {
    client: Client,
    upsert: Statement,
    delete: Statement,
    heard: Statement,
    offline: Statement,
}

const UPSERT: &str = "
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::jsonb[], $5::timestamptz[], $6::bool[])
        AS t(id, machine_name, port, record, last_seen, online)
), updated AS (
    UPDATE llm_router_agents a
    SET record = i.record, last_seen = i.last_seen, online = i.online,
        change_seq = nextval('llm_router_change_seq')
    FROM input i
    WHERE a.id = i.id AND a.machine_name = i.machine_name AND a.port = i.port
    RETURNING a.id, a.change_seq
), inserted AS (
    INSERT INTO llm_router_agents (id, machine_name, port, record, last_seen, online, change_seq)
    SELECT i.id, i.machine_name, i.port, i.record, i.last_seen, i.online, nextval('llm_router_change_seq')
    FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM llm_router_agents a WHERE a.id = i.id)
      AND NOT EXISTS (SELECT 1 FROM llm_router_deleted d WHERE d.id = i.id)
    ON CONFLICT DO NOTHING
    RETURNING id, change_seq
)
SELECT id, change_seq FROM updated UNION ALL SELECT id, change_seq FROM inserted";

const DELETE: &str = "
WITH gone AS (DELETE FROM llm_router_agents WHERE id = ANY($1::uuid[]) RETURNING id)
INSERT INTO llm_router_deleted (id, change_seq)
SELECT id, nextval('llm_router_change_seq') FROM gone
RETURNING id, change_seq";

/// One statement for every agent this router heard since the last flush:
/// the news the other routers' feeds read.
const HEARD: &str = "
UPDATE llm_router_agents a
SET heard_seq = nextval('llm_router_heard_seq'), last_seen = greatest(a.last_seen, h.last_seen), online = true
FROM unnest($1::uuid[], $2::timestamptz[]) AS h(id, last_seen)
WHERE a.id = h.id";

/// Agents this router found silent: kept only for routers that load later
/// (each router decides liveness itself), so no change number is drawn.
const OFFLINE: &str = "UPDATE llm_router_agents SET online = false WHERE id = ANY($1::uuid[])";

impl Connection {
    async fn open(url: &DatabaseUrl, connect_timeout: Duration) -> Result<Self, String> {
        let (client, connection) = tokio::time::timeout(connect_timeout, url.connect())
            .await
            .map_err(|_| format!("no answer from {url} within {connect_timeout:?}"))?
            .map_err(|error| format!("cannot connect to {url}: {}", error_text(&error)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(error = %error_text(&error), "The store's database connection closed.");
            }
        });
        let prepare = |sql| client.prepare(sql);
        let (upsert, delete, heard, offline) = tokio::try_join!(
            prepare(UPSERT),
            prepare(DELETE),
            prepare(HEARD),
            prepare(OFFLINE)
        )
        .map_err(|error| format!("preparing statements: {}", error_text(&error)))?;
        Ok(Connection {
            client,
            upsert,
            delete,
            heard,
            offline,
        })
    }
}

/// The changes of one batch, by agent: the last upsert of an id wins, a
/// delete wins over any upsert of its id.
#[derive(Default)]
struct Batch {
    upserts: HashMap<Uuid, Arc<NodeFacts>>,
    deletes: Vec<Uuid>,
    acks: Vec<(Uuid, Ack)>,
}

pub async fn run(
    url: DatabaseUrl,
    mut commands: mpsc::UnboundedReceiver<Command>,
    connect_timeout: Duration,
) {
    // Connected before the first change, so that it pays no connection.
    let mut connection = Connection::open(&url, connect_timeout).await.ok();
    let mut last_attempt = Some(Instant::now());
    // Liveness waiting to be written: the latest per agent.
    let mut pending_seen: HashMap<Uuid, (DateTime<Utc>, AgentStatus)> = HashMap::new();
    let mut queued = Vec::with_capacity(MAX_BATCH);
    loop {
        if commands.recv_many(&mut queued, MAX_BATCH).await == 0 {
            break;
        }
        let mut batch = Batch::default();
        let mut flush_acks = Vec::new();
        for command in queued.drain(..) {
            match command {
                Command::Commit { change, ack } => match change {
                    Change::Upsert(facts) => {
                        let id = facts.id;
                        if !batch.deletes.contains(&id) {
                            batch.upserts.insert(id, facts);
                        }
                        batch.acks.push((id, ack));
                    }
                    Change::Delete(id) => {
                        batch.upserts.remove(&id);
                        batch.deletes.push(id);
                        batch.acks.push((id, ack));
                    }
                    Change::Seen(seen) => {
                        merge_seen(&mut pending_seen, seen);
                        let _ = ack.send(Ok(0));
                    }
                },
                Command::Seen(seen) => merge_seen(&mut pending_seen, seen),
                Command::Flush { ack } => flush_acks.push(ack),
            }
        }
        // Deleted ids may have been upserted earlier in the batch.
        for id in &batch.deletes {
            pending_seen.remove(id);
        }

        if connection.as_ref().is_some_and(|c| c.client.is_closed()) {
            connection = None;
        }
        if connection.is_none() && last_attempt.is_none_or(|at| at.elapsed() >= RECONNECT_PAUSE) {
            last_attempt = Some(Instant::now());
            match Connection::open(&url, connect_timeout).await {
                Ok(opened) => {
                    tracing::info!(database = %url, "The store's writer is connected.");
                    connection = Some(opened);
                }
                Err(error) => {
                    tracing::warn!(%error, "The store's writer cannot reach the database; changes are refused until it can.")
                }
            }
        }
        let Some(open) = connection.as_ref() else {
            let error = Arc::new(StoreError::Database(format!(
                "the database at {url} cannot be reached"
            )));
            for (_, ack) in batch.acks {
                let _ = ack.send(Err(Arc::clone(&error)));
            }
            for ack in flush_acks {
                let _ = ack.send(Err(Arc::clone(&error)));
            }
            continue;
        };

        let started = Instant::now();
        let written = if batch.upserts.is_empty() && batch.deletes.is_empty() {
            Ok(HashMap::new())
        } else {
            deadline(in_transaction(&open.client, write_changes(open, &batch))).await
        };
        let changes = batch.upserts.len() + batch.deletes.len();
        crate::store::record_postgres_write(changes, written.is_ok(), started.elapsed());
        let mut lost = false;
        match written {
            Ok(numbers) => {
                let mut refused: HashMap<Uuid, Arc<StoreError>> = HashMap::new();
                for (id, facts) in &batch.upserts {
                    if !numbers.contains_key(id) {
                        refused.insert(*id, Arc::new(conflict(open, facts).await));
                    }
                }
                for (id, ack) in batch.acks {
                    let answer = match refused.get(&id) {
                        Some(error) => Err(Arc::clone(error)),
                        // A delete of an id another router deleted first.
                        None => Ok(numbers.get(&id).copied().unwrap_or(0)),
                    };
                    let _ = ack.send(answer);
                }
            }
            Err(error) => {
                tracing::warn!(%error, changes, "A store transaction failed; its changes were refused and nothing of them was written.");
                lost = open.client.is_closed() || error.contains("no answer");
                let error = Arc::new(StoreError::Database(error));
                for (_, ack) in batch.acks {
                    let _ = ack.send(Err(Arc::clone(&error)));
                }
            }
        }
        // Heartbeats heard, in a transaction of their own: a failure keeps
        // them for the next flush (the latest per agent, so bounded by the
        // fleet) and refuses no change.
        let mut flushed = Ok(0);
        if !pending_seen.is_empty() && !lost {
            match deadline(in_transaction(
                &open.client,
                write_seen(open, &pending_seen),
            ))
            .await
            {
                Ok(()) => pending_seen.clear(),
                Err(error) => {
                    tracing::warn!(%error, "Could not write the heartbeats heard; kept for the next flush.");
                    lost = open.client.is_closed() || error.contains("no answer");
                    flushed = Err(Arc::new(StoreError::Database(error)));
                }
            }
        }
        for ack in flush_acks {
            let _ = ack.send(flushed.clone());
        }
        if lost {
            connection = None;
        }
    }
    // Every handle is gone: write the last heartbeats heard.
    if let Some(open) = connection.as_ref() {
        if !pending_seen.is_empty() {
            let _ = deadline(in_transaction(
                &open.client,
                write_seen(open, &pending_seen),
            ))
            .await;
        }
    }
}

/// A statement that hangs (a database that stopped answering without
/// closing the connection) fails after [`STATEMENT_DEADLINE`].
async fn deadline<T>(
    work: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(STATEMENT_DEADLINE, work)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer from the database within {STATEMENT_DEADLINE:?}"
            ))
        })
}

fn merge_seen(pending: &mut HashMap<Uuid, (DateTime<Utc>, AgentStatus)>, seen: Vec<Seen>) {
    for Seen(id, last_seen, status) in seen {
        pending.insert(id, (last_seen, status));
    }
}

/// Runs `work` between BEGIN and COMMIT, or ROLLBACK if it fails.
async fn in_transaction<T>(
    client: &Client,
    work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    let failed = |error: tokio_postgres::Error| error_text(&error);
    client.batch_execute("BEGIN").await.map_err(failed)?;
    match work.await {
        Ok(value) => {
            client.batch_execute("COMMIT").await.map_err(failed)?;
            Ok(value)
        }
        Err(error) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(failed(error))
        }
    }
}

async fn write_changes(
    connection: &Connection,
    batch: &Batch,
) -> Result<HashMap<Uuid, u64>, tokio_postgres::Error> {
    let client = &connection.client;
    let mut numbers = HashMap::new();
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOCK])
        .await?;
    if !batch.upserts.is_empty() {
        let count = batch.upserts.len();
        let (mut ids, mut names, mut ports, mut records, mut last_seen, mut online) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        for facts in batch.upserts.values() {
            ids.push(facts.id);
            names.push(&*facts.machine_name);
            ports.push(i32::from(facts.port));
            records.push(
                serde_json::to_value(StoredAgent::from(&**facts))
                    .unwrap_or(serde_json::Value::Null),
            );
            last_seen.push(facts.last_seen);
            online.push(facts.status == AgentStatus::Online);
        }
        for row in client
            .query(
                &connection.upsert,
                &[&ids, &names, &ports, &records, &last_seen, &online],
            )
            .await?
        {
            numbers.insert(row.get::<_, Uuid>(0), row.get::<_, i64>(1) as u64);
        }
    }
    if !batch.deletes.is_empty() {
        for row in client.query(&connection.delete, &[&batch.deletes]).await? {
            numbers.insert(row.get::<_, Uuid>(0), row.get::<_, i64>(1) as u64);
        }
    }
    client
        .execute("SELECT pg_notify($1, '')", &[&CHANGE_CHANNEL])
        .await?;
    Ok(numbers)
}

async fn write_seen(
    connection: &Connection,
    seen: &HashMap<Uuid, (DateTime<Utc>, AgentStatus)>,
) -> Result<(), tokio_postgres::Error> {
    let client = &connection.client;
    let (mut heard_ids, mut heard_at, mut offline) = (Vec::new(), Vec::new(), Vec::new());
    for (id, (last_seen, status)) in seen {
        match status {
            AgentStatus::Online => {
                heard_ids.push(*id);
                heard_at.push(*last_seen);
            }
            AgentStatus::Offline => offline.push(*id),
        }
    }
    if !heard_ids.is_empty() {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&HEARD_LOCK])
            .await?;
        client
            .execute(&connection.heard, &[&heard_ids, &heard_at])
            .await?;
    }
    if !offline.is_empty() {
        client.execute(&connection.offline, &[&offline]).await?;
    }
    Ok(())
}

/// Why an upsert wrote nothing: its id was deleted at another router, or
/// another id holds its machine and port. The error carries the record
/// that won, so that the registry can take it in before it answers.
async fn conflict(connection: &Connection, facts: &NodeFacts) -> StoreError {
    let row = connection
        .client
        .query_opt(
            "SELECT record, online, last_seen, change_seq FROM llm_router_agents
             WHERE machine_name = $1 AND port = $2",
            &[&&*facts.machine_name, &i32::from(facts.port)],
        )
        .await;
    match row {
        Ok(Some(row)) => StoreError::Conflict {
            current: facts_from_row(row.get(0), row.get(1), row.get(2))
                .map(|current| (Arc::new(current), row.get::<_, i64>(3) as u64)),
        },
        Ok(None) => StoreError::Conflict { current: None },
        Err(error) => StoreError::Database(error_text(&error)),
    }
}
