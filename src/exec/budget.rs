//! The budget: the output's spend so far, this run's, and every request in flight at its worst
//! case. The one place the worst case is bounded and the cap is checked.

use std::sync::Arc;

use super::Shared;
use crate::job::Job;

/// Spend in USD: what the output recorded before this run, and this run's.
#[derive(Default)]
pub(super) struct Budget {
    pub(super) cap: Option<f64>,
    pub(super) before: f64,
    pub(super) spent: f64,
    pub(super) unconfirmed: f64,
    /// Requests in flight at their worst case.
    pub(super) reserved: f64,
    /// How many reservations are held (float sums drift; a count does not).
    pub(super) holders: usize,
    /// Batches submitted and not yet collected, at their worst case: spend the budget must
    /// leave room for.
    pub(super) batches: f64,
}

impl Budget {
    /// What the output has spent: before this run, and in it (unconfirmed attempts at their
    /// worst case).
    pub(super) fn total(&self) -> f64 {
        self.before + self.spent + self.unconfirmed
    }

    /// Whether `more` fits under the cap beside what is spent, what batches hold and what
    /// requests in flight may cost: the one budget check.
    pub(super) fn has_room(&self, more: f64, in_flight: bool) -> bool {
        let held = if in_flight { self.reserved } else { 0.0 };
        self.cap
            .is_none_or(|cap| self.total() + self.batches + held + more <= cap)
    }
}

/// Why a reservation was not made.
pub(super) enum NoRoom {
    /// The budget is spent: (spent so far, the cap).
    Spent(f64, f64),
    /// The run was stopped while waiting for requests in flight to settle.
    Stopped,
}

impl Shared {
    /// A request's prompt tokens as billed: its messages, and the schema sent with it.
    pub(super) fn prompt_tokens(&self, messages: &[crate::chat::Message]) -> u64 {
        self.backend.counter.count_prompt(messages)
            + *self
                .schema_tokens
                .get_or_init(|| schema_tokens(&self.job, &*self.backend.counter))
    }

    /// The most one request can cost: `prompt_tokens` in, and `max_output` tokens for each of
    /// `choices` out, at the job's price (0 when the price is unknown, for which a budget is
    /// refused at the start). An API that answers one choice a request is paid the prompt
    /// once a choice. The one worst-case bound.
    pub(super) fn bound(&self, prompt_tokens: u64, max_output: u64, choices: u64) -> f64 {
        let prompts = if self.backend.wire.one_choice_per_request() {
            prompt_tokens * choices
        } else {
            prompt_tokens
        };
        self.price(None)
            .map(|pr| pr.bound(prompts, max_output * choices))
            .unwrap_or(0.0)
    }

    /// Reserves `bound` for a new request. While requests in flight hold reservations, waits
    /// for them to settle before calling the budget spent: a stop then means the output's
    /// spend really is at the cap, so the same command run again sends nothing.
    pub(super) async fn reserve(self: &Arc<Shared>, bound: f64) -> Result<Reservation, NoRoom> {
        let stop = self.stopper.signals.stop.clone();
        loop {
            let released = self.released.notified();
            {
                let mut b = self.budget.lock().unwrap();
                if b.has_room(bound, true) {
                    b.reserved += bound;
                    b.holders += 1;
                    return Ok(Reservation {
                        sh: self.clone(),
                        bound,
                        settled: false,
                    });
                }
                if b.holders == 0 {
                    return Err(NoRoom::Spent(b.total(), b.cap.unwrap_or(0.0)));
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Err(NoRoom::Stopped),
                _ = released => {}
            }
        }
    }
}

/// One request's budget reservation, released however the row ends (a panic included).
pub(super) struct Reservation {
    pub(super) sh: Arc<Shared>,
    pub(super) bound: f64,
    pub(super) settled: bool,
}

impl Reservation {
    /// Reserves `more` for another attempt of the same row; `false` when the budget has no
    /// room for it (nothing is reserved then).
    pub(super) fn grow(&mut self, more: f64) -> bool {
        let mut b = self.sh.budget.lock().unwrap();
        if !b.has_room(more, true) {
            return false;
        }
        b.reserved += more;
        drop(b);
        self.bound += more;
        true
    }

    pub(super) fn settle(mut self, spent: f64, unconfirmed: f64) {
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

/// The tokens a structured output's schema adds to every prompt, as nearly as is known: its
/// JSON text counted with the model's tokenizer (OpenAI bills the schema as prompt tokens but
/// does not publish how it is rendered). 0 without a schema, and for the local model, which
/// is held to the schema by a grammar and never reads it.
pub fn schema_tokens(job: &Job, counter: &dyn crate::tokens::TokenCounter) -> u64 {
    if job.served.provider == crate::job::ProviderKind::Local {
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
