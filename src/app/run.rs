//! `run`, `batch` and `import`: one pass or, with `--wait`, passes until no batch runs; the
//! signals wired to the run; the summary and the report at the end.

use std::path::Path;

use crate::cli::{BatchAction, RunArgs};
use crate::error::{Error, EXIT_OK, EXIT_STOPPED};
use crate::exec::{self, Interrupt, RunOptions, Signals};
use crate::job::{Job, Overrides};
use crate::render::Renderer;
use crate::store::session::Session;
use std::sync::Arc;

use super::{job_overrides, overrides, runtime};

/// The run's HTML report. Failing to write it is a warning: the run's outcome and exit code
/// stand whatever happens here.
pub(super) fn run_report(
    job: &RunReport,
    summary: &crate::report::Summary,
) -> Option<std::path::PathBuf> {
    if !job.on {
        return None;
    }
    let opts = crate::output::html::Options {
        rows: job.rows,
        failed_rows: job.failed_rows,
        summary: Some(summary.clone()),
    };
    match crate::output::html::write(&job.output, &job.path, &opts) {
        Ok(_) => Some(job.path.clone()),
        Err(e) => {
            tracing::warn!("cannot write the report {}: {e}", job.path.display());
            None
        }
    }
}

/// What `run` needs to know of the job to write its report once the job has been moved into
/// the run.
pub(super) struct RunReport {
    on: bool,
    output: std::path::PathBuf,
    path: std::path::PathBuf,
    rows: usize,
    failed_rows: usize,
}

pub(super) fn run(args: RunArgs, quiet: bool, json_logs: bool) -> Result<i32, Error> {
    let opts = RunOptions {
        limit: args.job.limit,
        fresh: args.fresh,
        retry_failed: args.retry_failed,
        quiet,
        collect_only: false,
        import: None,
    };
    passes(
        &args.job.job,
        &overrides(&args)?,
        opts,
        args.wait,
        json_logs,
    )
}

pub(super) fn batch(action: BatchAction, quiet: bool, json_logs: bool) -> Result<i32, Error> {
    match action {
        BatchAction::Status(a) => {
            let job = Job::load(&a.job, &job_overrides(&a)?)?;
            for line in runtime()?.block_on(crate::exec::batch::status(&job))? {
                println!("{line}");
            }
            Ok(EXIT_OK)
        }
        BatchAction::Cancel(a) => {
            let job = Job::load(&a.job, &job_overrides(&a)?)?;
            for line in runtime()?.block_on(crate::exec::batch::cancel(&job))? {
                println!("{line}");
            }
            eprintln!(
                "what the batches finished is kept: `promptmill batch collect {}` writes it",
                a.job.display()
            );
            Ok(EXIT_OK)
        }
        BatchAction::Collect { job, wait } => {
            let opts = RunOptions::collect(job.limit, quiet, None);
            passes(&job.job, &job_overrides(&job)?, opts, wait, json_logs)
        }
    }
}

/// Runs the job once, or, with `wait`, again each time a batch it waits for ends, until no
/// Runs the job once, or, with `wait`, again each time a batch it waits for ends, until no
/// batch is running.
pub(super) fn passes(
    file: &Path,
    ov: &Overrides,
    mut opts: RunOptions,
    wait: bool,
    json_logs: bool,
) -> Result<i32, Error> {
    let rt = runtime()?;
    let signals = Signals::default();
    let mut listening = false;
    // Every pass reads the input again; a pipe can be read once, so it is kept in a file.
    let copy = if wait {
        keep_piped_input(file, ov)?
    } else {
        None
    };
    let ov = &Overrides {
        input: copy.clone().or_else(|| ov.input.clone()),
        ..ov.clone()
    };
    let _remove = copy.map(RemoveOnDrop);
    let mut session: Option<Held> = None;
    loop {
        let job = Job::load(file, ov)?;
        if let (None, Some(remote)) = (&session, &job.remote) {
            // Held across passes: one lock for the whole run, released however it ends.
            session = Some(Held(Arc::new(Session::open(remote)?)));
        }
        if !listening {
            let (s, grace) = (signals.clone(), job.limits.shutdown_grace);
            rt.block_on(async move { listen_for_signals(&s, grace) })?;
            listening = true;
        }
        let quiet = opts.quiet;
        let for_wait = job.clone();
        let held = session.as_ref().map(|h| h.0.clone());
        let (summary, code) = one_pass(&rt, job, &mut opts, &signals, json_logs, held)?;
        let running = summary
            .batch
            .is_some_and(|b| b.batches_submitted + b.batches_running > 0);
        let go_on = running && code < EXIT_STOPPED;
        if !(go_on && wait) {
            if go_on {
                eprintln!(
                    "batches are running: `promptmill batch status {f}` shows them, \
                     `promptmill batch collect {f}` (or this command again) collects what has \
                     ended; `--wait` waits for them",
                    f = file.display()
                );
            }
            rt.shutdown_background();
            return Ok(code);
        }
        let ended = rt.block_on(crate::exec::batch::wait_any(&for_wait, &signals, quiet))?;
        if !ended {
            rt.shutdown_background();
            let i = signals
                .interrupted()
                .map_or(EXIT_STOPPED, |i| i.exit_code());
            eprintln!(
                "stopped waiting; the batches go on on the server: `promptmill batch collect {}` \
                 collects them",
                file.display()
            );
            return Ok(i);
        }
    }
}

/// A job whose input is a pipe (stdin, a FIFO, `<(zcat rows.csv.gz)`): its rows, read once
/// into a file beside the output, for passes that read the input again. `None` for a file.
fn keep_piped_input(file: &Path, ov: &Overrides) -> Result<Option<std::path::PathBuf>, Error> {
    let job = Job::load(file, ov)?;
    let piped = job.input.as_os_str() == "-"
        || std::fs::metadata(&job.input).is_ok_and(|m| {
            // A folder is a Parquet dataset's part files, not a pipe.
            !m.is_file() && !m.is_dir()
        });
    if !piped {
        return Ok(None);
    }
    let ext = match job.input_format {
        crate::input::InputFormat::Csv => "csv",
        crate::input::InputFormat::Jsonl => "jsonl",
        crate::input::InputFormat::Parquet => "parquet",
    };
    let copy = crate::ledger::files::Files::new(&job.output).input_copy(ext);
    let io = |p: &Path, e| crate::ledger::journal::io_err(p, e);
    if let Some(d) = copy.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
    }
    let mut from: Box<dyn std::io::Read> = if job.input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(&job.input).map_err(|e| io(&job.input, e))?)
    };
    crate::ledger::files::replace(&copy, |w| std::io::copy(&mut from, w).map(|_| ()))?;
    Ok(Some(copy))
}

/// A store output's session, its lock released when the passes end (an error included).
struct Held(Arc<Session>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Removes a file when dropped: the piped input's copy, however the passes end.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One run of the job, its summary printed and its report written. `--fresh` applies to the
/// first pass only.
fn one_pass(
    rt: &tokio::runtime::Runtime,
    job: Job,
    opts: &mut RunOptions,
    signals: &Signals,
    json_logs: bool,
    session: Option<Arc<Session>>,
) -> Result<(crate::report::Summary, i32), Error> {
    let renderer = Renderer::new(&job)?;
    let backend = crate::backend::Backend::for_job(&job, true)?;
    let files = crate::ledger::files::Files::new(&job.output);
    let csv = job.csv.clone();
    let report = RunReport {
        on: job.report,
        output: job.output.clone(),
        path: files.report(),
        rows: job.report_rows,
        failed_rows: job.report_failed_rows,
    };
    let quiet = opts.quiet;
    let pass_opts = RunOptions {
        fresh: std::mem::take(&mut opts.fresh),
        import: opts.import.clone(),
        ..*opts
    };
    // A store output's journal goes up in pieces while the run writes it; a run that lost
    // its lock stops at once (another run owns the output now).
    let ticker = session.as_ref().map(|s| {
        let sig = signals.clone();
        s.checkpointing(move || {
            sig.stop.cancel();
            sig.abort.cancel();
        })
    });
    let ran = rt.block_on(exec::run(
        job,
        pass_opts,
        backend,
        renderer,
        signals.clone(),
    ));
    drop(ticker);
    let (summary, code) = match ran {
        Ok(r) => r,
        Err(e) => {
            // What was written is sent as a piece before the error is reported.
            if let Some(s) = &session {
                if let Err(ce) = s.tick() {
                    tracing::warn!("{ce}");
                }
            }
            return Err(e);
        }
    };
    print_summary(
        &summary,
        code,
        quiet,
        json_logs,
        files.output(),
        csv.as_deref(),
        &files.summary(),
        &report,
    );
    if let Some(s) = &session {
        s.publish()?;
        if !quiet {
            eprintln!("published to {}", s.url());
        }
    }
    Ok((summary, code))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn print_summary(
    summary: &crate::report::Summary,
    code: i32,
    quiet: bool,
    json_logs: bool,
    output: &Path,
    csv: Option<&Path>,
    summary_path: &Path,
    report: &RunReport,
) {
    if json_logs {
        // Log collectors get the summary as one structured event, not a table.
        let fields = serde_json::to_string(summary).unwrap_or_default();
        let csv = csv.map(|c| c.display().to_string());
        let report = run_report(report, summary).map(|p| p.display().to_string());
        tracing::info!(summary = %fields, output = %output.display(), csv = ?csv, report = ?report, "run finished");
        return;
    }
    if !quiet || code != EXIT_OK {
        eprint!("{}", summary.table());
    }
    let report = run_report(report, summary);
    eprintln!("output: {}", output.display());
    if let Some(c) = csv {
        eprintln!("csv: {}", c.display());
    }
    eprintln!("summary: {}", summary_path.display());
    if let Some(r) = report {
        eprintln!("report: {}", r.display());
    }
}

/// Ctrl-C and SIGTERM (systemd, docker stop, Kubernetes, `timeout`) stop the run the same
/// way: no new requests, those in flight get `grace`, a second signal cancels them; every
/// record received is written and the summary printed either way.
pub(super) fn listen_for_signals(
    signals: &Signals,
    grace: std::time::Duration,
) -> Result<(), Error> {
    let s = signals.clone();
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            s.interrupt(Interrupt::CtrlC, grace);
        }
    });
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::Other(format!("cannot listen for SIGTERM: {e}")))?;
        let s = signals.clone();
        tokio::spawn(async move {
            while term.recv().await.is_some() {
                s.interrupt(Interrupt::Term, grace);
            }
        });
    }
    Ok(())
}
