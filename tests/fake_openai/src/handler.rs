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

use crate::fault::{find_marker, find_shapes, FaultKind, ShapeKind, ShapeMarker};
use crate::limiter::{fmt_duration, Decision, LimitKind, Snapshot};
use crate::shape::{
    break_schema, cut_chars, read_content, read_format, Content, Format, Gen, REFUSAL,
};
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
        (&Method::POST, "/v1/messages") => crate::anthropic::messages(&shared, req).await,
        (_, p) if p.starts_with("/v1/messages/batches") => {
            crate::anthropic_batch::route(&shared, req).await
        }
        (&Method::POST, p)
            if matches!(
                crate::gemini::model_method(p),
                Some((_, "generateContent" | "streamGenerateContent"))
            ) =>
        {
            let (model, method) = crate::gemini::model_method(p).unwrap();
            let (model, stream) = (model.to_string(), method == "streamGenerateContent");
            crate::gemini::generate(&shared, req, &model, stream).await
        }
        (_, p) if crate::gemini_batch::is_path(p) => crate::gemini_batch::route(&shared, req).await,
        (&Method::GET, "/v1/models" | "/models") => models(&shared),
        (&Method::GET, "/stats") => json_response(StatusCode::OK, &shared.stats().to_json()),
        (_, p) if crate::batch::is_batch_path(p) => crate::batch::route(&shared, req).await,
        (_, p) if crate::gcs::is_path(p) => crate::gcs::route(&shared, req).await,
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

/// The text of a message's content: a string, or the `text` parts of an array joined with
/// a space.
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
    /// Each message's content, read and checked (same order as `messages`).
    contents: Vec<Content>,
    max_tokens: Option<u64>,
    stream: bool,
    include_usage: bool,
    /// `n`: how many choices (1..=128).
    n: usize,
    format: Format<'a>,
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
    let mut contents = Vec::with_capacity(messages.len());
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
        contents.push(read_content(i, role, m.get("content")).map_err(|e| (e, "messages"))?);
    }
    let n = match obj.get("n") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(x)) => match (x.as_i64(), x.is_f64()) {
            (Some(v), false) if (1..=128).contains(&v) => v as usize,
            (Some(v), false) if v < 1 => {
                return Err((
                    format!("Invalid 'n': integer below minimum value. Expected a value >= 1, but got {v} instead."),
                    "n",
                ))
            }
            (_, false) => {
                return Err((
                    format!("Invalid 'n': integer above maximum value. Expected a value <= 128, but got {x} instead."),
                    "n",
                ))
            }
            (_, true) => {
                return Err((
                    "Invalid type for 'n': expected an integer, but got a decimal instead.".into(),
                    "n",
                ))
            }
        },
        Some(_) => {
            return Err((
                "Invalid type for 'n': expected an integer.".into(),
                "n",
            ))
        }
    };
    let format = read_format(obj.get("response_format"))?;
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
        contents,
        max_tokens,
        stream,
        include_usage,
        n,
        format,
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
            &answer.choices,
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
    /// One per requested choice (`n`), in index order.
    pub choices: Vec<Choice>,
    /// prompt, completion, cached, reasoning tokens.
    pub usage: (u64, u64, u64, u64),
    /// `FAULT:nousage` or `Config::omit_usage`: the answer reports no usage.
    pub omit_usage: bool,
    /// `FAULT:cut`: the answer is to be cut short on the wire.
    pub cut: bool,
    /// `FAULT:slow=MS`.
    pub extra_delay: u64,
}

/// One choice of an answer: either content or (for `FAULT:refusal`) a refusal.
pub(crate) struct Choice {
    pub content: Option<String>,
    pub refusal: Option<&'static str>,
    pub finish: &'static str,
}

impl Choice {
    /// What the choice says, content or refusal.
    fn said(&self) -> &str {
        self.content.as_deref().or(self.refusal).unwrap_or("")
    }
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
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.content, "refusal": c.refusal},
                    "logprobs": null,
                    "finish_reason": c.finish,
                })
            })
            .collect();
        let mut v = json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
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

/// A hash of the exact messages, keying `FAULT:<kind>:<n>` counters.
fn messages_hash(messages: &[Value], salt: Option<&str>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(s) = salt {
        s.hash(&mut h);
    }
    serde_json::to_string(messages)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// Whether a marker with `times` (`:n`) applies to this request; counts the request.
fn marker_applies(shared: &Shared, key: u64, times: Option<u64>) -> bool {
    match times {
        None => true,
        Some(n) => {
            let mut hits = shared.fault_hits.lock().unwrap();
            let c = hits.entry(key).or_insert(0);
            *c += 1;
            *c <= n
        }
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

    // Prompt estimate and the markers, in one pass over the messages. Images add a flat
    // figure each (see `shape::IMAGE_TOKENS_*`); their URLs are not counted as text.
    let mut prompt_tokens = 3u64;
    let mut marker = None;
    let mut shapes: Vec<ShapeMarker> = Vec::new();
    let mut last_user: Option<&Content> = None;
    for (m, content) in cr.messages.iter().zip(&cr.contents) {
        let text = &content.text;
        prompt_tokens += ceil4(text.chars().count()) + 3 + content.image_tokens();
        if text.contains("FAULT:") {
            if marker.is_none() {
                marker = find_marker(text);
            }
            find_shapes(text, &mut shapes);
        }
        if m.get("role").and_then(Value::as_str) == Some("user") {
            last_user = Some(content);
        }
    }
    let last_user = last_user.map(Content::echo).unwrap_or_default();

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
        // Keyed by the exact messages, so retries of one row share a counter.
        let applies = mk.times.is_none()
            || marker_applies(shared, messages_hash(cr.messages, None), mk.times);
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
    // Like OpenAI's limiter, n choices reserve n × max_tokens.
    let request_tokens = prompt_tokens + cr.max_tokens.unwrap_or(16) * cr.n as u64;
    let outcome = match fault {
        Some(kind) => Outcome::Fault(kind),
        None => {
            // Shape markers are counted only on requests that get an answer, each marker
            // with its own counter (so `FAULT:500:1 FAULT:refusal:1` refuses the retry).
            let mut active: Vec<(ShapeKind, Option<u32>)> = Vec::new();
            for s in &shapes {
                let key = messages_hash(cr.messages, Some(&s.token));
                if marker_applies(shared, key, s.times) {
                    active.push((s.kind, s.choice));
                }
            }
            let choices: Vec<Choice> = (0..cr.n)
                .map(|i| {
                    let has = |k: ShapeKind| {
                        active
                            .iter()
                            .any(|&(ak, c)| ak == k && c.is_none_or(|c| c as usize == i))
                    };
                    make_choice(&cr, &last_user, i, has)
                })
                .collect();
            let completion_tokens = choices
                .iter()
                .map(|c| ceil4(c.said().chars().count()))
                .sum();
            let usage = usage_override.unwrap_or((prompt_tokens, completion_tokens, 0, 0));
            Outcome::Answer(Answer {
                choices,
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

/// Choice `i` of the deterministic answer; `has` says which shape markers apply to it.
fn make_choice(cr: &ChatReq<'_>, user: &str, i: usize, has: impl Fn(ShapeKind) -> bool) -> Choice {
    if has(ShapeKind::Refusal) {
        return Choice {
            content: None,
            refusal: Some(REFUSAL),
            finish: "stop",
        };
    }
    let suffix = if i == 0 {
        String::new()
    } else {
        format!(" #{}", i + 1)
    };
    let mut text = match cr.format {
        Format::Text => {
            let mut t = String::with_capacity(6 + user.len() + suffix.len());
            t.push_str("echo: ");
            t.push_str(user);
            t.push_str(&suffix);
            if has(ShapeKind::Long) {
                let unit = t.clone();
                while t.chars().count() < 500 {
                    t.push(' ');
                    t.push_str(&unit);
                }
            }
            t
        }
        Format::JsonObject => {
            let doc = json!({"text": format!("echo: {user}{suffix}")});
            let doc = if has(ShapeKind::SchemaBreak) {
                // Valid JSON, but not the object json_object promises.
                Value::Array(vec![doc["text"].clone()])
            } else {
                doc
            };
            json_text(&doc, has(ShapeKind::BadJsonOut))
        }
        Format::JsonSchema { name, schema } => {
            let g = Gen::new(schema, user, i);
            let mut doc = g.value(schema, name, 0);
            if has(ShapeKind::SchemaBreak) {
                break_schema(&g, schema, &mut doc);
            }
            json_text(&doc, has(ShapeKind::BadJsonOut))
        }
    };
    let mut finish = "stop";
    if let Some(mt) = cr.max_tokens {
        let limit = (mt as usize).saturating_mul(4);
        let keep = cut_chars(&text, limit).len();
        if keep < text.len() {
            text.truncate(keep);
            finish = "length";
        }
    }
    Choice {
        content: Some(text),
        refusal: None,
        finish,
    }
}

/// Compact JSON text; `bad` drops its last character (an object's closing `}`).
fn json_text(doc: &Value, bad: bool) -> String {
    let mut s = serde_json::to_string(doc).unwrap_or_default();
    if bad {
        s.pop();
    }
    s
}

pub(crate) async fn sleep_ms(ms: u64) {
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
/// With n > 1 choices the chunks carry each choice's `index` and are interleaved: the role
/// chunks of choices 0..n, then each choice's first piece in index order, then each one's
/// second piece, and so on; a choice whose pieces run out has ended with its own
/// finish_reason. The usage chunk (`choices: []`) comes after all of them. A refusal
/// streams as `delta.refusal` pieces.
///
/// `cut` stops after the first half of each choice's pieces: no finish_reason, no usage, no
/// `[DONE]`. The body ends cleanly and `Connection: close` ends the connection, so the client
/// sees a well-formed HTTP answer whose stream simply stops, as when a proxy drops it.
fn stream_response(
    id: &str,
    created: u64,
    model: &str,
    choices: &[Choice],
    usage: Option<Value>,
    cut: bool,
) -> Response<Body> {
    let with_usage = usage.is_some();
    let chunk = |index: usize, delta: Value, finish: Option<&str>| {
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if with_usage {
            v["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {v}\n\n"))
    };
    let mut events = Vec::new();
    // (delta key, pieces) per choice.
    let mut split = Vec::with_capacity(choices.len());
    for (i, c) in choices.iter().enumerate() {
        let (key, role) = match c.refusal {
            Some(_) => (
                "refusal",
                json!({"role": "assistant", "content": null, "refusal": ""}),
            ),
            None => ("content", json!({"role": "assistant", "content": ""})),
        };
        events.push(chunk(i, role, None));
        let chars: Vec<char> = c.said().chars().collect();
        let pieces: Vec<String> = chars.chunks(4).map(|c| c.iter().collect()).collect();
        split.push((key, pieces));
    }
    let rounds = split.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
    if cut {
        for r in 0..rounds {
            for (i, (key, pieces)) in split.iter().enumerate() {
                if r < pieces.len().div_ceil(2) {
                    events.push(chunk(i, json!({ *key: pieces[r] }), None));
                }
            }
        }
    } else {
        for (i, (_, pieces)) in split.iter().enumerate() {
            if pieces.is_empty() {
                events.push(chunk(i, json!({}), Some(choices[i].finish)));
            }
        }
        for r in 0..rounds {
            for (i, (key, pieces)) in split.iter().enumerate() {
                if let Some(p) = pieces.get(r) {
                    let last = r + 1 == pieces.len();
                    events.push(chunk(
                        i,
                        json!({ *key: p }),
                        last.then_some(choices[i].finish),
                    ));
                }
            }
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
