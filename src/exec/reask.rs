//! Re-asking: every choice is judged against the job's shape, and those that break it are asked
//! for again, up to `max_invalid` times, within the budget.

use std::sync::Arc;
use std::time::Instant;

use super::attempt::Sending;
use super::budget::Reservation;
use super::records::usage_of;
use super::several::send_choices;
use super::Shared;
use serde_json::{Map, Value};

use crate::chat::Usage;
use crate::ledger::record::InvalidAttempt;
use crate::provider::{Choice, Completion, ErrorKind, Request};
use crate::request::Prepared;
use crate::shape::{Shape, Verdict};

/// A row's completion once its shape is judged: its choices, what was kept of each, and what
/// every attempt cost.
pub(super) struct Shaped {
    pub(super) choices: Vec<Choice>,
    pub(super) data: Vec<Option<Value>>,
    pub(super) invalid: Vec<InvalidAttempt>,
    /// Still wrong after the last attempt: the row fails with this kind and message.
    pub(super) failure: Option<(ErrorKind, String)>,
    pub(super) usage: Usage,
}

/// Judges every choice against the job's shape and asks again for those that break it, up to
/// `max_invalid` times, each time for only the failing choices (with `n` set to how many).
/// Every attempt's tokens are counted; a regeneration that the budget has no room for is not
/// sent. A stop during a re-ask ends the row as `Interrupted`, with every paid attempt's usage.
pub(super) async fn shape_up(
    sh: &Arc<Shared>,
    shape: &Shape,
    p: &Prepared,
    first: Completion,
    reservation: &mut Reservation,
    started: Instant,
    st: &mut Sending,
) -> (Shaped, Completion) {
    let choices = first.all_choices();
    let mut s = Shaped {
        data: vec![None; choices.len()],
        choices,
        invalid: Vec::new(),
        failure: None,
        usage: usage_of(sh, &p.request.messages, &first),
    };
    let mut attempt = 1u32;
    let mut last = first;
    loop {
        let (failing, refused) = s.judge(shape, attempt, &p.row.fields);
        if let Some(r) = refused {
            s.failure = Some((ErrorKind::Refusal, format!("the model refused: {r}")));
            return (s, last);
        }
        if failing.is_empty() {
            return (s, last);
        }
        if attempt > shape.max_invalid {
            s.failure = Some((
                ErrorKind::InvalidOutput,
                format!(
                    "still wrong after {attempt} attempt(s) ([output] max_invalid = {}): {}",
                    shape.max_invalid,
                    s.problems(attempt, true)
                ),
            ));
            return (s, last);
        }
        // Ask again, for the failing choices only, within the budget.
        let k = failing.len() as u64;
        let n = st
            .prompt_tokens
            .get_or_insert_with(|| sh.prompt_tokens(&p.request.messages));
        let out = sh.job.params.max_output_tokens().unwrap_or(0);
        if !reservation.grow(sh.bound(*n, out, k)) {
            s.failure = Some((
                ErrorKind::InvalidOutput,
                format!(
                    "not asked again: the budget has no room for another attempt; {}",
                    s.problems(attempt, false)
                ),
            ));
            return (s, last);
        }
        attempt += 1;
        let (again, c, short) = match ask_again(sh, p, k, started, st, attempt - 1).await {
            Ok(x) => x,
            Err(failure) => {
                s.failure = Some(failure);
                return (s, last);
            }
        };
        s.usage.add(&usage_of(sh, &again.messages, &c));
        for (slot, new) in failing.iter().zip(c.all_choices()) {
            s.choices[*slot] = new;
        }
        last = c;
        if let Some(short) = short {
            // Some of the choices asked again were paid, then the rest failed.
            s.failure = Some(short);
            return (s, last);
        }
    }
}

/// Sends the row's request again for `k` choices. `Err`: the row ends with this failure:
/// the request failed outright, or the run stopped first (`Interrupted`: what the `paid`
/// attempts before it cost goes on record now, since the next step may never come, and the
/// rerun asks again). A re-ask is a new request: after a stop it is not sent.
async fn ask_again(
    sh: &Arc<Shared>,
    p: &Prepared,
    k: u64,
    started: Instant,
    st: &mut Sending,
    paid: u32,
) -> Result<(Request, Completion, Option<super::several::Short>), (ErrorKind, String)> {
    let again = Request {
        messages: p.request.messages.clone(),
        choices: u32::try_from(k).unwrap_or(u32::MAX),
        body: sh
            .backend
            .wire
            .with_choices(&p.request.body, k, sh.job.params.n.is_some()),
    };
    let answer = if sh.stopper.signals.stop.is_cancelled() {
        None
    } else {
        send_choices(sh, p.row.number, &again, k, started, st).await
    };
    match answer {
        Some(Ok((c, short))) => Ok((again, c, short)),
        None => Err((
            ErrorKind::Interrupted,
            format!(
                "the run stopped before this row was asked again; what its {paid} answered \
                 attempt(s) cost is on this record, and a rerun sends it again"
            ),
        )),
        Some(Err(e)) => Err((e.kind, e.message)),
    }
}

impl Shaped {
    /// Judges the choices not yet judged fine: the indices of those that broke the shape (each
    /// kept as an invalid attempt), and a refusal if one refused.
    fn judge(
        &mut self,
        shape: &Shape,
        attempt: u32,
        row: &Map<String, Value>,
    ) -> (Vec<usize>, Option<String>) {
        let (mut failing, mut refused) = (Vec::new(), None);
        for (i, c) in self.choices.iter().enumerate() {
            if self.data[i].is_some() {
                continue; // judged fine on an earlier attempt
            }
            match shape.judge(&c.text, c.refusal.as_deref(), row) {
                Verdict::Ok(d) => self.data[i] = Some(d.unwrap_or(Value::Null)),
                Verdict::Refused(r) => refused = Some(r),
                Verdict::Invalid(problems) => {
                    self.invalid.push(InvalidAttempt {
                        attempt,
                        variant: i as u32,
                        problems,
                    });
                    failing.push(i);
                }
            }
        }
        (failing, refused)
    }

    /// What the attempt got wrong, quoted for the row's error.
    fn problems(&self, attempt: u32, name_variants: bool) -> String {
        self.invalid
            .iter()
            .filter(|a| a.attempt == attempt)
            .map(|a| {
                if name_variants {
                    format!("variant {}: {}", a.variant + 1, a.problems.join("; "))
                } else {
                    a.problems.join("; ")
                }
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }
}
