//! What the user sees of a run: live progress (a bar on a terminal, periodic log lines when not),
//! and the end-of-run summary as a table on stderr and as JSON beside the output.

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::Error;
use crate::ledger::record::{Record, Status};

mod progress;
pub use progress::{spinner, Progress};

/// Counters the writer task keeps as records arrive.
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    pub skipped_ok: u64,
    pub skipped_failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    /// What the prompt cache saved against the same prompts at the input rate.
    pub cache_saved_usd: f64,
    pub reasoning_tokens: u64,
    pub cost_usd: f64,
    /// Rows whose model had no known price: their cost is unknown, not zero.
    pub unpriced_rows: u64,
    pub retries: u64,
    pub rate_limited: u64,
    /// Rows whose request another row made: copied, not sent.
    pub copied: u64,
    /// Failed rows a plain rerun sends again (connection, timeout, 5xx, 429 after retries).
    pub failed_transient: u64,
    /// Rows whose usage the server did not send (counted with the tokenizer).
    pub estimated_usage: u64,
    /// Rows read this run that ended with no record (stopped, interrupted): set at the end.
    pub pending: u64,
    /// Records of rows no longer in the input, moved to the stale file: set at the end.
    pub stale_moved: u64,
    /// Worst case of attempts that may have been billed for rows that ended pending.
    pub pending_unconfirmed_usd: f64,
    /// Rows held by batches still running.
    pub batch_in_flight: u64,
    /// Rows put into batch files this run, and what was submitted of them.
    pub batch_rows: u64,
    pub batch_requests_submitted: u64,
    pub batches_submitted: u64,
    /// Batches still running on the server when this run began.
    pub batches_running: u64,
    latency: Histogram<u64>,
    /// Streamed rows' time to first token.
    ttft: Histogram<u64>,
    started: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            ok: 0,
            failed: 0,
            skipped_ok: 0,
            skipped_failed: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            cache_write_tokens: 0,
            cache_saved_usd: 0.0,
            reasoning_tokens: 0,
            cost_usd: 0.0,
            unpriced_rows: 0,
            retries: 0,
            rate_limited: 0,
            copied: 0,
            failed_transient: 0,
            estimated_usage: 0,
            pending: 0,
            stale_moved: 0,
            pending_unconfirmed_usd: 0.0,
            batch_in_flight: 0,
            batch_rows: 0,
            batch_requests_submitted: 0,
            batches_submitted: 0,
            batches_running: 0,
            latency: Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid histogram bounds"),
            ttft: Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid histogram bounds"),
            started: Instant::now(),
        }
    }
}

impl Stats {
    pub fn add(&mut self, r: &Record, retries: u32, rate_limited: u32, billed: bool) {
        self.retries += retries as u64;
        self.rate_limited += rate_limited as u64;
        self.count(&Counted {
            status: r.status,
            error: r.error.as_ref().map(|e| e.kind),
            usage: r.usage,
            cost_usd: r.cost_usd,
            cache_saved_usd: r.cache_saved_usd,
            sent: r.fingerprint.is_some(),
            latency_ms: r.latency_ms,
            ttft_ms: r.ttft_ms,
            billed,
        });
    }

    /// `add` from a journal line as the one parser reads it: what `merge` counts, its retries
    /// the attempts after the first.
    pub fn add_line(&mut self, l: &crate::ledger::journal::Line) {
        self.retries += u64::from(l.attempts.unwrap_or(0).saturating_sub(1));
        self.count(&Counted {
            status: l.status,
            error: l.error.as_ref().map(|e| e.kind),
            usage: l.usage.as_ref().map(|u| u.usage()),
            cost_usd: l.cost_usd,
            cache_saved_usd: l.cache_saved_usd,
            sent: l.fingerprint.is_some(),
            latency_ms: l.latency_ms.unwrap_or(0),
            ttft_ms: l.ttft_ms,
            billed: true,
        });
    }

    fn count(&mut self, r: &Counted) {
        match r.status {
            Status::Ok => self.ok += 1,
            Status::Error => {
                self.failed += 1;
                if r.error.is_some_and(|k| {
                    crate::ledger::error_outcome(k) == crate::ledger::Outcome::FailedTransient
                }) {
                    self.failed_transient += 1;
                }
            }
        }
        if let Some(u) = &r.usage {
            if u.estimated {
                self.estimated_usage += 1;
            }
            self.prompt_tokens += u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
            self.cached_tokens += u.cached_tokens.unwrap_or(0);
            self.cache_write_tokens += u.cache_write_tokens.unwrap_or(0);
            self.cache_saved_usd += r.cache_saved_usd.unwrap_or(0.0);
            self.reasoning_tokens += u.reasoning_tokens.unwrap_or(0);
            match r.cost_usd {
                Some(c) => self.cost_usd += c,
                None if r.billed => self.unpriced_rows += 1,
                None => {}
            }
        }
        if r.sent {
            let _ = self.latency.record(r.latency_ms.max(1));
        }
        if let Some(t) = r.ttft_ms {
            let _ = self.ttft.record(t.max(1));
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn summary(&self, stopped: Option<String>) -> Summary {
        let wall = self.elapsed().as_secs_f64();
        let done = self.ok + self.failed;
        let has_latency = !self.latency.is_empty();
        Summary {
            rows_ok: self.ok,
            rows_failed: self.failed,
            rows_skipped: self.skipped_ok + self.skipped_failed,
            rows_skipped_failed: self.skipped_failed,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
            cache_write_tokens: self.cache_write_tokens,
            cache_saved_usd: (self.cached_tokens + self.cache_write_tokens > 0)
                .then_some(self.cache_saved_usd),
            reasoning_tokens: self.reasoning_tokens,
            cost_usd: if self.unpriced_rows > 0 && self.cost_usd == 0.0 {
                None
            } else {
                Some(self.cost_usd)
            },
            unpriced_rows: self.unpriced_rows,
            wall_time_s: wall,
            rows_per_s: if wall > 0.0 { done as f64 / wall } else { 0.0 },
            latency_p50_ms: has_latency.then(|| self.latency.value_at_quantile(0.5)),
            latency_p95_ms: has_latency.then(|| self.latency.value_at_quantile(0.95)),
            ttft_p50_ms: (!self.ttft.is_empty()).then(|| self.ttft.value_at_quantile(0.5)),
            ttft_p95_ms: (!self.ttft.is_empty()).then(|| self.ttft.value_at_quantile(0.95)),
            retries: self.retries,
            rate_limited: self.rate_limited,
            rows_copied: self.copied,
            rows_failed_transient: self.failed_transient,
            rows_pending: self.pending,
            rows_stale: self.stale_moved,
            estimated_usage_rows: self.estimated_usage,
            spent_usd: None,
            budget_usd: None,
            unconfirmed_usd: 0.0,
            batch: (self.batch_rows + self.batch_in_flight + self.batches_running > 0).then_some(
                BatchSummary {
                    requests_submitted: self.batch_requests_submitted,
                    batches_submitted: self.batches_submitted,
                    requests_in_flight: self.batch_in_flight,
                    batches_running: self.batches_running,
                },
            ),
            stopped,
        }
    }
}

/// What `Stats` counts of a record, from a `Record` or a journal line.
struct Counted {
    status: Status,
    error: Option<crate::provider::ErrorKind>,
    usage: Option<crate::chat::Usage>,
    cost_usd: Option<f64>,
    cache_saved_usd: Option<f64>,
    /// It has a fingerprint: a request was made, so its latency counts.
    sent: bool,
    latency_ms: u64,
    ttft_ms: Option<u64>,
    /// A missing cost on a record with usage is an unknown price, not zero.
    billed: bool,
}

fn count_lines(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut n, mut last) = (0u64, b'\n');
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|&&c| c == b'\n').count() as u64;
        last = buf[k - 1];
    }
    Ok(if last == b'\n' { n } else { n + 1 })
}

#[derive(Debug, Serialize, serde::Deserialize, Clone)]
pub struct Summary {
    pub rows_ok: u64,
    pub rows_failed: u64,
    /// Rows already done by an earlier run (ok or failed) and not sent again.
    pub rows_skipped: u64,
    /// Of those, rows whose earlier result was a failure (`--retry-failed` sends them again).
    pub rows_skipped_failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens read from the provider's prompt cache, and written to it (Anthropic).
    pub cached_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
    /// What the prompt cache saved, in USD, against the same prompts at the input rate;
    /// absent when nothing was cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_saved_usd: Option<f64>,
    pub reasoning_tokens: u64,
    /// `null` when no row's model had a known price.
    pub cost_usd: Option<f64>,
    pub unpriced_rows: u64,
    pub wall_time_s: f64,
    pub rows_per_s: f64,
    pub latency_p50_ms: Option<u64>,
    pub latency_p95_ms: Option<u64>,
    /// Streamed rows: time to first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p50_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p95_ms: Option<u64>,
    pub retries: u64,
    pub rate_limited: u64,
    /// Rows not sent because another row made the same request; their records are copies.
    #[serde(default)]
    pub rows_copied: u64,
    /// Of `rows_failed`, those a plain rerun sends again (connection, timeout, 5xx, 429 after
    /// every retry); the rest are the API's verdicts, sent again only with `--retry-failed`.
    #[serde(default)]
    pub rows_failed_transient: u64,
    /// Rows read this run that have no record yet (the run stopped before them).
    #[serde(default)]
    pub rows_pending: u64,
    /// Records of rows no longer in the input, moved to `OUTPUT.stale.jsonl` this run.
    #[serde(default)]
    pub rows_stale: u64,
    /// Rows whose server sent no usage: their tokens were counted with the tokenizer.
    #[serde(default)]
    pub estimated_usage_rows: u64,
    /// Everything this output has spent across all runs, this one included, USD.
    #[serde(default)]
    pub spent_usd: Option<f64>,
    /// `max_cost_usd`, if the job has one.
    #[serde(default)]
    pub budget_usd: Option<f64>,
    /// Of this run's spend: attempts the server may have billed without a usable completion,
    /// at their worst case.
    #[serde(default)]
    pub unconfirmed_usd: f64,
    /// Batch mode: what this run submitted and what is still running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSummary>,
    /// Why the job stopped early, if it did.
    pub stopped: Option<String>,
}

#[derive(Debug, Serialize, serde::Deserialize, Clone, Copy, Default)]
pub struct BatchSummary {
    pub requests_submitted: u64,
    pub batches_submitted: u64,
    /// Rows held by batches that were running when this run began (not submitted again).
    pub requests_in_flight: u64,
    pub batches_running: u64,
}

impl BatchSummary {
    fn rows(&self) -> Vec<(&'static str, String)> {
        let mut rows = Vec::new();
        if self.batches_submitted > 0 {
            rows.push((
                "submitted",
                format!(
                    "{} requests in {} batch(es)",
                    self.requests_submitted, self.batches_submitted
                ),
            ));
        }
        if self.requests_in_flight > 0 || self.batches_running > 0 {
            rows.push((
                "in flight",
                format!(
                    "{} requests in {} batch(es) still running",
                    self.requests_in_flight, self.batches_running
                ),
            ));
        }
        rows
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Summary {
    /// The prompt cache's part: the share of input tokens read from it, what was written, and
    /// what it saved. `None` when nothing was cached.
    pub fn cache_line(&self) -> Option<String> {
        let saved = self.cache_saved_usd?;
        let share = 100.0 * self.cached_tokens as f64 / self.prompt_tokens.max(1) as f64;
        Some(format!(
            "{} read ({share:.1}% of input), {} written, saved ${saved:.4}",
            self.cached_tokens, self.cache_write_tokens
        ))
    }

    /// The summary as the end of a run prints it: one aligned line per figure.
    pub fn table(&self) -> String {
        let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
        let mut rows = self.main_rows();
        for (i, e) in self.extra_rows().into_iter().enumerate() {
            rows.insert(3 + i, e);
        }
        if self.cached_tokens > 0 || self.reasoning_tokens > 0 {
            rows.insert(
                5,
                (
                    "cached / reasoning tokens",
                    format!("{} / {}", self.cached_tokens, self.reasoning_tokens),
                ),
            );
        }
        if let Some(line) = self.cache_line() {
            rows.insert(5, ("prompt cache", line));
        }
        if self.ttft_p50_ms.is_some() {
            rows.push((
                "first token p50 / p95",
                format!("{} / {}", ms(self.ttft_p50_ms), ms(self.ttft_p95_ms)),
            ));
        }
        if let Some(s) = &self.stopped {
            rows.push(("stopped", s.clone()));
        }
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("  {k:<w$}  {v}\n"))
            .collect()
    }

    /// The figures every summary shows.
    fn main_rows(&self) -> Vec<(&'static str, String)> {
        let cost = match self.cost_usd {
            Some(c) if self.unpriced_rows > 0 => {
                format!("${c:.6} (+{} rows of unknown price)", self.unpriced_rows)
            }
            Some(c) => format!("${c:.6}"),
            None => "unknown (no price for this model; set [pricing])".into(),
        };
        let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
        let failed = if self.rows_failed > 0 {
            format!(
                "{} ({} transient: sent again by a plain rerun; {} API verdicts: --retry-failed)",
                self.rows_failed,
                self.rows_failed_transient,
                self.rows_failed - self.rows_failed_transient
            )
        } else {
            "0".into()
        };
        let skipped = if self.rows_skipped_failed > 0 {
            format!(
                "{} ({} of them failed earlier)",
                self.rows_skipped, self.rows_skipped_failed
            )
        } else {
            self.rows_skipped.to_string()
        };
        vec![
            ("rows ok", self.rows_ok.to_string()),
            ("rows failed", failed),
            ("rows skipped (done before)", skipped),
            ("prompt tokens", self.prompt_tokens.to_string()),
            ("completion tokens", self.completion_tokens.to_string()),
            ("cost", cost),
            ("wall time", format!("{:.2} s", self.wall_time_s)),
            ("rows/s", format!("{:.2}", self.rows_per_s)),
            (
                "latency p50 / p95",
                format!("{} / {}", ms(self.latency_p50_ms), ms(self.latency_p95_ms)),
            ),
            ("retries", self.retries.to_string()),
            ("429s", self.rate_limited.to_string()),
        ]
    }

    /// The figures shown only when they are not zero, in the order they are printed.
    fn extra_rows(&self) -> Vec<(&'static str, String)> {
        let mut extra = Vec::new();
        if self.rows_copied > 0 {
            extra.push(("rows copied (same request)", self.rows_copied.to_string()));
        }
        if self.rows_pending > 0 {
            extra.push(("rows pending", self.rows_pending.to_string()));
        }
        if self.rows_stale > 0 {
            extra.push((
                "rows left the input",
                format!("{} (records moved to the stale file)", self.rows_stale),
            ));
        }
        if let Some(b) = &self.batch {
            extra.extend(b.rows());
        }
        if self.estimated_usage_rows > 0 {
            extra.push((
                "usage estimated",
                format!(
                    "{} rows (the server sent no usage)",
                    self.estimated_usage_rows
                ),
            ));
        }
        match (self.spent_usd, self.budget_usd) {
            (Some(s), Some(b)) => extra.push(("spent / budget", format!("${s:.6} / ${b:.6}"))),
            (Some(s), None) if s > 0.0 && self.cost_usd != Some(s) => {
                extra.push(("spent in this output", format!("${s:.6}")))
            }
            _ => {}
        }
        if self.unconfirmed_usd > 0.0 {
            extra.push((
                "unconfirmed spend",
                format!(
                    "${:.6} (attempts that may have been billed without an answer, at worst case)",
                    self.unconfirmed_usd
                ),
            ));
        }
        extra
    }

    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(self).expect("summary serializes");
        crate::ledger::files::replace_bytes(path, (text + "\n").as_bytes())
    }
}
