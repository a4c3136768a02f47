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
    /// Join shard outputs into one, in input order, with one CSV and one summary.
    Merge {
        /// Shard outputs, or quoted glob patterns (`'out/x.shard-*.jsonl'`).
        #[arg(required = true)]
        outputs: Vec<String>,
        /// Where to write (default: the outputs' name without `.shard-K-of-N`).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Also write the CSV here.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Also write the records as a typed Parquet table here.
        #[arg(long)]
        parquet: Option<PathBuf>,
    },
    /// Rows done, failed and pending, and the spend, per shard and in total. Sends nothing.
    Status {
        /// A job file, or outputs (paths or quoted globs) to count.
        #[arg(required = true)]
        targets: Vec<String>,
        /// Read the input from this file instead of the job's.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Only shard K of N.
        #[arg(long, value_name = "K/N", value_parser = crate::shard::Shard::parse)]
        shard: Option<crate::shard::Shard>,
        /// Every shard of a job split N ways.
        #[arg(long, value_name = "N")]
        shards: Option<u32>,
    },
    /// Write every pending row as an OpenAI batch-format request line, for another engine
    /// (vLLM's run-batch, LiteLLM, a provider's batch console).
    Export {
        #[command(flatten)]
        job: JobArgs,
        /// The request file to write (`-` for stdout).
        #[arg(long, short = 'o')]
        out: PathBuf,
    },
    /// Read a batch-format results file from any engine into the job's output.
    Import {
        #[command(flatten)]
        job: JobArgs,
        /// The results file (one `{"custom_id", "response", "error"}` line per request).
        results: PathBuf,
    },
    /// The Batch API: check on, collect, or cancel the job's batches.
    Batch {
        #[command(subcommand)]
        action: BatchAction,
    },
    /// Download a local model into the cache, once (default: SmolLM2-135M-Instruct).
    FetchModel {
        /// The model to fetch (see --list); default: the default model.
        name: Option<String>,
        /// List the models that can be fetched: sizes, licences, the default, what is cached.
        #[arg(long, conflicts_with = "name")]
        list: bool,
    },
    /// Make the HTML report of an output file (each run writes OUTPUT.report.html itself).
    Report {
        /// The JSONL output.
        output: PathBuf,
        /// Write the report here instead of OUTPUT.report.html.
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
        /// The table's first N rows.
        #[arg(long, value_name = "N", default_value_t = crate::job::DEFAULT_REPORT_ROWS)]
        rows: usize,
        /// Failed rows past the first N that the table holds too (the page says how many
        /// more there are).
        #[arg(long, value_name = "N", default_value_t = crate::job::DEFAULT_REPORT_FAILED_ROWS)]
        failed_rows: usize,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum BatchAction {
    /// Each batch: status, request counts, age, time left. Sends no requests.
    Status(JobArgs),
    /// Download finished batches' results into the output, CSV and summary. Submits nothing.
    Collect {
        #[command(flatten)]
        job: JobArgs,
        /// Wait for every running batch to end, then collect it.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel every running batch; what they finished is kept and collected later.
    Cancel(JobArgs),
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
    /// Only shard K of N (K from 1): its own output, CSV, summary and lock.
    #[arg(long, value_name = "K/N", value_parser = crate::shard::Shard::parse)]
    pub shard: Option<crate::shard::Shard>,
    /// Split into N shards; this one is JOB_COMPLETION_INDEX + 1 (Kubernetes Indexed Jobs).
    #[arg(long, value_name = "N")]
    pub shards: Option<u32>,
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
    /// `online` (default) or `batch`: the provider's Batch API, at batch prices.
    #[arg(long, value_enum)]
    pub mode: Option<crate::chat::Mode>,
    /// Batch mode: after submitting, wait for the batches and collect them.
    #[arg(long)]
    pub wait: bool,
}
