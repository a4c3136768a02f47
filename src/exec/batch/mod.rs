//! The Batch API: the job's pending rows as files of requests, uploaded and submitted as
//! batches at half price, and collected into the same records as an online run.
//!
//! A run in batch mode is an ordinary run (`schedule`) whose rows, instead of being sent, are
//! routed here: a row with a downloaded result gets its record, a row in a batch still running
//! waits, and any other row goes into a new input file. Every step is in the batch log
//! (`state`) before and after it happens:
//!
//! ```text
//! part written → uploading → uploaded → creating → created → finished (downloaded) → collected
//! ```
//!
//! so a run killed between two steps redoes or looks up the step it was in, and no row is
//! submitted while an earlier batch holds it.

pub mod anthropic;
pub mod api;
pub mod export;
pub mod gemini;
mod http;
mod lines;
pub mod openai;
mod pass;
pub mod results;
pub mod state;
mod submit;
pub mod vendor;

use crate::error::Error;
use crate::job::Job;
use api::BatchApi;
use results::{Answer, Answerer};
use state::{now, BatchPart, Event, Log, Stage};

pub use lines::Splitter;
pub use openai::write_openai_line;
pub use pass::{Pass, Submitted};

/// The metadata key that names a batch's part: how a batch created by a killed run is found.
pub const META_PART: &str = "promptmill_part";

/// Where a row goes in this run.
pub enum Route {
    /// A batch answered it: write its record.
    Result { outcome: Answer, from: Answerer },
    /// A batch still running holds it.
    InFlight,
    /// Not in any batch: send it (online) or put it in a new file (batch mode).
    New,
}

/// One line per batch for `batch status`, asking the server about those still running.
pub async fn status(job: &Job) -> Result<Vec<String>, Error> {
    let log = Log::load(&crate::ledger::files::Files::new(&job.output).batches())?;
    let dir = crate::ledger::files::Files::new(&job.output).batch_dir();
    let open: Vec<BatchPart> = log.open_parts().cloned().collect();
    let client = if open
        .iter()
        .any(|p| p.batch_id.is_some() || p.stage == Stage::Creating)
    {
        Some(vendor::for_job(job)?)
    } else {
        None
    };
    let t = now();
    let mut lines = Vec::new();
    let collected = log
        .parts
        .iter()
        .filter(|p| p.stage == Stage::Collected)
        .count();
    for p in &open {
        lines.push(part_status(client.as_deref(), (&log, &dir), p, t).await?);
    }
    if open.is_empty() {
        lines.push("no batches in flight".into());
    }
    if collected > 0 {
        lines.push(format!("{collected} earlier batch(es) collected"));
    }
    Ok(lines)
}

/// `batch status`'s line for one open part, asking the server where it has to.
async fn part_status(
    client: Option<&dyn BatchApi>,
    (log, dir): (&Log, &std::path::Path),
    p: &BatchPart,
    t: u64,
) -> Result<String, Error> {
    // A create whose answer was lost: the server may hold the batch; look, change nothing.
    let found = match (client, p.stage) {
        (Some(c), Stage::Creating) => match api::Lookup::of(log, &p.id, dir) {
            Some(lost) => c.find_batch(&lost).await?,
            None => None,
        },
        _ => None,
    };
    let Some(id) = p
        .batch_id
        .clone()
        .or_else(|| found.as_ref().map(|b| b.id.clone()))
    else {
        return Ok(unsubmitted(p));
    };
    let (status, counts, expires) = match (client, p.stage, found) {
        (_, Stage::Creating, Some(b)) => (
            format!(
                "{} (its create answer was lost; the next run follows it)",
                b.status
            ),
            b.request_counts.unwrap_or_default(),
            b.expires_at,
        ),
        (Some(c), Stage::Created, _) => {
            let b = c.retrieve(&id).await?;
            (
                b.status.clone(),
                b.request_counts.unwrap_or_default(),
                b.expires_at,
            )
        }
        _ => (
            format!(
                "{} (results downloaded; the next run or `batch collect` writes them)",
                p.status.clone().unwrap_or_default()
            ),
            p.counts,
            None,
        ),
    };
    // A part whose create's answer was lost has no `created_at` on record: its age runs from
    // the moment the create began.
    let since = if p.created_at > 0 {
        p.created_at
    } else {
        p.creating_at
    };
    let age = t.saturating_sub(since);
    let left = expires
        .map(|e| format!(", {} left", hms(e.saturating_sub(t))))
        .unwrap_or_default();
    let cancel = if p.cancel_requested {
        "  cancel requested"
    } else {
        ""
    };
    Ok(format!(
        "{id}  {status}  {}/{} done, {} failed  ({} requests, age {}{left}){cancel}",
        counts.completed,
        counts.total.max(p.requests),
        counts.failed,
        p.requests,
        hms(age),
    ))
}

/// `batch status`'s line for a part the server holds no batch of.
fn unsubmitted(p: &BatchPart) -> String {
    if p.stage == Stage::Creating {
        format!(
            "{}: {} requests, being created when the last run stopped; the server holds no \
             batch of it (the next run looks again, then submits its rows)",
            p.file, p.requests
        )
    } else {
        format!(
            "{}: {} requests, not submitted yet (the next run submits them)",
            p.file, p.requests
        )
    }
}

/// Asks the server to cancel every batch still running; what they finished is kept and
/// collected by the next run.
pub async fn cancel(job: &Job) -> Result<Vec<String>, Error> {
    let _lock = crate::ledger::journal::Lock::acquire(
        &crate::ledger::files::Files::new(&job.output).lock(),
    )?;
    let mut log = Log::load(&crate::ledger::files::Files::new(&job.output).batches())?;
    let open: Vec<BatchPart> = log
        .open_parts()
        .filter(|p| matches!(p.stage, Stage::Created | Stage::Creating))
        .cloned()
        .collect();
    if open.is_empty() {
        return Ok(vec!["no batches running".into()]);
    }
    let client = vendor::for_job(job)?;
    let mut lines = Vec::new();
    for p in open {
        let id = match &p.batch_id {
            Some(id) => id.clone(),
            None => match settle_creating(
                client.as_ref(),
                &mut log,
                &crate::ledger::files::Files::new(&job.output).batch_dir(),
                &p,
            )
            .await?
            {
                Some(b) => b.id,
                None => {
                    lines.push(format!(
                        "{}: no batch was made of it; its rows are pending",
                        p.file
                    ));
                    continue;
                }
            },
        };
        log.record(Event::CancelRequested {
            part: p.id.clone(),
            at: now(),
        })?;
        match client.cancel(&id).await {
            Ok(b) => lines.push(format!("{id}: {}", b.status)),
            Err(e) => lines.push(format!("{id}: {e}")),
        }
    }
    Ok(lines)
}

/// A part left `creating` (its create's answer was lost, or the run stopped), settled under
/// the lock: the batch the server made of it goes on record and is returned, or, if there is
/// none, the part is given up (its file removed here and on the server; its rows pending).
async fn settle_creating(
    client: &dyn BatchApi,
    log: &mut Log,
    dir: &std::path::Path,
    p: &BatchPart,
) -> Result<Option<api::Batch>, Error> {
    let found = match api::Lookup::of(log, &p.id, dir) {
        Some(lost) => client.find_batch(&lost).await?,
        None => None,
    };
    match found {
        Some(b) => {
            log.record(Event::Created {
                part: p.id.clone(),
                batch_id: b.id.clone(),
                at: b.created_at.unwrap_or_else(now),
            })?;
            Ok(Some(b))
        }
        None => {
            log.record(Event::Abandoned {
                part: p.id.clone(),
                why: "no batch was created before the run stopped".into(),
                at: now(),
            })?;
            let _ = std::fs::remove_file(dir.join(&p.file));
            if let Some(f) = &p.file_id {
                let _ = client.unstage(f).await;
            }
            Ok(None)
        }
    }
}

fn hms(s: u64) -> String {
    format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
}

/// Waits until a running batch of the job ends (or there is none), checking with backoff from
/// a few seconds up to `[batch] poll_s`, and showing the request counts. `Ok(false)`: a signal
/// arrived first.
pub async fn wait_any(
    job: &Job,
    signals: &crate::exec::Signals,
    quiet: bool,
) -> Result<bool, Error> {
    let log = Log::load(&crate::ledger::files::Files::new(&job.output).batches())?;
    let running: Vec<String> = log
        .open_parts()
        .filter(|p| p.stage == Stage::Created)
        .filter_map(|p| p.batch_id.clone())
        .collect();
    if running.is_empty() {
        return Ok(true);
    }
    let client = vendor::for_job(job)?;
    let bar = crate::report::spinner(quiet);
    let mut delay = std::time::Duration::from_secs(2).min(job.batch.poll);
    let mut last_log = std::time::Instant::now();
    loop {
        let mut line = Vec::new();
        let mut ended = false;
        for id in &running {
            let b = client.retrieve(id).await?;
            let c = b.request_counts.unwrap_or_default();
            line.push(format!(
                "{id} {} {}/{} ({} failed)",
                b.status, c.completed, c.total, c.failed
            ));
            ended |= b.is_final();
        }
        let msg = format!("waiting for batches: {}", line.join(", "));
        match &bar {
            Some(b) => b.set_message(msg),
            None if !quiet && last_log.elapsed() >= std::time::Duration::from_secs(60) => {
                last_log = std::time::Instant::now();
                tracing::info!("{msg}");
            }
            None => {}
        }
        if ended {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(true);
        }
        tokio::select! {
            _ = signals.stop.cancelled() => {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                return Ok(false);
            }
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(job.batch.poll.max(std::time::Duration::from_millis(10)));
    }
}
