//! A throwaway PostgreSQL for tests and benchmarks: Debian's server binaries,
//! a fresh cluster (`initdb`) in a temporary directory, listening on a free
//! port of 127.0.0.1 only, removed when dropped. PostgreSQL refuses to run
//! as root, so as root the server runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Server settings a cluster starts with.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// PEM certificate and key to serve TLS with (`ssl=on`).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// More `-c name=value` settings (such as
    /// `shared_preload_libraries=pg_stat_statements`).
    pub settings: Vec<String>,
}

pub struct PostgresCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    options: ClusterOptions,
    databases: AtomicU32,
}

fn run_as_server_user(program: &Path, args: &[&str]) -> Output {
    let mut command = if nix_is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    };
    command
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", program.display()))
}

fn nix_is_root() -> bool {
    // The owner of /proc/self is the effective user.
    std::fs::metadata("/proc/self")
        .map(|meta| std::os::unix::fs::MetadataExt::uid(&meta) == 0)
        .unwrap_or(false)
}

/// The directory of `initdb`, `pg_ctl` and `psql`: Debian keeps them per
/// version under /usr/lib/postgresql; the newest is taken.
fn server_binaries() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path().join("bin"))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|path| {
        path.parent()
            .and_then(|version| version.file_name())
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().unwrap_or_else(|| {
        panic!("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install postgresql, or run scripts/test.sh, which does")
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

impl PostgresCluster {
    pub fn start() -> Self {
        // Durable as in production (fsync, synchronous commit): tests stop
        // the server with `-m immediate`, as a crash would, and count on
        // every acknowledged commit surviving it.
        Self::start_with(ClusterOptions::default())
    }

    pub fn start_with(options: ClusterOptions) -> Self {
        let bin = server_binaries();
        let dir = std::env::temp_dir().join(format!(
            "llm-router-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster dir");
        if nix_is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown of {} failed", dir.display());
        }
        let data = dir.join("data");
        let output = run_as_server_user(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if let Some((cert, key)) = &options.tls {
            // The server reads them as its own user, the key with mode 0600.
            for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(name)).expect("copy TLS file");
            }
            std::fs::set_permissions(
                data.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .expect("key mode");
            if nix_is_root() {
                let _ = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(data.join("server.crt"))
                    .arg(data.join("server.key"))
                    .status();
            }
        }
        let mut cluster = PostgresCluster {
            dir,
            bin,
            port: 0,
            options,
            databases: AtomicU32::new(0),
        };
        // A port found free may be taken before the server binds it: try again.
        for _ in 0..5 {
            cluster.port = free_port();
            if cluster.try_start() {
                return cluster;
            }
        }
        panic!(
            "PostgreSQL did not start: see {}",
            cluster.log_path().display()
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn try_start(&self) -> bool {
        let mut settings = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.display()
        );
        if self.options.tls.is_some() {
            settings.push_str(" -c ssl=on");
        }
        for setting in &self.options.settings {
            settings.push_str(" -c ");
            settings.push_str(setting);
        }
        let data = self.dir.join("data");
        let log = self.log_path();
        let output = run_as_server_user(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-l",
                log.to_str().expect("utf-8 path"),
                "-o",
                &settings,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        output.status.success()
    }

    /// Starts the server again after [`PostgresCluster::stop`], on the same port.
    pub fn start_again(&self) {
        assert!(
            self.try_start(),
            "PostgreSQL did not start again: see {}",
            self.log_path().display()
        );
    }

    /// Stops the server at once (`-m immediate`: as a crash would).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let _ = run_as_server_user(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of a database in this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database; returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "registry_{}",
            self.databases.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs SQL with psql and returns its unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .expect("psql");
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
