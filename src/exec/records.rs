//! The records a run writes: answered, failed, and answered by a batch. One shape per outcome,
//! so every path fills the same fields.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Map;
use tokio::sync::mpsc;

use super::batch;
use super::writer::Msg;
use super::Shared;
use crate::chat::{Mode, Usage};
use crate::cost::{Price, Tier};
use crate::error::Error;
use crate::ledger::record::{Record, RecordError, Status};
use crate::provider::{Completion, ErrorKind};

/// Records the results no input row matched.
pub(super) async fn record_unmatched(
    sh: &Arc<Shared>,
    pass: &batch::Pass,
    tx: &mpsc::Sender<Msg>,
) -> Result<(), Error> {
    let unmatched = pass.unmatched()?;
    if pass.importing {
        if !unmatched.is_empty() {
            tracing::warn!(
                "{} result lines match no pending row of this job (already done, or a request \
                 the job no longer makes: its custom_id names the row and request fingerprint); \
                 they are not written",
                unmatched.len()
            );
        }
        return Ok(());
    }
    for u in unmatched {
        let record = batch_record(
            sh,
            u.row,
            u.row.to_string(),
            Map::new(),
            None,
            &u.fp,
            u.outcome,
            u.from,
        );
        let _ = tx
            .send(Msg::Finished {
                record: Box::new(record),
                retries: 0,
                rate_limited: 0,
                slot: None,
            })
            .await;
    }
    Ok(())
}

/// The record of a row the Batch API answered, priced at batch rates.
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_record(
    sh: &Shared,
    row: u64,
    id: String,
    input: Map<String, serde_json::Value>,
    messages: Option<&[crate::chat::Message]>,
    fp: &[u8; 16],
    outcome: batch::results::Answer,
    from: batch::results::Answerer,
) -> Record {
    use batch::results::Answer;
    let fingerprint = Some(crate::fingerprint::hex(fp));
    let mut record = match outcome {
        Answer::Answered(c) => {
            let c = *c;
            let usage = match (c.usage, messages) {
                (Some(u), _) => u,
                (None, Some(m)) => usage_of(sh, m, &c),
                // A row that left the input: its prompt is not known any more.
                (None, None) => Usage {
                    completion_tokens: sh.backend.counter.count_text(&c.text),
                    total_tokens: sh.backend.counter.count_text(&c.text),
                    estimated: true,
                    ..Usage::default()
                },
            };
            let price = sh
                .backend
                .price_at(Tier::Batch, c.model.as_deref(), &sh.job.served.model);
            // A batch answer is judged like an online one; it cannot be asked again within
            // the batch, so one that breaks the shape fails its row (`--retry-failed` sends
            // it again).
            let choices = c.all_choices();
            let judged = sh
                .shape
                .as_ref()
                .map(|shape| judge_once(shape, &choices, &input));
            let several = sh.job.params.choices() > 1 || choices.len() > 1;
            let mut record = answered_record(
                row,
                id,
                input,
                c,
                usage,
                price,
                1,
                from.took_ms,
                fingerprint,
            );
            let data = match judged {
                Some((data, invalid, failure)) => {
                    judged_wrong(&mut record, invalid, failure);
                    data
                }
                None => vec![None; choices.len()],
            };
            set_choices(&mut record, choices, data, several);
            record
        }
        Answer::Failed { status, message } => error_record(
            row,
            id,
            input,
            fingerprint,
            RecordError {
                kind: batch::results::FAILED_KIND,
                status,
                message,
            },
            1,
            from.took_ms,
            0.0,
        ),
        Answer::NotRun => unreachable!("a row never run has no record"),
    };
    record.mode = Some(Mode::Batch);
    record.batch_id = Some(from.batch_id);
    record
}

/// The record of a row that got an answer (online or from a batch); the callers add what
/// only they know.
#[allow(clippy::too_many_arguments)]
pub(super) fn answered_record(
    row: u64,
    id: String,
    input: Map<String, serde_json::Value>,
    c: Completion,
    usage: Usage,
    price: Option<Price>,
    attempts: u32,
    latency_ms: u64,
    fingerprint: Option<String>,
) -> Record {
    Record {
        completion: Some(c.text),
        finish_reason: c.finish_reason,
        model: c.model,
        cost_usd: price.map(|p| p.cost(&usage)),
        cache_saved_usd: price.map(|p| p.cache_saving(&usage)).filter(|&s| s != 0.0),
        usage: Some(usage),
        ..Record::new(
            row,
            id,
            Status::Ok,
            input,
            fingerprint,
            attempts,
            latency_ms,
        )
    }
}

/// What the shape judged wrong: the attempts that were not kept and, if the row still fails,
/// its error.
pub(super) fn judged_wrong(
    record: &mut Record,
    invalid: Vec<crate::ledger::record::InvalidAttempt>,
    failure: Option<(ErrorKind, String)>,
) {
    record.invalid_attempts = (!invalid.is_empty()).then_some(invalid);
    if let Some((kind, message)) = failure {
        record.status = Status::Error;
        record.error = Some(RecordError {
            kind,
            status: None,
            message,
        });
    }
}

/// The record's `data` (the first choice's) and, when the job asks for several, `variants`.
pub(super) fn set_choices(
    record: &mut Record,
    choices: Vec<crate::provider::Choice>,
    data: Vec<Option<serde_json::Value>>,
    several: bool,
) {
    record.data = data.first().cloned().flatten();
    if several {
        record.variants = Some(
            choices
                .into_iter()
                .zip(data)
                .map(|(c, d)| crate::ledger::record::Variant {
                    completion: c.text,
                    finish_reason: c.finish_reason,
                    data: d,
                })
                .collect(),
        );
    }
}

/// The server's usage, or, when it sent none, the tokenizer's count marked as estimated:
/// never a silent 0.
pub(super) fn usage_of(sh: &Shared, messages: &[crate::chat::Message], c: &Completion) -> Usage {
    if let Some(u) = c.usage {
        return u;
    }
    if !sh.no_usage_warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "{} sent no `usage`: counting tokens with the tokenizer instead; those records say \
             \"estimated\": true",
            sh.job.served.base_url
        );
    }
    let prompt = sh.prompt_tokens(messages);
    let completion = sh.backend.counter.count_text(&c.text);
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        estimated: true,
        ..Usage::default()
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn error_record(
    row: u64,
    id: String,
    input: serde_json::Map<String, serde_json::Value>,
    fingerprint: Option<String>,
    error: RecordError,
    attempts: u32,
    latency_ms: u64,
    unconfirmed: f64,
) -> Record {
    let id = if id.is_empty() { row.to_string() } else { id };
    Record {
        error: Some(error),
        unconfirmed_usd: (unconfirmed > 0.0).then_some(unconfirmed),
        ..Record::new(
            row,
            id,
            Status::Error,
            input,
            fingerprint,
            attempts,
            latency_ms,
        )
    }
}

/// Judges every choice once, with no asking again: each choice's data, what broke, and the
/// row's failure if any choice did.
pub(super) type Judged = (
    Vec<Option<serde_json::Value>>,
    Vec<crate::ledger::record::InvalidAttempt>,
    Option<(ErrorKind, String)>,
);

pub(super) fn judge_once(
    shape: &crate::shape::Shape,
    choices: &[crate::provider::Choice],
    row: &Map<String, serde_json::Value>,
) -> Judged {
    use crate::shape::Verdict;
    let mut data = Vec::with_capacity(choices.len());
    let mut invalid = Vec::new();
    let mut failure = None;
    for (i, c) in choices.iter().enumerate() {
        match shape.judge(&c.text, c.refusal.as_deref(), row) {
            Verdict::Ok(d) => data.push(d),
            Verdict::Refused(r) => {
                data.push(None);
                failure = Some((ErrorKind::Refusal, format!("the model refused: {r}")));
            }
            Verdict::Invalid(problems) => {
                data.push(None);
                if failure.is_none() {
                    failure = Some((
                        ErrorKind::InvalidOutput,
                        format!("variant {}: {}", i + 1, problems.join("; ")),
                    ));
                }
                invalid.push(crate::ledger::record::InvalidAttempt {
                    attempt: 1,
                    variant: i as u32,
                    problems,
                });
            }
        }
    }
    (data, invalid, failure)
}
