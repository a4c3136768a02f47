//! One row's request: sent with retries (honouring the pacer and the circuit breaker), then,
//! when the job has a shape, asked again for what breaks it; the row's record at the end.

use std::sync::Arc;
use std::time::Instant;

use super::attempt::Sending;
use super::budget::Reservation;
use super::reask::{shape_up, Shaped};
use super::records::{answered_record, error_record, judged_wrong, set_choices, usage_of};
use super::several::send_choices;
use super::writer::Msg;
use super::Shared;
use crate::ledger::record::{Record, RecordError};
use crate::provider::{Completion, ErrorKind};
use crate::request::Prepared;

/// Sends one row with retries, then (when the job has a shape) asks again for what breaks
/// it. `None`: the row stays pending (job stopped or interrupted).
pub(super) async fn process(
    sh: &Arc<Shared>,
    p: Prepared,
    mut reservation: Reservation,
    pace_tokens: u64,
    prompt_tokens: Option<u64>,
) -> Option<Msg> {
    super::failpoint("row", p.row.number);
    let started = Instant::now();
    let mut st = Sending {
        retrier: sh.retry.start(),
        attempts: 0,
        rate_limited: 0,
        unconfirmed: 0.0,
        pace_tokens,
        prompt_tokens,
    };
    let pending = |reservation: Reservation, unconfirmed: f64| {
        reservation.settle(0.0, unconfirmed);
        (unconfirmed > 0.0).then_some(Msg::Unconfirmed(unconfirmed))
    };
    let choices = sh.job.params.choices();
    let outcome = send_choices(sh, p.row.number, &p.request, choices, started, &mut st).await;
    let Some(outcome) = outcome else {
        return pending(reservation, st.unconfirmed);
    };
    let shaped = match outcome {
        Ok((c, short)) => Ok(shape(sh, &p, c, short, &mut reservation, started, &mut st).await),
        Err(e) => Err(e),
    };
    let Sending {
        attempts,
        rate_limited,
        unconfirmed,
        ..
    } = st;
    let latency_ms = started.elapsed().as_millis() as u64;
    let record = match shaped {
        Ok((c, shaped)) => answered(sh, p, c, shaped, attempts, latency_ms, unconfirmed),
        Err(e) => {
            tracing::warn!(
                "row {}: failed after {attempts} attempt(s): {e}",
                p.row.number
            );
            error_record(
                p.row.number,
                p.row.id,
                p.row.fields,
                Some(crate::fingerprint::hex(&p.fingerprint)),
                RecordError {
                    kind: e.kind,
                    status: e.status,
                    message: e.message,
                },
                attempts,
                latency_ms,
                unconfirmed,
            )
        }
    };
    reservation.settle(record.cost_usd.unwrap_or(0.0), unconfirmed);
    Some(Msg::Finished {
        record: Box::new(record),
        retries: attempts - 1,
        rate_limited,
        slot: None,
    })
}

/// The answer judged against the job's shape (asking again for what breaks it), or, when
/// some choices were paid before a failure (`short`), kept as it is with that failure.
async fn shape(
    sh: &Arc<Shared>,
    p: &Prepared,
    c: Completion,
    short: Option<super::several::Short>,
    reservation: &mut Reservation,
    started: Instant,
    st: &mut Sending,
) -> (Completion, Option<Shaped>) {
    match (short, sh.shape.as_ref()) {
        (Some(short), _) => {
            let choices = c.all_choices();
            let s = Shaped {
                data: vec![None; choices.len()],
                choices,
                invalid: Vec::new(),
                failure: Some(short),
                usage: usage_of(sh, &p.request.messages, &c),
            };
            (c, Some(s))
        }
        (None, Some(shape)) => {
            let (s, c) = shape_up(sh, shape, p, c, reservation, started, st).await;
            (c, Some(s))
        }
        (None, None) => (c, None),
    }
}

/// The record of a row that got an answer: its usage over every attempt, its cost, and what
/// the shape kept of each choice.
fn answered(
    sh: &Shared,
    p: Prepared,
    c: Completion,
    shaped: Option<Shaped>,
    attempts: u32,
    latency_ms: u64,
    unconfirmed: f64,
) -> Record {
    let Prepared {
        row,
        fingerprint,
        request,
    } = p;
    let usage = match &shaped {
        Some(s) => s.usage,
        None => usage_of(sh, &request.messages, &c),
    };
    let price = sh.price(c.model.as_deref());
    let several = sh.job.params.choices() > 1 || !c.choices.is_empty();
    // Without a shape nothing judges the answer: a refusal on every choice (Claude's
    // `stop_reason: refusal`, Gemini's SAFETY, OpenAI's `message.refusal`) still fails the
    // row, paid and kept, never an `ok` with no text.
    let refused = shaped
        .is_none()
        .then(|| c.refused_everywhere().map(String::from))
        .flatten();
    let ttft_ms = c.ttft_ms;
    // Plain text with several choices keeps them all; one choice needs no copy.
    let plain_choices = (shaped.is_none() && several).then(|| c.all_choices());
    let mut record = answered_record(
        row.number,
        row.id,
        row.fields,
        c,
        usage,
        price,
        attempts,
        latency_ms,
        Some(crate::fingerprint::hex(&fingerprint)),
    );
    record.unconfirmed_usd = (unconfirmed > 0.0).then_some(unconfirmed);
    record.ttft_ms = ttft_ms;
    match (shaped, plain_choices) {
        (Some(s), _) => {
            if let Some((_, message)) = &s.failure {
                tracing::warn!("row {}: {message}", record.row);
            }
            judged_wrong(&mut record, s.invalid, s.failure);
            // A regenerated first choice replaces the first answer's.
            if let Some(first) = s.choices.first() {
                record.completion = Some(first.text.clone());
                record.finish_reason = first.finish_reason.clone();
            }
            set_choices(&mut record, s.choices, s.data, several);
        }
        (None, Some(choices)) => {
            let none = vec![None; choices.len()];
            set_choices(&mut record, choices, none, true);
        }
        (None, None) => {}
    }
    if let Some(r) = refused {
        let failure = (ErrorKind::Refusal, format!("the model refused: {r}"));
        judged_wrong(&mut record, Vec::new(), Some(failure));
    }
    record
}
