//! How a run is asked to stop: the signals (Ctrl-C, SIGTERM) with their grace period, and the
//! job's own stop reasons (auth, quota, budget, outage, a write that failed), with the advice
//! each prints.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::job::Job;
use crate::provider::{ErrorKind, ProviderError};

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

    pub(super) fn name(self) -> &'static str {
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
    pub(super) which: Arc<Mutex<Option<Interrupt>>>,
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
pub(super) enum Halt {
    /// Auth, quota, budget, outage.
    Job(String),
    /// The output (or the plan spool) cannot be written.
    Write(String),
}

impl Halt {
    pub(super) fn message(&self) -> &str {
        match self {
            Halt::Job(m) | Halt::Write(m) => m,
        }
    }
}

/// The stop reason, shared by the dispatcher, the row tasks and the writer.
pub(super) struct Stopper {
    pub(super) why: Mutex<Option<Halt>>,
    pub(super) signals: Signals,
}

impl Stopper {
    pub(super) fn new(signals: Signals) -> Stopper {
        Stopper {
            why: Mutex::new(None),
            signals,
        }
    }

    pub(super) fn stop(&self, why: Halt) {
        let mut s = self.why.lock().unwrap();
        if s.is_none() {
            tracing::error!("stopping the job: {}", why.message());
            *s = Some(why);
        }
        drop(s);
        self.signals.stop.cancel();
    }
}

/// The API's error table, as advice: what to check when the provider refuses the job.
pub(super) fn job_stop_message(job: &Job, e: &ProviderError) -> String {
    let status = e.status.map(|s| format!("HTTP {s}")).unwrap_or_default();
    match e.kind {
        ErrorKind::Quota => format!(
            "{} refused the request for lack of quota ({status} insufficient_quota: {}). \
             Check your plan and billing details, then run again: finished rows are kept",
            job.served.base_url, e.message
        ),
        ErrorKind::Endpoint => format!(
            "{}{}: {}. No row was marked failed: the run after the fix sends them all",
            job.served.base_url,
            e.status
                .map(|s| format!(" answered HTTP {s}"))
                .unwrap_or_default(),
            e.message
        ),
        _ => format!(
            "{} refused the API key ({status}: {}). Check or regenerate the key in {} \
             (environment or .env) and that it may use model `{}`; finished rows are kept",
            job.served.base_url, e.message, job.served.api_key_env, job.served.model
        ),
    }
}

pub(super) fn write_stop_message(e: &Error) -> String {
    format!(
        "cannot write {e}. Stopped sending; requests in flight were written if the disk \
         allowed. Free space (or fix the folder's permissions) and run the same command again: \
         every row written is kept, the rest are sent then"
    )
}
