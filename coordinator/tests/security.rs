//! The security review's findings, against the real binary: nodes only at
//! addresses they may be at, no request loops, node connections that do not
//! pile up, and answers passed on as the node sent them.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{client, eventually, register, registration, RouterProcess};
use testkit::{StandIn, StandInOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn try_register(client: &reqwest::Client, base: &str, body: &Value) -> (StatusCode, Value) {
    let response = client
        .post(format!("{base}/api/agents/register"))
        .json(body)
        .send()
        .await
        .expect("register");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn at(name: &str, ip: &str, port: u16) -> Value {
    let mut body = registration(name);
    body["ip_address"] = json!(ip);
    body["port"] = json!(port);
    body
}

/// Every class the review found accepted, in plain and IPv4-mapped IPv6
/// form, is refused with a 422 that names the problem, and nothing is
/// registered. (These are refused before anything could contact them.)
#[tokio::test]
async fn addresses_no_node_may_have_are_refused_in_every_spelling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let (client, base) = (client(), router.url(""));
    let refused = [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("224.0.0.1", "multicast"),
        ("::ffff:224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        // IPv4 link-local (where the cloud metadata service is) and
        // its mapped form are the deciding function's unit tests: no
        // running router is shown an address off this machine.
        ("fe80::1", "link-local"),
        ("64:ff9b::7f00:1", "NAT64"),
        ("::127.0.0.1", "IPv4-compatible"),
    ];
    for (ip, class) in refused {
        let (status, answer) = try_register(&client, &base, &at("sneaky", ip, 11434)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{ip}: {answer}");
        let message = answer["error"]["message"].as_str().expect("message");
        assert!(
            message.starts_with("ip_address: ") && message.contains(class),
            "{ip}: {message}"
        );
    }
    // An IPv4-mapped loopback address is allowed, and stored as plain IPv4.
    let (status, answer) =
        try_register(&client, &base, &at("mapped", "::ffff:127.0.0.2", 11434)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let agents = support::list(&client, &base).await;
    assert_eq!(agents.len(), 1, "only the allowed one: {agents:?}");
    assert_eq!(agents[0]["ip_address"], "127.0.0.2");

    // PUT is held to the same rules.
    let id = answer["id"].as_str().expect("id");
    let response = client
        .put(format!("{base}/api/agents/{id}"))
        .json(&json!({"ip_address": "::ffff:224.0.0.1"}))
        .send()
        .await
        .expect("put");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        support::list(&client, &base).await[0]["ip_address"],
        "127.0.0.2"
    );
    router.terminate().await;
}

/// A node at the router's own address would make each request call the
/// router again: refused, on a router bound to one address and on one bound
/// to every interface (where any loopback address on its port is itself).
#[tokio::test]
async fn a_node_at_the_routers_own_address_is_refused() {
    for host in ["127.0.0.1", "0.0.0.0"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut router = RouterProcess::spawn_on_host(dir.path(), host, &[]).await;
        let port = router.address.port();
        let base = format!("http://127.0.0.1:{port}");
        let client = client();
        let mut own = vec!["127.0.0.1", "::ffff:127.0.0.1"];
        if host == "0.0.0.0" {
            own.push("127.0.0.9");
        }
        for ip in own {
            let (status, answer) = try_register(&client, &base, &at("myself", ip, port)).await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{host} {ip}: {answer}"
            );
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .is_some_and(|message| message.contains("this router's own address")),
                "{answer}"
            );
        }
        // Another port on the same address is another server.
        let (status, _) =
            try_register(&client, &base, &at("neighbour", "127.0.0.1", port ^ 1)).await;
        assert_eq!(status, StatusCode::CREATED);
        router.terminate().await;
    }
}

/// `--node-networks` narrows where nodes may be; a node loaded from disk
/// outside them is kept out of rotation, and the log says why.
#[tokio::test]
async fn node_networks_keep_nodes_where_the_operator_allows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let (client, base) = (client(), router.url(""));
    let outside = register(&client, &base, &at("outside", "127.0.0.3", 11434)).await;
    router.terminate().await;

    let mut router =
        RouterProcess::spawn(dir.path(), &["--node-networks", "127.0.0.2/32,::1/128"]).await;
    let base = router.url("");
    let (status, _) = try_register(&client, &base, &at("inside", "127.0.0.2", 11434)).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, answer) = try_register(&client, &base, &at("elsewhere", "127.0.0.4", 11434)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("--node-networks 127.0.0.2/32,::1/128")),
        "{answer}"
    );
    let loaded = client
        .get(format!("{base}/api/agents/{outside}"))
        .send()
        .await
        .expect("get")
        .json::<Value>()
        .await
        .expect("json");
    assert_eq!(loaded["routable"], false, "{loaded}");
    assert_eq!(loaded["state"], "unreachable");
    let log = router.terminate().await;
    assert!(
        log.contains("Kept out of rotation") && log.contains("outside the networks"),
        "{log}"
    );

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(["--node-networks", "127.0.0.0/33"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("CIDR"));
}

async fn requests_counted(client: &reqwest::Client, base: &str) -> f64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|line| line.starts_with("llm_router_requests_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two routers, each with a "node" that is the other router: one chat makes
/// at most one round trip before the router that sent it sees its own name
/// in `Via` and answers 508, instead of thousands of nested requests.
#[tokio::test]
async fn two_routers_pointed_at_each_other_stop_at_the_first_return() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let mut router_a = RouterProcess::spawn(dir_a.path(), &[]).await;
    let mut router_b = RouterProcess::spawn(dir_b.path(), &[]).await;
    let client = client();
    let (a, b) = (router_a.url(""), router_b.url(""));
    register(
        &client,
        &a,
        &at("router-b", "127.0.0.1", router_b.address.port()),
    )
    .await;
    register(
        &client,
        &b,
        &at("router-a", "127.0.0.1", router_a.address.port()),
    )
    .await;

    let response = client
        .post(format!("{a}/api/chat"))
        .json(&json!({"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "stream": false}))
        .send()
        .await
        .expect("chat");
    assert!(response.status().is_server_error(), "{}", response.status());
    let answer: Value = response.json().await.expect("json");
    assert!(
        answer["error"].is_string(),
        "Ollama's error shape: {answer}"
    );

    // A handled the client's request and the one that came back; B handled
    // the one A sent. Nothing more.
    let (at_a, at_b) = (
        requests_counted(&client, &a).await,
        requests_counted(&client, &b).await,
    );
    assert_eq!(at_a, 2.0, "router A");
    assert_eq!(at_b, 1.0, "router B");

    // The answer A gave itself: 508, in the route's own shape.
    let looped = client
        .post(format!("{a}/v1/chat/completions"))
        .header("via", "1.1 some-proxy")
        .json(&json!({"model": "smollm2:135m", "messages": []}))
        .send()
        .await
        .expect("chat");
    assert_ne!(
        looped.status(),
        StatusCode::LOOP_DETECTED,
        "another proxy's Via is no loop"
    );
    for router in [&mut router_a, &mut router_b] {
        let log = router.terminate().await;
        assert!(!log.contains("Too many open files"), "{log}");
    }
}

/// Pooled connections to a node are closed when the node is removed, and
/// when they have been idle past `--node-keepalive`: the node sees them go.
#[tokio::test]
async fn idle_node_connections_close_when_the_node_goes_and_after_the_keepalive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router =
        RouterProcess::spawn(dir.path(), &["--node-keepalive", "2", "--threads", "2"]).await;
    let standin = StandIn::spawn(StandInOptions::ollama("pooled", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let (client, base) = (client(), router.url(""));
    let mut body = at("pooled", "127.0.0.1", standin.address.port());
    body["ip_address"] = json!("127.0.0.1");
    let chat = || async {
        let response = client
            .post(format!("{base}/api/chat"))
            .json(&json!({"model": "smollm2:135m", "messages": [], "stream": false}))
            .send()
            .await
            .expect("chat");
        assert_eq!(response.status(), StatusCode::OK);
        response.bytes().await.expect("body");
    };
    let open = || {
        standin
            .stats
            .connections_open
            .load(std::sync::atomic::Ordering::SeqCst)
    };

    let id = register(&client, &base, &body).await;
    for _ in 0..4 {
        chat().await;
    }
    assert!(
        open() >= 1,
        "the router keeps a connection for the next request"
    );
    let removed = client
        .delete(format!("{base}/api/agents/{id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    eventually(
        Duration::from_secs(5),
        "the removed node's connections close",
        || async { (open() == 0).then_some(()) },
    )
    .await;

    register(&client, &base, &body).await;
    chat().await;
    assert!(open() >= 1);
    eventually(
        Duration::from_secs(8),
        "idle connections close after the keepalive",
        || async { (open() == 0).then_some(()) },
    )
    .await;
    router.terminate().await;
}

/// A node written by hand: answers every request with one JSON body and
/// `Connection: close`, and hands back the request heads it got.
async fn closing_node() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (heads, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                // Read the head and the body (Content-Length) whole.
                loop {
                    let Ok(read) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..read]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|line| {
                                line.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            let _ = heads.send(text[..end].to_owned());
                            break;
                        }
                    }
                }
                let body = r#"{"model":"smollm2:135m","message":{"role":"assistant","content":"closing"},"done":true}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (port, received)
}

/// A node answering 200 with `Connection: close` is answered once, not
/// taken for a failure and asked again elsewhere; and hop-by-hop headers
/// (`Keep-Alive`, `Proxy-Connection`, those `Connection` names) stay on the
/// client's connection, while the router adds its `Via`.
#[tokio::test]
async fn connection_close_answers_count_and_hop_by_hop_headers_stay_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let (client, base) = (client(), router.url(""));
    let (first_port, mut first_heads) = closing_node().await;
    let (second_port, mut second_heads) = closing_node().await;
    register(&client, &base, &at("closer-1", "127.0.0.1", first_port)).await;
    register(&client, &base, &at("closer-2", "127.0.0.1", second_port)).await;

    for _ in 0..4 {
        let response = client
            .post(format!("{base}/api/chat"))
            .header("connection", "keep-alive, x-hop-secret")
            .header("x-hop-secret", "for the router only")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-end-to-end", "passed on")
            .json(&json!({"model": "smollm2:135m", "messages": [], "stream": false}))
            .send()
            .await
            .expect("chat");
        assert_eq!(response.status(), StatusCode::OK);
        let answer: Value = response.json().await.expect("json");
        assert_eq!(answer["message"]["content"], "closing");
    }
    let mut heads = Vec::new();
    while let Ok(head) = first_heads.try_recv() {
        heads.push(head);
    }
    while let Ok(head) = second_heads.try_recv() {
        heads.push(head);
    }
    assert_eq!(
        heads.len(),
        4,
        "each request reached exactly one node once: {heads:#?}"
    );
    for head in &heads {
        let head = head.to_ascii_lowercase();
        assert!(head.contains("x-end-to-end: passed on"), "{head}");
        assert!(head.contains("\r\nvia: 1.1 llm-router-"), "{head}");
        for hop in ["x-hop-secret", "keep-alive:", "proxy-connection"] {
            assert!(!head.contains(hop), "{hop} was forwarded: {head}");
        }
    }
    let log = router.terminate().await;
    assert!(
        !log.contains("closed the connection before answering"),
        "{log}"
    );
}

/// What a web page in an operator's browser could send: a registration as
/// `text/plain` (no preflight), one from a foreign `Origin`, one with no
/// type at all. Each is refused and nothing is registered; with
/// `--allowed-hosts`, a rebound host name is refused on every route.
#[tokio::test]
async fn a_web_page_cannot_register_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router =
        RouterProcess::spawn(dir.path(), &["--allowed-hosts", "localhost,127.0.0.1"]).await;
    let (client, base) = (client(), router.url(""));
    let body = serde_json::to_string(&registration("from-a-page")).expect("json");
    let attempts = [
        (Some("text/plain"), None, StatusCode::UNSUPPORTED_MEDIA_TYPE),
        (None, None, StatusCode::UNSUPPORTED_MEDIA_TYPE),
        (
            Some("application/json"),
            Some("http://evil.example"),
            StatusCode::FORBIDDEN,
        ),
        (Some("text/plain"), Some("null"), StatusCode::FORBIDDEN),
    ];
    for (content_type, origin, expected) in attempts {
        let mut request = client
            .post(format!("{base}/api/agents/register"))
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.expect("register");
        assert_eq!(response.status(), expected, "{content_type:?} {origin:?}");
        let answer: Value = response.json().await.expect("json error");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    assert!(
        support::list(&client, &base).await.is_empty(),
        "nothing registered"
    );

    // The router's own page (same origin) and plain clients get in.
    let response = client
        .post(format!("{base}/api/agents/register"))
        .header("origin", base.clone())
        .json(&registration("same-origin"))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::CREATED);

    // A GET naming a host that is not in --allowed-hosts (a rebound name).
    let rebound = |path: &str| {
        client
            .get(format!("{base}{path}"))
            .header("host", format!("rebound.example:{}", router.address.port()))
            .send()
    };
    let rebound_tags = rebound("/api/tags").await.expect("tags");
    assert_eq!(rebound_tags.status(), StatusCode::MISDIRECTED_REQUEST);
    let answer: Value = rebound_tags.json().await.expect("json");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|message| message.contains("--allowed-hosts")),
        "Ollama's shape: {answer}"
    );
    // Every path: the router's own, an OpenAI one, and one that is no route.
    for path in ["/health", "/v1/models", "/no-such-route"] {
        let response = rebound(path).await.expect("request");
        assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST, "{path}");
    }
    router.terminate().await;
}

/// A name that could forge a log field or spoof a CLI table is refused:
/// machine names are host names, and no text field takes invisible or
/// reordering characters. Names the router logs are quoted.
#[tokio::test]
async fn names_cannot_forge_logs_or_tables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let (client, base) = (client(), router.url(""));
    for name in [
        "gpu-1 address=127.0.0.66",
        "gpu-1\u{202E}lanretni",
        "gpu\u{200B}-1",
        "gpu-1\u{2028}Agent removed.",
        "<b>gpu</b>",
        "gpu/1",
    ] {
        let (status, answer) = try_register(&client, &base, &registration(name)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{name:?}: {answer}"
        );
    }
    let mut hidden_in_version = registration("gpu-1");
    hidden_in_version["runtime_version"] = json!("0.5.7\u{2066}");
    let (status, answer) = try_register(&client, &base, &hidden_in_version).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("U+2066")),
        "{answer}"
    );
    assert!(support::list(&client, &base).await.is_empty());

    register(&client, &base, &registration("gpu_1.lab-a")).await;
    let log = router.terminate().await;
    assert!(
        log.contains("machine_name=\"gpu_1.lab-a\""),
        "quoted in the text log: {log}"
    );
}

/// A node's request and failover series leave `/metrics` with the node:
/// rounds of register, request, remove do not grow the exposition.
#[tokio::test]
async fn a_removed_nodes_series_leave_the_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let (client, base) = (client(), router.url(""));
    let standin = StandIn::spawn(StandInOptions::ollama("counted", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let series = || async {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let mut sizes = Vec::new();
    for round in 0..3 {
        let name = format!("passing-{round}");
        let id = register(
            &client,
            &base,
            &at(&name, "127.0.0.1", standin.address.port()),
        )
        .await;
        // A second node that refuses connections: a failover series too.
        let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let dead = register(
            &client,
            &base,
            &at(&format!("dead-{round}"), "127.0.0.1", dead_port),
        )
        .await;
        for _ in 0..4 {
            let response = client
                .post(format!("{base}/api/chat"))
                .json(&json!({"model": "smollm2:135m", "messages": [], "stream": false}))
                .send()
                .await
                .expect("chat");
            assert_eq!(response.status(), StatusCode::OK);
        }
        let during = series().await;
        assert!(
            during
                .iter()
                .any(|line| line.starts_with("llm_router_requests_total{")
                    && line.contains(&format!("node=\"{name}\""))),
            "{during:#?}"
        );
        assert!(
            during
                .iter()
                .any(|line| line.starts_with("llm_router_failovers_total{")
                    && line.contains(&format!("node=\"dead-{round}\""))),
            "{during:#?}"
        );
        for id in [id, dead] {
            let removed = client
                .delete(format!("{base}/api/agents/{id}"))
                .send()
                .await
                .expect("delete");
            assert_eq!(removed.status(), StatusCode::NO_CONTENT);
        }
        let after = series().await;
        assert!(
            !after
                .iter()
                .any(|line| line.contains("node=\"passing-") || line.contains("node=\"dead-")),
            "{after:#?}"
        );
        sizes.push(after.len());
    }
    assert_eq!(
        sizes[1], sizes[2],
        "the exposition does not grow: {sizes:?}"
    );
    router.terminate().await;
}

/// Request bodies the router holds at once stay within `--max-body-memory`:
/// while one slow upload holds most of it, a second large one is refused
/// with a 503 as soon as its length is known (the rest of its body is read
/// and thrown away, never held), and is taken once the first is gone.
#[tokio::test]
async fn bodies_held_at_once_stay_within_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(
        dir.path(),
        &[
            "--max-body-memory",
            "3000000",
            "--max-request-body",
            "2500000",
        ],
    )
    .await;
    let standin = StandIn::spawn(StandInOptions::ollama("budget", &["smollm2:135m"]))
        .await
        .expect("stand-in");
    let (client, base) = (client(), router.url(""));
    register(
        &client,
        &base,
        &at("budget", "127.0.0.1", standin.address.port()),
    )
    .await;

    // A slow client: declares 2 MB, sends a few bytes, waits.
    let mut slow = tokio::net::TcpStream::connect(router.address)
        .await
        .expect("connect");
    slow.write_all(
        b"POST /api/chat HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 2000000\r\n\r\n{\"model\":",
    )
    .await
    .expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let big_chat = || {
        let padding = "x".repeat(1_500_000);
        json!({"model": "smollm2:135m", "messages": [{"role": "user", "content": padding}], "stream": false})
    };
    let refused = client
        .post(format!("{base}/api/chat"))
        .json(&big_chat())
        .send()
        .await
        .expect("chat");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    let answer: Value = refused.json().await.expect("json");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|m| m.contains("--max-body-memory")),
        "{answer}"
    );

    // Small requests still fit beside the slow one.
    let small = client
        .post(format!("{base}/api/chat"))
        .json(&json!({"model": "smollm2:135m", "messages": [], "stream": false}))
        .send()
        .await
        .expect("chat");
    assert_eq!(small.status(), StatusCode::OK);

    drop(slow);
    let taken = eventually(Duration::from_secs(5), "the budget is freed", || {
        let (client, base, body) = (client.clone(), base.clone(), big_chat());
        async move {
            let response = client
                .post(format!("{base}/api/chat"))
                .json(&body)
                .send()
                .await
                .ok()?;
            (response.status() == StatusCode::OK).then_some(())
        }
    })
    .await;
    let () = taken;
    router.terminate().await;
}

/// A client that asks for a stream and never reads it: once its socket
/// buffers are full, the router waits `--send-timeout`, then closes the
/// connection, which stops the node's generation and frees the in-flight
/// count.
#[tokio::test]
async fn a_client_that_stops_reading_frees_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &["--send-timeout", "1"]).await;
    let mut options = StandInOptions::ollama("flood", &["smollm2:135m"]);
    options.chunks = 1_000_000;
    let standin = StandIn::spawn(options).await.expect("stand-in");
    let (client, base) = (client(), router.url(""));
    let id = register(
        &client,
        &base,
        &at("flood", "127.0.0.1", standin.address.port()),
    )
    .await;

    let mut reader_that_never_reads = tokio::net::TcpStream::connect(router.address)
        .await
        .expect("connect");
    let body =
        r#"{"model":"smollm2:135m","messages":[{"role":"user","content":"go"}],"stream":true}"#;
    reader_that_never_reads
        .write_all(
            format!(
                "POST /api/chat HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let stats = || standin.stats.to_json_for_tests();
    eventually(Duration::from_secs(10), "the generation starts", || async {
        (stats()["generations_in_flight"] == 1).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "the stalled stream is cut and the node told",
        || async { (stats()["generations_cancelled"] == 1).then_some(()) },
    )
    .await;
    let agent: Value = client
        .get(format!("{base}/api/agents/{id}"))
        .send()
        .await
        .expect("agent")
        .json()
        .await
        .expect("json");
    assert_eq!(agent["in_flight"], 0, "{agent}");
    drop(reader_that_never_reads);
    router.terminate().await;
}

/// What one agent may register is capped: models per agent and bytes per
/// record, so that listings over the fleet stay proportionate.
#[tokio::test]
async fn what_one_agent_may_register_is_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let (client, base) = (client(), router.url(""));
    let mut many = registration("hoarder");
    many["models"] = json!((0..257).map(|n| format!("m{n}")).collect::<Vec<_>>());
    let (status, answer) = try_register(&client, &base, &many).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("256")),
        "{answer}"
    );
    let mut long_name = registration("hoarder");
    long_name["models"] = json!(["m".repeat(257)]);
    let (status, _) = try_register(&client, &base, &long_name).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let mut large = registration("hoarder");
    large["models"] = json!((0..200).map(|n| format!("{n:0>200}")).collect::<Vec<_>>());
    let (status, _) = try_register(&client, &base, &large).await;
    assert_eq!(
        status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "a record over 32 KiB"
    );
    assert!(support::list(&client, &base).await.is_empty());
    router.terminate().await;
}

/// With `--protect-listings`, who may see the fleet: a reader's credential
/// (admin token, API key), or an agent's own secret for its own record.
/// The dashboard's page stays open; its data does not.
#[tokio::test]
async fn protected_listings_need_a_readers_credential() {
    const JOIN: &str = "join-token-protect-0001";
    const ADMIN: &str = "admin-token-protect-0001";
    const KEY: &str = "api-key-protect-0001";
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(["--port", "0", "--protect-listings"])
        .arg("--data-dir")
        .arg(tempfile::tempdir().expect("tempdir").path())
        .output()
        .expect("run");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--protect-listings needs"));

    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(
        dir.path(),
        &[
            "--protect-listings",
            "--agent-token",
            JOIN,
            "--admin-token",
            ADMIN,
            "--api-keys",
            KEY,
        ],
    )
    .await;
    let (client, base) = (client(), router.url(""));
    let register_as = |name: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move { support::register_with_token(&client, &base, JOIN, &registration(name)).await }
    };
    let (id, secret) = register_as("reader-a").await;
    let (_, other_secret) = register_as("reader-b").await;
    let get = |path: String, token: Option<String>| {
        let client = client.clone();
        async move {
            let mut request = client.get(path);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request.send().await.expect("get").status()
        }
    };
    for path in ["/api/agents", "/metrics"] {
        let url = format!("{base}{path}");
        assert_eq!(
            get(url.clone(), None).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            get(url.clone(), Some(KEY.into())).await,
            StatusCode::OK,
            "{path}"
        );
        assert_eq!(
            get(url.clone(), Some(ADMIN.into())).await,
            StatusCode::OK,
            "{path}"
        );
        assert_eq!(
            get(url.clone(), Some(JOIN.into())).await,
            StatusCode::FORBIDDEN,
            "{path}"
        );
        assert_eq!(
            get(url.clone(), Some(secret.clone())).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    let own = format!("{base}/api/agents/{id}");
    assert_eq!(
        get(own.clone(), Some(secret.clone())).await,
        StatusCode::OK,
        "its own record"
    );
    assert_eq!(
        get(own.clone(), Some(other_secret)).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(own, None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        get(format!("{base}/dashboard"), None).await,
        StatusCode::OK,
        "the page itself"
    );
    assert_eq!(get(format!("{base}/health"), None).await, StatusCode::OK);
    router.terminate().await;
}
