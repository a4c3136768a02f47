//! The `fake_openai` binary: serve the fake API on a port until SIGTERM/ctrl-c, then print Stats.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use clap::Parser;
use fake_openai::{Config, FakeServer};

/// OpenAI-compatible fake chat completions server for tests and benchmarks.
#[derive(Parser, Debug)]
#[command(name = "fake_openai")]
struct Args {
    /// Port to listen on (0 = pick a free one; the chosen URL is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Requests per minute (unlimited if absent).
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute (unlimited if absent).
    #[arg(long)]
    tpm: Option<u64>,
    /// Sliding rate-limit window in seconds.
    #[arg(long, default_value_t = 10.0)]
    window_s: f64,
    /// Model name reported in answers (default: echo the request's model).
    #[arg(long)]
    model: Option<String>,
    /// Require `Authorization: Bearer KEY` (the batch and file routes also take `api-key: KEY`).
    #[arg(long)]
    require_key: Option<String>,
    /// Answer 500 to every n-th request.
    #[arg(long)]
    fail_every: Option<u64>,
    /// Do not keep request bodies in memory (for long benchmarks).
    #[arg(long)]
    no_record: bool,
    /// Never report usage (as if every request carried `FAULT:nousage`).
    #[arg(long)]
    omit_usage: bool,
    /// Batches move one step each time a client retrieves them (`GET /v1/batches/{id}`).
    /// Without it they move only on `POST /_fake/batches/advance` (one step for every batch),
    /// `/_fake/batches/complete` (until all are finished) or `/_fake/batches/expire`.
    #[arg(long)]
    batch_auto: bool,
    /// Lines of an in-progress batch answered per step (default: all in one step).
    #[arg(long, value_name = "N")]
    batch_lines_per_step: Option<usize>,
    /// Refuse uploaded files larger than this many bytes (400, code file_too_large).
    #[arg(long, value_name = "BYTES")]
    batch_max_file_bytes: Option<u64>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let a = Args::parse();
    let config = Config {
        latency_ms: a.latency_ms,
        rpm: a.rpm,
        tpm: a.tpm,
        window_s: a.window_s,
        model: a.model,
        require_key: a.require_key,
        fail_every: a.fail_every,
        record_bodies: !a.no_record,
        omit_usage: a.omit_usage,
        batch_max_file_bytes: a.batch_max_file_bytes,
        batch_auto_advance: a.batch_auto,
        batch_lines_per_step: a.batch_lines_per_step,
        ..Config::default()
    };
    let server = FakeServer::start_on(config, SocketAddr::new(a.host, a.port)).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.base_url())?;
        out.flush()?;
    }
    wait_for_signal().await;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", server.stats().to_json())?;
    out.flush()?;
    // Exit now rather than waiting for open connections (e.g. a `hang`) to finish.
    std::process::exit(0)
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
