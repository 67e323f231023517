//! The agent's secret, kept across restarts.
//!
//! When the router has agent credentials configured, it gives each node
//! identity (`machine_name`, port) a secret the first time it is registered,
//! and registering that identity again needs the secret: that is what keeps
//! one node from taking another's name. So the agent writes its secret to a
//! file of its own, readable by its user only (mode 0600, in a directory of
//! mode 0700), and presents it at every later registration. A lost file
//! means a lost identity: an operator frees it with
//! `llm-router agents remove ID`, and the agent registers anew.
//!
//! One file per router and identity, so that two agents on one machine (two
//! LLM servers on two ports) or one agent pointed at another router never
//! read each other's secret.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the file holds. The router URL, name and port are there for the
/// person who opens it; the file's name already says them.
#[derive(Debug, Serialize, Deserialize)]
struct StoredIdentity {
    router_url: String,
    machine_name: String,
    port: u16,
    agent_id: Uuid,
    agent_secret: String,
}

/// The agent's secret file for one router and one identity.
#[derive(Clone)]
pub struct IdentityFile {
    path: PathBuf,
    router_url: String,
    machine_name: String,
    port: u16,
}

impl IdentityFile {
    /// Creates the state dir (mode 0700) if needed, so that a dir the agent
    /// cannot write stops it at start rather than at its first registration.
    pub fn open(
        state_dir: &Path,
        router_url: &str,
        machine_name: &str,
        port: u16,
    ) -> anyhow::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| {
                format!(
                    "cannot create the agent's state dir {}: give the agent a dir it can write with --state-dir",
                    state_dir.display()
                )
            })?;
        let name = format!(
            "identity-{}-{port}-{}.json",
            file_name_part(machine_name),
            file_name_part(router_url)
        );
        Ok(IdentityFile {
            path: state_dir.join(name),
            router_url: router_url.to_owned(),
            machine_name: machine_name.to_owned(),
            port,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The secret kept from an earlier run, if any. A file that cannot be
    /// read is reported and treated as absent: the router then says whether
    /// the identity needs it.
    pub fn load(&self) -> Option<String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "Cannot read the agent's secret file; registering without it.");
                return None;
            }
        };
        match serde_json::from_str::<StoredIdentity>(&text) {
            Ok(stored) => Some(stored.agent_secret),
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "The agent's secret file does not parse; registering without it.");
                None
            }
        }
    }

    /// Keeps a new secret: written to a temporary file of mode 0600,
    /// flushed to disk, then renamed over the old one, so that a crash
    /// leaves the old secret or the new one, never half of either. The
    /// writes and their two fsyncs run on tokio's blocking pool: an fsync
    /// can take tens of milliseconds on a busy disk, and the event loop
    /// that waited for it would stall the agent's heartbeats (and, with
    /// many agents in one process, every other agent's).
    pub async fn save(&self, agent_id: Uuid, agent_secret: &str) -> anyhow::Result<()> {
        let file = self.clone();
        let agent_secret = agent_secret.to_owned();
        tokio::task::spawn_blocking(move || file.save_blocking(agent_id, agent_secret))
            .await
            .context("the task writing the agent's secret stopped")?
            .with_context(|| format!("cannot write the agent's secret to {}", self.path.display()))
    }

    fn save_blocking(&self, agent_id: Uuid, agent_secret: String) -> std::io::Result<()> {
        let stored = StoredIdentity {
            router_url: self.router_url.clone(),
            machine_name: self.machine_name.clone(),
            port: self.port,
            agent_id,
            agent_secret,
        };
        let temporary = self.path.with_extension("json.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(serde_json::to_string_pretty(&stored)?.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The default state dir: systemd's `StateDirectory=` when set, else the
/// XDG state home, else `~/.local/state`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|dir| !dir.is_empty()) {
        // systemd may list several, separated by colons: the first is ours.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        return PathBuf::from(first);
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir).join("llm-router-agent");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/state/llm-router-agent")
}

/// Text made safe for a file name: letters, digits, dot and dash kept,
/// anything else an underscore.
fn file_name_part(text: &str) -> String {
    let text = text
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[tokio::test]
    async fn a_saved_secret_is_read_back_and_only_its_owner_can_read_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state_dir = dir.path().join("state");
        let file = IdentityFile::open(&state_dir, "http://127.0.0.1:8080", "gpu/01 ", 11434)
            .expect("open");
        assert_eq!(file.load(), None);
        let id = Uuid::new_v4();
        file.save(id, "llmr_agent_abc").await.expect("save");
        assert_eq!(file.load().as_deref(), Some("llmr_agent_abc"));
        let mode = |path: &Path| {
            std::fs::metadata(path)
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(file.path()), 0o600);
        assert_eq!(mode(&state_dir), 0o700);
        assert_eq!(
            file.path().file_name().and_then(|name| name.to_str()),
            Some("identity-gpu_01_-11434-127.0.0.1_8080.json")
        );
        file.save(id, "llmr_agent_def").await.expect("save again");
        assert_eq!(file.load().as_deref(), Some("llmr_agent_def"));
    }

    #[tokio::test]
    async fn another_router_or_port_has_a_file_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one =
            IdentityFile::open(dir.path(), "http://127.0.0.1:8080", "n", 11434).expect("open");
        let other_port =
            IdentityFile::open(dir.path(), "http://127.0.0.1:8080", "n", 8000).expect("open");
        let other_router =
            IdentityFile::open(dir.path(), "http://127.0.0.1:9090", "n", 11434).expect("open");
        one.save(Uuid::new_v4(), "s1").await.expect("save");
        assert_eq!(other_port.load(), None);
        assert_eq!(other_router.load(), None);
    }

    #[test]
    fn a_damaged_file_counts_as_no_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file =
            IdentityFile::open(dir.path(), "http://127.0.0.1:8080", "n", 11434).expect("open");
        std::fs::write(file.path(), "{not json").expect("write");
        assert_eq!(file.load(), None);
    }
}
