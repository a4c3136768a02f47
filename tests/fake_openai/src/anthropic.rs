//! Anthropic's Messages API, `POST /v1/messages`, answered whole (not streamed): its auth
//! (`x-api-key`, a required `anthropic-version`), its body (top-level `system`, a required
//! `max_tokens`, `stop_sequences`, content blocks), its answer (text blocks, `stop_reason`,
//! usage with the cache fields) and its error shapes. The body is read as a chat request, so
//! every `FAULT:` marker and answer shape works here as on the OpenAI route, and billing is
//! counted in the same `Stats`. A `cache_control` breakpoint is served by a prompt cache: the
//! text up to it, when at least [`MIN_CACHED_TOKENS`] long, is written the first time and read
//! every time after, and usage says which. `"stream": true` is answered as Anthropic's events. A `tool_choice` that forces a tool is answered with a
//! `tool_use` block whose input follows the tool's `input_schema` (structured outputs). The rpm/tpm limiter admits requests here as on the chat route, and
//! its state goes out as `anthropic-ratelimit-*` headers (a 429 `rate_limit_error` with
//! `retry-after` when it refuses). Message Batches are `anthropic_batch.rs`.

use std::sync::atomic::Ordering;

use axum::body::Body;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::fault::FaultKind;
use crate::handler::{json_response, plan, sleep_ms, Outcome};
use crate::limiter::Decision;
use crate::{ConnKill, Shared};

/// Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`.
pub(crate) fn error(status: u16, typ: &str, message: &str) -> Response<Body> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        code,
        &json!({"type": "error", "error": {"type": typ, "message": message}}),
    )
}

/// The error type the API documents for each status.
pub(crate) fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

pub(crate) async fn messages(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    shared.on_request();
    let (parts, body) = req.into_parts();
    let kill = parts.extensions.get::<ConnKill>().cloned();
    let counters = &shared.counters;
    let reject = |status: u16, message: &str| {
        counters.rejected.fetch_add(1, Ordering::Relaxed);
        error(status, error_type(status), message)
    };
    let Ok(bytes) = axum::body::to_bytes(Body::new(body), 64 * 1024 * 1024).await else {
        return reject(400, "Could not read the request body.");
    };
    let parsed: Result<Value, _> = serde_json::from_slice(&bytes);
    if shared.config.record_bodies {
        let v = parsed.as_ref().map_or_else(
            |_| Value::String(String::from_utf8_lossy(&bytes).into()),
            Clone::clone,
        );
        shared.bodies.lock().unwrap().push(v);
    }
    if let Some(key) = shared.config.require_key.as_deref() {
        if header(&parts.headers, "x-api-key") != Some(key) {
            return reject(401, "invalid x-api-key");
        }
    }
    if header(&parts.headers, "anthropic-version").is_none() {
        return reject(400, "anthropic-version: header is required");
    }
    let body = match parsed {
        Ok(Value::Object(m)) => m,
        Ok(_) => return reject(400, "The request body must be a JSON object."),
        Err(e) => return reject(400, &format!("The request body is not valid JSON: {e}")),
    };
    let chat = match as_chat(&body) {
        Ok(c) => c,
        Err(msg) => return reject(400, &msg),
    };
    let plan = match plan(shared, &chat, true) {
        Ok(p) => p,
        Err((msg, _)) => return reject(400, &msg),
    };
    let model = plan.model.to_string();
    // Admission on arrival, as on the chat route; the answer carries the limiter's headers.
    let mut limits = Vec::new();
    if let Some(l) = shared.limiter.as_ref() {
        match l.check(plan.request_tokens) {
            Decision::Admitted(snap) => limits = l.anthropic_headers(&snap),
            Decision::Limited {
                retry_after,
                snapshot,
                ..
            } => {
                counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                let mut r = error(
                    429,
                    "rate_limit_error",
                    "Number of request tokens has exceeded your per-minute rate limit.",
                );
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                r.headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
                add_headers(&mut r, l.anthropic_headers(&snapshot));
                return r;
            }
        }
    }
    let answer = match plan.outcome {
        Outcome::Answer(a) => a,
        Outcome::Fault(kind) => {
            counters.faults.fetch_add(1, Ordering::Relaxed);
            sleep_ms(shared.config.latency_ms).await;
            return fault(shared, &kind, kill.as_ref()).await;
        }
    };
    sleep_ms(shared.config.latency_ms + answer.extra_delay).await;
    answer.bill(shared);
    counters.ok.fetch_add(1, Ordering::Relaxed);
    let msg = message(shared, &body, &model, &answer);
    let mut r = if body.get("stream") == Some(&Value::Bool(true)) {
        stream(msg, answer.cut)
    } else {
        json_response(StatusCode::OK, &msg)
    };
    add_headers(&mut r, limits);
    r
}

/// The Message for an answer to `body`: its text (or the forced tool's input), stop reason,
/// and usage with the cache's reads and writes counted apart from the input, as Anthropic
/// does. Shared by the online route and Message Batches.
pub(crate) fn message(
    shared: &Shared,
    body: &Map<String, Value>,
    model: &str,
    answer: &crate::handler::Answer,
) -> Value {
    let forced_tool = forced_tool(body);
    let choice = &answer.choices[0];
    let (p, c, cached, _) = answer.usage;
    let mut stop_reason = match (choice.refusal, choice.finish) {
        (Some(_), _) => "refusal",
        (None, "length") => "max_tokens",
        _ => "end_turn",
    };
    let text = choice.content.as_deref().unwrap_or_default();
    let mut block = json!({"type": "text", "text": text});
    if let Some(name) = &forced_tool {
        // The schema-shaped answer as the tool's input; an answer that is not JSON (the
        // `badjsonout` shape) stays text, as a model that ignored the tool would answer.
        if let Ok(input @ Value::Object(_)) = serde_json::from_str::<Value>(text) {
            block = json!({"type": "tool_use", "id": "toolu_fake", "name": name, "input": input});
            stop_reason = "tool_use";
        }
    }
    let (written, read) = match cache_prefix(body) {
        Some((hash, tokens)) if tokens <= p && cached == 0 => {
            if shared.prompt_cache.lock().unwrap().insert(hash) {
                (tokens, 0)
            } else {
                (0, tokens)
            }
        }
        _ => (0, cached.min(p)),
    };
    let mut msg = json!({
        "id": format!("msg_fake{:08}", shared.next_id.fetch_add(1, Ordering::Relaxed)),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [block],
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {
            "input_tokens": p - written - read,
            "output_tokens": c,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            // The writes by lifetime: the breakpoint's `ttl` ("1h"), else five minutes.
            "cache_creation": if hour_ttl(body) {
                json!({"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": written})
            } else {
                json!({"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0})
            },
        },
    });
    if answer.omit_usage {
        msg.as_object_mut().unwrap().remove("usage");
    }
    msg
}

fn add_headers(r: &mut Response<Body>, headers: Vec<(String, String)>) {
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            v.parse(),
        ) {
            r.headers_mut().insert(k, v);
        }
    }
}

/// The message as Anthropic streams it: `message_start` (with the input usage), a `ping`, each
/// block's start, deltas of four characters (`text_delta`, or `input_json_delta` for a tool's
/// input) and stop, `message_delta` (stop reason, output usage) and `message_stop`. `cut`
/// (`FAULT:cut`): half the deltas, then an `error` event (`overloaded_error`), as the API
/// ends a stream it cannot finish.
fn stream(msg: Value, cut: bool) -> Response<Body> {
    let event = |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    let mut start = msg.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    if let Some(u) = start.get_mut("usage") {
        u["output_tokens"] = json!(1);
    }
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": start}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    let mut deltas = Vec::new();
    for (i, block) in msg["content"].as_array().into_iter().flatten().enumerate() {
        let (empty, text, kind, key) = if block["type"] == "tool_use" {
            let mut b = block.clone();
            b["input"] = json!({});
            (
                b,
                block["input"].to_string(),
                "input_json_delta",
                "partial_json",
            )
        } else {
            let text = block["text"].as_str().unwrap_or_default().to_string();
            (
                json!({"type": "text", "text": ""}),
                text,
                "text_delta",
                "text",
            )
        };
        deltas.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": empty}),
        ));
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(4) {
            let piece: String = piece.iter().collect();
            deltas.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i,
                       "delta": {"type": kind, key: piece}}),
            ));
        }
        deltas.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        ));
    }
    if cut {
        deltas.truncate(deltas.len().div_ceil(2));
        events.extend(deltas);
        events.push(event(
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ));
    } else {
        events.extend(deltas);
        let mut delta = json!({"type": "message_delta",
            "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": null}});
        if let Some(out) = msg.pointer("/usage/output_tokens") {
            delta["usage"] = json!({"output_tokens": out});
        }
        events.push(event("message_delta", delta));
        events.push(event("message_stop", json!({"type": "message_stop"})));
    }
    let stream = futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>));
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    r
}

/// The shortest prefix the cache takes, in the server's token estimate (Claude Sonnet's
/// minimum): a breakpoint on a shorter one is taken and nothing is cached, as the API does.
pub const MIN_CACHED_TOKENS: u64 = 1024;

/// The prompt up to the last `cache_control` breakpoint (system blocks, then every message's
/// blocks in order): its hash and its length in the server's estimate (four characters a
/// token, and three a message, as the chat route counts), when it is long enough to cache.
fn cache_prefix(body: &Map<String, Value>) -> Option<(u64, u64)> {
    use std::hash::{Hash, Hasher};
    let mut blocks: Vec<(&Value, bool)> = Vec::new(); // (block, starts a message)
    if let Some(Value::Array(sys)) = body.get("system") {
        blocks.extend(sys.iter().enumerate().map(|(i, b)| (b, i == 0)));
    }
    for m in body.get("messages").and_then(Value::as_array)? {
        if let Some(Value::Array(c)) = m.get("content") {
            blocks.extend(c.iter().enumerate().map(|(i, b)| (b, i == 0)));
        }
    }
    let last = blocks
        .iter()
        .rposition(|(b, _)| b.get("cache_control").is_some())?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let (mut chars, mut messages) = (0usize, 0u64);
    for (b, starts) in &blocks[..=last] {
        let text = b.get("text").and_then(Value::as_str).unwrap_or_default();
        text.hash(&mut h);
        chars += text.chars().count();
        messages += u64::from(*starts);
    }
    let tokens = (chars.div_ceil(4) as u64) + 3 * messages;
    (tokens >= MIN_CACHED_TOKENS).then(|| (h.finish(), tokens))
}

/// Whether any breakpoint asks for the 1-hour cache.
fn hour_ttl(body: &Map<String, Value>) -> bool {
    let system = body.get("system").and_then(Value::as_array);
    let messages = body.get("messages").and_then(Value::as_array);
    let contents = messages
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("content").and_then(Value::as_array));
    system
        .into_iter()
        .chain(contents)
        .flatten()
        .any(|b| b.pointer("/cache_control/ttl") == Some(&json!("1h")))
}

/// The tool a `tool_choice` of type `tool` forces, when the body declares it.
fn forced_tool(body: &Map<String, Value>) -> Option<String> {
    let choice = body.get("tool_choice")?;
    if choice.get("type").and_then(Value::as_str) != Some("tool") {
        return None;
    }
    let name = choice.get("name")?.as_str()?;
    body.get("tools")?
        .as_array()?
        .iter()
        .any(|t| t.get("name").and_then(Value::as_str) == Some(name))
        .then(|| name.to_string())
}

pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

/// The Messages body as a chat body: `system` first, content blocks as their text.
pub(crate) fn as_chat(body: &Map<String, Value>) -> Result<Value, String> {
    if !body.get("model").is_some_and(Value::is_string) {
        return Err("model: Field required".into());
    }
    if !body.get("max_tokens").is_some_and(Value::is_u64) {
        return Err("max_tokens: Field required".into());
    }
    let Some(Value::Array(msgs)) = body.get("messages") else {
        return Err("messages: Field required".into());
    };
    let mut out = Vec::new();
    match body.get("system") {
        None => {}
        Some(s) => out.push(json!({"role": "system", "content": text_of(s)?})),
    }
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "user" | "assistant") {
            return Err(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ));
        }
        let content = m
            .get("content")
            .ok_or(format!("messages.{i}.content: Field required"))?;
        out.push(json!({"role": role, "content": text_of(content)?}));
    }
    let mut chat = json!({
        "model": body["model"],
        "messages": out,
        "max_tokens": body["max_tokens"],
    });
    // A forced tool is a structured output: the tool's input schema shapes the answer.
    if let Some(name) = forced_tool(body) {
        let tool = body["tools"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["name"] == name.as_str()))
            .ok_or("tool_choice: the tool is not in `tools`")?;
        chat["response_format"] = json!({"type": "json_schema", "json_schema": {
            "name": name, "strict": true, "schema": tool["input_schema"]}});
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stop_sequences", "stop"),
    ] {
        if let Some(v) = body.get(from) {
            chat[to] = v.clone();
        }
    }
    Ok(chat)
}

/// A string, or the text of an array of content blocks (images count as nothing here).
fn text_of(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => Ok(blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n")),
        _ => Err("content: Input should be a valid string or a list of content blocks".into()),
    }
}

/// An injected fault as Anthropic answers it.
async fn fault(shared: &Shared, kind: &FaultKind, kill: Option<&ConnKill>) -> Response<Body> {
    match kind {
        FaultKind::Status(429) => {
            let mut r = error(
                429,
                "rate_limit_error",
                "Number of requests has exceeded your rate limit (injected by FAULT:429).",
            );
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
            r
        }
        // OpenAI's 503 is Anthropic's 529.
        FaultKind::Status(503 | 529) | FaultKind::FlexUnavailable => error(
            529,
            "overloaded_error",
            "Overloaded (injected by FAULT:529).",
        ),
        &FaultKind::Status(s) => error(s, error_type(s), &format!("injected by FAULT:{s}")),
        FaultKind::Quota => error(
            400,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API (injected by FAULT:quota).",
        ),
        FaultKind::Reset | FaultKind::Hang => {
            if *kind == FaultKind::Hang {
                // Charged though never answered, as on the OpenAI route.
                shared
                    .counters
                    .billed_unanswered
                    .fetch_add(1, Ordering::Relaxed);
            }
            if let (FaultKind::Reset, Some(k)) = (kind, kill) {
                k.0.notify_one();
            } else {
                tokio::time::sleep(std::time::Duration::from_secs(600)).await;
            }
            std::future::pending::<Response<Body>>().await
        }
        FaultKind::BadJson => {
            let mut r = Response::new(Body::from("{\"type\": \"message\", \"content\": [tr"));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        }
        _ => Response::new(Body::empty()),
    }
}
