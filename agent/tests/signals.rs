//! The agent binary stops promptly with exit status 0 on SIGTERM and
//! ctrl-c, even while it is retrying a router that is not there.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};

async fn exits_zero_on(signal: Signal) {
    // A port with nothing listening: bind one, note it, close it.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-router-agent"))
        .args(["--router-url", &format!("http://127.0.0.1:{closed_port}")])
        .args(["--backend-url", &format!("http://127.0.0.1:{closed_port}")])
        .args([
            "--heartbeat-interval",
            "0.2",
            "--machine-name",
            "signal-test",
        ])
        .env(
            "LLM_ROUTER_AGENT_STATE_DIR",
            std::env::temp_dir().join(format!("llm-router-agent-test-{}", std::process::id())),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn agent");
    // Let it start and fail a few registrations first.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the agent does not exit for an absent router"
    );
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, signal).expect("signal");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits promptly")
        .expect("wait");
    assert!(status.success(), "{signal}: {status:?}");
}

#[tokio::test]
async fn sigterm_exits_zero() {
    exits_zero_on(Signal::SIGTERM).await;
}

#[tokio::test]
async fn sigint_exits_zero() {
    exits_zero_on(Signal::SIGINT).await;
}
