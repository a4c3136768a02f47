//! The OpenAI-compatible HTTP provider: `POST {base_url}/chat/completions`, plain or streamed,
//! with every failure classified from its status, body and headers (the API's error table).

use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

use super::endpoint::{ApiKey, Endpoint};
use super::{Completion, ErrorKind, Provider, ProviderError, RateLimits, Request};
use crate::chat::{Params, Usage};

pub struct OpenAi {
    client: reqwest::Client,
    /// Parsed once: parsing it again for every request costs more than the request's JSON.
    url: reqwest::Url,
    /// Kept only to scrub it from any error text a server echoes back.
    key: Option<ApiKey>,
    stream: bool,
}

/// The request body, serialized once per row: the same bytes are sent on every attempt.
#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    /// Already JSON: the fingerprint hashes these same bytes, so they are made once.
    messages: &'a serde_json::value::RawValue,
    #[serde(flatten)]
    params: &'a Params,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_key: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

pub fn request_body(
    model: &str,
    messages: &serde_json::value::RawValue,
    params: &Params,
    prompt_cache_key: Option<&str>,
) -> bytes::Bytes {
    let body = Body {
        model,
        messages,
        params,
        stream_options: params.stream.unwrap_or(false).then_some(StreamOptions {
            include_usage: true,
        }),
        // `extra` names it itself when the job puts it there.
        prompt_cache_key: prompt_cache_key
            .filter(|_| !params.extra.contains_key("prompt_cache_key")),
        extra: &params.extra,
    };
    bytes::Bytes::from(serde_json::to_vec(&body).expect("a request body always serializes"))
}

/// OpenAI's chat completions body ([`request_body`]).
#[derive(Default)]
pub struct OpenAiWire {
    /// `prompt_cache_key`, sent with every row: rows that share a prefix reach the same cache.
    /// A routing hint, not part of what is asked: the fingerprint leaves it out, so turning it
    /// on never re-pays a finished row.
    pub cache_key: Option<String>,
}

impl super::Wire for OpenAiWire {
    fn body(
        &self,
        model: &str,
        _messages: &[crate::chat::Message],
        json: &serde_json::value::RawValue,
        params: &Params,
    ) -> bytes::Bytes {
        request_body(model, json, params, self.cache_key.as_deref())
    }

    fn with_choices(&self, body: &bytes::Bytes, k: u64, had_n: bool) -> bytes::Bytes {
        if k == 1 && !had_n {
            return body.clone();
        }
        let mut v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(body).expect("our own body parses");
        if k == 1 {
            v.remove("n");
        } else {
            v.insert("n".into(), k.into());
        }
        bytes::Bytes::from(serde_json::to_vec(&v).expect("serializes"))
    }
}

impl OpenAi {
    pub fn new(
        endpoint: &Endpoint,
        timeout: Duration,
        concurrency: usize,
        stream: bool,
    ) -> Result<OpenAi, String> {
        Ok(OpenAi {
            client: endpoint.client(timeout, concurrency)?,
            url: endpoint.chat_url()?,
            key: endpoint.key().cloned(),
            stream,
        })
    }

    async fn attempt(&self, req: &Request) -> Result<Completion, ProviderError> {
        let sent = std::time::Instant::now();
        let resp = self
            .client
            .post(self.url.clone())
            .body(req.body.clone())
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        let rate_limits = rate_limits(resp.headers());
        if !status.is_success() {
            let retry_after = retry_after(resp.headers());
            let body = resp.bytes().await.unwrap_or_default();
            return Err(self.status_error(status.as_u16(), &body, retry_after, rate_limits));
        }
        let mut c = if self.stream {
            self.read_stream(resp, sent).await?
        } else {
            let body = resp.bytes().await.map_err(|e| self.transport_error(e))?;
            parse_completion(&body)?
        };
        c.rate_limits = rate_limits;
        Ok(c)
    }

    async fn read_stream(
        &self,
        resp: reqwest::Response,
        sent: std::time::Instant,
    ) -> Result<Completion, ProviderError> {
        let mut acc = StreamAcc::default();
        if super::sse::lines(resp, |e| self.transport_error(e), |l| acc.line(l)).await? {
            return acc.finish(sent);
        }
        Err(invalid("the stream ended before `data: [DONE]`"))
    }

    fn transport_error(&self, e: reqwest::Error) -> ProviderError {
        transport_error(self.key.as_ref(), e)
    }

    fn status_error(
        &self,
        status: u16,
        body: &[u8],
        retry_after: Option<Duration>,
        rate_limits: Option<RateLimits>,
    ) -> ProviderError {
        status_error(self.key.as_ref(), status, body, retry_after, rate_limits)
    }
}

/// What a vendor's error body says: its message, or the start of a body that is not the
/// API's JSON (a proxy's page).
pub(crate) fn error_text(message: Option<&str>, body: &[u8]) -> String {
    match message {
        Some(m) => m.to_string(),
        None => String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
    }
}

/// A failure the vendor's error table classified: its text with the key cut out, the
/// vendor's own error type in brackets, and for a URL wrong for every request what to check.
pub(crate) fn classified(
    key: Option<&ApiKey>,
    status: u16,
    kind: ErrorKind,
    text: &str,
    vendor_type: &str,
) -> ProviderError {
    let mut message = scrub(key, text);
    if !vendor_type.is_empty() {
        message = format!("{message} [{vendor_type}]");
    }
    if kind == ErrorKind::Endpoint {
        message.push_str(": the URL is wrong for every request; check [model] base_url");
    }
    ProviderError {
        status: Some(status),
        ..ProviderError::new(kind, message)
    }
}

/// Any text a server sent back, with the key cut out if it was echoed.
pub(crate) fn scrub(key: Option<&ApiKey>, text: &str) -> String {
    match key {
        Some(k) if !k.expose().is_empty() => text.replace(k.expose(), "[redacted]"),
        _ => text.to_string(),
    }
}

/// A failure below HTTP (connect, TLS, timeout, reset), classified.
pub(crate) fn transport_error(key: Option<&ApiKey>, e: reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connection
    };
    // A connect failure sent nothing; anything later may have reached the model. A redirect
    // that is refused (to another origin) was answered before any model ran.
    let redirect = e.is_redirect();
    let unreachable = e.is_connect() || redirect;
    // reqwest's Display stops at the top error; the cause says "connection reset" etc.
    let e = e.without_url();
    let mut msg = super::endpoint::error_chain(&e);
    // rustls's verdict on the server's certificate: no retry changes it, so the job stops
    // at once with the fix rather than after the outage window.
    let untrusted = msg.contains("invalid peer certificate");
    if untrusted {
        msg.push_str(
            " (the server's certificate is not trusted: if it comes from a private or \
             corporate CA, set [model] ca_file = \"ca.pem\" or add the CA to the system's \
             store)",
        );
    }
    // A redirect to another host is refused for every row alike: the job stops at once.
    let kind = if untrusted || redirect {
        ErrorKind::Endpoint
    } else {
        kind
    };
    let mut err = ProviderError::new(kind, scrub(key, &msg));
    err.unreachable = unreachable;
    err.maybe_billed = !unreachable;
    err
}

/// A non-2xx answer, classified by the API's error table.
pub(crate) fn status_error(
    key: Option<&ApiKey>,
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    rate_limits: Option<RateLimits>,
) -> ProviderError {
    let api: Option<ApiErrorBody> = serde_json::from_slice(body).ok();
    let api = api.map(|b| b.error);
    let code = api
        .as_ref()
        .and_then(|e| e.code.clone())
        .unwrap_or_default();
    let etype = api
        .as_ref()
        .and_then(|e| e.r#type.clone())
        .unwrap_or_default();
    let raw = match &api {
        Some(e) => e.message.clone().unwrap_or_default(),
        None => String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
    };
    let kind = match status {
        429 if code == "insufficient_quota" || etype == "insufficient_quota" => ErrorKind::Quota,
        // Every other 429 is retried, flex processing's "resource unavailable" (code
        // `resource_unavailable`: no capacity now, not billed) as much as a rate limit.
        429 => ErrorKind::RateLimited,
        404 if is_wrong_url(&code, &raw, api.is_some()) => ErrorKind::Endpoint,
        401 | 403 => ErrorKind::Auth,
        408 | 409 => ErrorKind::Server,
        s if s >= 500 => ErrorKind::Server,
        _ => ErrorKind::BadRequest,
    };
    let mut message = scrub(key, &raw);
    if !code.is_empty() {
        message = format!("{message} [{code}]");
    }
    if kind == ErrorKind::Endpoint {
        message.push_str(
            ": the URL is wrong for every request; check [model] base_url, deployment and \
             api_version (and the model name)",
        );
    }
    ProviderError {
        kind,
        status: Some(status),
        message,
        retry_after,
        rate_limits,
        unreachable: false,
        maybe_billed: false,
    }
}

/// A 404 that says the URL is wrong rather than the request: Azure's bare "Resource not
/// found" (a missing or unknown api-version, a wrong path), its `DeploymentNotFound`, OpenAI's
/// "Invalid URL", or a body that is not the API's JSON at all (a proxy's or web server's page).
fn is_wrong_url(code: &str, message: &str, api_json: bool) -> bool {
    !api_json
        || code == "404"
        || code == "DeploymentNotFound"
        || message == "Resource not found"
        || message.starts_with("Invalid URL (")
}

impl Provider for OpenAi {
    fn complete<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Completion, ProviderError>> {
        Box::pin(self.attempt(req))
    }
}

#[derive(Deserialize)]
struct ApiErrorBody {
    error: ApiError,
}

#[derive(Deserialize)]
struct ApiError {
    message: Option<String>,
    r#type: Option<String>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct ChatResponse {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<ChoiceMessage>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    content: Option<String>,
    refusal: Option<String>,
}

#[derive(Deserialize, Default)]
struct ApiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

impl From<ApiUsage> for Usage {
    fn from(u: ApiUsage) -> Usage {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u
                .total_tokens
                .unwrap_or(u.prompt_tokens + u.completion_tokens),
            cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
            reasoning_tokens: u.completion_tokens_details.and_then(|d| d.reasoning_tokens),
            ..Usage::default()
        }
    }
}

/// A 200 whose body is not a usable completion: the server may have billed it.
pub(crate) fn invalid(msg: impl Into<String>) -> ProviderError {
    let mut e = ProviderError::new(ErrorKind::InvalidResponse, msg);
    e.maybe_billed = true;
    e
}

pub(crate) fn parse_completion(body: &[u8]) -> Result<Completion, ProviderError> {
    let r: ChatResponse = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the response is not a chat completion: {e}")))?;
    if r.choices.is_empty() {
        return Err(invalid("the response has no choices"));
    }
    let mut choices = Vec::with_capacity(r.choices.len());
    for (i, choice) in r.choices.into_iter().enumerate() {
        let msg = choice
            .message
            .ok_or_else(|| invalid(format!("the response's choice {i} has no message")))?;
        choices.push(super::Choice {
            text: msg
                .content
                .or_else(|| msg.refusal.clone())
                .unwrap_or_default(),
            finish_reason: choice.finish_reason,
            refusal: msg.refusal,
        });
    }
    Ok(completion_of(choices, r.model, r.usage.map(Usage::from)))
}

/// The completion of its choices: the first one's text in front, all of them when there are
/// several.
fn completion_of(
    mut choices: Vec<super::Choice>,
    model: Option<String>,
    usage: Option<Usage>,
) -> Completion {
    let first = choices.first().cloned().unwrap_or_default();
    if choices.len() == 1 {
        choices.clear();
    }
    Completion {
        text: first.text,
        finish_reason: first.finish_reason,
        refusal: first.refusal,
        choices,
        model,
        usage,
        ..Completion::default()
    }
}

/// Assembles a streamed completion from its server-sent events, each choice by its index.
#[derive(Default)]
struct StreamAcc {
    choices: Vec<super::Choice>,
    model: Option<String>,
    usage: Option<Usage>,
    saw_choice: bool,
    /// When the first token (or refusal) arrived.
    first_token: Option<std::time::Instant>,
}

#[derive(Deserialize)]
struct Chunk {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: usize,
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
    refusal: Option<String>,
}

impl StreamAcc {
    /// Takes one line; true at `data: [DONE]`.
    fn line(&mut self, raw: &[u8]) -> Result<bool, ProviderError> {
        let line = std::str::from_utf8(raw)
            .map_err(|_| invalid("the stream is not valid UTF-8"))?
            .trim_end_matches(['\r', '\n']);
        let Some(data) = line.strip_prefix("data:") else {
            return Ok(false); // comments, event names, blank separators
        };
        let data = data.trim_start();
        if data == "[DONE]" {
            return Ok(true);
        }
        let c: Chunk = serde_json::from_str(data)
            .map_err(|e| invalid(format!("a stream chunk is not valid JSON: {e}")))?;
        if self.model.is_none() {
            self.model = c.model;
        }
        for ch in c.choices {
            self.saw_choice = true;
            // The API numbers choices from 0; an index far past `n` is not a real choice.
            if ch.index > 1024 {
                return Err(invalid(format!("a stream chunk for choice {}", ch.index)));
            }
            if self.choices.len() <= ch.index {
                self.choices.resize_with(ch.index + 1, Default::default);
            }
            let acc = &mut self.choices[ch.index];
            if let Some(d) = ch.delta {
                let got = d.content.is_some() || d.refusal.is_some();
                if let Some(t) = d.content {
                    acc.text.push_str(&t);
                }
                if let Some(r) = d.refusal {
                    acc.refusal.get_or_insert_with(String::new).push_str(&r);
                }
                if got && self.first_token.is_none() {
                    self.first_token = Some(std::time::Instant::now());
                }
            }
            if ch.finish_reason.is_some() {
                acc.finish_reason = ch.finish_reason;
            }
        }
        if let Some(u) = c.usage {
            self.usage = Some(u.into());
        }
        Ok(false)
    }

    fn finish(self, sent: std::time::Instant) -> Result<Completion, ProviderError> {
        if !self.saw_choice {
            return Err(invalid("the stream carried no choices"));
        }
        let mut choices = self.choices;
        for c in &mut choices {
            if c.text.is_empty() {
                if let Some(r) = &c.refusal {
                    c.text = r.clone();
                }
            }
        }
        let mut c = completion_of(choices, self.model, self.usage);
        c.ttft_ms = self
            .first_token
            .map(|t| t.saturating_duration_since(sent).as_millis() as u64);
        Ok(c)
    }
}

pub(crate) fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// `retry-after-ms` (OpenAI's, precise) first, then `retry-after` in seconds.
pub(crate) fn retry_after(h: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = header_str(h, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if let Some(d) = super::server_wait(ms / 1000.0) {
            return Some(d);
        }
    }
    header_str(h, "retry-after")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(super::server_wait)
}

fn rate_limits(h: &HeaderMap) -> Option<RateLimits> {
    let num = |n: &str| header_str(h, n).and_then(|v| v.parse::<u64>().ok());
    // Bounded as every wait a server asks for is (a reset of 99999999s would stall the run).
    let dur = |n: &str| {
        header_str(h, n)
            .and_then(parse_reset)
            .map(|d| d.min(super::MAX_SERVER_WAIT))
    };
    let rl = RateLimits {
        limit_requests: num("x-ratelimit-limit-requests"),
        limit_tokens: num("x-ratelimit-limit-tokens"),
        remaining_requests: num("x-ratelimit-remaining-requests"),
        remaining_tokens: num("x-ratelimit-remaining-tokens"),
        reset_requests: dur("x-ratelimit-reset-requests"),
        reset_tokens: dur("x-ratelimit-reset-tokens"),
    };
    (rl != RateLimits::default()).then_some(rl)
}

/// OpenAI's reset durations: "1s", "6m0s", "250ms", "1.2s", "1h2m3s".
pub(crate) fn parse_reset(v: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut num = String::new();
    let mut chars = v.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += n * unit;
        any = true;
    }
    if !num.is_empty() {
        total += num.parse::<f64>().ok()?; // bare number: seconds
        any = true;
    }
    // A duration past what the clock holds is the longest one; the caller bounds it.
    any.then(|| Duration::try_from_secs_f64(total).unwrap_or(Duration::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_a_server_asks_for_is_bounded_and_never_panics() {
        let cap = crate::provider::MAX_SERVER_WAIT;
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset-requests", "99999999s".parse().unwrap());
        h.insert(
            "x-ratelimit-reset-tokens",
            "100000000000000000000s".parse().unwrap(),
        );
        let rl = rate_limits(&h).unwrap();
        assert_eq!((rl.reset_requests, rl.reset_tokens), (Some(cap), Some(cap)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", "86400".parse().unwrap());
        assert_eq!(retry_after(&h), Some(cap));
        h.insert("retry-after-ms", "1e30".parse().unwrap());
        assert_eq!(retry_after(&h), Some(cap));
        h.insert("retry-after-ms", "-5".parse().unwrap());
        h.insert("retry-after", "NaN".parse().unwrap());
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn reset_durations_parse_like_openai_writes_them() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_reset("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_reset("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_reset("soon"), None);
    }

    #[test]
    fn usage_details_are_read() {
        let c = parse_completion(
            br#"{"model":"gpt-4o-2024-08-06","choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],
               "usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,
               "prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}}"#,
        )
        .unwrap();
        assert_eq!(c.text, "hi");
        let u = c.usage.unwrap();
        assert_eq!(u.cached_tokens, Some(4));
        assert_eq!(u.reasoning_tokens, Some(2));
        assert_eq!(c.model.as_deref(), Some("gpt-4o-2024-08-06"));
    }

    #[test]
    fn a_body_without_usage_has_none_not_zero() {
        let c = parse_completion(
            br#"{"model":"m","choices":[{"message":{"content":"hi"},"finish_reason":"stop"}]}"#,
        )
        .unwrap();
        assert_eq!(c.usage, None);
    }

    #[test]
    fn a_body_without_choices_is_invalid_and_retried() {
        let e = parse_completion(br#"{"choices":[]}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidResponse);
        let e = parse_completion(br#"{"id": "x", "choices": ["#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidResponse);
    }

    fn provider() -> OpenAi {
        OpenAi {
            client: reqwest::Client::new(),
            url: reqwest::Url::parse("http://127.0.0.1:1/v1/chat/completions").unwrap(),
            key: Some(ApiKey::new("sk-secret-0123456789".into())),
            stream: false,
        }
    }

    #[test]
    fn flex_resource_unavailable_is_retried_like_a_rate_limit_not_quota() {
        let p = provider();
        let e = p.status_error(
            429,
            br#"{"error":{"message":"Resource unavailable. Please try again later.","type":"resource_unavailable","param":null,"code":"resource_unavailable"}}"#,
            None,
            None,
        );
        assert_eq!(e.kind, ErrorKind::RateLimited);
        assert!(
            e.message.contains("[resource_unavailable]"),
            "{}",
            e.message
        );
        let q = p.status_error(
            429,
            br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
            None,
            None,
        );
        assert_eq!(q.kind, ErrorKind::Quota);
    }

    #[test]
    fn a_404_for_the_url_stops_the_job_and_one_for_the_model_fails_the_row() {
        let p = provider();
        for body in [
            &br#"{"error":{"code":"404","message":"Resource not found"}}"#[..],
            br#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#,
            br#"{"error":{"message":"Invalid URL (POST /v1/chat/completion)","type":"invalid_request_error","param":null,"code":null}}"#,
            b"<html>404 Not Found</html>",
        ] {
            let e = p.status_error(404, body, None, None);
            assert_eq!(e.kind, ErrorKind::Endpoint, "{}", String::from_utf8_lossy(body));
        }
        let e = p.status_error(
            404,
            br#"{"error":{"message":"The model `x` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#,
            None,
            None,
        );
        assert_eq!(e.kind, ErrorKind::BadRequest);
    }

    #[test]
    fn extra_fields_are_flattened_into_the_body() {
        let mut p = Params {
            temperature: Some(0.2),
            max_tokens: Some(5),
            ..Default::default()
        };
        p.extra.insert("logprobs".into(), serde_json::json!(true));
        let msgs = [crate::chat::Message {
            role: crate::chat::Role::User,
            name: None,
            content: "x".into(),
        }];
        let v: serde_json::Value = serde_json::from_slice(&request_body(
            "m",
            &serde_json::value::to_raw_value(&msgs).unwrap(),
            &p,
            None,
        ))
        .unwrap();
        assert_eq!(v["logprobs"], serde_json::json!(true));
        assert_eq!(v["temperature"], serde_json::json!(0.2));
        assert!(v.get("extra").is_none());
        assert!(v.get("stream_options").is_none());
        assert!(v.get("prompt_cache_key").is_none());
        let raw = serde_json::value::to_raw_value(&msgs).unwrap();
        let keyed = |p: &Params| -> serde_json::Value {
            serde_json::from_slice(&request_body("m", &raw, p, Some("pm-job-1"))).unwrap()
        };
        assert_eq!(keyed(&p)["prompt_cache_key"], "pm-job-1");
        // The job's own `extra.prompt_cache_key` wins, and is not sent twice.
        p.extra
            .insert("prompt_cache_key".into(), serde_json::json!("mine"));
        let text =
            String::from_utf8(request_body("m", &raw, &p, Some("pm-job-1")).to_vec()).unwrap();
        assert_eq!(text.matches("prompt_cache_key").count(), 1, "{text}");
        assert_eq!(keyed(&p)["prompt_cache_key"], "mine");
    }
}
