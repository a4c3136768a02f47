//! The circuit breaker: an endpoint that fails every request the same transient way for a
//! while is down, and an outage is not a verdict on the rows.

use std::time::{Duration, Instant};

use crate::provider::{ErrorKind, ProviderError};

/// The circuit breaker: an endpoint that fails every request the same transient way for a
/// while is down, and an outage is not a verdict on the rows.
#[derive(Default)]
pub(super) struct Breaker {
    pub(super) failing_since: Option<Instant>,
    pub(super) failures: u32,
    pub(super) unreachable_only: bool,
    /// When any request last succeeded.
    pub(super) last_success: Option<Instant>,
}

/// How often a row caught in a possible outage tries again.
pub(super) const OUTAGE_PROBE: Duration = Duration::from_secs(1);

/// An unreachable endpoint (nothing listening, DNS, a TLS handshake that fails) stops the job
/// after this long at most; an untrusted certificate stops it at once (`ErrorKind::Endpoint`).
pub(super) const UNREACHABLE_WINDOW: Duration = Duration::from_secs(10);

impl Breaker {
    pub(super) fn success(&mut self) {
        *self = Breaker {
            last_success: Some(Instant::now()),
            ..Breaker::default()
        };
    }

    /// Whether nothing has succeeded since `t`: a row that ran out of retries then is caught in
    /// what may be an outage, and waits for the breaker's verdict instead of failing.
    pub(super) fn nothing_succeeded_since(&self, t: Instant) -> bool {
        self.last_success.is_none_or(|s| s < t)
    }

    /// Counts a failed attempt; `Some(cause)` when the job must stop.
    pub(super) fn failure(&mut self, e: &ProviderError, outage: Duration) -> Option<String> {
        if !matches!(
            e.kind,
            ErrorKind::Connection
                | ErrorKind::Timeout
                | ErrorKind::Server
                | ErrorKind::InvalidResponse
        ) {
            return None; // 429s are pacing's business; row errors are the row's
        }
        let now = Instant::now();
        if self.failing_since.is_none() {
            self.failing_since = Some(now);
            self.unreachable_only = true;
        }
        self.failures += 1;
        self.unreachable_only &= e.unreachable;
        let window = if self.unreachable_only {
            outage.min(UNREACHABLE_WINDOW)
        } else {
            outage
        };
        let since = self.failing_since.expect("set above");
        (self.failures >= 3 && now.duration_since(since) >= window).then(|| {
            format!(
                "{} for {:.0} s, {} attempts in a row ({e})",
                if self.unreachable_only {
                    "the endpoint cannot be reached"
                } else {
                    "every request has failed"
                },
                now.duration_since(since).as_secs_f64(),
                self.failures
            )
        })
    }
}
