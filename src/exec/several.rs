//! Several choices from an API that answers one a request (Claude's Messages API has no `n`):
//! the same request sent once a choice, each with its own retries, and the answers merged
//! into one completion whose usage is every request's. What was paid stays paid: when a later
//! request fails or the run stops, the answers already in are kept on the row's record with
//! their usage and cost, and the row ends with that failure.

use std::sync::Arc;
use std::time::Instant;

use super::attempt::{send, Sending};
use super::records::usage_of;
use super::Shared;
use crate::provider::{Completion, ErrorKind, ProviderError, Request};

/// Why a row ended short of the choices it asked for, after some were paid.
pub(super) type Short = (ErrorKind, String);

/// Sends `request` for `k` choices: one request when the wire can ask for several, else `k`
/// requests in turn. `None`: the row stays pending (nothing was answered before the stop).
/// `Ok((c, Some(short)))`: some choices were answered and paid, then a request failed or the
/// run stopped.
pub(super) async fn send_choices(
    sh: &Arc<Shared>,
    row: u64,
    request: &Request,
    k: u64,
    started: Instant,
    st: &mut Sending,
) -> Option<Result<(Completion, Option<Short>), ProviderError>> {
    if k <= 1 || !sh.backend.wire.one_choice_per_request() {
        return send(sh, row, request, k, started, st)
            .await
            .map(|r| r.map(|c| (c, None)));
    }
    let mut merged: Option<Completion> = None;
    for i in 0..k {
        let stopped = sh.stopper.signals.stop.is_cancelled();
        let answer = if stopped && i > 0 {
            None
        } else {
            // Each request has the whole retry policy: a choice is not short of retries
            // because an earlier one used some.
            st.retrier = sh.retry.start();
            send(sh, row, request, 1, started, st).await
        };
        let failure = match (answer, merged.take()) {
            (Some(Ok(c)), acc) => {
                merged = Some(merge(sh, &request.messages, acc, c));
                continue;
            }
            (None, None) => return None,
            (Some(Err(e)), None) => return Some(Err(e)),
            (None, Some(acc)) => {
                merged = Some(acc);
                (
                    ErrorKind::Interrupted,
                    format!(
                        "the run stopped after {i} of {k} choices were answered; what they cost \
                         is on this record, and a rerun sends the row again"
                    ),
                )
            }
            (Some(Err(e)), Some(acc)) => {
                merged = Some(acc);
                (
                    e.kind,
                    format!(
                        "choice {} of {k} failed after {i} were answered (their cost is on this \
                         record): {}",
                        i + 1,
                        e.message
                    ),
                )
            }
        };
        return merged.map(|c| Ok((c, Some(failure))));
    }
    merged.map(|c| Ok((c, None)))
}

/// One answer added to those before it: its choice appended, its usage summed (counted with
/// the tokenizer where the server sent none), the first answer's model and text kept.
fn merge(
    sh: &Shared,
    messages: &[crate::chat::Message],
    acc: Option<Completion>,
    c: Completion,
) -> Completion {
    let usage = usage_of(sh, messages, &c);
    let Some(mut acc) = acc else {
        return Completion {
            usage: Some(usage),
            ..c
        };
    };
    let mut choices = acc.all_choices();
    choices.extend(c.all_choices());
    acc.choices = choices;
    let mut total = acc.usage.unwrap_or_default();
    total.add(&usage);
    acc.usage = Some(total);
    acc.rate_limits = c.rate_limits.or(acc.rate_limits);
    acc
}
