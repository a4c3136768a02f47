//! Finishing a run: compaction into input order, the CSV, the carried spend, the summary and
//! the exit code.

use std::sync::{Arc, Mutex};

use super::budget::Budget;
use super::signals::{Interrupt, Signals, Stopper};
use super::writer::Written;
use crate::error::{Error, EXIT_OK, EXIT_ROWS_FAILED, EXIT_STOPPED};
use crate::job::Job;
use crate::ledger::files::Files;
use crate::ledger::{self, Carried, Sidecars};
use crate::output::csv::CsvOptions;
use crate::report::{Stats, Summary};

/// Compaction into input order, the CSV, the summary, the carried spend, the exit code.
pub(super) fn finish(
    job: Job,
    budget: Mutex<Budget>,
    end: &mut Written,
    stopper: Arc<Stopper>,
    signals: Signals,
    complete: bool,
    header: Option<Vec<String>>,
) -> Result<(Summary, i32), Error> {
    let budget = budget.into_inner().unwrap();
    let files = Files::new(&job.output);
    if end.failed.is_none() {
        if let Some(spool) = &end.spool {
            compact(&job, &files, spool, complete, &mut end.stats)?;
        }
    } else if end.unwritten > 0 {
        tracing::error!(
            "{} finished rows could not be written; they are pending and will be sent again",
            end.unwritten
        );
    }
    if let Some(spool) = &end.spool {
        let _ = std::fs::remove_file(&spool.path);
    }
    if end.failed.is_none() {
        write_csv(&job, header.as_deref())?;
        write_parquet(&job, header.as_deref())?;
    }
    carry_spend(&files, &end.stats);
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
    let mut summary = end.stats.summary(stopped);
    summary.spent_usd = Some(budget.total());
    summary.budget_usd = budget.cap;
    summary.unconfirmed_usd = budget.unconfirmed;
    if let Err(e) = summary.write(&files.summary()) {
        if end.failed.is_none() {
            return Err(e);
        }
        tracing::error!("cannot write the summary: {e}");
    }
    let code = exit_code(stop.is_some(), interrupt, &summary);
    Ok((summary, code))
}

/// The journal rewritten in input order; the counts compaction learns go to the summary.
fn compact(
    job: &Job,
    files: &Files,
    spool: &ledger::Plan,
    complete: bool,
    stats: &mut Stats,
) -> Result<(), Error> {
    let c = ledger::compact(
        &job.output,
        spool,
        complete,
        crate::plan::keying(job),
        &Sidecars {
            stale: files.stale(),
            rejected: files.rejected(),
        },
    )?;
    // Rows a batch holds are not waiting on a rerun: the summary counts them apart.
    stats.pending = c
        .pending
        .saturating_sub(stats.batch_requests_submitted + stats.batch_in_flight);
    stats.stale_moved = c.stale;
    Ok(())
}

/// `[output] parquet`, from the compacted journal.
fn write_parquet(job: &Job, header: Option<&[String]>) -> Result<(), Error> {
    let Some(out) = &job.parquet else {
        return Ok(());
    };
    let opts = crate::output::parquet::ParquetOptions {
        input: crate::output::parquet::input_types(job, header)?,
        data_schema: job.shape.schema.as_ref().map(|(_, v)| v.clone()),
    };
    crate::output::parquet::export_parquet(&job.output, out, &opts).map(|_| ())
}

/// `[output] csv`, from the compacted journal.
fn write_csv(job: &Job, header: Option<&[String]>) -> Result<(), Error> {
    let Some(csv) = &job.csv else {
        return Ok(());
    };
    let opts = CsvOptions {
        escape_formulas: job.csv_escape_formulas,
        data_columns: crate::job::stamp::csv_data_columns(job),
    };
    crate::output::csv::export_csv(&job.output, csv, header, &opts).map(|_| ())
}

/// What rows that ended with no record may have cost, added to what earlier runs carried:
/// the next run's budget starts from it.
fn carry_spend(files: &Files, stats: &Stats) {
    if stats.pending_unconfirmed_usd <= 0.0 {
        return;
    }
    let path = files.spend();
    let carried = Carried {
        unconfirmed_usd: Carried::read(&path)
            .map(|c| c.unconfirmed_usd)
            .unwrap_or(0.0)
            + stats.pending_unconfirmed_usd,
    };
    if let Err(e) = carried.write(&path) {
        tracing::error!("cannot record the unconfirmed spend: {e}");
    }
}

/// 2 when the job stopped, the signal's code when one interrupted it, 1 when rows failed.
fn exit_code(stopped: bool, interrupt: Option<Interrupt>, summary: &Summary) -> i32 {
    match (stopped, interrupt) {
        (true, _) => EXIT_STOPPED,
        (false, Some(i)) => i.exit_code(),
        (false, None) if summary.rows_failed > 0 || summary.rows_skipped_failed > 0 => {
            EXIT_ROWS_FAILED
        }
        (false, None) => EXIT_OK,
    }
}
