//! Google's Gemini Batch API: the input line (`{"key", "request"}`, the online
//! GenerateContentRequest), the responses file's line (`{"key", "response"}` or
//! `{"key", "error"}`), and the endpoints: the Files API's resumable upload
//! (`/upload/v1beta/files`), `models/{model}:batchGenerateContent`, `batches/{id}` (get, list,
//! `:cancel`) and the download of the responses file. A batch is tagged by its display name,
//! which carries the part (`pm-part=…`), so a create whose answer was lost is found again.
//! Gemini's states become the executor's words (`BATCH_STATE_RUNNING` → `in_progress`, …).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::api::{Batch, BatchApi, BatchError, BatchErrors, CreateFailed, Fut, Lookup};
use super::http::{failed, Http};
use super::results::Answer;
use super::state::LineCounts;
use crate::error::Error;
use crate::exec::retry::RetryPolicy;
use crate::ledger::journal::io_err;
use crate::provider::endpoint::Endpoint;
use crate::provider::gemini::{model_resource, parse_response, status_error};
use crate::provider::ProviderError;

/// The display name's tag of the part a batch holds.
const PART_TAG: &str = "pm-part=";

/// Pages a lookup reads at most (100 batches or files each): past that, a lost create is
/// taken as not made, and the part stays `creating` for the next run to look again.
const MAX_PAGES: usize = 50;

/// The Gemini API's Files and Batches endpoints for one job.
pub struct GeminiBatches {
    http: Http,
    endpoint: Endpoint,
    /// `models/NAME` (or `tunedModels/NAME`): the create's URL names it.
    model: String,
}

impl GeminiBatches {
    pub fn for_job(job: &crate::job::Job) -> Result<GeminiBatches, Error> {
        let endpoint = crate::backend::endpoint(job)?;
        // Uploads are up to 2 GB: give them time, and never less than the job's timeout.
        let http = endpoint
            .client(job.limits.timeout.max(Duration::from_secs(600)), 2)
            .map_err(Error::Other)?;
        Ok(GeminiBatches {
            http: Http {
                client: http,
                key: endpoint.key().cloned(),
                retry: RetryPolicy::new(job.limits.max_retries),
                classify: status_error,
            },
            endpoint,
            model: model_resource(&job.served.model),
        })
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, Error> {
        self.endpoint.api_url(path).map_err(Error::Other)
    }

    /// The resumable upload: a start that names the file and its size, answered with the
    /// session's URL, then the bytes streamed from disk in one `upload, finalize`. A failure
    /// starts over with a new session (repeating makes at most an unused file, at no cost);
    /// the handle is `files/ID`.
    pub async fn upload(&self, path: &Path, name: &str) -> Result<String, Error> {
        let what = format!("uploading {}", path.display());
        let len = std::fs::metadata(path).map_err(|e| io_err(path, e))?.len();
        let mut retrier = self.http.retry.start();
        let resp = loop {
            let e = match self.upload_once(path, name, len, &what).await? {
                Ok(r) => break r,
                Err(e) => e,
            };
            match retrier.next_delay(&e) {
                Some(d) => {
                    tracing::debug!("{what}: retrying in {d:?}: {e}");
                    tokio::time::sleep(d).await;
                }
                None => return Err(failed(&what, &e)),
            }
        };
        let v = self.http.json::<Value>(&what, resp).await?;
        let file = v.get("file").unwrap_or(&v);
        file["name"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| Error::Other(format!("{what}: the answer names no file")))
    }

    /// One try of both steps: `Err` is final, `Ok(Err)` may be retried.
    async fn upload_once(
        &self,
        path: &Path,
        name: &str,
        len: u64,
        what: &str,
    ) -> Result<Result<reqwest::Response, ProviderError>, Error> {
        let start = self.url("upload/v1beta/files")?;
        let req = self
            .http
            .client
            .post(start.clone())
            .header("X-Goog-Upload-Protocol", "resumable")
            .header("X-Goog-Upload-Command", "start")
            .header("X-Goog-Upload-Header-Content-Length", len.to_string())
            .header("X-Goog-Upload-Header-Content-Type", "application/jsonl")
            .json(&json!({"file": {"displayName": name}}));
        let resp = match self.http.attempt(req).await {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let session = resp
            .headers()
            .get("x-goog-upload-url")
            .and_then(|v| v.to_str().ok())
            .and_then(|u| reqwest::Url::parse(u).ok())
            .ok_or_else(|| Error::Other(format!("{what}: the answer has no upload URL")))?;
        // The key goes with every request of this client: never to another origin.
        if session.origin() != start.origin() {
            return Err(Error::Other(format!(
                "{what}: the upload URL is on another host ({}); refused",
                session.host_str().unwrap_or_default()
            )));
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| io_err(path, e))?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let req = self
            .http
            .client
            .post(session)
            .header("Content-Length", len.to_string())
            .header("X-Goog-Upload-Offset", "0")
            .header("X-Goog-Upload-Command", "upload, finalize")
            .body(body);
        Ok(self.http.attempt(req).await)
    }

    /// The newest uploaded file whose display name is `name`.
    pub async fn find_file(&self, name: &str) -> Result<Option<String>, Error> {
        let mut best: Option<(String, String)> = None; // (createTime, name)
        self.pages("files", "files", "listing uploaded files", |f| {
            if f["displayName"] == name {
                let t = f["createTime"].as_str().unwrap_or_default().to_string();
                if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                    best = f["name"].as_str().map(|n| (t, n.to_string()));
                }
            }
            false
        })
        .await?;
        Ok(best.map(|(_, n)| n))
    }

    /// Reads the pages of a list (`files`, `batches`) until `found` says stop; true if it did.
    async fn pages<F>(&self, path: &str, key: &str, what: &str, mut found: F) -> Result<bool, Error>
    where
        F: FnMut(&Value) -> bool,
    {
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = self.url(&format!("v1beta/{path}"))?;
            url.query_pairs_mut().append_pair("pageSize", "100");
            if let Some(t) = &token {
                url.query_pairs_mut().append_pair("pageToken", t);
            }
            let resp = self
                .http
                .call(what, || async { Ok(self.http.client.get(url.clone())) })
                .await?;
            let v = self.http.json::<Value>(what, resp).await?;
            for item in v[key].as_array().into_iter().flatten() {
                if found(item) {
                    return Ok(true);
                }
            }
            token = v["nextPageToken"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(String::from);
            if token.is_none() {
                break;
            }
        }
        Ok(false)
    }

    pub async fn delete_file(&self, handle: &str) -> Result<(), Error> {
        let url = self.url(&format!("v1beta/{handle}"))?;
        self.http
            .call("deleting a file", || async {
                Ok(self.http.client.delete(url.clone()))
            })
            .await?;
        Ok(())
    }

    /// Asks for a batch once; never retried here (see `CreateFailed`). The display name
    /// carries the part, the job and the output.
    pub async fn create_once(
        &self,
        staged: &str,
        metadata: &serde_json::Map<String, Value>,
    ) -> Result<Batch, CreateFailed> {
        let url = self
            .url(&format!("v1beta/{}:batchGenerateContent", self.model))
            .map_err(CreateFailed::before)?;
        let body = json!({"batch": {
            "displayName": display_name(metadata),
            "inputConfig": {"fileName": staged},
        }});
        let what = format!("creating a batch from {staged}");
        let resp = self
            .http
            .attempt(self.http.client.post(url).json(&body))
            .await
            .map_err(|e| CreateFailed::of(failed(&what, &e), e))?;
        // A 200 whose body is lost or garbled: the batch was made.
        let made = |error| CreateFailed {
            error,
            maybe_made: true,
            retry: None,
        };
        let v = self.http.json::<Value>(&what, resp).await.map_err(made)?;
        to_batch(&v).ok_or_else(|| made(Error::Other(format!("{what}: the answer names no batch"))))
    }

    pub async fn retrieve(&self, id: &str) -> Result<Batch, Error> {
        let url = self.url(&format!("v1beta/batches/{id}"))?;
        let what = format!("checking batch {id}");
        let resp = self
            .http
            .call(&what, || async { Ok(self.http.client.get(url.clone())) })
            .await?;
        let v = self.http.json::<Value>(&what, resp).await?;
        to_batch(&v).ok_or_else(|| Error::Other(format!("{what}: the answer names no batch")))
    }

    /// Asks for the cancel (answered with nothing), then reads the batch as it stands.
    pub async fn cancel(&self, id: &str) -> Result<Batch, Error> {
        let url = self.url(&format!("v1beta/batches/{id}:cancel"))?;
        let what = format!("cancelling batch {id}");
        self.http
            .call(&what, || async {
                Ok(self.http.client.post(url.clone()).json(&json!({})))
            })
            .await?;
        let mut b = self.retrieve(id).await?;
        if !b.is_final() {
            b.status = "cancelling".into();
        }
        Ok(b)
    }

    /// The batch of part `lost.part`, found by the tag in its display name.
    pub async fn find_batch(&self, lost: &Lookup) -> Result<Option<Batch>, Error> {
        let mut hit = None;
        self.pages("batches", "operations", "listing batches", |op| {
            let meta = op.get("metadata").unwrap_or(op);
            let name = meta["displayName"].as_str().unwrap_or_default();
            if part_of(name) == Some(lost.part.as_str()) {
                hit = to_batch(op);
            }
            hit.is_some()
        })
        .await?;
        Ok(hit)
    }

    /// Streams a responses file (`files/ID`) to `dest`, whole or not at all.
    pub async fn download(&self, file: &str, dest: &Path) -> Result<(), Error> {
        let url = self.url(&format!("download/v1beta/{file}:download?alt=media"))?;
        self.http
            .download(&format!("downloading {file}"), &url, dest)
            .await
    }
}

/// `pm-part=P job=J out=O`: the part first, so a job or output name with spaces cannot hide it.
fn display_name(meta: &serde_json::Map<String, Value>) -> String {
    // Names from outside are bounded: a display name is kept short (the part is whole).
    let get = |k: &str| {
        let v = meta.get(k).and_then(Value::as_str).unwrap_or_default();
        v.char_indices().nth(48).map_or(v, |(i, _)| &v[..i])
    };
    format!(
        "{PART_TAG}{} job={} out={}",
        get(super::META_PART),
        get("promptmill_job"),
        get("promptmill_output")
    )
}

fn part_of(display: &str) -> Option<&str> {
    display.strip_prefix(PART_TAG)?.split(' ').next()
}

/// Gemini's state in the executor's words.
fn status_of(state: &str) -> &'static str {
    let s = state
        .trim_start_matches("BATCH_STATE_")
        .trim_start_matches("JOB_STATE_");
    match s {
        "PENDING" | "QUEUED" => "validating",
        "SUCCEEDED" => "completed",
        "FAILED" => "failed",
        "CANCELLED" => "cancelled",
        "EXPIRED" => "expired",
        "CANCELLING" => "cancelling",
        _ => "in_progress",
    }
}

/// An int64 as Google's JSON gives it: a string, or a number.
fn count(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

fn epoch_secs(v: &Value) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

/// An Operation (or the GenerateContentBatch inside it) as the executor's `Batch`: its id is
/// the part of `batches/ID` after the slash, so it names files safely.
fn to_batch(op: &Value) -> Option<Batch> {
    let meta = op.get("metadata").filter(|m| m.is_object()).unwrap_or(op);
    let name = meta["name"].as_str().or(op["name"].as_str())?;
    let id = name.strip_prefix("batches/").unwrap_or(name).to_string();
    let status = status_of(meta["state"].as_str().unwrap_or_default()).to_string();
    let output = meta
        .pointer("/output/responsesFile")
        .or_else(|| op.pointer("/response/responsesFile"))
        .and_then(Value::as_str)
        .map(String::from);
    let stats = &meta["batchStats"];
    let mut times = serde_json::Map::new();
    let ended = epoch_secs(&meta["endTime"]);
    if let (Some(t), true) = (ended, status != "in_progress" && status != "validating") {
        times.insert(format!("{status}_at"), t.into());
    }
    let errors = op
        .get("error")
        .filter(|e| e.is_object())
        .map(|e| BatchErrors {
            data: vec![BatchError {
                code: e["status"].as_str().map(String::from),
                message: e["message"].as_str().map(String::from),
                line: None,
            }],
        });
    Some(Batch {
        id,
        status,
        output_file_id: output,
        error_file_id: None,
        request_counts: stats.is_object().then(|| LineCounts {
            total: count(&stats["requestCount"]),
            completed: count(&stats["successfulRequestCount"]),
            failed: count(&stats["failedRequestCount"]),
        }),
        created_at: epoch_secs(&meta["createTime"]),
        expires_at: None,
        errors,
        metadata: None,
        times,
    })
}

impl BatchApi for GeminiBatches {
    fn write_line(&self, out: &mut Vec<u8>, custom_id: &str, body: &[u8], _stream: bool) {
        write_line(out, custom_id, body);
    }

    fn outcome(&self) -> fn(&[u8]) -> Answer {
        outcome
    }

    fn stage<'a>(&'a self, path: &'a Path, name: &'a str) -> Fut<'a, Result<String, Error>> {
        Box::pin(self.upload(path, name))
    }

    fn find_staged<'a>(&'a self, name: &'a str) -> Fut<'a, Result<Option<String>, Error>> {
        Box::pin(self.find_file(name))
    }

    fn unstage<'a>(&'a self, handle: &'a str) -> Fut<'a, Result<(), Error>> {
        Box::pin(self.delete_file(handle))
    }

    fn create_once<'a>(
        &'a self,
        staged: &'a str,
        metadata: &'a serde_json::Map<String, Value>,
    ) -> Fut<'a, Result<Batch, CreateFailed>> {
        Box::pin(GeminiBatches::create_once(self, staged, metadata))
    }

    fn find_batch<'a>(&'a self, lost: &'a Lookup) -> Fut<'a, Result<Option<Batch>, Error>> {
        Box::pin(GeminiBatches::find_batch(self, lost))
    }

    fn retrieve<'a>(&'a self, id: &'a str) -> Fut<'a, Result<Batch, Error>> {
        Box::pin(GeminiBatches::retrieve(self, id))
    }

    fn cancel<'a>(&'a self, id: &'a str) -> Fut<'a, Result<Batch, Error>> {
        Box::pin(GeminiBatches::cancel(self, id))
    }

    fn download<'a>(&'a self, file: &'a str, dest: &'a Path) -> Fut<'a, Result<(), Error>> {
        Box::pin(GeminiBatches::download(self, file, dest))
    }

    fn retrier(&self) -> crate::exec::retry::Retrier {
        self.http.retry.start()
    }
}

/// One input line: `{"key": custom_id, "request": body}`; the body is the online request's
/// as it is (the model is in the create's URL; Gemini's body never says `stream`).
pub fn write_line(out: &mut Vec<u8>, custom_id: &str, body: &[u8]) {
    out.clear();
    out.extend_from_slice(b"{\"key\":");
    serde_json::to_writer(&mut *out, custom_id).expect("a string serializes");
    out.extend_from_slice(b",\"request\":");
    out.extend_from_slice(body);
    out.extend_from_slice(b"}\n");
}

/// Reads one line of a responses file: a GenerateContentResponse is the row's answer; an
/// error (`error`, or a `status` object) fails the row with the API's message.
pub fn outcome(line: &[u8]) -> Answer {
    let v: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Answer::Failed {
                status: None,
                message: format!("unreadable result line ({e})"),
            }
        }
    };
    if let Some(r) = v.get("response").filter(|r| r.is_object()) {
        return match parse_response(r.to_string().as_bytes()) {
            Ok(c) => Answer::Answered(Box::new(c)),
            Err(e) => Answer::Failed {
                status: Some(200),
                message: format!("the answer is not a GenerateContentResponse: {}", e.message),
            },
        };
    }
    let e = v
        .get("error")
        .or_else(|| v.get("status"))
        .filter(|e| e.is_object());
    match e {
        Some(e) => {
            let code = e["code"].as_u64().and_then(|c| u16::try_from(c).ok());
            let http = match code {
                Some(c) if c >= 100 => Some(c),
                _ => None,
            };
            Answer::Failed {
                status: http,
                message: format!(
                    "{}{}",
                    e["message"].as_str().unwrap_or("the request failed"),
                    e["status"]
                        .as_str()
                        .map(|s| format!(" [{s}]"))
                        .unwrap_or_default()
                ),
            }
        }
        None => Answer::Failed {
            status: None,
            message: "a result line with neither a response nor an error".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_the_key_and_the_online_body() {
        let mut out = Vec::new();
        write_line(&mut out, "r1-ab", br#"{"contents":[]}"#);
        assert_eq!(out, b"{\"key\":\"r1-ab\",\"request\":{\"contents\":[]}}\n");
        let ok = br#"{"key":"r1-ab","response":{"candidates":[{"content":{"parts":[{"text":"hi"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1}}}"#;
        match outcome(ok) {
            Answer::Answered(c) => {
                assert_eq!((c.text.as_str(), c.usage.unwrap().prompt_tokens), ("hi", 3))
            }
            o => panic!("{o:?}"),
        }
        let bad =
            br#"{"key":"r1-ab","error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#;
        match outcome(bad) {
            Answer::Failed { status, message } => {
                assert_eq!(status, Some(400));
                assert!(message.contains("INVALID_ARGUMENT"), "{message}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn operations_become_batches_in_the_executors_words() {
        let op = json!({"name": "batches/abc", "metadata": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
            "name": "batches/abc", "displayName": "pm-part=p1-0001 job=j.toml out=o.jsonl",
            "state": "BATCH_STATE_SUCCEEDED", "createTime": "2026-01-01T00:00:00Z",
            "endTime": "2026-01-01T00:01:40.5Z",
            "batchStats": {"requestCount": "3", "successfulRequestCount": "2", "failedRequestCount": "1"},
            "output": {"responsesFile": "files/out-1"}}, "done": true});
        let b = to_batch(&op).unwrap();
        assert_eq!((b.id.as_str(), b.status.as_str()), ("abc", "completed"));
        assert_eq!(b.output_file_id.as_deref(), Some("files/out-1"));
        let c = b.request_counts.unwrap();
        assert_eq!((c.total, c.completed, c.failed), (3, 2, 1));
        assert_eq!(b.ended_at().unwrap() - b.created_at.unwrap(), 100);
        for (s, want) in [
            ("BATCH_STATE_PENDING", "validating"),
            ("BATCH_STATE_RUNNING", "in_progress"),
            ("BATCH_STATE_FAILED", "failed"),
            ("BATCH_STATE_CANCELLED", "cancelled"),
            ("BATCH_STATE_EXPIRED", "expired"),
            ("JOB_STATE_SUCCEEDED", "completed"),
        ] {
            assert_eq!(status_of(s), want);
        }
        let mut meta = serde_json::Map::new();
        meta.insert(super::super::META_PART.into(), "p7-0002".into());
        meta.insert("promptmill_job".into(), "my job.toml".into());
        assert_eq!(part_of(&display_name(&meta)), Some("p7-0002"));
        assert_eq!(part_of("someone else's"), None);
    }
}
