//! One request → one completion or one classified failure. Providers: OpenAI-compatible HTTP
//! (`openai`) and the embedded llama.cpp model (`local`, behind the `local` feature).

#[cfg(feature = "local")]
pub mod local;
pub mod openai;

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// A chat message as the API takes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub content: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One row's request, rendered once by the scheduler and shared by every attempt.
#[derive(Debug)]
pub struct Request {
    pub messages: Vec<Message>,
    /// The exact JSON body the HTTP provider posts; the row's fingerprint is its hash.
    pub body: bytes::Bytes,
}

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

#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub finish_reason: Option<String>,
    /// The model name as the provider returned it (a dated snapshot, often).
    pub model: Option<String>,
    pub usage: Usage,
    pub rate_limits: Option<RateLimits>,
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
    /// The row could not be rendered or read (template, input record).
    Input,
    /// The local model failed on this row.
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Retry,
    FailRow,
    StopJob,
}

impl ErrorKind {
    pub fn disposition(self) -> Disposition {
        match self {
            ErrorKind::RateLimited
            | ErrorKind::Server
            | ErrorKind::Timeout
            | ErrorKind::Connection
            | ErrorKind::InvalidResponse => Disposition::Retry,
            ErrorKind::BadRequest | ErrorKind::Input | ErrorKind::Model => Disposition::FailRow,
            ErrorKind::Auth | ErrorKind::Quota => Disposition::StopJob,
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
}

impl ProviderError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            kind,
            status: None,
            message: message.into(),
            retry_after: None,
            rate_limits: None,
        }
    }
}

/// Counts a chat request's prompt tokens with the model's own tokenizer.
pub trait TokenCounter: Send + Sync {
    fn count_prompt(&self, messages: &[Message]) -> u64;
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
