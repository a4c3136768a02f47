//! Sliding-window request/token rate limiter and OpenAI-style rate-limit headers.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Which limit rejected a request (also the OpenAI error `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitKind {
    Requests,
    Tokens,
}

/// Window state as seen by one request, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub remaining_requests: u64,
    pub reset_requests: Duration,
    pub remaining_tokens: u64,
    pub reset_tokens: Duration,
}

pub(crate) enum Decision {
    Admitted(Snapshot),
    Limited {
        kind: LimitKind,
        /// Usage scaled to a per-minute figure, as OpenAI's message reports it.
        used_per_min: u64,
        requested: u64,
        retry_after: Duration,
        snapshot: Snapshot,
    },
}

pub(crate) struct Limiter {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    window: Duration,
    window_s: f64,
    req_limit: Option<u64>,
    tok_limit: Option<u64>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Admitted requests in arrival order: (arrival, tokens). Sorted because `now`
    /// is read under the lock.
    entries: VecDeque<(Instant, u64)>,
    tokens: u64,
}

/// Per-window limit from a per-minute figure; at least 1 so a tiny rpm with a short
/// window still lets something through.
fn per_window(per_min: u64, window_s: f64) -> u64 {
    ((per_min as f64) * window_s / 60.0).floor().max(1.0) as u64
}

impl Limiter {
    /// None when neither limit is configured, so the hot path skips the mutex entirely.
    pub fn new(rpm: Option<u64>, tpm: Option<u64>, window_s: f64) -> Option<Limiter> {
        if rpm.is_none() && tpm.is_none() {
            return None;
        }
        let window_s = if window_s > 0.0 { window_s } else { 10.0 };
        Some(Limiter {
            rpm,
            tpm,
            window: Duration::from_secs_f64(window_s),
            window_s,
            req_limit: rpm.map(|r| per_window(r, window_s)),
            tok_limit: tpm.map(|t| per_window(t, window_s)),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Decide admission for a request costing `tokens`; admitted requests enter the window.
    pub fn check(&self, tokens: u64) -> Decision {
        let mut g = self.inner.lock().unwrap();
        let now = Instant::now();
        self.evict(&mut g, now);
        let len = g.entries.len() as u64;

        // When would the request-count limit let one more in?
        let mut req_wait = None;
        if let Some(rl) = self.req_limit {
            if len >= rl {
                let idx = (len - rl) as usize;
                req_wait = Some(self.leaves_in(g.entries[idx].0, now));
            }
        }
        // When would enough tokens have left the window?
        let mut tok_wait = None;
        if let Some(tl) = self.tok_limit {
            if g.tokens + tokens > tl {
                let mut freed = 0;
                let mut wait = self.window; // request larger than the window's budget
                for &(t, n) in &g.entries {
                    freed += n;
                    if g.tokens - freed + tokens <= tl {
                        wait = self.leaves_in(t, now);
                        break;
                    }
                }
                tok_wait = Some(wait);
            }
        }

        if req_wait.is_some() || tok_wait.is_some() {
            let retry_after = req_wait
                .unwrap_or_default()
                .max(tok_wait.unwrap_or_default());
            let (kind, used, requested) = if req_wait.is_some() {
                (LimitKind::Requests, len, 1)
            } else {
                (LimitKind::Tokens, g.tokens, tokens)
            };
            let used_per_min = ((used as f64) * 60.0 / self.window_s).round() as u64;
            return Decision::Limited {
                kind,
                used_per_min,
                requested,
                retry_after,
                snapshot: self.snapshot(&g, now),
            };
        }

        g.entries.push_back((now, tokens));
        g.tokens += tokens;
        Decision::Admitted(self.snapshot(&g, now))
    }

    /// Current state without admitting anything (for fault responses).
    pub fn peek(&self) -> Snapshot {
        let mut g = self.inner.lock().unwrap();
        let now = Instant::now();
        self.evict(&mut g, now);
        self.snapshot(&g, now)
    }

    fn evict(&self, g: &mut Inner, now: Instant) {
        while let Some(&(t, n)) = g.entries.front() {
            if t + self.window <= now {
                g.entries.pop_front();
                g.tokens -= n;
            } else {
                break;
            }
        }
    }

    fn leaves_in(&self, t: Instant, now: Instant) -> Duration {
        (t + self.window).saturating_duration_since(now)
    }

    fn snapshot(&self, g: &Inner, now: Instant) -> Snapshot {
        let reset = g
            .entries
            .front()
            .map(|&(t, _)| self.leaves_in(t, now))
            .unwrap_or_default();
        Snapshot {
            remaining_requests: self
                .req_limit
                .unwrap_or(0)
                .saturating_sub(g.entries.len() as u64),
            reset_requests: reset,
            remaining_tokens: self.tok_limit.unwrap_or(0).saturating_sub(g.tokens),
            reset_tokens: reset,
        }
    }

    /// Anthropic's `anthropic-ratelimit-*` headers for the limits that are configured: the
    /// token limit as both `tokens-*` and `input-tokens-*`, resets as RFC 3339 times.
    pub fn anthropic_headers(&self, s: &Snapshot) -> Vec<(String, String)> {
        let at = |d: Duration| {
            (time::OffsetDateTime::now_utc() + d)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        let mut h = Vec::with_capacity(9);
        let mut push = |kind: &str, limit: u64, remaining: u64, reset: Duration| {
            let name = |what: &str| format!("anthropic-ratelimit-{kind}-{what}");
            h.push((name("limit"), limit.to_string()));
            h.push((name("remaining"), remaining.to_string()));
            h.push((name("reset"), at(reset)));
        };
        if let Some(rpm) = self.rpm {
            push("requests", rpm, s.remaining_requests, s.reset_requests);
        }
        if let Some(tpm) = self.tpm {
            push("tokens", tpm, s.remaining_tokens, s.reset_tokens);
            push("input-tokens", tpm, s.remaining_tokens, s.reset_tokens);
        }
        h
    }

    /// `x-ratelimit-*` headers for the limits that are configured.
    pub fn headers(&self, s: &Snapshot) -> Vec<(&'static str, String)> {
        let mut h = Vec::with_capacity(6);
        if let Some(rpm) = self.rpm {
            h.push(("x-ratelimit-limit-requests", rpm.to_string()));
            h.push((
                "x-ratelimit-remaining-requests",
                s.remaining_requests.to_string(),
            ));
            h.push(("x-ratelimit-reset-requests", fmt_duration(s.reset_requests)));
        }
        if let Some(tpm) = self.tpm {
            h.push(("x-ratelimit-limit-tokens", tpm.to_string()));
            h.push((
                "x-ratelimit-remaining-tokens",
                s.remaining_tokens.to_string(),
            ));
            h.push(("x-ratelimit-reset-tokens", fmt_duration(s.reset_tokens)));
        }
        h
    }
}

/// OpenAI-style short duration: "250ms" under a second, else "1.2s".
pub(crate) fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = format!("{:.3}", d.as_secs_f64());
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations() {
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_millis(1200)), "1.2s");
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_duration(Duration::ZERO), "0ms");
    }

    #[test]
    fn request_limit_per_window() {
        // 60 rpm over a 2 s window = 2 requests per window.
        let l = Limiter::new(Some(60), None, 2.0).unwrap();
        assert!(matches!(l.check(10), Decision::Admitted(_)));
        assert!(matches!(l.check(10), Decision::Admitted(_)));
        match l.check(10) {
            Decision::Limited {
                kind, retry_after, ..
            } => {
                assert_eq!(kind, LimitKind::Requests);
                assert!(retry_after <= Duration::from_secs(2));
                assert!(retry_after > Duration::from_millis(1500));
            }
            Decision::Admitted(_) => panic!("should be limited"),
        }
    }

    #[test]
    fn token_limit_per_window() {
        // 600 tpm over 1 s = 10 tokens per window.
        let l = Limiter::new(None, Some(600), 1.0).unwrap();
        assert!(matches!(l.check(6), Decision::Admitted(_)));
        assert!(matches!(
            l.check(6),
            Decision::Limited {
                kind: LimitKind::Tokens,
                ..
            }
        ));
        // The rejected request did not count: 4 tokens still fit.
        assert!(matches!(l.check(4), Decision::Admitted(_)));
    }
}
