//! `[run]` and `[batch]`: concurrency, rate limits, retries, timeouts and other durations
//! with their bounds, the budget, the mode, and how Batch API input files are split.

use std::time::Duration;

use super::model::ProviderKind;
use super::raw::{RawBatch, RawRun};
use super::{JobFile, Overrides};
use crate::chat::{Mode, Params, ServiceTier};
use crate::error::Error;

/// The longest `timeout_s` and `outage_s` a job may set: a day. Longer is a typo, and a
/// duration past what the clock can hold would panic.
pub const MAX_TIMEOUT_S: f64 = 86_400.0;

/// The longest `shutdown_grace_s` and `batch.poll_s`: an hour.
pub const MAX_GRACE_S: f64 = 3_600.0;

/// OpenAI's Batch API limits per input file.
pub const BATCH_MAX_REQUESTS: usize = 50_000;
pub const BATCH_MAX_BYTES: u64 = 200_000_000;

/// Validated `[batch]`.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub max_requests_per_file: usize,
    pub max_bytes_per_file: u64,
    pub poll: Duration,
}

/// Validated `[run]` (but its mode): `Job`'s fields of the same names.
#[derive(Debug, Clone)]
pub struct Limits {
    pub concurrency: usize,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_retries: u32,
    pub timeout: Duration,
    pub max_cost_usd: Option<f64>,
    pub shutdown_grace: Duration,
    pub outage: Duration,
}

/// `[run]`'s limits, the command line's overrides first. `params` decide the default timeout
/// (flex) and whether a budget has a bound.
pub(super) fn limits(
    jf: &JobFile,
    run: &RawRun,
    ov: &Overrides,
    params: &Params,
) -> Result<Limits, Error> {
    let concurrency = ov.concurrency.or(run.concurrency).unwrap_or(8);
    if concurrency == 0 {
        return Err(jf.bad("run.concurrency", "must be at least 1".into()));
    }
    let rpm = ov.rpm.or(run.rpm).filter(|&v| v > 0);
    let tpm = ov.tpm.or(run.tpm).filter(|&v| v > 0);
    // Flex requests queue for capacity: OpenAI's advice is a 15-minute timeout.
    let flex = params.service_tier == Some(ServiceTier::Flex);
    let timeout_s = run.timeout_s.unwrap_or(if flex { 900.0 } else { 120.0 });
    if !(timeout_s > 0.0 && timeout_s <= MAX_TIMEOUT_S) {
        return Err(jf.bad(
            "run.timeout_s",
            format!("must be a positive number of seconds, at most {MAX_TIMEOUT_S} (a day)"),
        ));
    }
    let max_cost_usd = budget(jf, ov.max_cost_usd.or(run.max_cost_usd), params)?;
    let shutdown_grace = seconds(
        jf,
        "run.shutdown_grace_s",
        run.shutdown_grace_s,
        25.0,
        MAX_GRACE_S,
    )?;
    let outage = seconds(jf, "run.outage_s", run.outage_s, 60.0, MAX_TIMEOUT_S)?;
    Ok(Limits {
        concurrency,
        rpm,
        tpm,
        max_retries: run.max_retries.unwrap_or(6),
        timeout: Duration::from_secs_f64(timeout_s),
        max_cost_usd,
        shutdown_grace,
        outage,
    })
}

/// `max_cost_usd`: a non-negative number, and only with a completion cap to bound it.
fn budget(jf: &JobFile, max_cost_usd: Option<f64>, params: &Params) -> Result<Option<f64>, Error> {
    if let Some(c) = max_cost_usd {
        if !(c >= 0.0 && c.is_finite()) {
            return Err(jf.bad("run.max_cost_usd", "must be a non-negative number".into()));
        }
    }
    if max_cost_usd.is_some() && params.max_output_tokens().is_none() {
        return Err(jf.bad(
            "run.max_cost_usd",
            "a budget needs a completion cap: set [model] max_tokens (or \
             max_completion_tokens), since without one a request's cost has no upper bound \
             (reasoning models can write tens of thousands of tokens)"
                .into(),
        ));
    }
    Ok(max_cost_usd)
}

/// Online or batch; the local model runs online only.
pub(super) fn mode(
    jf: &JobFile,
    run: &RawRun,
    ov: &Overrides,
    provider: ProviderKind,
) -> Result<Mode, Error> {
    let mode = ov.mode.or(run.mode).unwrap_or_default();
    if mode == Mode::Batch && provider == ProviderKind::Local {
        return Err(jf.bad(
            "run.mode",
            "batch mode sends files to an HTTP provider's Batch API; the local model runs online"
                .into(),
        ));
    }
    Ok(mode)
}

/// `[batch]`, the vendor's limits by default: OpenAI's 50,000 requests and 200 MB a file,
/// Anthropic's 100,000 requests and 256 MB a batch (its create body, which is the file).
pub(super) fn batch_limits(
    jf: &JobFile,
    rb: &RawBatch,
    provider: ProviderKind,
) -> Result<BatchLimits, Error> {
    let (requests, bytes) = match provider {
        ProviderKind::Anthropic => (100_000, 256_000_000),
        _ => (BATCH_MAX_REQUESTS, BATCH_MAX_BYTES),
    };
    let batch = BatchLimits {
        max_requests_per_file: rb.max_requests_per_file.unwrap_or(requests),
        max_bytes_per_file: rb.max_bytes_per_file.unwrap_or(bytes),
        poll: seconds(jf, "batch.poll_s", rb.poll_s, 30.0, MAX_GRACE_S)?,
    };
    if batch.max_requests_per_file == 0 {
        return Err(jf.bad("batch.max_requests_per_file", "must be at least 1".into()));
    }
    if batch.max_bytes_per_file < 1024 {
        return Err(jf.bad("batch.max_bytes_per_file", "must be at least 1024".into()));
    }
    Ok(batch)
}

/// A duration in seconds, `default` when unset, from 0 to `max`.
fn seconds(
    jf: &JobFile,
    field: &str,
    v: Option<f64>,
    default: f64,
    max: f64,
) -> Result<Duration, Error> {
    let v = v.unwrap_or(default);
    if !(v >= 0.0 && v <= max) {
        return Err(jf.bad(
            field,
            format!("must be a non-negative number of seconds, at most {max}"),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

#[cfg(test)]
mod tests {
    use super::super::tests::job;
    use super::*;

    #[test]
    fn a_claude_batch_part_defaults_to_anthropics_limits_and_openais_to_its_own() {
        let claude = "provider = \"anthropic\"\nname = \"claude-sonnet-4-5\"\nmax_tokens = 9";
        let b = job(claude, "").unwrap().batch;
        assert_eq!(
            (b.max_requests_per_file, b.max_bytes_per_file),
            (100_000, 256_000_000)
        );
        let b = job("name = \"gpt-4o\"", "").unwrap().batch;
        assert_eq!(
            (b.max_requests_per_file, b.max_bytes_per_file),
            (BATCH_MAX_REQUESTS, BATCH_MAX_BYTES)
        );
    }

    #[test]
    fn flex_waits_fifteen_minutes_unless_the_job_says_otherwise() {
        let flex = "name = \"gpt-5-mini\"\nservice_tier = \"flex\"";
        let j = job(flex, "").unwrap();
        assert_eq!(j.limits.timeout, Duration::from_secs(900));
        assert_eq!(j.params.service_tier, Some(ServiceTier::Flex));
        assert_eq!(
            job(flex, "timeout_s = 60").unwrap().limits.timeout,
            Duration::from_secs(60)
        );
        assert_eq!(
            job("name = \"gpt-5-mini\"", "").unwrap().limits.timeout,
            Duration::from_secs(120)
        );
    }
}
