//! The command line (clap derive). Flags here override the job file; `app` turns them into a
//! validated `Job`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "promptmill",
    version,
    about = "Turn rows of data into LLM completions at scale: resumable, paced, costed."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Only warnings and errors; no progress display.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More detail in the log (-v debug, -vv trace).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a job: every row's completion into the output, resuming what an earlier run began.
    Run(RunArgs),
    /// Count the job's prompt tokens and its cost bound without sending anything.
    Estimate(JobArgs),
    /// Print one row's rendered messages.
    Render {
        #[command(flatten)]
        job: JobArgs,
        /// The row number (1 = the first data row).
        #[arg(long, default_value_t = 1)]
        row: u64,
    },
    /// Check the job file, its templates, and that every template variable is an input column.
    Validate {
        /// The job file (TOML).
        job: PathBuf,
        /// Read the input from this file instead of the job's.
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Download a local model into the cache, once (default: SmolLM2-135M-Instruct).
    FetchModel {
        /// The model to fetch (see --list); default: the default model.
        name: Option<String>,
        /// List the models that can be fetched: sizes, licences, the default, what is cached.
        #[arg(long, conflicts_with = "name")]
        list: bool,
    },
}

#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job file (TOML).
    pub job: PathBuf,
    /// Read the input from this file (`-` for stdin) instead of the job's.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Write the JSONL output here instead of the job's.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Only the first N rows.
    #[arg(long)]
    pub limit: Option<u64>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Requests in flight at most.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Requests per minute, paced evenly.
    #[arg(long)]
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt + max_tokens), paced evenly.
    #[arg(long)]
    pub tpm: Option<u64>,
    /// Stop dispatching before the spend could pass this many USD.
    #[arg(long = "max-cost", value_name = "USD")]
    pub max_cost: Option<f64>,
    /// Ignore (and delete) earlier results for this output and start over.
    #[arg(long)]
    pub fresh: bool,
    /// Send again the rows that failed in an earlier run.
    #[arg(long)]
    pub retry_failed: bool,
    /// Estimate only: render and count, send nothing (same as `estimate`).
    #[arg(long)]
    pub dry_run: bool,
}
