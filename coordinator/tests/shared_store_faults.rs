//! Several routers on one PostgreSQL registry when things go wrong: a
//! router killed with SIGKILL under load, the database stopped and started
//! again, each router's connections terminated, routers whose wall clocks
//! disagree by minutes; and moving a data dir's registry into a database,
//! and TLS to the database. Real router binaries, a real PostgreSQL.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use serde_json::{json, Value};
use support::{client, eventually, get_json, register, registration, router_on_database};
use testkit::postgres::PostgresCluster;
use testkit::{StandIn, StandInOptions};

async fn heartbeat(http: &reqwest::Client, base: &str, id: &str) -> u16 {
    http.post(format!("{base}/api/agents/{id}/heartbeat"))
        .json(&json!({}))
        .send()
        .await
        .map_or(0, |response| response.status().as_u16())
}

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().expect("database name")
}

/// The database stops: routing and heartbeats go on from memory, changes
/// are refused with 503 store_unavailable, and no agent goes Offline for
/// want of news. It starts again: every router reconnects by itself and
/// they agree again within 2 s.
#[tokio::test]
async fn while_the_database_is_away_routers_route_and_freeze_liveness() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let (a, _da) = router_on_database(&database, &["--agent-timeout", "2"]).await;
    let (b, _db) = router_on_database(&database, &["--agent-timeout", "2"]).await;
    let http = client();
    let node = StandIn::spawn(StandInOptions::ollama("node-db", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let port: u16 = node.address.port();
    let mut body = registration("db-away");
    body["ip_address"] = json!("127.0.0.1");
    body["port"] = json!(port);
    let id = register(&http, &a.url(""), &body).await;
    eventually(Duration::from_secs(2), "B knows the agent", || {
        let (http, url) = (http.clone(), b.url(&format!("/api/agents/{id}")));
        async move { (get_json(&http, url).await.0 == 200).then_some(()) }
    })
    .await;

    cluster.stop();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        // Heard at A only; B hears nothing of it while the database is away.
        assert_eq!(heartbeat(&http, &a.url(""), &id).await, 200);
        let (_, agent) = get_json(&http, b.url(&format!("/api/agents/{id}"))).await;
        assert_eq!(
            agent["status"], "Online",
            "B marked an agent Offline for want of news"
        );
        let chat = http
            .post(b.url("/api/chat"))
            .json(&json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("chat");
        assert_eq!(chat.status(), 200, "B routes from memory");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refused = http
        .post(a.url("/api/agents/register"))
        .json(&registration("while-away"))
        .send()
        .await
        .expect("register");
    assert_eq!(refused.status(), 503);
    let error: Value = refused.json().await.expect("json");
    assert_eq!(error["error"]["code"], "store_unavailable", "{error}");
    let (_, routers) = get_json(&http, a.url("/api/routers")).await;
    assert_eq!(routers["database_reachable"], false, "{routers}");

    cluster.start_again();
    let back = Instant::now();

    // A registration at B once it reconnects, seen at A.
    let new_id = eventually(Duration::from_secs(10), "B takes changes again", || {
        let (http, url) = (http.clone(), b.url("/api/agents/register"));
        async move {
            let response = http
                .post(url)
                .json(&registration("after-return"))
                .send()
                .await
                .ok()?;
            let answer: Value = response.json().await.ok()?;
            answer["id"].as_str().map(str::to_owned)
        }
    })
    .await;
    eventually(Duration::from_secs(2), "A sees B's registration", || {
        let (http, url) = (http.clone(), a.url(&format!("/api/agents/{new_id}")));
        async move { (get_json(&http, url).await.0 == 200).then_some(()) }
    })
    .await;
    println!(
        "converged {:?} after the database came back",
        back.elapsed()
    );
    // Heard at A, Online at B again with news flowing.
    for _ in 0..8 {
        assert_eq!(heartbeat(&http, &a.url(""), &id).await, 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, agent) = get_json(&http, b.url(&format!("/api/agents/{id}"))).await;
    assert_eq!(agent["status"], "Online");
    let _ = node;
}

/// `pg_terminate_backend` of every router connection while registrations
/// and heartbeats flow: the routers reconnect by themselves, nothing
/// acknowledged is lost, and no agent goes Offline.
#[tokio::test]
async fn terminated_database_connections_heal_by_themselves() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let (a, _da) = router_on_database(&database, &["--agent-timeout", "3"]).await;
    let (b, _db) = router_on_database(&database, &["--agent-timeout", "3"]).await;
    let http = client();
    let bases = [a.url(""), b.url("")];
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(register(&http, &bases[n % 2], &registration(&format!("steady-{n}"))).await);
    }
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (http, bases, ids, acknowledged, refused, stop) = (
            http.clone(),
            bases.clone(),
            ids.clone(),
            Arc::clone(&acknowledged),
            Arc::clone(&refused),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.is_cancelled() {
                for (index, id) in ids.iter().enumerate() {
                    heartbeat(&http, &bases[index % 2], id).await;
                }
                let response = http
                    .post(format!("{}/api/agents/register", bases[n % 2]))
                    .json(&registration(&format!("storm-{n}")))
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status().is_success() => {
                        let answer: Value = response.json().await.expect("json");
                        acknowledged
                            .lock()
                            .expect("ids")
                            .push(answer["id"].as_str().expect("id").to_owned());
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let terminated = cluster.psql(
        db_name(&database),
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'llm-router'",
    );
    assert!(
        terminated.parse::<u32>().expect("count") >= 4,
        "each router has a writer and a feed: {terminated}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    load.await.expect("load");
    let reconnected = cluster.psql(
        db_name(&database),
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'llm-router'",
    );
    assert!(
        reconnected.parse::<u32>().expect("count") >= 4,
        "both routers reconnected: {reconnected}"
    );
    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert!(
        acknowledged.len() > 20,
        "registrations went on: {}",
        acknowledged.len()
    );
    println!(
        "{} registrations acknowledged, {} refused around the termination",
        acknowledged.len(),
        refused.load(Ordering::Relaxed)
    );
    for id in &acknowledged {
        let stored = cluster.psql(
            db_name(&database),
            &format!("SELECT count(*) FROM llm_router_agents WHERE id = '{id}'"),
        );
        assert_eq!(
            stored, "1",
            "acknowledged registration {id} is in the database"
        );
    }
    for base in &bases {
        let (_, agents) = get_json(&http, format!("{base}/api/agents?status=online")).await;
        let online: Vec<&str> = agents
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|a| a["id"].as_str())
            .collect();
        for id in &ids {
            assert!(online.contains(&id.as_str()), "{id} went Offline at {base}");
        }
    }
}

/// Kill -9 one of three routers under a registration storm and chat load:
/// clients that retry on another router see no error, nothing acknowledged
/// is lost, the real agent moves to another router without registering
/// again and never goes Offline anywhere; the router comes back by itself.
#[tokio::test]
async fn kill_9_of_one_router_of_three_loses_nothing() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let (mut a, dir_a) = router_on_database(&database, &["--agent-timeout", "3"]).await;
    let (b, _db) = router_on_database(&database, &["--agent-timeout", "3"]).await;
    let (c, _dc) = router_on_database(&database, &["--agent-timeout", "3"]).await;
    let http = client();
    let node = StandIn::spawn(StandInOptions::ollama("node-k", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let state_dir = tempfile::tempdir().expect("state dir");
    let agent_config = support::agent_config(
        vec![a.url(""), b.url(""), c.url("")],
        node.url(),
        "node-k",
        Duration::from_millis(500),
        state_dir.path(),
    );
    let stop_agent = tokio_util::sync::CancellationToken::new();
    let agent_task = tokio::spawn(agent::run(agent_config, stop_agent.clone()));
    let agent_id = eventually(
        Duration::from_secs(5),
        "the agent registers and reports",
        || {
            let (http, url) = (http.clone(), b.url("/api/agents"));
            async move {
                let (_, agents) = get_json(&http, url).await;
                agents
                    .as_array()?
                    .iter()
                    .find(|a| a["machine_name"] == "node-k" && a["routable"] == true)
                    .and_then(|a| a["id"].as_str().map(str::to_owned))
            }
        },
    )
    .await;

    let bases = vec![a.url(""), b.url(""), c.url("")];
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let chats = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for worker in 0..4usize {
        let (http, bases, acknowledged, errors, chats, stop) = (
            http.clone(),
            bases.clone(),
            Arc::clone(&acknowledged),
            Arc::clone(&errors),
            Arc::clone(&chats),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.is_cancelled() {
                // Each request goes to one router, and on an error to the next.
                let mut done = false;
                for attempt in 0..bases.len() {
                    let base = &bases[(worker + n + attempt) % bases.len()];
                    if worker % 2 == 0 {
                        // Nodes that only register (nothing listens at
                        // their address), for a model no chat asks for.
                        let mut body = registration(&format!("storm-{worker}-{n}"));
                        body["models"] = json!(["registered-only:1b"]);
                        let sent = http.post(format!("{base}/api/agents/register"))
                            .json(&body)
                            .send().await;
                        if let Ok(response) = sent {
                            if response.status().is_success() {
                                if let Ok(answer) = response.json::<Value>().await {
                                    acknowledged.lock().expect("ids").push(answer["id"].as_str().unwrap_or_default().to_owned());
                                    done = true;
                                    break;
                                }
                            }
                        }
                    } else {
                        let sent = http.post(format!("{base}/api/chat"))
                            .json(&json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
                            .send().await;
                        if let Ok(response) = sent {
                            if response.status().is_success() && response.bytes().await.is_ok() {
                                chats.fetch_add(1, Ordering::Relaxed);
                                done = true;
                                break;
                            }
                        }
                    }
                }
                if !done {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let change_before = cluster.psql(
        db_name(&database),
        &format!("SELECT change_seq FROM llm_router_agents WHERE id = '{agent_id}'"),
    );
    kill(a.pid(), Signal::SIGKILL).expect("kill -9");
    let _ = a.child.wait().await;
    let killed_at = Instant::now();
    // For 4 s (more than the agent timeout) nobody may go Offline.
    while killed_at.elapsed() < Duration::from_secs(4) {
        for router in [&b, &c] {
            let (_, agent) = get_json(&http, router.url(&format!("/api/agents/{agent_id}"))).await;
            assert_eq!(
                agent["status"], "Online",
                "the agent went Offline after a router died"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    for task in load {
        task.await.expect("load");
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "clients retrying on another router saw errors"
    );
    let acknowledged = acknowledged.lock().expect("ids").clone();
    println!(
        "{} registrations and {} chats across the kill",
        acknowledged.len(),
        chats.load(Ordering::Relaxed)
    );
    assert!(acknowledged.len() > 50 && chats.load(Ordering::Relaxed) > 50);
    let (_, listed) = get_json(&http, c.url("/api/agents")).await;
    let known: std::collections::HashSet<&str> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    for id in &acknowledged {
        assert!(known.contains(id.as_str()), "acknowledged {id} was lost");
    }
    // The agent moved without registering again: a registration rewrites
    // its row (a new change number); heartbeats do not.
    let change_after = cluster.psql(
        db_name(&database),
        &format!("SELECT change_seq FROM llm_router_agents WHERE id = '{agent_id}'"),
    );
    assert_eq!(
        change_after, change_before,
        "the agent registered again at another router"
    );
    let (_, agent) = get_json(&http, b.url(&format!("/api/agents/{agent_id}"))).await;
    assert_eq!(agent["state"], "serving", "{agent}");

    // The killed router comes back on its own and rejoins.
    let (back, _dir) = router_on_database(&database, &["--agent-timeout", "3"]).await;
    drop(dir_a);
    let (_, agents) = get_json(&http, back.url("/api/agents")).await;
    assert_eq!(
        agents.as_array().map(Vec::len),
        listed.as_array().map(Vec::len)
    );
    eventually(
        Duration::from_secs(3),
        "the roster lists the returned router",
        || {
            let (http, url, address) = (http.clone(), b.url("/api/routers"), back.url(""));
            async move {
                let (_, routers) = get_json(&http, url).await;
                routers["routers"]
                    .as_array()?
                    .iter()
                    .any(|r| r["address"] == address && r["alive"] == true)
                    .then_some(())
            }
        },
    )
    .await;
    stop_agent.cancel();
    let _ = agent_task.await;
}
