//! Several routers on one PostgreSQL registry (`--database-url`): each test
//! starts a throwaway PostgreSQL cluster (testkit::postgres) and the real
//! router binaries on 127.0.0.1, and talks HTTP to them.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{
    client, eventually, faketime_library, get_json, register, register_with_token, registration,
    router_on_database, RouterProcess,
};
use testkit::postgres::PostgresCluster;
use testkit::{StandIn, StandInOptions};

async fn heartbeat(client: &reqwest::Client, router: &RouterProcess, id: &str) -> u16 {
    client
        .post(router.url(&format!("/api/agents/{id}/heartbeat")))
        .json(&json!({}))
        .send()
        .await
        .expect("heartbeat")
        .status()
        .as_u16()
}

fn status_of(agent: &Value) -> String {
    agent["status"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_change_at_one_router_is_seen_and_routed_at_every_other() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let (a, _da) = router_on_database(&database, &[]).await;
    let (b, _db) = router_on_database(&database, &[]).await;
    let (c, _dc) = router_on_database(&database, &[]).await;
    let http = client();
    let node = StandIn::spawn(StandInOptions::ollama("node-1", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let port = node.address.port();
    let mut body = registration("shared-1");
    body["ip_address"] = json!("127.0.0.1");
    body["port"] = json!(port);

    // Registered at A: known and routable at B and C within a second.
    let started = Instant::now();
    let id = register(&http, &a.url(""), &body).await;
    for router in [&b, &c] {
        eventually(
            Duration::from_secs(1),
            "the agent shows at the other router",
            || {
                let (http, url) = (http.clone(), router.url(&format!("/api/agents/{id}")));
                async move { (get_json(&http, url).await.0 == 200).then_some(()) }
            },
        )
        .await;
    }
    println!("propagated to two routers in {:?}", started.elapsed());
    let chat = http
        .post(c.url("/api/chat"))
        .json(&json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("chat");
    assert_eq!(
        chat.status(),
        200,
        "routed at a router it was not registered at"
    );

    // Updated at B: C sees the new models.
    let update = http
        .put(b.url(&format!("/api/agents/{id}")))
        .json(&json!({"models": ["smollm2:135m", "qwen:0.5b"]}))
        .send()
        .await
        .expect("update");
    assert_eq!(update.status(), 200);
    eventually(Duration::from_secs(1), "the update shows at C", || {
        let (http, url) = (http.clone(), c.url(&format!("/api/agents/{id}")));
        async move {
            let (_, agent) = get_json(&http, url).await;
            (agent["models"].as_array().map(Vec::len) == Some(2)).then_some(())
        }
    })
    .await;

    // Deleted at C: gone at A, and a heartbeat for it at A is 404.
    let deleted = http
        .delete(c.url(&format!("/api/agents/{id}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    eventually(Duration::from_secs(1), "the deletion shows at A", || {
        let (http, url) = (http.clone(), a.url(&format!("/api/agents/{id}")));
        async move { (get_json(&http, url).await.0 == 404).then_some(()) }
    })
    .await;
    assert_eq!(heartbeat(&http, &a, &id).await, 404);
    // An update at B of the id deleted at C is 404 too, and writes nothing back.
    eventually(Duration::from_secs(1), "the deletion shows at B", || {
        let (http, url) = (http.clone(), b.url(&format!("/api/agents/{id}")));
        async move { (get_json(&http, url).await.0 == 404).then_some(()) }
    })
    .await;
    let db_name = database.rsplit('/').next().expect("db");
    assert_eq!(
        cluster.psql(db_name, "SELECT count(*) FROM llm_router_agents"),
        "0"
    );

    // The routers list each other (each reads the roster every second).
    let routers = eventually(Duration::from_secs(3), "three routers listed", || {
        let (http, url) = (http.clone(), a.url("/api/routers"));
        async move {
            let (_, routers) = get_json(&http, url).await;
            (routers["routers"].as_array().map(Vec::len) == Some(3)).then_some(routers)
        }
    })
    .await;
    assert_eq!(routers["store"], "postgres");
    let listed = routers["routers"].as_array().expect("routers");
    assert!(listed.iter().all(|r| r["alive"] == true));
    assert_eq!(
        listed.iter().filter(|r| r["this_router"] == true).count(),
        1
    );
    let _ = node;
}

#[tokio::test]
async fn one_machine_registering_at_two_routers_at_once_gets_one_id() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let (a, _da) = router_on_database(&database, &[]).await;
    let (b, _db) = router_on_database(&database, &[]).await;
    let http = client();
    for n in 0..20 {
        let body = registration(&format!("race-{n}"));
        let at = |router: &RouterProcess| {
            let (http, url, body) = (
                http.clone(),
                router.url("/api/agents/register"),
                body.clone(),
            );
            async move {
                let response = http.post(url).json(&body).send().await.expect("register");
                assert!(response.status().is_success(), "{}", response.status());
                let answer: Value = response.json().await.expect("json");
                answer["id"].as_str().expect("id").to_owned()
            }
        };
        let (first, second) = tokio::join!(at(&a), at(&b));
        assert_eq!(first, second, "race-{n} got two ids");
    }
    let db_name = database.rsplit('/').next().expect("db");
    assert_eq!(
        cluster.psql(db_name, "SELECT count(*) FROM llm_router_agents"),
        "20"
    );
    for router in [&a, &b] {
        eventually(Duration::from_secs(2), "20 agents at each router", || {
            let (http, url) = (http.clone(), router.url("/api/agents"));
            async move {
                let (_, agents) = get_json(&http, url).await;
                (agents.as_array().map(Vec::len) == Some(20)).then_some(())
            }
        })
        .await;
    }
}

/// A router whose wall clock is `offset` away from the others' (libfaketime;
/// its monotonic clock runs true, as on a machine with a wrong time).
async fn skewed_router_on(
    database: &str,
    offset: &str,
    extra: &[&str],
) -> (RouterProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let preload = format!("LD_PRELOAD={}", faketime_library());
    let offset = format!("FAKETIME={offset}");
    let mut args = vec!["--database-url", database];
    args.extend_from_slice(extra);
    let router = RouterProcess::spawn_wrapped(
        &["env", &preload, &offset, "FAKETIME_DONT_FAKE_MONOTONIC=1"],
        dir.path(),
        "127.0.0.1",
        &args,
    )
    .await;
    (router, dir)
}

/// An agent heartbeating only router A is Online at B and C all along,
/// though their wall clocks are 5 minutes behind and 10 ahead of A's;
/// silent everywhere, it goes Offline at all three within the timeout plus
/// 2 s.
#[tokio::test]
async fn an_agent_is_online_everywhere_while_any_router_hears_it() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let (a, _da) = router_on_database(&database, &["--agent-timeout", "2"]).await;
    let (b, _db) = skewed_router_on(&database, "-5m", &["--agent-timeout", "2"]).await;
    let (c, _dc) = skewed_router_on(&database, "+10m", &["--agent-timeout", "2"]).await;
    let http = client();
    // The skew is real: B stamps what it registers 5 minutes earlier.
    let probe = register(&http, &b.url(""), &registration("clock-probe")).await;
    let (_, probed) = get_json(&http, b.url(&format!("/api/agents/{probe}"))).await;
    let stamped: chrono::DateTime<chrono::Utc> = probed["registered_at"]
        .as_str()
        .expect("registered_at")
        .parse()
        .expect("date");
    let behind = chrono::Utc::now() - stamped;
    assert!(
        behind > chrono::Duration::minutes(4),
        "B's clock is not skewed: {behind}"
    );
    let id = register(&http, &a.url(""), &registration("heard-at-a")).await;
    for other in [&b, &c] {
        eventually(Duration::from_secs(1), "the agent shows elsewhere", || {
            let (http, url) = (http.clone(), other.url(&format!("/api/agents/{id}")));
            async move { (get_json(&http, url).await.0 == 200).then_some(()) }
        })
        .await;
    }
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(heartbeat(&http, &a, &id).await, 200);
        for other in [&b, &c] {
            let (status, agent) = get_json(&http, other.url(&format!("/api/agents/{id}"))).await;
            assert_eq!(status, 200);
            assert_eq!(
                status_of(&agent),
                "Online",
                "an agent heard at A went Offline elsewhere"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let silent_since = Instant::now();
    for router in [&a, &b, &c] {
        eventually(Duration::from_secs(5), "Offline after the timeout", || {
            let (http, url) = (http.clone(), router.url(&format!("/api/agents/{id}")));
            async move { (status_of(&get_json(&http, url).await.1) == "Offline").then_some(()) }
        })
        .await;
    }
    let took = silent_since.elapsed();
    assert!(
        took <= Duration::from_secs(4) + Duration::from_millis(500),
        "Offline everywhere after {took:?}"
    );
    // Heard again at B: Online at A too.
    assert_eq!(heartbeat(&http, &b, &id).await, 200);
    eventually(Duration::from_secs(2), "Online again at A", || {
        let (http, url) = (http.clone(), a.url(&format!("/api/agents/{id}")));
        async move { (status_of(&get_json(&http, url).await.1) == "Online").then_some(()) }
    })
    .await;
}

/// `llm-router migrate` copies a data dir's registry into the database,
/// ids and secrets' hashes kept: the agents' secrets work at a router on
/// the database. Running it again changes nothing.
#[tokio::test]
async fn migrate_copies_a_data_dir_into_the_database_once() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let http = client();
    let files = tempfile::tempdir().expect("tempdir");
    let mut file_router = RouterProcess::spawn(files.path(), &["--agent-token", "join-me"]).await;
    let mut agents = Vec::new();
    for name in ["moved-1", "moved-2"] {
        agents.push(
            register_with_token(&http, &file_router.url(""), "join-me", &registration(name)).await,
        );
    }
    file_router.terminate().await;

    let migrate = |database: String, dir: std::path::PathBuf| async move {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
            .arg("migrate")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--database-url", &database])
            .output()
            .await
            .expect("run migrate");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let first = migrate(database.clone(), files.path().to_owned()).await;
    assert!(first.contains("copied 2 agents"), "{first}");
    let again = migrate(database.clone(), files.path().to_owned()).await;
    assert!(
        again.contains("copied 0 agents") && again.contains("2 were there already"),
        "{again}"
    );
    let db = database.rsplit('/').next().expect("db");
    assert_eq!(
        cluster.psql(db, "SELECT count(*) FROM llm_router_agents"),
        "2"
    );

    let (router, _dir) = router_on_database(&database, &["--agent-token", "join-me"]).await;
    for (id, secret) in &agents {
        let (status, _) = get_json(&http, router.url(&format!("/api/agents/{id}"))).await;
        assert_eq!(status, 200, "{id} kept its id");
        let beat = http
            .post(router.url(&format!("/api/agents/{id}/heartbeat")))
            .bearer_auth(secret)
            .json(&json!({}))
            .send()
            .await
            .expect("heartbeat");
        assert_eq!(beat.status(), 200, "its secret still works");
        let wrong = http
            .post(router.url(&format!("/api/agents/{id}/heartbeat")))
            .bearer_auth("not-its-secret")
            .json(&json!({}))
            .send()
            .await
            .expect("heartbeat");
        assert_eq!(wrong.status(), 401);
    }
}

/// TLS to the database, the certificate checked (`sslmode=verify-full`
/// with `sslrootcert`), and the password never in the log; a database
/// whose certificate another CA signed stops start-up with the reason.
#[tokio::test]
async fn the_database_is_reached_over_verified_tls_and_its_password_never_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let (cert, key, ca) = (
        dir.path().join("db.crt"),
        dir.path().join("db.key"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, certified.cert.pem()).expect("cert");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("key");
    std::fs::write(&ca, certified.cert.pem()).expect("ca");
    let cluster = PostgresCluster::start_with(testkit::postgres::ClusterOptions {
        tls: Some((cert, key)),
        ..Default::default()
    });
    cluster.create_database();
    let database = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/registry_0?sslmode=verify-full&sslrootcert={}",
        cluster.port(),
        ca.display()
    );
    let (mut router, _rd) = router_on_database(&database, &[]).await;
    let http = client();
    register(&http, &router.url(""), &registration("over-tls")).await;
    let encrypted = cluster.psql(
        "registry_0",
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND application_name = 'llm-router'",
    );
    assert!(
        encrypted.parse::<u32>().expect("count") >= 2,
        "writer and feed over TLS: {encrypted}"
    );
    let log = router.terminate().await;
    assert!(!log.contains("hunter2"), "the password was logged");
    assert!(log.contains("postgres:REDACTED@127.0.0.1"), "{log}");

    let stranger = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, stranger.cert.pem()).expect("ca");
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(["--host", "127.0.0.1", "--port", "0", "--data-dir"])
        .arg(dir.path().join("unused"))
        .arg("--database-url")
        .arg(database.replace(&ca.display().to_string(), &other_ca.display().to_string()))
        .output()
        .await
        .expect("run");
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        error.contains("cannot connect") && error.to_lowercase().contains("certificate"),
        "{error}"
    );
    assert!(!error.contains("hunter2"), "{error}");
}

/// Three routers started at the same moment on an empty database: the
/// schema is created once (the migration lock), and all three serve.
#[tokio::test]
async fn routers_starting_together_on_an_empty_database_migrate_it_once() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let (a, b, c) = tokio::join!(
        router_on_database(&database, &[]),
        router_on_database(&database, &[]),
        router_on_database(&database, &[])
    );
    let db = database.rsplit('/').next().expect("db");
    assert_eq!(
        cluster.psql(
            db,
            "SELECT string_agg(version::text, ',') FROM llm_router_migrations"
        ),
        "1"
    );
    let http = client();
    let id = register(&http, &a.0.url(""), &registration("after-a-race")).await;
    for router in [&b.0, &c.0] {
        eventually(
            Duration::from_secs(1),
            "the agent shows at each router",
            || {
                let (http, url) = (http.clone(), router.url(&format!("/api/agents/{id}")));
                async move { (get_json(&http, url).await.0 == 200).then_some(()) }
            },
        )
        .await;
    }
}
