//! OpenAI's Files and Batches endpoints, on a clock the test controls.
//!
//! Routes (each under both `/v1` and Azure's `/openai`; an `api-version` query is ignored):
//! `POST/GET /files`, `GET/DELETE /files/{id}`, `GET /files/{id}/content`,
//! `POST/GET /batches`, `GET /batches/{id}`, `POST /batches/{id}/cancel`; and the admin
//! routes `POST /_fake/batches/{advance,expire,complete}` (no auth, like `/stats`).
//!
//! A batch moves only when told to (`FakeServer::advance_batches` or the admin route), or,
//! with `Config::batch_auto_advance`, one step each time it is retrieved:
//! `validating` → `in_progress` (or `failed`) → `finalizing` once every line is answered →
//! `completed`; `cancelling` → `cancelled`. Lines are answered by the chat endpoint's own
//! logic (`handler::plan`), so a line's completion text and usage are the ones
//! `POST /v1/chat/completions` gives for the same body.

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use futures::FutureExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::fault::FaultKind;
use crate::handler::{
    bearer, content_text, error_body, error_response, fault_response, invalid_key_response,
    json_response, plan, unix_now, Outcome,
};
use crate::Shared;

/// Largest request body read on these routes (an upload); OpenAI's own file limit is 200 MB.
const MAX_UPLOAD: usize = 512 * 1024 * 1024;
/// Validation reports at most this many bad lines.
const MAX_ERRORS: usize = 100;
const EXPIRED_MSG: &str =
    "This request could not be executed before the completion window expired.";
const CANCELLED_MSG: &str = "This request was not executed because the batch was cancelled.";

/// Everything the Files and Batches endpoints keep, behind `Shared::batch`.
#[derive(Default)]
pub(crate) struct State {
    files: BTreeMap<u64, StoredFile>,
    batches: BTreeMap<u64, Batch>,
    last_file: u64,
    last_batch: u64,
    /// Input lines as executed, for `FakeServer::batch_requests` (if `record_bodies`).
    executed: Vec<Value>,
    /// Creates whose answer was dropped so far (`Config::batch_create_answers_lost`).
    creates_lost: u64,
    /// Creates refused with a 500 so far (`Config::batch_create_failures`).
    creates_failed: u64,
    /// Anthropic's Message Batches, moved by the same steps.
    pub(crate) messages: crate::anthropic_batch::Batches,
    /// Reads refused with a 500 so far (`Config::batch_read_failures`).
    reads_failed: u64,
}

struct StoredFile {
    n: u64,
    filename: String,
    purpose: String,
    created_at: u64,
    content: Bytes,
}

impl StoredFile {
    fn object(&self) -> Value {
        json!({
            "id": format!("file-{}", self.n),
            "object": "file",
            "bytes": self.content.len(),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    fn terminal(self) -> bool {
        matches!(
            self,
            Status::Failed | Status::Completed | Status::Expired | Status::Cancelled
        )
    }
}

/// One input line, known by its place in the input file (re-parsed when executed, so a
/// large file is not held twice as JSON values).
struct LineRef {
    custom_id: String,
    start: usize,
    end: usize,
}

/// Result lines in the order they were produced, as JSONL bytes plus where each ends.
#[derive(Default)]
struct Sink {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl Sink {
    fn push(&mut self, v: &Value) {
        serde_json::to_writer(&mut self.buf, v).expect("serialize a JSON value");
        self.ends.push(self.buf.len());
    }

    /// The lines in reverse order of production, so clients must map them by custom_id.
    fn reversed(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + self.ends.len());
        for i in (0..self.ends.len()).rev() {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            out.extend_from_slice(&self.buf[start..self.ends[i]]);
            out.push(b'\n');
        }
        out
    }
}

struct Batch {
    n: u64,
    endpoint: String,
    input_file_id: String,
    completion_window: String,
    metadata: Value,
    status: Status,
    /// The input file's content, taken when the batch was created.
    input: Bytes,
    /// Set by validation (or, for a batch stopped while validating, a lenient read).
    lines: Vec<LineRef>,
    /// Lines `[..processed]` have been answered.
    processed: usize,
    out: Sink,
    err: Sink,
    completed: u64,
    failed: u64,
    errors: Option<Vec<Value>>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    created_at: u64,
    in_progress_at: Option<u64>,
    finalizing_at: Option<u64>,
    completed_at: Option<u64>,
    failed_at: Option<u64>,
    expired_at: Option<u64>,
    cancelling_at: Option<u64>,
    cancelled_at: Option<u64>,
}

impl Batch {
    fn id(&self) -> String {
        format!("batch_{}", self.n)
    }

    fn object(&self) -> Value {
        let errors = self
            .errors
            .as_ref()
            .map(|e| json!({"object": "list", "data": e}));
        json!({
            "id": self.id(),
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.as_str(),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.created_at + 86_400,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.lines.len(),
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        })
    }
}

impl State {
    fn add_file(&mut self, filename: String, purpose: &str, content: Bytes) -> u64 {
        self.last_file += 1;
        let n = self.last_file;
        self.files.insert(
            n,
            StoredFile {
                n,
                filename,
                purpose: purpose.into(),
                created_at: unix_now(),
                content,
            },
        );
        n
    }

    fn file(&self, id: &str) -> Option<&StoredFile> {
        self.files.get(&parse_id(id, "file-")?)
    }

    pub(crate) fn files(&self) -> Vec<Value> {
        self.files.values().map(StoredFile::object).collect()
    }

    pub(crate) fn file_content(&self, id: &str) -> Option<Vec<u8>> {
        self.file(id).map(|f| f.content.to_vec())
    }

    pub(crate) fn batches(&self) -> Vec<Value> {
        self.batches.values().map(Batch::object).collect()
    }

    pub(crate) fn executed(&self) -> Vec<Value> {
        self.executed.clone()
    }

    /// One step of every batch that is not terminal.
    pub(crate) fn advance_all(&mut self, shared: &Shared) {
        let ns: Vec<u64> = self.batches.keys().copied().collect();
        for n in ns {
            self.step(shared, n);
        }
        self.messages.step_all(shared);
    }

    /// Step until every batch is terminal.
    pub(crate) fn complete_all(&mut self, shared: &Shared) {
        while self.batches.values().any(|b| !b.status.terminal()) || !self.messages.all_ended() {
            self.advance_all(shared);
        }
    }

    /// Whether this create is refused with a 500 (`Config::batch_create_failures`).
    pub(crate) fn refuse_create(&mut self, shared: &Shared) -> bool {
        let refuse = self.creates_failed < shared.config.batch_create_failures;
        self.creates_failed += u64::from(refuse);
        refuse
    }

    /// Whether this read is refused with a 500 (`Config::batch_read_failures`).
    pub(crate) fn refuse_read(&mut self, shared: &Shared) -> bool {
        let refuse = self.reads_failed < shared.config.batch_read_failures;
        self.reads_failed += u64::from(refuse);
        refuse
    }

    /// Whether this successful create's answer is lost (`Config::batch_create_answers_lost`).
    pub(crate) fn lose_answer(&mut self, shared: &Shared) -> bool {
        let lose = self.creates_lost < shared.config.batch_create_answers_lost;
        self.creates_lost += u64::from(lose);
        lose
    }

    /// Every `validating`, `in_progress` or `finalizing` batch expires now.
    pub(crate) fn expire_all(&mut self, shared: &Shared) {
        self.messages.expire_all();
        let ns: Vec<u64> = self
            .batches
            .values()
            .filter(|b| {
                matches!(
                    b.status,
                    Status::Validating | Status::InProgress | Status::Finalizing
                )
            })
            .map(|b| b.n)
            .collect();
        for n in ns {
            if let Some(b) = self.batches.get_mut(&n) {
                if b.status == Status::Validating {
                    b.lines = lenient_lines(&b.input);
                }
                b.status = Status::Expired;
                b.expired_at = Some(unix_now());
            }
            self.finish(shared, n, Some(("batch_expired", EXPIRED_MSG)));
        }
    }

    /// Move batch `n` one step.
    fn step(&mut self, shared: &Shared, n: u64) {
        let Some(b) = self.batches.get_mut(&n) else {
            return;
        };
        let now = unix_now();
        match b.status {
            Status::Validating => match validate(shared, &b.input, &b.endpoint) {
                Ok(lines) => {
                    b.lines = lines;
                    b.status = Status::InProgress;
                    b.in_progress_at = Some(now);
                }
                Err(errors) => {
                    b.errors = Some(errors);
                    b.status = Status::Failed;
                    b.failed_at = Some(now);
                    b.input = Bytes::new();
                }
            },
            Status::InProgress => {
                let max = shared.config.batch_lines_per_step.unwrap_or(usize::MAX);
                let record = shared.config.record_bodies.then_some(&mut self.executed);
                process(shared, b, max.max(1), record);
                if b.processed == b.lines.len() {
                    b.status = Status::Finalizing;
                    b.finalizing_at = Some(now);
                }
            }
            Status::Finalizing => {
                b.status = Status::Completed;
                b.completed_at = Some(now);
                self.finish(shared, n, None);
            }
            Status::Cancelling => {
                if b.in_progress_at.is_none() {
                    // Stopped before validation: every readable line is unanswered.
                    b.lines = lenient_lines(&b.input);
                }
                b.status = Status::Cancelled;
                b.cancelled_at = Some(now);
                self.finish(shared, n, Some(("batch_cancelled", CANCELLED_MSG)));
            }
            Status::Failed | Status::Completed | Status::Expired | Status::Cancelled => {}
        }
    }

    /// Write batch `n`'s output and error files; `unanswered` is the error every line not
    /// yet processed gets (None when every line was).
    fn finish(&mut self, shared: &Shared, n: u64, unanswered: Option<(&str, &str)>) {
        let Some(b) = self.batches.get_mut(&n) else {
            return;
        };
        if let Some((code, message)) = unanswered {
            for line in &b.lines[b.processed..] {
                let r = shared.next_id.fetch_add(1, Ordering::Relaxed);
                b.err.push(&json!({
                    "id": format!("batch_req_{r}"),
                    "custom_id": line.custom_id,
                    "response": null,
                    "error": {"code": code, "message": message},
                }));
            }
        }
        let out = std::mem::take(&mut b.out);
        let err = std::mem::take(&mut b.err);
        b.input = Bytes::new();
        let mut ids = (None, None);
        if !out.ends.is_empty() {
            ids.0 = Some(self.add_file(
                format!("batch_{n}_output.jsonl"),
                "batch_output",
                out.reversed().into(),
            ));
        }
        if !err.ends.is_empty() {
            ids.1 = Some(self.add_file(
                format!("batch_{n}_error.jsonl"),
                "batch_output",
                err.reversed().into(),
            ));
        }
        if let Some(b) = self.batches.get_mut(&n) {
            b.output_file_id = ids.0.map(|f| format!("file-{f}"));
            b.error_file_id = ids.1.map(|f| format!("file-{f}"));
        }
    }
}

fn parse_id(id: &str, prefix: &str) -> Option<u64> {
    id.strip_prefix(prefix)?.parse().ok()
}

fn line_error(line: Option<usize>, code: &str, message: String) -> Value {
    json!({"code": code, "message": message, "param": null, "line": line})
}

/// Physical lines of a JSONL file with their 1-based numbers and byte ranges; blank lines
/// are skipped (but keep their numbers).
fn jsonl_lines(input: &[u8]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let mut start = 0;
    let mut no = 0;
    std::iter::from_fn(move || loop {
        if start >= input.len() {
            return None;
        }
        no += 1;
        let end = memchr::memchr(b'\n', &input[start..])
            .map(|i| start + i)
            .unwrap_or(input.len());
        let (s, e) = (start, end);
        start = end + 1;
        if !input[s..e].iter().all(u8::is_ascii_whitespace) {
            return Some((no, s, e));
        }
    })
}

/// Check every line as OpenAI does before running a batch; Err holds each bad line's error
/// (at most `MAX_ERRORS`).
fn validate(shared: &Shared, input: &[u8], endpoint: &str) -> Result<Vec<LineRef>, Vec<Value>> {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut model: Option<String> = None;
    for (no, start, end) in jsonl_lines(input) {
        if errors.len() >= MAX_ERRORS {
            break;
        }
        match check_line(shared, &input[start..end], endpoint, &mut seen, &mut model) {
            Ok(custom_id) => lines.push(LineRef {
                custom_id,
                start,
                end,
            }),
            Err((code, msg)) => errors.push(line_error(Some(no), code, msg)),
        }
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(line_error(
            None,
            "empty_file",
            "The batch input file is empty. Please ensure that the batch contains at least one request.".into(),
        ));
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

fn check_line(
    shared: &Shared,
    raw: &[u8],
    endpoint: &str,
    seen: &mut HashSet<String>,
    model: &mut Option<String>,
) -> Result<String, (&'static str, String)> {
    let v: Value = serde_json::from_slice(raw).map_err(|_| {
        (
            "invalid_json_line",
            "This line is not parseable as valid JSON.".to_string(),
        )
    })?;
    if !v.is_object() {
        return Err((
            "invalid_request",
            "Each line must be a JSON object with 'custom_id', 'method', 'url' and 'body'.".into(),
        ));
    }
    let missing = |p: &str| {
        (
            "missing_required_parameter",
            format!("Missing required parameter: '{p}'."),
        )
    };
    let custom_id = match v.get("custom_id") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err((
                "invalid_type",
                "Invalid type for 'custom_id': expected a string.".into(),
            ))
        }
        None => return Err(missing("custom_id")),
    };
    match v.get("method").and_then(Value::as_str) {
        Some("POST") => {}
        Some(m) => {
            return Err((
                "invalid_method",
                format!(
                "The method '{m}' is not supported for batch requests. Only 'POST' is supported."
            ),
            ))
        }
        None => return Err(missing("method")),
    }
    match v.get("url").and_then(Value::as_str) {
        Some(u) if u == endpoint => {}
        Some(u) => {
            return Err((
                "invalid_url",
                format!("The URL '{u}' does not match the batch's endpoint '{endpoint}'. Every request in a batch must use the batch's endpoint."),
            ))
        }
        None => return Err(missing("url")),
    }
    let body = match v.get("body") {
        Some(b @ Value::Object(_)) => b,
        Some(_) => {
            return Err((
                "invalid_type",
                "Invalid type for 'body': expected an object.".into(),
            ))
        }
        None => return Err(missing("body")),
    };
    let m = match body.get("model") {
        Some(Value::String(m)) => m,
        _ => return Err(missing("body.model")),
    };
    match model {
        None => *model = Some(m.clone()),
        Some(first) if first != m => {
            return Err((
                "mismatched_model",
                format!("The model '{m}' of this request does not match the model '{first}' of the other requests in this file. A batch input file may contain requests for only one model."),
            ))
        }
        Some(_) => {}
    }
    if batch_invalid_marker(shared, body) {
        return Err((
            "invalid_request",
            "This request's body is invalid (injected by FAULT:batchinvalid).".into(),
        ));
    }
    if !seen.insert(custom_id.clone()) {
        return Err((
            "duplicate_custom_id",
            format!("The custom_id '{custom_id}' is a duplicate of another request's. The custom_id parameter must be unique for each request in a batch."),
        ));
    }
    Ok(custom_id)
}

/// Whether a `FAULT:batchinvalid[:n]` marker in the body's messages applies. `:n` fails the
/// first n validations of identical messages (counted with the chat markers' counters).
fn batch_invalid_marker(shared: &Shared, body: &Value) -> bool {
    let Some(msgs) = body.get("messages").and_then(Value::as_array) else {
        return false;
    };
    for m in msgs {
        let text = content_text(m.get("content"));
        let Some(times) = find_batch_invalid(&text) else {
            continue;
        };
        let Some(n) = times else {
            return true;
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        "FAULT:batchinvalid".hash(&mut h);
        serde_json::to_string(msgs).unwrap_or_default().hash(&mut h);
        let mut hits = shared.fault_hits.lock().unwrap();
        let c = hits.entry(h.finish()).or_insert(0);
        *c += 1;
        return *c <= n;
    }
    false
}

/// `Some(None)` for `FAULT:batchinvalid`, `Some(Some(n))` for `FAULT:batchinvalid:n`.
fn find_batch_invalid(text: &str) -> Option<Option<u64>> {
    const TAG: &str = "FAULT:batchinvalid";
    let mut rest = text;
    while let Some(pos) = rest.find(TAG) {
        rest = &rest[pos + TAG.len()..];
        let next = rest.chars().next();
        if next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '=') {
            continue;
        }
        if let Some(after) = rest.strip_prefix(':') {
            let digits: &str = &after[..after
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after.len())];
            if let Ok(n) = digits.parse() {
                return Some(Some(n));
            }
        }
        return Some(None);
    }
    None
}

/// For a batch stopped before validation: every line with a string custom_id.
fn lenient_lines(input: &[u8]) -> Vec<LineRef> {
    jsonl_lines(input)
        .filter_map(|(_, start, end)| {
            let v: Value = serde_json::from_slice(&input[start..end]).ok()?;
            let custom_id = v.get("custom_id")?.as_str()?.to_string();
            Some(LineRef {
                custom_id,
                start,
                end,
            })
        })
        .collect()
}

/// Answer up to `max` more lines of an `in_progress` batch.
fn process(shared: &Shared, b: &mut Batch, max: usize, mut record: Option<&mut Vec<Value>>) {
    let counters = &shared.counters;
    let stop = b.lines.len().min(b.processed.saturating_add(max));
    for i in b.processed..stop {
        let line = &b.lines[i];
        let v: Value = serde_json::from_slice(&b.input[line.start..line.end]).unwrap_or_default();
        let (status, body) = answer(shared, &v["body"]);
        if let Some(rec) = record.as_deref_mut() {
            rec.push(v);
        }
        let r = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let result = json!({
            "id": format!("batch_req_{r}"),
            "custom_id": line.custom_id,
            "response": {"status_code": status.as_u16(), "request_id": format!("req_{r}"), "body": body},
            "error": null,
        });
        if status.is_success() {
            b.completed += 1;
            counters
                .batch_requests_billed
                .fetch_add(1, Ordering::Relaxed);
            b.out.push(&result);
        } else {
            b.failed += 1;
            b.err.push(&result);
        }
    }
    b.processed = stop;
}

/// A batch line's answer: the chat endpoint's logic without latency, rate limits or
/// `fail_every`. Connection-level faults (`reset`, `hang`, `cut`, `badjson`) cannot happen
/// inside a batch and answer 500; `slow=` is ignored; `stream` is ignored (a batch answer
/// is always a `chat.completion` object).
fn answer(shared: &Shared, body: &Value) -> (StatusCode, Value) {
    let p = match plan(shared, body, false) {
        Ok(p) => p,
        Err((msg, param)) => {
            return (
                StatusCode::BAD_REQUEST,
                error_body(&msg, "invalid_request_error", Some(param), None),
            )
        }
    };
    let kind = match p.outcome {
        Outcome::Answer(a) if !a.cut => {
            a.bill(shared);
            let id = format!(
                "chatcmpl-{}",
                shared.next_id.fetch_add(1, Ordering::Relaxed)
            );
            return (StatusCode::OK, a.completion(&id, unix_now(), p.model));
        }
        Outcome::Answer(_) => FaultKind::Status(500),
        Outcome::Fault(FaultKind::Reset | FaultKind::Hang | FaultKind::BadJson) => {
            FaultKind::Status(500)
        }
        Outcome::Fault(k) => k,
    };
    // Every kind left answers at once (no sleep, no connection kill), so one poll is enough.
    let resp = fault_response(&kind, p.model, &HeaderMap::new(), None)
        .now_or_never()
        .flatten();
    let Some(resp) = resp else {
        return server_error();
    };
    let status = resp.status();
    match axum::body::to_bytes(resp.into_body(), usize::MAX)
        .now_or_never()
        .and_then(Result::ok)
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(v) => (status, v),
        None => server_error(),
    }
}

fn server_error() -> (StatusCode, Value) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        error_body(
            "The server had an error while processing your request.",
            "server_error",
            None,
            None,
        ),
    )
}

// ---------------------------------------------------------------------------------------
// HTTP

/// Whether `path` is one of this module's routes (any method).
pub(crate) fn is_batch_path(path: &str) -> bool {
    if path.starts_with("/_fake/batches/") {
        return true;
    }
    match api_rest(path) {
        Some((_, rest)) => {
            rest == "/files"
                || rest.starts_with("/files/")
                || rest == "/batches"
                || rest.starts_with("/batches/")
        }
        None => false,
    }
}

/// Which API a path is under (`/v1`: OpenAI, `/openai`: Azure) and the rest of it.
fn api_rest(path: &str) -> Option<(bool, &str)> {
    if let Some(r) = path.strip_prefix("/v1") {
        Some((false, r))
    } else {
        path.strip_prefix("/openai").map(|r| (true, r))
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn bad_request(message: &str, param: Option<&str>) -> Response<Body> {
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        param,
        None,
    )
}

fn not_found(what: &str, id: &str) -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("No such {what} object: {id}"),
        "invalid_request_error",
        Some("id"),
        None,
    )
}

/// `Config::require_key` on these routes: `Authorization: Bearer KEY` or `api-key: KEY`.
fn unauthorized(shared: &Shared, headers: &HeaderMap) -> Option<Response<Body>> {
    let key = shared.config.require_key.as_deref()?;
    let bearer_key = bearer(headers);
    let api_key = headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if bearer_key == Some(key) || api_key == Some(key) {
        return None;
    }
    if api_key.is_some() && bearer_key.is_none() {
        // Azure's answer to a bad `api-key`.
        return Some(json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}),
        ));
    }
    Some(invalid_key_response(headers))
}

pub(crate) async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let query = query.as_deref();

    if let Some(action) = path.strip_prefix("/_fake/batches/") {
        let mut st = shared.batch.lock().unwrap();
        match (&method, action) {
            (&Method::POST, "advance") => st.advance_all(shared),
            (&Method::POST, "expire") => st.expire_all(shared),
            (&Method::POST, "complete") => st.complete_all(shared),
            _ => return invalid_url(&method, &path),
        }
        return json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": st.batches()}),
        );
    }

    let Some((azure, rest)) = api_rest(&path) else {
        return invalid_url(&method, &path);
    };
    if let Some(r) = unauthorized(shared, req.headers()) {
        return r;
    }
    // Azure's routes need the configured api-version, as its chat route does.
    if azure {
        if let Some(r) = crate::azure::api_version_error(shared, query) {
            return r;
        }
    }
    let segs: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match (&method, segs.as_slice()) {
        (&Method::POST, ["files"]) => upload(shared, req).await,
        (&Method::GET, ["files"]) => {
            let purpose = query_param(query, "purpose");
            let st = shared.batch.lock().unwrap();
            let data: Vec<Value> = st
                .files
                .values()
                .rev()
                .filter(|f| purpose.is_none_or(|p| p == f.purpose))
                .map(StoredFile::object)
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"object": "list", "data": data, "has_more": false}),
            )
        }
        (&Method::GET, ["files", id]) => match shared.batch.lock().unwrap().file(id) {
            Some(f) => json_response(StatusCode::OK, &f.object()),
            None => not_found("File", id),
        },
        (&Method::GET, ["files", id, "content"]) => {
            let content = shared
                .batch
                .lock()
                .unwrap()
                .file(id)
                .map(|f| f.content.clone());
            match content {
                Some(c) => {
                    let mut r = Response::new(Body::from(c));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    r
                }
                None => not_found("File", id),
            }
        }
        (&Method::DELETE, ["files", id]) => {
            let mut st = shared.batch.lock().unwrap();
            match parse_id(id, "file-").and_then(|n| st.files.remove(&n)) {
                Some(_) => json_response(
                    StatusCode::OK,
                    &json!({"id": id, "object": "file", "deleted": true}),
                ),
                None => not_found("File", id),
            }
        }
        (&Method::POST, ["batches"]) => {
            let refuse = shared.batch.lock().unwrap().refuse_create(shared);
            if refuse {
                return error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The server had an error while processing your request (injected by batch_create_failures).",
                    "server_error",
                    None,
                    None,
                );
            }
            let kill = req.extensions().get::<crate::ConnKill>().cloned();
            let resp = create(shared, req, azure).await;
            let lose =
                resp.status().is_success() && shared.batch.lock().unwrap().lose_answer(shared);
            match kill {
                Some(k) if lose => {
                    // The batch is made; its answer never leaves (as with `FAULT:reset`).
                    k.0.notify_one();
                    std::future::pending::<Response<Body>>().await
                }
                _ => resp,
            }
        }
        (&Method::GET, ["batches"]) => list_batches(shared, query),
        (&Method::GET, ["batches", id]) => {
            let mut st = shared.batch.lock().unwrap();
            let Some(n) = parse_id(id, "batch_").filter(|n| st.batches.contains_key(n)) else {
                return not_found("Batch", id);
            };
            if shared.config.batch_auto_advance {
                st.step(shared, n);
            }
            json_response(StatusCode::OK, &st.batches[&n].object())
        }
        (&Method::POST, ["batches", id, "cancel"]) => {
            let mut st = shared.batch.lock().unwrap();
            let Some(b) = parse_id(id, "batch_").and_then(|n| st.batches.get_mut(&n)) else {
                return not_found("Batch", id);
            };
            match b.status {
                Status::Validating | Status::InProgress | Status::Finalizing => {
                    b.status = Status::Cancelling;
                    b.cancelling_at = Some(unix_now());
                    shared
                        .counters
                        .batches_cancelled
                        .fetch_add(1, Ordering::Relaxed);
                }
                Status::Cancelling => {}
                s => {
                    return bad_request(
                        &format!("Cannot cancel a batch with status '{}'.", s.as_str()),
                        None,
                    )
                }
            }
            json_response(StatusCode::OK, &b.object())
        }
        _ => invalid_url(&method, &path),
    }
}

fn invalid_url(method: &Method, path: &str) -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("Invalid URL ({method} {path})"),
        "invalid_request_error",
        None,
        None,
    )
}

async fn read_body(req: Request<Incoming>) -> Result<(HeaderMap, Bytes), Response<Body>> {
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(Body::new(body), MAX_UPLOAD).await {
        Ok(b) => Ok((parts.headers, b)),
        Err(_) => Err(bad_request("Could not read the request body.", None)),
    }
}

async fn upload(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let (headers, bytes) = match read_body(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = match parse_multipart(ct, &bytes) {
        Ok(p) => p,
        Err(msg) => return bad_request(&msg, None),
    };
    let purpose = parts
        .iter()
        .find(|p| p.name == "purpose")
        .map(|p| String::from_utf8_lossy(p.data).trim().to_string());
    let Some(file) = parts.iter().find(|p| p.name == "file") else {
        return bad_request("Missing required parameter: 'file'.", Some("file"));
    };
    match purpose.as_deref() {
        Some("batch") => {}
        Some(p) => {
            return bad_request(
                &format!("Invalid value for 'purpose': '{p}'. This server accepts only 'batch'."),
                Some("purpose"),
            )
        }
        None => return bad_request("Missing required parameter: 'purpose'.", Some("purpose")),
    }
    let size = file.data.len() as u64;
    if let Some(max) = shared.config.batch_max_file_bytes {
        if size > max {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("File is too large: {size} bytes. The maximum size for a file with purpose 'batch' is {max} bytes."),
                "invalid_request_error",
                Some("file"),
                Some("file_too_large"),
            );
        }
    }
    let filename = file.filename.clone().unwrap_or_else(|| "upload".into());
    let content = bytes.slice_ref(file.data);
    let mut st = shared.batch.lock().unwrap();
    let n = st.add_file(filename, "batch", content);
    shared
        .counters
        .files_uploaded
        .fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, &st.files[&n].object())
}

async fn create(shared: &Shared, req: Request<Incoming>, azure: bool) -> Response<Body> {
    let (_, bytes) = match read_body(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(
                &format!("We could not parse the JSON body of your request. ({e})"),
                None,
            )
        }
    };
    let str_field = |k: &str| v.get(k).and_then(Value::as_str);
    let Some(input_file_id) = str_field("input_file_id") else {
        return bad_request(
            "Missing required parameter: 'input_file_id'.",
            Some("input_file_id"),
        );
    };
    let Some(endpoint) = str_field("endpoint") else {
        return bad_request("Missing required parameter: 'endpoint'.", Some("endpoint"));
    };
    let endpoints: &[&str] = if azure {
        &["/chat/completions", "/v1/chat/completions"]
    } else {
        &["/v1/chat/completions"]
    };
    if !endpoints.contains(&endpoint) {
        return bad_request(
            &format!(
                "Invalid value: '{endpoint}'. Supported values are: '{}'.",
                endpoints.join("', '")
            ),
            Some("endpoint"),
        );
    }
    let Some(window) = str_field("completion_window") else {
        return bad_request(
            "Missing required parameter: 'completion_window'.",
            Some("completion_window"),
        );
    };
    if window != "24h" {
        return bad_request(
            &format!("Invalid value: '{window}'. Supported values are: '24h'."),
            Some("completion_window"),
        );
    }
    let metadata = match v.get("metadata") {
        None | Some(Value::Null) => Value::Null,
        Some(m @ Value::Object(_)) => m.clone(),
        Some(_) => {
            return bad_request(
                "Invalid type for 'metadata': expected an object.",
                Some("metadata"),
            )
        }
    };
    let mut st = shared.batch.lock().unwrap();
    let input = match st.file(input_file_id) {
        Some(f) if f.purpose == "batch" => f.content.clone(),
        Some(f) => {
            return bad_request(
                &format!(
                    "The file '{input_file_id}' has purpose '{}'; a batch's input file must have purpose 'batch'.",
                    f.purpose
                ),
                Some("input_file_id"),
            )
        }
        None => {
            return bad_request(
                &format!("Invalid 'input_file_id': no file with id '{input_file_id}'."),
                Some("input_file_id"),
            )
        }
    };
    st.last_batch += 1;
    let n = st.last_batch;
    let b = Batch {
        n,
        endpoint: endpoint.into(),
        input_file_id: input_file_id.into(),
        completion_window: window.into(),
        metadata,
        status: Status::Validating,
        input,
        lines: Vec::new(),
        processed: 0,
        out: Sink::default(),
        err: Sink::default(),
        completed: 0,
        failed: 0,
        errors: None,
        output_file_id: None,
        error_file_id: None,
        created_at: unix_now(),
        in_progress_at: None,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
    };
    let obj = b.object();
    st.batches.insert(n, b);
    shared
        .counters
        .batches_created
        .fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, &obj)
}

fn list_batches(shared: &Shared, query: Option<&str>) -> Response<Body> {
    let limit = match query_param(query, "limit").map(str::parse::<usize>) {
        None => 20,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            return bad_request(
                "Invalid 'limit': expected an integer between 1 and 100.",
                Some("limit"),
            )
        }
    };
    let before = match query_param(query, "after") {
        None => u64::MAX,
        Some(a) => match parse_id(a, "batch_") {
            Some(n) => n,
            None => return bad_request(&format!("Invalid 'after': '{a}'."), Some("after")),
        },
    };
    let st = shared.batch.lock().unwrap();
    let mut newer_first = st.batches.range(..before).rev();
    let data: Vec<Value> = newer_first
        .by_ref()
        .take(limit)
        .map(|(_, b)| b.object())
        .collect();
    let has_more = newer_first.next().is_some();
    let first_id = data.first().map(|b| b["id"].clone());
    let last_id = data.last().map(|b| b["id"].clone());
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "first_id": first_id, "last_id": last_id, "has_more": has_more}),
    )
}

// ---------------------------------------------------------------------------------------
// multipart/form-data

struct Part<'a> {
    name: String,
    filename: Option<String>,
    data: &'a [u8],
}

/// The parts of a `multipart/form-data` body (RFC 7578), by hand: the boundary from the
/// content type, then each part's `Content-Disposition` name and filename.
fn parse_multipart<'a>(content_type: &str, body: &'a [u8]) -> Result<Vec<Part<'a>>, String> {
    let mut params = content_type.split(';').map(str::trim);
    if !params
        .next()
        .is_some_and(|m| m.eq_ignore_ascii_case("multipart/form-data"))
    {
        return Err(format!(
            "Invalid content type '{content_type}': expected multipart/form-data."
        ));
    }
    let boundary = params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or("multipart/form-data without a boundary.")?;
    let delim = format!("--{boundary}");
    let next_delim = format!("\r\n--{boundary}");
    let finder = memchr::memmem::Finder::new(next_delim.as_bytes());
    let bad = || "Malformed multipart/form-data body.".to_string();

    // The first delimiter may open the body or follow a preamble.
    let mut pos = if body.starts_with(delim.as_bytes()) {
        delim.len()
    } else {
        finder.find(body).ok_or_else(bad)? + next_delim.len()
    };
    let mut parts = Vec::new();
    loop {
        let rest = &body[pos..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        // Transport padding, then the line break that ends the delimiter line.
        let eol = memchr::memmem::find(rest, b"\r\n").ok_or_else(bad)?;
        let start = pos + eol + 2;
        let head_end = memchr::memmem::find(&body[start..], b"\r\n\r\n").ok_or_else(bad)?;
        let head = String::from_utf8_lossy(&body[start..start + head_end]);
        let data_start = start + head_end + 4;
        let data_len = finder.find(&body[data_start..]).ok_or_else(bad)?;
        let (mut name, mut filename) = (None, None);
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if !k.trim().eq_ignore_ascii_case("content-disposition") {
                continue;
            }
            for p in v.split(';').skip(1) {
                if let Some((pk, pv)) = p.split_once('=') {
                    let pv = pv.trim().trim_matches('"').to_string();
                    match pk.trim().to_ascii_lowercase().as_str() {
                        "name" => name = Some(pv),
                        "filename" => filename = Some(pv),
                        _ => {}
                    }
                }
            }
        }
        parts.push(Part {
            name: name.unwrap_or_default(),
            filename,
            data: &body[data_start..data_start + data_len],
        });
        pos = data_start + data_len + next_delim.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_parts_and_binary_content() {
        let body = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{\"a\":1}\r\n\x00\xff--Xy\r\n--XyZ--\r\n";
        let parts = parse_multipart("multipart/form-data; boundary=\"XyZ\"", body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "purpose");
        assert_eq!(parts[0].filename, None);
        assert_eq!(parts[0].data, b"batch");
        assert_eq!(parts[1].name, "file");
        assert_eq!(parts[1].filename.as_deref(), Some("in.jsonl"));
        assert_eq!(parts[1].data, b"{\"a\":1}\r\n\x00\xff--Xy");

        assert!(parse_multipart("application/json", body).is_err());
        assert!(parse_multipart("multipart/form-data", body).is_err());
        assert!(parse_multipart("multipart/form-data; boundary=XyZ", b"--XyZ\r\nbroken").is_err());
        let empty = parse_multipart("multipart/form-data; boundary=XyZ", b"--XyZ--\r\n").unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn batch_invalid_marker_grammar() {
        assert_eq!(find_batch_invalid("x FAULT:batchinvalid y"), Some(None));
        assert_eq!(find_batch_invalid("FAULT:batchinvalid:2."), Some(Some(2)));
        assert_eq!(find_batch_invalid("FAULT:batchinvalidity"), None);
        assert_eq!(find_batch_invalid("FAULT:500"), None);
        assert_eq!(
            find_batch_invalid("FAULT:batchinvalidx FAULT:batchinvalid"),
            Some(None)
        );
    }

    #[test]
    fn jsonl_lines_skip_blanks_but_keep_numbers() {
        let input = b"{\"a\":1}\n\n  \n{\"b\":2}\r\n{\"c\":3}";
        let got: Vec<(usize, &[u8])> = jsonl_lines(input)
            .map(|(no, s, e)| (no, &input[s..e]))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, &b"{\"a\":1}"[..]),
                (4, &b"{\"b\":2}\r"[..]),
                (5, &b"{\"c\":3}"[..])
            ]
        );
    }

    #[test]
    fn sink_reverses_lines() {
        let mut s = Sink::default();
        for i in 0..3 {
            s.push(&json!({ "i": i }));
        }
        assert_eq!(s.reversed(), b"{\"i\":2}\n{\"i\":1}\n{\"i\":0}\n".to_vec());
    }
}
