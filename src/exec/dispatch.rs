//! Dispatch: each row is planned (done, copy, send, another shard's) and those to send go out
//! under the budget, the concurrency limit and the pacer, one task per row.

use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::batch;
use super::budget::NoRoom;
use super::prepare::{PreparedRows, Unreadable};
use super::records::{batch_record, error_record};
use super::send::process;
use super::signals::{write_stop_message, Halt};
use super::writer::Msg;
use super::{RunOptions, Shared};
use crate::chat::Mode;
use crate::ledger::record::RecordError;
use crate::ledger::Keying;
use crate::plan::{Decision, Planner};
use crate::provider::ErrorKind;
use crate::request::Prepared;

/// What dispatching saw of the input.
pub(super) struct Dispatched {
    /// The whole input was read (so compaction may move the records of rows that left it to
    /// the stale file).
    pub(super) complete: bool,
    /// Rows read.
    pub(super) read: u64,
    /// Of those, this shard's.
    pub(super) owned: u64,
}

/// What a planned row needs next. `Err(())` from a step: dispatching stops (the reason is
/// already with the stopper).
enum Next {
    Msg(Msg),
    /// A row that needs nothing but counting.
    Count(Counted),
    Send(Prepared),
    Nothing,
}

#[derive(Clone, Copy)]
enum Counted {
    SkippedOk,
    SkippedFailed,
    Copied,
}

/// Rows counted and not yet told to the writer: sent every `TALLY_EVERY` rows, before any
/// other message, and at the end.
#[derive(Default)]
struct Tally {
    counts: [u64; 3],
}

const TALLY_EVERY: u64 = 1024;

impl Tally {
    fn add(&mut self, c: Counted) -> bool {
        self.counts[c as usize] += 1;
        self.counts.iter().sum::<u64>() >= TALLY_EVERY
    }

    fn take(&mut self) -> Option<Msg> {
        let [skipped_ok, skipped_failed, copied] = std::mem::take(&mut self.counts);
        (skipped_ok + skipped_failed + copied > 0).then_some(Msg::Counted {
            skipped_ok,
            skipped_failed,
            copied,
        })
    }
}

/// The dispatcher's state for one run.
pub(super) struct Dispatch<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) planner: &'a mut Planner,
    pub(super) opts: &'a RunOptions,
    pub(super) tx: &'a mpsc::Sender<Msg>,
    pub(super) pass: &'a mut batch::Pass,
}

/// Plans each row and sends those that need it.
pub(super) async fn dispatch(d: Dispatch<'_>, rows: &mut PreparedRows) -> Dispatched {
    let mut run = Running {
        semaphore: Arc::new(Semaphore::new(d.shared.job.limits.concurrency)),
        tasks: JoinSet::new(),
        keying: crate::plan::keying(&d.shared.job),
        d,
    };
    let stop = run.d.shared.stopper.signals.stop.clone();
    let limit = run.d.opts.limit;
    let (mut seen, mut owned) = (0u64, 0u64);
    let (mut complete, mut read_failed) = (false, false);
    let mut tally = Tally::default();
    loop {
        if limit.is_some_and(|l| seen >= l) {
            break;
        }
        let item = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = rows.recv() => match r {
                Some(r) => r,
                None => { complete = run.input_ended(rows) && !read_failed; break }
            },
        };
        seen += 1;
        run.reap();
        read_failed |= item.fatal;
        let prepared = item.prepared;
        // Another shard's row: not this run's business at all.
        let job = &run.d.shared.job;
        let mine = match &prepared {
            Ok(p) => crate::plan::owns(job, p),
            Err(u) => crate::plan::owns_unreadable(job, u.number),
        };
        if !mine {
            continue;
        }
        owned += 1;
        let next = match prepared {
            Err(u) => run.unreadable(u),
            Ok(p) => run.route(p),
        };
        let went = match next {
            Err(()) => Err(()),
            Ok(Next::Nothing) => Ok(()),
            Ok(Next::Count(c)) if !tally.add(c) => Ok(()),
            Ok(Next::Count(_)) => run.tell(&mut tally).await,
            Ok(Next::Msg(m)) => match run.tell(&mut tally).await {
                Ok(()) => run.d.tx.send(m).await.map_err(|_| ()),
                Err(()) => Err(()),
            },
            Ok(Next::Send(p)) => run.send_online(p).await,
        };
        if went.is_err() {
            break;
        }
    }
    let _ = run.tell(&mut tally).await;
    run.join().await;
    let records = run.d.planner.index.records;
    if complete && seen == 0 && records > 0 {
        // An empty pipe (stdin read again, a FIFO whose writer died) is not a changed input.
        tracing::warn!(
            "the input gave no rows, though the output holds {records} records: it is not taken \
             as the whole input, so no record moves to the stale file"
        );
        complete = false;
    }
    Dispatched {
        complete: complete && limit.is_none_or(|l| seen < l),
        read: seen,
        owned,
    }
}

/// The dispatcher while it runs: its rows' tasks and the concurrency limit.
struct Running<'a> {
    d: Dispatch<'a>,
    semaphore: Arc<Semaphore>,
    tasks: JoinSet<()>,
    keying: Keying,
}

impl Running<'_> {
    /// Sends the writer what was counted since last time.
    async fn tell(&self, tally: &mut Tally) -> Result<(), ()> {
        match tally.take() {
            Some(m) => self.d.tx.send(m).await.map_err(|_| ()),
            None => Ok(()),
        }
    }

    fn stop_writing(&self, e: &crate::error::Error) {
        self.d.shared.stop(Halt::Write(write_stop_message(e)));
    }

    /// An unreadable row: its error record, unless an earlier run wrote the same one.
    fn unreadable(&mut self, u: Unreadable) -> Result<Next, ()> {
        let decision = self
            .d
            .planner
            .plan_input_error(u.number, &u.id, &u.message, &u.input);
        match decision {
            Err(e) => {
                self.stop_writing(&e);
                Err(())
            }
            Ok(Decision::WriteError) => {
                tracing::warn!("{}", u.message);
                let record = error_record(
                    u.number,
                    u.id,
                    u.input,
                    None,
                    RecordError {
                        kind: ErrorKind::Input,
                        status: None,
                        message: u.message,
                    },
                    0,
                    0,
                    0.0,
                );
                Ok(Next::Msg(Msg::finished(record)))
            }
            Ok(_) => Ok(Next::Count(Counted::SkippedFailed)),
        }
    }

    /// A readable row: done before, a copy, a batch's answer, in a batch still running, or
    /// to send (online, or into this run's batch files).
    fn route(&mut self, p: Prepared) -> Result<Next, ()> {
        let idh = self.keying.id_hash(&p.row.id);
        let decision = match self.d.planner.plan_keyed(&p, idh) {
            Ok(d) => d,
            Err(e) => {
                self.stop_writing(&e);
                return Err(());
            }
        };
        let routed = match decision {
            Decision::Send => self.d.pass.route(&p.fingerprint, idh),
            _ => self
                .d
                .pass
                .touch(&p.fingerprint, idh)
                .map(|()| batch::Route::New),
        };
        let route = routed.map_err(|e| {
            self.d
                .shared
                .stop(Halt::Write(format!("cannot read the batch results: {e}")))
        })?;
        let job = &self.d.shared.job;
        Ok(match (decision, route) {
            (Decision::Done, _) => Next::Count(Counted::SkippedOk),
            (Decision::DoneFailed, _) => Next::Count(Counted::SkippedFailed),
            (Decision::Copy, _) => Next::Count(Counted::Copied),
            (Decision::WriteError, _) => unreachable!("only for unreadable rows"),
            (Decision::Send, batch::Route::Result { outcome, from }) => {
                let Prepared {
                    row,
                    fingerprint,
                    request,
                } = p;
                let record = batch_record(
                    self.d.shared,
                    row.number,
                    row.id,
                    row.fields,
                    Some(&request.messages),
                    &fingerprint,
                    outcome,
                    from,
                );
                Next::Msg(Msg::finished(record))
            }
            (Decision::Send, batch::Route::InFlight) => Next::Msg(Msg::InFlight),
            // Pending: `batch collect` sends nothing.
            (Decision::Send, batch::Route::New) if self.d.opts.collect_only => Next::Nothing,
            (Decision::Send, batch::Route::New) if job.mode == Mode::Batch => {
                match add_to_batch(self.d.shared, self.d.pass, &p, idh)? {
                    Some(m) => Next::Msg(m),
                    None => Next::Nothing,
                }
            }
            (Decision::Send, batch::Route::New) => Next::Send(p),
        })
    }

    /// Sends a row online, in a task of its own, once the budget, a concurrency slot and the
    /// pacer allow. `Err(())`: the run stopped before it went.
    async fn send_online(&mut self, p: Prepared) -> Result<(), ()> {
        let shared = self.d.shared;
        let job = &shared.job;
        let stop = shared.stopper.signals.stop.clone();
        // Counting with tiktoken is the dearest step of a row and runs here, in the one
        // dispatcher: do it only when something uses the count, a tokens-per-minute limit (the
        // job's or one learned from headers) or a budget.
        let counted = job.limits.max_cost_usd.is_some() || shared.pacer.paces_tokens();
        let prompt_tokens = if counted {
            shared.prompt_tokens(&p.request.messages)
        } else {
            0
        };
        // `n` choices are billed (and paced) as n times the output.
        let max_output = job.params.max_output_tokens().unwrap_or(0);
        let pace_tokens = prompt_tokens + max_output * job.params.choices();
        // `Job` refuses a budget without a completion cap, so the bound is a bound.
        let bound = shared.bound(prompt_tokens, max_output, job.params.choices());
        let reservation = match shared.reserve(bound).await {
            Ok(r) => r,
            Err(NoRoom::Stopped) => return Err(()),
            Err(NoRoom::Spent(spent, cap)) => {
                shared.stop(Halt::Job(format!(
                    "the budget is spent: ${spent:.6} of ${cap:.6} in this output so far, and the \
                     next request could cost up to ${bound:.6}. Stopped dispatching at row {}; \
                     raise run.max_cost_usd (or --max-cost) and run again to go on",
                    p.row.number
                )));
                return Err(());
            }
        };
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => return Err(()),
            p = self.semaphore.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Err(()),
            _ = shared.pacer.acquire(pace_tokens) => {}
        }
        let sh = shared.clone();
        self.tasks.spawn(async move {
            let counted = counted.then_some(prompt_tokens);
            let m = match process(&sh, p, reservation, pace_tokens, counted).await {
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
        Ok(())
    }

    /// Collects the row tasks that have ended.
    fn reap(&mut self) {
        while let Some(r) = self.tasks.try_join_next() {
            self.ended(r);
        }
    }

    /// Waits for every row task.
    async fn join(&mut self) {
        while let Some(r) = self.tasks.join_next().await {
            self.ended(r);
        }
    }

    /// Whether the input was read to its end. A thread that read or rendered it and died
    /// first (a panic) stops the job: the rows after it stay pending, and none of their
    /// records is taken as gone from the input.
    fn input_ended(&self, rows: &PreparedRows) -> bool {
        if !rows.ended() {
            self.d.shared.stop(Halt::Job(
                "the thread reading and rendering the input died before its end; the rows \
                 after it stay pending: run the same command again, and please report this"
                    .into(),
            ));
        }
        rows.ended()
    }

    /// A task that panicked stops the job: its row stays pending, and the run never ends as if
    /// every row had been done (exit 2, not 0).
    fn ended(&self, r: Result<(), tokio::task::JoinError>) {
        if let Err(e) = r {
            if e.is_panic() {
                self.d.shared.stop(Halt::Job(format!(
                    "a row task panicked ({e}); its row stays pending: run the same command \
                     again, and please report this"
                )));
            }
        }
    }
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
    let bound = if job.limits.max_cost_usd.is_some() {
        let n = shared.prompt_tokens(&p.request.messages);
        let max_output = job.params.max_output_tokens().unwrap_or(0);
        shared.bound(n, max_output, job.params.choices())
    } else {
        0.0
    };
    {
        let mut b = shared.budget.lock().unwrap();
        if !b.has_room(bound, false) {
            let (committed, cap) = (b.total() + b.batches, b.cap.unwrap_or(0.0));
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
        if b.cap.is_some() {
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
        Ok(Err(too_big)) => Ok(Some(Msg::finished(error_record(
            p.row.number,
            p.row.id.clone(),
            p.row.fields.clone(),
            Some(crate::fingerprint::hex(&p.fingerprint)),
            RecordError {
                kind: ErrorKind::BadRequest,
                status: None,
                message: too_big,
            },
            0,
            0,
            0.0,
        )))),
        Err(e) => {
            shared.stop(Halt::Write(write_stop_message(&e)));
            Err(())
        }
    }
}
