//! Anthropic's Message Batches, on the clock the test controls (as OpenAI's batches are):
//! `POST /v1/messages/batches` (the requests inline), `GET /v1/messages/batches` (newest first,
//! `limit`, `after_id`), `GET …/{id}`, `POST …/{id}/cancel`, `GET …/{id}/results` (JSONL, in
//! reverse order of processing, so a client must map lines by `custom_id`).
//!
//! A batch is `in_progress` until every request is processed (`Config::batch_lines_per_step` a
//! step), then `ended`; a cancel makes it `canceling`, and the next step ends it with the
//! requests not yet processed `canceled`; expiry ends it with them `expired`. Each request is
//! answered by the Messages route's own logic (`anthropic::message`), so its text, usage and
//! cache reads are what `POST /v1/messages` gives for the same params; a `FAULT:` marker that
//! would fail the request online makes it `errored` here with the API's error type, and only
//! `succeeded` requests are billed. `Config::batch_create_answers_lost` and
//! `batch_create_failures` apply to these creates as to OpenAI's; `batch_read_failures` makes
//! the first reads (retrieve, list, results) answer 500.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::anthropic::{as_chat, error, error_type, header, message};
use crate::fault::FaultKind;
use crate::handler::{json_response, plan, Outcome};
use crate::Shared;

/// Anthropic's limits on one batch.
const MAX_REQUESTS: usize = 100_000;
const MAX_BYTES: usize = 256 * 1024 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    InProgress,
    Canceling,
    Ended,
}

struct MsgBatch {
    n: u64,
    /// (custom_id, params) of each request, in the order sent.
    requests: Vec<(String, Map<String, Value>)>,
    /// Requests `[..processed]` have their result.
    processed: usize,
    /// Result lines in the order produced.
    results: Vec<Value>,
    status: Status,
    created_at: u64,
    ended_at: Option<u64>,
    cancel_initiated_at: Option<u64>,
    counts: [u64; 4], // succeeded, errored, canceled, expired
}

/// Every Message Batch the server holds, behind `batch::State`'s lock.
#[derive(Default)]
pub(crate) struct Batches {
    batches: BTreeMap<u64, MsgBatch>,
    last: u64,
}

fn rfc3339(secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl MsgBatch {
    fn id(&self) -> String {
        format!("msgbatch_fake{:06}", self.n)
    }

    fn object(&self, root: &str) -> Value {
        let [succeeded, errored, canceled, expired] = self.counts;
        let processing = self.requests.len() as u64 - succeeded - errored - canceled - expired;
        json!({
            "id": self.id(),
            "type": "message_batch",
            "processing_status": match self.status {
                Status::InProgress => "in_progress",
                Status::Canceling => "canceling",
                Status::Ended => "ended",
            },
            "request_counts": {"processing": processing, "succeeded": succeeded,
                "errored": errored, "canceled": canceled, "expired": expired},
            "ended_at": self.ended_at.map(rfc3339),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.created_at + 86_400),
            "archived_at": null,
            "cancel_initiated_at": self.cancel_initiated_at.map(rfc3339),
            "results_url": (self.status == Status::Ended)
                .then(|| format!("{root}/v1/messages/batches/{}/results", self.id())),
        })
    }

    /// Ends the batch: every request not yet processed gets `kind` (`canceled`, `expired`).
    fn end(&mut self, kind: &str) {
        for (custom_id, _) in &self.requests[self.processed..] {
            self.results
                .push(json!({"custom_id": custom_id, "result": {"type": kind}}));
        }
        let left = (self.requests.len() - self.processed) as u64;
        match kind {
            "canceled" => self.counts[2] += left,
            _ => self.counts[3] += left,
        }
        self.processed = self.requests.len();
        self.status = Status::Ended;
        self.ended_at = Some(crate::handler::unix_now());
    }
}

impl Batches {
    pub(crate) fn step_all(&mut self, shared: &Shared) {
        let ns: Vec<u64> = self.batches.keys().copied().collect();
        for n in ns {
            self.step(shared, n);
        }
    }

    pub(crate) fn all_ended(&self) -> bool {
        self.batches.values().all(|b| b.status == Status::Ended)
    }

    /// Every batch in progress expires now (one being cancelled ends as cancelled).
    pub(crate) fn expire_all(&mut self) {
        for b in self.batches.values_mut() {
            if b.status == Status::InProgress {
                b.end("expired");
            }
        }
    }

    fn step(&mut self, shared: &Shared, n: u64) {
        let Some(b) = self.batches.get_mut(&n) else {
            return;
        };
        match b.status {
            Status::InProgress => {
                let max = shared.config.batch_lines_per_step.unwrap_or(usize::MAX);
                let stop = b.requests.len().min(b.processed.saturating_add(max.max(1)));
                for i in b.processed..stop {
                    let (custom_id, params) = &b.requests[i];
                    let (ok, result) = answer(shared, params);
                    b.counts[usize::from(!ok)] += 1;
                    b.results
                        .push(json!({"custom_id": custom_id, "result": result}));
                }
                b.processed = stop;
                if b.processed == b.requests.len() {
                    b.status = Status::Ended;
                    b.ended_at = Some(crate::handler::unix_now());
                }
            }
            Status::Canceling => b.end("canceled"),
            Status::Ended => {}
        }
    }

    /// The results as JSONL, newest first.
    fn results(&self, n: u64) -> Option<Vec<u8>> {
        let b = self.batches.get(&n).filter(|b| b.status == Status::Ended)?;
        let mut out = Vec::new();
        for r in b.results.iter().rev() {
            serde_json::to_writer(&mut out, r).expect("a JSON value serializes");
            out.push(b'\n');
        }
        Some(out)
    }

    /// Every batch, as the API describes it (for the tests).
    pub(crate) fn objects(&self, root: &str) -> Vec<Value> {
        self.batches.values().map(|b| b.object(root)).collect()
    }

    /// Every request of every batch, oldest batch first: `{custom_id, params}`.
    pub(crate) fn requests(&self) -> Vec<Value> {
        self.batches
            .values()
            .flat_map(|b| &b.requests)
            .map(|(id, params)| json!({"custom_id": id, "params": params}))
            .collect()
    }
}

/// One request's result: `succeeded` with the Message (billed), or `errored` with the error
/// the Messages route would have answered.
fn answer(shared: &Shared, params: &Map<String, Value>) -> (bool, Value) {
    let errored = |status: u16, msg: &str| {
        json!({"type": "errored", "error": {"type": "error",
            "error": {"type": error_type(status), "message": msg}}})
    };
    let chat = match as_chat(params) {
        Ok(c) => c,
        Err(msg) => return (false, errored(400, &msg)),
    };
    let p = match plan(shared, &chat, false) {
        Ok(p) => p,
        Err((msg, _)) => return (false, errored(400, &msg)),
    };
    match p.outcome {
        Outcome::Answer(a) if !a.cut => {
            a.bill(shared);
            shared
                .counters
                .batch_requests_billed
                .fetch_add(1, Ordering::Relaxed);
            let model = p.model.to_string();
            let msg = message(shared, params, &model, &a);
            (true, json!({"type": "succeeded", "message": msg}))
        }
        Outcome::Fault(FaultKind::Status(s)) if (400..500).contains(&s) && s != 429 => {
            (false, errored(s, &format!("injected by FAULT:{s}")))
        }
        Outcome::Fault(FaultKind::Status(429)) => (false, errored(429, "rate limited")),
        // Everything else a request can meet inside a batch is the server's.
        _ => (false, errored(500, "Internal server error")),
    }
}

/// `POST /v1/messages/batches`: checks the body as the API does, then makes the batch.
fn create(shared: &Shared, body: &[u8]) -> Response<Body> {
    let bad = |msg: &str| error(400, "invalid_request_error", msg);
    if body.len() > MAX_BYTES {
        return error(413, "request_too_large", "Request exceeds the maximum size");
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad(&format!("The request body is not valid JSON: {e}")),
    };
    let Some(reqs) = v.get("requests").and_then(Value::as_array) else {
        return bad("requests: Field required");
    };
    if reqs.is_empty() || reqs.len() > MAX_REQUESTS {
        return bad("requests: must hold from 1 to 100,000 requests");
    }
    let mut seen = HashSet::new();
    let mut requests = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let id = r.get("custom_id").and_then(Value::as_str).unwrap_or("");
        let valid = (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return bad(&format!(
                "requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            ));
        }
        if !seen.insert(id) {
            return bad(&format!(
                "requests.{i}.custom_id: Duplicate custom_id '{id}'"
            ));
        }
        let Some(Value::Object(params)) = r.get("params") else {
            return bad(&format!("requests.{i}.params: Field required"));
        };
        if params.get("stream") == Some(&Value::Bool(true)) {
            return bad(&format!(
                "requests.{i}.params.stream: streaming is not supported in batches"
            ));
        }
        requests.push((id.to_string(), params.clone()));
    }
    let mut st = shared.batch.lock().unwrap();
    let mb = &mut st.messages;
    mb.last += 1;
    let n = mb.last;
    let b = MsgBatch {
        n,
        requests,
        processed: 0,
        results: Vec::new(),
        status: Status::InProgress,
        created_at: crate::handler::unix_now(),
        ended_at: None,
        cancel_initiated_at: None,
        counts: [0; 4],
    };
    let obj = b.object(results_root(shared));
    mb.batches.insert(n, b);
    shared
        .counters
        .batches_created
        .fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, &obj)
}

/// Where results URLs point: this server, or `Config::message_results_root`.
fn results_root(shared: &Shared) -> &str {
    shared
        .config
        .message_results_root
        .as_deref()
        .unwrap_or(&shared.root)
}

fn parse_id(id: &str) -> Option<u64> {
    id.strip_prefix("msgbatch_fake")?.parse().ok()
}

fn not_found(id: &str) -> Response<Body> {
    error(
        404,
        "not_found_error",
        &format!("Message batch {id} not found"),
    )
}

/// `GET /v1/messages/batches?limit=N&after_id=ID`: newest first.
fn list(shared: &Shared, query: Option<&str>) -> Response<Body> {
    let param = |name: &str| {
        query?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let limit = param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 1000);
    let after = param("after_id").and_then(|a| parse_id(&a));
    let st = shared.batch.lock().unwrap();
    let root = results_root(shared);
    let older: Vec<&MsgBatch> = st
        .messages
        .batches
        .values()
        .rev()
        .filter(|b| after.is_none_or(|a| b.n < a))
        .collect();
    let page: Vec<Value> = older.iter().take(limit).map(|b| b.object(root)).collect();
    json_response(
        StatusCode::OK,
        &json!({
            "data": page,
            "has_more": older.len() > limit,
            "first_id": page.first().map(|b| b["id"].clone()),
            "last_id": page.last().map(|b| b["id"].clone()),
        }),
    )
}

/// Every `/v1/messages/batches` route.
pub(crate) async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if let Some(key) = shared.config.require_key.as_deref() {
        if header(req.headers(), "x-api-key") != Some(key) {
            return error(401, "authentication_error", "invalid x-api-key");
        }
    }
    if header(req.headers(), "anthropic-version").is_none() {
        return error(
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let method = req.method().clone();
    if method == Method::GET && shared.batch.lock().unwrap().refuse_read(shared) {
        shared.counters.faults.fetch_add(1, Ordering::Relaxed);
        return error(
            500,
            "api_error",
            "Internal server error (injected by batch_read_failures)",
        );
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let rest = path.trim_start_matches("/v1/messages/batches");
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (&method, segs.as_slice()) {
        (&Method::POST, []) => {
            if shared.batch.lock().unwrap().refuse_create(shared) {
                return error(
                    500,
                    "api_error",
                    "Internal server error (injected by batch_create_failures)",
                );
            }
            let kill = req.extensions().get::<crate::ConnKill>().cloned();
            let Ok(body) = axum::body::to_bytes(Body::new(req.into_body()), MAX_BYTES + 1).await
            else {
                return error(413, "request_too_large", "Request exceeds the maximum size");
            };
            let resp = create(shared, &body);
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
        (&Method::GET, []) => list(shared, query.as_deref()),
        (&Method::GET, [id]) => {
            let mut st = shared.batch.lock().unwrap();
            let Some(n) = parse_id(id).filter(|n| st.messages.batches.contains_key(n)) else {
                return not_found(id);
            };
            if shared.config.batch_auto_advance {
                st.messages.step(shared, n);
            }
            json_response(
                StatusCode::OK,
                &st.messages.batches[&n].object(results_root(shared)),
            )
        }
        (&Method::POST, [id, "cancel"]) => {
            let mut st = shared.batch.lock().unwrap();
            let Some(b) = parse_id(id).and_then(|n| st.messages.batches.get_mut(&n)) else {
                return not_found(id);
            };
            if b.status == Status::InProgress {
                b.status = Status::Canceling;
                b.cancel_initiated_at = Some(crate::handler::unix_now());
                shared
                    .counters
                    .batches_cancelled
                    .fetch_add(1, Ordering::Relaxed);
            }
            json_response(StatusCode::OK, &b.object(results_root(shared)))
        }
        (&Method::GET, [id, "results"]) => {
            let st = shared.batch.lock().unwrap();
            match parse_id(id).map(|n| st.messages.results(n)) {
                Some(Some(lines)) => {
                    let mut r = Response::new(Body::from(lines));
                    r.headers_mut().insert(
                        "content-type",
                        "application/binary".parse().expect("a header value"),
                    );
                    r
                }
                Some(None) => error(
                    400,
                    "invalid_request_error",
                    &format!("Message batch {id} has not ended: its results are not ready"),
                ),
                None => not_found(id),
            }
        }
        _ => error(
            404,
            "not_found_error",
            &format!("Not found: {method} {path}"),
        ),
    }
}
