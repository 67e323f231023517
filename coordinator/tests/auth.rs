//! Authentication against the real router: every protected endpoint refuses
//! a missing, wrong, nearly right or someone else's credential and changes
//! nothing on disk; the right one gets in; secrets outlive a restart and
//! never reach the log.

mod support;

use std::time::Duration;

use coordinator::auth::Secret;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{client, config, data_dir_bytes, registration, send, RouterProcess, TestRouter};

const JOIN_TOKEN: &str = "join-token-5f1e0c2a9b7d";
const API_KEYS: [&str; 2] = ["client-key-alpha-0001", "client-key-beta-0002"];
const ADMIN_TOKEN: &str = "admin-token-c3d4e5f6a7b8";

fn secured_config(data_dir: &std::path::Path) -> coordinator::Config {
    let mut config = config(data_dir);
    config.agent_token = Some(Secret::new(JOIN_TOKEN));
    config.api_keys = API_KEYS.iter().map(|key| Secret::new(*key)).collect();
    config.admin_token = Some(Secret::new(ADMIN_TOKEN));
    // Nothing but the requests under test may write: no liveness flushes or
    // snapshots during the test.
    config.flush_interval = Duration::from_secs(3600);
    config.snapshot_interval = Duration::from_secs(3600);
    config
}

/// The same text with its last byte changed.
fn last_byte_changed(token: &str) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let last = bytes.last_mut().expect("non-empty");
    *last = if *last == b'0' { b'1' } else { b'0' };
    String::from_utf8(bytes).expect("ascii")
}

async fn register_with(
    client: &reqwest::Client,
    router: &TestRouter,
    name: &str,
    token: &str,
) -> (String, String) {
    let (status, answer) = send(
        client,
        Method::POST,
        &router.url("/api/agents/register"),
        Some(&registration(name)),
        Some(token),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let secret = answer["agent_secret"]
        .as_str()
        .expect("a secret")
        .to_owned();
    (answer["id"].as_str().expect("id").to_owned(), secret)
}

/// One protected endpoint: what it is called with, and which credential
/// lets it in.
struct Protected {
    method: Method,
    path: String,
    body: Option<Value>,
    right: String,
    /// A real credential of another kind: refused with 403.
    other_kind: String,
}

#[tokio::test]
async fn every_protected_endpoint_refuses_bad_credentials_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(secured_config(dir.path())).await;
    let client = client();
    let (a_id, a_secret) = register_with(&client, &router, "gpu-a", JOIN_TOKEN).await;
    let (_b_id, b_secret) = register_with(&client, &router, "gpu-b", JOIN_TOKEN).await;
    assert_ne!(a_secret, b_secret);
    assert!(a_secret.len() >= 32, "at least 128 bits, in hex");

    let chat = json!({"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}]});
    let mut endpoints = vec![
        Protected {
            method: Method::POST,
            path: "/api/agents/register".into(),
            body: Some(registration("gpu-new")),
            right: JOIN_TOKEN.into(),
            other_kind: API_KEYS[0].into(),
        },
        Protected {
            method: Method::POST,
            path: format!("/api/agents/{a_id}/heartbeat"),
            body: Some(json!({"requests_in_flight": 1})),
            right: a_secret.clone(),
            other_kind: ADMIN_TOKEN.into(),
        },
    ];
    for (method, path, body) in [
        (
            Method::PUT,
            format!("/api/agents/{a_id}"),
            Some(json!({"runtime_version": "9.9.9"})),
        ),
        (Method::POST, format!("/api/agents/{a_id}/drain"), None),
        (Method::DELETE, format!("/api/agents/{a_id}"), None),
    ] {
        endpoints.push(Protected {
            method,
            path,
            body,
            right: a_secret.clone(),
            other_kind: JOIN_TOKEN.into(),
        });
    }
    for (method, path) in [
        (Method::POST, "/api/chat"),
        (Method::POST, "/api/generate"),
        (Method::POST, "/api/embed"),
        (Method::POST, "/api/embeddings"),
        (Method::POST, "/api/show"),
        (Method::GET, "/api/tags"),
        (Method::GET, "/api/ps"),
        (Method::GET, "/api/version"),
        (Method::POST, "/v1/chat/completions"),
        (Method::POST, "/v1/completions"),
        (Method::POST, "/v1/embeddings"),
        (Method::GET, "/v1/models"),
    ] {
        endpoints.push(Protected {
            body: (method == Method::POST).then(|| chat.clone()),
            method,
            path: path.into(),
            right: API_KEYS[1].into(),
            other_kind: ADMIN_TOKEN.into(),
        });
    }

    let before = data_dir_bytes(dir.path());
    for endpoint in &endpoints {
        let url = router.url(&endpoint.path);
        let near_miss = last_byte_changed(&endpoint.right);
        let refused: [(Option<&str>, StatusCode); 5] = [
            (None, StatusCode::UNAUTHORIZED),
            (Some("not-a-credential"), StatusCode::UNAUTHORIZED),
            (Some(&near_miss), StatusCode::UNAUTHORIZED),
            (Some(&b_secret), StatusCode::UNAUTHORIZED),
            (Some(&endpoint.other_kind), StatusCode::FORBIDDEN),
        ];
        for (token, expected) in refused {
            let (status, body) = send(
                &client,
                endpoint.method.clone(),
                &url,
                endpoint.body.as_ref(),
                token,
            )
            .await;
            assert_eq!(
                status, expected,
                "{} {} with {token:?}: {body}",
                endpoint.method, endpoint.path
            );
            assert!(
                body.get("error").is_some(),
                "a JSON error for {}: {body}",
                endpoint.path
            );
        }
        // A header that is not Bearer at all is no credential either.
        let status = client
            .request(endpoint.method.clone(), &url)
            .basic_auth("admin", Some(ADMIN_TOKEN))
            .send()
            .await
            .expect("request")
            .status();
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "Basic on {}",
            endpoint.path
        );
    }
    assert_eq!(
        data_dir_bytes(dir.path()),
        before,
        "refused requests changed the store"
    );
    let agent_a = support::list(&client, &router.url(""))
        .await
        .into_iter()
        .find(|agent| agent["id"] == a_id.as_str())
        .expect("A is still there");
    assert_eq!(agent_a["runtime_version"], "0.5.7");
    assert_eq!(agent_a["draining"], false);
    assert!(
        agent_a.get("secret_hash").is_none() && agent_a.get("agent_secret").is_none(),
        "the API never shows a secret or its hash: {agent_a}"
    );

    // The right credentials get in (the proxy routes then answer as they
    // would without authentication).
    for endpoint in &endpoints {
        let (status, body) = send(
            &client,
            endpoint.method.clone(),
            &router.url(&endpoint.path),
            endpoint.body.as_ref(),
            Some(&endpoint.right),
        )
        .await;
        assert!(
            status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
            "{} {} with the right credential: {status} {body}",
            endpoint.method,
            endpoint.path
        );
    }
    // The admin token works on any agent: B is removed with it.
    let (status, _) = send(
        &client,
        Method::DELETE,
        &router.url(&format!("/api/agents/{_b_id}")),
        None,
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    router.stop().await.expect("clean stop");
}

#[tokio::test]
async fn secrets_outlive_a_restart_and_registering_again_replaces_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(secured_config(dir.path())).await;
    let client = client();
    let (id, first_secret) = register_with(&client, &router, "gpu-a", JOIN_TOKEN).await;
    let heartbeat = format!("/api/agents/{id}/heartbeat");
    let address = router.address;
    router.stop().await.expect("clean stop");

    let stored = std::fs::read_to_string(dir.path().join("agents.json")).expect("snapshot");
    assert!(
        !stored.contains(&first_secret),
        "only the hash is stored, never the secret"
    );
    assert!(stored.contains("secret_hash"));

    let router = TestRouter::start_at(address, secured_config(dir.path())).await;
    let (status, _) = send(
        &client,
        Method::POST,
        &router.url(&heartbeat),
        None,
        Some(&first_secret),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the secret works after a restart");
    let (status, _) = send(
        &client,
        Method::POST,
        &router.url(&heartbeat),
        None,
        Some(&last_byte_changed(&first_secret)),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Registering the same machine again with its secret keeps the id and
    // the secret; with the admin token it issues a new one and retires the
    // old.
    let mut again = registration("gpu-a");
    again["agent_secret"] = json!(first_secret);
    let (status, answer) = send(
        &client,
        Method::POST,
        &router.url("/api/agents/register"),
        Some(&again),
        Some(JOIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["id"], id.as_str());
    assert!(
        answer.get("agent_secret").is_none(),
        "it keeps its secret: {answer}"
    );
    let (status, answer) = send(
        &client,
        Method::POST,
        &router.url("/api/agents/register"),
        Some(&registration("gpu-a")),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["id"], id.as_str());
    let second_secret = answer["agent_secret"].as_str().expect("secret").to_owned();
    assert_ne!(second_secret, first_secret);
    let (status, _) = send(
        &client,
        Method::POST,
        &router.url(&heartbeat),
        None,
        Some(&first_secret),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the old secret is retired"
    );
    let (status, _) = send(
        &client,
        Method::POST,
        &router.url(&heartbeat),
        None,
        Some(&second_secret),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    router.stop().await.expect("clean stop");
}

/// The attack of the security review, against the real binary in each
/// configuration: with the victim's public name and port, register again
/// from another address (with whatever the configuration hands out), and
/// send a heartbeat that would take the victim out of rotation.
#[tokio::test]
async fn no_one_takes_over_another_nodes_identity_unless_nothing_is_configured() {
    struct Case {
        name: &'static str,
        flags: &'static [&'static str],
        /// What an attacker holds: the join token when there is one.
        attacker_token: Option<&'static str>,
        protected: bool,
    }
    let cases = [
        Case {
            name: "nothing",
            flags: &[],
            attacker_token: None,
            protected: false,
        },
        Case {
            name: "admin only",
            flags: &["--admin-token", ADMIN_TOKEN],
            attacker_token: None,
            protected: true,
        },
        Case {
            name: "join token",
            flags: &["--agent-token", JOIN_TOKEN],
            attacker_token: Some(JOIN_TOKEN),
            protected: true,
        },
        Case {
            name: "join token and admin",
            flags: &["--agent-token", JOIN_TOKEN, "--admin-token", ADMIN_TOKEN],
            attacker_token: Some(JOIN_TOKEN),
            protected: true,
        },
    ];
    let client = client();
    for case in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut router = RouterProcess::spawn(dir.path(), case.flags).await;
        let (status, answer) = send(
            &client,
            Method::POST,
            &router.url("/api/agents/register"),
            Some(&registration("victim")),
            case.attacker_token,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{}: {answer}", case.name);
        let id = answer["id"].as_str().expect("id").to_owned();
        let victim_secret = answer["agent_secret"].as_str().map(str::to_owned);
        assert_eq!(
            victim_secret.is_some(),
            case.protected,
            "{}: a secret exactly when it protects",
            case.name
        );

        let mut takeover = registration("victim");
        takeover["ip_address"] = json!("127.0.0.66");
        let forged_secrets = [
            None,
            Some("llmr_agent_guess".to_owned()),
            victim_secret.as_deref().map(last_byte_changed),
        ];
        for forged in forged_secrets
            .iter()
            .take(if case.protected { 3 } else { 1 })
        {
            if let Some(forged) = forged {
                takeover["agent_secret"] = json!(forged);
            }
            let (status, answer) = send(
                &client,
                Method::POST,
                &router.url("/api/agents/register"),
                Some(&takeover),
                case.attacker_token,
            )
            .await;
            if case.protected {
                assert_eq!(status, StatusCode::CONFLICT, "{}: {answer}", case.name);
                assert_eq!(answer["error"]["code"], "identity_taken");
                let message = answer["error"]["message"].as_str().expect("message");
                assert!(
                    message.contains(&format!("llm-router agents remove {id}")),
                    "{message}"
                );
            } else {
                assert_eq!(status, StatusCode::OK, "{}: open, as documented", case.name);
            }
        }
        let (status, _) = send(
            &client,
            Method::POST,
            &router.url(&format!("/api/agents/{id}/heartbeat")),
            Some(&json!({"llm_server_up": false})),
            case.attacker_token,
        )
        .await;
        let (_, agent) = send(
            &client,
            Method::GET,
            &router.url(&format!("/api/agents/{id}")),
            None,
            None,
        )
        .await;
        if case.protected {
            // 401 with no credential, 403 with the join token (known, but
            // not for this).
            assert!(
                status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN,
                "{}: a heartbeat needs the agent's secret, got {status}",
                case.name
            );
            assert_eq!(
                agent["ip_address"], "127.0.0.2",
                "{}: the address did not move",
                case.name
            );
            assert_eq!(
                agent["state"], "serving",
                "{}: still in rotation",
                case.name
            );
            // The real agent, with its secret, registers again as before.
            let mut own = registration("victim");
            own["agent_secret"] = json!(victim_secret);
            let (status, answer) = send(
                &client,
                Method::POST,
                &router.url("/api/agents/register"),
                Some(&own),
                case.attacker_token,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{}: {answer}", case.name);
            assert_eq!(answer["id"], id.as_str());
        } else {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                agent["ip_address"], "127.0.0.66",
                "with nothing configured, nothing is protected"
            );
        }
        let log = router.terminate().await;
        // Every configuration here listens on loopback: no SECURITY warning.
        assert!(!log.contains("SECURITY"), "{}: {log}", case.name);
    }
}

#[tokio::test]
async fn without_configured_credentials_everything_stays_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let client = client();
    let id = support::register(&client, &router.url(""), &registration("gpu-a")).await;
    for (method, path) in [
        (Method::POST, format!("/api/agents/{id}/heartbeat")),
        (Method::POST, format!("/api/agents/{id}/drain")),
        (Method::DELETE, format!("/api/agents/{id}")),
        (Method::GET, "/v1/models".to_owned()),
    ] {
        let (status, body) = send(&client, method, &router.url(&path), None, None).await;
        assert!(status.is_success(), "{path}: {status} {body}");
    }
    router.stop().await.expect("clean stop");
}

#[tokio::test]
async fn credentials_from_files_and_never_in_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = tempfile::tempdir().expect("tempdir");
    let join_file = secrets.path().join("join");
    let keys_file = secrets.path().join("keys");
    let admin_file = secrets.path().join("admin");
    std::fs::write(&join_file, format!("{JOIN_TOKEN}\n")).expect("write");
    std::fs::write(
        &keys_file,
        format!("# client keys\n{}\n{}\n", API_KEYS[0], API_KEYS[1]),
    )
    .expect("write");
    std::fs::write(&admin_file, ADMIN_TOKEN).expect("write");
    let mut router = RouterProcess::spawn(
        dir.path(),
        &[
            "--agent-token-file",
            join_file.to_str().expect("utf-8"),
            "--api-keys-file",
            keys_file.to_str().expect("utf-8"),
            "--admin-token-file",
            admin_file.to_str().expect("utf-8"),
        ],
    )
    .await;
    let client = client();
    let (status, answer) = send(
        &client,
        Method::POST,
        &router.url("/api/agents/register"),
        Some(&registration("gpu-a")),
        Some(JOIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let secret = answer["agent_secret"].as_str().expect("secret").to_owned();
    let id = answer["id"].as_str().expect("id").to_owned();
    let (status, _) = send(
        &client,
        Method::GET,
        &router.url("/v1/models"),
        None,
        Some(API_KEYS[1]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "a key from the file works");
    for token in [ADMIN_TOKEN, API_KEYS[0], &secret, "wrong"] {
        send(
            &client,
            Method::POST,
            &router.url(&format!("/api/agents/{id}/heartbeat")),
            None,
            Some(token),
        )
        .await;
    }
    let (status, _) = send(
        &client,
        Method::DELETE,
        &router.url(&format!("/api/agents/{id}")),
        None,
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "the admin token from its file works"
    );

    let log = router.terminate().await;
    for secret_text in [JOIN_TOKEN, API_KEYS[0], API_KEYS[1], ADMIN_TOKEN, &secret] {
        assert!(!log.contains(secret_text), "a secret reached the log");
    }
    assert!(
        !log.contains("SECURITY"),
        "loopback with a join token: no warning"
    );
}

#[tokio::test]
async fn an_open_router_on_a_network_address_warns_loudly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn_on_host(dir.path(), "0.0.0.0", &[]).await;
    // Reached over loopback: the test sends traffic nowhere else.
    let port = router.address.port();
    let status = client()
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .expect("health")
        .status();
    assert_eq!(status, StatusCode::OK);
    let log = router.terminate().await;
    assert!(
        log.contains("SECURITY") && log.contains("Anyone who can reach this port"),
        "the warning is in the log:\n{log}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let log = router.terminate().await;
    assert!(!log.contains("SECURITY"), "no warning on loopback:\n{log}");

    // An admin token alone leaves registration open: said so. A join token
    // closes both registration and heartbeats: nothing to say.
    for (flags, warned) in [
        (&["--admin-token", ADMIN_TOKEN][..], true),
        (&["--agent-token", JOIN_TOKEN][..], false),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut router = RouterProcess::spawn_on_host(dir.path(), "0.0.0.0", flags).await;
        let log = router.terminate().await;
        assert_eq!(
            log.contains("SECURITY") && log.contains("with no join token"),
            warned,
            "{flags:?}:\n{log}"
        );
    }
}

/// With no join token there is nothing a secret would be checked against,
/// so a registration carries none (as the README says) and none is stored.
/// Once a join token is configured, such an agent has no secret to show:
/// its heartbeat is refused until it registers again under the token.
#[tokio::test]
async fn without_a_join_token_a_registration_carries_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = TestRouter::start(config(dir.path())).await;
    let client = client();
    let (status, answer) = send(
        &client,
        Method::POST,
        &router.url("/api/agents/register"),
        Some(&registration("open-node")),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(answer.get("agent_secret").is_none(), "{answer}");
    let id = answer["id"].as_str().expect("id").to_owned();
    let (status, _) = send(
        &client,
        Method::POST,
        &router.url(&format!("/api/agents/{id}/heartbeat")),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    router.stop().await.expect("clean stop");
    let stored = std::fs::read_to_string(dir.path().join("agents.json")).expect("snapshot");
    assert!(!stored.contains("secret_hash"), "{stored}");

    let router = TestRouter::start(secured_config(dir.path())).await;
    let (status, _) = send(
        &client,
        Method::POST,
        &router.url(&format!("/api/agents/{id}/heartbeat")),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no secret, no heartbeat");
    let (status, answer) = send(
        &client,
        Method::POST,
        &router.url("/api/agents/register"),
        Some(&registration("open-node")),
        Some(JOIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the same machine, the same id");
    assert_eq!(answer["id"], id.as_str());
    let secret = answer["agent_secret"].as_str().expect("a secret now");
    let (status, _) = send(
        &client,
        Method::POST,
        &router.url(&format!("/api/agents/{id}/heartbeat")),
        None,
        Some(secret),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}
