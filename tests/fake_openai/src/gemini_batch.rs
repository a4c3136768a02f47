//! Gemini's Batch API and the Files API it reads from, on the clock the test moves (the same
//! `advance_batches` / `complete_batches` / `expire_batches` as OpenAI's batches):
//! `POST /upload/v1beta/files` (resumable: a `start` answered with `x-goog-upload-url`, then
//! `upload, finalize` with the bytes), `GET /v1beta/files`, `DELETE /v1beta/files/{id}`,
//! `POST /v1beta/models/{model}:batchGenerateContent` (answered with an Operation),
//! `GET /v1beta/batches[/{id}]`, `POST /v1beta/batches/{id}:cancel` and
//! `GET /download/v1beta/files/{id}:download?alt=media`. A batch moves
//! `BATCH_STATE_PENDING` → `BATCH_STATE_RUNNING` (answering `Config::batch_lines_per_step`
//! lines a step) → `BATCH_STATE_SUCCEEDED`; a cancel or an expiry ends it at once with the
//! lines answered so far in its responses file; a batch with `FAULT:batchfail` in a line goes
//! `BATCH_STATE_FAILED` with an `error` instead of running. `Config::batch_create_answers_lost` and
//! `batch_create_failures` apply to creates here as on OpenAI's route.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use axum::body::Body;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::gemini::{answer_line, error, unauthorized};
use crate::handler::{json_response, unix_now};
use crate::{ConnKill, Shared};

#[derive(Default)]
pub(crate) struct State {
    files: BTreeMap<u64, File>,
    batches: BTreeMap<u64, Batch>,
    /// Resumable uploads started and not finished: their display names.
    sessions: BTreeMap<u64, String>,
    last: u64,
    creates_lost: u64,
    creates_failed: u64,
}

struct File {
    display_name: String,
    created_at: u64,
    content: Bytes,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Pending,
    Running,
    Succeeded,
    /// A line asked for it (`FAULT:batchfail` in its text): the whole batch fails, as one
    /// whose input the API cannot read does.
    Failed,
    Cancelled,
    Expired,
}

struct Batch {
    model: String,
    display_name: String,
    input_file: String,
    state: St,
    /// `(key, request)` of every line.
    lines: Vec<(String, Value)>,
    /// Result lines so far, in input order.
    out: Vec<Value>,
    ok: u64,
    failed: u64,
    responses_file: Option<String>,
    created_at: u64,
    ended_at: Option<u64>,
}

fn rfc3339(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl File {
    fn object(&self, n: u64) -> Value {
        json!({"name": format!("files/upload-{n}"), "displayName": self.display_name,
               "mimeType": "application/jsonl", "sizeBytes": self.content.len().to_string(),
               "createTime": rfc3339(self.created_at), "state": "ACTIVE"})
    }
}

impl Batch {
    fn operation(&self, n: u64) -> Value {
        let name = format!("batches/b{n}");
        let state = match self.state {
            St::Pending => "BATCH_STATE_PENDING",
            St::Running => "BATCH_STATE_RUNNING",
            St::Succeeded => "BATCH_STATE_SUCCEEDED",
            St::Failed => "BATCH_STATE_FAILED",
            St::Cancelled => "BATCH_STATE_CANCELLED",
            St::Expired => "BATCH_STATE_EXPIRED",
        };
        let total = self.lines.len() as u64;
        let mut meta = json!({
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
            "model": format!("models/{}", self.model), "name": name,
            "displayName": self.display_name, "inputConfig": {"fileName": self.input_file},
            "createTime": rfc3339(self.created_at), "updateTime": rfc3339(unix_now()),
            "state": state,
            "batchStats": {"requestCount": total.to_string(),
                "successfulRequestCount": self.ok.to_string(),
                "failedRequestCount": self.failed.to_string(),
                "pendingRequestCount": (total - self.ok - self.failed).to_string()},
        });
        if let Some(t) = self.ended_at {
            meta["endTime"] = rfc3339(t).into();
        }
        let mut op = json!({"name": name, "metadata": meta, "done": self.ended_at.is_some()});
        if self.state == St::Failed {
            op["error"] = json!({"code": 3, "message": "The batch input could not be read (injected by FAULT:batchfail).",
                                 "status": "INVALID_ARGUMENT"});
        }
        if let Some(f) = &self.responses_file {
            op["metadata"]["output"] = json!({"responsesFile": f});
            op["response"] = json!({"@type":
                "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput",
                "responsesFile": f});
        }
        op
    }
}

impl State {
    fn add_file(&mut self, display_name: String, content: Bytes) -> u64 {
        self.last += 1;
        let f = File {
            display_name,
            created_at: unix_now(),
            content,
        };
        self.files.insert(self.last, f);
        self.last
    }

    pub(crate) fn operations(&self) -> Vec<Value> {
        self.batches.iter().map(|(n, b)| b.operation(*n)).collect()
    }

    pub(crate) fn file_content(&self, name: &str) -> Option<Vec<u8>> {
        let n = name.strip_prefix("files/upload-")?.parse().ok()?;
        self.files.get(&n).map(|f| f.content.to_vec())
    }

    pub(crate) fn advance_all(&mut self, shared: &Shared) {
        let ns: Vec<u64> = self.batches.keys().copied().collect();
        for n in ns {
            self.step(shared, n);
        }
    }

    pub(crate) fn complete_all(&mut self, shared: &Shared) {
        while self
            .batches
            .values()
            .any(|b| matches!(b.state, St::Pending | St::Running))
        {
            self.advance_all(shared);
        }
    }

    pub(crate) fn expire_all(&mut self) {
        let ns: Vec<u64> = self.batches.keys().copied().collect();
        for n in ns {
            self.end(n, St::Expired);
        }
    }

    fn step(&mut self, shared: &Shared, n: u64) {
        let Some(b) = self.batches.get_mut(&n) else {
            return;
        };
        match b.state {
            St::Pending
                if b.lines
                    .iter()
                    .any(|l| l.1.to_string().contains("FAULT:batchfail")) =>
            {
                self.end(n, St::Failed);
            }
            St::Pending => b.state = St::Running,
            St::Running => {
                let max = shared
                    .config
                    .batch_lines_per_step
                    .unwrap_or(usize::MAX)
                    .max(1);
                let stop = b.lines.len().min(b.out.len().saturating_add(max));
                for i in b.out.len()..stop {
                    let (key, request) = &b.lines[i];
                    let (status, v) = answer_line(shared, &b.model, request);
                    let line = if status == 200 {
                        b.ok += 1;
                        shared
                            .counters
                            .batch_requests_billed
                            .fetch_add(1, Ordering::Relaxed);
                        json!({"key": key, "response": v})
                    } else {
                        b.failed += 1;
                        json!({"key": key, "error": v["error"]})
                    };
                    b.out.push(line);
                }
                if b.out.len() == b.lines.len() {
                    self.end(n, St::Succeeded);
                }
            }
            St::Succeeded | St::Failed | St::Cancelled | St::Expired => {}
        }
    }

    /// Ends a batch that is not over: its responses file holds the lines answered so far.
    fn end(&mut self, n: u64, state: St) {
        let Some(b) = self.batches.get(&n) else {
            return;
        };
        if !matches!(b.state, St::Pending | St::Running) {
            return;
        }
        let mut content = Vec::new();
        for l in &b.out {
            serde_json::to_writer(&mut content, l).unwrap();
            content.push(b'\n');
        }
        let file =
            (!content.is_empty()).then(|| self.add_file(format!("b{n}-responses"), content.into()));
        let b = self.batches.get_mut(&n).unwrap();
        b.state = state;
        b.ended_at = Some(unix_now());
        b.responses_file = file.map(|f| format!("files/upload-{f}"));
        b.lines.iter_mut().for_each(|l| l.1 = Value::Null);
    }
}

/// Whether a path is one of these routes.
pub(crate) fn is_path(path: &str) -> bool {
    path.starts_with("/upload/v1beta/files")
        || path.starts_with("/download/v1beta/files/")
        || path.starts_with("/v1beta/files")
        || path.starts_with("/v1beta/batches")
        || path.ends_with(":batchGenerateContent")
}

pub(crate) async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    if let Some(r) = unauthorized(shared, req.headers()) {
        return r;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    if method == Method::POST && path == "/upload/v1beta/files" {
        return upload(shared, req, &query).await;
    }
    if let Some((model, "batchGenerateContent")) = crate::gemini::model_method(&path) {
        let model = model.to_string();
        return create(shared, req, &model).await;
    }
    let mut st = shared.batch_gemini.lock().unwrap();
    let num = |s: &str, prefix: &str| s.strip_prefix(prefix)?.parse::<u64>().ok();
    match (&method, path.as_str()) {
        (&Method::GET, "/v1beta/files") => {
            let files: Vec<Value> = st.files.iter().map(|(n, f)| f.object(*n)).collect();
            json_response(StatusCode::OK, &json!({"files": files}))
        }
        (&Method::DELETE, p) => match p
            .strip_prefix("/v1beta/files/")
            .and_then(|r| num(r, "upload-"))
        {
            Some(n) if st.files.remove(&n).is_some() => json_response(StatusCode::OK, &json!({})),
            _ => error(404, "File not found.", None),
        },
        (&Method::GET, p) if p.starts_with("/download/v1beta/files/") => {
            let name = p
                .trim_start_matches("/download/v1beta/")
                .trim_end_matches(":download");
            match st.file_content(name) {
                Some(c) => Response::new(Body::from(c)),
                None => error(404, "File not found.", None),
            }
        }
        (&Method::GET, "/v1beta/batches") => {
            let ops: Vec<Value> = st.operations().into_iter().rev().collect();
            json_response(StatusCode::OK, &json!({"operations": ops}))
        }
        (&Method::GET, p) => match p.strip_prefix("/v1beta/batches/").and_then(|r| num(r, "b")) {
            Some(n) if st.batches.contains_key(&n) => {
                if shared.config.batch_auto_advance {
                    st.step(shared, n);
                }
                json_response(StatusCode::OK, &st.batches[&n].operation(n))
            }
            _ => error(404, "Batch not found.", None),
        },
        (&Method::POST, p) if p.ends_with(":cancel") => {
            let id = p.trim_end_matches(":cancel");
            match id
                .strip_prefix("/v1beta/batches/")
                .and_then(|r| num(r, "b"))
            {
                Some(n) if st.batches.contains_key(&n) => {
                    if matches!(st.batches[&n].state, St::Pending | St::Running) {
                        shared
                            .counters
                            .batches_cancelled
                            .fetch_add(1, Ordering::Relaxed);
                        st.end(n, St::Cancelled);
                    }
                    json_response(StatusCode::OK, &json!({}))
                }
                _ => error(404, "Batch not found.", None),
            }
        }
        _ => error(404, &format!("No route for {method} {path}"), None),
    }
}

/// The resumable upload's two requests.
async fn upload(shared: &Shared, req: Request<Incoming>, query: &str) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let h = |k: &str| {
        parts
            .headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let command = h("x-goog-upload-command").to_string();
    let host = h("host").to_string();
    let Ok(bytes) = axum::body::to_bytes(Body::new(body), 512 * 1024 * 1024).await else {
        return error(400, "Could not read the upload.", None);
    };
    let mut st = shared.batch_gemini.lock().unwrap();
    if command == "start" {
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let name = v
            .pointer("/file/displayName")
            .or_else(|| v.pointer("/file/display_name"));
        st.last += 1;
        let id = st.last;
        st.sessions.insert(
            id,
            name.and_then(Value::as_str).unwrap_or_default().to_string(),
        );
        let mut r = json_response(StatusCode::OK, &json!({}));
        let url = format!("http://{host}/upload/v1beta/files?upload_id={id}");
        r.headers_mut()
            .insert("x-goog-upload-url", url.parse().unwrap());
        r.headers_mut()
            .insert("x-goog-upload-status", "active".parse().unwrap());
        return r;
    }
    let session = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("upload_id="))
        .and_then(|v| v.parse::<u64>().ok());
    let Some(name) = session.and_then(|s| st.sessions.remove(&s)) else {
        return error(400, "No such upload session.", None);
    };
    if !command.contains("finalize") {
        return error(
            400,
            "Only one-shot `upload, finalize` uploads are served here.",
            None,
        );
    }
    let n = st.add_file(name, bytes);
    shared
        .counters
        .files_uploaded
        .fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, &json!({"file": st.files[&n].object(n)}))
}

async fn create(shared: &Shared, req: Request<Incoming>, model: &str) -> Response<Body> {
    let kill = req.extensions().get::<ConnKill>().cloned();
    let Ok(bytes) = axum::body::to_bytes(Body::new(req.into_body()), 1 << 20).await else {
        return error(400, "Could not read the request body.", None);
    };
    let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let b = &v["batch"];
    let display = b["displayName"].as_str().or(b["display_name"].as_str());
    let file = b
        .pointer("/inputConfig/fileName")
        .or_else(|| b.pointer("/input_config/file_name"))
        .and_then(Value::as_str);
    let (Some(display), Some(file)) = (display, file) else {
        return error(
            400,
            "batch.displayName and batch.inputConfig.fileName are required.",
            None,
        );
    };
    let (op, lose) = {
        let mut st = shared.batch_gemini.lock().unwrap();
        match make(shared, &mut st, model, display, file) {
            Ok(x) => x,
            Err((status, message)) => return error(status, &message, None),
        }
    };
    if lose {
        if let Some(k) = kill {
            k.0.notify_one();
        }
        return std::future::pending::<Response<Body>>().await;
    }
    json_response(StatusCode::OK, &op)
}

/// Makes the batch (or, for `batch_create_failures`, refuses to); whether its answer is lost.
fn make(
    shared: &Shared,
    st: &mut State,
    model: &str,
    display: &str,
    file: &str,
) -> Result<(Value, bool), (u16, String)> {
    if st.creates_failed < shared.config.batch_create_failures {
        st.creates_failed += 1;
        return Err((500, "Internal error encountered.".into()));
    }
    let Some(content) = st.file_content(file) else {
        return Err((400, format!("batch.inputConfig.fileName: {file} not found")));
    };
    let mut lines = Vec::new();
    for (i, l) in content.split(|&c| c == b'\n').enumerate() {
        if l.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line: Value = match serde_json::from_slice(l) {
            Ok(v) => v,
            Err(e) => return Err((400, format!("line {}: not JSON ({e})", i + 1))),
        };
        let key = line["key"].as_str().unwrap_or_default().to_string();
        lines.push((key, line["request"].clone()));
    }
    st.last += 1;
    let n = st.last;
    let batch = Batch {
        model: model.to_string(),
        display_name: display.to_string(),
        input_file: file.to_string(),
        state: St::Pending,
        lines,
        out: Vec::new(),
        ok: 0,
        failed: 0,
        responses_file: None,
        created_at: unix_now(),
        ended_at: None,
    };
    let op = batch.operation(n);
    st.batches.insert(n, batch);
    shared
        .counters
        .batches_created
        .fetch_add(1, Ordering::Relaxed);
    let lose = st.creates_lost < shared.config.batch_create_answers_lost;
    st.creates_lost += u64::from(lose);
    Ok((op, lose))
}
