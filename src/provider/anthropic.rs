//! Anthropic's Messages API, `POST {base_url}/v1/messages`: the body spelled as Claude takes it
//! (system at the top, content blocks, a required `max_tokens`, the job's schema as a forced
//! tool, a `cache_control` breakpoint after the prefix every row shares) and its answer, errors
//! and `anthropic-ratelimit-*` headers read into the provider contract.

use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::endpoint::{ApiKey, Endpoint};
use super::openai::{
    classified, error_text, header_str, invalid, retry_after, scrub, transport_error,
};
use super::{Completion, ErrorKind, Provider, ProviderError, RateLimits, Request};
use crate::chat::{Content, Message, Params, Part, Role, Usage};

/// `[model] prompt_cache`: how long Anthropic keeps the shared prefix, or no breakpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum PromptCache {
    #[default]
    #[serde(rename = "5m")]
    FiveMinutes,
    #[serde(rename = "1h")]
    OneHour,
    #[serde(rename = "off")]
    Off,
}

/// The shortest prefix a Claude model caches, in its tokens (Anthropic's prompt-caching
/// guide): shorter ones are sent uncached, at no extra cost.
pub fn min_cached_tokens(model: &str) -> u64 {
    let m = model.to_ascii_lowercase();
    if m.contains("opus-4-5") || m.contains("haiku-4-5") {
        4096
    } else if m.contains("haiku") {
        2048
    } else {
        1024
    }
}

/// The name of the tool a job's schema goes out as.
pub const SCHEMA_TOOL: &str = "record";

/// How a row's request is spelled for the Messages API.
pub struct AnthropicWire {
    pub cache: PromptCache,
    /// The leading messages every row shares (their templates read nothing of the row): the
    /// breakpoint goes on the last block of the last of them. 0: no breakpoint.
    pub shared_messages: usize,
}

impl super::Wire for AnthropicWire {
    fn body(
        &self,
        model: &str,
        messages: &[Message],
        _json: &serde_json::value::RawValue,
        params: &Params,
    ) -> bytes::Bytes {
        let breakpoint = match self.cache {
            PromptCache::Off => None,
            _ if self.shared_messages == 0 => None,
            PromptCache::FiveMinutes => Some(json!({"type": "ephemeral"})),
            PromptCache::OneHour => Some(json!({"type": "ephemeral", "ttl": "1h"})),
        };
        let mut system: Vec<Value> = Vec::new();
        let mut turns: Vec<Value> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let mut blocks = blocks(&m.content);
            if i + 1 == self.shared_messages {
                if let (Some(b), Some(last)) = (&breakpoint, blocks.last_mut()) {
                    last["cache_control"] = b.clone();
                }
            }
            match m.role {
                Role::System | Role::Developer => system.extend(blocks),
                Role::User | Role::Assistant => {
                    turns.push(json!({"role": m.role.as_str(), "content": blocks}))
                }
            }
        }
        let mut body = Map::new();
        body.insert("model".into(), model.into());
        // The job validated that it sets one: the API has no default.
        body.insert(
            "max_tokens".into(),
            params.max_output_tokens().unwrap_or(1024).into(),
        );
        if !system.is_empty() {
            body.insert("system".into(), system.into());
        }
        body.insert("messages".into(), turns.into());
        put(&mut body, "temperature", params.temperature);
        put(&mut body, "top_p", params.top_p);
        if let Some(s) = &params.stop {
            body.insert("stop_sequences".into(), s.as_vec().into());
        }
        if let Some(u) = &params.user {
            body.insert("metadata".into(), json!({"user_id": u}));
        }
        if params.stream == Some(true) {
            body.insert("stream".into(), true.into());
        }
        if let Some(schema) = params
            .response_format
            .as_ref()
            .and_then(|rf| rf.pointer("/json_schema/schema"))
        {
            body.insert(
                "tools".into(),
                json!([{"name": SCHEMA_TOOL, "description": "Record the answer in this shape.",
                        "input_schema": schema}]),
            );
            body.insert(
                "tool_choice".into(),
                json!({"type": "tool", "name": SCHEMA_TOOL}),
            );
        }
        for (k, v) in &params.extra {
            body.insert(k.clone(), v.clone());
        }
        bytes::Bytes::from(serde_json::to_vec(&body).expect("a request body always serializes"))
    }

    /// Claude answers one choice a request: a re-ask is the same request again, once a
    /// choice.
    fn with_choices(&self, body: &bytes::Bytes, _k: u64, _had_n: bool) -> bytes::Bytes {
        body.clone()
    }

    fn one_choice_per_request(&self) -> bool {
        true
    }
}

fn put(body: &mut Map<String, Value>, key: &str, v: Option<f64>) {
    if let Some(v) = v {
        body.insert(key.into(), v.into());
    }
}

/// A message's content as Claude's blocks: text, and images as base64 or URL sources.
fn blocks(content: &Content) -> Vec<Value> {
    match content {
        Content::Text(t) => vec![json!({"type": "text", "text": t})],
        Content::Parts(parts) => parts
            .iter()
            .map(|p| match p {
                Part::Text { text } => json!({"type": "text", "text": text}),
                Part::ImageUrl { image_url } => {
                    let source = match data_url(&image_url.url) {
                        Some((media_type, data)) => {
                            json!({"type": "base64", "media_type": media_type, "data": data})
                        }
                        None => json!({"type": "url", "url": image_url.url}),
                    };
                    json!({"type": "image", "source": source})
                }
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

pub struct Anthropic {
    client: reqwest::Client,
    url: reqwest::Url,
    /// Kept only to scrub it from any error text a server echoes back.
    key: Option<ApiKey>,
    stream: bool,
}

impl Anthropic {
    pub fn new(
        endpoint: &Endpoint,
        timeout: Duration,
        concurrency: usize,
        stream: bool,
    ) -> Result<Anthropic, String> {
        Ok(Anthropic {
            client: endpoint.client(timeout, concurrency)?,
            url: endpoint.messages_url()?,
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
        if super::sse::lines(resp, |e| transport_error(key, e), |l| acc.line(l, key)).await? {
            return Ok(acc.finish(sent));
        }
        Err(invalid("the stream ended before `message_stop`"))
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
        let rate_limits = rate_limits(resp.headers(), std::time::SystemTime::now());
        if !resp.status().is_success() {
            let wait = retry_after(resp.headers());
            let body = resp.bytes().await.unwrap_or_default();
            let mut e = status_error(key, status, &body);
            e.retry_after = wait;
            e.rate_limits = rate_limits;
            return Err(e);
        }
        let mut c = if self.stream {
            self.read_stream(resp, sent).await?
        } else {
            let body = resp.bytes().await.map_err(|e| transport_error(key, e))?;
            parse_message(&body)?
        };
        c.rate_limits = rate_limits;
        Ok(c)
    }
}

impl Provider for Anthropic {
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

#[derive(Deserialize)]
struct ApiError {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

/// A non-2xx answer, classified by Anthropic's error table.
pub(crate) fn status_error(key: Option<&ApiKey>, status: u16, body: &[u8]) -> ProviderError {
    let api = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let etype = api
        .as_ref()
        .and_then(|e| e.kind.clone())
        .unwrap_or_default();
    let raw = error_text(
        api.as_ref()
            .map(|e| e.message.as_deref().unwrap_or_default()),
        body,
    );
    let kind = match status {
        401 | 403 => ErrorKind::Auth,
        // An empty account answers 400 with this text: no row can succeed until it is topped up.
        400 if raw.contains("credit balance is too low") => ErrorKind::Quota,
        429 => ErrorKind::RateLimited,
        // Not the API's JSON: the URL reached something else (a proxy, a web server).
        404 if api.is_none() => ErrorKind::Endpoint,
        408 | 409 => ErrorKind::Server,
        // 500 api_error, 529 overloaded_error.
        s if s >= 500 => ErrorKind::Server,
        _ => ErrorKind::BadRequest,
    };
    classified(key, status, kind, &raw, &etype)
}

#[derive(Deserialize)]
struct MessageBody {
    model: Option<String>,
    #[serde(default)]
    content: Vec<Value>,
    stop_reason: Option<String>,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize, Default)]
pub(crate) struct ApiUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    /// The split of the writes by lifetime, when the API gives it.
    cache_creation: Option<CacheCreation>,
}

#[derive(Deserialize, Default)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: u64,
}

impl From<ApiUsage> for Usage {
    /// Anthropic counts cache reads and writes apart from `input_tokens`; promptmill's prompt
    /// is all three, with the reads and writes named inside it.
    fn from(u: ApiUsage) -> Usage {
        let written = u.cache_creation_input_tokens.unwrap_or(0);
        let read = u.cache_read_input_tokens.unwrap_or(0);
        let prompt = u.input_tokens + written + read;
        Usage {
            prompt_tokens: prompt,
            completion_tokens: u.output_tokens,
            total_tokens: prompt + u.output_tokens,
            cached_tokens: u.cache_read_input_tokens,
            cache_write_tokens: u.cache_creation_input_tokens,
            cache_write_1h_tokens: u
                .cache_creation
                .map(|c| c.ephemeral_1h_input_tokens)
                .filter(|&n| n > 0),
            ..Usage::default()
        }
    }
}

/// Assembles a streamed message from its events: `message_start` (model, input usage),
/// `content_block_start`/`_delta` (text, or a tool's input as partial JSON), `message_delta`
/// (stop reason, output usage), `message_stop`; `ping` is nothing, and an `error` event is a
/// failure that may have been billed (retried).
#[derive(Default)]
struct StreamAcc {
    model: Option<String>,
    usage: Option<ApiUsage>,
    text: String,
    tool_input: Option<String>,
    stop_reason: Option<String>,
    first_token: Option<std::time::Instant>,
}

impl StreamAcc {
    /// Takes one line; true at `message_stop`.
    fn line(&mut self, raw: &[u8], key: Option<&ApiKey>) -> Result<bool, ProviderError> {
        let line = std::str::from_utf8(raw)
            .map_err(|_| invalid("the stream is not valid UTF-8"))?
            .trim_end_matches(['\r', '\n']);
        let Some(data) = line.strip_prefix("data:") else {
            return Ok(false); // `event:` names (the data says the type too), blank separators
        };
        let ev: Value = serde_json::from_str(data.trim_start())
            .map_err(|e| invalid(format!("a stream event is not valid JSON: {e}")))?;
        match ev["type"].as_str().unwrap_or_default() {
            "message_start" => {
                let m = &ev["message"];
                self.model = m["model"].as_str().map(String::from);
                self.usage = serde_json::from_value(m["usage"].clone()).ok();
            }
            "content_block_start"
                if ev.pointer("/content_block/type") == Some(&json!("tool_use")) =>
            {
                self.tool_input.get_or_insert_with(String::new);
            }
            "content_block_delta" => {
                let d = &ev["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => {
                        self.text.push_str(d["text"].as_str().unwrap_or_default())
                    }
                    Some("input_json_delta") => self
                        .tool_input
                        .get_or_insert_with(String::new)
                        .push_str(d["partial_json"].as_str().unwrap_or_default()),
                    _ => return Ok(false),
                }
                self.first_token.get_or_insert_with(std::time::Instant::now);
            }
            "message_delta" => {
                if let Some(s) = ev.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(s.to_string());
                }
                // The output count is cumulative; the input counts came with message_start.
                if let Some(out) = ev.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    self.usage
                        .get_or_insert_with(ApiUsage::default)
                        .output_tokens = out;
                }
            }
            "message_stop" => return Ok(true),
            "error" => {
                let etype = ev
                    .pointer("/error/type")
                    .and_then(Value::as_str)
                    .unwrap_or("error");
                let msg = ev
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let mut e = invalid(format!(
                    "the stream ended with an error: {} [{etype}]",
                    scrub(key, msg)
                ));
                e.kind = ErrorKind::Server;
                return Err(e);
            }
            _ => {} // ping, content_block_stop, and events a later API version adds
        }
        Ok(false)
    }

    fn finish(self, sent: std::time::Instant) -> Completion {
        let text = self
            .tool_input
            .filter(|t| !t.is_empty())
            .unwrap_or(self.text);
        let stop = self.stop_reason.unwrap_or_default();
        Completion {
            refusal: (stop == "refusal").then(|| text.clone()),
            finish_reason: Some(finish_reason(&stop).to_string()),
            ttft_ms: self
                .first_token
                .map(|t| t.saturating_duration_since(sent).as_millis() as u64),
            text,
            model: self.model,
            usage: self.usage.map(Usage::from),
            ..Completion::default()
        }
    }
}

/// `stop_reason` in OpenAI's vocabulary, which the rest of promptmill reads.
fn finish_reason(stop: &str) -> &str {
    match stop {
        "end_turn" | "stop_sequence" | "tool_use" | "pause_turn" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        other => other,
    }
}

/// A Message answered whole: its text blocks (or the forced tool's input, as JSON text), its
/// stop reason and usage.
pub(crate) fn parse_message(body: &[u8]) -> Result<Completion, ProviderError> {
    let m: MessageBody = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the response is not a message: {e}")))?;
    let tool_input = m
        .content
        .iter()
        .find(|b| b["type"] == "tool_use")
        .map(|b| b["input"].to_string());
    let text = tool_input.unwrap_or_else(|| {
        m.content
            .iter()
            .filter(|b| b["type"] == "text")
            .filter_map(|b| b["text"].as_str())
            .collect()
    });
    let stop = m.stop_reason.as_deref().unwrap_or_default();
    let refusal = (stop == "refusal").then(|| {
        if text.is_empty() {
            "the model refused (stop_reason: refusal)".to_string()
        } else {
            text.clone()
        }
    });
    Ok(Completion {
        text,
        finish_reason: m
            .stop_reason
            .as_deref()
            .map(|s| finish_reason(s).to_string()),
        refusal,
        model: m.model,
        usage: m.usage.map(Usage::from),
        ..Completion::default()
    })
}

/// The `anthropic-ratelimit-*` headers: limits, what remains, and resets as RFC 3339 times
/// (turned into waits from `now`, bounded by [`super::MAX_SERVER_WAIT`]). `tokens-*` is the
/// most restrictive of the input and output limits; without it, the input limit stands.
pub(crate) fn rate_limits(h: &HeaderMap, now: std::time::SystemTime) -> Option<RateLimits> {
    let get = |kind: &str, what: &str| {
        header_str(h, &format!("anthropic-ratelimit-{kind}-{what}")).or_else(|| {
            (kind == "tokens")
                .then(|| header_str(h, &format!("anthropic-ratelimit-input-tokens-{what}")))?
        })
    };
    let num = |kind: &str, what: &str| get(kind, what).and_then(|v| v.parse::<u64>().ok());
    let reset = |kind: &str| get(kind, "reset").and_then(|v| wait_until(v, now));
    let rl = RateLimits {
        limit_requests: num("requests", "limit"),
        limit_tokens: num("tokens", "limit"),
        remaining_requests: num("requests", "remaining"),
        remaining_tokens: num("tokens", "remaining"),
        reset_requests: reset("requests"),
        reset_tokens: reset("tokens"),
    };
    (rl != RateLimits::default()).then_some(rl)
}

/// The wait until an RFC 3339 time; a time past is no wait, one too far is the cap.
fn wait_until(rfc3339: &str, now: std::time::SystemTime) -> Option<Duration> {
    let at = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    let now = time::OffsetDateTime::from(now);
    let secs = (at - now).as_seconds_f64();
    super::server_wait(secs.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Wire;

    fn msg(role: Role, text: &str) -> Message {
        Message {
            role,
            name: None,
            content: text.into(),
        }
    }

    fn body(wire: &AnthropicWire, msgs: &[Message], params: &Params) -> Value {
        let raw = serde_json::value::to_raw_value(msgs).unwrap();
        serde_json::from_slice(&wire.body("claude-sonnet-4-5", msgs, &raw, params)).unwrap()
    }

    #[test]
    fn system_goes_to_the_top_with_the_breakpoint_after_the_shared_prefix() {
        let wire = AnthropicWire {
            cache: PromptCache::FiveMinutes,
            shared_messages: 1,
        };
        let p = Params {
            max_tokens: Some(200),
            temperature: Some(0.3),
            stop: Some(crate::chat::Stop::One("END".into())),
            user: Some("u1".into()),
            ..Params::default()
        };
        let v = body(
            &wire,
            &[msg(Role::System, "rules"), msg(Role::User, "row 1")],
            &p,
        );
        assert_eq!(
            v["system"],
            json!([{"type": "text", "text": "rules", "cache_control": {"type": "ephemeral"}}])
        );
        assert_eq!(
            v["messages"],
            json!([{"role": "user", "content": [{"type": "text", "text": "row 1"}]}])
        );
        assert_eq!(v["max_tokens"], 200);
        assert_eq!(v["stop_sequences"], json!(["END"]));
        assert_eq!(v["metadata"], json!({"user_id": "u1"}));
        assert!(v.get("stream").is_none() && v.get("tools").is_none());

        let hour = AnthropicWire {
            cache: PromptCache::OneHour,
            shared_messages: 1,
        };
        let v = body(
            &hour,
            &[msg(Role::System, "rules"), msg(Role::User, "x")],
            &p,
        );
        assert_eq!(v["system"][0]["cache_control"]["ttl"], "1h");
        let off = AnthropicWire {
            cache: PromptCache::Off,
            shared_messages: 1,
        };
        let v = body(
            &off,
            &[msg(Role::System, "rules"), msg(Role::User, "x")],
            &p,
        );
        assert!(v["system"][0].get("cache_control").is_none());
    }

    #[test]
    fn a_schema_is_a_forced_tool_and_its_input_is_the_text() {
        let wire = AnthropicWire {
            cache: PromptCache::Off,
            shared_messages: 0,
        };
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let p = Params {
            max_tokens: Some(10),
            response_format: Some(
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
            ),
            ..Params::default()
        };
        let v = body(&wire, &[msg(Role::User, "x")], &p);
        assert_eq!(v["tools"][0]["input_schema"], schema);
        assert_eq!(
            v["tool_choice"],
            json!({"type": "tool", "name": SCHEMA_TOOL})
        );
        let c = parse_message(
            br#"{"model":"claude-x","content":[{"type":"tool_use","id":"t","name":"record","input":{"a":"b"}}],
                "stop_reason":"tool_use","usage":{"input_tokens":5,"output_tokens":3}}"#,
        )
        .unwrap();
        assert_eq!(c.text, r#"{"a":"b"}"#);
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn images_become_base64_or_url_sources() {
        let parts = Content::Parts(vec![
            Part::Text {
                text: "look".into(),
            },
            Part::ImageUrl {
                image_url: crate::chat::ImageUrl {
                    url: "data:image/png;base64,AAAA".into(),
                    detail: None,
                    size: None,
                },
            },
            Part::ImageUrl {
                image_url: crate::chat::ImageUrl {
                    url: "https://x/y.jpg".into(),
                    detail: None,
                    size: None,
                },
            },
        ]);
        let b = blocks(&parts);
        assert_eq!(
            b[1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
        );
        assert_eq!(
            b[2]["source"],
            json!({"type": "url", "url": "https://x/y.jpg"})
        );
    }

    #[test]
    fn usage_counts_cache_reads_and_writes_inside_the_prompt() {
        let c = parse_message(
            br#"{"model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}],
                "stop_reason":"max_tokens","usage":{"input_tokens":10,"output_tokens":4,
                "cache_creation_input_tokens":2000,"cache_read_input_tokens":300,
                "cache_creation":{"ephemeral_5m_input_tokens":1500,"ephemeral_1h_input_tokens":500}}}"#,
        )
        .unwrap();
        assert_eq!(c.text, "ab");
        assert_eq!(c.finish_reason.as_deref(), Some("length"));
        let u = c.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (2310, 4, 2314)
        );
        assert_eq!(
            (
                u.cached_tokens,
                u.cache_write_tokens,
                u.cache_write_1h_tokens
            ),
            (Some(300), Some(2000), Some(500))
        );
        let r = parse_message(br#"{"content":[],"stop_reason":"refusal"}"#).unwrap();
        assert!(r.refusal.is_some());
        assert_eq!(
            parse_message(b"{\"content\": [tr").unwrap_err().kind,
            ErrorKind::InvalidResponse
        );
    }

    #[test]
    fn a_stream_is_assembled_from_its_events_and_an_error_event_is_retried() {
        let events = [
            r#"event: message_start"#,
            r#"data: {"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":7,"cache_read_input_tokens":3,"output_tokens":1}}}"#,
            "",
            r#"data: {"type":"ping"}"#,
            r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}"#,
            r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}"#,
            r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}"#,
        ];
        let mut acc = StreamAcc::default();
        for e in events {
            assert!(!acc.line(e.as_bytes(), None).unwrap());
        }
        assert!(acc.line(br#"data: {"type":"message_stop"}"#, None).unwrap());
        let c = acc.finish(std::time::Instant::now());
        assert_eq!(c.text, "Hello");
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        let u = c.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (10, Some(3), 2)
        );
        let mut acc = StreamAcc::default();
        let e = acc
            .line(br#"data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#, None)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Server);
        assert!(e.maybe_billed && e.message.contains("overloaded_error"));
    }

    #[test]
    fn errors_follow_the_apis_table() {
        let e = |status: u16, etype: &str, msg: &str| {
            let body =
                json!({"type": "error", "error": {"type": etype, "message": msg}}).to_string();
            status_error(None, status, body.as_bytes()).kind
        };
        assert_eq!(
            e(400, "invalid_request_error", "max_tokens: Field required"),
            ErrorKind::BadRequest
        );
        assert_eq!(
            e(401, "authentication_error", "invalid x-api-key"),
            ErrorKind::Auth
        );
        assert_eq!(e(403, "permission_error", "no"), ErrorKind::Auth);
        assert_eq!(
            e(404, "not_found_error", "model: claude-x"),
            ErrorKind::BadRequest
        );
        assert_eq!(
            e(413, "request_too_large", "too big"),
            ErrorKind::BadRequest
        );
        assert_eq!(
            e(429, "rate_limit_error", "slow down"),
            ErrorKind::RateLimited
        );
        assert_eq!(e(500, "api_error", "oops"), ErrorKind::Server);
        assert_eq!(e(529, "overloaded_error", "Overloaded"), ErrorKind::Server);
        assert_eq!(
            e(
                400,
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API."
            ),
            ErrorKind::Quota
        );
        assert_eq!(status_error(None, 404, b"<html>").kind, ErrorKind::Endpoint);
        let key = ApiKey::new("sk-ant-secret-123".into());
        let s = status_error(Some(&key), 401, br#"{"type":"error","error":{"type":"authentication_error","message":"bad key sk-ant-secret-123"}}"#);
        assert!(!s.message.contains("sk-ant-secret-123"), "{}", s.message);
    }

    #[test]
    fn rate_limit_resets_are_rfc3339_times_bounded() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_767_225_600); // 2026-01-01T00:00:00Z
        let mut h = HeaderMap::new();
        h.insert("anthropic-ratelimit-requests-limit", "50".parse().unwrap());
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            "49".parse().unwrap(),
        );
        h.insert(
            "anthropic-ratelimit-requests-reset",
            "2026-01-01T00:00:02Z".parse().unwrap(),
        );
        h.insert(
            "anthropic-ratelimit-input-tokens-limit",
            "30000".parse().unwrap(),
        );
        h.insert(
            "anthropic-ratelimit-input-tokens-remaining",
            "29000".parse().unwrap(),
        );
        h.insert(
            "anthropic-ratelimit-input-tokens-reset",
            "2030-01-01T00:00:00Z".parse().unwrap(),
        );
        let rl = rate_limits(&h, now).unwrap();
        assert_eq!(
            (rl.limit_requests, rl.remaining_requests),
            (Some(50), Some(49))
        );
        assert_eq!(rl.reset_requests, Some(Duration::from_secs(2)));
        assert_eq!(
            (rl.limit_tokens, rl.remaining_tokens),
            (Some(30000), Some(29000))
        );
        assert_eq!(rl.reset_tokens, Some(crate::provider::MAX_SERVER_WAIT));
        h.insert("anthropic-ratelimit-tokens-limit", "80000".parse().unwrap());
        h.insert(
            "anthropic-ratelimit-tokens-reset",
            "2025-01-01T00:00:00Z".parse().unwrap(),
        );
        let rl = rate_limits(&h, now).unwrap();
        assert_eq!(rl.limit_tokens, Some(80000));
        assert_eq!(rl.reset_tokens, Some(Duration::ZERO));
        assert_eq!(rate_limits(&HeaderMap::new(), now), None);
    }
}
