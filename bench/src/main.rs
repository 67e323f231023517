//! `llm-router-bench`: starts the release router, nginx (as the comparison
//! proxy and as a fast fixed-response LLM server), stand-ins and agents on
//! 127.0.0.1, drives each scenario of the performance issue, and prints every
//! figure and ratio as the median of several runs. Leaves no process behind.

mod load;
mod peers;
mod procs;
mod scenarios;
mod shared;

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks llm-router against its targets and against nginx.")]
struct Args {
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Runs of the whole suite; figures are medians over runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds each throughput measurement lasts.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Agents registered for the heartbeat, memory and start-up scenarios.
    #[arg(long, default_value_t = 100_000)]
    fleet: u64,
    /// Connections the heartbeat and /health loads use: the closed-loop
    /// load at which heartbeats pass 50,000/s on 2 cores shared with this
    /// generator; more only queues (see BENCHMARKS.md).
    #[arg(long, default_value_t = 48)]
    heartbeat_connections: usize,
    /// Threads of the load generator (it shares the machine with the router).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Only these scenarios (comma-separated: registry,storm,proxy,peers,failure,churn,shared); all when empty.
    #[arg(long, default_value = "")]
    only: String,
    /// The bin directory of the virtualenv holding smg, sglang-router and
    /// vllm-router (default: $PEERS_VENV/bin, else
    /// ~/.cache/llm-router-bench/peers/bin, where scripts/bench.sh puts them).
    #[arg(long)]
    peers_dir: Option<PathBuf>,
    /// Write every request of every load into DIR/load-NNN.tsv (start,
    /// latency, connection), to see when the slow ones happened:
    /// `python3 scripts/latency-windows.py DIR/load-001.tsv`.
    #[arg(long, value_name = "DIR")]
    trace_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.trace_dir {
        load::trace_into(dir.clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    let selected: Vec<&str> = args
        .only
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let wants = |name: &str| selected.is_empty() || selected.contains(&name);
    let context = scenarios::Context {
        binaries: procs::Binaries {
            dir: args.bin_dir.clone(),
        },
        seconds: args.seconds,
        fleet: args.fleet,
        heartbeat_connections: args.heartbeat_connections,
    };
    let mut runs: Vec<BTreeMap<&'static str, f64>> = Vec::new();
    for run in 1..=args.runs {
        eprintln!("== run {run} of {}", args.runs);
        let work = tempfile::tempdir()?;
        // BENCH_KEEP=1 keeps every log and data dir for a look afterwards.
        let work_path = work.path().to_path_buf();
        let work = if std::env::var_os("BENCH_KEEP").is_some() {
            eprintln!("   keeping {}", work_path.display());
            std::mem::forget(work);
            None
        } else {
            Some(work)
        };
        let mut figures = BTreeMap::new();
        runtime.block_on(async {
            if wants("registry") {
                scenarios::registry(&context, &work_path, &mut figures).await?;
            }
            if wants("storm") {
                scenarios::storm(&context, &work_path, &mut figures).await?;
            }
            if wants("proxy") {
                scenarios::proxy(&context, &work_path, &mut figures).await?;
            }
            if wants("peers") {
                let peers_dir = args
                    .peers_dir
                    .clone()
                    .unwrap_or_else(peers::default_peers_dir);
                peers::peers(&context, &peers_dir, &work_path, &mut figures).await?;
            }
            if wants("failure") {
                scenarios::failure(&context, &work_path, &mut figures).await?;
            }
            if wants("churn") {
                scenarios::churn(&context, &work_path, &mut figures).await?;
            }
            if wants("shared") {
                shared::shared(&context, &work_path, &mut figures).await?;
            }
            anyhow::Ok(())
        })?;
        for (name, value) in &figures {
            eprintln!("   {name:<32} {value:>14.3}");
        }
        runs.push(figures);
        drop(work);
    }
    print_report(&runs);
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// One decimal, two below 10 (a ratio of 0.92 is not 0.9).
fn shown(value: f64) -> String {
    if value.abs() < 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.1}")
    }
}

fn print_report(runs: &[BTreeMap<&'static str, f64>]) {
    let mut names: Vec<&'static str> = runs.iter().flat_map(|r| r.keys().copied()).collect();
    names.sort_unstable();
    names.dedup();
    let medians: BTreeMap<&str, f64> = names
        .iter()
        .map(|name| {
            (
                *name,
                median(runs.iter().filter_map(|r| r.get(name).copied()).collect()),
            )
        })
        .collect();
    println!("\n| figure | median of {} runs | each run |", runs.len());
    println!("|---|---:|---|");
    for name in &names {
        let each: Vec<String> = runs
            .iter()
            .filter_map(|r| r.get(name))
            .map(|v| shown(*v))
            .collect();
        println!(
            "| {name} | {} | {} |",
            shown(medians[name]),
            each.join(", ")
        );
    }
    println!("\n| target | measured | met |");
    println!("|---|---|---|");
    for check in scenarios::targets() {
        let value = medians.get(check.figure).copied();
        let verdict = match value {
            Some(v) if (check.met)(v) => "yes",
            Some(_) => "NO",
            None => "not run",
        };
        let shown = value.map_or_else(
            || "-".to_owned(),
            |v| format!("{} {}", shown(v), check.unit),
        );
        println!("| {} | {shown} | {verdict} |", check.description);
    }
}
