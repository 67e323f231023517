//! Several routers on one PostgreSQL registry, the database on this same
//! machine (a throwaway cluster with production durability: fsync and
//! synchronous commit on). Figures:
//! - a registration storm through one router on the database;
//! - heartbeats with the fleet registered, through each of three routers
//!   on the database, against one router on the data files in the same run;
//! - how long a change at one router takes to show at another;
//! - a new router joining the registered fleet: start to serving;
//! - statements per second the database runs while the fleet heartbeats
//!   every 30 s through three routers (pg_stat_statements).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;
use testkit::postgres::{ClusterOptions, PostgresCluster};

use crate::load::{self, get, post_json, Limit};
use crate::procs::Proc;
use crate::scenarios::{
    call, check_clean, fleet_registration, milliseconds, Context, Figures, HEARTBEAT_BODY,
};

fn database_router(
    context: &Context,
    database: &str,
    work: &Path,
    name: &str,
) -> anyhow::Result<(Proc, SocketAddr)> {
    context.binaries.router(
        &work.join(name),
        &[
            "--agent-timeout",
            "3600",
            "--health-check-interval",
            "0",
            "--database-url",
            database,
        ],
        work,
    )
}

async fn fleet_ids(address: SocketAddr) -> anyhow::Result<Arc<Vec<String>>> {
    let (_, listed) = call(address, get("/api/agents")).await?;
    let listed: Vec<Value> = serde_json::from_slice(&listed)?;
    Ok(Arc::new(
        listed
            .iter()
            .filter_map(|agent| agent["id"].as_str().map(str::to_owned))
            .collect(),
    ))
}

async fn heartbeat_rate(
    context: &Context,
    address: SocketAddr,
    ids: &Arc<Vec<String>>,
) -> anyhow::Result<f64> {
    let ids = Arc::clone(ids);
    let result = load::run(
        address,
        context.heartbeat_connections,
        context.measure_for(),
        Arc::new(move |n| {
            let id = &ids[(n as usize).wrapping_mul(7_919) % ids.len()];
            post_json(
                &format!("/api/agents/{id}/heartbeat"),
                HEARTBEAT_BODY.to_vec(),
            )
        }),
    )
    .await;
    check_clean("heartbeats", &result)?;
    Ok(result.rate())
}

async fn fill(address: SocketAddr, from: u64, to: u64) -> anyhow::Result<()> {
    if to > from {
        let result = load::run(
            address,
            256,
            Limit::Total(to - from),
            Arc::new(move |n| post_json("/api/agents/register", fleet_registration(n + from))),
        )
        .await;
        check_clean("filling the fleet", &result)?;
    }
    Ok(())
}

pub async fn shared(context: &Context, work: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let cluster = PostgresCluster::start_with(ClusterOptions {
        settings: vec!["shared_preload_libraries=pg_stat_statements".to_owned()],
        ..ClusterOptions::default()
    });
    let database = cluster.create_database();
    let db_name = database.rsplit('/').next().unwrap_or_default().to_owned();
    let (mut first, first_address) = database_router(context, &database, work, "shared-a")?;

    // The storm: 10,000 new agents over 256 connections, one router.
    let storm_size = 10_000u64.min(context.fleet);
    let storm = load::run(
        first_address,
        256,
        Limit::Total(storm_size),
        Arc::new(|n| post_json("/api/agents/register", fleet_registration(n))),
    )
    .await;
    check_clean("registration storm on PostgreSQL", &storm)?;
    figures.insert("pg_storm_registrations_per_s", storm.rate());
    figures.insert("pg_storm_p99_ms", storm.p99_us() / 1_000.0);
    fill(first_address, storm_size, context.fleet).await?;

    // A new router joining the registered fleet.
    let begun = Instant::now();
    let (second, second_address) = database_router(context, &database, work, "shared-b")?;
    loop {
        if let Ok((200, _)) = call(second_address, get("/health")).await {
            break;
        }
        if begun.elapsed() > Duration::from_secs(60) {
            bail!("the joining router did not serve");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    figures.insert("pg_join_fleet_ms", milliseconds(begun.elapsed()));
    let (third, third_address) = database_router(context, &database, work, "shared-c")?;
    let ids = fleet_ids(third_address).await?;
    if ids.len() as u64 != context.fleet {
        bail!(
            "the third router lists {} of {} agents",
            ids.len(),
            context.fleet
        );
    }

    // Propagation: register at A, poll B until it answers 200.
    let mut delays = Vec::new();
    for n in 0..200u64 {
        let body = fleet_registration(context.fleet + 1_000_000 + n);
        let (status, answer) = call(first_address, post_json("/api/agents/register", body)).await?;
        let registered = Instant::now();
        if status != 201 {
            bail!("registering for the propagation figure: {status}");
        }
        let answer: Value = serde_json::from_slice(&answer)?;
        let id = answer["id"].as_str().unwrap_or_default().to_owned();
        loop {
            if let Ok((200, _)) = call(second_address, get(&format!("/api/agents/{id}"))).await {
                break;
            }
            if registered.elapsed() > Duration::from_secs(10) {
                bail!("a registration at one router never showed at another");
            }
        }
        delays.push(milliseconds(registered.elapsed()));
    }
    delays.sort_by(f64::total_cmp);
    figures.insert("pg_propagation_p50_ms", delays[delays.len() / 2]);
    figures.insert("pg_propagation_p99_ms", delays[delays.len() * 99 / 100]);

    // Statements the database runs while 100,000 agents heartbeat every
    // 30 s through the three routers: 3,333 heartbeats/s, paced.
    cluster.psql(
        &db_name,
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    );
    cluster.psql(&db_name, "SELECT pg_stat_statements_reset()");
    let statements_begun = Instant::now();
    let paced_for = Duration::from_secs_f64(context.seconds.max(5.0) * 2.0);
    let per_router_per_tick = (context.fleet as f64 / 30.0 / 3.0 / 100.0).ceil() as usize;
    let mut pacers = Vec::new();
    for (index, address) in [first_address, second_address, third_address]
        .into_iter()
        .enumerate()
    {
        let ids = Arc::clone(&ids);
        pacers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut next = index;
            let mut sent = 0u64;
            let until = Instant::now() + paced_for;
            while Instant::now() < until {
                tick.tick().await;
                for _ in 0..per_router_per_tick {
                    let id = &ids[next % ids.len()];
                    next += 3;
                    if let Ok((200, _)) = call(
                        address,
                        post_json(
                            &format!("/api/agents/{id}/heartbeat"),
                            HEARTBEAT_BODY.to_vec(),
                        ),
                    )
                    .await
                    {
                        sent += 1;
                    }
                }
            }
            sent
        }));
    }
    let mut paced = 0;
    for pacer in pacers {
        paced += pacer.await.unwrap_or(0);
    }
    let elapsed = statements_begun.elapsed().as_secs_f64();
    let statements: f64 = cluster
        .psql(
            &db_name,
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database()",
        )
        .parse()
        .unwrap_or(f64::NAN);
    figures.insert("pg_paced_heartbeats_per_s", paced as f64 / elapsed);
    figures.insert(
        "pg_statements_per_s_at_100k_every_30s",
        statements / elapsed,
    );

    // Heartbeat throughput: each database router alone under the load,
    // against a router on the data files with the same fleet, same run.
    let mut rates = Vec::new();
    for address in [first_address, second_address, third_address] {
        rates.push(heartbeat_rate(context, address, &ids).await?);
    }
    let data = work.join("shared-files");
    let (files_router, files_address) =
        context
            .binaries
            .router(&data, crate::scenarios::FLEET_ROUTER_ARGS, work)?;
    fill(files_address, 0, context.fleet).await?;
    let file_ids = fleet_ids(files_address).await?;
    let file_rate = heartbeat_rate(context, files_address, &file_ids).await?;
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    figures.insert("pg_heartbeats_per_s_slowest_router", slowest);
    figures.insert("files_heartbeats_per_s_same_run", file_rate);
    figures.insert("pg_heartbeat_vs_files_pct", 100.0 * slowest / file_rate);
    figures.insert("rss_pg_router_fleet_mb", first.rss_bytes() as f64 / 1e6);
    drop(files_router);
    drop((second, third));
    first.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = first.wait_exit(Duration::from_secs(60));
    drop(cluster);
    Ok(())
}
