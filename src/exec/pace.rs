//! Client-side pacing: requests per minute and tokens per minute, spread evenly (no bursts, so
//! a server's sliding window never sees more than its limit), learned from `x-ratelimit-*`
//! headers when the job sets no limit, and slowed down on 429s.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::provider::RateLimits;

/// Aim this far under a limit learned from headers: clocks and windows never line up exactly.
const LEARNED_MARGIN: f64 = 0.98;
/// Send times kept to estimate the rate: the last 10 s, but no more than this many (an
/// unpaced run sends tens of thousands a second; past 4096 a second the estimate is low).
const RECENT_MAX: usize = 4096;
/// Requests sent before any response when no limit is known: a probe, not a stampede.
const PROBE_REQUESTS: u64 = 8;

pub struct Pacer {
    state: Mutex<State>,
    first_response: Notify,
}

struct State {
    /// Limits from the job (hard caps that learning never raises).
    job_rpm: Option<f64>,
    job_tpm: Option<f64>,
    /// The limits in force now.
    rpm: Option<f64>,
    tpm: Option<f64>,
    next_request_at: Instant,
    next_tokens_at: Instant,
    paused_until: Instant,
    /// Until the first response arrives and no limit is known, only a few requests go out.
    probing: bool,
    /// We slowed down on a 429 with no header to tell the limit: creep back up on success.
    slowed: bool,
    sent: u64,
    /// Recent send times, to estimate the rate a 429 says was too fast.
    recent: std::collections::VecDeque<Instant>,
}

/// The request rate in force (what the tests read).
#[cfg(test)]
pub struct Pacing {
    pub rpm: Option<f64>,
}

impl Pacer {
    pub fn new(rpm: Option<u64>, tpm: Option<u64>) -> Pacer {
        let now = Instant::now();
        let job_rpm = rpm.map(|v| v as f64);
        let job_tpm = tpm.map(|v| v as f64);
        Pacer {
            state: Mutex::new(State {
                job_rpm,
                job_tpm,
                rpm: job_rpm,
                tpm: job_tpm,
                next_request_at: now,
                next_tokens_at: now,
                paused_until: now,
                probing: job_rpm.is_none() && job_tpm.is_none(),
                slowed: false,
                sent: 0,
                recent: Default::default(),
            }),
            first_response: Notify::new(),
        }
    }

    #[cfg(test)]
    pub fn pacing(&self) -> Pacing {
        Pacing {
            rpm: self.state.lock().unwrap().rpm,
        }
    }

    /// Whether a tokens-per-minute limit is in force, so `acquire` uses its token count.
    pub fn paces_tokens(&self) -> bool {
        self.state.lock().unwrap().tpm.is_some()
    }

    /// Waits until one request costing `tokens` (prompt + max output) may go out, and reserves
    /// its slot. Called by the one dispatcher, in row order.
    pub async fn acquire(&self, tokens: u64) {
        loop {
            let wait_probe = {
                let s = self.state.lock().unwrap();
                s.probing && s.sent >= PROBE_REQUESTS
            };
            if !wait_probe {
                break;
            }
            let notified = self.first_response.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.state.lock().unwrap().probing {
                break;
            }
            notified.await;
        }
        loop {
            let at = {
                let mut s = self.state.lock().unwrap();
                let now = Instant::now();
                let at = now
                    .max(s.next_request_at)
                    .max(s.next_tokens_at)
                    .max(s.paused_until);
                if at <= now {
                    let due = s.next_request_at.max(s.next_tokens_at).max(s.paused_until);
                    // Reserve from the slot this request was given, so the timer's own lateness
                    // (a millisecond or so per wake-up) does not add up into a slower rate; but
                    // from the moment it really goes out when it is later than that, so a late
                    // request never lets the next ones bunch up behind it.
                    if let Some(rpm) = s.rpm {
                        let gap = Duration::from_secs_f64(60.0 / rpm);
                        s.next_request_at = next_slot(due, now, gap);
                    }
                    if let Some(tpm) = s.tpm {
                        let gap = Duration::from_secs_f64(60.0 * tokens as f64 / tpm);
                        s.next_tokens_at = next_slot(due, now, gap);
                    }
                    s.sent += 1;
                    s.recent.push_back(now);
                    while s.recent.len() > RECENT_MAX
                        || (s.recent.len() > 1
                            && now.duration_since(s.recent[0]) > Duration::from_secs(10))
                    {
                        s.recent.pop_front();
                    }
                    return;
                }
                at
            };
            // Limits can change while we sleep (a 429, a header): look again when we wake.
            tokio::time::sleep_until(at).await;
        }
    }

    /// Learns from a response's rate-limit headers (any status).
    pub fn observe(&self, rl: Option<&RateLimits>) {
        let mut s = self.state.lock().unwrap();
        if let Some(rl) = rl {
            if let Some(limit) = rl.limit_requests.filter(|&l| l > 0) {
                let learned = limit as f64 * LEARNED_MARGIN;
                s.rpm = Some(cap(s.job_rpm, learned));
                s.slowed = false;
            }
            if let Some(limit) = rl.limit_tokens.filter(|&l| l > 0) {
                let learned = limit as f64 * LEARNED_MARGIN;
                s.tpm = Some(cap(s.job_tpm, learned));
            }
            // The window is spent: wait for it to reset rather than collect 429s.
            let now = Instant::now();
            if rl.remaining_requests == Some(0) {
                if let Some(reset) = rl.reset_requests {
                    s.paused_until = s.paused_until.max(now + reset);
                }
            }
            if rl.remaining_tokens == Some(0) {
                if let Some(reset) = rl.reset_tokens {
                    s.paused_until = s.paused_until.max(now + reset);
                }
            }
        }
        if s.probing {
            s.probing = false;
            drop(s);
            self.first_response.notify_waiters();
        }
    }

    /// A 429 rate limit: stop sending until `retry_after`, and slow down when no header told
    /// us the limit (multiplicative decrease from the rate we were really sending at).
    pub fn rate_limited(&self, retry_after: Option<Duration>, rl: Option<&RateLimits>) {
        let knows_limit =
            rl.is_some_and(|r| r.limit_requests.is_some() || r.limit_tokens.is_some());
        self.observe(rl);
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        s.paused_until = s
            .paused_until
            .max(now + retry_after.unwrap_or(Duration::from_secs(1)));
        if !knows_limit {
            let observed = if s.recent.len() >= 2 {
                let span = now.duration_since(s.recent[0]).as_secs_f64().max(1.0);
                Some(s.recent.len() as f64 * 60.0 / span)
            } else {
                None
            };
            let current = s.rpm.or(observed).unwrap_or(60.0);
            s.rpm = Some((current * 0.8).max(1.0));
            s.slowed = true;
        }
    }

    /// A success without rate-limit headers after a slowdown: creep back up (additive increase).
    pub fn succeeded(&self) {
        let mut s = self.state.lock().unwrap();
        if !s.slowed {
            return;
        }
        if let Some(r) = s.rpm {
            let raised = r + 1.0;
            s.rpm = Some(match s.job_rpm {
                Some(j) => raised.min(j),
                None => raised,
            });
        }
    }
}

/// Lateness forgiven when reserving the next slot: a quarter of the gap, at most this.
const MAX_SLACK: Duration = Duration::from_millis(5);

/// The next slot after one that was due at `due` and really went out at `now`.
fn next_slot(due: Instant, now: Instant, gap: Duration) -> Instant {
    let slack = (gap / 4).min(MAX_SLACK);
    let from = match now.checked_sub(slack) {
        Some(t) => due.max(t),
        None => now,
    };
    from + gap
}

fn cap(job: Option<f64>, v: f64) -> f64 {
    match job {
        Some(j) => j.min(v),
        None => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rpm_spaces_requests_evenly() {
        let p = Pacer::new(Some(600), None); // one every 100 ms
        let start = Instant::now();
        for _ in 0..11 {
            p.acquire(1).await;
        }
        let took = start.elapsed();
        assert_eq!(took, Duration::from_millis(1000), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn tpm_spaces_by_token_cost() {
        let p = Pacer::new(None, Some(60_000)); // 1000 tokens per second
        let start = Instant::now();
        p.acquire(500).await; // free
        p.acquire(2000).await; // waits 0.5 s for the first one's tokens
        p.acquire(1).await; // waits 2 s for the second one's
        assert_eq!(start.elapsed(), Duration::from_millis(2500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_for_retry_after_and_slows_down() {
        let p = Pacer::new(Some(6000), None);
        p.acquire(1).await;
        p.rate_limited(Some(Duration::from_secs(2)), None);
        let start = Instant::now();
        p.acquire(1).await;
        assert!(start.elapsed() >= Duration::from_secs(2));
        assert!(p.pacing().rpm.unwrap() < 6000.0);
    }

    #[tokio::test(start_paused = true)]
    async fn headers_teach_the_limit_when_the_job_sets_none() {
        let p = Pacer::new(None, None);
        p.observe(Some(&RateLimits {
            limit_requests: Some(3000),
            ..Default::default()
        }));
        assert_eq!(p.pacing().rpm, Some(3000.0 * LEARNED_MARGIN));
        // A job limit below the learned one stays in force.
        let q = Pacer::new(Some(100), None);
        q.observe(Some(&RateLimits {
            limit_requests: Some(3000),
            ..Default::default()
        }));
        assert_eq!(q.pacing().rpm, Some(100.0));
    }

    #[tokio::test(start_paused = true)]
    async fn probing_holds_requests_until_the_first_response() {
        let p = std::sync::Arc::new(Pacer::new(None, None));
        for _ in 0..PROBE_REQUESTS {
            p.acquire(1).await;
        }
        let q = p.clone();
        let waiter = tokio::spawn(async move { q.acquire(1).await });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !waiter.is_finished(),
            "the ninth request waits for a response"
        );
        p.observe(None);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
