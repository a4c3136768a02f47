//! The commands, wired from the CLI to the library: logging, `.env`, the runtime, Ctrl-C, and
//! the one place an error becomes a message and an exit code.

use std::io::IsTerminal;
use std::path::Path;

use crate::cli::{Cli, Command, JobArgs, LogFormat, RunArgs};
use crate::error::{Error, EXIT_OK, EXIT_STOPPED};
use crate::job::{Job, Overrides, ProviderKind, ASSUMED_MAX_OUTPUT};
use crate::ledger::Index;
use crate::plan::{Decision, Planner};
use crate::provider::{self, is_loopback};
use crate::render::Renderer;
use crate::request::Builder;
use crate::schedule::{self, Interrupt, RunOptions, Signals};

pub fn main(cli: Cli) -> i32 {
    ignore_file_size_signal();
    // A .env in the working folder supplies the key without exporting it; an existing
    // variable wins over the file. Read before logging starts, so NO_COLOR there counts too.
    let _ = dotenvy::dotenv();
    init_logging(&cli);
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            e.exit_code()
        }
    }
}

fn report_error(e: &Error) {
    eprintln!("error: {e}");
    if let Some(h) = e.hint() {
        eprintln!("hint: {h}");
    }
}

fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        "warn"
    } else {
        match cli.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    // llama.cpp's own warnings (about the model file's metadata) are not the user's business.
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("PROMPTMILL_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("warn,promptmill={level},llama-cpp-2=error"))
        });
    // Colour is for a person at a terminal: a log file or a pipe gets plain text, and a
    // non-empty NO_COLOR (https://no-color.org) turns it off even at a terminal.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

fn dispatch(cli: Cli) -> Result<i32, Error> {
    let quiet = cli.quiet;
    let json_logs = cli.log_format == LogFormat::Json;
    match cli.command {
        Command::Run(args) if args.dry_run => estimate(&args.job, &overrides(&args)),
        Command::Run(args) => run(args, quiet, json_logs),
        Command::Estimate(args) => estimate(&args, &job_overrides(&args)),
        Command::Render { job, row } => render(&job, row),
        Command::Validate { job, input } => validate(&job, input),
        Command::FetchModel { list: true, .. } => {
            print!("{}", crate::models::list_models());
            Ok(EXIT_OK)
        }
        Command::FetchModel { name, .. } => {
            let p = crate::models::fetch_model(name.as_deref(), quiet)?;
            println!("{}", p.display());
            Ok(EXIT_OK)
        }
    }
}

fn job_overrides(a: &JobArgs) -> Overrides {
    Overrides {
        input: a.input.clone(),
        output: a.output.clone(),
        ..Default::default()
    }
}

fn overrides(a: &RunArgs) -> Overrides {
    Overrides {
        concurrency: a.concurrency,
        rpm: a.rpm,
        tpm: a.tpm,
        max_cost_usd: a.max_cost,
        ..job_overrides(&a.job)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))
}

fn run(args: RunArgs, quiet: bool, json_logs: bool) -> Result<i32, Error> {
    let job = Job::load(&args.job.job, &overrides(&args))?;
    let renderer = Renderer::new(&job)?;
    let backend = provider::build(&job, true)?;
    let opts = RunOptions {
        limit: args.job.limit,
        fresh: args.fresh,
        retry_failed: args.retry_failed,
        quiet,
    };
    let output = job.output.clone();
    let csv = job.csv.clone();
    let summary_path = job.summary_path();
    let grace = job.shutdown_grace;
    let rt = runtime()?;
    let (summary, code) = rt.block_on(async move {
        let signals = Signals::default();
        listen_for_signals(&signals, grace)?;
        schedule::run(job, opts, backend, renderer, signals).await
    })?;
    rt.shutdown_background();
    let csv = csv.map(|c| c.display().to_string());
    if json_logs {
        // Log collectors get the summary as one structured event, not a table.
        let fields = serde_json::to_string(&summary).unwrap_or_default();
        tracing::info!(summary = %fields, output = %output.display(), csv = ?csv, "run finished");
        return Ok(code);
    }
    if !quiet || code != EXIT_OK {
        eprint!("{}", summary.table());
    }
    eprintln!("output: {}", output.display());
    if let Some(c) = csv {
        eprintln!("csv: {c}");
    }
    eprintln!("summary: {}", summary_path.display());
    Ok(code)
}

/// Ctrl-C and SIGTERM (systemd, docker stop, Kubernetes, `timeout`) stop the run the same
/// way: no new requests, those in flight get `grace`, a second signal cancels them; every
/// record received is written and the summary printed either way.
fn listen_for_signals(signals: &Signals, grace: std::time::Duration) -> Result<(), Error> {
    let s = signals.clone();
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            s.interrupt(Interrupt::CtrlC, grace);
        }
    });
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::Other(format!("cannot listen for SIGTERM: {e}")))?;
        let s = signals.clone();
        tokio::spawn(async move {
            while term.recv().await.is_some() {
                s.interrupt(Interrupt::Term, grace);
            }
        });
    }
    Ok(())
}

/// A file-size limit (`ulimit -f`) must be an I/O error the writer can stop on, not a
/// signal that kills the process with rows in flight.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN at start-up, before any thread runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn estimate(args: &JobArgs, ov: &Overrides) -> Result<i32, Error> {
    let job = Job::load(&args.job, ov)?;
    let renderer = Renderer::new(&job)?;
    let backend = provider::build(&job, false)?;
    let keying = schedule::keying(&job);
    let index = Index::load(&job.output, keying)?.with_stale(&job.stale_path(), keying)?;
    let mean_completion = index.mean_completion_tokens;
    // The run's own planner, so "rows to send" is what `run` would send.
    let mut planner = Planner::new(index, keying, false, None);
    let builder = Builder::new(&job, &backend.identity);
    let price = backend.price_for(None, &job.model);
    let max_out = job.params.max_output_tokens();
    let (mut rows, mut bad, mut done, mut copies, mut prompt, mut prompt_todo, mut to_send) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for r in job.source().reader()? {
        if args.limit.is_some_and(|l| rows >= l) {
            break;
        }
        rows += 1;
        let Ok(row) = r else {
            bad += 1;
            continue;
        };
        let Ok(p) = builder.prepare(&job.input, &renderer, row) else {
            bad += 1;
            continue;
        };
        let n = backend.counter.count_prompt(&p.request.messages);
        prompt += n;
        match planner.plan(&p)? {
            Decision::Send => {
                to_send += 1;
                prompt_todo += n;
            }
            Decision::Copy => copies += 1,
            Decision::Done | Decision::DoneFailed | Decision::WriteError => done += 1,
        }
    }
    let out_cap = max_out.unwrap_or(ASSUMED_MAX_OUTPUT);
    // Expected output: what earlier rows of this job really used, else half the cap.
    let (expected_out, basis) = match mean_completion {
        Some(m) => (m, "the mean of earlier rows of this output"),
        None => (out_cap as f64 / 2.0, "assumed: half of max_tokens"),
    };
    let usd = |v: Option<f64>| {
        v.map(|c| format!("${c:.6}"))
            .unwrap_or_else(|| "unknown (no price for this model; set [pricing])".into())
    };
    let bound = price.map(|p| p.bound(prompt_todo, out_cap * to_send));
    let expected = price
        .map(|p| (prompt_todo as f64 * p.input + expected_out * to_send as f64 * p.output) / 1e6);
    println!("job               {}", job.file.display());
    println!("model             {}", job.model);
    println!("rows              {rows} ({bad} unreadable or unrenderable)");
    println!("already done      {done}");
    println!("same request      {copies} (copied from another row, not sent)");
    println!("rows to send      {to_send}");
    println!("prompt tokens     {prompt} (to send: {prompt_todo})");
    println!(
        "max output tokens {}{}",
        out_cap * to_send,
        if max_out.is_none() {
            format!(" (no max_tokens set: {ASSUMED_MAX_OUTPUT} per row assumed)")
        } else {
            String::new()
        }
    );
    println!(
        "cost bound        {} (every row uses all of max_tokens)",
        usd(bound)
    );
    println!(
        "expected cost     {} ({expected_out:.0} output tokens per row, {basis})",
        usd(expected)
    );
    Ok(EXIT_OK)
}

fn render(args: &JobArgs, row: u64) -> Result<i32, Error> {
    let job = Job::load(&args.job, &job_overrides(args))?;
    let renderer = Renderer::new(&job)?;
    let backend = provider::build(&job, false)?;
    let builder = Builder::new(&job, &backend.identity);
    let source = job.source();
    for r in source.reader()? {
        let number = match &r {
            Ok(r) => r.number,
            Err(e) => e.number,
        };
        if number != row {
            continue;
        }
        let r = r.map_err(|e| Error::Input {
            path: job.input.clone(),
            message: e.message,
        })?;
        let p = builder
            .prepare(&job.input, &renderer, r)
            .map_err(|(_, m)| Error::Input {
                path: job.input.clone(),
                message: m,
            })?;
        for m in &p.request.messages {
            match &m.name {
                Some(n) => println!("--- {} ({n})", m.role.as_str()),
                None => println!("--- {}", m.role.as_str()),
            }
            println!("{}", m.content);
        }
        println!("--- fingerprint {}", crate::request::hex(&p.fingerprint));
        return Ok(EXIT_OK);
    }
    Err(Error::Input {
        path: job.input.clone(),
        message: format!("there is no row {row}"),
    })
}

/// Lists every problem, each with its location, rather than stopping at the first.
fn validate(path: &Path, input: Option<std::path::PathBuf>) -> Result<i32, Error> {
    let job = Job::load(
        path,
        &Overrides {
            input,
            ..Default::default()
        },
    )?;
    let mut problems = Vec::new();
    let renderer = match Renderer::new(&job) {
        Ok(r) => Some(r),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let source = job.source();
    let columns = match source.columns() {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    if let (Some(r), Some(cols)) = (&renderer, &columns) {
        for (var, template) in r.variables() {
            if !cols.contains(&var) {
                problems.push(format!(
                    "template {template}: variable `{var}` is not a column of {} (columns: {})",
                    crate::input::describe(&job.input),
                    cols.join(", ")
                ));
            }
        }
    }
    if job.provider == ProviderKind::Openai
        && std::env::var(&job.api_key_env).is_err()
        && !is_loopback(&job.base_url)
    {
        problems.push(format!(
            "{}: the API key variable {} is not set (environment or .env)",
            path.display(),
            job.api_key_env
        ));
    }
    if job.provider == ProviderKind::Local {
        if let Ok(p) = provider::local_model_path(&job) {
            if !p.is_file() {
                problems.push(format!(
                    "model {}: not found; run `promptmill fetch-model`",
                    p.display()
                ));
            }
        }
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        Ok(EXIT_OK)
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{} problem(s)", problems.len());
        Ok(EXIT_STOPPED)
    }
}
