//! Faults the store and the router must survive: a disk that stops taking
//! writes, and a router restart under a live fleet.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use agent::AgentConfig;
use nix::sys::signal::{kill, Signal};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{client, eventually, faketime_library, list, registration, RouterProcess};
use testkit::{StandIn, StandInOptions};
use tokio_util::sync::CancellationToken;

/// Sets the router's file-size limit (RLIMIT_FSIZE) from outside, as an
/// operator freeing space would: `prlimit --pid`.
fn set_file_size_limit(router: &RouterProcess, limit: &str) {
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(router.pid().to_string())
        .arg(format!("--fsize={limit}"))
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --pid failed");
}

/// The disk is made "full" for real: the kernel refuses writes past the
/// process's file-size limit (EFBIG), as it refuses them on a full disk
/// (ENOSPC). Changes then fail with a 503 and are not applied, the journal
/// holds no half-written record, reads and heartbeats go on, and once the
/// limit is lifted writes succeed again with no restart.
#[tokio::test]
async fn a_full_disk_fails_changes_cleanly_and_the_router_recovers_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal_limit: u64 = 48 * 1024;
    let mut router = RouterProcess::spawn_wrapped(
        &[
            "prlimit",
            &format!("--fsize={journal_limit}:unlimited"),
            "--",
        ],
        dir.path(),
        "127.0.0.1",
        &["--flush-interval", "3600", "--snapshot-interval", "3600"],
    )
    .await;
    let (client, base) = (client(), router.url(""));

    // Register until the disk is full.
    let mut acknowledged = Vec::new();
    let refused = loop {
        assert!(acknowledged.len() < 1000, "the limit never bit");
        let name = format!("gpu-{}", acknowledged.len());
        let response = client
            .post(format!("{base}/api/agents/register"))
            .json(&registration(&name))
            .send()
            .await
            .expect("the router answers");
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            let body: Value = response.json().await.expect("json");
            break (name, body);
        }
        assert_eq!(response.status(), StatusCode::CREATED);
        let answer: Value = response.json().await.expect("json");
        acknowledged.push((name, answer["id"].as_str().expect("id").to_owned()));
    };
    let (refused_name, body) = refused;
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(!acknowledged.is_empty());

    // The refused change was not applied; reads and heartbeats go on.
    let listed = list(&client, &base).await;
    assert_eq!(listed.len(), acknowledged.len());
    assert!(listed
        .iter()
        .all(|agent| agent["machine_name"] != refused_name.as_str()));
    let first_id = acknowledged[0].1.clone();
    let status = client
        .post(format!("{base}/api/agents/{first_id}/heartbeat"))
        .send()
        .await
        .expect("heartbeat")
        .status();
    assert_eq!(status, StatusCode::OK);
    // An update fails the same way, and changes nothing.
    let status = client
        .put(format!("{base}/api/agents/{first_id}"))
        .json(&json!({"runtime_version": "9.9.9"}))
        .send()
        .await
        .expect("update")
        .status();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let first = list(&client, &base)
        .await
        .into_iter()
        .find(|agent| agent["id"] == first_id.as_str())
        .expect("still there");
    assert_eq!(first["runtime_version"], "0.5.7");

    // Nothing half-written: every journal line is a whole record.
    let journal = std::fs::read_to_string(dir.path().join("agents.journal")).expect("journal");
    assert!(journal.len() as u64 <= journal_limit);
    assert!(journal.ends_with('\n'));
    for line in journal.lines() {
        serde_json::from_str::<Value>(line).expect("a whole JSON record");
    }

    // Space returns: the same router takes changes again, unrestarted.
    set_file_size_limit(&router, "unlimited:unlimited");
    let response = client
        .post(format!("{base}/api/agents/register"))
        .json(&registration(&refused_name))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::CREATED);
    let answer: Value = response.json().await.expect("json");
    acknowledged.push((refused_name, answer["id"].as_str().expect("id").to_owned()));

    // And after a crash, every acknowledged registration is there.
    kill(router.pid(), Signal::SIGKILL).expect("kill -9");
    let _ = router.child.wait().await;
    let restarted = RouterProcess::spawn(dir.path(), &[]).await;
    let listed = list(&client, &restarted.url("")).await;
    let mut found: Vec<(String, String)> = listed
        .iter()
        .map(|agent| {
            (
                agent["machine_name"].as_str().expect("name").to_owned(),
                agent["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    found.sort();
    acknowledged.sort();
    assert_eq!(found, acknowledged);
    let first = listed
        .iter()
        .find(|agent| agent["id"] == first_id.as_str())
        .expect("there");
    assert_eq!(
        first["runtime_version"], "0.5.7",
        "the refused update is not there"
    );
}

/// The restart herd: the router is killed under 1,000 live agents (real
/// agent loops, in this process, all against one stand-in LLM server) and
/// restarted on the same port. Every agent's heartbeats land again, each
/// under the id it had, with no duplicates. The time until the last one is
/// back is printed (`-- --nocapture`) and recorded in BENCHMARKS.md; the
/// test itself asserts only the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_restart_under_1000_live_agents_brings_all_back_with_their_ids() {
    const AGENTS: usize = 1000;
    let heartbeat_interval = Duration::from_secs(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let port = router.address.port();
    let standin = StandIn::spawn(StandInOptions::ollama("herd", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let stop = CancellationToken::new();
    let agents: Vec<_> = (0..AGENTS)
        .map(|n| {
            let config = AgentConfig {
                router_url: vec![router.url("")],
                backend_url: Some(standin.url()),
                heartbeat_interval,
                machine_name: Some(format!("herd-{n:04}")),
                advertise_ip: None,
                drain_timeout: Duration::from_millis(100),
                max_concurrency: None,
                log_format: agent::config::LogFormat::Text,
                token: None,
                token_file: None,
                state_dir: Some(dir.path().join("agents")),
                ca_cert: None,
            };
            tokio::spawn(agent::run(config, stop.clone()))
        })
        .collect();
    let (client, base) = (client(), router.url(""));
    let before: HashMap<String, String> = eventually(
        Duration::from_secs(120),
        "all agents register and report",
        || {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let listed = list(&client, &base).await;
                let reported = listed
                    .iter()
                    .filter(|a| a["report"]["llm_server_up"] == true)
                    .count();
                (reported == AGENTS).then(|| names_to_ids(&listed))
            }
        },
    )
    .await;

    kill(router.pid(), Signal::SIGKILL).expect("kill -9");
    let _ = router.child.wait().await;
    // Down long enough for every agent to miss a heartbeat and back off.
    tokio::time::sleep(heartbeat_interval).await;
    let router = RouterProcess::spawn_at_port(dir.path(), port, &[]).await;
    let restarted_at = chrono::Utc::now();
    let started = Instant::now();
    let after = eventually(
        Duration::from_secs(120),
        "every agent heartbeats the restarted router",
        || {
            let (client, base) = (client.clone(), router.url(""));
            async move {
                let listed = list(&client, &base).await;
                let back = listed
                    .iter()
                    .filter(|agent| {
                        agent["status"] == "Online"
                            && agent["last_seen"]
                                .as_str()
                                .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
                                .is_some_and(|seen| seen > restarted_at)
                    })
                    .count();
                (back == AGENTS).then_some(listed)
            }
        },
    )
    .await;
    let elapsed = started.elapsed();
    println!(
        "restart herd: all {AGENTS} agents heartbeating again {} ms after the restart \
         (heartbeat interval {} ms)",
        elapsed.as_millis(),
        heartbeat_interval.as_millis()
    );
    assert_eq!(after.len(), AGENTS, "no agent is listed twice");
    let ids: HashSet<&str> = after
        .iter()
        .map(|a| a["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), AGENTS, "zero duplicate ids");
    assert_eq!(names_to_ids(&after), before, "every agent kept its id");
    stop.cancel();
    for agent in agents {
        agent.abort();
    }
}

fn names_to_ids(listed: &[Value]) -> HashMap<String, String> {
    listed
        .iter()
        .map(|agent| {
            (
                agent["machine_name"].as_str().expect("name").to_owned(),
                agent["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect()
}

/// Clock jumps: the real router runs under libfaketime, which moves its
/// wall clock (CLOCK_REALTIME) a year forward, a year back, and so on,
/// while the monotonic clock runs on as the kernel's does when an operator
/// or NTP steps the time. An agent heartbeating all along never shows
/// Offline; once it falls silent it goes Offline after the timeout, jump or
/// no jump.
#[tokio::test]
async fn wall_clock_jumps_do_not_make_liveness_flap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = tempfile::NamedTempFile::new().expect("clock file");
    std::fs::write(clock.path(), "+0\n").expect("write clock");
    let preload = format!("LD_PRELOAD={}", faketime_library());
    let clock_file = format!("FAKETIME_TIMESTAMP_FILE={}", clock.path().display());
    let router = RouterProcess::spawn_wrapped(
        &[
            "env",
            &preload,
            &clock_file,
            "FAKETIME_NO_CACHE=1",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
        ],
        dir.path(),
        "127.0.0.1",
        &["--agent-timeout", "1.5", "--flush-interval", "0.1"],
    )
    .await;
    let (client, base) = (client(), router.url(""));
    let id = support::register(&client, &base, &registration("gpu-clock")).await;
    let beating = CancellationToken::new();
    let heartbeats = {
        let (client, url, beating) = (
            client.clone(),
            format!("{base}/api/agents/{id}/heartbeat"),
            beating.clone(),
        );
        tokio::spawn(async move {
            while !beating.is_cancelled() {
                let status = client.post(&url).send().await.expect("heartbeat").status();
                assert_eq!(status, StatusCode::OK);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let agent = |client: reqwest::Client, base: String| async move {
        list(&client, &base)
            .await
            .into_iter()
            .next()
            .expect("the agent")
    };

    let this_year = chrono::Utc::now()
        .format("%Y")
        .to_string()
        .parse::<i32>()
        .expect("year");
    for (offset, year) in [
        ("+365d", this_year + 1),
        ("-365d", this_year - 1),
        ("+3650d", this_year + 10),
        ("+0", this_year),
        ("-1d", this_year),
    ] {
        std::fs::write(clock.path(), format!("{offset}\n")).expect("move the clock");
        // Twice the timeout, watching all the while.
        let watch_until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < watch_until {
            let seen = agent(client.clone(), base.clone()).await;
            assert_eq!(
                seen["status"], "Online",
                "after a jump of {offset}, a heartbeating agent flapped: {seen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The jump did reach the router: its wall clock says so.
        let seen = agent(client.clone(), base.clone()).await;
        let last_seen = seen["last_seen"].as_str().expect("last_seen");
        if year != this_year {
            assert!(
                last_seen.starts_with(&year.to_string()),
                "the router's clock moved by {offset}: last_seen {last_seen}"
            );
        }
    }

    // Silence, then a jump back in time: Offline all the same, on time.
    beating.cancel();
    heartbeats.await.expect("heartbeats");
    std::fs::write(clock.path(), "-3650d\n").expect("move the clock");
    eventually(Duration::from_secs(20), "Offline after the timeout", || {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let seen = list(&client, &base).await.into_iter().next()?;
            (seen["status"] == "Offline").then_some(())
        }
    })
    .await;
}
