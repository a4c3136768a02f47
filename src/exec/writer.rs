//! The one writer task: every finished row's record is appended to the journal here, with the
//! counters and the progress line; nothing else writes the output while the run goes.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinHandle;

use super::RunOptions;
use crate::backend::Backend;
use crate::input::InputFormat;
use crate::job::Job;

use super::signals::{write_stop_message, Halt, Stopper};
use crate::error::Error;
use crate::ledger::journal::Appender;
use crate::ledger::record::Record;
use crate::report::{Progress, Stats};

pub(super) enum Msg {
    Finished {
        record: Box<Record>,
        retries: u32,
        rate_limited: u32,
        /// The row's concurrency slot, released once its record is on disk: at most
        /// `concurrency` rows are ever sent and not yet durable, which bounds what a dead
        /// writer can cost.
        slot: Option<OwnedSemaphorePermit>,
    },
    /// Rows done before (ok or failed) and rows copied, counted by the dispatcher and sent
    /// together: one message a row would wake the writer once a row.
    Counted {
        skipped_ok: u64,
        skipped_failed: u64,
        copied: u64,
    },
    /// A row that ended with no record after attempts the server may have billed.
    Unconfirmed(f64),
    /// A row a batch still running holds.
    InFlight,
    /// A row put into a batch input file this run.
    Batched,
}

impl Msg {
    /// A row's record, written as it is (no concurrency slot rides with it).
    pub(super) fn finished(record: Record) -> Msg {
        Msg::Finished {
            record: Box::new(record),
            retries: 0,
            rate_limited: 0,
            slot: None,
        }
    }
}

pub(super) struct WriterEnd {
    pub(super) appender: Appender,
    pub(super) stats: Stats,
    pub(super) progress: Progress,
    /// The first write error: dispatching was stopped when it happened.
    pub(super) failed: Option<Error>,
}

/// What the run holds once the writer has written everything it was given.
pub(super) struct Written {
    pub(super) stats: Stats,
    /// The first write error (the journal's, or the plan spool's).
    pub(super) failed: Option<Error>,
    /// Records that did not reach the disk: their rows are pending.
    pub(super) unwritten: usize,
    /// The plan spool, for compaction; `None` when it could not be written.
    pub(super) spool: Option<crate::ledger::Plan>,
}

/// Opens the journal for appending and starts the writer task with its progress line.
pub(super) fn start(
    job: &Job,
    opts: &RunOptions,
    backend: &Backend,
    rx: mpsc::Receiver<Msg>,
    stopper: &Arc<Stopper>,
) -> Result<JoinHandle<WriterEnd>, Error> {
    let appender = Appender::open(&job.output)?;
    let progress = Progress::new(
        opts.quiet,
        Some(&job.input),
        u64::from(job.input_format == InputFormat::Csv),
        opts.limit,
        job.shard.map_or(1, |s| s.n),
    );
    let billed = backend.provider.is_billed();
    Ok(tokio::spawn(write_records(
        rx,
        appender,
        progress,
        billed,
        stopper.clone(),
    )))
}

/// Waits for the writer to drain its queue, then makes the journal durable: the first error
/// on the way stops the job.
pub(super) async fn wind_down(
    writer: JoinHandle<WriterEnd>,
    spool: Result<Option<crate::ledger::Plan>, Error>,
    stopper: &Stopper,
) -> Result<Written, Error> {
    let WriterEnd {
        appender,
        stats,
        progress,
        mut failed,
    } = writer
        .await
        .map_err(|e| Error::Other(format!("the writer task failed: {e}")))?;
    let mut fail = |e: Error| {
        if failed.is_none() {
            stopper.stop(Halt::Write(write_stop_message(&e)));
            failed = Some(e);
        }
    };
    let unwritten = appender.unwritten();
    if let Err(e) = appender.finish() {
        fail(e);
    }
    progress.finish();
    let spool = spool.unwrap_or_else(|e| {
        fail(e);
        None
    });
    Ok(Written {
        stats,
        failed,
        unwritten,
        spool,
    })
}

/// The one task that writes: journal appends, counters, progress. A write that fails stops
/// the dispatching at once; later batches are still tried, so rows in flight are kept if the
/// disk allows.
pub(super) async fn write_records(
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
                Msg::Counted {
                    skipped_ok,
                    skipped_failed,
                    copied,
                } => {
                    stats.skipped_ok += skipped_ok;
                    stats.skipped_failed += skipped_failed;
                    stats.copied += copied;
                }
                Msg::Unconfirmed(usd) => stats.pending_unconfirmed_usd += usd,
                Msg::InFlight => stats.batch_in_flight += 1,
                Msg::Batched => stats.batch_rows += 1,
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = appender.flush() {
            if failed.is_none() {
                stopper.stop(Halt::Write(write_stop_message(&e)));
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
