//! Opening the output: the lock, `--fresh`, repairing a torn last line, loading the index of
//! what is done and what was spent.

use std::path::Path;

use super::batch;
use super::RunOptions;
use crate::backend::Backend;
use crate::error::Error;
use crate::job::Job;
use crate::ledger::files::Files;
use crate::ledger::journal;
use crate::ledger::{self, Carried, Index};

/// What opening the output found.
pub(super) struct Opened {
    pub(super) lock: journal::Lock,
    pub(super) index: Index,
    pub(super) spent_before: f64,
}

/// Step 1: lock, `--fresh`, repair, load the ledger. `--fresh` moves the old output aside only
/// after everything else has been checked, so a mistyped flag cannot cost paid results.
pub(super) fn open_output(
    job: &Job,
    opts: &RunOptions,
    backend: &Backend,
) -> Result<Opened, Error> {
    let files = Files::new(&job.output);
    let lock = journal::Lock::acquire(&files.lock())?;
    if job.limits.max_cost_usd.is_some() && backend.price_for(None, &job.served.model).is_none() {
        return Err(Error::Job {
            path: job.file.clone(),
            field: "run.max_cost_usd".into(),
            message: format!(
                "the price of model `{}` is unknown, so a budget cannot be enforced; add [pricing]",
                job.served.model
            ),
        });
    }
    if opts.fresh {
        start_fresh(job, &files)?;
    }
    let cut = journal::repair(&job.output)?;
    if cut > 0 {
        tracing::warn!(
            "{}: cut a torn last line ({cut} bytes) left by an interrupted run; that row runs again",
            job.output.display()
        );
    }
    let index = crate::plan::load_index(job, true)?;
    if index.records > 0 {
        tracing::info!(
            "{}: {} earlier records found; resuming",
            job.output.display(),
            index.records
        );
    }
    let carried = Carried::read(&files.spend())?;
    let spent_before = index.spent_usd_with(&carried);
    Ok(Opened {
        lock,
        index,
        spent_before,
    })
}

/// `--fresh`: the output and its stale records move to the `.prev` file (they were paid
/// for); the batch log, spend, CSV and summary go.
fn start_fresh(job: &Job, files: &Files) -> Result<(), Error> {
    // Batches still running hold rows that are paid for: starting over would lose them.
    let log = batch::state::Log::load(&files.batches())?;
    if log.open_parts().any(|p| p.pins_rows()) {
        return Err(Error::Other(format!(
            "--fresh: batches of this output are still open ({}); collect them \
             (`promptmill batch collect`) or cancel them (`promptmill batch cancel`) first",
            files.batches().display()
        )));
    }
    remove_if_there(&files.batches())?;
    remove_if_there(&files.batch_dir())?;
    let prev = files.prev();
    for p in [job.output.clone(), files.stale()] {
        if ledger::move_appending(&p, &prev)? {
            tracing::info!("--fresh: {} moved to {}", p.display(), prev.display());
        }
    }
    for p in [Some(files.spend()), job.csv.clone(), Some(files.summary())]
        .into_iter()
        .flatten()
    {
        remove_if_there(&p)?;
    }
    Ok(())
}

/// Removes a file or a folder; one that is not there is fine.
fn remove_if_there(p: &Path) -> Result<(), Error> {
    let r = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(journal::io_err(p, e)),
    }
}
