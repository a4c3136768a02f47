//! The run, in four steps: open the output (lock, `--fresh`, repair, load the ledger), plan and
//! dispatch each row (skip, copy, or send under the budget, the concurrency limit and the
//! pacer, with retries and the circuit breaker), let the one writer task journal every
//! finished row, then finish (compact into input order, CSV, summary, exit code).
//!
//! Every way a run can end keeps the promise: a row ends exactly once, nothing finished is lost,
//! nothing is paid for twice, the budget is never passed. A writer that cannot write stops the
//! spending; SIGTERM and Ctrl-C let requests in flight finish (for a grace period) and write
//! them; an outage stops the job instead of failing every row.

mod attempt;
pub mod batch;
mod breaker;
mod budget;
mod dispatch;
mod finish;
mod open;
pub mod pace;
mod prepare;
mod reask;
mod records;
pub mod retry;
mod send;
mod several;
pub mod signals;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

pub use budget::schema_tokens;
pub use signals::{Interrupt, Signals};

use crate::backend::Backend;
use crate::chat::Mode;
use crate::cost::Price;
use crate::error::Error;
use crate::exec::pace::Pacer;
use crate::exec::retry::RetryPolicy;
use crate::input::InputFormat;
use crate::job::Job;
use crate::ledger::files::Files;
use crate::ledger::Spool;
use crate::plan::{keying, Planner};
use crate::render::Renderer;
use crate::report::Summary;
use crate::request::Builder;
use breaker::Breaker;
use budget::Budget;
use signals::{write_stop_message, Halt, Stopper};
use writer::{Msg, Written};

impl RunOptions {
    /// A run that only collects (`batch collect`, or `import` with another engine's results):
    /// it sends nothing and submits nothing.
    pub fn collect(limit: Option<u64>, quiet: bool, import: Option<std::path::PathBuf>) -> Self {
        RunOptions {
            limit,
            fresh: false,
            retry_failed: false,
            quiet,
            collect_only: true,
            import,
        }
    }
}

pub struct RunOptions {
    pub limit: Option<u64>,
    pub fresh: bool,
    pub retry_failed: bool,
    pub quiet: bool,
    /// Collect finished batches only: send nothing, submit nothing (`batch collect`).
    pub collect_only: bool,
    /// A batch-format results file from another engine to read in (`import`); with
    /// `collect_only`.
    pub import: Option<std::path::PathBuf>,
}

struct Shared {
    job: Job,
    backend: Backend,
    pacer: Pacer,
    retry: RetryPolicy,
    stopper: Arc<Stopper>,
    budget: Mutex<Budget>,
    /// Woken whenever a reservation is released, for a dispatcher waiting on the budget.
    released: tokio::sync::Notify,
    breaker: Mutex<Breaker>,
    unknown_price_warned: AtomicBool,
    no_usage_warned: AtomicBool,
    /// The job's schema and checks, compiled; `None` when it has none.
    shape: Option<crate::shape::Shape>,
    /// The schema's tokens, billed with every prompt (see `schema_tokens`): counted the first
    /// time a count is needed, since loading the tokenizer costs 45 MB.
    schema_tokens: std::sync::OnceLock<u64>,
    tx: mpsc::Sender<Msg>,
}

impl Shared {
    fn stop(&self, why: Halt) {
        self.stopper.stop(why);
    }

    fn price(&self, returned: Option<&str>) -> Option<Price> {
        let p = self.backend.price_for(returned, &self.job.served.model);
        if p.is_none() && !self.unknown_price_warned.swap(true, Ordering::Relaxed) {
            let tier = match self.backend.tier {
                crate::cost::Tier::Standard => "",
                crate::cost::Tier::Batch => " at Batch API rates",
                crate::cost::Tier::Flex => " at the flex tier (which it may not offer)",
            };
            tracing::warn!(
                "no price known for model `{}`{tier}: cost is recorded as null; add a [pricing] table to the job to set one",
                returned.unwrap_or(&self.job.served.model)
            );
        }
        p
    }
}

/// Runs the job to the end, or until it is stopped; returns the summary and the exit code.
pub async fn run(
    job: Job,
    opts: RunOptions,
    backend: Backend,
    renderer: Renderer,
    signals: Signals,
) -> Result<(Summary, i32), Error> {
    let keying = keying(&job);
    // The input opens before `--fresh` moves anything. A CSV input's header gives the CSV
    // export its columns in order, even those no readable row had.
    let ahead = job.limits.concurrency * 2 + 16;
    let (header, rows) = crate::input::Source::of(&job).stream(ahead)?;
    let header = (job.input_format == InputFormat::Csv).then_some(header);
    // The lock is held until the run ends.
    let open::Opened {
        lock: _lock,
        index,
        spent_before,
    } = open::open_output(&job, &opts, &backend)?;
    let submits = job.mode == Mode::Batch && !opts.collect_only;
    let mut pass = batch::Pass::open(&job, submits, opts.import.as_deref()).await?;
    for f in &pass.failed_batches {
        tracing::error!("{f}");
    }
    let builder = Arc::new(Builder::new(&job, &backend));
    let mut rows = prepare::spawn(rows, Arc::new(renderer), builder, job.input.clone(), ahead)?;
    let spool = Spool::create(&Files::new(&job.output).plan())?;
    let mut planner = Planner::new(index, keying, opts.retry_failed, Some(spool), &job.output);
    let stopper = Arc::new(Stopper::new(signals.clone()));
    let (tx, rx) = mpsc::channel::<Msg>(job.limits.concurrency * 2 + 64);
    let writer = writer::start(&job, &opts, &backend, rx, &stopper)?;
    let shared = Arc::new(Shared::new(
        job,
        backend,
        &stopper,
        spent_before,
        &pass,
        tx.clone(),
    )?);

    let seen = dispatch::dispatch(
        dispatch::Dispatch {
            shared: &shared,
            planner: &mut planner,
            opts: &opts,
            tx: &tx,
            pass: &mut pass,
        },
        &mut rows,
    )
    .await;
    drop(rows); // the reader thread ends when its channel closes
    let (job, budget, mut end) = settle(
        shared,
        &mut pass,
        tx,
        planner,
        writer,
        &stopper,
        seen.complete,
    )
    .await?;
    submit_batches(&mut pass, &mut end, &stopper, &signals, submits).await;
    let collected_all = seen.complete && end.failed.is_none() && opts.limit.is_none();
    write_stamp(&job, &seen, header.as_deref());
    let (summary, code) = finish::finish(
        job,
        budget,
        &mut end,
        stopper,
        signals,
        seen.complete,
        header,
    )?;
    if collected_all {
        pass.mark_collected()?;
    }
    Ok((summary, code))
}

/// After dispatching: the answers no row matched are recorded, every row task has ended,
/// and the writer has written everything it was given.
async fn settle(
    shared: Arc<Shared>,
    pass: &mut batch::Pass,
    tx: mpsc::Sender<Msg>,
    planner: Planner,
    writer: tokio::task::JoinHandle<writer::WriterEnd>,
    stopper: &Stopper,
    complete: bool,
) -> Result<(Job, Mutex<Budget>, Written), Error> {
    if complete {
        // Answers for rows that left the input: paid for, so recorded; compaction moves them
        // to the stale file, where a row put back finds them.
        if let Err(e) = records::record_unmatched(&shared, pass, &tx).await {
            shared.stop(Halt::Write(write_stop_message(&e)));
        }
    }
    pass.release_index();
    let spool = planner.finish();
    drop(tx);
    // `dispatch` joined every row task, and with them every other reference.
    let shared = Arc::into_inner(shared).expect("every row task has finished");
    let Shared {
        job, budget, tx, ..
    } = shared;
    drop(tx);
    let end = writer::wind_down(writer, spool, stopper).await?;
    Ok((job, budget, end))
}

impl Shared {
    fn new(
        job: Job,
        backend: Backend,
        stopper: &Arc<Stopper>,
        spent_before: f64,
        pass: &batch::Pass,
        tx: mpsc::Sender<Msg>,
    ) -> Result<Shared, Error> {
        Ok(Shared {
            pacer: Pacer::new(job.limits.rpm, job.limits.tpm),
            retry: RetryPolicy::new(job.limits.max_retries),
            stopper: stopper.clone(),
            budget: Mutex::new(Budget {
                cap: job.limits.max_cost_usd,
                before: spent_before,
                batches: pass.open_worst_usd(),
                ..Budget::default()
            }),
            released: tokio::sync::Notify::new(),
            breaker: Mutex::new(Breaker::default()),
            unknown_price_warned: AtomicBool::new(false),
            no_usage_warned: AtomicBool::new(false),
            shape: crate::shape::Shape::of(&job.shape, &job.file)?,
            schema_tokens: std::sync::OnceLock::new(),
            tx,
            backend,
            job,
        })
    }
}

/// Batch mode: the files written while planning are uploaded and submitted now, unless the
/// run already stopped.
async fn submit_batches(
    pass: &mut batch::Pass,
    end: &mut Written,
    stopper: &Stopper,
    signals: &Signals,
    submits: bool,
) {
    if !pass.failed_batches.is_empty() {
        stopper.stop(Halt::Job(format!(
            "{}. Rows on the lines it names have failed; its other rows are pending: fix the \
             job and run again",
            pass.failed_batches.join("; ")
        )));
    }
    let stopped_before = stopper.why.lock().unwrap().is_some();
    if submits && end.failed.is_none() && !stopped_before {
        match pass.submit(&signals.stop).await {
            Ok(s) => {
                end.stats.batches_submitted = s.batches;
                end.stats.batch_requests_submitted = s.requests;
            }
            Err(e) => stopper.stop(Halt::Job(format!(
                "submitting to the Batch API failed: {e}. Rows not submitted stay pending; \
                 run the same command again"
            ))),
        }
    }
    pass.discard();
    if let Some(why) = pass.budget_stop.take() {
        stopper.stop(Halt::Job(why));
    }
    end.stats.batches_running = pass.running.0;
}

/// Which job wrote this output, for `merge` (and how many rows the whole input has).
fn write_stamp(job: &Job, seen: &dispatch::Dispatched, header: Option<&[String]>) {
    let stamp = crate::job::stamp::stamp(
        job,
        seen.complete.then_some(seen.read),
        seen.complete.then_some(seen.owned),
        header,
    );
    let path = Files::new(&job.output).stamp();
    if let Err(e) = stamp.write(&path) {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
}

/// `PROMPTMILL_FAILPOINT=STEP:panic:N` makes step STEP panic at row N (`row`: the row's task;
/// `render`: the thread that renders rows), so tests can check that a panic stops the run
/// (exit 2) and never ends it as if every row were done.
fn failpoint(step: &str, row: u64) {
    static SPEC: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("PROMPTMILL_FAILPOINT").ok()?;
        let (at, n) = v.split_once(":panic:")?;
        Some((at.to_string(), n.parse().ok()?))
    });
    if spec.as_ref().is_some_and(|(at, n)| at == step && *n == row) {
        panic!("failpoint {step}:panic:{row}");
    }
}
