//! The dashboard in a real browser: headless Chromium, driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`, which the test
//! command installs), at a phone's size. Agents the test registers appear;
//! when one falls silent its status turns Offline with no reload.

mod support;

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use support::{client, config, eventually, register, registration, TestRouter};
use tokio_util::sync::CancellationToken;

/// chromedriver on a free loopback port, killed when dropped.
struct ChromeDriver {
    _child: tokio::process::Child,
    url: String,
}

impl ChromeDriver {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("address")
            .port();
        let child = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver is installed (apt-get install chromium chromium-driver; scripts/test.sh does)");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        eventually(Duration::from_secs(20), "chromedriver answers", || {
            let status = status.clone();
            async move {
                reqwest::get(&status)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        })
        .await;
        ChromeDriver { _child: child, url }
    }

    async fn browser(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking",
                    "--disable-extensions",
                    "--no-first-run",
                    // A phone's screen.
                    "--window-size=390,844",
                ]
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

async fn script(browser: &Client, source: &str) -> Value {
    browser.execute(source, vec![]).await.expect("script runs")
}

/// The `data-status` of an agent's row, if the row is there.
async fn row_status(browser: &Client, id: &str) -> Option<String> {
    let source = format!(
        "const row = document.querySelector('tr[data-agent-id=\"{id}\"]'); \
         return row ? row.dataset.status + '|' + row.cells[2].textContent : null;"
    );
    script(browser, &source).await.as_str().map(str::to_owned)
}

#[tokio::test]
async fn dashboard_shows_agents_and_a_status_change_without_reloading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.agent_timeout = Duration::from_secs(1);
    let router = TestRouter::start(router_config).await;
    let http = client();
    let base = router.url("");
    let steady = register(&http, &base, &registration("gpu-steady")).await;
    // Names are host names now; a model name can still carry markup.
    let mut fading_registration = registration("gpu-fading");
    fading_registration["models"] = json!(["smollm2:135m", "<b>bold</b>"]);
    let fading = register(&http, &base, &fading_registration).await;
    // Both heartbeat (with a report) until the test says stop.
    let fading_beats = CancellationToken::new();
    let steady_beats = CancellationToken::new();
    for (id, stop) in [(&steady, &steady_beats), (&fading, &fading_beats)] {
        let (http, url, stop) = (
            http.clone(),
            format!("{base}/api/agents/{id}/heartbeat"),
            stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let report = json!({"cpu_usage_percent": 42.0, "memory_used": 3_221_225_472u64,
                    "loaded_models": ["smollm2:135m"]});
                let _ = http.post(&url).json(&report).send().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    let driver = ChromeDriver::start().await;
    let browser = driver.browser().await;
    browser
        .goto(&router.url("/dashboard"))
        .await
        .expect("open the dashboard");
    assert_eq!(browser.title().await.expect("title"), "llm-router");
    // Anything set now survives only if the page is never reloaded.
    script(&browser, "window.__sameDocument = 'yes'; return null;").await;

    for id in [&steady, &fading] {
        eventually(Duration::from_secs(20), "both agents listed Online", || {
            let browser = browser.clone();
            async move {
                row_status(&browser, id)
                    .await
                    .filter(|status| status == "Online|Online")
            }
        })
        .await;
    }
    // Every column is filled from the agent and its report.
    let row = browser
        .find(Locator::Css(&format!("tr[data-agent-id=\"{fading}\"]")))
        .await
        .expect("the row");
    let text = row.text().await.expect("row text");
    for expected in ["127.0.0.2:11434", "smollm2:135m", "42 %", "3.0 GiB"] {
        assert!(text.contains(expected), "{expected:?} in {text:?}");
    }
    // What agents send is shown as text, never run as HTML.
    assert!(text.contains("<b>bold</b>"), "{text:?}");
    let markup = script(
        &browser,
        &format!("return document.querySelector('tr[data-agent-id=\"{fading}\"] b') === null;"),
    )
    .await;
    assert_eq!(markup, true, "no <b> element was made");
    // Laid out for a phone: no table header, each agent a card.
    let header_shown = script(
        &browser,
        "return getComputedStyle(document.querySelector('thead')).display !== 'none';",
    )
    .await;
    assert_eq!(header_shown, false, "on a 390 px screen rows are cards");

    // One agent falls silent: its row turns Offline in place.
    fading_beats.cancel();
    eventually(
        Duration::from_secs(20),
        "the silent agent shown Offline",
        || {
            let browser = browser.clone();
            let fading = fading.clone();
            async move {
                row_status(&browser, &fading)
                    .await
                    .filter(|status| status == "Offline|Offline")
            }
        },
    )
    .await;
    assert_eq!(
        row_status(&browser, &steady).await.as_deref(),
        Some("Online|Online")
    );
    assert_eq!(
        script(&browser, "return window.__sameDocument || null;").await,
        "yes",
        "the page was not reloaded"
    );
    assert_eq!(
        script(
            &browser,
            "return document.getElementById('offline').textContent;"
        )
        .await,
        "1"
    );
    assert_eq!(
        script(
            &browser,
            "return document.getElementById('queued').textContent;"
        )
        .await,
        "0",
        "the queue's length is shown"
    );
    assert_eq!(
        script(
            &browser,
            "return document.getElementById('queue-wait').textContent;"
        )
        .await,
        "–",
        "no request has waited, so no mean wait"
    );
    // The routers sharing the registry: with the data files, this one.
    let routers = script(
        &browser,
        "return [...document.querySelectorAll('#routers tbody tr')].map((r) => r.textContent).join('|') \
         + '#' + document.getElementById('store').textContent;",
    )
    .await;
    let routers = routers.as_str().unwrap_or_default();
    assert!(
        routers.contains(&router.url("")) && routers.contains("alive (this one)"),
        "{routers}"
    );
    assert!(
        routers.ends_with("#data files: this router alone"),
        "{routers}"
    );
    let heartbeat_rate = script(
        &browser,
        "return Number(document.getElementById('heartbeat-rate').textContent);",
    )
    .await;
    assert!(
        heartbeat_rate.as_f64().is_some_and(|rate| rate > 0.0),
        "the heartbeat rate is shown: {heartbeat_rate}"
    );
    if let Ok(path) = std::env::var("DASHBOARD_SCREENSHOT") {
        std::fs::write(path, browser.screenshot().await.expect("screenshot")).expect("write");
    }
    steady_beats.cancel();
    browser.close().await.expect("close the browser");
    drop(driver);
}

/// One definition of a node's state, shown alike by the API, the CLI, the
/// metrics and the dashboard: here for a draining node, a node whose
/// server is down, and a serving one.
#[tokio::test]
async fn api_cli_metrics_and_dashboard_agree_on_each_nodes_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let http = client();
    let base = router.url("");
    let draining = register(&http, &base, &registration("gpu-draining")).await;
    let down = register(&http, &base, &registration("gpu-down")).await;
    let serving = register(&http, &base, &registration("gpu-serving")).await;
    let drained = http
        .post(format!("{base}/api/agents/{draining}/drain"))
        .send()
        .await
        .expect("drain");
    assert_eq!(drained.status(), 200);
    let beat = http
        .post(format!("{base}/api/agents/{down}/heartbeat"))
        .json(&json!({"llm_server_up": false}))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(beat.status(), 200);
    let expected = [
        (&draining, "draining"),
        (&down, "server_down"),
        (&serving, "serving"),
    ];

    // The API.
    let listed: Vec<Value> = http
        .get(format!("{base}/api/agents"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    for (id, state) in expected {
        let agent = listed
            .iter()
            .find(|a| a["id"] == id.as_str())
            .expect("listed");
        assert_eq!(agent["status"], "Online", "{agent}");
        assert_eq!(agent["state"], state, "{agent}");
        assert_eq!(agent["routable"], state == "serving", "{agent}");
        let shown: Value = http
            .get(format!("{base}/api/agents/{id}"))
            .send()
            .await
            .expect("show")
            .json()
            .await
            .expect("json");
        assert_eq!(shown["state"], state, "show agrees with list");
    }

    // The CLI, the real binary (run without blocking: the router it asks
    // is on this test's runtime).
    let cli = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"));
        command.args(args).args(["--router-url", &base]);
        command
    };
    let table = cli(&["agents", "list"])
        .output()
        .await
        .expect("agents list");
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.lines().next().expect("header").contains("STATE"),
        "{table}"
    );
    for (id, state) in expected {
        let row = table
            .lines()
            .find(|line| line.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("a row for {id} in {table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[3], "Online", "{row}");
        assert_eq!(cells[4], state, "{row}");
    }
    let status = cli(&["status", "--json"]).output().await.expect("status");
    assert!(status.status.success());
    let status: Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(status["agents"]["online"], 3, "{status}");
    assert_eq!(status["agents"]["routable"], 1, "{status}");
    for (_, state) in expected {
        assert_eq!(status["agents"]["by_state"][state], 1, "{status}");
    }
    let text = cli(&["status"]).output().await.expect("status");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("1 serving, 1 draining, 1 server_down"),
        "{text}"
    );

    // The metrics.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for (_, state) in expected {
        assert!(
            metrics.contains(&format!(
                "llm_router_agents_by_state{{state=\"{state}\"}} 1"
            )),
            "{state} in {metrics}"
        );
    }
    assert!(
        metrics.contains("llm_router_agents_routable 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llm_router_agents{status=\"Online\"} 3"),
        "{metrics}"
    );

    // The dashboard, in a real browser.
    let driver = ChromeDriver::start().await;
    let browser = driver.browser().await;
    browser
        .goto(&router.url("/dashboard"))
        .await
        .expect("open the dashboard");
    for (id, state) in expected {
        eventually(Duration::from_secs(20), "the row's state", || {
            let browser = browser.clone();
            let source = format!(
                "const row = document.querySelector('tr[data-agent-id=\"{id}\"]'); \
                 return row ? row.dataset.status + '|' + row.dataset.state + '|' + row.cells[3].textContent : null;"
            );
            let wanted = format!("Online|{state}|{state}");
            async move {
                script(&browser, &source)
                    .await
                    .as_str()
                    .filter(|shown| *shown == wanted)
                    .map(str::to_owned)
            }
        })
        .await;
    }
    assert_eq!(
        script(
            &browser,
            "return document.getElementById('serving').textContent;"
        )
        .await,
        "1"
    );
    browser.close().await.expect("close the browser");
    drop(driver);
}

/// A fleet larger than a page: the table shows one page at a time (the
/// router's `?limit=` and cursor), Next and Previous move through it, and
/// the cards count the whole fleet, not the page.
#[tokio::test]
async fn dashboard_pages_through_a_fleet_larger_than_a_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let http = client();
    let base = router.url("");
    let mut ids = Vec::new();
    for n in 0..230 {
        ids.push(register(&http, &base, &registration(&format!("gpu-{n:03}"))).await);
    }

    let driver = ChromeDriver::start().await;
    let browser = driver.browser().await;
    browser
        .goto(&router.url("/dashboard"))
        .await
        .expect("open the dashboard");
    let shown = |browser: &Client| {
        let browser = browser.clone();
        async move {
            script(
                &browser,
                "return [...document.querySelectorAll('#agents tbody tr')].map((r) => r.dataset.agentId).join(',') \
                 + '|' + document.getElementById('page').textContent \
                 + '|' + document.getElementById('online').textContent \
                 + '|' + document.getElementById('previous-page').hidden \
                 + '|' + document.getElementById('next-page').hidden;",
            )
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
        }
    };
    // Oldest registration first: each page is the next 100 of them.
    let expect_page = |first: usize, last: usize, previous_hidden: bool, next_hidden: bool| {
        format!(
            "{}|agents {}–{}|230|{previous_hidden}|{next_hidden}",
            ids[first - 1..last].join(","),
            first,
            last
        )
    };
    for (button, first, last, previous_hidden, next_hidden) in [
        (None, 1, 100, true, false),
        (Some("next-page"), 101, 200, false, false),
        (Some("next-page"), 201, 230, false, true),
        (Some("previous-page"), 101, 200, false, false),
        (Some("previous-page"), 1, 100, true, false),
    ] {
        if let Some(button) = button {
            browser
                .find(Locator::Id(button))
                .await
                .expect("the button")
                .click()
                .await
                .expect("click");
        }
        let wanted = expect_page(first, last, previous_hidden, next_hidden);
        eventually(Duration::from_secs(20), "the page of agents", || {
            let browser = browser.clone();
            let wanted = wanted.clone();
            async move { (shown(&browser).await == wanted).then_some(()) }
        })
        .await;
    }
    browser.close().await.expect("close the browser");
    drop(driver);
}
