//! What the router keeps: persistence across restarts, `kill -9` right
//! after acknowledged changes, the corrupt-file policy, an unusable data dir,
//! clean shutdown on SIGTERM, and liveness (Offline after the timeout, back
//! Online on a heartbeat, grace after a restart).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::balancer::{ApiKind, Balancer, Policy};
use coordinator::registry::Registry;
use coordinator::store;
use nix::sys::signal::{kill, Signal};
use serde_json::Value;
use support::{
    client, config, eventually, list, register, registration, RouterProcess, TestRouter,
};

#[tokio::test]
async fn agents_survive_a_restart_and_get_a_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    // All Online when stored, however slow the machine is right now...
    let router = TestRouter::start(config(dir.path())).await;
    let client = client();
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(register(&client, &router.base(), &registration(&format!("node-{n}"))).await);
    }
    router.stop().await.expect("clean stop");
    // ...then restarted with a timeout shorter than their silence.
    let mut cfg = config(dir.path());
    cfg.agent_timeout = Duration::from_secs(2);
    // Longer than the timeout passes with no heartbeat at all.
    tokio::time::sleep(Duration::from_millis(2_200)).await;

    let router = TestRouter::start(cfg).await;
    let agents = list(&client, &router.base()).await;
    let mut listed: Vec<String> = agents
        .iter()
        .map(|a| a["id"].as_str().expect("id").to_owned())
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    assert!(
        agents.iter().all(|a| a["status"] == "Online"),
        "a restart does not mark the fleet Offline, however old last_seen is"
    );
    // The grace is one timeout: silent agents do go Offline after it.
    let url = router.base();
    eventually(
        Duration::from_secs(10),
        "Offline after the grace period",
        || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                list(&client, &url)
                    .await
                    .iter()
                    .all(|a| a["status"] == "Offline")
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn snapshot_is_the_seeds_pretty_json_array_with_a_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    for round in 0..2 {
        let router = TestRouter::start(config(dir.path())).await;
        register(
            &client,
            &router.base(),
            &registration(&format!("round-{round}")),
        )
        .await;
        router.stop().await.expect("clean stop");
    }
    let text = std::fs::read_to_string(dir.path().join("agents.json")).expect("agents.json");
    assert!(text.starts_with("[\n  {"), "pretty-printed array");
    let agents: Vec<common::Agent> = serde_json::from_str(&text).expect("parses as agents");
    assert_eq!(agents.len(), 2);
    let backup: Vec<common::Agent> =
        serde_json::from_slice(&std::fs::read(dir.path().join("agents.json.bak")).expect("backup"))
            .expect("backup parses");
    assert_eq!(backup.len(), 1, "the previous good snapshot");
}

#[tokio::test]
async fn sigkill_right_after_acknowledged_registrations_loses_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    for round in 0..3 {
        let mut router = RouterProcess::spawn(dir.path(), &["--flush-interval", "0.05"]).await;
        let url = router.url("");
        let registrations = (0..100).map(|n| {
            let client = client.clone();
            let url = url.clone();
            async move { register(&client, &url, &registration(&format!("r{round}-n{n}"))).await }
        });
        let mut acknowledged = futures::future::join_all(registrations).await;
        kill(router.pid(), Signal::SIGKILL).expect("kill -9");
        let _ = router.child.wait().await;

        let restarted = TestRouter::start(config(dir.path())).await;
        let listed: Vec<String> = list(&client, &restarted.base())
            .await
            .iter()
            .filter(|a| {
                a["machine_name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&format!("r{round}-")))
            })
            .map(|a| a["id"].as_str().expect("id").to_owned())
            .collect();
        let mut listed = listed;
        listed.sort();
        acknowledged.sort();
        assert_eq!(
            listed, acknowledged,
            "round {round}: every acknowledged registration is there"
        );
        assert_eq!(
            list(&client, &restarted.base()).await.len(),
            100 * (round + 1)
        );
        restarted.stop().await.expect("clean stop");
    }
}

#[tokio::test]
async fn sigkill_keeps_acknowledged_deletes_and_updates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let url = router.url("");
    let kept = register(&client, &url, &registration("kept")).await;
    let deleted = register(&client, &url, &registration("deleted")).await;
    let response = client
        .delete(format!("{url}/api/agents/{deleted}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), 204);
    let response = client
        .put(format!("{url}/api/agents/{kept}"))
        .json(&serde_json::json!({"runtime_version": "after-update"}))
        .send()
        .await
        .expect("put");
    assert_eq!(response.status(), 200);
    kill(router.pid(), Signal::SIGKILL).expect("kill -9");
    let _ = router.child.wait().await;

    let restarted = TestRouter::start(config(dir.path())).await;
    let agents = list(&client, &restarted.base()).await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["id"], kept.as_str());
    assert_eq!(agents[0]["runtime_version"], "after-update");
}

#[tokio::test]
async fn sigterm_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let mut router = RouterProcess::spawn(dir.path(), &["--flush-interval", "3600"]).await;
    let url = router.url("");
    let id = register(&client, &url, &registration("beating")).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let last_seen = heartbeat_and_read_last_seen(&client, &url, &id).await;

    stop_cleanly(&mut router).await;

    // With an hour-long flush interval, only the shutdown flush can have
    // written the heartbeat's last_seen.
    let stored: Vec<Value> = serde_json::from_slice(
        &std::fs::read(dir.path().join("agents.json")).expect("agents.json"),
    )
    .expect("parses");
    assert_eq!(stored[0]["last_seen"], last_seen);
    let journal = std::fs::read(dir.path().join("agents.journal")).expect("journal");
    assert!(
        journal.is_empty(),
        "the journal was folded into the snapshot"
    );
}

async fn assert_corrupt_snapshot_policy(bad_bytes: &[u8], with_backup: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let router = TestRouter::start(config(dir.path())).await;
    let id = register(&client, &router.base(), &registration("survivor")).await;
    router.stop().await.expect("clean stop");
    let snapshot = dir.path().join("agents.json");
    // The good file becomes the backup, and the main file is damaged.
    if with_backup {
        std::fs::copy(&snapshot, dir.path().join("agents.json.bak")).expect("backup");
    } else {
        let _ = std::fs::remove_file(dir.path().join("agents.json.bak"));
    }
    std::fs::write(&snapshot, bad_bytes).expect("damage");

    let router = TestRouter::start(config(dir.path())).await;
    let agents = list(&client, &router.base()).await;
    if with_backup {
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0]["id"], id.as_str());
    } else {
        assert!(agents.is_empty());
    }
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("agents.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the bad file is kept aside");
    assert_eq!(
        std::fs::read(aside[0].path()).expect("read"),
        bad_bytes,
        "byte for byte"
    );

    // The router carries on normally and writes a good file again.
    register(&client, &router.base(), &registration("newcomer")).await;
    router.stop().await.expect("clean stop");
    let stored: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&snapshot).expect("agents.json"))
            .expect("parses again");
    assert_eq!(stored.len(), if with_backup { 2 } else { 1 });
}

#[tokio::test]
async fn garbage_snapshot_is_moved_aside_and_the_backup_used() {
    assert_corrupt_snapshot_policy(b"{ this is not json", true).await;
}

#[tokio::test]
async fn empty_snapshot_is_moved_aside_and_the_backup_used() {
    assert_corrupt_snapshot_policy(b"", true).await;
}

#[tokio::test]
async fn truncated_snapshot_is_moved_aside_and_the_backup_used() {
    assert_corrupt_snapshot_policy(b"[\n  {\n    \"id\": \"8c1e", true).await;
}

#[tokio::test]
async fn nul_filled_snapshot_without_backup_starts_empty() {
    assert_corrupt_snapshot_policy(&[0u8; 4096], false).await;
}

#[tokio::test]
async fn snapshot_that_is_not_utf8_is_moved_aside_and_the_backup_used() {
    // Whole-file UTF-8 checking must not turn a bad byte into a panic or a
    // silent skip: the file is corrupt like any other.
    assert_corrupt_snapshot_policy(b"[\n  {\n    \"id\": \"\xff\"\n  }\n]\n", true).await;
}

/// The loader borrows strings from the file and tries chrono's RFC 3339
/// parser before its general one: a hand-edited file with escaped strings,
/// dates in other forms chrono reads, and two agents under one name and
/// port still loads as written, the later of the two kept.
#[tokio::test]
async fn a_hand_edited_snapshot_loads_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let router = TestRouter::start(config(dir.path())).await;
    let mut ids = Vec::new();
    for name in ["first", "second", "third"] {
        ids.push(register(&client, &router.base(), &registration(name)).await);
    }
    router.stop().await.expect("clean stop");

    let snapshot = dir.path().join("agents.json");
    let mut stored: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&snapshot).expect("agents.json")).expect("parses");
    let by_id = |stored: &mut Vec<Value>, id: &str| -> usize {
        stored
            .iter()
            .position(|agent| agent["id"] == id)
            .expect("stored")
    };
    let (first, second, third) = (
        by_id(&mut stored, &ids[0]),
        by_id(&mut stored, &ids[1]),
        by_id(&mut stored, &ids[2]),
    );
    let escaped_name = "gpu \"quoted\" \\ tab\there caf\u{e9}";
    stored[first]["machine_name"] = Value::from(escaped_name);
    stored[first]["models"] = serde_json::json!(["model \"one\"", "caf\u{e9}:7b"]);
    // The same name and port later in the file: that record wins.
    stored[third]["machine_name"] = Value::from(escaped_name);
    stored[third]["models"] = serde_json::json!(["model \"three\""]);
    // RFC 3339 with a space for the `T`, and a form only chrono's general
    // parser reads (a space before an offset without its colon).
    stored[second]["registered_at"] = Value::from("2026-01-02 03:04:05.5 +0200");
    stored[second]["last_seen"] = Value::from("2026-01-02 03:04:06+02:00");
    let text = serde_json::to_string_pretty(&stored)
        .expect("json")
        // serde_json writes non-ASCII as it is; a hand edit may escape it.
        .replace('\u{e9}', "\\u00e9");
    assert!(text.contains("\\\"quoted\\\"") && text.contains("\\u00e9"));
    std::fs::write(&snapshot, text).expect("edit");

    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let agents = list(&client, &router.url("")).await;
    let listed: Vec<&str> = agents
        .iter()
        .map(|agent| agent["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        listed,
        [ids[1].as_str(), ids[2].as_str()],
        "the earlier of two under one name and port is dropped; the order \
         is by registration, and the edited date moved `second` first"
    );
    let second_agent = &agents[0];
    let registered_at: chrono::DateTime<chrono::Utc> = second_agent["registered_at"]
        .as_str()
        .expect("date")
        .parse()
        .expect("an RFC 3339 date");
    assert_eq!(
        registered_at,
        chrono::DateTime::parse_from_rfc3339("2026-01-02T01:04:05.5Z").expect("date")
    );
    let third_agent = &agents[1];
    assert_eq!(third_agent["machine_name"], escaped_name);
    assert_eq!(
        third_agent["models"],
        serde_json::json!(["model \"three\""])
    );
    let log = router.terminate().await;
    assert!(
        log.contains("Two stored agents share a name and port") && log.contains(&ids[0]),
        "the drop is logged with the id dropped: {log}"
    );
}

/// A snapshot large enough that the router reads it in parts on several
/// threads, and indexes it on two (over 8 MiB and 10,000 agents), loads
/// whole: every agent, in order, and of two under one name and port, one
/// in each half of the file, only the later.
#[tokio::test]
async fn a_large_snapshot_loads_whole() {
    const AGENTS: usize = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let router = TestRouter::start(config(dir.path())).await;
    register(&client, &router.base(), &registration("template")).await;
    router.stop().await.expect("clean stop");
    let snapshot = dir.path().join("agents.json");
    let stored: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&snapshot).expect("agents.json")).expect("parses");
    let template = &stored[0];
    let mut agents: Vec<Value> = (0..AGENTS)
        .map(|n| {
            let mut agent = template.clone();
            agent["id"] = Value::from(uuid::Uuid::new_v4().to_string());
            agent["machine_name"] = Value::from(format!("node-{n:05}"));
            // One second apart, so that the listing's order is the file's.
            agent["registered_at"] = Value::from(
                (chrono::DateTime::UNIX_EPOCH
                    + chrono::Duration::seconds(1_800_000_000 + n as i64))
                .to_rfc3339(),
            );
            agent
        })
        .collect();
    let mut again = agents[7].clone();
    again["id"] = Value::from(uuid::Uuid::new_v4().to_string());
    again["registered_at"] = Value::from("2030-01-01T00:00:00Z");
    agents.push(again.clone());
    let text = serde_json::to_string_pretty(&agents).expect("json");
    assert!(text.len() > 8 << 20, "{} bytes", text.len());
    std::fs::write(&snapshot, text).expect("write");

    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let listed = list(&client, &router.url("")).await;
    let listed: Vec<&str> = listed
        .iter()
        .map(|agent| agent["id"].as_str().expect("id"))
        .collect();
    let mut expected: Vec<&str> = agents
        .iter()
        .map(|agent| agent["id"].as_str().expect("id"))
        .collect();
    expected.remove(7);
    assert_eq!(listed.len(), AGENTS);
    let first_difference = listed.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "the listing differs from the file's agents"
    );
    assert_eq!(
        listed.last(),
        again["id"].as_str().map(Some).expect("id").as_ref()
    );
    router.terminate().await;
}

/// One heartbeat from the (only) agent, and the `last_seen` it set.
async fn heartbeat_and_read_last_seen(client: &reqwest::Client, url: &str, id: &str) -> Value {
    client
        .post(format!("{url}/api/agents/{id}/heartbeat"))
        .send()
        .await
        .expect("heartbeat");
    list(client, url).await[0]["last_seen"].clone()
}

/// SIGTERM, and the router exits 0 promptly.
async fn stop_cleanly(router: &mut RouterProcess) {
    kill(router.pid(), Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(20), router.child.wait())
        .await
        .expect("exits promptly")
        .expect("wait");
    assert!(status.success(), "exit status {status:?}");
}

/// What a file's bytes and identity are now: a rewrite (a new snapshot is
/// a new file renamed into place) changes the inode even if the bytes match.
fn file_state(path: &std::path::Path) -> Option<(u64, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.ino(), std::fs::read(path).ok()?))
}

/// agents.json shows a registration soon after registrations go quiet, not
/// a snapshot interval later; a storm that never goes quiet is not
/// snapshotted for each change; heartbeats alone never rewrite it.
#[tokio::test]
async fn agents_json_shows_registrations_once_they_go_quiet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let router = RouterProcess::spawn(
        dir.path(),
        &[
            "--snapshot-interval",
            "3600",
            "--snapshot-when-quiet",
            "1",
            "--flush-interval",
            "0.1",
        ],
    )
    .await;
    let url = router.url("");
    let snapshot = dir.path().join("agents.json");

    // A storm: a registration every 100 ms for 3 s never leaves a second
    // of quiet, so no snapshot is written while it lasts.
    let mut ids = Vec::new();
    let storm_began = Instant::now();
    while storm_began.elapsed() < Duration::from_secs(3) {
        ids.push(register(&client, &url, &registration(&format!("node-{}", ids.len()))).await);
        assert!(
            file_state(&snapshot).is_none(),
            "a snapshot while registrations went on ({} so far)",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Quiet now: agents.json follows within the second of quiet (and the
    // time a snapshot takes).
    let stored = eventually(
        Duration::from_secs(10),
        "agents.json shows the storm",
        || {
            let snapshot = snapshot.clone();
            async move {
                let (_, bytes) = file_state(&snapshot)?;
                let stored: Vec<Value> = serde_json::from_slice(&bytes).ok()?;
                Some(stored)
            }
        },
    )
    .await;
    let stored: Vec<&str> = stored
        .iter()
        .map(|a| a["id"].as_str().expect("id"))
        .collect();
    assert_eq!(stored, ids, "every registration, in order");

    // Heartbeats for 3 s, flushed every 100 ms: liveness goes to the
    // journal, and agents.json is left as it is.
    let written = file_state(&snapshot);
    let beats_began = Instant::now();
    while beats_began.elapsed() < Duration::from_secs(3) {
        for id in &ids {
            client
                .post(format!("{url}/api/agents/{id}/heartbeat"))
                .send()
                .await
                .expect("heartbeat");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        std::fs::metadata(dir.path().join("agents.journal"))
            .expect("journal")
            .len()
            > 0,
        "liveness was journaled"
    );
    assert_eq!(
        file_state(&snapshot),
        written,
        "heartbeats rewrote agents.json"
    );
}

/// A clean stop with only liveness since the last snapshot leaves the
/// journal for the next start (replaying it is cheaper than writing the
/// fleet), and the next start has every agent's last_seen from it.
#[tokio::test]
async fn a_clean_stop_after_heartbeats_only_leaves_the_journal_to_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let args = [
        "--snapshot-interval",
        "3600",
        "--snapshot-when-quiet",
        "0.2",
        "--flush-interval",
        "0.1",
    ];
    let mut router = RouterProcess::spawn(dir.path(), &args).await;
    let url = router.url("");
    let id = register(&client, &url, &registration("beating")).await;
    let snapshot = dir.path().join("agents.json");
    eventually(
        Duration::from_secs(10),
        "the registration in agents.json",
        || {
            let snapshot = snapshot.clone();
            async move { file_state(&snapshot) }
        },
    )
    .await;
    let written = file_state(&snapshot);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let last_seen = heartbeat_and_read_last_seen(&client, &url, &id).await;

    stop_cleanly(&mut router).await;
    assert_eq!(file_state(&snapshot), written, "no snapshot at the stop");
    let journal = std::fs::read_to_string(dir.path().join("agents.journal")).expect("journal");
    assert!(
        journal.contains(&*id),
        "the heartbeat's last_seen is in the journal: {journal}"
    );

    let restarted = RouterProcess::spawn(dir.path(), &args).await;
    let agents = list(&client, &restarted.url("")).await;
    assert_eq!(agents.len(), 1);
    // The journal keeps liveness to the millisecond.
    let millisecond = |time: &Value| time.as_str().expect("a time")[..23].to_owned();
    assert_eq!(
        millisecond(&agents[0]["last_seen"]),
        millisecond(&last_seen),
        "replayed from the journal"
    );
}

async fn assert_torn_journal_tail_is_skipped(torn_tail: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let mut router = RouterProcess::spawn(dir.path(), &["--flush-interval", "3600"]).await;
    let id = register(&client, &router.url(""), &registration("journaled")).await;
    kill(router.pid(), Signal::SIGKILL).expect("kill -9");
    let _ = router.child.wait().await;
    // A crash in the middle of an unacknowledged append leaves half a line.
    let journal = dir.path().join("agents.journal");
    let mut bytes = std::fs::read(&journal).expect("journal");
    assert!(
        !bytes.is_empty(),
        "the registration was journaled before its 2xx"
    );
    bytes.extend_from_slice(torn_tail);
    std::fs::write(&journal, bytes).expect("tear");

    let router = TestRouter::start(config(dir.path())).await;
    let agents = list(&client, &router.base()).await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["id"], id.as_str());
}

#[tokio::test]
async fn torn_journal_tail_is_skipped_and_acknowledged_records_kept() {
    assert_torn_journal_tail_is_skipped(b"{\"op\":\"upsert\",\"agent\":{\"id\":\"trunc").await;
}

/// Torn inside a character of a name: the journal is then not UTF-8 as a
/// whole, and the lines before the tear are still replayed.
#[tokio::test]
async fn journal_torn_inside_a_character_keeps_the_lines_before_it() {
    let tail = "{\"op\":\"upsert\",\"agent\":{\"machine_name\":\"caf\u{e9}";
    let torn = &tail.as_bytes()[..tail.len() - 1];
    assert!(std::str::from_utf8(torn).is_err(), "cut inside the \u{e9}");
    assert_torn_journal_tail_is_skipped(torn).await;
}

#[tokio::test]
async fn unusable_data_dir_is_a_start_up_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_a_dir = dir.path().join("plain-file");
    std::fs::write(&not_a_dir, b"x").expect("file");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(["--host", "127.0.0.1", "--port", "0", "--data-dir"])
        .arg(&not_a_dir)
        .output()
        .await
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("data dir"), "a clear message: {stderr}");

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let result = coordinator::run(listener, config(&not_a_dir), std::future::pending()).await;
    assert!(
        result.is_err(),
        "run refuses rather than serving an empty registry"
    );
}

#[tokio::test]
async fn silent_agent_goes_offline_is_kept_and_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.agent_timeout = Duration::from_millis(400);
    let router = TestRouter::start(cfg).await;
    let client = client();
    let url = router.base();
    let id = register(&client, &url, &registration("sleeper")).await;
    eventually(Duration::from_secs(10), "the agent goes Offline", || {
        let (client, url) = (client.clone(), url.clone());
        async move { (list(&client, &url).await[0]["status"] == "Offline").then_some(()) }
    })
    .await;
    assert_eq!(
        list(&client, &url).await.len(),
        1,
        "Offline agents are kept"
    );

    let response = client
        .post(format!("{url}/api/agents/{id}/heartbeat"))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(response.status(), 200);
    assert_eq!(
        list(&client, &url).await[0]["status"],
        "Online",
        "a heartbeat brings it back at once"
    );
}

/// The registry as a library: liveness decided on the monotonic clock, and
/// the seed's round-robin over Online agents only, through the balancer
/// that routing uses.
#[tokio::test]
async fn round_robin_selection_skips_offline_agents() {
    let balancer = Balancer::new(Policy::RoundRobin);
    let select_available_agent = |registry: &Registry| {
        balancer
            .plan(
                &registry.routing_table(),
                ApiKind::OpenAi,
                "smollm2:135m",
                None,
                1,
            )
            .ok()
            .and_then(|plan| plan.into_iter().next())
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let timeout = Duration::from_secs(60);
    let (registry, writer) = registry_in(
        dir.path(),
        Duration::from_secs(5),
        Duration::from_secs(2),
        timeout,
        1_000_000,
    );
    assert!(
        select_available_agent(&registry).is_none(),
        "nobody to pick"
    );

    let mut ids = Vec::new();
    for n in 0..3 {
        let mut registration = registry_registration(&format!("rr-{n}"));
        registration.ip_address = format!("127.0.0.{}", n + 2).parse().expect("ip");
        let (id, _, _) = registry
            .register(registration, coordinator::registry::IdentityProof::Open)
            .await
            .expect("register");
        ids.push(id);
    }
    let picks: Vec<_> = (0..6)
        .map(|_| select_available_agent(&registry).expect("pick").id)
        .collect();
    for id in &ids {
        assert_eq!(
            picks.iter().filter(|p| *p == id).count(),
            2,
            "each agent in turn"
        );
    }

    // A sweep is judged at a monotonic instant: nobody is late now; past
    // the timeout everyone is, and nobody is picked until one beats again.
    assert_eq!(registry.sweep(Instant::now()), 0, "nobody is late yet");
    let later = Instant::now() + timeout + Duration::from_millis(1);
    assert_eq!(registry.sweep(later), 3);
    assert!(select_available_agent(&registry).is_none());
    registry.heartbeat(ids[1], None).expect("heartbeat");
    for _ in 0..3 {
        assert_eq!(select_available_agent(&registry).expect("pick").id, ids[1]);
    }
    drop(registry);
    writer.join();
}

/// Sweeps are skipped while nobody can be late yet (the oldest sign of
/// life plus the timeout): each agent still goes Offline at the first sweep
/// past its own deadline, whatever the sweeps before it skipped, and one
/// that comes back and falls silent again goes Offline again on time.
#[tokio::test]
async fn skipped_sweeps_still_catch_each_agent_at_its_own_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let timeout = Duration::from_secs(10);
    let (registry, writer) = registry_in(
        dir.path(),
        Duration::from_secs(60),
        Duration::ZERO,
        timeout,
        1_000,
    );
    let start = Instant::now();
    let (first, _, _) = registry
        .register(
            registry_registration("early"),
            coordinator::registry::IdentityProof::Open,
        )
        .await
        .expect("register");
    tokio::time::sleep(Duration::from_millis(30)).await;
    let before_second = Instant::now();
    let (second, _, _) = registry
        .register(
            registry_registration("late"),
            coordinator::registry::IdentityProof::Open,
        )
        .await
        .expect("register");
    let second_seen = Instant::now();
    // This sweep sets the next one due at the first agent's deadline, the
    // older of the two.
    assert_eq!(registry.sweep(second_seen), 0, "nobody is late yet");

    // Sweeps up to the first agent's deadline: skipped or empty, the same.
    for tenths in 1..100 {
        assert_eq!(
            registry.sweep(start + Duration::from_millis(tenths * 100)),
            0
        );
    }
    // Past the first's deadline (its sign of life came 30 ms or more
    // before the second's) and before the second's: the first alone goes.
    let between = before_second + timeout - Duration::from_millis(5);
    assert_eq!(registry.sweep(between), 1, "the first agent is late");
    let status = |id| registry.get(id).expect("kept").agent.status;
    assert_eq!(status(first), common::AgentStatus::Offline);
    assert_eq!(status(second), common::AgentStatus::Online);
    // The second goes at its own deadline, not a sweep later.
    assert_eq!(
        registry.sweep(second_seen + timeout + Duration::from_millis(5)),
        1
    );

    // Back, then silent again: caught at the new deadline.
    registry.heartbeat(first, None).expect("heartbeat");
    let back = Instant::now();
    assert_eq!(registry.sweep(back + timeout - Duration::from_millis(5)), 0);
    assert_eq!(registry.sweep(back + timeout + Duration::from_millis(5)), 1);
    assert_eq!(status(first), common::AgentStatus::Offline);
    drop(registry);
    writer.join();
}

fn registry_registration(name: &str) -> coordinator::registry::Registration {
    coordinator::registry::Registration::try_from(support::typed_registration(name))
        .expect("a valid registration")
}

/// The stop rule, at the store: a journal of liveness alone is left for the
/// next start while it is smaller than agents.json, and folded into a
/// snapshot once it has outgrown it (replaying it would then cost more).
#[tokio::test]
async fn a_stop_folds_a_liveness_journal_only_once_it_outgrows_the_snapshot() {
    use coordinator::registry::NodeFacts;
    use coordinator::store::{Change, RegistryStore, Seen};
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, writer, _, _) = store::open(store::StoreOptions {
        data_dir: dir.path().to_path_buf(),
        snapshot_interval: Duration::from_secs(3600),
        snapshot_when_quiet: Duration::ZERO,
    })
    .expect("store");
    let journal_len = || {
        std::fs::metadata(dir.path().join("agents.journal"))
            .expect("journal")
            .len()
    };
    let facts = NodeFacts::registered(
        uuid::Uuid::new_v4(),
        &registry_registration("node"),
        chrono::Utc::now(),
    );
    let id = facts.id;
    store
        .submit(Change::Upsert(Arc::new(facts)))
        .await
        .expect("committed");
    // A registry change no snapshot holds: the stop folds it in.
    store.snapshot_now().await.expect("stop");
    assert_eq!(journal_len(), 0, "the registration was folded in");
    let snapshot_len = std::fs::metadata(dir.path().join("agents.json"))
        .expect("agents.json")
        .len();

    let seen = |count: usize| {
        (0..count)
            .map(|_| Seen(id, chrono::Utc::now(), common::AgentStatus::Online))
            .collect::<Vec<_>>()
    };
    store.record_seen(seen(1));
    store.snapshot_now().await.expect("stop");
    let left = journal_len();
    assert!(
        left > 0 && left < snapshot_len,
        "one liveness record ({left} bytes) is left to replay beside a {snapshot_len}-byte snapshot"
    );

    store.record_seen(seen(100));
    store.snapshot_now().await.expect("stop");
    assert_eq!(
        journal_len(),
        0,
        "a journal larger than the snapshot is folded in"
    );
    drop(store);
    writer.join();
}

/// A registry on a files store in `dir`, in this process (no HTTP), with
/// no address held out; the writer to join at the end.
fn registry_in(
    dir: &std::path::Path,
    snapshot_interval: Duration,
    snapshot_when_quiet: Duration,
    agent_timeout: Duration,
    max_agents: usize,
) -> (Arc<Registry>, store::StoreWriter) {
    let (store, writer, loaded, _) = store::open(store::StoreOptions {
        data_dir: dir.to_path_buf(),
        snapshot_interval,
        snapshot_when_quiet,
    })
    .expect("store");
    let registry = Registry::new(loaded, agent_timeout, max_agents, Box::new(store), &|_| {
        None
    });
    (Arc::new(registry), writer)
}
