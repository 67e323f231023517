//! The `llm-router` binary: parse the command line; without a command,
//! start logging, bind and serve; with one, talk to a running router.

use clap::Parser;
use coordinator::cli::Cli;
use coordinator::LogFormat;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The main thread's runtime is one event loop; `run` starts one more per
/// remaining core (see `coordinator::run`).
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match serve_or_run_command().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line, the cause chain included, and no backtrace: these
            // are the operator's errors (a port in use, a data dir), and each
            // message says what to do.
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve_or_run_command() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        return coordinator::cli::run_command(command).await;
    }
    let config = cli.serve;
    init_tracing(config.log_format);
    no_transparent_huge_pages();
    survive_file_size_limit();
    raise_descriptor_limit();
    let address = config.listen_address()?;
    // Held until the process ends: no other router may serve this port.
    let (listener, _port_lock) = coordinator::listen::listen_exclusively(address)?;
    coordinator::run(listener, config, shutdown_signal()).await
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// A write past the file-size limit (`ulimit -f`) raises SIGXFSZ, which
/// kills a process by default. Catching it turns that write into an error
/// (EFBIG) that the store handles like a full disk: 503, nothing
/// half-written, and writes work again once the limit is raised.
fn survive_file_size_limit() {
    let signal =
        tokio::signal::unix::SignalKind::from_raw(nix::sys::signal::Signal::SIGXFSZ as i32);
    match tokio::signal::unix::signal(signal) {
        // tokio keeps its handler installed for the process's life, even
        // once the stream is dropped; the signal then only wakes nobody.
        Ok(stream) => drop(stream),
        Err(error) => tracing::warn!(%error, "Could not catch SIGXFSZ."),
    }
}

/// Transparent huge pages cost this process more than they give: the
/// kernel zeroes 2 MiB for the first touch of any part of one, which was
/// half the time of loading a 100,000-agent registry (perf: clear_page_erms
/// under do_huge_pmd_anonymous_page), and a sparsely used huge page counts
/// whole in memory. mimalloc is built not to ask for them (`no_thp`); this
/// also declines them where the system hands them out unasked ("always").
fn no_transparent_huge_pages() {
    if let Err(error) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(%error, "Could not decline transparent huge pages.");
    }
}

/// Every client, agent and node connection is a file descriptor, and the
/// soft limit is often 1,024 while the hard one is far higher: raise the
/// soft limit to the hard one, as nginx does (`worker_rlimit_nofile`).
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "Could not raise the file descriptor limit.");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "Could not read the file descriptor limit."),
    }
}

/// Completes on ctrl-c or SIGTERM. The handlers are installed here, before
/// the router says it is listening, so that a SIGTERM sent as soon as it
/// does is a clean shutdown rather than the default kill.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    async move {
        let ctrl_c = async {
            match interrupt.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let terminate = async {
            match terminate.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = ctrl_c => {},
            () = terminate => {},
        }
    }
}
