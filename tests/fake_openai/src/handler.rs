//! Routing and the chat completions endpoint: auth, validation, rate limits, faults, answers.

use std::borrow::Cow;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::fault::{find_marker, FaultKind};
use crate::limiter::{fmt_duration, Decision, LimitKind, Snapshot};
use crate::{ConnKill, Shared};

const MAX_BODY: usize = 64 * 1024 * 1024;

pub(crate) async fn route(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let resp = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/chat/completions" | "/chat/completions") => chat(&shared, req).await,
        (&Method::POST, p) if crate::azure::chat_deployment(p).is_some() => {
            crate::azure::chat(&shared, req).await
        }
        (&Method::GET, "/v1/models" | "/models") => models(&shared),
        (&Method::GET, "/stats") => json_response(StatusCode::OK, &shared.stats().to_json()),
        (_, p) if crate::batch::is_batch_path(p) => crate::batch::route(&shared, req).await,
        (m, p) => {
            let msg = format!("Invalid URL ({m} {p})");
            error_response(
                StatusCode::NOT_FOUND,
                &msg,
                "invalid_request_error",
                None,
                None,
            )
        }
    };
    Ok(resp)
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Body::from(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn error_body(
    message: &str,
    typ: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Value {
    json!({"error": {"message": message, "type": typ, "param": param, "code": code}})
}

pub(crate) fn error_response(
    status: StatusCode,
    message: &str,
    typ: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response<Body> {
    json_response(status, &error_body(message, typ, param, code))
}

fn set_header(r: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

fn models(shared: &Shared) -> Response<Body> {
    let mut ids = vec!["gpt-4o-mini", "gpt-4o", "fake-model"];
    if let Some(m) = shared.config.model.as_deref() {
        ids.insert(0, m);
    }
    let data: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1700000000, "owned_by": "fake_openai"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// Mask a key the way OpenAI does, never echoing it whole.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "sk-***".into();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

pub(crate) fn invalid_key_response(headers: &HeaderMap) -> Response<Body> {
    let msg = match bearer(headers) {
        Some(k) if !k.is_empty() => format!(
            "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
            mask_key(k)
        ),
        _ => "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
    };
    error_response(
        StatusCode::UNAUTHORIZED,
        &msg,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    )
}

/// The text of a message's content: a string, or the `text` parts of an array joined by a
/// space (image parts are not text).
pub(crate) fn content_text(content: Option<&Value>) -> Cow<'_, str> {
    match content {
        Some(Value::String(s)) => Cow::Borrowed(s),
        Some(Value::Array(parts)) => Cow::Owned(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => Cow::Borrowed(""),
    }
}

fn ceil4(n: usize) -> u64 {
    n.div_ceil(4) as u64
}

/// The validated parts of a chat request the server needs.
struct ChatReq<'a> {
    model: &'a str,
    messages: &'a [Value],
    max_tokens: Option<u64>,
    stream: bool,
    include_usage: bool,
}

fn validate(body: &Value) -> Result<ChatReq<'_>, (String, &'static str)> {
    let obj = body.as_object().ok_or_else(|| {
        (
            "The request body must be a JSON object.".to_string(),
            "messages",
        )
    })?;
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.as_str(),
        Some(_) => return Err(("'model' must be a string.".into(), "model")),
        None => return Err(("you must provide a model parameter".into(), "model")),
    };
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m.as_slice(),
        Some(Value::Array(_)) => return Err(("[] is too short - 'messages'".into(), "messages")),
        Some(_) => return Err(("'messages' must be an array.".into(), "messages")),
        None => return Err(("Missing required parameter: 'messages'.".into(), "messages")),
    };
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let Some(role) = role else {
            return Err((
                format!("Missing required parameter: 'messages[{i}].role'."),
                "messages",
            ));
        };
        match m.get("content") {
            Some(Value::String(_) | Value::Array(_) | Value::Null) => {}
            None if role == "assistant" => {}
            None => {
                return Err((
                    format!("Missing required parameter: 'messages[{i}].content'."),
                    "messages",
                ))
            }
            Some(_) => {
                return Err((
                    format!(
                        "Invalid type for 'messages[{i}].content': expected a string or an array."
                    ),
                    "messages",
                ))
            }
        }
        if let Some(n) = m.get("name") {
            if !n.is_string() {
                return Err((
                    format!("Invalid type for 'messages[{i}].name': expected a string."),
                    "messages",
                ));
            }
        }
    }
    let max_tokens = obj
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| obj.get("max_tokens").and_then(Value::as_u64));
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(ChatReq {
        model,
        messages,
        max_tokens,
        stream,
        include_usage,
    })
}

/// Headers every chat answer carries: request id plus rate-limit state if configured.
fn add_common_headers(
    r: &mut Response<Body>,
    shared: &Shared,
    req_id: &str,
    snap: Option<&Snapshot>,
) {
    set_header(r, "x-request-id", req_id);
    if let Some(l) = shared.limiter.as_ref() {
        let peeked;
        let snap = match snap {
            Some(s) => s,
            None => {
                peeked = l.peek();
                &peeked
            }
        };
        for (k, v) in l.headers(snap) {
            set_header(r, k, &v);
        }
    }
}

pub(crate) async fn chat(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let seq = shared.on_request();
    let req_id = format!("req_{seq:08}");
    let (parts, body) = req.into_parts();
    let kill = parts.extensions.get::<ConnKill>().cloned();
    let counters = &shared.counters;

    let bytes = match axum::body::to_bytes(Body::new(body), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            let mut r = error_response(
                StatusCode::BAD_REQUEST,
                "Could not read the request body.",
                "invalid_request_error",
                None,
                None,
            );
            add_common_headers(&mut r, shared, &req_id, None);
            return r;
        }
    };
    let parsed: Result<Value, _> = serde_json::from_slice(&bytes);
    if shared.config.record_bodies {
        let v = match &parsed {
            Ok(v) => v.clone(),
            Err(_) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        };
        shared.bodies.lock().unwrap().push(v);
    }

    // Auth first, like the real API: a bad key never reaches validation.
    if let Some(key) = shared.config.require_key.as_deref() {
        if bearer(&parts.headers) != Some(key) {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            let mut r = invalid_key_response(&parts.headers);
            add_common_headers(&mut r, shared, &req_id, None);
            return r;
        }
    }

    let body = match parsed {
        Ok(v) => v,
        Err(e) => {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            let msg = format!("We could not parse the JSON body of your request. ({e})");
            let mut r = error_response(
                StatusCode::BAD_REQUEST,
                &msg,
                "invalid_request_error",
                None,
                None,
            );
            add_common_headers(&mut r, shared, &req_id, None);
            return r;
        }
    };
    let plan = match plan(shared, &body, true) {
        Ok(p) => p,
        Err((msg, param)) => {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            let mut r = error_response(
                StatusCode::BAD_REQUEST,
                &msg,
                "invalid_request_error",
                Some(param),
                None,
            );
            add_common_headers(&mut r, shared, &req_id, None);
            return r;
        }
    };
    // An Azure deployment answers with its own name as the model.
    let deployment = parts.extensions.get::<crate::azure::Deployment>();
    let model = deployment.map_or(plan.model, |d| d.0.as_str());
    let answer = match plan.outcome {
        Outcome::Fault(kind) => {
            counters.faults.fetch_add(1, Ordering::Relaxed);
            if kind == FaultKind::Hang {
                // Counted now: the client gives up long before the hang ends, and a real API
                // charges the generation all the same.
                counters.billed_unanswered.fetch_add(1, Ordering::Relaxed);
            }
            sleep_ms(shared.config.latency_ms).await;
            let mut r = match fault_response(&kind, model, &parts.headers, kill.as_ref()).await {
                Some(r) => r,
                // Connection already dropped by the connection task; this is never sent.
                None => return Response::new(Body::empty()),
            };
            add_common_headers(&mut r, shared, &req_id, None);
            return r;
        }
        Outcome::Answer(a) => a,
    };

    // Admission on arrival, before the latency sleep, like a real API's counter.
    let request_tokens = plan.request_tokens;
    let mut snapshot = None;
    if let Some(l) = shared.limiter.as_ref() {
        match l.check(request_tokens) {
            Decision::Admitted(s) => snapshot = Some(s),
            Decision::Limited {
                kind,
                used_per_min,
                requested,
                retry_after,
                snapshot,
            } => {
                counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                let (what, abbr, typ, limit) = match kind {
                    LimitKind::Requests => ("requests", "RPM", "requests", l.rpm.unwrap_or(0)),
                    LimitKind::Tokens => ("tokens", "TPM", "tokens", l.tpm.unwrap_or(0)),
                };
                let wait = retry_after.max(Duration::from_millis(1));
                let msg = format!(
                    "Rate limit reached for {model} in organization org-fake on {what} per min ({abbr}): Limit {limit}, Used {used_per_min}, Requested {requested}. Please try again in {}. Visit https://platform.openai.com/account/rate-limits to learn more.",
                    fmt_duration(wait)
                );
                let mut r = error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    &msg,
                    typ,
                    None,
                    Some("rate_limit_exceeded"),
                );
                set_retry_after(&mut r, wait);
                add_common_headers(&mut r, shared, &req_id, Some(&snapshot));
                return r;
            }
        }
    }
    counters
        .tokens_admitted
        .fetch_add(request_tokens, Ordering::Relaxed);

    sleep_ms(shared.config.latency_ms + answer.extra_delay).await;

    // Billed whether or not the client will see the usage (nousage, cut).
    answer.bill(shared);
    let id = format!(
        "chatcmpl-{}",
        shared.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = unix_now();

    let cut = answer.cut;
    let mut r = if plan.stream {
        stream_response(
            &id,
            created,
            model,
            &answer.text,
            answer.finish,
            (plan.include_usage && !answer.omit_usage).then(|| answer.usage_json()),
            cut,
        )
    } else {
        let v = answer.completion(&id, created, model);
        if cut {
            cut_json_response(&v)
        } else {
            json_response(StatusCode::OK, &v)
        }
    };
    if cut {
        counters.faults.fetch_add(1, Ordering::Relaxed);
    } else {
        counters.ok.fetch_add(1, Ordering::Relaxed);
    }
    add_common_headers(&mut r, shared, &req_id, snapshot.as_ref());
    r
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The deterministic part of a chat answer, decided from the request body alone: the one
/// logic `POST /v1/chat/completions` and batch lines (`batch.rs`) share. Latency, rate
/// limits and how the answer travels (stream, `cut`, `reset`, `hang`) are the caller's.
pub(crate) struct Plan<'a> {
    /// The model reported in the answer (`Config::model`, else the request's).
    pub model: &'a str,
    /// Prompt estimate plus `max_tokens` (or 16): what the rate limiter admits.
    pub request_tokens: u64,
    pub stream: bool,
    pub include_usage: bool,
    pub outcome: Outcome,
}

pub(crate) enum Outcome {
    /// An injected fault (a `FAULT:` marker or `fail_every`): no completion.
    Fault(FaultKind),
    /// A completion (possibly to be cut short or sent without usage).
    Answer(Answer),
}

pub(crate) struct Answer {
    pub text: String,
    pub finish: &'static str,
    /// prompt, completion, cached, reasoning tokens.
    pub usage: (u64, u64, u64, u64),
    /// `FAULT:nousage` or `Config::omit_usage`: the answer reports no usage.
    pub omit_usage: bool,
    /// `FAULT:cut`: the answer is to be cut short on the wire.
    pub cut: bool,
    /// `FAULT:slow=MS`.
    pub extra_delay: u64,
}

impl Answer {
    /// Add this answer's tokens to the billed sums.
    pub fn bill(&self, shared: &Shared) {
        let c = &shared.counters;
        c.billed_prompt_tokens
            .fetch_add(self.usage.0, Ordering::Relaxed);
        c.billed_completion_tokens
            .fetch_add(self.usage.1, Ordering::Relaxed);
    }

    pub fn usage_json(&self) -> Value {
        let (p, c, cached, reasoning) = self.usage;
        json!({
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        })
    }

    /// The non-streamed `chat.completion` object.
    pub fn completion(&self, id: &str, created: u64, model: &str) -> Value {
        let mut v = json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": self.finish,
                }],
                "usage": self.usage_json(),
                "system_fingerprint": "fp_fake",
        });
        if self.omit_usage {
            if let Some(o) = v.as_object_mut() {
                o.remove("usage");
            }
        }
        v
    }
}

/// Validate a chat body and decide its answer. `count_valid` makes the request count
/// toward `Config::fail_every` (chat requests do, batch lines don't). `FAULT:<kind>:<n>`
/// counters are shared by both, keyed by the exact messages.
pub(crate) fn plan<'a>(
    shared: &'a Shared,
    body: &'a Value,
    count_valid: bool,
) -> Result<Plan<'a>, (String, &'static str)> {
    let cr = validate(body)?;
    let counters = &shared.counters;

    // Prompt estimate and the marker, in one pass over the messages.
    let mut prompt_tokens = 3u64;
    let mut marker = None;
    let mut last_user: Cow<'_, str> = Cow::Borrowed("");
    for m in cr.messages {
        let text = content_text(m.get("content"));
        prompt_tokens += ceil4(text.chars().count()) + 3;
        if marker.is_none() && text.contains("FAULT:") {
            marker = find_marker(&text);
        }
        if m.get("role").and_then(Value::as_str) == Some("user") {
            last_user = text;
        }
    }

    // Decide whether an injected fault applies to this request.
    let mut fault = None;
    if count_valid {
        let valid_seq = counters.valid.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(n) = shared.config.fail_every {
            // checked_rem: None for n = 0 (disabled); avoids is_multiple_of (Rust 1.87+).
            if valid_seq.checked_rem(n) == Some(0) {
                fault = Some(FaultKind::Status(500));
            }
        }
    }
    let mut usage_override = None;
    let mut extra_delay = 0;
    let mut omit_usage = shared.config.omit_usage;
    let mut cut = false;
    if let (None, Some(mk)) = (&fault, marker) {
        let applies = match mk.times {
            None => true,
            Some(n) => {
                // Keyed by the exact messages, so retries of one row share a counter.
                let mut h = std::collections::hash_map::DefaultHasher::new();
                serde_json::to_string(cr.messages)
                    .unwrap_or_default()
                    .hash(&mut h);
                let mut hits = shared.fault_hits.lock().unwrap();
                let c = hits.entry(h.finish()).or_insert(0);
                *c += 1;
                *c <= n
            }
        };
        if applies {
            match mk.kind {
                FaultKind::Usage(p, c, cached, reasoning) => {
                    usage_override = Some((p, c, cached, reasoning))
                }
                FaultKind::Slow(ms) => extra_delay = ms,
                FaultKind::NoUsage => omit_usage = true,
                FaultKind::Cut => cut = true,
                k => fault = Some(k),
            }
        }
    }

    let model = shared.config.model.as_deref().unwrap_or(cr.model);
    let request_tokens = prompt_tokens + cr.max_tokens.unwrap_or(16);
    let outcome = match fault {
        Some(kind) => Outcome::Fault(kind),
        None => {
            // The deterministic answer.
            let mut text = String::with_capacity(6 + last_user.len());
            text.push_str("echo: ");
            text.push_str(&last_user);
            let mut finish = "stop";
            if let Some(mt) = cr.max_tokens {
                let limit = (mt as usize).saturating_mul(4);
                if let Some((idx, _)) = text.char_indices().nth(limit) {
                    text.truncate(idx);
                    finish = "length";
                }
            }
            let usage =
                usage_override.unwrap_or((prompt_tokens, ceil4(text.chars().count()), 0, 0));
            Outcome::Answer(Answer {
                text,
                finish,
                usage,
                omit_usage,
                cut,
                extra_delay,
            })
        }
    };
    Ok(Plan {
        model,
        request_tokens,
        stream: cr.stream,
        include_usage: cr.include_usage,
        outcome,
    })
}

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// `retry-after-ms` exact, `retry-after` whole seconds rounded up.
fn set_retry_after(r: &mut Response<Body>, wait: Duration) {
    let ms = wait.as_millis().max(1) as u64;
    set_header(r, "retry-after-ms", &ms.to_string());
    set_header(r, "retry-after", &ms.div_ceil(1000).to_string());
}

/// A 200 whose JSON body stops halfway, then the connection drops: the body stream fails, so
/// hyper aborts the connection instead of ending the message.
fn cut_json_response(v: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let half = Bytes::from(bytes[..bytes.len() / 2].to_vec());
    let frames = futures::stream::iter([Ok(half)]).chain(futures::stream::once(async {
        // Without the pause hyper meets the error before flushing, and the client would
        // get no answer at all, as with `reset`.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Err(std::io::Error::other("FAULT:cut: connection dropped"))
    }));
    let mut r = Response::new(Body::from_stream(frames));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// SSE answer: a role chunk, content pieces of 4 chars (the last with finish_reason), an
/// optional usage chunk, then `[DONE]`. Each event is its own body frame.
///
/// `cut` stops after the first half of the content pieces: no finish_reason, no usage, no
/// `[DONE]`. The body ends cleanly and `Connection: close` ends the connection, so the client
/// sees a well-formed HTTP answer whose stream simply stops, as when a proxy drops it.
fn stream_response(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: &str,
    usage: Option<Value>,
    cut: bool,
) -> Response<Body> {
    let with_usage = usage.is_some();
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if with_usage {
            v["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {v}\n\n"))
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    let chars: Vec<char> = text.chars().collect();
    let pieces: Vec<String> = chars.chunks(4).map(|c| c.iter().collect()).collect();
    if cut {
        for p in &pieces[..pieces.len().div_ceil(2)] {
            events.push(chunk(json!({"content": p}), None));
        }
    } else {
        if pieces.is_empty() {
            events.push(chunk(json!({}), Some(finish)));
        }
        for (i, p) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            events.push(chunk(json!({"content": p}), last.then_some(finish)));
        }
        if let Some(u) = usage {
            let v = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": u,
            });
            events.push(Bytes::from(format!("data: {v}\n\n")));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    let stream = futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if cut {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The response for an injected fault; None for `reset` (the connection is gone).
pub(crate) async fn fault_response(
    kind: &FaultKind,
    model: &str,
    headers: &HeaderMap,
    kill: Option<&ConnKill>,
) -> Option<Response<Body>> {
    let r = match kind {
        FaultKind::Status(500) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request.",
            "server_error",
            None,
            None,
        ),
        FaultKind::Status(503) => {
            let mut r = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "The engine is currently overloaded, please try again later.",
                "server_error",
                None,
                None,
            );
            set_header(&mut r, "retry-after", "1");
            set_header(&mut r, "retry-after-ms", "50");
            r
        }
        FaultKind::Status(429) => {
            let mut r = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("Rate limit reached for {model} in organization org-fake on requests per min (RPM): Limit 1, Used 1, Requested 1. Please try again in 20ms."),
                "requests",
                None,
                Some("rate_limit_exceeded"),
            );
            set_retry_after(&mut r, Duration::from_millis(20));
            r
        }
        // Flex processing out of capacity: retry later; not billed, not a quota.
        FaultKind::FlexUnavailable => error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "Resource unavailable. Please try again later. (flex processing has no capacity for this request now)",
            "resource_unavailable",
            None,
            Some("resource_unavailable"),
        ),
        FaultKind::Quota => error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            None,
            Some("insufficient_quota"),
        ),
        FaultKind::Status(401) => invalid_key_response(headers),
        FaultKind::Status(403) => error_response(
            StatusCode::FORBIDDEN,
            "You are not allowed to use this API from your current country, region, or territory.",
            "invalid_request_error",
            None,
            Some("unsupported_country_region_territory"),
        ),
        FaultKind::Status(404) => error_response(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        ),
        FaultKind::Status(422) => error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Unprocessable entity: the request was well-formed but could not be processed (injected by FAULT:422).",
            "invalid_request_error",
            None,
            None,
        ),
        FaultKind::Status(_) => error_response(
            StatusCode::BAD_REQUEST,
            "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens. Please reduce the length of the messages. (injected by FAULT:400)",
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        FaultKind::Reset => {
            if let Some(k) = kill {
                // notify_one stores a permit, so the connection task wakes even if it
                // is not polling yet; then this request never completes.
                k.0.notify_one();
                std::future::pending::<()>().await;
            }
            return None;
        }
        FaultKind::Hang => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "Hung for 600 s (FAULT:hang).",
                "server_error",
                None,
                None,
            )
        }
        FaultKind::BadJson => {
            let mut r = Response::new(Body::from(r#"{"id": "x", "choices": ["#));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        FaultKind::Empty => json_response(
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-empty",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }),
        ),
        // Not faults: handled as normal answers by the caller.
        FaultKind::Usage(..) | FaultKind::Slow(_) | FaultKind::NoUsage | FaultKind::Cut => {
            unreachable!("usage/slow/nousage/cut are answers, not error responses")
        }
    };
    Some(r)
}
