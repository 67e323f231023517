//! Crash safety: the real router binary is killed with SIGKILL at a random
//! moment during a storm of registrations, updates and deletes, restarted on
//! the same data dir, and every acknowledged change must be there.
//!
//! The default test runs `LLM_ROUTER_CRASH_ROUNDS` rounds (5 when unset);
//! `scripts/crash-loop.sh` runs the same test with 100 or more.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use rand::Rng;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{client, registration, RouterProcess};

/// What the store may hold for one machine name.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Absent,
    /// Present with this id (when known) and runtime version.
    Present {
        id: Option<String>,
        version: String,
    },
}

impl Expect {
    fn allows(&self, found: Option<&Value>) -> bool {
        match (self, found) {
            (Expect::Absent, None) => true,
            (Expect::Present { id, version }, Some(agent)) => {
                id.as_deref().is_none_or(|id| agent["id"] == id)
                    && agent["runtime_version"] == version.as_str()
            }
            _ => false,
        }
    }
}

/// Per machine: the state after its last acknowledged change, and the one
/// after the change that was in flight when the router died (if any).
#[derive(Debug, Clone)]
struct Ledger {
    acknowledged: Expect,
    in_flight: Option<Expect>,
}

type Ledgers = Arc<Mutex<HashMap<String, Ledger>>>;

fn record(ledgers: &Ledgers, name: &str, acknowledged: Expect, in_flight: Option<Expect>) {
    ledgers.lock().expect("ledger").insert(
        name.to_owned(),
        Ledger {
            acknowledged,
            in_flight,
        },
    );
}

/// One storm worker: for machine after machine, register, update, and
/// (every third) delete, each change acknowledged before the next, until
/// the router stops answering.
async fn storm_worker(client: reqwest::Client, base: String, prefix: String, ledgers: Ledgers) {
    for k in 0.. {
        let name = format!("{prefix}-{k}");
        let registered = Expect::Present {
            id: None,
            version: "0.5.7".into(),
        };
        record(&ledgers, &name, Expect::Absent, Some(registered));
        let Ok(response) = client
            .post(format!("{base}/api/agents/register"))
            .json(&registration(&name))
            .send()
            .await
        else {
            return;
        };
        if response.status() != StatusCode::CREATED {
            return;
        }
        let Ok(answer) = response.json::<Value>().await else {
            return;
        };
        let id = answer["id"].as_str().expect("id").to_owned();
        let present = |version: &str| Expect::Present {
            id: Some(id.clone()),
            version: version.to_owned(),
        };
        let updated = present(&format!("9.{k}"));
        record(&ledgers, &name, present("0.5.7"), Some(updated.clone()));
        let Ok(response) = client
            .put(format!("{base}/api/agents/{id}"))
            .json(&json!({"runtime_version": format!("9.{k}")}))
            .send()
            .await
        else {
            return;
        };
        if response.status() != StatusCode::OK {
            return;
        }
        record(&ledgers, &name, updated.clone(), None);
        if k % 3 == 0 {
            record(&ledgers, &name, updated, Some(Expect::Absent));
            let Ok(response) = client
                .delete(format!("{base}/api/agents/{id}"))
                .send()
                .await
            else {
                return;
            };
            if response.status() != StatusCode::NO_CONTENT {
                return;
            }
            record(&ledgers, &name, Expect::Absent, None);
        }
    }
}

/// Checks the router's list against every ledger; returns the ledgers fixed
/// to what was found, so the next round checks against the truth.
fn check_against(ledgers: &Ledgers, agents: &[Value], round: usize) {
    let by_name: HashMap<&str, &Value> = agents
        .iter()
        .map(|agent| (agent["machine_name"].as_str().expect("name"), agent))
        .collect();
    let mut ledgers = ledgers.lock().expect("ledger");
    for (name, ledger) in ledgers.iter_mut() {
        let found = by_name.get(name.as_str()).copied();
        let allowed = ledger.acknowledged.allows(found)
            || ledger
                .in_flight
                .as_ref()
                .is_some_and(|expect| expect.allows(found));
        assert!(
            allowed,
            "round {round}: {name} is {found:?}, but the ledger says {ledger:?}"
        );
        // From now on the found state is the acknowledged one.
        ledger.acknowledged = match found {
            None => Expect::Absent,
            Some(agent) => Expect::Present {
                id: agent["id"].as_str().map(str::to_owned),
                version: agent["runtime_version"]
                    .as_str()
                    .expect("version")
                    .to_owned(),
            },
        };
        ledger.in_flight = None;
    }
}

#[tokio::test]
async fn kill_9_at_random_moments_during_a_storm_loses_nothing_acknowledged() {
    let rounds: usize = std::env::var("LLM_ROUTER_CRASH_ROUNDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let ledgers: Ledgers = Arc::default();
    let mut acknowledged_total = 0usize;
    for round in 0..=rounds {
        // Snapshots every 50 ms: kill -9 lands in the middle of one often.
        let mut router = RouterProcess::spawn(
            dir.path(),
            &["--flush-interval", "0.05", "--snapshot-interval", "0.05"],
        )
        .await;
        let base = router.url("");
        let agents = support::list(&client, &base).await;
        check_against(&ledgers, &agents, round);
        assert!(
            !std::fs::read_dir(dir.path())
                .expect("read dir")
                .filter_map(Result::ok)
                .any(|entry| entry.file_name().to_string_lossy().contains("corrupt")),
            "round {round}: a crash never leaves a corrupt snapshot"
        );
        if round == rounds {
            kill(router.pid(), Signal::SIGKILL).expect("kill -9");
            let _ = router.child.wait().await;
            break;
        }
        let workers: Vec<_> = (0..8)
            .map(|worker| {
                tokio::spawn(storm_worker(
                    client.clone(),
                    base.clone(),
                    format!("r{round}-w{worker}"),
                    Arc::clone(&ledgers),
                ))
            })
            .collect();
        let moment = Duration::from_millis(rand::thread_rng().gen_range(20..400));
        tokio::time::sleep(moment).await;
        kill(router.pid(), Signal::SIGKILL).expect("kill -9");
        let _ = router.child.wait().await;
        for worker in workers {
            worker.await.expect("worker");
        }
        acknowledged_total = ledgers
            .lock()
            .expect("ledger")
            .values()
            .filter(|ledger| ledger.in_flight.is_none())
            .count();
    }
    assert!(
        acknowledged_total > rounds * 8,
        "the storms did make changes ({acknowledged_total})"
    );
}
