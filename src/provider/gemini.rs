//! Google's Gemini API, `POST {base_url}/v1beta/models/{model}:generateContent` (and
//! `:streamGenerateContent?alt=sse`): the body spelled as Gemini takes it (`contents` with the
//! roles `user`/`model` and `parts`, `systemInstruction`, `generationConfig` with the job's
//! schema as `responseJsonSchema`), and its answer, `usageMetadata`, `finishReason` and errors
//! (with `google.rpc.RetryInfo`) read into the provider contract. Gemini sends no rate-limit
//! headers: a 429's `retryDelay` is the only wait it asks for.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::endpoint::{ApiKey, Endpoint};
use super::openai::{classified, error_text, invalid, scrub, transport_error};
use super::{Choice, Completion, ErrorKind, Provider, ProviderError, Request};
use crate::chat::{Content, Message, Params, Part, Role, Usage};

/// The most candidates one request may ask for (`candidateCount`).
pub const MAX_CANDIDATES: u32 = 8;

/// `generationConfig` fields a job may set through `[model] extra` (they go inside
/// `generationConfig`, not at the top of the body, where the API would refuse them).
const GENERATION_FIELDS: &[&str] = &[
    "topK",
    "thinkingConfig",
    "responseModalities",
    "mediaResolution",
    "speechConfig",
    "responseLogprobs",
    "logprobs",
    "enableEnhancedCivicAnswers",
];

/// `finishReason`s that mean the answer was withheld: a refusal, not a failure to retry.
const BLOCKED: &[&str] = &[
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
    "LANGUAGE",
];

/// A model's resource name as the URL takes it: `gemini-2.5-flash` is
/// `models/gemini-2.5-flash`; a name that says its collection (`models/…`, `tunedModels/…`)
/// is kept.
pub fn model_resource(model: &str) -> String {
    if model.contains('/') {
        model.to_string()
    } else {
        format!("models/{model}")
    }
}

/// How a row's request is spelled for generateContent. The model is in the URL, not the body.
pub struct GeminiWire;

impl super::Wire for GeminiWire {
    fn body(
        &self,
        _model: &str,
        messages: &[Message],
        _json: &serde_json::value::RawValue,
        params: &Params,
    ) -> bytes::Bytes {
        let mut system: Vec<Value> = Vec::new();
        let mut contents: Vec<Value> = Vec::new();
        for m in messages {
            let parts = parts(&m.content);
            match m.role {
                Role::System | Role::Developer => system.extend(parts),
                Role::User => contents.push(json!({"role": "user", "parts": parts})),
                Role::Assistant => contents.push(json!({"role": "model", "parts": parts})),
            }
        }
        let mut body = Map::new();
        body.insert("contents".into(), contents.into());
        if !system.is_empty() {
            body.insert("systemInstruction".into(), json!({ "parts": system }));
        }
        let mut config = generation_config(params);
        for (k, v) in &params.extra {
            match (k.as_str(), v) {
                ("generationConfig", Value::Object(m)) => config.extend(m.clone()),
                (k, v) if GENERATION_FIELDS.contains(&k) => {
                    config.insert(k.to_string(), v.clone());
                }
                (k, v) => {
                    body.insert(k.to_string(), v.clone());
                }
            }
        }
        if !config.is_empty() {
            body.insert("generationConfig".into(), config.into());
        }
        bytes::Bytes::from(serde_json::to_vec(&body).expect("a request body always serializes"))
    }

    fn with_choices(&self, body: &bytes::Bytes, k: u64, had_n: bool) -> bytes::Bytes {
        if k <= 1 && !had_n {
            return body.clone();
        }
        let mut v: Map<String, Value> = serde_json::from_slice(body).expect("our own body parses");
        let config = v
            .entry("generationConfig")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("generationConfig is an object");
        config.insert("candidateCount".into(), k.into());
        bytes::Bytes::from(serde_json::to_vec(&v).expect("serializes"))
    }
}

/// The job's parameters as `generationConfig`.
fn generation_config(params: &Params) -> Map<String, Value> {
    let mut c = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            c.insert(k.into(), v);
        }
    };
    put("temperature", params.temperature.map(Value::from));
    put("topP", params.top_p.map(Value::from));
    put(
        "maxOutputTokens",
        params.max_output_tokens().map(Value::from),
    );
    put("presencePenalty", params.presence_penalty.map(Value::from));
    put(
        "frequencyPenalty",
        params.frequency_penalty.map(Value::from),
    );
    put(
        "stopSequences",
        params.stop.as_ref().map(|s| s.as_vec().into()),
    );
    put("seed", params.seed.map(Value::from));
    put(
        "candidateCount",
        params.n.filter(|&n| n > 1).map(Value::from),
    );
    if let Some(rf) = &params.response_format {
        // `responseJsonSchema` takes JSON Schema as written (`additionalProperties`, `$ref`),
        // which `responseSchema`'s OpenAPI subset does not.
        c.insert("responseMimeType".into(), "application/json".into());
        if let Some(schema) = rf.pointer("/json_schema/schema") {
            c.insert("responseJsonSchema".into(), schema.clone());
        }
    }
    c
}

/// A message's content as Gemini's parts: text, images inline from data URLs, and an image
/// URL as `fileData` (the API fetches what it can; one it cannot is the row's 400).
fn parts(content: &Content) -> Vec<Value> {
    match content {
        Content::Text(t) => vec![json!({ "text": t })],
        Content::Parts(parts) => parts
            .iter()
            .map(|p| match p {
                Part::Text { text } => json!({ "text": text }),
                Part::ImageUrl { image_url } => match data_url(&image_url.url) {
                    Some((mime, data)) => json!({"inlineData": {"mimeType": mime, "data": data}}),
                    None => json!({"fileData": {
                        "mimeType": mime_of(&image_url.url), "fileUri": image_url.url}}),
                },
            })
            .collect(),
    }
}

/// `data:image/png;base64,AAAA` → (`image/png`, `AAAA`).
fn data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (head, data) = rest.split_once(',')?;
    Some((head.strip_suffix(";base64")?, data))
}

/// An image URL's type by its extension (the API wants one with every `fileData`).
fn mime_of(url: &str) -> &'static str {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .to_ascii_lowercase();
    match path.rsplit('.').next() {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("heic") => "image/heic",
        _ => "image/jpeg",
    }
}

pub struct Gemini {
    client: reqwest::Client,
    url: reqwest::Url,
    /// Kept only to scrub it from any error text a server echoes back.
    key: Option<ApiKey>,
    stream: bool,
}

impl Gemini {
    pub fn new(
        endpoint: &Endpoint,
        model: &str,
        timeout: Duration,
        concurrency: usize,
        stream: bool,
    ) -> Result<Gemini, String> {
        let m = model_resource(model);
        let path = if stream {
            format!("v1beta/{m}:streamGenerateContent?alt=sse")
        } else {
            format!("v1beta/{m}:generateContent")
        };
        Ok(Gemini {
            client: endpoint.client(timeout, concurrency)?,
            url: endpoint.api_url(&path)?,
            key: endpoint.key().cloned(),
            stream,
        })
    }

    async fn read_stream(
        &self,
        resp: reqwest::Response,
        sent: std::time::Instant,
    ) -> Result<Completion, ProviderError> {
        let mut acc = StreamAcc::default();
        let key = self.key.as_ref();
        // Gemini's stream has no end event: it ends with the body, and `finish` checks that
        // the last chunk carried a finish reason.
        super::sse::lines(
            resp,
            |e| transport_error(key, e),
            |l| acc.line(l, key).map(|()| false),
        )
        .await?;
        acc.finish(sent)
    }

    async fn attempt(&self, req: &Request) -> Result<Completion, ProviderError> {
        let key = self.key.as_ref();
        let sent = std::time::Instant::now();
        let resp = self
            .client
            .post(self.url.clone())
            .body(req.body.clone())
            .send()
            .await
            .map_err(|e| transport_error(key, e))?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() {
            let retry_after = super::openai::retry_after(resp.headers());
            let body = resp.bytes().await.unwrap_or_default();
            let mut e = status_error(key, status, &body);
            e.retry_after = e.retry_after.or(retry_after);
            return Err(e);
        }
        if self.stream {
            self.read_stream(resp, sent).await
        } else {
            let body = resp.bytes().await.map_err(|e| transport_error(key, e))?;
            parse_response(&body)
        }
    }
}

impl Provider for Gemini {
    fn complete<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Completion, ProviderError>> {
        Box::pin(self.attempt(req))
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ApiError,
}

#[derive(Deserialize, Default)]
pub(crate) struct ApiError {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    details: Vec<Value>,
}

impl ApiError {
    /// `google.rpc.RetryInfo`'s `retryDelay` ("17s", "1.5s"), bounded.
    fn retry_delay(&self) -> Option<Duration> {
        self.details
            .iter()
            .filter(|d| {
                d["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("google.rpc.RetryInfo"))
            })
            .find_map(|d| d["retryDelay"].as_str())
            .and_then(|s| s.strip_suffix('s')?.parse::<f64>().ok())
            .and_then(super::server_wait)
    }

    /// A 429 whose `google.rpc.QuotaFailure` names only daily quotas
    /// (`GenerateRequestsPerDayPerProjectPerModel…`): no retry within the run can succeed.
    fn daily_quota(&self) -> bool {
        let ids: Vec<&str> = self
            .details
            .iter()
            .filter(|d| {
                d["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("google.rpc.QuotaFailure"))
            })
            .flat_map(|d| d["violations"].as_array().into_iter().flatten())
            .filter_map(|v| v["quotaId"].as_str())
            .collect();
        !ids.is_empty() && ids.iter().all(|q| q.contains("PerDay"))
    }

    /// `google.rpc.ErrorInfo`'s reason (`API_KEY_INVALID`), if the API gave one.
    fn reason(&self) -> Option<&str> {
        self.details.iter().find_map(|d| d["reason"].as_str())
    }
}

/// The API's error object, whether the body is `{"error"}` or (streamGenerateContent)
/// `[{"error"}]`.
fn api_error(body: &[u8]) -> Option<ApiError> {
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
        return Some(b.error);
    }
    serde_json::from_slice::<Vec<ErrorBody>>(body)
        .ok()?
        .into_iter()
        .next()
        .map(|b| b.error)
}

/// A non-2xx answer, classified by Gemini's error table.
pub(crate) fn status_error(key: Option<&ApiKey>, status: u16, body: &[u8]) -> ProviderError {
    let api = api_error(body);
    let gstatus = api
        .as_ref()
        .and_then(|e| e.status.clone())
        .unwrap_or_default();
    let raw = error_text(
        api.as_ref()
            .map(|e| e.message.as_deref().unwrap_or_default()),
        body,
    );
    // A key Google does not know is a 400 INVALID_ARGUMENT with reason API_KEY_INVALID: no
    // row can succeed with it.
    let bad_key = api
        .as_ref()
        .is_some_and(|e| e.reason() == Some("API_KEY_INVALID"))
        || raw.contains("API key not valid");
    let kind = match status {
        400 if bad_key => ErrorKind::Auth,
        401 | 403 => ErrorKind::Auth,
        429 if api.as_ref().is_some_and(ApiError::daily_quota) => ErrorKind::Quota,
        429 => ErrorKind::RateLimited,
        404 if api.is_none() => ErrorKind::Endpoint,
        408 | 409 => ErrorKind::Server,
        // 500 INTERNAL, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED.
        s if s >= 500 => ErrorKind::Server,
        // 400 INVALID_ARGUMENT / FAILED_PRECONDITION, 404 NOT_FOUND, 413.
        _ => ErrorKind::BadRequest,
    };
    ProviderError {
        retry_after: api.as_ref().and_then(ApiError::retry_delay),
        ..classified(key, status, kind, &raw, &gstatus)
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ApiUsage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    cached_content_token_count: Option<u64>,
    #[serde(default)]
    thoughts_token_count: Option<u64>,
    #[serde(default)]
    tool_use_prompt_token_count: Option<u64>,
}

impl From<ApiUsage> for Usage {
    /// The prompt count holds the cached tokens; thinking is billed as output, so it is part of
    /// the completion here (and named as reasoning).
    fn from(u: ApiUsage) -> Usage {
        let prompt = u.prompt_token_count + u.tool_use_prompt_token_count.unwrap_or(0);
        let thoughts = u.thoughts_token_count.unwrap_or(0);
        let completion = u.candidates_token_count + thoughts;
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: u.cached_content_token_count.filter(|&n| n > 0),
            reasoning_tokens: u.thoughts_token_count.filter(|&n| n > 0),
            ..Usage::default()
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ResponseBody {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<ApiUsage>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    index: Option<usize>,
}

#[derive(Deserialize, Default)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

impl Candidate {
    /// The answer's text: every text part but the model's thoughts.
    fn text(&self) -> String {
        self.content
            .iter()
            .flat_map(|c| &c.parts)
            .filter(|p| p["thought"] != true)
            .filter_map(|p| p["text"].as_str())
            .collect()
    }
}

/// `finishReason` in OpenAI's vocabulary, and the refusal it means, if any.
fn finish(reason: Option<&str>, text: &str) -> (Option<String>, Option<String>) {
    match reason {
        None => (None, None),
        Some("STOP") => (Some("stop".into()), None),
        Some("MAX_TOKENS") => (Some("length".into()), None),
        Some(r) if BLOCKED.contains(&r) => (
            Some("content_filter".into()),
            Some(if text.is_empty() {
                format!("the answer was blocked (finishReason: {r})")
            } else {
                text.to_string()
            }),
        ),
        Some(other) => (Some(other.to_ascii_lowercase()), None),
    }
}

/// One choice per candidate, by its index; a prompt blocked before any candidate is one
/// refused choice.
fn choices(cands: &[(String, Option<String>)], blocked: Option<&str>) -> Vec<Choice> {
    if cands.is_empty() {
        let r = blocked.unwrap_or("OTHER");
        return vec![Choice {
            text: String::new(),
            finish_reason: Some("content_filter".into()),
            refusal: Some(format!("the prompt was blocked (blockReason: {r})")),
        }];
    }
    cands
        .iter()
        .map(|(text, reason)| {
            let (finish_reason, refusal) = finish(reason.as_deref(), text);
            Choice {
                text: text.clone(),
                finish_reason,
                refusal,
            }
        })
        .collect()
}

fn completion(choices: Vec<Choice>, model: Option<String>, usage: Option<ApiUsage>) -> Completion {
    let first = choices[0].clone();
    Completion {
        text: first.text,
        finish_reason: first.finish_reason,
        refusal: first.refusal,
        choices: if choices.len() > 1 {
            choices
        } else {
            Vec::new()
        },
        model,
        usage: usage.map(Usage::from),
        ..Completion::default()
    }
}

/// A GenerateContentResponse answered whole.
pub(crate) fn parse_response(body: &[u8]) -> Result<Completion, ProviderError> {
    let r: ResponseBody = serde_json::from_slice(body).map_err(|e| {
        invalid(format!(
            "the response is not a GenerateContentResponse: {e}"
        ))
    })?;
    let blocked = r.prompt_feedback.and_then(|f| f.block_reason);
    if r.candidates.is_empty() && blocked.is_none() {
        return Err(invalid("the response has no candidates"));
    }
    let mut cands: Vec<&Candidate> = r.candidates.iter().collect();
    cands.sort_by_key(|c| c.index.unwrap_or(0));
    let cands: Vec<(String, Option<String>)> = cands
        .iter()
        .map(|c| (c.text(), c.finish_reason.clone()))
        .collect();
    Ok(completion(
        choices(&cands, blocked.as_deref()),
        r.model_version,
        r.usage_metadata,
    ))
}

/// Assembles a streamed answer from its chunks, each a GenerateContentResponse: text adds up
/// per candidate, the last `finishReason` and `usageMetadata` stand. A stream that ends with no
/// finish reason (cut) or carries an `error` is a failure that may have been billed (retried).
#[derive(Default)]
struct StreamAcc {
    cands: Vec<(String, Option<String>)>,
    blocked: Option<String>,
    usage: Option<ApiUsage>,
    model: Option<String>,
    first_token: Option<std::time::Instant>,
}

impl StreamAcc {
    fn line(&mut self, raw: &[u8], key: Option<&ApiKey>) -> Result<(), ProviderError> {
        let line = std::str::from_utf8(raw)
            .map_err(|_| invalid("the stream is not valid UTF-8"))?
            .trim_end_matches(['\r', '\n']);
        let Some(data) = line.strip_prefix("data:") else {
            return Ok(()); // blank separators, comments
        };
        let r: ResponseBody = serde_json::from_str(data.trim_start())
            .map_err(|e| invalid(format!("a stream chunk is not valid JSON: {e}")))?;
        if let Some(e) = r.error {
            let mut err = invalid(format!(
                "the stream ended with an error: {} [{}]",
                scrub(key, e.message.as_deref().unwrap_or_default()),
                e.status.unwrap_or_default()
            ));
            err.kind = ErrorKind::Server;
            return Err(err);
        }
        for c in &r.candidates {
            let i = c.index.unwrap_or(0).min(MAX_CANDIDATES as usize);
            if self.cands.len() <= i {
                self.cands.resize(i + 1, (String::new(), None));
            }
            let text = c.text();
            if !text.is_empty() {
                self.first_token.get_or_insert_with(std::time::Instant::now);
            }
            self.cands[i].0.push_str(&text);
            if c.finish_reason.is_some() {
                self.cands[i].1 = c.finish_reason.clone();
            }
        }
        if let Some(b) = r.prompt_feedback.and_then(|f| f.block_reason) {
            self.blocked = Some(b);
        }
        self.usage = r.usage_metadata.or(self.usage);
        self.model = r.model_version.or(self.model.take());
        Ok(())
    }

    fn finish(self, sent: std::time::Instant) -> Result<Completion, ProviderError> {
        let ended = self.blocked.is_some()
            || (!self.cands.is_empty() && self.cands.iter().all(|c| c.1.is_some()));
        if !ended {
            return Err(invalid("the stream ended before a finishReason"));
        }
        let mut c = completion(
            choices(&self.cands, self.blocked.as_deref()),
            self.model,
            self.usage,
        );
        c.ttft_ms = self
            .first_token
            .map(|t| t.saturating_duration_since(sent).as_millis() as u64);
        Ok(c)
    }
}

#[cfg(test)]
mod tests;
