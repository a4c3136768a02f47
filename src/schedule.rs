//! The run, in four steps: open the output (lock, `--fresh`, repair, load the ledger), plan and
//! dispatch each row (skip, copy, or send under the budget, the concurrency limit and the
//! pacer, with retries and the circuit breaker), let the one writer task journal every
//! finished row, then finish (compact into input order, CSV, summary, exit code).
//!
//! Every way a run can end keeps the promise: a row ends exactly once, nothing finished is lost,
//! nothing is paid for twice, the budget is never passed. A writer that cannot write stops the
//! spending; SIGTERM and Ctrl-C let requests in flight finish (for a grace period) and write
//! them; an outage stops the job instead of failing every row.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Map;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batch;
use crate::cost::{Price, Tier};
use crate::error::{Error, EXIT_OK, EXIT_ROWS_FAILED, EXIT_STOPPED};
use crate::export::CsvOptions;
use crate::input::{InputFormat, RowResult};
use crate::job::{Job, Mode};
use crate::journal::{self, Appender};
use crate::ledger::{self, Carried, Index, Keying, Sidecars, Spool};
use crate::output::{Record, RecordError, Status};
use crate::pace::Pacer;
use crate::plan::{Decision, Planner};
use crate::provider::{Backend, Completion, Disposition, ErrorKind, ProviderError, Usage};
use crate::render::Renderer;
use crate::report::{Progress, Stats, Summary};
use crate::request::{self, Builder, Prepared};
use crate::retry::RetryPolicy;

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

/// Which signal interrupted the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    CtrlC,
    Term,
}

impl Interrupt {
    pub fn exit_code(self) -> i32 {
        match self {
            Interrupt::CtrlC => crate::error::EXIT_INTERRUPTED,
            Interrupt::Term => crate::error::EXIT_TERMINATED,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Interrupt::CtrlC => "Ctrl-C",
            Interrupt::Term => "SIGTERM",
        }
    }
}

/// How the process asks a run to stop: `stop` ends dispatching (requests in flight finish),
/// `abort` cancels what is in flight. Records already received are written either way.
#[derive(Clone, Default)]
pub struct Signals {
    pub stop: CancellationToken,
    pub abort: CancellationToken,
    which: Arc<Mutex<Option<Interrupt>>>,
}

impl Signals {
    /// The first signal stops dispatching and gives requests in flight `grace` to finish;
    /// a second one (or the end of the grace period) cancels them.
    pub fn interrupt(&self, what: Interrupt, grace: Duration) {
        let first = {
            let mut w = self.which.lock().unwrap();
            let first = w.is_none();
            w.get_or_insert(what);
            first
        };
        if first {
            tracing::warn!(
                "{}: no new requests; waiting up to {:.0} s for those in flight ({} again to cancel them)",
                what.name(),
                grace.as_secs_f64(),
                what.name()
            );
            self.stop.cancel();
            let abort = self.abort.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if !abort.is_cancelled() {
                    tracing::warn!("grace period over: cancelling the requests in flight");
                    abort.cancel();
                }
            });
        } else {
            tracing::warn!(
                "{} again: cancelling the requests in flight; writing what has arrived",
                what.name()
            );
            self.stop.cancel();
            self.abort.cancel();
        }
    }

    pub fn interrupted(&self) -> Option<Interrupt> {
        *self.which.lock().unwrap()
    }
}

/// Why dispatching stopped early: each is exit 2.
#[derive(Debug, Clone)]
enum Stop {
    /// Auth, quota, budget, outage.
    Job(String),
    /// The output (or the plan spool) cannot be written.
    Write(String),
}

impl Stop {
    fn message(&self) -> &str {
        match self {
            Stop::Job(m) | Stop::Write(m) => m,
        }
    }
}

/// The stop reason, shared by the dispatcher, the row tasks and the writer.
struct Stopper {
    why: Mutex<Option<Stop>>,
    signals: Signals,
}

impl Stopper {
    fn stop(&self, why: Stop) {
        let mut s = self.why.lock().unwrap();
        if s.is_none() {
            tracing::error!("stopping the job: {}", why.message());
            *s = Some(why);
        }
        drop(s);
        self.signals.stop.cancel();
    }
}

enum Msg {
    Finished {
        record: Box<Record>,
        retries: u32,
        rate_limited: u32,
        /// The row's concurrency slot, released once its record is on disk: at most
        /// `concurrency` rows are ever sent and not yet durable, which bounds what a dead
        /// writer can cost.
        slot: Option<OwnedSemaphorePermit>,
    },
    Skipped {
        ok: bool,
    },
    Copied,
    /// A row that ended with no record after attempts the server may have billed.
    Unconfirmed(f64),
    /// A row a batch still running holds.
    InFlight,
    /// A row put into a batch input file this run.
    Batched,
}

/// Spend in USD: what the output recorded before this run, and this run's.
#[derive(Default)]
struct Budget {
    cap: Option<f64>,
    before: f64,
    spent: f64,
    unconfirmed: f64,
    /// Requests in flight at their worst case.
    reserved: f64,
    /// How many reservations are held (float sums drift; a count does not).
    holders: usize,
    /// Batches submitted and not yet collected, at their worst case: spend the budget must
    /// leave room for.
    batches: f64,
}

impl Budget {
    fn total(&self) -> f64 {
        self.before + self.spent + self.unconfirmed
    }
}

/// One request's budget reservation, released however the row ends (a panic included).
struct Reservation {
    sh: Arc<Shared>,
    bound: f64,
    settled: bool,
}

impl Reservation {
    /// Reserves `more` for another attempt of the same row; `false` when the budget has no
    /// room for it (nothing is reserved then).
    fn grow(&mut self, more: f64) -> bool {
        let mut b = self.sh.budget.lock().unwrap();
        if let Some(cap) = b.cap {
            if b.total() + b.batches + b.reserved + more > cap {
                return false;
            }
        }
        b.reserved += more;
        drop(b);
        self.bound += more;
        true
    }

    fn settle(mut self, spent: f64, unconfirmed: f64) {
        let mut b = self.sh.budget.lock().unwrap();
        b.reserved = (b.reserved - self.bound).max(0.0);
        b.holders -= 1;
        b.spent += spent;
        b.unconfirmed += unconfirmed;
        drop(b);
        self.settled = true;
        self.sh.released.notify_waiters();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            if let Ok(mut b) = self.sh.budget.lock() {
                b.reserved = (b.reserved - self.bound).max(0.0);
                b.holders = b.holders.saturating_sub(1);
            }
            self.sh.released.notify_waiters();
        }
    }
}

/// The circuit breaker: an endpoint that fails every request the same transient way for a
/// while is down, and an outage is not a verdict on the rows.
#[derive(Default)]
struct Breaker {
    failing_since: Option<Instant>,
    failures: u32,
    unreachable_only: bool,
    /// When any request last succeeded.
    last_success: Option<Instant>,
}

/// How often a row caught in a possible outage tries again.
const OUTAGE_PROBE: Duration = Duration::from_secs(1);

/// An unreachable endpoint (nothing listening, DNS, a TLS handshake that fails) stops the job
/// after this long at most; an untrusted certificate stops it at once (`ErrorKind::Endpoint`).
const UNREACHABLE_WINDOW: Duration = Duration::from_secs(10);

impl Breaker {
    fn success(&mut self) {
        *self = Breaker {
            last_success: Some(Instant::now()),
            ..Breaker::default()
        };
    }

    /// Whether nothing has succeeded since `t`: a row that ran out of retries then is caught in
    /// what may be an outage, and waits for the breaker's verdict instead of failing.
    fn nothing_succeeded_since(&self, t: Instant) -> bool {
        self.last_success.is_none_or(|s| s < t)
    }

    /// Counts a failed attempt; `Some(cause)` when the job must stop.
    fn failure(&mut self, e: &ProviderError, outage: Duration) -> Option<String> {
        if !matches!(
            e.kind,
            ErrorKind::Connection
                | ErrorKind::Timeout
                | ErrorKind::Server
                | ErrorKind::InvalidResponse
        ) {
            return None; // 429s are pacing's business; row errors are the row's
        }
        let now = Instant::now();
        if self.failing_since.is_none() {
            self.failing_since = Some(now);
            self.unreachable_only = true;
        }
        self.failures += 1;
        self.unreachable_only &= e.unreachable;
        let window = if self.unreachable_only {
            outage.min(UNREACHABLE_WINDOW)
        } else {
            outage
        };
        let since = self.failing_since.expect("set above");
        (self.failures >= 3 && now.duration_since(since) >= window).then(|| {
            format!(
                "{} for {:.0} s, {} attempts in a row ({e})",
                if self.unreachable_only {
                    "the endpoint cannot be reached"
                } else {
                    "every request has failed"
                },
                now.duration_since(since).as_secs_f64(),
                self.failures
            )
        })
    }
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
    fn stop(&self, why: Stop) {
        self.stopper.stop(why);
    }

    fn price(&self, returned: Option<&str>) -> Option<Price> {
        let p = self.backend.price_for(returned, &self.job.model);
        if p.is_none() && !self.unknown_price_warned.swap(true, Ordering::Relaxed) {
            let tier = match self.backend.tier {
                crate::cost::Tier::Standard => "",
                crate::cost::Tier::Batch => " at Batch API rates",
                crate::cost::Tier::Flex => " at the flex tier (which it may not offer)",
            };
            tracing::warn!(
                "no price known for model `{}`{tier}: cost is recorded as null; add a [pricing] table to the job to set one",
                returned.unwrap_or(&self.job.model)
            );
        }
        p
    }
}

/// What opening the output found.
struct Opened {
    _lock: journal::Lock,
    index: Index,
    spent_before: f64,
}

/// Step 1: lock, `--fresh`, repair, load the ledger. `--fresh` moves the old output aside only
/// after everything else has been checked, so a mistyped flag cannot cost paid results.
fn open_output(
    job: &Job,
    opts: &RunOptions,
    backend: &Backend,
    keying: Keying,
) -> Result<Opened, Error> {
    let lock = journal::Lock::acquire(&job.lock_path())?;
    if job.max_cost_usd.is_some() && backend.price_for(None, &job.model).is_none() {
        return Err(Error::Job {
            path: job.file.clone(),
            field: "run.max_cost_usd".into(),
            message: format!(
                "the price of model `{}` is unknown, so a budget cannot be enforced; add [pricing]",
                job.model
            ),
        });
    }
    if opts.fresh {
        // Batches still running hold rows that are paid for: starting over would lose them.
        let log = batch::state::Log::load(&job.batches_path())?;
        if log.open_parts().any(|p| p.pins_rows()) {
            return Err(Error::Other(format!(
                "--fresh: batches of this output are still open ({}); collect them \
                 (`promptmill batch collect`) or cancel them (`promptmill batch cancel`) first",
                job.batches_path().display()
            )));
        }
        for p in [job.batches_path(), job.batch_dir()] {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(journal::io_err(&p, e)),
            }
        }
        let prev = job.prev_path();
        for p in [job.output.clone(), job.stale_path()] {
            if ledger::move_appending(&p, &prev)? {
                tracing::info!("--fresh: {} moved to {}", p.display(), prev.display());
            }
        }
        for p in [
            Some(job.spend_path()),
            job.csv.clone(),
            Some(job.summary_path()),
        ]
        .into_iter()
        .flatten()
        {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(journal::io_err(&p, e)),
            }
        }
    }
    let cut = journal::repair(&job.output)?;
    if cut > 0 {
        tracing::warn!(
            "{}: cut a torn last line ({cut} bytes) left by an interrupted run; that row runs again",
            job.output.display()
        );
    }
    let index = Index::load(&job.output, keying)?.with_stale(&job.stale_path(), keying)?;
    if index.records > 0 {
        tracing::info!(
            "{}: {} earlier records found; resuming",
            job.output.display(),
            index.records
        );
    }
    let carried = Carried::read(&job.spend_path())?;
    let spent_before =
        index.spent_usd + index.unconfirmed_usd + index.stale_spent_usd() + carried.unconfirmed_usd;
    Ok(Opened {
        _lock: lock,
        index,
        spent_before,
    })
}

/// The tokens a structured output's schema adds to every prompt, as nearly as is known: its
/// JSON text counted with the model's tokenizer (OpenAI bills the schema as prompt tokens but
/// does not publish how it is rendered). 0 without a schema, and for the local model, which
/// is held to the schema by a grammar and never reads it.
pub fn schema_tokens(job: &Job, counter: &dyn crate::provider::TokenCounter) -> u64 {
    if job.provider == crate::job::ProviderKind::Local {
        return 0;
    }
    job.shape
        .schema
        .as_ref()
        .map(|(name, v)| {
            counter.count_text(name)
                + counter.count_text(&serde_json::to_string(v).unwrap_or_default())
        })
        .unwrap_or(0)
}

/// How the job's rows are keyed in the ledger.
pub fn keying(job: &Job) -> Keying {
    Keying {
        by_id: job.id_column.is_some(),
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
    // The input must open before `--fresh` moves anything. A CSV input's header gives the CSV
    // export its columns in order, even those no readable row had; stdin cannot be read twice,
    // so its columns come from the records, like JSONL's.
    let header = match job.input_format {
        InputFormat::Csv if job.input.as_os_str() != "-" => {
            Some(job.source().reader()?.header().to_vec())
        }
        _ => None,
    };
    let mut rows = job.source().stream(job.concurrency * 2 + 16)?;
    let opened = open_output(&job, &opts, &backend, keying)?;
    let submits = job.mode == Mode::Batch && !opts.collect_only;
    let mut pass = batch::Pass::open(&job, submits, opts.import.as_deref()).await?;
    for f in &pass.failed_batches {
        tracing::error!("{f}");
    }
    let builder = Builder::new(&job, &backend.identity);
    let spool = Spool::create(&job.plan_path())?;
    let mut planner = Planner::new(opened.index, keying, opts.retry_failed, Some(spool));
    let appender = Appender::open(&job.output)?;

    let stopper = Arc::new(Stopper {
        why: Mutex::new(None),
        signals: signals.clone(),
    });
    let (tx, rx) = mpsc::channel::<Msg>(job.concurrency * 2 + 64);
    let billed = backend.provider.is_billed();
    let writer = tokio::spawn(write_records(
        rx,
        appender,
        Progress::new(
            opts.quiet,
            Some(&job.input),
            u64::from(job.input_format == InputFormat::Csv),
            opts.limit,
            job.shard.map_or(1, |s| s.n),
        ),
        billed,
        stopper.clone(),
    ));

    let shared = Arc::new(Shared {
        pacer: Pacer::new(job.rpm, job.tpm),
        retry: RetryPolicy::new(job.max_retries),
        stopper: stopper.clone(),
        budget: Mutex::new(Budget {
            cap: job.max_cost_usd,
            before: opened.spent_before,
            batches: pass.open_worst_usd(),
            ..Budget::default()
        }),
        released: tokio::sync::Notify::new(),
        breaker: Mutex::new(Breaker::default()),
        unknown_price_warned: AtomicBool::new(false),
        no_usage_warned: AtomicBool::new(false),
        shape: crate::shape::Shape::of(&job)?,
        schema_tokens: std::sync::OnceLock::new(),
        tx: tx.clone(),
        backend,
        job,
    });

    // Step 2: plan and dispatch.
    let (complete, rows_read, rows_owned) = dispatch(
        &shared,
        &renderer,
        &builder,
        &mut planner,
        &mut rows,
        &opts,
        &tx,
        &mut pass,
    )
    .await;
    drop(rows); // the reader thread ends when its channel closes
    if complete {
        // Answers for rows that left the input: paid for, so recorded; compaction moves them
        // to the stale file, where a row put back finds them.
        if let Err(e) = record_unmatched(&shared, &pass, &tx).await {
            shared.stop(Stop::Write(write_stop_message(&e)));
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
    let w = writer
        .await
        .map_err(|e| Error::Other(format!("the writer task failed: {e}")))?;
    let WriterEnd {
        appender,
        mut stats,
        progress,
        mut failed,
    } = w;
    let unwritten = appender.unwritten();
    if let Err(e) = appender.finish() {
        if failed.is_none() {
            stopper.stop(Stop::Write(write_stop_message(&e)));
            failed = Some(e);
        }
    }
    progress.finish();
    let spool = match spool {
        Ok(s) => s,
        Err(e) => {
            if failed.is_none() {
                stopper.stop(Stop::Write(write_stop_message(&e)));
                failed = Some(e);
            }
            None
        }
    };

    // Batch mode: the files written while planning are uploaded and submitted now.
    if !pass.failed_batches.is_empty() {
        stopper.stop(Stop::Job(format!(
            "{}. Rows on the lines it names have failed; its other rows are pending: fix the \
             job and run again",
            pass.failed_batches.join("; ")
        )));
    }
    let stopped_before = stopper.why.lock().unwrap().is_some();
    if submits && failed.is_none() && !stopped_before {
        match pass.submit(&signals.stop).await {
            Ok(s) => {
                stats.batches_submitted = s.batches;
                stats.batch_requests_submitted = s.requests;
            }
            Err(e) => stopper.stop(Stop::Job(format!(
                "submitting to the Batch API failed: {e}. Rows not submitted stay pending; \
                 run the same command again"
            ))),
        }
    }
    pass.discard();
    if let Some(why) = pass.budget_stop.take() {
        stopper.stop(Stop::Job(why));
    }
    stats.batches_running = pass.running.0;
    let collected_all = complete && failed.is_none() && opts.limit.is_none();

    // Which job wrote this output, for `merge` (and how many rows the whole input has).
    let stamp = crate::shard::Stamp::of(
        &job,
        complete.then_some(rows_read),
        complete.then_some(rows_owned),
    );
    if let Err(e) = stamp.write(&job.stamp_path()) {
        tracing::warn!("cannot write {}: {e}", job.stamp_path().display());
    }

    // Step 3: finish.
    let (summary, code) = finish(
        job, budget, &mut stats, stopper, signals, complete, spool, failed, unwritten, header,
    )?;
    if collected_all {
        pass.mark_collected()?;
    }
    Ok((summary, code))
}

/// Records the results no input row matched.
async fn record_unmatched(
    sh: &Arc<Shared>,
    pass: &batch::Pass,
    tx: &mpsc::Sender<Msg>,
) -> Result<(), Error> {
    let unmatched = pass.unmatched()?;
    if pass.importing {
        if !unmatched.is_empty() {
            tracing::warn!(
                "{} result lines match no pending row of this job (already done, or a request \
                 the job no longer makes: its custom_id names the row and request fingerprint); \
                 they are not written",
                unmatched.len()
            );
        }
        return Ok(());
    }
    for u in unmatched {
        let record = batch_record(
            sh,
            u.row,
            u.row.to_string(),
            Map::new(),
            None,
            &u.fp,
            u.outcome,
            u.from,
        );
        let _ = tx
            .send(Msg::Finished {
                record: Box::new(record),
                retries: 0,
                rate_limited: 0,
                slot: None,
            })
            .await;
    }
    Ok(())
}

/// The record of a row the Batch API answered, priced at batch rates.
#[allow(clippy::too_many_arguments)]
fn batch_record(
    sh: &Shared,
    row: u64,
    id: String,
    input: Map<String, serde_json::Value>,
    messages: Option<&[crate::chat::Message]>,
    fp: &[u8; 16],
    outcome: batch::results::Outcome,
    from: batch::results::Answerer,
) -> Record {
    use batch::results::Outcome;
    let fingerprint = Some(request::hex(fp));
    let mut record = match outcome {
        Outcome::Answered(c) => {
            let c = *c;
            let usage = match (c.usage, messages) {
                (Some(u), _) => u,
                (None, Some(m)) => usage_of(sh, m, &c),
                // A row that left the input: its prompt is not known any more.
                (None, None) => Usage {
                    completion_tokens: sh.backend.counter.count_text(&c.text),
                    total_tokens: sh.backend.counter.count_text(&c.text),
                    estimated: true,
                    ..Usage::default()
                },
            };
            let cost = sh
                .backend
                .price_at(Tier::Batch, c.model.as_deref(), &sh.job.model)
                .map(|pr| pr.cost(&usage));
            // A batch answer is judged like an online one; it cannot be asked again within
            // the batch, so one that breaks the shape fails its row (`--retry-failed` sends
            // it again).
            let choices = c.all_choices();
            let judged = sh
                .shape
                .as_ref()
                .map(|shape| judge_once(shape, &choices, &input));
            let several = sh.job.params.choices() > 1 || choices.len() > 1;
            let mut record =
                answered_record(row, id, input, c, usage, cost, 1, from.took_ms, fingerprint);
            let data = match judged {
                Some((data, invalid, failure)) => {
                    judged_wrong(&mut record, invalid, failure);
                    data
                }
                None => vec![None; choices.len()],
            };
            set_choices(&mut record, choices, data, several);
            record
        }
        Outcome::Failed { status, message } => error_record(
            row,
            id,
            input,
            fingerprint,
            RecordError {
                kind: batch::results::FAILED_KIND,
                status,
                message,
            },
            1,
            from.took_ms,
            0.0,
        ),
        Outcome::NotRun => unreachable!("a row never run has no record"),
    };
    record.mode = Some(Mode::Batch);
    record.batch_id = Some(from.batch_id);
    record
}

/// Plans each row and sends those that need it. Returns whether the whole input was read
/// (so compaction may move the records of rows that left it to the stale file), how many rows
/// were read, and how many of them were this shard's.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    shared: &Arc<Shared>,
    renderer: &Renderer,
    builder: &Builder,
    planner: &mut Planner,
    rows: &mut mpsc::Receiver<RowResult>,
    opts: &RunOptions,
    tx: &mpsc::Sender<Msg>,
    pass: &mut batch::Pass,
) -> (bool, u64, u64) {
    let job = &shared.job;
    let stop = shared.stopper.signals.stop.clone();
    let max_output = job.params.max_output_tokens();
    let semaphore = Arc::new(Semaphore::new(job.concurrency));
    let mut tasks = JoinSet::new();
    let mut seen = 0u64;
    let mut complete = false;
    let mut read_failed = false;
    let mut owned = 0u64;
    let keying = keying(job);
    let mut send_online: Option<Prepared> = None;

    loop {
        if opts.limit.is_some_and(|l| seen >= l) {
            break;
        }
        let item: RowResult = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = rows.recv() => match r {
                Some(r) => r,
                None => { complete = !read_failed; break }
            },
        };
        seen += 1;
        while tasks.try_join_next().is_some() {}
        let prepared = match item {
            Err(e) => {
                read_failed |= e.fatal;
                Err((e.number, e.number.to_string(), Map::new(), e.message))
            }
            Ok(row) => builder
                .prepare(&job.input, renderer, row)
                .map_err(|(row, msg)| (row.number, row.id, row.fields, msg)),
        };
        // Another shard's row: not this run's business at all.
        let mine = match &prepared {
            Ok(p) => crate::shard::owns(job, p),
            Err((number, ..)) => crate::shard::owns_unreadable(job, *number),
        };
        if !mine {
            continue;
        }
        owned += 1;
        let p = match prepared {
            Ok(p) => p,
            Err((number, id, input, message)) => {
                let msg = match planner.plan_input_error(number, &id, &message, &input) {
                    Err(e) => {
                        shared.stop(Stop::Write(write_stop_message(&e)));
                        break;
                    }
                    Ok(Decision::WriteError) => {
                        tracing::warn!("{message}");
                        Msg::Finished {
                            record: Box::new(error_record(
                                number,
                                id,
                                input,
                                None,
                                RecordError {
                                    kind: ErrorKind::Input,
                                    status: None,
                                    message,
                                },
                                0,
                                0,
                                0.0,
                            )),
                            retries: 0,
                            rate_limited: 0,
                            slot: None,
                        }
                    }
                    Ok(_) => Msg::Skipped { ok: false },
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let idh = keying.id_hash(&p.row.id);
        let decision = match planner.plan_keyed(&p, idh) {
            Ok(d) => d,
            Err(e) => {
                shared.stop(Stop::Write(write_stop_message(&e)));
                break;
            }
        };
        let routed = match decision {
            Decision::Send => pass.route(&p.fingerprint, idh),
            _ => pass.touch(&p.fingerprint, idh).map(|()| batch::Route::New),
        };
        let route = match routed {
            Ok(r) => r,
            Err(e) => {
                shared.stop(Stop::Write(format!("cannot read the batch results: {e}")));
                break;
            }
        };
        let msg = match (decision, route) {
            (Decision::Done, _) => Some(Msg::Skipped { ok: true }),
            (Decision::DoneFailed, _) => Some(Msg::Skipped { ok: false }),
            (Decision::Copy, _) => Some(Msg::Copied),
            (Decision::WriteError, _) => unreachable!("only for unreadable rows"),
            (Decision::Send, batch::Route::Result { outcome, from }) => {
                let Prepared {
                    row,
                    fingerprint,
                    request,
                } = p;
                let record = batch_record(
                    shared,
                    row.number,
                    row.id,
                    row.fields,
                    Some(&request.messages),
                    &fingerprint,
                    outcome,
                    from,
                );
                Some(Msg::Finished {
                    record: Box::new(record),
                    retries: 0,
                    rate_limited: 0,
                    slot: None,
                })
            }
            (Decision::Send, batch::Route::InFlight) => Some(Msg::InFlight),
            // Pending: `batch collect` sends nothing.
            (Decision::Send, batch::Route::New) if opts.collect_only => None,
            (Decision::Send, batch::Route::New) if job.mode == Mode::Batch => {
                match add_to_batch(shared, pass, &p, idh) {
                    Ok(m) => m,
                    Err(()) => break,
                }
            }
            (Decision::Send, batch::Route::New) => {
                send_online = Some(p);
                None
            }
        };
        if let Some(m) = msg {
            if tx.send(m).await.is_err() {
                break;
            }
            continue;
        }
        let Some(p) = send_online.take() else {
            continue;
        };
        // Counting with tiktoken is the dearest step of a row and runs here, in the one
        // dispatcher: do it only when something uses the count, a tokens-per-minute limit (the
        // job's or one learned from headers) or a budget.
        let counted = job.max_cost_usd.is_some() || shared.pacer.paces_tokens();
        let prompt_tokens = if counted {
            shared.backend.counter.count_prompt(&p.request.messages)
                + *shared
                    .schema_tokens
                    .get_or_init(|| schema_tokens(&shared.job, &*shared.backend.counter))
        } else {
            0
        };
        // `n` choices are billed (and paced) as n times the output.
        let out_cap = max_output.unwrap_or(0) * job.params.choices();
        let pace_tokens = prompt_tokens + out_cap;
        // The budget: the whole output's spend, plus every request in flight at its worst
        // case. `Job` refuses a budget without a completion cap, so the bound is a bound.
        let bound = shared
            .price(None)
            .map(|pr| pr.bound(prompt_tokens, out_cap))
            .unwrap_or(0.0);
        // While requests in flight hold reservations, wait for them to settle before calling
        // the budget spent: a stop then means the output's spend is really at the cap, so the
        // same command run again sends nothing.
        let fits = loop {
            let released = shared.released.notified();
            {
                let mut b = shared.budget.lock().unwrap();
                match b.cap {
                    Some(cap) if b.total() + b.batches + b.reserved + bound > cap => {
                        if b.holders == 0 {
                            break Err((b.total(), cap));
                        }
                    }
                    _ => {
                        b.reserved += bound;
                        b.holders += 1;
                        break Ok(());
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break Err((f64::NAN, 0.0)),
                _ = released => {}
            }
        };
        match fits {
            Ok(()) => {}
            Err((spent, _)) if spent.is_nan() => break,
            Err((spent, cap)) => {
                shared.stop(Stop::Job(format!(
                    "the budget is spent: ${spent:.6} of ${cap:.6} in this output so far, and the \
                     next request could cost up to ${bound:.6}. Stopped dispatching at row {}; \
                     raise run.max_cost_usd (or --max-cost) and run again to go on",
                    p.row.number
                )));
                break;
            }
        }
        let reservation = Reservation {
            sh: shared.clone(),
            bound,
            settled: false,
        };
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = semaphore.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = shared.pacer.acquire(pace_tokens) => {}
        }
        let sh = shared.clone();
        tasks.spawn(async move {
            let msg = process(
                &sh,
                p,
                reservation,
                pace_tokens,
                counted.then_some(prompt_tokens),
            )
            .await;
            let m = match msg {
                // The slot goes with the record, released once the record is on disk.
                Some(Msg::Finished {
                    record,
                    retries,
                    rate_limited,
                    ..
                }) => Msg::Finished {
                    record,
                    retries,
                    rate_limited,
                    slot: Some(permit),
                },
                Some(m) => m,
                None => return,
            };
            let _ = sh.tx.send(m).await;
        });
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                tracing::error!("a row task panicked (its row stays pending): {e}");
            }
        }
    }
    let complete = complete && opts.limit.is_none_or(|l| seen < l);
    (complete, seen, owned)
}

/// Puts a row into this run's batch files, within the budget at its worst case. `Err`: the
/// job stopped (budget, or the file cannot be written).
fn add_to_batch(
    shared: &Arc<Shared>,
    pass: &mut batch::Pass,
    p: &Prepared,
    idh: u64,
) -> Result<Option<Msg>, ()> {
    let job = &shared.job;
    let max_output = job.params.max_output_tokens();
    let bound = if job.max_cost_usd.is_some() {
        let n = shared.backend.counter.count_prompt(&p.request.messages);
        shared
            .price(None)
            .map(|pr| pr.bound(n, max_output.unwrap_or(0) * job.params.choices()))
            .unwrap_or(0.0)
    } else {
        0.0
    };
    {
        let mut b = shared.budget.lock().unwrap();
        if let Some(cap) = b.cap {
            let committed = b.total() + b.batches;
            if committed + bound > cap {
                drop(b);
                // Not a stop yet: the files written so far fit, and are submitted first.
                pass.budget_stop = Some(format!(
                    "the budget is spent: ${committed:.6} of ${cap:.6} in this output and its \
                     batches at their worst case, and the next request could cost up to \
                     ${bound:.6}. Stopped adding rows at row {}; raise run.max_cost_usd (or \
                     --max-cost) and run again to go on",
                    p.row.number
                ));
                return Err(());
            }
            b.batches += bound;
        }
    }
    let stream = job.params.stream.unwrap_or(false);
    match pass.add(
        p.row.number,
        &p.fingerprint,
        idh,
        &p.request.body,
        stream,
        bound,
    ) {
        Ok(Ok(())) => Ok(Some(Msg::Batched)),
        Ok(Err(too_big)) => Ok(Some(Msg::Finished {
            record: Box::new(error_record(
                p.row.number,
                p.row.id.clone(),
                p.row.fields.clone(),
                Some(request::hex(&p.fingerprint)),
                RecordError {
                    kind: ErrorKind::BadRequest,
                    status: None,
                    message: too_big,
                },
                0,
                0,
                0.0,
            )),
            retries: 0,
            rate_limited: 0,
            slot: None,
        })),
        Err(e) => {
            shared.stop(Stop::Write(write_stop_message(&e)));
            Err(())
        }
    }
}

/// One request's attempts: retries, 429s, and what may have been billed without an answer.
struct Sending {
    retrier: crate::retry::Retrier,
    attempts: u32,
    rate_limited: u32,
    unconfirmed: f64,
    pace_tokens: u64,
    prompt_tokens: Option<u64>,
}

/// Sends one request until it is answered or fails for good. `None`: the row stays pending
/// (the job stopped, a signal, an outage).
async fn send(
    sh: &Arc<Shared>,
    row: u64,
    request: &request::Request,
    choices: u64,
    started: Instant,
    st: &mut Sending,
) -> Option<Result<Completion, ProviderError>> {
    let signals = &sh.stopper.signals;
    // The worst case of one attempt that may have been billed without an answer.
    let worst = |prompt_tokens: &mut Option<u64>| -> f64 {
        let n = *prompt_tokens
            .get_or_insert_with(|| sh.backend.counter.count_prompt(&request.messages));
        let out = sh
            .job
            .params
            .max_output_tokens()
            .unwrap_or(crate::job::ASSUMED_MAX_OUTPUT);
        sh.price(None)
            .map(|pr| pr.bound(n, out * choices))
            .unwrap_or(0.0)
    };
    loop {
        st.attempts += 1;
        let result = tokio::select! {
            biased;
            _ = signals.abort.cancelled() => {
                // Cancelled after it was sent: the server may bill it anyway.
                st.unconfirmed += worst(&mut st.prompt_tokens);
                return None;
            }
            r = sh.backend.provider.complete(request) => r,
        };
        let e = match result {
            Ok(c) => {
                sh.pacer.observe(c.rate_limits.as_ref());
                sh.pacer.succeeded();
                sh.breaker.lock().unwrap().success();
                return Some(Ok(c));
            }
            Err(e) => e,
        };
        if e.maybe_billed {
            st.unconfirmed += worst(&mut st.prompt_tokens);
        }
        if e.kind == ErrorKind::RateLimited {
            st.rate_limited += 1;
            sh.pacer.rate_limited(e.retry_after, e.rate_limits.as_ref());
        } else {
            sh.pacer.observe(e.rate_limits.as_ref());
        }
        if e.kind.disposition() == Disposition::StopJob {
            sh.stop(Stop::Job(job_stop_message(&sh.job, &e)));
            return None;
        }
        let tripped = sh.breaker.lock().unwrap().failure(&e, sh.job.outage);
        if let Some(cause) = tripped {
            sh.stop(Stop::Job(format!(
                "{}: {cause}. Rows not done stay pending: run the same command again \
                 once the endpoint is back",
                sh.job.base_url
            )));
            return None;
        }
        match st.retrier.next_delay(&e) {
            Some(delay) => {
                tracing::debug!(row, attempt = st.attempts, "retrying in {delay:?}: {e}");
                // A retry is a new request: after a stop, the row waits for the rerun.
                tokio::select! {
                    _ = signals.stop.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                if st.prompt_tokens.is_none() && sh.pacer.paces_tokens() {
                    // A token limit was learned since this row was dispatched.
                    let n = sh.backend.counter.count_prompt(&request.messages);
                    st.pace_tokens += n;
                    st.prompt_tokens = Some(n);
                }
                tokio::select! {
                    _ = signals.stop.cancelled() => return None,
                    _ = sh.pacer.acquire(st.pace_tokens) => {}
                }
            }
            None if e.kind.disposition() == Disposition::Retry
                && sh.breaker.lock().unwrap().nothing_succeeded_since(started) =>
            {
                // Every request has failed since this row began: an outage is not a verdict
                // on the row. Keep trying until something succeeds (then the row fails as
                // usual) or the breaker stops the job (the row stays pending).
                tokio::select! {
                    _ = signals.stop.cancelled() => return None,
                    _ = tokio::time::sleep(OUTAGE_PROBE) => {}
                }
            }
            None => return Some(Err(e)),
        }
    }
}

/// A row's completion once its shape is judged: its choices, what was kept of each, and what
/// every attempt cost.
struct Shaped {
    choices: Vec<crate::provider::Choice>,
    data: Vec<Option<serde_json::Value>>,
    invalid: Vec<crate::output::InvalidAttempt>,
    /// Still wrong after the last attempt: the row fails with this kind and message.
    failure: Option<(ErrorKind, String)>,
    usage: Usage,
}

fn add_usage(a: &mut Usage, b: &Usage) {
    a.prompt_tokens += b.prompt_tokens;
    a.completion_tokens += b.completion_tokens;
    a.total_tokens += b.total_tokens;
    a.cached_tokens = match (a.cached_tokens, b.cached_tokens) {
        (None, None) => None,
        (x, y) => Some(x.unwrap_or(0) + y.unwrap_or(0)),
    };
    a.reasoning_tokens = match (a.reasoning_tokens, b.reasoning_tokens) {
        (None, None) => None,
        (x, y) => Some(x.unwrap_or(0) + y.unwrap_or(0)),
    };
    a.estimated |= b.estimated;
}

/// Judges every choice against the job's shape and asks again for those that break it, up to
/// `max_invalid` times, each time for only the failing choices (with `n` set to how many).
/// Every attempt's tokens are counted; a regeneration that the budget has no room for is not
/// sent. `None`: the row stays pending.
#[allow(clippy::too_many_arguments)]
async fn shape_up(
    sh: &Arc<Shared>,
    shape: &crate::shape::Shape,
    p: &Prepared,
    first: Completion,
    reservation: &mut Reservation,
    started: Instant,
    st: &mut Sending,
) -> Option<(Shaped, Completion)> {
    use crate::shape::Verdict;
    let mut usage = usage_of(sh, &p.request.messages, &first);
    let mut choices = first.all_choices();
    let mut data: Vec<Option<serde_json::Value>> = vec![None; choices.len()];
    let mut invalid = Vec::new();
    let mut refused: Option<String> = None;
    let mut attempt = 1u32;
    let mut last = first;
    loop {
        let mut failing = Vec::new();
        for (i, c) in choices.iter().enumerate() {
            if data[i].is_some() {
                continue; // judged fine on an earlier attempt
            }
            match shape.judge(&c.text, c.refusal.as_deref(), &p.row.fields) {
                Verdict::Ok(d) => data[i] = Some(d.unwrap_or(serde_json::Value::Null)),
                Verdict::Refused(r) => refused = Some(r),
                Verdict::Invalid(problems) => {
                    invalid.push(crate::output::InvalidAttempt {
                        attempt,
                        variant: i as u32,
                        problems,
                    });
                    failing.push(i);
                }
            }
        }
        let failure = if let Some(r) = &refused {
            Some((ErrorKind::Refusal, format!("the model refused: {r}")))
        } else if failing.is_empty() {
            None
        } else if attempt > shape.max_invalid {
            let quoted: Vec<String> = invalid
                .iter()
                .filter(|a| a.attempt == attempt)
                .map(|a| format!("variant {}: {}", a.variant + 1, a.problems.join("; ")))
                .collect();
            Some((
                ErrorKind::InvalidOutput,
                format!(
                    "still wrong after {attempt} attempt(s) ([output] max_invalid = {}): {}",
                    shape.max_invalid,
                    quoted.join(" | ")
                ),
            ))
        } else {
            // Ask again, for the failing choices only, within the budget.
            let k = failing.len() as u64;
            let n = st
                .prompt_tokens
                .get_or_insert_with(|| sh.backend.counter.count_prompt(&p.request.messages));
            let out = sh.job.params.max_output_tokens().unwrap_or(0);
            let bound = sh
                .price(None)
                .map(|pr| pr.bound(*n, out * k))
                .unwrap_or(0.0);
            if !reservation.grow(bound) {
                Some((
                    ErrorKind::InvalidOutput,
                    format!(
                        "not asked again: the budget has no room for another attempt; {}",
                        invalid
                            .iter()
                            .filter(|a| a.attempt == attempt)
                            .map(|a| a.problems.join("; "))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    ),
                ))
            } else {
                attempt += 1;
                let body = with_choices(&p.request.body, k, sh.job.params.n.is_some());
                let again = request::Request {
                    messages: p.request.messages.clone(),
                    body,
                };
                let c = match send(sh, p.row.number, &again, k, started, st).await? {
                    Ok(c) => c,
                    Err(e) => {
                        // The row's request failed outright this time: it fails as such.
                        return Some((
                            Shaped {
                                choices,
                                data,
                                invalid,
                                failure: Some((e.kind, e.message)),
                                usage,
                            },
                            last,
                        ));
                    }
                };
                add_usage(&mut usage, &usage_of(sh, &again.messages, &c));
                for (slot, new) in failing.iter().zip(c.all_choices()) {
                    choices[*slot] = new;
                }
                last = c;
                continue;
            }
        };
        let data = data.into_iter().collect();
        return Some((
            Shaped {
                choices,
                data,
                invalid,
                failure,
                usage,
            },
            last,
        ));
    }
}

/// The record of a row that got an answer (online or from a batch); the callers add what
/// only they know.
#[allow(clippy::too_many_arguments)]
fn answered_record(
    row: u64,
    id: String,
    input: Map<String, serde_json::Value>,
    c: Completion,
    usage: Usage,
    cost: Option<f64>,
    attempts: u32,
    latency_ms: u64,
    fingerprint: Option<String>,
) -> Record {
    Record {
        completion: Some(c.text),
        finish_reason: c.finish_reason,
        model: c.model,
        usage: Some(usage),
        cost_usd: cost,
        ..Record::new(
            row,
            id,
            Status::Ok,
            input,
            fingerprint,
            attempts,
            latency_ms,
        )
    }
}

/// What the shape judged wrong: the attempts that were not kept and, if the row still fails,
/// its error.
fn judged_wrong(
    record: &mut Record,
    invalid: Vec<crate::output::InvalidAttempt>,
    failure: Option<(ErrorKind, String)>,
) {
    record.invalid_attempts = (!invalid.is_empty()).then_some(invalid);
    if let Some((kind, message)) = failure {
        record.status = Status::Error;
        record.error = Some(RecordError {
            kind,
            status: None,
            message,
        });
    }
}

/// The record's `data` (the first choice's) and, when the job asks for several, `variants`.
fn set_choices(
    record: &mut Record,
    choices: Vec<crate::provider::Choice>,
    data: Vec<Option<serde_json::Value>>,
    several: bool,
) {
    record.data = data.first().cloned().flatten();
    if several {
        record.variants = Some(
            choices
                .into_iter()
                .zip(data)
                .map(|(c, d)| crate::output::Variant {
                    completion: c.text,
                    finish_reason: c.finish_reason,
                    data: d,
                })
                .collect(),
        );
    }
}

/// Judges every choice once, with no asking again: each choice's data, what broke, and the
/// row's failure if any choice did.
type Judged = (
    Vec<Option<serde_json::Value>>,
    Vec<crate::output::InvalidAttempt>,
    Option<(ErrorKind, String)>,
);

fn judge_once(
    shape: &crate::shape::Shape,
    choices: &[crate::provider::Choice],
    row: &Map<String, serde_json::Value>,
) -> Judged {
    use crate::shape::Verdict;
    let mut data = Vec::with_capacity(choices.len());
    let mut invalid = Vec::new();
    let mut failure = None;
    for (i, c) in choices.iter().enumerate() {
        match shape.judge(&c.text, c.refusal.as_deref(), row) {
            Verdict::Ok(d) => data.push(d),
            Verdict::Refused(r) => {
                data.push(None);
                failure = Some((ErrorKind::Refusal, format!("the model refused: {r}")));
            }
            Verdict::Invalid(problems) => {
                data.push(None);
                if failure.is_none() {
                    failure = Some((
                        ErrorKind::InvalidOutput,
                        format!("variant {}: {}", i + 1, problems.join("; ")),
                    ));
                }
                invalid.push(crate::output::InvalidAttempt {
                    attempt: 1,
                    variant: i as u32,
                    problems,
                });
            }
        }
    }
    (data, invalid, failure)
}

/// The body asking for `k` choices: the row's own body when that is what it asked.
fn with_choices(body: &bytes::Bytes, k: u64, had_n: bool) -> bytes::Bytes {
    if k == 1 && !had_n {
        return body.clone();
    }
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).expect("our own body parses");
    if k == 1 {
        v.remove("n");
    } else {
        v.insert("n".into(), k.into());
    }
    bytes::Bytes::from(serde_json::to_vec(&v).expect("serializes"))
}

/// Sends one row with retries, then (when the job has a shape) asks again for what breaks
/// it. `None`: the row stays pending (job stopped or interrupted).
async fn process(
    sh: &Arc<Shared>,
    p: Prepared,
    mut reservation: Reservation,
    pace_tokens: u64,
    prompt_tokens: Option<u64>,
) -> Option<Msg> {
    let started = Instant::now();
    let mut st = Sending {
        retrier: sh.retry.start(),
        attempts: 0,
        rate_limited: 0,
        unconfirmed: 0.0,
        pace_tokens,
        prompt_tokens,
    };
    let pending = |reservation: Reservation, unconfirmed: f64| {
        reservation.settle(0.0, unconfirmed);
        (unconfirmed > 0.0).then_some(Msg::Unconfirmed(unconfirmed))
    };
    let choices = sh.job.params.choices();
    let Some(outcome) = send(sh, p.row.number, &p.request, choices, started, &mut st).await else {
        return pending(reservation, st.unconfirmed);
    };
    let shaped = match (outcome, sh.shape.as_ref()) {
        (Ok(c), Some(shape)) => {
            match shape_up(sh, shape, &p, c, &mut reservation, started, &mut st).await {
                Some((s, c)) => Ok((c, Some(s))),
                None => return pending(reservation, st.unconfirmed),
            }
        }
        (Ok(c), None) => Ok((c, None)),
        (Err(e), _) => Err(e),
    };
    let Sending {
        attempts,
        rate_limited,
        unconfirmed,
        ..
    } = st;
    let latency_ms = started.elapsed().as_millis() as u64;
    let Prepared {
        row,
        fingerprint,
        request,
    } = p;
    let fingerprint = request::hex(&fingerprint);
    let record = match shaped {
        Ok((c, shaped)) => {
            let usage = match &shaped {
                Some(s) => s.usage,
                None => usage_of(sh, &request.messages, &c),
            };
            let cost = sh.price(c.model.as_deref()).map(|pr| pr.cost(&usage));
            let several = sh.job.params.choices() > 1 || !c.choices.is_empty();
            let ttft_ms = c.ttft_ms;
            // Plain text with several choices keeps them all; one choice needs no copy.
            let plain_choices = (shaped.is_none() && several).then(|| c.all_choices());
            let mut record = answered_record(
                row.number,
                row.id,
                row.fields,
                c,
                usage,
                cost,
                attempts,
                latency_ms,
                Some(fingerprint),
            );
            record.unconfirmed_usd = (unconfirmed > 0.0).then_some(unconfirmed);
            record.ttft_ms = ttft_ms;
            match (shaped, plain_choices) {
                (Some(s), _) => {
                    if let Some((_, message)) = &s.failure {
                        tracing::warn!("row {}: {message}", record.row);
                    }
                    judged_wrong(&mut record, s.invalid, s.failure);
                    // A regenerated first choice replaces the first answer's.
                    if let Some(first) = s.choices.first() {
                        record.completion = Some(first.text.clone());
                        record.finish_reason = first.finish_reason.clone();
                    }
                    set_choices(&mut record, s.choices, s.data, several);
                }
                (None, Some(choices)) => {
                    let none = vec![None; choices.len()];
                    set_choices(&mut record, choices, none, true);
                }
                (None, None) => {}
            }
            record
        }
        Err(e) => {
            tracing::warn!(
                "row {}: failed after {attempts} attempt(s): {e}",
                row.number
            );
            error_record(
                row.number,
                row.id,
                row.fields,
                Some(fingerprint),
                RecordError {
                    kind: e.kind,
                    status: e.status,
                    message: e.message,
                },
                attempts,
                latency_ms,
                unconfirmed,
            )
        }
    };
    reservation.settle(record.cost_usd.unwrap_or(0.0), unconfirmed);
    Some(Msg::Finished {
        record: Box::new(record),
        retries: attempts - 1,
        rate_limited,
        slot: None,
    })
}

/// The server's usage, or, when it sent none, the tokenizer's count marked as estimated:
/// never a silent 0.
fn usage_of(sh: &Shared, messages: &[crate::chat::Message], c: &Completion) -> Usage {
    if let Some(u) = c.usage {
        return u;
    }
    if !sh.no_usage_warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "{} sent no `usage`: counting tokens with the tokenizer instead; those records say \
             \"estimated\": true",
            sh.job.base_url
        );
    }
    let prompt = sh.backend.counter.count_prompt(messages);
    let completion = sh.backend.counter.count_text(&c.text);
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cached_tokens: None,
        reasoning_tokens: None,
        estimated: true,
    }
}

#[allow(clippy::too_many_arguments)]
fn error_record(
    row: u64,
    id: String,
    input: serde_json::Map<String, serde_json::Value>,
    fingerprint: Option<String>,
    error: RecordError,
    attempts: u32,
    latency_ms: u64,
    unconfirmed: f64,
) -> Record {
    let id = if id.is_empty() { row.to_string() } else { id };
    Record {
        error: Some(error),
        unconfirmed_usd: (unconfirmed > 0.0).then_some(unconfirmed),
        ..Record::new(
            row,
            id,
            Status::Error,
            input,
            fingerprint,
            attempts,
            latency_ms,
        )
    }
}

/// The API's error table, as advice: what to check when the provider refuses the job.
fn job_stop_message(job: &Job, e: &ProviderError) -> String {
    let status = e.status.map(|s| format!("HTTP {s}")).unwrap_or_default();
    match e.kind {
        ErrorKind::Quota => format!(
            "{} refused the request for lack of quota ({status} insufficient_quota: {}). \
             Check your plan and billing details, then run again: finished rows are kept",
            job.base_url, e.message
        ),
        ErrorKind::Endpoint => format!(
            "{}{}: {}. No row was marked failed: the run after the fix sends them all",
            job.base_url,
            e.status
                .map(|s| format!(" answered HTTP {s}"))
                .unwrap_or_default(),
            e.message
        ),
        _ => format!(
            "{} refused the API key ({status}: {}). Check or regenerate the key in {} \
             (environment or .env) and that it may use model `{}`; finished rows are kept",
            job.base_url, e.message, job.api_key_env, job.model
        ),
    }
}

fn write_stop_message(e: &Error) -> String {
    format!(
        "cannot write {e}. Stopped sending; requests in flight were written if the disk \
         allowed. Free space (or fix the folder's permissions) and run the same command again: \
         every row written is kept, the rest are sent then"
    )
}

struct WriterEnd {
    appender: Appender,
    stats: Stats,
    progress: Progress,
    /// The first write error: dispatching was stopped when it happened.
    failed: Option<Error>,
}

/// The one task that writes: journal appends, counters, progress. A write that fails stops
/// the dispatching at once; later batches are still tried, so rows in flight are kept if the
/// disk allows.
async fn write_records(
    mut rx: mpsc::Receiver<Msg>,
    mut appender: Appender,
    mut progress: Progress,
    billed: bool,
    stopper: Arc<Stopper>,
) -> WriterEnd {
    let mut stats = Stats::default();
    let mut failed: Option<Error> = None;
    let mut slots = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Take everything already queued, then flush once: durable per batch, cheap per row.
        while let Some(m) = next {
            match m {
                Msg::Finished {
                    record,
                    retries,
                    rate_limited,
                    slot,
                } => {
                    appender.append(&record);
                    stats.add(&record, retries, rate_limited, billed);
                    slots.extend(slot);
                }
                Msg::Skipped { ok: true } => stats.skipped_ok += 1,
                Msg::Skipped { ok: false } => stats.skipped_failed += 1,
                Msg::Copied => stats.copied += 1,
                Msg::Unconfirmed(usd) => stats.pending_unconfirmed_usd += usd,
                Msg::InFlight => stats.batch_in_flight += 1,
                Msg::Batched => stats.batch_rows += 1,
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = appender.flush() {
            if failed.is_none() {
                stopper.stop(Stop::Write(write_stop_message(&e)));
                failed = Some(e);
            }
        }
        // Durable (or dispatching is stopped): the rows' slots may go to new rows.
        slots.clear();
        progress.update(&stats, false);
    }
    progress.update(&stats, true);
    WriterEnd {
        appender,
        stats,
        progress,
        failed,
    }
}

/// Step 3: compaction into input order, the CSV, the summary, the carried spend, the exit code.
#[allow(clippy::too_many_arguments)]
fn finish(
    job: Job,
    budget: Mutex<Budget>,
    stats: &mut Stats,
    stopper: Arc<Stopper>,
    signals: Signals,
    complete: bool,
    spool: Option<std::path::PathBuf>,
    failed: Option<Error>,
    unwritten: usize,
    header: Option<Vec<String>>,
) -> Result<(Summary, i32), Error> {
    let budget = budget.into_inner().unwrap();
    if failed.is_none() {
        if let Some(spool) = &spool {
            let c = ledger::compact(
                &job.output,
                spool,
                complete,
                keying(&job),
                &Sidecars {
                    stale: job.stale_path(),
                    rejected: job.rejected_path(),
                },
            )?;
            // Rows a batch holds are not waiting on a rerun: the summary counts them apart.
            stats.pending = c
                .pending
                .saturating_sub(stats.batch_requests_submitted + stats.batch_in_flight);
            stats.stale_moved = c.stale;
        }
    } else if unwritten > 0 {
        tracing::error!(
            "{unwritten} finished rows could not be written; they are pending and will be sent again"
        );
    }
    if let Some(spool) = &spool {
        let _ = std::fs::remove_file(spool);
    }
    if failed.is_none() {
        if let Some(csv) = &job.csv {
            let opts = CsvOptions {
                escape_formulas: job.csv_escape_formulas,
                // The schema's top-level properties, in its order.
                data_columns: job.shape.schema.as_ref().and_then(|(_, v)| {
                    v.get("properties")
                        .and_then(serde_json::Value::as_object)
                        .map(|p| p.keys().cloned().collect())
                }),
            };
            crate::export::export_csv(&job.output, csv, header.as_deref(), &opts)?;
        }
    }
    if stats.pending_unconfirmed_usd > 0.0 {
        let carried = Carried {
            unconfirmed_usd: Carried::read(&job.spend_path())
                .map(|c| c.unconfirmed_usd)
                .unwrap_or(0.0)
                + stats.pending_unconfirmed_usd,
        };
        if let Err(e) = carried.write(&job.spend_path()) {
            tracing::error!("cannot record the unconfirmed spend: {e}");
        }
    }
    let stop = stopper.why.lock().unwrap().clone();
    let interrupt = signals.interrupted();
    let stopped = match (&stop, interrupt) {
        (Some(s), _) => Some(s.message().to_string()),
        (None, Some(i)) => Some(format!(
            "interrupted ({}); run the same command again to resume",
            i.name()
        )),
        (None, None) => None,
    };
    let mut summary = stats.summary(stopped);
    summary.spent_usd = Some(budget.total());
    summary.budget_usd = budget.cap;
    summary.unconfirmed_usd = budget.unconfirmed;
    if let Err(e) = summary.write(&job.summary_path()) {
        if failed.is_none() {
            return Err(e);
        }
        tracing::error!("cannot write the summary: {e}");
    }
    let code = match (stop, interrupt) {
        (Some(_), _) => EXIT_STOPPED,
        (None, Some(i)) => i.exit_code(),
        (None, None) if summary.rows_failed > 0 || summary.rows_skipped_failed > 0 => {
            EXIT_ROWS_FAILED
        }
        (None, None) => EXIT_OK,
    };
    Ok((summary, code))
}
