//! `llm-standin`: the stand-in LLM server as a process, for the Python
//! compatibility tests and the benchmarks, which start and kill it.

use std::time::Duration;

use clap::Parser;
use common::BackendKind;
use testkit::{StandIn, StandInOptions};

#[derive(Debug, Parser)]
#[command(about = "A stand-in Ollama / OpenAI-compatible server for tests.")]
struct Args {
    /// Which protocol to speak: ollama or openai.
    #[arg(long, default_value = "ollama")]
    kind: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Shown in every answer.
    #[arg(long, default_value = "standin")]
    name: String,
    /// Comma-separated model names.
    #[arg(long, default_value = "smollm2:135m")]
    models: String,
    /// Comma-separated models reported as loaded in memory.
    #[arg(long, default_value = "")]
    loaded: String,
    #[arg(long, default_value_t = 4)]
    chunks: usize,
    /// Milliseconds before each streamed chunk.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Hold streams after their first chunk until POST /standin/release.
    #[arg(long)]
    gated: bool,
}

fn split(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = match args.kind.as_str() {
        "ollama" => StandInOptions::ollama(&args.name, &[]),
        "openai" => StandInOptions::openai(&args.name, &[]),
        other => anyhow::bail!("--kind must be ollama or openai, not {other}"),
    };
    let options = StandInOptions {
        models: split(&args.models),
        loaded_models: split(&args.loaded),
        chunks: args.chunks,
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        gated: args.gated,
        kind: if args.kind == "openai" {
            BackendKind::OpenAi
        } else {
            BackendKind::Ollama
        },
        ..base
    };
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
    let standin = StandIn::serve(listener, options);
    // The one line a parent process reads to learn the port.
    println!("listening on {}", standin.address);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
