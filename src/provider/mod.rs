//! One request → one completion or one classified failure. Providers: OpenAI-compatible HTTP
//! (`openai`) and the embedded llama.cpp model (`local`, behind the `local` feature).

pub mod endpoint;
pub mod grammar;
#[cfg(feature = "local")]
pub mod local;
pub mod openai;

use std::time::Duration;

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use crate::chat::Message;
use crate::cost::{Price, Tier};
use crate::error::Error;
use crate::job::{Job, Mode, Pricing, ProviderKind, ServiceTier};
pub use endpoint::Endpoint;
use openai::OpenAi;

pub use crate::request::Request;

/// Token usage as the provider reports it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Prompt tokens served from the provider's prompt cache (billed at the cached rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Reasoning tokens; already part of `completion_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    /// True when the server sent no usage and these counts come from the tokenizer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

/// What the provider's rate-limit headers said (OpenAI's `x-ratelimit-*`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimits {
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
pub struct Completion {
    /// The first choice's text (a refusal's text when it refused).
    pub text: String,
    pub finish_reason: Option<String>,
    /// Every choice when the request asked for several (`n`), the first included; empty when
    /// there is only `text`.
    pub choices: Vec<Choice>,
    /// The first choice's refusal (`message.refusal`), if the model refused.
    pub refusal: Option<String>,
    /// Streamed: milliseconds from sending the request to the first token.
    pub ttft_ms: Option<u64>,
    /// The model name as the provider returned it (a dated snapshot, often).
    pub model: Option<String>,
    /// `None` when the server sent no usage (the scheduler then counts with the tokenizer).
    pub usage: Option<Usage>,
    pub rate_limits: Option<RateLimits>,
}

/// One choice of a completion.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Choice {
    pub text: String,
    pub finish_reason: Option<String>,
    pub refusal: Option<String>,
}

impl Completion {
    /// Every choice, the first one included.
    pub fn all_choices(&self) -> Vec<Choice> {
        if self.choices.is_empty() {
            vec![Choice {
                text: self.text.clone(),
                finish_reason: self.finish_reason.clone(),
                refusal: self.refusal.clone(),
            }]
        } else {
            self.choices.clone()
        }
    }
}

/// How a failure is handled: this is the one place the classes are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 429 rate limit: retried, and the pacer slows down.
    RateLimited,
    /// 408, 409, 5xx: retried.
    Server,
    Timeout,
    Connection,
    /// A 200 whose body is not a valid completion: retried.
    InvalidResponse,
    /// 400, 404, 422 and other 4xx: the row fails at once.
    BadRequest,
    /// 401/403: the job stops.
    Auth,
    /// 429 insufficient_quota: the job stops.
    Quota,
    /// The endpoint is wrong for every row, as the job file sets it up: a 404 for the URL
    /// itself (Azure's "Resource not found" for a missing or unknown api-version, an unknown
    /// deployment, OpenAI's "Invalid URL") or a server certificate that is not trusted. The job
    /// stops; rows stay pending for the run after the fix.
    Endpoint,
    /// The row could not be rendered or read (template, input record).
    Input,
    /// The local model failed on this row.
    Model,
    /// A Batch API result line that came back as an error: final until `--retry-failed`.
    BatchLine,
    /// The completion broke the job's schema or checks on every attempt (`max_invalid`).
    InvalidOutput,
    /// The model refused (`message.refusal`).
    Refusal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Retry,
    FailRow,
    StopJob,
}

impl ErrorKind {
    /// The API's verdict on the request itself: sending it again gives the same answer, so a
    /// rerun leaves it unless `--retry-failed`. Every other recorded failure is transient.
    pub fn is_final_verdict(self) -> bool {
        matches!(
            self,
            ErrorKind::BadRequest
                | ErrorKind::Model
                | ErrorKind::BatchLine
                | ErrorKind::InvalidOutput
                | ErrorKind::Refusal
        )
    }

    pub fn disposition(self) -> Disposition {
        match self {
            ErrorKind::RateLimited
            | ErrorKind::Server
            | ErrorKind::Timeout
            | ErrorKind::Connection
            | ErrorKind::InvalidResponse => Disposition::Retry,
            ErrorKind::BadRequest
            | ErrorKind::Input
            | ErrorKind::Model
            | ErrorKind::BatchLine
            | ErrorKind::InvalidOutput
            | ErrorKind::Refusal => Disposition::FailRow,
            ErrorKind::Auth | ErrorKind::Quota | ErrorKind::Endpoint => Disposition::StopJob,
        }
    }
}

/// A failed attempt, with the API's status and message kept as they came.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
pub struct ProviderError {
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub message: String,
    /// From `retry-after-ms` / `retry-after`.
    pub retry_after: Option<Duration>,
    pub rate_limits: Option<RateLimits>,
    /// The endpoint could not be reached at all (DNS, connection refused, TLS): nothing was
    /// sent, and the circuit breaker counts it as an outage.
    pub unreachable: bool,
    /// The request reached the server and may have been billed, though no usable completion
    /// came back (a timeout after sending, a cut stream, an unusable 200).
    pub maybe_billed: bool,
}

impl ProviderError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            kind,
            status: None,
            message: message.into(),
            retry_after: None,
            rate_limits: None,
            unreachable: false,
            maybe_billed: false,
        }
    }
}

/// Counts a chat request's prompt tokens with the model's own tokenizer.
pub trait TokenCounter: Send + Sync {
    fn count_prompt(&self, messages: &[Message]) -> u64;
    /// A completion's tokens, for servers that send no usage.
    fn count_text(&self, text: &str) -> u64;
}

/// A backend that turns one request into one completion. Retries, pacing and journaling are
/// the scheduler's; a provider makes exactly one attempt per call.
pub trait Provider: Send + Sync {
    fn complete<'a>(&'a self, req: &'a Request)
        -> BoxFuture<'a, Result<Completion, ProviderError>>;
    /// Whether requests cost money (HTTP) or not (local model): decides cost reporting.
    fn is_billed(&self) -> bool {
        true
    }
}

/// The provider for a run, the tokenizer whose counts match it, and who it is.
pub struct Backend {
    pub provider: Arc<dyn Provider>,
    pub counter: Arc<dyn TokenCounter>,
    /// The job's `[pricing]`, or `None` to look the returned model up in the built-in table.
    pub pricing: Option<Pricing>,
    /// Which of the model's prices applies: batch mode and the flex tier bill batch rates.
    pub tier: Tier,
    /// Who answers, as the fingerprint knows it (`request::provider_identity`).
    pub identity: String,
}

impl Backend {
    /// The price of a completion from `model` (as returned), falling back to the job's model.
    pub fn price_for(&self, returned: Option<&str>, job_model: &str) -> Option<Price> {
        self.price_at(self.tier, returned, job_model)
    }

    /// The price at a given tier: results collected from the Batch API are billed at batch
    /// rates, whatever mode the run that collects them is in.
    pub fn price_at(&self, tier: Tier, returned: Option<&str>, job_model: &str) -> Option<Price> {
        if !self.provider.is_billed() {
            return Some(Price {
                input: 0.0,
                cached_input: 0.0,
                output: 0.0,
            });
        }
        if let Some(p) = &self.pricing {
            return Some(p.at(tier));
        }
        returned
            .and_then(|m| crate::cost::lookup_tier(m, tier))
            .or_else(|| crate::cost::lookup_tier(job_model, tier))
    }
}

/// The local model file: the job's `path`, else the fetched default.
pub fn local_model_path(job: &Job) -> Result<PathBuf, Error> {
    job.model_path
        .clone()
        .or_else(crate::models::default_model_path)
        .ok_or_else(|| Error::Model {
            path: "(no path)".into(),
            message: "no model path and no cache folder (set HOME or PROMPTMILL_MODEL_DIR)".into(),
        })
}

/// The provider for the job, and the tokenizer whose counts match it. Checks the key (HTTP)
/// or loads the model (local) before anything is sent.
pub fn build(job: &Job, need_provider: bool) -> Result<Backend, Error> {
    let pricing = job.pricing;
    let tier = tier(job);
    match job.provider {
        // Azure OpenAI too: `Endpoint` knows its URL layout and key header.
        ProviderKind::Openai => {
            let counter = Arc::new(crate::tokens::Tiktoken::new(&job.model));
            let provider: Arc<dyn Provider> = if need_provider {
                let endpoint = Endpoint::from_job(job)?;
                let stream = job.params.stream.unwrap_or(false);
                Arc::new(
                    OpenAi::new(&endpoint, job.timeout, job.concurrency, stream)
                        .map_err(Error::Other)?,
                )
            } else {
                Arc::new(NoProvider)
            };
            Ok(Backend {
                provider,
                counter,
                pricing,
                tier,
                identity: crate::request::provider_identity(job, None),
            })
        }
        ProviderKind::Local => local_backend(job, pricing, tier),
    }
}

#[cfg(feature = "local")]
fn local_backend(job: &Job, pricing: Option<Pricing>, tier: Tier) -> Result<Backend, Error> {
    let path = local_model_path(job)?;
    let name = if job.model.is_empty() {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        job.model.clone()
    };
    // The file's checksum is part of every row's fingerprint: another file is another model.
    crate::models::check_model_file(&path)?;
    let sha = crate::models::sha256_file(&path)?;
    let model = local::LocalModel::load(
        &path,
        &name,
        &job.params,
        job.concurrency,
        local::EngineSettings {
            context_tokens: job.context_tokens,
            cache_prompt: job.cache_prompt,
        },
    )?;
    Ok(Backend {
        provider: model.clone(),
        counter: model,
        pricing,
        tier,
        identity: crate::request::provider_identity(job, Some(&sha)),
    })
}

#[cfg(not(feature = "local"))]
fn local_backend(job: &Job, _pricing: Option<Pricing>, _tier: Tier) -> Result<Backend, Error> {
    Err(Error::Job {
        path: job.file.clone(),
        field: "model.provider".into(),
        message:
            "this promptmill was built without the `local` feature; rebuild with default features"
                .into(),
    })
}

/// The price tier a job's rows are billed at.
pub fn tier(job: &Job) -> Tier {
    if job.mode == Mode::Batch {
        Tier::Batch
    } else if job.params.service_tier == Some(ServiceTier::Flex) {
        Tier::Flex
    } else {
        Tier::Standard
    }
}

/// Stands in for the provider where nothing is sent (estimate, render).
struct NoProvider;

impl Provider for NoProvider {
    fn complete<'a>(
        &'a self,
        _req: &'a Request,
    ) -> futures::future::BoxFuture<'a, Result<Completion, ProviderError>> {
        Box::pin(async {
            Err(ProviderError::new(
                ErrorKind::BadRequest,
                "nothing is sent in this mode",
            ))
        })
    }
}

pub fn is_loopback(url: &str) -> bool {
    let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
    else {
        return false;
    };
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}
