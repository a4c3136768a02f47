//! The commands, wired from the CLI to the library: logging, `.env`, the runtime, Ctrl-C, and
//! the one place an error becomes a message and an exit code.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, JobArgs, LogFormat, RunArgs};
use crate::cost::Price;
use crate::error::{Error, EXIT_OK, EXIT_STOPPED};
use crate::job::{Job, Overrides, ProviderKind};
use crate::journal;
use crate::provider::openai::{ApiKey, OpenAi};
use crate::render::Renderer;
use crate::schedule::{self, Backend, RunOptions, ASSUMED_MAX_OUTPUT};

pub fn main(cli: Cli) -> i32 {
    init_logging(&cli);
    // A .env in the working folder supplies the key without exporting it; an existing
    // variable wins over the file.
    let _ = dotenvy::dotenv();
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
        Command::FetchModel => {
            let p = crate::models::fetch_default_model(quiet)?;
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

/// The provider for the job, and the tokenizer whose counts match it. Checks the key (HTTP)
/// or loads the model (local) before anything is sent.
fn backend(job: &Job, need_provider: bool) -> Result<Backend, Error> {
    let pricing = job.pricing.map(Price::from);
    match job.provider {
        ProviderKind::Openai => {
            let counter = Arc::new(crate::tokens::Tiktoken::new(&job.model));
            let provider: Arc<dyn crate::provider::Provider> = if need_provider {
                let key = std::env::var(&job.api_key_env)
                    .ok()
                    .filter(|k| !k.trim().is_empty());
                // Local servers (llama.cpp, Ollama, vLLM on this machine) usually need no key.
                if key.is_none() && !is_loopback(&job.base_url) {
                    return Err(Error::MissingKey {
                        var: job.api_key_env.clone(),
                    });
                }
                let stream = job.params.stream.unwrap_or(false);
                Arc::new(
                    OpenAi::new(
                        &job.base_url,
                        key.map(ApiKey::new),
                        job.timeout,
                        job.concurrency,
                        stream,
                    )
                    .map_err(Error::Other)?,
                )
            } else {
                Arc::new(NoProvider)
            };
            Ok(Backend {
                provider,
                counter,
                pricing,
            })
        }
        ProviderKind::Local => local_backend(job, pricing),
    }
}

#[cfg(feature = "local")]
fn local_backend(job: &Job, pricing: Option<Price>) -> Result<Backend, Error> {
    let path = job.model_path.clone().ok_or_else(|| Error::Model {
        path: "(no path)".into(),
        message: "no model path and no cache folder (set HOME or PROMPTMILL_MODEL_DIR)".into(),
    })?;
    let model = crate::provider::local::LocalModel::load(
        &path,
        &job.model,
        &job.params,
        job.concurrency,
        job.context_tokens,
    )?;
    Ok(Backend {
        provider: model.clone(),
        counter: model,
        pricing,
    })
}

#[cfg(not(feature = "local"))]
fn local_backend(job: &Job, _pricing: Option<Price>) -> Result<Backend, Error> {
    Err(Error::Job {
        path: job.file.clone(),
        field: "model.provider".into(),
        message:
            "this promptmill was built without the `local` feature; rebuild with default features"
                .into(),
    })
}

/// Stands in for the provider where nothing is sent (estimate, render).
struct NoProvider;

impl crate::provider::Provider for NoProvider {
    fn complete<'a>(
        &'a self,
        _req: &'a crate::provider::Request,
    ) -> futures::future::BoxFuture<
        'a,
        Result<crate::provider::Completion, crate::provider::ProviderError>,
    > {
        Box::pin(async {
            Err(crate::provider::ProviderError::new(
                crate::provider::ErrorKind::BadRequest,
                "nothing is sent in this mode",
            ))
        })
    }
}

fn is_loopback(url: &str) -> bool {
    let rest = url.split("://").nth(1).unwrap_or("");
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or("")
    };
    host == "localhost" || host.starts_with("127.") || host == "::1"
}

fn run(args: RunArgs, quiet: bool, json_logs: bool) -> Result<i32, Error> {
    let job = Job::load(&args.job.job, &overrides(&args))?;
    let renderer = Renderer::new(&job)?;
    let backend = backend(&job, true)?;
    let opts = RunOptions {
        limit: args.job.limit,
        fresh: args.fresh,
        retry_failed: args.retry_failed,
        quiet,
    };
    let output = job.output.clone();
    let csv = job.csv.clone();
    let summary_path = job.summary_path();
    let rt = runtime()?;
    let (summary, code) = rt.block_on(async move {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!("interrupted: no new requests; waiting for those in flight (Ctrl-C again to quit now)");
                c.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    // Everything finished is already in the journal; the rerun resumes.
                    std::process::exit(crate::error::EXIT_INTERRUPTED);
                }
            }
        });
        schedule::run(job, opts, backend, renderer, cancel).await
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

fn estimate(args: &JobArgs, ov: &Overrides) -> Result<i32, Error> {
    let job = Job::load(&args.job, ov)?;
    let renderer = Renderer::new(&job)?;
    let backend = backend(&job, false)?;
    let resume = journal::load(&job.output)?;
    let source = job.source();
    let price = backend.price_for(None, &job.model);
    let max_out = job.params.max_output_tokens();
    let (mut rows, mut bad, mut done, mut prompt, mut prompt_todo, mut to_send) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for r in source.reader()? {
        if args.limit.is_some_and(|l| rows >= l) {
            break;
        }
        rows += 1;
        let Ok(row) = r else {
            bad += 1;
            continue;
        };
        let number = row.number;
        let Ok(p) = schedule::prepare(&job, &renderer, row) else {
            bad += 1;
            continue;
        };
        let n = backend.counter.count_prompt(&p.request.messages);
        prompt += n;
        let d = resume.get(number);
        let fp = journal::fingerprint_bytes(&p.fingerprint);
        if d.is_some_and(|d| d.ok && d.fingerprint == fp) {
            done += 1;
        } else {
            to_send += 1;
            prompt_todo += n;
        }
    }
    let out_cap = max_out.unwrap_or(ASSUMED_MAX_OUTPUT);
    // Expected output: what earlier rows of this job really used, else half the cap.
    let (expected_out, basis) = match resume.mean_completion_tokens {
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
        let p = schedule::prepare(&job, &renderer, r).map_err(|(_, m)| Error::Input {
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
        println!("--- fingerprint {}", p.fingerprint);
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
        if let Some(p) = &job.model_path {
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
