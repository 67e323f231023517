//! Limits against the real router: a cap on registered agents, and clients
//! that send a request head or body too slowly are cut off without holding
//! up anyone else.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use support::{client, config, data_dir_bytes, registration, RouterProcess, TestRouter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn registering_past_the_cap_is_refused_clearly_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.max_agents = 2;
    let router = TestRouter::start(router_config).await;
    let (client, base) = (client(), router.url(""));
    support::register(&client, &base, &registration("gpu-a")).await;
    let b = support::register(&client, &base, &registration("gpu-b")).await;

    let before = data_dir_bytes(dir.path());
    let response = client
        .post(router.url("/api/agents/register"))
        .json(&registration("gpu-c"))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "agent_limit_reached");
    assert!(body["error"]["message"]
        .as_str()
        .expect("message")
        .contains("limit of 2"));
    assert_eq!(data_dir_bytes(dir.path()), before);
    assert_eq!(support::list(&client, &base).await.len(), 2);

    // A known machine registering again is not a new agent: still allowed.
    let response = client
        .post(router.url("/api/agents/register"))
        .json(&registration("gpu-a"))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::OK);
    // Room again after a delete.
    let status = client
        .delete(router.url(&format!("/api/agents/{b}")))
        .send()
        .await
        .expect("delete")
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    support::register(&client, &base, &registration("gpu-c")).await;
    router.stop().await.expect("clean stop");
}

/// Reads what the server sends until it closes the connection.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("the router closes a stalled connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn stalled_request_heads_are_cut_off_and_heartbeats_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.header_read_timeout = Duration::from_millis(300);
    let router = TestRouter::start(router_config).await;
    let (client, base) = (client(), router.url(""));
    let id = support::register(&client, &base, &registration("gpu-a")).await;

    // Many clients that start a request head and never finish it.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(router.address).await.expect("connect");
        stream
            .write_all(b"POST /api/agents/register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
            .await
            .expect("write");
        stalled.push(stream);
    }
    // Heartbeats are answered all the while.
    for _ in 0..20 {
        let status = client
            .post(router.url(&format!("/api/agents/{id}/heartbeat")))
            .send()
            .await
            .expect("heartbeat")
            .status();
        assert_eq!(status, StatusCode::OK);
    }
    // And every stalled connection is closed by the router.
    for stream in &mut stalled {
        let answer = read_until_closed(stream).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "a stalled head gets nothing or a 408, not a request: {answer:?}"
        );
    }
    router.stop().await.expect("clean stop");
}

#[tokio::test]
async fn stalled_request_bodies_get_408_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.body_read_timeout = Duration::from_millis(300);
    let router = TestRouter::start(router_config).await;
    let (client, base) = (client(), router.url(""));
    let id = support::register(&client, &base, &registration("gpu-a")).await;
    let before = data_dir_bytes(dir.path());

    for path in [
        "/api/agents/register".to_owned(),
        format!("/api/agents/{id}"),
        "/api/chat".to_owned(),
        "/v1/chat/completions".to_owned(),
    ] {
        let method = if path.ends_with(&id) { "PUT" } else { "POST" };
        let mut stream = TcpStream::connect(router.address).await.expect("connect");
        // The head promises 100 bytes; 10 come, then nothing.
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":"
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        let answer = read_until_closed(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{method} {path}: {answer:?}"
        );
        assert!(answer.contains("body_read_timeout") || answer.contains("did not arrive"));
    }
    assert_eq!(data_dir_bytes(dir.path()), before);
    let status = client
        .post(router.url(&format!("/api/agents/{id}/heartbeat")))
        .send()
        .await
        .expect("heartbeat")
        .status();
    assert_eq!(status, StatusCode::OK, "the router still serves");
    router.stop().await.expect("clean stop");
}

/// The header read timeout is about waiting for a request head: an answer
/// that takes longer than it, streamed or whole, is not cut, and the
/// connection then serves the next request.
#[tokio::test]
async fn answers_slower_than_the_header_timeout_are_not_cut() {
    use testkit::{StandIn, StandInOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router_config = config(dir.path());
    router_config.header_read_timeout = Duration::from_millis(300);
    let router = TestRouter::start(router_config).await;
    let mut options = StandInOptions::ollama("slow-node", &["smollm2:135m"]);
    options.chunks = 4;
    options.chunk_delay = Duration::from_millis(250);
    let standin = StandIn::spawn(options).await.expect("stand-in");
    let client = client();
    let mut node = registration("slow-node");
    node["ip_address"] = "127.0.0.1".into();
    node["port"] = standin.address.port().into();
    support::register(&client, &router.url(""), &node).await;

    for stream in [false, true, false] {
        let started = std::time::Instant::now();
        let response = client
            .post(router.url("/api/chat"))
            .json(&serde_json::json!({
                "model": "smollm2:135m",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            }))
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("the whole answer");
        assert!(
            text.contains("slow-node") && text.contains("\"done\":true"),
            "{text}"
        );
        assert!(
            started.elapsed() > Duration::from_millis(300),
            "the answer did take longer than the header timeout"
        );
    }
    router.stop().await.expect("clean stop");
}

/// Sends one request on a raw connection and reads its whole answer (the
/// head, lower-cased, and the body by its `content-length`), leaving the
/// connection open (HTTP/1.1 keep-alive).
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> (String, String) {
    stream.write_all(request).await.expect("send");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(read > 0, "the router closed before answering");
        received.extend_from_slice(&buffer[..read]);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|value| value.trim().parse().ok())
        .expect("content-length");
    while received.len() < head_end + length {
        let read = stream.read(&mut buffer).await.expect("read body");
        assert!(read > 0, "the body was cut");
        received.extend_from_slice(&buffer[..read]);
    }
    let body = String::from_utf8_lossy(&received[head_end..head_end + length]).into_owned();
    (head, body)
}

/// Whether the router closes the connection within `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buffer = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, stream.read(&mut buffer)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The review's case: 100 connections that each sent one request at once
/// and then fell silent are all closed once the header read timeout has
/// passed since their answer, not left open.
#[tokio::test]
async fn connections_idle_after_an_answer_close_at_the_header_read_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &["--header-read-timeout", "2"]).await;
    let address = router.address;
    let mut connections = Vec::new();
    for _ in 0..100 {
        connections.push(
            tokio::net::TcpStream::connect(address)
                .await
                .expect("connect"),
        );
    }
    let answers = futures::future::join_all(
        connections
            .iter_mut()
            .map(|stream| exchange(stream, b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")),
    )
    .await;
    assert!(answers
        .iter()
        .all(|(head, _)| head.starts_with("http/1.1 200")));
    let closed = futures::future::join_all(
        connections
            .iter_mut()
            .map(|stream| closed_within(stream, Duration::from_secs(10))),
    )
    .await;
    let still_open = closed.iter().filter(|closed| !**closed).count();
    assert_eq!(still_open, 0, "connections left open after the timeout");
    router.terminate().await;
}

/// Opens a connection from a given loopback address.
async fn connect_from(source: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .expect("bind the source address");
    socket.connect(to).await.expect("connect")
}

/// Under a 400-descriptor limit, 250 silent connections from one address
/// take at most their share; the rest are answered 503 and closed, and
/// `/health` from another address still answers. The soft descriptor limit
/// is raised to the hard one at start.
#[tokio::test]
async fn silent_connections_cannot_take_every_descriptor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn_wrapped(
        &["prlimit", "--nofile=400:400", "--"],
        dir.path(),
        "127.0.0.1",
        &[],
    )
    .await;
    let address = router.address;
    let mut silent = Vec::new();
    for _ in 0..250 {
        silent.push(connect_from([127, 0, 0, 2], address).await);
    }
    // The ones past this address's share (a quarter of 200) were shed with
    // a reason. All are read at once, each for up to two seconds: a shed
    // connection answers at once, an admitted one stays silent (the header
    // read timeout is a minute), and a busy machine may be slow to answer.
    let replies = futures::future::join_all(silent.iter_mut().map(|stream| async move {
        use tokio::io::AsyncReadExt as _;
        let mut buffer = [0u8; 512];
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer)).await {
            Ok(Ok(read)) if read > 0 => Some(String::from_utf8_lossy(&buffer[..read]).into_owned()),
            _ => None,
        }
    }))
    .await;
    let mut shed = 0;
    for text in replies.into_iter().flatten() {
        assert!(
            text.starts_with("HTTP/1.1 503") && text.contains("--max-connections-per-client"),
            "{text}"
        );
        shed += 1;
    }
    assert_eq!(shed, 200, "250 connections, 50 admitted from one address");
    let health = client()
        .get(router.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "other clients still get in"
    );
    drop(silent);
    let log = router.terminate().await;
    assert!(
        log.contains("max_connections=200") && log.contains("file_descriptors=400"),
        "{log}"
    );

    // A soft limit below the hard one is raised.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn_wrapped(
        &["prlimit", "--nofile=256:4096", "--"],
        dir.path(),
        "127.0.0.1",
        &[],
    )
    .await;
    let log = router.terminate().await;
    assert!(log.contains("file_descriptors=4096"), "{log}");
}

/// A body sent chunked, piece by piece, with a pause before each piece,
/// so that the router reads it as several frames.
fn in_pieces(pieces: Vec<Vec<u8>>) -> reqwest::Body {
    use futures::StreamExt as _;
    reqwest::Body::wrap_stream(futures::stream::iter(pieces).then(|piece| async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok::<_, std::io::Error>(piece)
    }))
}

fn split_in_three(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .chunks(bytes.len().div_ceil(3))
        .map(<[u8]>::to_vec)
        .collect()
}

/// Registry bodies are read by the router's own reader (no axum body
/// limit layer): one that arrives in pieces is read whole, and one sent
/// without a length that grows past 32 KiB is refused with a JSON 413
/// once it does, and changes nothing.
#[tokio::test]
async fn registry_bodies_in_pieces_are_read_whole_and_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let (client, base) = (client(), router.url(""));
    let post = |path: &str, body: reqwest::Body| {
        client
            .post(router.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
    };

    let registration_body = serde_json::to_vec(&registration("gpu-pieces")).expect("json");
    let response = post(
        "/api/agents/register",
        in_pieces(split_in_three(&registration_body)),
    )
    .await
    .expect("register");
    assert_eq!(response.status(), StatusCode::CREATED);
    let id = response.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("an id")
        .to_owned();

    let report = br#"{"models":["smollm2:135m","qwen2.5:0.5b"],"cpu_usage_percent":12.5}"#;
    let response = post(
        &format!("/api/agents/{id}/heartbeat"),
        in_pieces(split_in_three(report)),
    )
    .await
    .expect("heartbeat");
    assert_eq!(response.status(), StatusCode::OK);
    let (status, agent) =
        support::get_json(&client, router.url(&format!("/api/agents/{id}"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        agent["report"]["models"],
        serde_json::json!(["smollm2:135m", "qwen2.5:0.5b"])
    );
    assert_eq!(agent["report"]["cpu_usage_percent"], 12.5);

    // 30 KiB, then 10 more: the second piece takes it past the limit.
    let mut large = registration("gpu-large");
    large["runtime_version"] = "v".repeat(40 * 1024).into();
    let large = serde_json::to_vec(&large).expect("json");
    let response = post(
        "/api/agents/register",
        in_pieces(vec![
            large[..30 * 1024].to_vec(),
            large[30 * 1024..].to_vec(),
        ]),
    )
    .await
    .expect("an answer");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["error"]["code"], "payload_too_large");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("32768 bytes")),
        "{answer}"
    );
    let names: Vec<Value> = support::list(&client, &base)
        .await
        .iter()
        .map(|agent| agent["machine_name"].clone())
        .collect();
    assert_eq!(names, vec![Value::from("gpu-pieces")]);
    router.stop().await.expect("clean stop");
}

fn post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// An answer given before the request's body was read to its end (a body
/// over the limit, a refusal ahead of the body) says `Connection: close`,
/// and the connection closes: hyper will not read a body the router left,
/// and a client that pools connections must not send its next request into
/// it. An answer to a body read whole keeps the connection open.
#[tokio::test]
async fn answers_to_bodies_left_unread_close_their_connection_and_say_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let registration_body = serde_json::to_vec(&registration("keep-alive")).expect("json");

    // Read whole: the same connection serves the next request.
    let mut stream = TcpStream::connect(router.address).await.expect("connect");
    let (head, body) = exchange(
        &mut stream,
        &post("/api/agents/register", "", &registration_body),
    )
    .await;
    assert!(head.starts_with("http/1.1 201"), "{head}{body}");
    assert!(!head.contains("connection: close"), "{head}");
    let id = serde_json::from_str::<Value>(&body).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (head, _) = exchange(
        &mut stream,
        &post(&format!("/api/agents/{id}/heartbeat"), "", b"{}"),
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");

    // Over the registry's 32 KiB: refused unread, and said so.
    let mut large = registration("hoarder");
    large["models"] = serde_json::json!((0..200).map(|n| format!("{n:0>200}")).collect::<Vec<_>>());
    let large = serde_json::to_vec(&large).expect("json");
    assert!(large.len() > 32 * 1024);
    let mut stream = TcpStream::connect(router.address).await.expect("connect");
    let (head, body) = exchange(&mut stream, &post("/api/agents/register", "", &large)).await;
    assert!(head.starts_with("http/1.1 413"), "{head}{body}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(
        closed_within(&mut stream, Duration::from_secs(5)).await,
        "the connection closes after the 413"
    );

    // Refused before the body is read (a cross-site write).
    let mut stream = TcpStream::connect(router.address).await.expect("connect");
    let (head, body) = exchange(
        &mut stream,
        &post(
            "/api/agents/register",
            "sec-fetch-site: cross-site\r\n",
            &registration_body,
        ),
    )
    .await;
    assert!(head.starts_with("http/1.1 403"), "{head}{body}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(
        closed_within(&mut stream, Duration::from_secs(5)).await,
        "the connection closes after the 403"
    );
    router.terminate().await;
}
