//! The provider contract: one request (the chat vocabulary, and its body as the provider's
//! [`Wire`] spells it) → one completion or one classified failure. One file per API:
//! OpenAI-compatible HTTP (`openai`, with `endpoint` for URLs, keys and CAs), Anthropic's
//! Messages API (`anthropic`), Google's Gemini API (`gemini`) and the embedded
//! llama.cpp model (`local`, behind the `local` feature). Nothing here reads the job file:
//! `backend` assembles a provider from it.

pub mod anthropic;
pub mod endpoint;
pub mod gemini;
pub mod grammar;
#[cfg(feature = "local")]
pub mod local;
pub mod openai;
mod sse;

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::chat::{Message, Params, Usage};

/// The longest wait a server can ask for (`retry-after`, a rate-limit reset): 10 minutes. A
/// longer one (a day, 1e30 ms) is taken as this, so the run retries at the cap instead of
/// stalling, and no value can overflow a clock.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(600);

/// A wait a server asked for, in seconds, bounded by [`MAX_SERVER_WAIT`]; `None` when it is
/// not a number of seconds (negative, NaN).
pub fn server_wait(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(MAX_SERVER_WAIT.as_secs_f64()),
    ))
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
    /// The first refusal when every choice refused, looked at in place (no copy of the text).
    pub fn refused_everywhere(&self) -> Option<&str> {
        if self.choices.is_empty() {
            return self.refusal.as_deref();
        }
        let all = self.choices.iter().all(|c| c.refusal.is_some());
        all.then(|| self.choices[0].refusal.as_deref()).flatten()
    }

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
    /// The run stopped (a signal, an auth or quota stop, the circuit breaker) after the row
    /// was paid for and before it was finished (a re-ask): the record keeps what was paid, and
    /// a rerun sends the row again.
    Interrupted,
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
            | ErrorKind::InvalidResponse
            | ErrorKind::Interrupted => Disposition::Retry,
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

/// A backend that turns one request into one completion. Retries, pacing and journaling are
/// the run's; a provider makes exactly one attempt per call.
pub trait Provider: Send + Sync {
    fn complete<'a>(&'a self, req: &'a Request)
        -> BoxFuture<'a, Result<Completion, ProviderError>>;
    /// Whether requests cost money (HTTP) or not (local model): decides cost reporting.
    fn is_billed(&self) -> bool {
        true
    }
}

/// One row's request, rendered once and shared by every attempt.
#[derive(Debug)]
pub struct Request {
    pub messages: Vec<Message>,
    /// Choices asked for (the job's `n`; a re-ask's, the choices that broke its shape): what
    /// a provider that does not read the body (the local model) generates.
    pub choices: u32,
    /// The exact JSON body the HTTP provider posts.
    pub body: bytes::Bytes,
}

/// How an API spells a chat request on the wire. Built once per row, before any attempt, so
/// every retry sends the same bytes and a batch file holds exactly what online mode would send.
pub trait Wire: Send + Sync {
    /// `messages` and `json` are the same messages, as values and as the JSON the fingerprint
    /// hashes: a wire that embeds the JSON copies it, one that spells messages its own way
    /// reads the values, and neither parses or serializes them again.
    fn body(
        &self,
        model: &str,
        messages: &[Message],
        json: &RawValue,
        params: &Params,
    ) -> bytes::Bytes;
    /// The body asking for `k` choices instead of the row's own number: a re-ask for the
    /// choices that broke the job's shape. `had_n`: the row's own body names a number.
    fn with_choices(&self, body: &bytes::Bytes, k: u64, had_n: bool) -> bytes::Bytes;
    /// The API answers one choice a request (it has no `n`): several choices are several
    /// requests of the same body.
    fn one_choice_per_request(&self) -> bool {
        false
    }
}
