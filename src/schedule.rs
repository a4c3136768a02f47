//! The run: rows stream in, each is rendered, fingerprinted and either skipped (done before)
//! or dispatched under the concurrency limit, the pacer and the budget; each request is
//! retried per the retry policy; one writer task appends every finished row to the journal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cost::Price;
use crate::error::{Error, EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED, EXIT_STOPPED};
use crate::export::CsvOptions;
use crate::input::{Row, RowResult, Source};
use crate::job::{InputFormat, Job};
use crate::journal::{self, Appender, Resume};
use crate::output::{Record, RecordError, Status};
use crate::pace::Pacer;
use crate::provider::{
    openai, Completion, Disposition, ErrorKind, Message, Provider, ProviderError, Request,
    TokenCounter,
};
use crate::render::Renderer;
use crate::report::{Progress, Stats, Summary};
use crate::retry::RetryPolicy;

/// The output tokens a request is assumed to use for the budget when the job sets no
/// `max_tokens` (the API's own cap is model-specific).
pub const ASSUMED_MAX_OUTPUT: u64 = 4096;

pub struct RunOptions {
    pub limit: Option<u64>,
    pub fresh: bool,
    pub retry_failed: bool,
    pub quiet: bool,
}

/// The provider and the tokenizer that matches it, built once per run.
pub struct Backend {
    pub provider: Arc<dyn Provider>,
    pub counter: Arc<dyn TokenCounter>,
    /// The job's `[pricing]`, or `None` to look the returned model up in the built-in table.
    pub pricing: Option<Price>,
}

impl Backend {
    /// The price of a completion from `model` (as returned), falling back to the job's model.
    pub fn price_for(&self, returned: Option<&str>, job_model: &str) -> Option<Price> {
        if !self.provider.is_billed() {
            return Some(Price {
                input: 0.0,
                cached_input: 0.0,
                output: 0.0,
            });
        }
        self.pricing
            .or_else(|| returned.and_then(crate::cost::lookup))
            .or_else(|| crate::cost::lookup(job_model))
    }
}

/// One row, rendered: what is needed to send it and to record it.
pub struct Prepared {
    pub row: Row,
    pub request: Request,
    pub fingerprint: String,
}

/// Renders a row into its request and fingerprint; the error text names the field.
pub fn prepare(job: &Job, renderer: &Renderer, row: Row) -> Result<Prepared, (Row, String)> {
    let messages: Vec<Message> = match renderer.render(&row.fields) {
        Ok(m) => m,
        Err(e) => {
            let msg = format!(
                "{}: row {}: {e}",
                crate::input::describe(&job.input),
                row.number
            );
            return Err((row, msg));
        }
    };
    let body = openai::request_body(&job.model, &messages, &job.params);
    let fingerprint = fingerprint(&body);
    Ok(Prepared {
        row,
        request: Request { messages, body },
        fingerprint,
    })
}

/// 128 bits of the SHA-256 of the request body, in hex.
pub fn fingerprint(body: &[u8]) -> String {
    journal::to_hex(&Sha256::digest(body)[..16])
}

/// Whether an earlier run already settled this row (same request, and ok or not retried).
fn already_done(resume: &Resume, row: u64, fp: Option<&str>, retry_failed: bool) -> Option<bool> {
    let done = resume.get(row)?;
    let same = match (done.fingerprint, fp) {
        (Some(a), Some(b)) => journal::fingerprint_bytes(b) == Some(a),
        (None, None) => true, // an input error, still an input error
        _ => false,
    };
    if !same {
        return None;
    }
    if done.ok {
        Some(true)
    } else if fp.is_none() || !retry_failed {
        // Input errors are checked again on every run for free; only if the row still fails
        // the same way is it left as it is.
        Some(false)
    } else {
        None
    }
}

enum Msg {
    Finished {
        record: Box<Record>,
        retries: u32,
        rate_limited: u32,
    },
    Skipped {
        ok: bool,
    },
}

/// Why dispatching stopped early.
#[derive(Debug, Clone)]
enum Stop {
    /// Auth, quota, budget: exit 2 with this message.
    Job(String),
}

struct Shared {
    job: Job,
    backend: Backend,
    pacer: Pacer,
    retry: RetryPolicy,
    cancel: CancellationToken,
    stop: Mutex<Option<Stop>>,
    budget: Mutex<Budget>,
    unknown_price_warned: AtomicBool,
    tx: mpsc::Sender<Msg>,
}

#[derive(Default)]
struct Budget {
    spent: f64,
    reserved: f64,
}

impl Shared {
    fn stop(&self, why: Stop) {
        let mut s = self.stop.lock().unwrap();
        if s.is_none() {
            let Stop::Job(m) = &why;
            tracing::error!("stopping the job: {m}");
            *s = Some(why);
        }
        drop(s);
        self.cancel.cancel();
    }

    fn price(&self, returned: Option<&str>) -> Option<Price> {
        let p = self.backend.price_for(returned, &self.job.model);
        if p.is_none() && !self.unknown_price_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "no price known for model `{}`: cost is recorded as null; add a [pricing] table to the job to set one",
                returned.unwrap_or(&self.job.model)
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
    cancel: CancellationToken,
) -> Result<(Summary, i32), Error> {
    let _lock = journal::Lock::acquire(&job.lock_path())?;
    if opts.fresh {
        for p in [
            Some(job.output.clone()),
            job.csv.clone(),
            Some(job.summary_path()),
        ]
        .into_iter()
        .flatten()
        {
            match std::fs::remove_file(&p) {
                Ok(()) => tracing::info!("--fresh: removed {}", p.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::Io { path: p, source: e }),
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
    let resume = journal::load(&job.output)?;
    if resume.records > 0 {
        tracing::info!(
            "{}: {} earlier records found; resuming",
            job.output.display(),
            resume.records
        );
    }
    let max_output = job.params.max_output_tokens();
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
    let source = Source {
        path: job.input.clone(),
        format: job.input_format,
        id_column: job.id_column.clone(),
    };
    let mut rows = source.stream(job.concurrency * 2 + 16)?;
    let appender = Appender::open(&job.output)?;

    let (tx, rx) = mpsc::channel::<Msg>(job.concurrency * 2 + 64);
    let billed = backend.provider.is_billed();
    let writer = tokio::spawn(write_records(
        rx,
        appender,
        Progress::new(
            opts.quiet,
            Some(&job.input),
            u64::from(job.input_format == crate::job::InputFormat::Csv),
            opts.limit,
        ),
        billed,
    ));

    let shared = Arc::new(Shared {
        pacer: Pacer::new(job.rpm, job.tpm),
        retry: RetryPolicy::new(job.max_retries),
        cancel: cancel.clone(),
        stop: Mutex::new(None),
        budget: Mutex::new(Budget::default()),
        unknown_price_warned: AtomicBool::new(false),
        tx: tx.clone(),
        backend,
        job,
    });
    let job = &shared.job;
    let semaphore = Arc::new(Semaphore::new(job.concurrency));
    let mut tasks = JoinSet::new();
    let mut seen = 0u64;

    loop {
        if opts.limit.is_some_and(|l| seen >= l) {
            break;
        }
        let item: RowResult = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = rows.recv() => match r { Some(r) => r, None => break },
        };
        seen += 1;
        while tasks.try_join_next().is_some() {}
        let prepared = match item {
            Err(e) => Err((e.number, String::new(), serde_json::Map::new(), e.message)),
            Ok(row) => prepare(job, &renderer, row)
                .map_err(|(row, msg)| (row.number, row.id, row.fields, msg)),
        };
        let p = match prepared {
            Ok(p) => p,
            Err((number, id, input, message)) => {
                let msg = if already_done(&resume, number, None, opts.retry_failed).is_some() {
                    Msg::Skipped { ok: false }
                } else {
                    tracing::warn!("{message}");
                    Msg::Finished {
                        record: Box::new(error_record(
                            number,
                            id,
                            input,
                            None,
                            ErrorKind::Input,
                            None,
                            message,
                            0,
                            0,
                        )),
                        retries: 0,
                        rate_limited: 0,
                    }
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
                continue;
            }
        };
        if let Some(ok) = already_done(
            &resume,
            p.row.number,
            Some(&p.fingerprint),
            opts.retry_failed,
        ) {
            if tx.send(Msg::Skipped { ok }).await.is_err() {
                break;
            }
            continue;
        }
        // Counting with tiktoken is the dearest step of a row and runs here, in the one
        // dispatcher: do it only when something uses the count, a tokens-per-minute limit (the
        // job's or one learned from headers) or a budget.
        let counted = job.max_cost_usd.is_some() || shared.pacer.paces_tokens();
        let prompt_tokens = if counted {
            shared.backend.counter.count_prompt(&p.request.messages)
        } else {
            0
        };
        let pace_tokens = prompt_tokens + max_output.unwrap_or(0);
        // The budget: what was billed, plus every request in flight at its worst case.
        let bound = shared
            .price(None)
            .map(|pr| pr.bound(prompt_tokens, max_output.unwrap_or(ASSUMED_MAX_OUTPUT)))
            .unwrap_or(0.0);
        if let Some(max) = job.max_cost_usd {
            let mut b = shared.budget.lock().unwrap();
            if b.spent + b.reserved + bound > max {
                drop(b);
                shared.stop(Stop::Job(format!(
                    "the budget of ${max:.4} would be exceeded: stopped dispatching at row {}; \
                     raise run.max_cost_usd (or --max-cost) and run again to go on",
                    p.row.number
                )));
                break;
            }
            b.reserved += bound;
        }
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            p = semaphore.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = shared.pacer.acquire(pace_tokens) => {}
        }
        let shared2 = shared.clone();
        tasks.spawn(async move {
            let msg = process(&shared2, p, pace_tokens, counted, bound).await;
            drop(permit);
            if let Some(m) = msg {
                let _ = shared2.tx.send(m).await;
            }
        });
    }
    drop(rows); // the reader thread ends when its channel closes
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                tracing::error!("a row task panicked: {e}");
            }
        }
    }
    drop(tx);
    let shared = Arc::into_inner(shared).expect("every task has finished");
    drop(shared.tx);
    let (appender, stats, progress) = writer
        .await
        .map_err(|e| Error::Other(format!("the writer task failed: {e}")))??;
    appender.finish()?;
    progress.finish();
    let job = shared.job;
    journal::compact(&job.output)?;
    if let Some(csv) = &job.csv {
        // A CSV input's header gives the columns in its order, even those no readable row had;
        // stdin cannot be read twice, so its columns come from the records like JSONL's.
        let header = match job.input_format {
            InputFormat::Csv if job.input.as_os_str() != "-" => {
                Some(job.source().reader()?.header().to_vec())
            }
            _ => None,
        };
        let opts = CsvOptions {
            escape_formulas: job.csv_escape_formulas,
        };
        crate::export::export_csv(&job.output, csv, header.as_deref(), &opts)?;
    }
    let stop = shared.stop.into_inner().unwrap();
    let stopped = match &stop {
        Some(Stop::Job(m)) => Some(m.clone()),
        None if cancel.is_cancelled() => {
            Some("interrupted (Ctrl-C); run the same command again to resume".to_string())
        }
        None => None,
    };
    let summary = stats.summary(stopped);
    summary.write(&job.summary_path())?;
    let code = match stop {
        Some(Stop::Job(_)) => EXIT_STOPPED,
        None if cancel.is_cancelled() => EXIT_INTERRUPTED,
        None if summary.rows_failed > 0 || summary.rows_skipped_failed > 0 => EXIT_ROWS_FAILED,
        None => EXIT_OK,
    };
    Ok((summary, code))
}

/// Sends one row with retries. `None`: the row stays pending (job stopped or interrupted).
async fn process(
    sh: &Shared,
    p: Prepared,
    mut pace_tokens: u64,
    mut counted: bool,
    bound: f64,
) -> Option<Msg> {
    let started = Instant::now();
    let mut retrier = sh.retry.start();
    let mut attempts = 0u32;
    let mut rate_limited = 0u32;
    let outcome = loop {
        attempts += 1;
        match sh.backend.provider.complete(&p.request).await {
            Ok(c) => {
                sh.pacer.observe(c.rate_limits.as_ref());
                sh.pacer.succeeded();
                break Ok(c);
            }
            Err(e) => {
                if e.kind == ErrorKind::RateLimited {
                    rate_limited += 1;
                    sh.pacer.rate_limited(e.retry_after, e.rate_limits.as_ref());
                } else {
                    sh.pacer.observe(e.rate_limits.as_ref());
                }
                if e.kind.disposition() == Disposition::StopJob {
                    sh.stop(Stop::Job(job_stop_message(&sh.job, &e)));
                    release(sh, bound, 0.0);
                    return None;
                }
                match retrier.next_delay(&e) {
                    Some(delay) => {
                        tracing::debug!(
                            row = p.row.number,
                            attempt = attempts,
                            "retrying in {delay:?}: {e}"
                        );
                        tokio::select! {
                            _ = sh.cancel.cancelled() => { release(sh, bound, 0.0); return None; }
                            _ = tokio::time::sleep(delay) => {}
                        }
                        if !counted && sh.pacer.paces_tokens() {
                            // A token limit was learned since this row was dispatched.
                            pace_tokens += sh.backend.counter.count_prompt(&p.request.messages);
                            counted = true;
                        }
                        tokio::select! {
                            _ = sh.cancel.cancelled() => { release(sh, bound, 0.0); return None; }
                            _ = sh.pacer.acquire(pace_tokens) => {}
                        }
                    }
                    None => break Err(e),
                }
            }
        }
    };
    let latency_ms = started.elapsed().as_millis() as u64;
    let Prepared {
        row, fingerprint, ..
    } = p;
    let record = match outcome {
        Ok(c) => ok_record(sh, row, fingerprint, c, attempts, latency_ms),
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
                e.kind,
                e.status,
                e.message,
                attempts,
                latency_ms,
            )
        }
    };
    release(sh, bound, record.cost_usd.unwrap_or(0.0));
    Some(Msg::Finished {
        record: Box::new(record),
        retries: attempts - 1,
        rate_limited,
    })
}

fn release(sh: &Shared, bound: f64, spent: f64) {
    if sh.job.max_cost_usd.is_some() {
        let mut b = sh.budget.lock().unwrap();
        b.reserved = (b.reserved - bound).max(0.0);
        b.spent += spent;
    }
}

fn ok_record(
    sh: &Shared,
    row: Row,
    fingerprint: String,
    c: Completion,
    attempts: u32,
    latency_ms: u64,
) -> Record {
    let cost = sh.price(c.model.as_deref()).map(|p| p.cost(&c.usage));
    Record {
        row: row.number,
        id: row.id,
        status: Status::Ok,
        input: row.fields,
        completion: Some(c.text),
        finish_reason: c.finish_reason,
        model: c.model,
        usage: Some(c.usage),
        cost_usd: cost,
        attempts,
        latency_ms,
        fingerprint: Some(fingerprint),
        error: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn error_record(
    row: u64,
    id: String,
    input: serde_json::Map<String, serde_json::Value>,
    fingerprint: Option<String>,
    kind: ErrorKind,
    status: Option<u16>,
    message: String,
    attempts: u32,
    latency_ms: u64,
) -> Record {
    Record {
        row,
        id: if id.is_empty() { row.to_string() } else { id },
        status: Status::Error,
        input,
        completion: None,
        finish_reason: None,
        model: None,
        usage: None,
        cost_usd: None,
        attempts,
        latency_ms,
        fingerprint,
        error: Some(RecordError {
            kind,
            status,
            message,
        }),
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
        _ => format!(
            "{} refused the API key ({status}: {}). Check or regenerate the key in {} \
             (environment or .env) and that it may use model `{}`; finished rows are kept",
            job.base_url, e.message, job.api_key_env, job.model
        ),
    }
}

/// The one task that writes: journal appends, counters, progress.
async fn write_records(
    mut rx: mpsc::Receiver<Msg>,
    mut appender: Appender,
    mut progress: Progress,
    billed: bool,
) -> Result<(Appender, Stats, Progress), Error> {
    let mut stats = Stats::default();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Take everything already queued, then flush once: durable per batch, cheap per row.
        while let Some(m) = next {
            match m {
                Msg::Finished {
                    record,
                    retries,
                    rate_limited,
                } => {
                    appender.append(&record)?;
                    stats.add(&record, retries, rate_limited, billed);
                }
                Msg::Skipped { ok: true } => stats.skipped_ok += 1,
                Msg::Skipped { ok: false } => stats.skipped_failed += 1,
            }
            next = rx.try_recv().ok();
        }
        appender.flush()?;
        progress.update(&stats, false);
    }
    progress.update(&stats, true);
    Ok((appender, stats, progress))
}
