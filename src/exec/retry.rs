//! The retry policy: which failures are retried (decided by `ErrorKind::disposition`), and how
//! long to wait: exponential backoff with jitter, or the server's `retry-after` when it gave one.
//! The only module that uses the `backoff` crate (RUSTSEC-2025-0012: unmaintained), so swapping
//! it out touches this file alone.

use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;

use crate::provider::{Disposition, ProviderError};

/// The longest a server's `retry-after` is obeyed before we wait our own backoff instead.
const MAX_SERVER_WAIT: Duration = crate::provider::MAX_SERVER_WAIT;

pub struct RetryPolicy {
    pub max_retries: u32,
    pub initial: Duration,
    pub max_interval: Duration,
}

impl RetryPolicy {
    pub fn new(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            initial: Duration::from_millis(500),
            max_interval: Duration::from_secs(60),
        }
    }

    pub fn start(&self) -> Retrier {
        Retrier {
            backoff: ExponentialBackoff {
                initial_interval: self.initial,
                current_interval: self.initial,
                randomization_factor: 0.5,
                multiplier: 2.0,
                max_interval: self.max_interval,
                // Attempts are capped by count, not by elapsed time.
                max_elapsed_time: None,
                ..ExponentialBackoff::default()
            },
            retries: 0,
            max_retries: self.max_retries,
        }
    }
}

/// One row's retry state.
pub struct Retrier {
    backoff: ExponentialBackoff,
    retries: u32,
    max_retries: u32,
}

impl Retrier {
    /// How long to wait before the next attempt, or `None` when this failure is final.
    pub fn next_delay(&mut self, err: &ProviderError) -> Option<Duration> {
        if err.kind.disposition() != Disposition::Retry || self.retries >= self.max_retries {
            return None;
        }
        self.retries += 1;
        let ours = self
            .backoff
            .next_backoff()
            .unwrap_or(self.backoff.max_interval);
        Some(match err.retry_after {
            // The server knows when it will take the request: wait that long, no less.
            Some(theirs) if theirs <= MAX_SERVER_WAIT => theirs,
            _ => ours,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ErrorKind;

    #[test]
    fn backoff_grows_with_jitter_and_stops_at_the_cap() {
        let mut r = RetryPolicy::new(4).start();
        let e = ProviderError::new(ErrorKind::Server, "boom");
        let d: Vec<Duration> = (0..5).filter_map(|_| r.next_delay(&e)).collect();
        assert_eq!(d.len(), 4, "four retries, then final");
        // 0.5s ±50%, 1s ±50%, 2s ±50%, 4s ±50%
        for (i, base) in [0.5, 1.0, 2.0, 4.0].iter().enumerate() {
            let s = d[i].as_secs_f64();
            assert!(
                s >= base * 0.5 - 1e-9 && s <= base * 1.5 + 1e-9,
                "retry {i}: {s}"
            );
        }
    }

    #[test]
    fn retry_after_from_the_server_wins() {
        let mut r = RetryPolicy::new(3).start();
        let mut e = ProviderError::new(ErrorKind::RateLimited, "slow down");
        e.retry_after = Some(Duration::from_millis(1234));
        assert_eq!(r.next_delay(&e), Some(Duration::from_millis(1234)));
    }

    #[test]
    fn row_and_job_errors_are_not_retried() {
        let mut r = RetryPolicy::new(3).start();
        for k in [
            ErrorKind::BadRequest,
            ErrorKind::Auth,
            ErrorKind::Quota,
            ErrorKind::Input,
        ] {
            assert_eq!(r.next_delay(&ProviderError::new(k, "x")), None, "{k:?}");
        }
        for k in [
            ErrorKind::Timeout,
            ErrorKind::Connection,
            ErrorKind::InvalidResponse,
            ErrorKind::RateLimited,
        ] {
            assert!(
                RetryPolicy::new(3)
                    .start()
                    .next_delay(&ProviderError::new(k, "x"))
                    .is_some(),
                "{k:?}"
            );
        }
    }
}
