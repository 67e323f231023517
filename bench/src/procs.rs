//! Starting and stopping what the benchmarks measure: our release binaries,
//! the stand-in, and nginx. Every child is killed when its handle drops, so
//! a run leaves no process behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut command: Command, log_dir: &Path) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{name}-{}.log", rand::random::<u32>()));
        let file = std::fs::File::create(&log)?;
        let child = command
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child,
            log,
            name: name.to_owned(),
        })
    }

    /// Waits for the "listening on ADDRESS" line our binaries print.
    pub fn wait_listening(&mut self) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(rest) = text.split("listening on ").nth(1) {
                let word = rest.split_whitespace().next().unwrap_or_default();
                return Ok(word.trim_start_matches("http://").parse()?);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{} exited ({status}): {text}", self.name);
            }
            if Instant::now() > deadline {
                bail!("{} did not start: {text}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(self.pid(), signal);
    }

    /// Resident memory, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|line| line.starts_with("VmRSS:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    /// SIGTERM first, so that a process with children of its own (nginx's
    /// master and its workers) takes them down with it; SIGKILL if it has
    /// not exited within a few seconds.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(nix::sys::signal::Signal::SIGTERM);
            if self.wait_exit(Duration::from_secs(10)).is_err() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// Where the release binaries are.
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    pub fn router(
        &self,
        data_dir: &Path,
        extra: &[&str],
        log_dir: &Path,
    ) -> anyhow::Result<(Proc, SocketAddr)> {
        let mut command = Command::new(self.dir.join("llm-router"));
        command
            .args(["--host", "127.0.0.1", "--port", "0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            // BENCH_ROUTER_ARGS: more arguments for every router started, to
            // compare settings (e.g. "--threads 1") without a rebuild.
            .args(
                std::env::var("BENCH_ROUTER_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .env("RUST_LOG", "warn,coordinator=info");
        let mut proc = Proc::spawn("router", command, log_dir)?;
        let address = proc.wait_listening()?;
        Ok((proc, address))
    }

    pub fn standin(
        &self,
        name: &str,
        args: &[&str],
        log_dir: &Path,
    ) -> anyhow::Result<(Proc, SocketAddr)> {
        let mut command = Command::new(self.dir.join("llm-standin"));
        command.args(["--name", name]).args(args);
        let mut proc = Proc::spawn(name, command, log_dir)?;
        let address = proc.wait_listening()?;
        Ok((proc, address))
    }

    pub fn agent(
        &self,
        router: SocketAddr,
        backend: SocketAddr,
        name: &str,
        interval: &str,
        log_dir: &Path,
    ) -> anyhow::Result<Proc> {
        let mut command = Command::new(self.dir.join("llm-router-agent"));
        command
            .args(["--router-url", &format!("http://{router}")])
            .args(["--backend-url", &format!("http://{backend}")])
            .args(["--machine-name", name, "--heartbeat-interval", interval])
            .arg("--state-dir")
            .arg(log_dir.join("agent-state"));
        Proc::spawn(name, command, log_dir)
    }
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// nginx from Debian's packages, as two instances (two sets of processes):
/// a fast LLM server answering every request with a fixed non-streamed
/// Ollama generate answer, and a reverse proxy to it with pooled upstream
/// connections (what the router is compared with). Two instances, because
/// inside one the proxy would reach the server without ever waking another
/// process, a shortcut the router, a process of its own, cannot take.
pub struct Nginx {
    _server_proc: Proc,
    pub proxy_proc: Proc,
    pub server: SocketAddr,
    pub proxy: SocketAddr,
}

pub const FIXED_ANSWER: &str = r#"{"model":"bench","created_at":"2026-01-01T00:00:00Z","response":"Hello from nginx","done":true}"#;

impl Nginx {
    pub fn start(work_dir: &Path) -> anyhow::Result<Self> {
        let server = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let server_block = format!(
            r#"server {{
        listen {server};
        location / {{
            default_type application/json;
            return 200 '{FIXED_ANSWER}';
        }}
    }}"#
        );
        let proxy_block = format!(
            r#"upstream llm {{ server {server}; keepalive 512; }}
    server {{
        listen {proxy};
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"#
        );
        let server_proc = start_instance(work_dir, "nginx-server", &server_block)?;
        let proxy_proc = start_instance(work_dir, "nginx-proxy", &proxy_block)?;
        for address in [server, proxy] {
            wait_for_port(address)?;
        }
        Ok(Nginx {
            _server_proc: server_proc,
            proxy_proc,
            server,
            proxy,
        })
    }
}

/// nginx's stream module as a plain TCP relay in front of a server: each
/// client connection gets its own connection to the server, and bytes are
/// copied both ways without reading any HTTP. No HTTP proxy can do less per
/// request, so its throughput is the ceiling of what any router can reach
/// on this machine under the same load: the floor of the proxy's own cost.
pub struct Relay {
    pub proc: Proc,
    pub address: SocketAddr,
}

/// Where Debian's `libnginx-mod-stream` puts the module.
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

impl Relay {
    pub fn start(work_dir: &Path, server: SocketAddr) -> anyhow::Result<Self> {
        if !Path::new(STREAM_MODULE).exists() {
            bail!("nginx's stream module is missing ({STREAM_MODULE}): scripts/bench.sh installs it (apt-get install libnginx-mod-stream)");
        }
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let dir = work_dir.join("nginx-relay");
        std::fs::create_dir_all(&dir)?;
        let config = format!(
            r#"load_module {STREAM_MODULE};
worker_processes auto;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
stream {{
    server {{
        listen {address};
        proxy_pass {server};
    }}
}}
"#,
            dir = dir.display()
        );
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(nginx_binary()?);
        command.arg("-c").arg(&config_path).arg("-p").arg(&dir);
        let proc = Proc::spawn("nginx-relay", command, work_dir)?;
        wait_for_port(address)?;
        Ok(Relay { proc, address })
    }
}

/// CPU time in seconds, in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: f64,
    pub kernel: f64,
}

impl std::ops::Sub for CpuTime {
    type Output = CpuTime;

    fn sub(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - earlier.user,
            kernel: self.kernel - earlier.kernel,
        }
    }
}

impl std::ops::AddAssign for CpuTime {
    fn add_assign(&mut self, more: CpuTime) {
        self.user += more.user;
        self.kernel += more.kernel;
    }
}

/// CPU time of process `pid` and its children (nginx's master and its
/// workers; a router and its threads).
pub fn cpu_time(pid: u32) -> CpuTime {
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let children: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|child| child.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    let mut total = CpuTime::default();
    for pid in std::iter::once(pid).chain(children) {
        let (user, kernel) = cpu_ticks(pid);
        total += CpuTime {
            user: user as f64 / ticks_per_second,
            kernel: kernel as f64 / ticks_per_second,
        };
    }
    total
}

/// utime and stime of one process (its threads included), from /proc.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis, from the state
    // (field 3) on: utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|field| field.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11), ticks(12))
}

fn nginx_binary() -> anyhow::Result<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nginx is not installed (scripts/bench.sh installs it)")
}

fn start_instance(work_dir: &Path, name: &str, blocks: &str) -> anyhow::Result<Proc> {
    let binary = nginx_binary()?;
    let dir = work_dir.join(name);
    std::fs::create_dir_all(dir.join("tmp"))?;
    let config = format!(
        r#"worker_processes auto;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    keepalive_requests 1000000;
    {blocks}
}}
"#,
        dir = dir.display()
    );
    let config_path = dir.join("nginx.conf");
    std::fs::write(&config_path, config)?;
    let mut command = Command::new(binary);
    command.arg("-c").arg(&config_path).arg("-p").arg(&dir);
    Proc::spawn(name, command, work_dir)
}

pub fn wait_for_port(address: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(address).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {address}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
