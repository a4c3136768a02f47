//! One request's attempts: sent until answered or failed for good, with the retry policy's
//! delays, the pacer's slots and the circuit breaker's verdict; what may have been billed
//! without an answer is counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::breaker::OUTAGE_PROBE;
use super::signals::{job_stop_message, Halt};
use super::Shared;
use crate::provider::{Completion, Disposition, ErrorKind, ProviderError, Request};

/// One request's attempts: retries, 429s, and what may have been billed without an answer.
pub(super) struct Sending {
    pub(super) retrier: crate::exec::retry::Retrier,
    pub(super) attempts: u32,
    pub(super) rate_limited: u32,
    pub(super) unconfirmed: f64,
    pub(super) pace_tokens: u64,
    pub(super) prompt_tokens: Option<u64>,
}

/// Sends one request until it is answered or fails for good. `None`: the row stays pending
/// (the job stopped, a signal, an outage).
pub(super) async fn send(
    sh: &Arc<Shared>,
    row: u64,
    request: &Request,
    choices: u64,
    started: Instant,
    st: &mut Sending,
) -> Option<Result<Completion, ProviderError>> {
    let signals = &sh.stopper.signals;
    // The worst case of one attempt that may have been billed without an answer.
    let worst = |prompt_tokens: &mut Option<u64>| -> f64 {
        let n = *prompt_tokens.get_or_insert_with(|| sh.prompt_tokens(&request.messages));
        let out = sh
            .job
            .params
            .max_output_tokens()
            .unwrap_or(crate::job::ASSUMED_MAX_OUTPUT);
        sh.bound(n, out, choices)
    };
    loop {
        st.attempts += 1;
        let result = tokio::select! {
            biased;
            _ = signals.abort.cancelled() => {
                // Cancelled after it was sent: the server may bill it anyway.
                st.unconfirmed += worst(&mut st.prompt_tokens);
                return None;
            }
            r = sh.backend.provider.complete(request) => r,
        };
        let e = match result {
            Ok(c) => {
                sh.pacer.observe(c.rate_limits.as_ref());
                sh.pacer.succeeded();
                sh.breaker.lock().unwrap().success();
                return Some(Ok(c));
            }
            Err(e) => e,
        };
        if e.maybe_billed {
            st.unconfirmed += worst(&mut st.prompt_tokens);
        }
        if !sh.counts_failure(&e, st) {
            return None;
        }
        match st.retrier.next_delay(&e) {
            Some(delay) => {
                tracing::debug!(row, attempt = st.attempts, "retrying in {delay:?}: {e}");
                if !sh.wait_to_retry(delay, request, st).await {
                    return None;
                }
            }
            None if e.kind.disposition() == Disposition::Retry
                && sh.breaker.lock().unwrap().nothing_succeeded_since(started) =>
            {
                // Every request has failed since this row began: an outage is not a verdict
                // on the row. Keep trying until something succeeds (then the row fails as
                // usual) or the breaker stops the job (the row stays pending).
                tokio::select! {
                    _ = signals.stop.cancelled() => return None,
                    _ = tokio::time::sleep(OUTAGE_PROBE) => {}
                }
            }
            None => return Some(Err(e)),
        }
    }
}

impl Shared {
    /// What a failed attempt tells the pacer and the circuit breaker; `false` when the job
    /// must stop (auth, quota, an endpoint that is wrong or down).
    fn counts_failure(&self, e: &ProviderError, st: &mut Sending) -> bool {
        if e.kind == ErrorKind::RateLimited {
            st.rate_limited += 1;
            self.pacer
                .rate_limited(e.retry_after, e.rate_limits.as_ref());
        } else {
            self.pacer.observe(e.rate_limits.as_ref());
        }
        if e.kind.disposition() == Disposition::StopJob {
            self.stop(Halt::Job(job_stop_message(&self.job, e)));
            return false;
        }
        let tripped = self
            .breaker
            .lock()
            .unwrap()
            .failure(e, self.job.limits.outage);
        if let Some(cause) = tripped {
            self.stop(Halt::Job(format!(
                "{}: {cause}. Rows not done stay pending: run the same command again \
                 once the endpoint is back",
                self.job.served.base_url
            )));
            return false;
        }
        true
    }

    /// Waits out a retry's delay, then the pacer; `false` when the run stopped meanwhile (a
    /// retry is a new request: after a stop, the row waits for the rerun).
    async fn wait_to_retry(&self, delay: Duration, request: &Request, st: &mut Sending) -> bool {
        let stop = &self.stopper.signals.stop;
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        if st.prompt_tokens.is_none() && self.pacer.paces_tokens() {
            // A token limit was learned since this row was dispatched.
            let n = self.prompt_tokens(&request.messages);
            st.pace_tokens += n;
            st.prompt_tokens = Some(n);
        }
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = self.pacer.acquire(st.pace_tokens) => true,
        }
    }
}
