//! Several routers on one PostgreSQL registry (`--database-url`): each test
//! starts a throwaway PostgreSQL cluster (testkit::postgres) and the real
//! router binaries on 127.0.0.1, and talks HTTP to them.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{client, eventually, register, registration, RouterProcess};
use testkit::postgres::PostgresCluster;
use testkit::{StandIn, StandInOptions};

/// A router on the shared database, with a short agent timeout when asked.
async fn router_on(database: &str, extra: &[&str]) -> (RouterProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = vec!["--database-url", database];
    args.extend_from_slice(extra);
    (RouterProcess::spawn(dir.path(), &args).await, dir)
}

async fn get(client: &reqwest::Client, url: String) -> (u16, Value) {
    let response = client.get(url).send().await.expect("get");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

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
    let (a, _da) = router_on(&database, &[]).await;
    let (b, _db) = router_on(&database, &[]).await;
    let (c, _dc) = router_on(&database, &[]).await;
    let http = client();
    let node = StandIn::spawn(StandInOptions::ollama("node-1", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let port = node.url().rsplit(':').next().expect("port").parse::<u16>().expect("port");
    let mut body = registration("shared-1");
    body["ip_address"] = json!("127.0.0.1");
    body["port"] = json!(port);

    // Registered at A: known and routable at B and C within a second.
    let started = Instant::now();
    let id = register(&http, &a.url(""), &body).await;
    for router in [&b, &c] {
        eventually(Duration::from_secs(1), "the agent shows at the other router", || {
            let (http, url) = (http.clone(), router.url(&format!("/api/agents/{id}")));
            async move { (get(&http, url).await.0 == 200).then_some(()) }
        })
        .await;
    }
    println!("propagated to two routers in {:?}", started.elapsed());
    let chat = http
        .post(c.url("/api/chat"))
        .json(&json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("chat");
    assert_eq!(chat.status(), 200, "routed at a router it was not registered at");

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
            let (_, agent) = get(&http, url).await;
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
        async move { (get(&http, url).await.0 == 404).then_some(()) }
    })
    .await;
    assert_eq!(heartbeat(&http, &a, &id).await, 404);
    // An update at B of the id deleted at C is 404 too, and writes nothing back.
    eventually(Duration::from_secs(1), "the deletion shows at B", || {
        let (http, url) = (http.clone(), b.url(&format!("/api/agents/{id}")));
        async move { (get(&http, url).await.0 == 404).then_some(()) }
    })
    .await;
    let db_name = database.rsplit('/').next().expect("db");
    assert_eq!(cluster.psql(db_name, "SELECT count(*) FROM llm_router_agents"), "0");

    // The routers list each other (each reads the roster every second).
    let routers = eventually(Duration::from_secs(3), "three routers listed", || {
        let (http, url) = (http.clone(), a.url("/api/routers"));
        async move {
            let (_, routers) = get(&http, url).await;
            (routers["routers"].as_array().map(Vec::len) == Some(3)).then_some(routers)
        }
    })
    .await;
    assert_eq!(routers["store"], "postgres");
    let listed = routers["routers"].as_array().expect("routers");
    assert!(listed.iter().all(|r| r["alive"] == true));
    assert_eq!(listed.iter().filter(|r| r["this_router"] == true).count(), 1);
    let _ = node;
}

#[tokio::test]
async fn one_machine_registering_at_two_routers_at_once_gets_one_id() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let (a, _da) = router_on(&database, &[]).await;
    let (b, _db) = router_on(&database, &[]).await;
    let http = client();
    for n in 0..20 {
        let body = registration(&format!("race-{n}"));
        let at = |router: &RouterProcess| {
            let (http, url, body) = (http.clone(), router.url("/api/agents/register"), body.clone());
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
    assert_eq!(cluster.psql(db_name, "SELECT count(*) FROM llm_router_agents"), "20");
    for router in [&a, &b] {
        eventually(Duration::from_secs(2), "20 agents at each router", || {
            let (http, url) = (http.clone(), router.url("/api/agents"));
            async move {
                let (_, agents) = get(&http, url).await;
                (agents.as_array().map(Vec::len) == Some(20)).then_some(())
            }
        })
        .await;
    }
}

/// An agent heartbeating only router A is Online at B all along; silent
/// everywhere, it goes Offline at both within the timeout plus 2 s.
#[tokio::test]
async fn an_agent_is_online_everywhere_while_any_router_hears_it() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database();
    let (a, _da) = router_on(&database, &["--agent-timeout", "2"]).await;
    let (b, _db) = router_on(&database, &["--agent-timeout", "2"]).await;
    let http = client();
    let id = register(&http, &a.url(""), &registration("heard-at-a")).await;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(heartbeat(&http, &a, &id).await, 200);
        let (status, agent) = get(&http, b.url(&format!("/api/agents/{id}"))).await;
        assert_eq!(status, 200);
        assert_eq!(status_of(&agent), "Online", "B let an agent heard at A go Offline");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let silent_since = Instant::now();
    for router in [&a, &b] {
        eventually(Duration::from_secs(5), "Offline after the timeout", || {
            let (http, url) = (http.clone(), router.url(&format!("/api/agents/{id}")));
            async move { (status_of(&get(&http, url).await.1) == "Offline").then_some(()) }
        })
        .await;
    }
    let took = silent_since.elapsed();
    assert!(took <= Duration::from_secs(4) + Duration::from_millis(500), "Offline everywhere after {took:?}");
    // Heard again at B: Online at A too.
    assert_eq!(heartbeat(&http, &b, &id).await, 200);
    eventually(Duration::from_secs(2), "Online again at A", || {
        let (http, url) = (http.clone(), a.url(&format!("/api/agents/{id}")));
        async move { (status_of(&get(&http, url).await.1) == "Online").then_some(()) }
    })
    .await;
}
