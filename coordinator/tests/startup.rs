//! Starting the real `llm-router` binary: one router per port and per data
//! dir (a second one refuses to start, and says who holds what), locks that
//! `kill -9` releases at once, host names for `--host`, and start-up errors
//! and log lines that say what they mean.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use support::{client, list, register, registration, RouterProcess};

/// Runs the router binary expecting it to refuse to start; returns its
/// output. A router that starts instead is killed after 20 s and fails the test.
async fn refused_start(data_dir: &Path, args: &[&str]) -> Output {
    let host: &[&str] = if args.contains(&"--host") {
        &[]
    } else {
        &["--host", "127.0.0.1"]
    };
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(host)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), child)
        .await
        .expect("the second router should have refused to start, not served")
        .expect("run llm-router");
    assert!(
        !output.status.success(),
        "a refused start exits non-zero: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_second_router_on_the_same_port_refuses_to_start() {
    let first_dir = tempfile::tempdir().expect("tempdir");
    let second_dir = tempfile::tempdir().expect("tempdir");
    let first = RouterProcess::spawn(first_dir.path(), &["--threads", "2"]).await;
    let port = first.address.port().to_string();
    let client = client();
    let id = register(&client, &first.url(""), &registration("gpu-1")).await;

    let refused = refused_start(second_dir.path(), &["--port", &port, "--threads", "2"]).await;
    let message = stderr(&refused);
    assert!(
        message.contains(&format!(
            "port {port} is already served by another llm-router"
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!("PID {}", first.pid())),
        "the holder is named: {message}"
    );
    assert!(
        message.contains("--port"),
        "the message says what to do: {message}"
    );

    // Every connection still reaches the one router: no split registry.
    for _ in 0..40 {
        let agents = list(&reqwest::Client::new(), &first.url("")).await;
        assert_eq!(agents.len(), 1, "every answer comes from the first router");
        assert_eq!(agents[0]["id"], id.as_str());
    }
}

#[tokio::test]
async fn a_port_another_program_listens_on_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A plain listener, as nginx or an Ollama would hold the port.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = plain.local_addr().expect("address").port().to_string();
    let message = stderr(&refused_start(dir.path(), &["--port", &port]).await);
    assert!(
        message.contains(&format!(
            "127.0.0.1:{port} is already in use by another program"
        )),
        "{message}"
    );

    // One that joins port-sharing groups (an older router, say) is seen too.
    let sharing = coordinator::listen::bind_reusing_port("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let port = sharing.local_addr().expect("address").port().to_string();
    let message = stderr(&refused_start(dir.path(), &["--port", &port]).await);
    assert!(
        message.contains("already in use by another program"),
        "{message}"
    );
}

#[tokio::test]
async fn a_second_router_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No snapshot after registrations go quiet: the journal then holds
    // what this router wrote, and only the refused router could change it.
    let first = RouterProcess::spawn(dir.path(), &["--snapshot-when-quiet", "0"]).await;
    let client = client();
    register(&client, &first.url(""), &registration("gpu-1")).await;
    let snapshot_before = std::fs::read(dir.path().join("agents.journal")).expect("journal");

    let refused = refused_start(dir.path(), &["--port", "0"]).await;
    let message = stderr(&refused);
    assert!(
        message.contains(&format!(
            "data dir {} is in use by another llm-router (PID {})",
            dir.path().display(),
            first.pid()
        )),
        "{message}"
    );
    assert!(message.contains("--data-dir"), "{message}");
    assert_eq!(
        std::fs::read(dir.path().join("agents.journal")).expect("journal"),
        snapshot_before,
        "the refused router wrote nothing"
    );
    // The first router goes on, and what it acknowledges stays.
    register(&client, &first.url(""), &registration("gpu-2")).await;
    assert_eq!(list(&client, &first.url("")).await.len(), 2);
}

#[tokio::test]
async fn kill_9_of_the_holder_frees_its_port_and_data_dir_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = RouterProcess::spawn(dir.path(), &["--threads", "2"]).await;
    let port = first.address.port();
    let client = client();
    let id = register(&client, &first.url(""), &registration("gpu-1")).await;
    kill(first.pid(), Signal::SIGKILL).expect("kill -9");
    first.child.wait().await.expect("reaped");

    // No wait, no retry: the kernel released both locks with the process.
    let second = RouterProcess::spawn_at_port(dir.path(), port, &["--threads", "2"]).await;
    assert_eq!(second.address.port(), port);
    let agents = list(&client, &second.url("")).await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["id"], id.as_str());
}

#[tokio::test]
async fn host_names_are_resolved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = RouterProcess::spawn_on_host(dir.path(), "localhost", &[]).await;
    assert!(
        router.address.ip().is_loopback(),
        "localhost listens on loopback: {}",
        router.address
    );
    register(&client(), &router.url(""), &registration("gpu-1")).await;

    let message = stderr(&refused_start(dir.path(), &["--host", "no such host!"]).await);
    assert!(
        message.contains("--host") && message.contains("neither an IP address nor a host name"),
        "{message}"
    );
}

#[tokio::test]
async fn a_data_dir_that_is_a_file_is_named_once_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let message = stderr(&refused_start(&file, &["--port", "0"]).await);
    assert!(
        message.contains(&format!(
            "data dir {} is a file, not a directory",
            file.display()
        )),
        "{message}"
    );
    assert!(message.contains("--data-dir"), "{message}");
    assert_eq!(
        message.matches("os error").count(),
        0,
        "no raw OS error, let alone twice: {message}"
    );
}

#[tokio::test]
async fn start_up_and_registration_log_lines_read_plainly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = RouterProcess::spawn(dir.path(), &[]).await;
    let client = client();
    let mut body = registration("gpu-logs");
    body["port"] = 11500.into();
    register(&client, &router.url(""), &body).await;
    kill(router.pid(), Signal::SIGTERM).expect("SIGTERM");
    router.child.wait().await.expect("exits");
    let log = router.finished_log().await.join("\n");
    assert!(
        log.contains("loaded_from=nothing (a new registry)"),
        "loaded_from in plain words: {log}"
    );
    assert!(
        !log.contains("Some("),
        "no Rust debug forms in the log: {log}"
    );
    let registered = log
        .lines()
        .find(|line| line.contains("Agent registered."))
        .expect("a registration line");
    assert!(
        registered.contains("machine_name=\"gpu-logs\"")
            && registered.contains("address=127.0.0.2:11500"),
        "{registered}"
    );
}
