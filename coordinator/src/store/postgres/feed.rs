//! The feed: what the other routers (and this one) committed, read in
//! change-number order and handed to the registry as [`FleetNews`]. Woken
//! by `NOTIFY`; polls every `poll_interval` whatever happens, so that a lost
//! notification or a dropped connection costs one interval, not a change.
//! It also keeps this router's row in `llm_router_routers` alive and reads
//! the roster.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::schema::CHANGE_CHANNEL;
use super::{
    error_text, facts_from_row, DatabaseUrl, ReadMarks, RouterIdentity, STATEMENT_DEADLINE,
};
use crate::record::NodeFacts;
use crate::store::{RouterRoster, RouterRow};

/// How often this router's row is refreshed and the roster read.
const ROSTER_EVERY: Duration = Duration::from_secs(1);
/// A router whose row is older than this is listed as gone; rows an hour
/// old are removed.
const ROUTER_ALIVE_FOR: Duration = Duration::from_secs(10);

/// One committed change, with its number.
#[derive(Debug, Clone)]
pub enum RemoteChange {
    Upsert(Arc<NodeFacts>, u64),
    Delete(Uuid, u64),
}

/// What the feed tells the registry.
#[derive(Debug)]
pub enum FleetNews {
    /// Changes committed since the last news, oldest first.
    Changed(Vec<RemoteChange>),
    /// These agents were heard by some router since the last news.
    Heard(Vec<(Uuid, DateTime<Utc>)>),
    /// The database stopped answering: news from the other routers has
    /// stopped, which says nothing about their agents.
    Lost,
    /// It answers again, and everything missed has been read.
    Restored,
}

pub struct FeedOptions {
    pub url: DatabaseUrl,
    pub marks: ReadMarks,
    pub news: Sender<FleetNews>,
    pub router: RouterIdentity,
    pub roster: Arc<RouterRoster>,
    pub poll_interval: Duration,
    pub connect_timeout: Duration,
    pub stop: CancellationToken,
}

pub async fn run(mut options: FeedOptions) {
    let mut lost = false;
    let mut backoff = Duration::from_millis(100);
    while !options.stop.is_cancelled() {
        match follow(&mut options, &mut lost).await {
            Ok(()) => return,
            Err(error) => {
                if !lost {
                    tracing::warn!(%error, "Lost the database: routing goes on from memory, and no agent is marked Offline for want of news from the other routers until it is back.");
                    lost = true;
                    if options.news.send(FleetNews::Lost).is_err() {
                        return;
                    }
                }
                options.roster.mark_database_lost();
            }
        }
        tokio::select! {
            () = options.stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Connects, listens and polls until the connection fails (`Err`) or the
/// feed is stopped (`Ok`).
async fn follow(options: &mut FeedOptions, lost: &mut bool) -> Result<(), String> {
    let (client, mut connection) =
        tokio::time::timeout(options.connect_timeout, options.url.connect())
            .await
            .map_err(|_| {
                format!(
                    "no answer from {} within {:?}",
                    options.url, options.connect_timeout
                )
            })?
            .map_err(|error| {
                format!("cannot connect to {}: {}", options.url, error_text(&error))
            })?;
    let woken = Arc::new(Notify::new());
    let closed = CancellationToken::new();
    {
        let (woken, closed) = (Arc::clone(&woken), closed.clone());
        tokio::spawn(async move {
            // Drives the connection, and turns each notification into a wake-up.
            let driven = std::future::poll_fn(|context| loop {
                match connection.poll_message(context) {
                    std::task::Poll::Ready(Some(Ok(AsyncMessage::Notification(_)))) => {
                        woken.notify_one()
                    }
                    std::task::Poll::Ready(Some(Ok(_))) => {}
                    std::task::Poll::Ready(Some(Err(error))) => {
                        return std::task::Poll::Ready(Err(error))
                    }
                    std::task::Poll::Ready(None) => return std::task::Poll::Ready(Ok(())),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            })
            .await;
            if let Err(error) = driven {
                tracing::debug!(error = %error_text(&error), "The feed's connection closed.");
            }
            closed.cancel();
        });
    }
    let deadline = |what| {
        move |_| format!("no answer from the database to {what} within {STATEMENT_DEADLINE:?}")
    };
    let failed = |error: tokio_postgres::Error| error_text(&error);
    tokio::time::timeout(
        STATEMENT_DEADLINE,
        client.batch_execute(&format!("LISTEN {CHANGE_CHANNEL}")),
    )
    .await
    .map_err(deadline("LISTEN"))?
    .map_err(failed)?;
    let mut next_roster = Instant::now();
    loop {
        if Instant::now() >= next_roster {
            tokio::time::timeout(STATEMENT_DEADLINE, keep_roster(&client, options))
                .await
                .map_err(deadline("the router heartbeat"))??;
            next_roster = Instant::now() + ROSTER_EVERY;
        }
        tokio::time::timeout(STATEMENT_DEADLINE, poll(&client, options))
            .await
            .map_err(deadline("the change poll"))??;
        if *lost {
            *lost = false;
            tracing::info!("The database answers again: following the other routers.");
            if options.news.send(FleetNews::Restored).is_err() {
                return Ok(());
            }
        }
        tokio::select! {
            () = options.stop.cancelled() => {
                let _ = client
                    .execute("DELETE FROM llm_router_routers WHERE id = $1", &[&options.router.id])
                    .await;
                return Ok(());
            }
            () = closed.cancelled() => return Err("the connection closed".into()),
            () = woken.notified() => {}
            () = tokio::time::sleep(options.poll_interval) => {}
        }
    }
}

/// Reads everything committed past the marks and hands it on.
async fn poll(client: &Client, options: &mut FeedOptions) -> Result<(), String> {
    let failed = |error: tokio_postgres::Error| error_text(&error);
    let rows = client
        .query(
            "SELECT id, record, online, last_seen, change_seq FROM llm_router_agents WHERE change_seq > $1
             UNION ALL
             SELECT id, NULL, false, deleted_at, change_seq FROM llm_router_deleted WHERE change_seq > $1
             ORDER BY 5",
            &[&options.marks.changes],
        )
        .await
        .map_err(failed)?;
    if !rows.is_empty() {
        let mut changes = Vec::with_capacity(rows.len());
        for row in rows {
            let number: i64 = row.get(4);
            options.marks.changes = options.marks.changes.max(number);
            let number = number as u64;
            match row.get::<_, Option<serde_json::Value>>(1) {
                Some(record) => {
                    if let Some(facts) = facts_from_row(record, row.get(2), row.get(3)) {
                        changes.push(RemoteChange::Upsert(Arc::new(facts), number));
                    }
                }
                None => changes.push(RemoteChange::Delete(row.get(0), number)),
            }
        }
        options
            .news
            .send(FleetNews::Changed(changes))
            .map_err(|_| "the registry stopped listening".to_owned())?;
    }
    let heard = client
        .query(
            "SELECT id, last_seen, heard_seq FROM llm_router_agents WHERE heard_seq > $1",
            &[&options.marks.heard],
        )
        .await
        .map_err(failed)?;
    if !heard.is_empty() {
        let mut agents = Vec::with_capacity(heard.len());
        for row in heard {
            options.marks.heard = options.marks.heard.max(row.get::<_, i64>(2));
            agents.push((row.get(0), row.get(1)));
        }
        options
            .news
            .send(FleetNews::Heard(agents))
            .map_err(|_| "the registry stopped listening".to_owned())?;
    }
    Ok(())
}

/// This router's heartbeat row, and the roster of every router seen lately.
async fn keep_roster(client: &Client, options: &FeedOptions) -> Result<(), String> {
    let failed = |error: tokio_postgres::Error| error_text(&error);
    let router = &options.router;
    client
        .execute(
            "INSERT INTO llm_router_routers (id, address, version) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET last_seen = now(), address = excluded.address",
            &[&router.id, &router.address, &router.version],
        )
        .await
        .map_err(failed)?;
    let alive_for = ROUTER_ALIVE_FOR.as_secs_f64();
    let rows = client
        .query(
            "SELECT id, address, version, started_at, last_seen,
                    now() - last_seen < make_interval(secs => $1) AS alive,
                    extract(epoch FROM now() - last_seen)::float8 AS silent_for
             FROM llm_router_routers
             WHERE now() - last_seen < interval '1 hour'
             ORDER BY started_at, id",
            &[&alive_for],
        )
        .await
        .map_err(failed)?;
    let routers = rows
        .iter()
        .map(|row| RouterRow {
            id: row.get(0),
            address: row.get(1),
            version: row.get(2),
            started_at: row.get(3),
            last_seen: row.get(4),
            alive: row.get(5),
            silent_for: Duration::from_secs_f64(row.get::<_, f64>(6).max(0.0)),
        })
        .collect();
    options.roster.replace(routers);
    // Rows of routers gone for an hour: whoever notices removes them.
    let _ = client
        .execute(
            "DELETE FROM llm_router_routers WHERE now() - last_seen > interval '1 hour'",
            &[],
        )
        .await;
    Ok(())
}
