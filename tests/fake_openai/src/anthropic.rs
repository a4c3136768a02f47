//! Anthropic's Messages API, `POST /v1/messages`, answered whole (not streamed): its auth
//! (`x-api-key`, a required `anthropic-version`), its body (top-level `system`, a required
//! `max_tokens`, `stop_sequences`, content blocks), its answer (text blocks, `stop_reason`,
//! usage with the cache fields) and its error shapes. The body is read as a chat request, so
//! every `FAULT:` marker and answer shape works here as on the OpenAI route, and billing is
//! counted in the same `Stats`. Not here yet (issue 18 adds them with the provider): the
//! streamed events, the rpm/tpm limiter and its `anthropic-ratelimit-*` headers, tool use and
//! Message Batches.

use std::sync::atomic::Ordering;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::fault::FaultKind;
use crate::handler::{json_response, plan, sleep_ms, Outcome};
use crate::{ConnKill, Shared};

/// Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`.
fn error(status: u16, typ: &str, message: &str) -> Response<Body> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        code,
        &json!({"type": "error", "error": {"type": typ, "message": message}}),
    )
}

/// The error type the API documents for each status.
fn error_type(status: u16) -> &'static str {
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
    let choice = &answer.choices[0];
    let (p, c, cached, _) = answer.usage;
    let stop_reason = match (choice.refusal, choice.finish) {
        (Some(_), _) => "refusal",
        (None, "length") => "max_tokens",
        _ => "end_turn",
    };
    let text = choice.content.as_deref().unwrap_or_default();
    let mut msg = json!({
        "id": format!("msg_fake{:08}", shared.next_id.fetch_add(1, Ordering::Relaxed)),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": null,
        // Anthropic counts cache reads apart from the input tokens.
        "usage": {
            "input_tokens": p - cached.min(p),
            "output_tokens": c,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
        },
    });
    if answer.omit_usage {
        msg.as_object_mut().unwrap().remove("usage");
    }
    json_response(StatusCode::OK, &msg)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

/// The Messages body as a chat body: `system` first, content blocks as their text.
fn as_chat(body: &Map<String, Value>) -> Result<Value, String> {
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
