//! The commands, wired from the CLI to the library: logging, `.env`, the runtime, Ctrl-C, and
//! the one place an error becomes a message and an exit code.

mod estimate;
mod inspect;
mod outputs;
mod run;
mod status;
mod stored;

use std::io::IsTerminal;

use crate::cli::{Cli, Command, JobArgs, LogFormat, RunArgs};
use crate::error::{Error, EXIT_OK};
use crate::exec::RunOptions;
use crate::job::Overrides;
use crate::shard::Shard;

use estimate::estimate;
use inspect::{render, validate};
use outputs::{export, merge, report, status};
use run::{batch, passes, run};

pub fn main(cli: Cli) -> i32 {
    ignore_file_size_signal();
    // A .env in the working folder supplies the key without exporting it; an existing
    // variable wins over the file. Read before logging starts, so NO_COLOR there counts too.
    // Only the working folder's: `dotenvy::dotenv()` would walk up to a parent's `.env`, whose
    // OPENAI_BASE_URL could send the key somewhere else.
    let _ = dotenvy::from_path(".env");
    init_logging(&cli);
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            e.exit_code()
        }
    }
}

pub(super) fn report_error(e: &Error) {
    eprintln!("error: {e}");
    if let Some(h) = e.hint() {
        eprintln!("hint: {h}");
    }
}

pub(super) fn init_logging(cli: &Cli) {
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

pub(super) fn dispatch(cli: Cli) -> Result<i32, Error> {
    let quiet = cli.quiet;
    let json_logs = cli.log_format == LogFormat::Json;
    match cli.command {
        Command::Run(args) if args.dry_run => {
            estimate(&args.job, &overrides(&args)?, args.retry_failed)
        }
        Command::Run(args) => run(args, quiet, json_logs),
        Command::Estimate(args) => estimate(&args, &job_overrides(&args)?, false),
        Command::Render { job, row } => render(&job, row),
        Command::Validate { job, input } => validate(&job, input),
        Command::Batch { action } => batch(action, quiet, json_logs),
        Command::Merge {
            outputs,
            output,
            csv,
            parquet,
        } => merge(&outputs, output, csv, parquet, quiet),
        Command::Status {
            targets,
            input,
            shard,
            shards,
        } => status(&targets, input, shard, shards),
        Command::Export { job, out } => export(&job, &out),
        Command::Import { job, results } => {
            let opts = RunOptions::collect(job.limit, quiet, Some(results));
            passes(&job.job, &job_overrides(&job)?, opts, false, json_logs)
        }
        Command::FetchModel { list: true, .. } => {
            print!("{}", crate::models::list_models());
            Ok(EXIT_OK)
        }
        Command::FetchModel { name, .. } => {
            let p = crate::models::fetch_model(name.as_deref(), quiet)?;
            println!("{}", p.display());
            Ok(EXIT_OK)
        }
        Command::Report {
            output,
            out,
            rows,
            failed_rows,
        } => report(&output, out, (rows, failed_rows), quiet),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "promptmill",
                &mut std::io::stdout(),
            );
            Ok(EXIT_OK)
        }
    }
}

pub(super) fn job_overrides(a: &JobArgs) -> Result<Overrides, Error> {
    Ok(Overrides {
        input: a.input.clone(),
        output: a.output.clone(),
        shard: shard_of(a.shard, a.shards)?,
        ..Default::default()
    })
}

/// `--shard K/N`, or `--shards N` with K from `JOB_COMPLETION_INDEX`.
pub(super) fn shard_of(shard: Option<Shard>, shards: Option<u32>) -> Result<Option<Shard>, Error> {
    match (shard, shards) {
        (Some(s), Some(n)) if s.n != n => Err(Error::Other(format!(
            "--shard {}/{} and --shards {n} disagree",
            s.k, s.n
        ))),
        (Some(s), _) => Ok(Some(s)),
        (None, Some(n)) => Shard::from_env(n).map(Some).map_err(Error::Other),
        (None, None) => Ok(None),
    }
}

pub(super) fn overrides(a: &RunArgs) -> Result<Overrides, Error> {
    Ok(Overrides {
        concurrency: a.concurrency,
        rpm: a.rpm,
        tpm: a.tpm,
        max_cost_usd: a.max_cost,
        mode: a.mode,
        ..job_overrides(&a.job)?
    })
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))
}

/// A file-size limit (`ulimit -f`) must be an I/O error the writer can stop on, not a
/// signal that kills the process with rows in flight.
pub(super) fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN at start-up, before any thread runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
