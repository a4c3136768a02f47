//! Google's Gemini API, `POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent?alt=sse`: its auth (`x-goog-api-key`; a wrong key is the API's 400
//! `API_KEY_INVALID`), its body (`contents` with `user`/`model` turns, `systemInstruction`,
//! `generationConfig` with `candidateCount`, `maxOutputTokens`, `stopSequences` and a
//! `responseJsonSchema`), its answer (candidates, `finishReason`, `usageMetadata`) and its
//! error shape (`{"error": {"code", "message", "status", "details"}}`, a 429 with
//! `google.rpc.RetryInfo`). The body is read as a chat request, so every `FAULT:` marker and
//! answer shape works here, and billing is counted in the same `Stats`. Implicit caching: a
//! `systemInstruction` of at least [`MIN_CACHED_TOKENS`] seen before is reported as
//! `cachedContentTokenCount`. `FAULT:blockprompt` answers a `promptFeedback.blockReason` with
//! no candidate; a `FAULT:refusal` choice ends with `finishReason: SAFETY`; `FAULT:quota` is a
//! 429 whose `QuotaFailure` names a daily quota. The Batch API is in `gemini_batch`.

use std::sync::atomic::Ordering;

use axum::body::Body;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::fault::FaultKind;
use crate::handler::{json_response, plan, sleep_ms, Answer, Outcome};
use crate::limiter::Decision;
use crate::{ConnKill, Shared};

/// The shortest system instruction the implicit cache takes, in the server's estimate.
pub const MIN_CACHED_TOKENS: u64 = 1024;

/// Gemini's error body; `retry` adds a `RetryInfo` with that delay.
pub(crate) fn error(status: u16, message: &str, retry: Option<&str>) -> Response<Body> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &error_body(status, message, retry))
}

pub(crate) fn error_body(status: u16, message: &str, retry: Option<&str>) -> Value {
    let details: Vec<Value> = retry
        .map(|d| json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": d}))
        .into_iter()
        .collect();
    json!({"error": {"code": status, "message": message, "status": status_name(status),
                     "details": details}})
}

/// The `google.rpc.Code` name the API gives each status.
fn status_name(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 | 529 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// The key check: none configured takes any; a wrong one is Google's 400 `API_KEY_INVALID`.
pub(crate) fn unauthorized(shared: &Shared, headers: &HeaderMap) -> Option<Response<Body>> {
    let want = shared.config.require_key.as_deref()?;
    let got = headers.get("x-goog-api-key").and_then(|v| v.to_str().ok());
    if got == Some(want) {
        return None;
    }
    shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
    let mut v = error_body(400, "API key not valid. Please pass a valid API key.", None);
    v["error"]["details"] = json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]);
    Some(json_response(StatusCode::BAD_REQUEST, &v))
}

/// `/v1beta/models/{model}:{method}` → (model, method).
pub(crate) fn model_method(path: &str) -> Option<(&str, &str)> {
    path.strip_prefix("/v1beta/models/")?.rsplit_once(':')
}

pub(crate) async fn generate(
    shared: &Shared,
    req: Request<Incoming>,
    model: &str,
    stream: bool,
) -> Response<Body> {
    shared.on_request();
    let (parts, body) = req.into_parts();
    let kill = parts.extensions.get::<ConnKill>().cloned();
    let counters = &shared.counters;
    let reject = |status: u16, message: &str| {
        counters.rejected.fetch_add(1, Ordering::Relaxed);
        error(status, message, None)
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
    if let Some(r) = unauthorized(shared, &parts.headers) {
        return r;
    }
    let body = match parsed {
        Ok(Value::Object(m)) => m,
        _ => return reject(400, "Invalid JSON payload received."),
    };
    let chat = match as_chat(model, &body) {
        Ok(c) => c,
        Err(msg) => return reject(400, &msg),
    };
    let p = match plan(shared, &chat, true) {
        Ok(p) => p,
        Err((msg, _)) => return reject(400, &msg),
    };
    if let Some(l) = shared.limiter.as_ref() {
        if let Decision::Limited { retry_after, .. } = l.check(p.request_tokens) {
            counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            let d = format!("{}s", retry_after.as_secs_f64().max(0.001));
            return error(
                429,
                "Resource has been exhausted (e.g. check quota).",
                Some(&d),
            );
        }
    }
    let answer = match p.outcome {
        Outcome::Answer(a) => a,
        Outcome::Fault(kind) => {
            counters.faults.fetch_add(1, Ordering::Relaxed);
            sleep_ms(shared.config.latency_ms).await;
            return fault(shared, &kind, kill.as_ref()).await;
        }
    };
    sleep_ms(shared.config.latency_ms + answer.extra_delay).await;
    let cached = implicit_cache(shared, &body);
    let v = response(&answer, p.model, cached, blocked(&chat));
    bill(shared, &answer, &v);
    counters.ok.fetch_add(1, Ordering::Relaxed);
    match (stream, answer.cut) {
        (true, cut) => sse(&v, cut),
        (false, true) => {
            let text = v.to_string();
            let half = text.len() / 2;
            Response::new(Body::from(text[..half].to_string()))
        }
        (false, false) => json_response(StatusCode::OK, &v),
    }
}

/// Bills what the answer's usage says (a blocked prompt: its prompt only).
pub(crate) fn bill(shared: &Shared, answer: &Answer, v: &Value) {
    if v.get("candidates").is_some() {
        answer.bill(shared);
    } else {
        let p = v["usageMetadata"]["promptTokenCount"].as_u64().unwrap_or(0);
        shared
            .counters
            .billed_prompt_tokens
            .fetch_add(p, Ordering::Relaxed);
    }
}

/// `FAULT:blockprompt` in the request: the prompt is blocked before any candidate.
pub(crate) fn blocked(chat: &Value) -> bool {
    chat["messages"].as_array().into_iter().flatten().any(|m| {
        m["content"]
            .as_str()
            .unwrap_or_default()
            .contains("FAULT:blockprompt")
    })
}

/// The cached prefix's tokens: a system instruction long enough, seen before.
pub(crate) fn implicit_cache(shared: &Shared, body: &Map<String, Value>) -> u64 {
    use std::hash::{Hash, Hasher};
    let text = body
        .get("systemInstruction")
        .map(parts_text)
        .unwrap_or_default();
    let tokens = (text.chars().count().div_ceil(4) as u64) + 3;
    if text.is_empty() || tokens < MIN_CACHED_TOKENS {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ("gemini", &text).hash(&mut h);
    if shared.prompt_cache.lock().unwrap().insert(h.finish()) {
        0
    } else {
        tokens
    }
}

/// The text of a `Content` (`{"parts": [{"text"}]}`), parts joined by a newline.
fn parts_text(content: &Value) -> String {
    content["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The generateContent body as a chat body: the system instruction first, `model` turns as
/// `assistant`, `generationConfig` as the chat fields.
pub(crate) fn as_chat(model: &str, body: &Map<String, Value>) -> Result<Value, String> {
    let Some(Value::Array(contents)) = body.get("contents") else {
        return Err("* GenerateContentRequest.contents: contents is not specified".into());
    };
    let mut out = Vec::new();
    if let Some(s) = body.get("systemInstruction") {
        out.push(json!({"role": "system", "content": parts_text(s)}));
    }
    for (i, c) in contents.iter().enumerate() {
        let role = match c["role"].as_str().unwrap_or("user") {
            "user" => "user",
            "model" => "assistant",
            r => {
                return Err(format!(
                    "contents[{i}].role: Please use a valid role: user, model (got {r})"
                ))
            }
        };
        out.push(json!({"role": role, "content": parts_text(c)}));
    }
    let g = body.get("generationConfig").cloned().unwrap_or(json!({}));
    let mut chat = json!({"model": model, "messages": out});
    for (from, to) in [
        ("maxOutputTokens", "max_tokens"),
        ("candidateCount", "n"),
        ("temperature", "temperature"),
        ("topP", "top_p"),
        ("stopSequences", "stop"),
    ] {
        if let Some(v) = g.get(from) {
            chat[to] = v.clone();
        }
    }
    let schema = g
        .get("responseJsonSchema")
        .or_else(|| g.get("responseSchema"));
    match (g.get("responseMimeType").and_then(Value::as_str), schema) {
        (Some("application/json"), Some(s)) => {
            chat["response_format"] = json!({"type": "json_schema", "json_schema": {
                "name": "response", "strict": true, "schema": s}});
        }
        (Some("application/json"), None) => {
            chat["response_format"] = json!({"type": "json_object"})
        }
        _ => {}
    }
    Ok(chat)
}

/// The GenerateContentResponse of an answer: one candidate per choice (a refused one ends
/// with `SAFETY` and no content), usage with the cached prefix and the thoughts apart.
pub(crate) fn response(a: &Answer, model: &str, cached: u64, blocked: bool) -> Value {
    let (p, c, cached_marker, reasoning) = a.usage;
    let cached = if cached_marker > 0 {
        cached_marker
    } else {
        cached.min(p)
    };
    let mut usage = json!({"promptTokenCount": p, "candidatesTokenCount": c - reasoning.min(c),
                           "totalTokenCount": p + c});
    if cached > 0 {
        usage["cachedContentTokenCount"] = cached.into();
    }
    if reasoning > 0 {
        usage["thoughtsTokenCount"] = reasoning.into();
    }
    if blocked {
        return json!({"promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": p, "totalTokenCount": p}, "modelVersion": model});
    }
    let candidates: Vec<Value> = a
        .choices
        .iter()
        .enumerate()
        .map(|(i, ch)| match (ch.refusal, &ch.content) {
            (Some(_), _) | (None, None) => json!({"finishReason": "SAFETY", "index": i,
                "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                                   "probability": "HIGH", "blocked": true}]}),
            (None, Some(text)) => json!({
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": if ch.finish == "length" { "MAX_TOKENS" } else { "STOP" },
                "index": i,
            }),
        })
        .collect();
    let mut v = json!({"candidates": candidates, "usageMetadata": usage, "modelVersion": model,
                       "responseId": "fake-response"});
    if a.omit_usage {
        v.as_object_mut().unwrap().remove("usageMetadata");
    }
    v
}

/// The answer as streamed chunks: each candidate's text in pieces of eight characters, the
/// last chunk with the finish reasons and the usage. `cut`: half the pieces, then the end
/// of the body with no finish reason.
fn sse(v: &Value, cut: bool) -> Response<Body> {
    let chunk = |d: Value| Bytes::from(format!("data: {d}\r\n\r\n"));
    let mut chunks = Vec::new();
    let cands = v["candidates"].as_array().cloned().unwrap_or_default();
    for (i, c) in cands.iter().enumerate() {
        let text = c
            .pointer("/content/parts/0/text")
            .and_then(Value::as_str)
            .unwrap_or("");
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(8) {
            let piece: String = piece.iter().collect();
            chunks.push(chunk(json!({"candidates": [{"content": {"role": "model",
                "parts": [{"text": piece}]}, "index": i}], "modelVersion": v["modelVersion"]})));
        }
    }
    if cut {
        chunks.truncate(chunks.len().div_ceil(2));
    } else {
        let ends: Vec<Value> = cands
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({"content": {"role": "model", "parts": [{"text": ""}]},
                                 "finishReason": c["finishReason"], "index": i})
            })
            .collect();
        let mut last = json!({"candidates": ends, "modelVersion": v["modelVersion"]});
        if let Some(u) = v.get("usageMetadata") {
            last["usageMetadata"] = u.clone();
        }
        if let Some(f) = v.get("promptFeedback") {
            last = json!({"promptFeedback": f, "usageMetadata": v["usageMetadata"]});
        }
        chunks.push(chunk(last));
    }
    let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::convert::Infallible>));
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    r
}

/// An injected fault as Gemini answers it (a 429 with a one-second `RetryInfo`).
async fn fault(shared: &Shared, kind: &FaultKind, kill: Option<&ConnKill>) -> Response<Body> {
    match kind {
        FaultKind::Status(429) => error(
            429,
            "Resource has been exhausted (injected by FAULT:429).",
            Some("1s"),
        ),
        FaultKind::Status(503 | 529) | FaultKind::FlexUnavailable => error(
            503,
            "The model is overloaded. Please try again later.",
            None,
        ),
        &FaultKind::Status(s) => error(s, &format!("injected by FAULT:{s}"), None),
        FaultKind::Quota => {
            // A daily quota spent: the QuotaFailure names it, as the API does.
            let mut v = error_body(429, "You exceeded your current quota (FAULT:quota).", None);
            v["error"]["details"] = json!([{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                                "quotaId": "GenerateRequestsPerDayPerProjectPerModel"}]}]);
            json_response(StatusCode::TOO_MANY_REQUESTS, &v)
        }
        FaultKind::Reset | FaultKind::Hang => {
            if *kind == FaultKind::Hang {
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
        FaultKind::BadJson => Response::new(Body::from("{\"candidates\": [tr")),
        _ => json_response(StatusCode::OK, &json!({})),
    }
}

/// A batch line's answer (`gemini_batch`): the same logic without latency, limits or
/// connection faults; `(status, response or error)`.
pub(crate) fn answer_line(shared: &Shared, model: &str, request: &Value) -> (u16, Value) {
    let Some(body) = request.as_object() else {
        return (400, error_body(400, "request: not an object", None));
    };
    let chat = match as_chat(model, body) {
        Ok(c) => c,
        Err(m) => return (400, error_body(400, &m, None)),
    };
    let p = match plan(shared, &chat, false) {
        Ok(p) => p,
        Err((m, _)) => return (400, error_body(400, &m, None)),
    };
    match p.outcome {
        Outcome::Answer(a) if !a.cut => {
            let v = response(&a, p.model, implicit_cache(shared, body), blocked(&chat));
            bill(shared, &a, &v);
            (200, v)
        }
        Outcome::Fault(FaultKind::Status(s)) if s < 500 && s != 429 => {
            (s, error_body(s, &format!("injected by FAULT:{s}"), None))
        }
        _ => (500, error_body(500, "Internal error encountered.", None)),
    }
}
