//! Anthropic's Message Batches API: `POST /v1/messages/batches` with the requests inline,
//! `GET …/{id}` to poll, `POST …/{id}/cancel`, and the results streamed from `results_url`.
//!
//! A part's file holds one `{"custom_id", "params"}` line a request, as the create's
//! `requests` array wants them; nothing is uploaded, so the file is "staged" where it lies and
//! the create streams it as the array (lines joined by commas), never loaded whole. Anthropic's
//! batches carry no metadata, so a create whose answer was lost is found by what is known of
//! it ([`Lookup`]): made after the step began, with as many requests as the part, and not a
//! batch the log already holds. Two such batches are none: the part stays `creating`, and
//! nothing is sent twice.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::api::{Batch, BatchApi, CreateFailed, Fut, Lookup};
use super::http::{failed, Http};
use super::results::Answer;
use super::state::LineCounts;
use crate::error::Error;
use crate::exec::retry::RetryPolicy;
use crate::ledger::journal::io_err;
use crate::provider::anthropic::{parse_message, status_error};
use crate::provider::endpoint::Endpoint;

/// Anthropic's Message Batches endpoints for one job.
pub struct AnthropicBatches {
    http: Http,
    endpoint: Endpoint,
}

/// How long before the create began a batch may say it was made: the server's clock and
/// this machine's may disagree by this much.
const CLOCK_SKEW_S: u64 = 60;

impl AnthropicBatches {
    pub fn for_job(job: &crate::job::Job) -> Result<AnthropicBatches, Error> {
        let endpoint = crate::backend::endpoint(job)?;
        // A create sends up to 256 MB: give it time, never less than the job's timeout.
        let client = endpoint
            .client(
                job.limits.timeout.max(std::time::Duration::from_secs(600)),
                2,
            )
            .map_err(Error::Other)?;
        Ok(AnthropicBatches {
            http: Http {
                client,
                key: endpoint.key().cloned(),
                retry: RetryPolicy::new(job.limits.max_retries),
                classify: status_error,
            },
            endpoint,
        })
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, Error> {
        self.endpoint
            .api_url(&format!("v1/messages/batches{path}"))
            .map_err(Error::Other)
    }

    /// Asks once for a batch of the part's requests, streamed from its file as the
    /// `requests` array. Never retried here: a create is not idempotent.
    async fn create_once(&self, staged: &str) -> Result<Batch, CreateFailed> {
        let path = PathBuf::from(staged);
        let (body, len) = requests_body(&path).await.map_err(CreateFailed::before)?;
        let url = self.url("").map_err(CreateFailed::before)?;
        let what = format!("creating a message batch of {}", path.display());
        let resp = self
            .http
            .attempt(
                self.http
                    .client
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(reqwest::Body::wrap_stream(body)),
            )
            .await
            .map_err(|e| CreateFailed::of(failed(&what, &e), e))?;
        // A 200 whose body is lost or garbled: the batch was made.
        let b: MessageBatch = self
            .http
            .json(&what, resp)
            .await
            .map_err(|error| CreateFailed {
                error,
                maybe_made: true,
                retry: None,
            })?;
        Ok(b.into_batch())
    }

    async fn retrieve(&self, id: &str) -> Result<Batch, Error> {
        let url = self.url(&format!("/{id}"))?;
        let what = format!("checking message batch {id}");
        let resp = self.http.get(&what, &url).await?;
        let b: MessageBatch = self.http.json(&what, resp).await?;
        Ok(b.into_batch())
    }

    async fn cancel(&self, id: &str) -> Result<Batch, Error> {
        let url = self.url(&format!("/{id}/cancel"))?;
        let what = format!("cancelling message batch {id}");
        let resp = self
            .http
            .call(&what, || async { Ok(self.http.client.post(url.clone())) })
            .await?;
        let b: MessageBatch = self.http.json(&what, resp).await?;
        Ok(b.into_batch())
    }

    /// The one batch that can be the lost part's; none when there is none, or more than one.
    async fn find_batch(&self, lost: &Lookup) -> Result<Option<Batch>, Error> {
        let mut after: Option<String> = None;
        let mut found: Vec<MessageBatch> = Vec::new();
        let since = lost.since.saturating_sub(CLOCK_SKEW_S);
        loop {
            let mut url = self.url("")?;
            url.query_pairs_mut().append_pair("limit", "100");
            if let Some(a) = &after {
                url.query_pairs_mut().append_pair("after_id", a);
            }
            let what = "listing message batches";
            let resp = self.http.get(what, &url).await?;
            let list: List = self.http.json(what, resp).await?;
            let mut older = false;
            for b in list.data {
                let made = b.created_at.as_deref().and_then(epoch).unwrap_or(u64::MAX);
                // Newest first: past the moment the step began, it cannot be there.
                older |= made < since;
                if made >= since && b.total() == lost.requests && !lost.known.contains(&b.id) {
                    found.push(b);
                }
            }
            match (&list.last_id, list.has_more && !older) {
                (Some(last), true) => after = Some(last.clone()),
                _ => break,
            }
        }
        if found.len() > 1 {
            found = self.narrow(found, &lost.file).await?;
        }
        if found.len() > 1 {
            let ids: Vec<&str> = found.iter().map(|b| b.id.as_str()).collect();
            return Err(Error::Other(format!(
                "part {}: its create's answer was lost, and {} batches still running could \
                 be it ({}); the part stays unsettled so that nothing is sent twice, and the \
                 next run looks again once they have ended",
                lost.part,
                found.len(),
                ids.join(", ")
            )));
        }
        Ok(found.pop().map(MessageBatch::into_batch))
    }

    /// Of several candidates, the one whose results name a request of the part's file, if one
    /// has ended and does; else those not ruled out (an ended batch whose results name
    /// another's requests is not this part's).
    async fn narrow(
        &self,
        found: Vec<MessageBatch>,
        file: &Path,
    ) -> Result<Vec<MessageBatch>, Error> {
        let mut open = Vec::new();
        for b in found {
            let Some(url) = b
                .results_url
                .clone()
                .filter(|_| b.processing_status == "ended")
            else {
                open.push(b);
                continue;
            };
            match self.first_custom_id(&url).await? {
                Some(id) if part_holds(file, &id)? => return Ok(vec![b]),
                Some(_) => {} // another part's or another job's batch
                None => open.push(b),
            }
        }
        Ok(open)
    }

    /// The `custom_id` of a batch's first result line, read from the stream's start.
    async fn first_custom_id(&self, results_url: &str) -> Result<Option<String>, Error> {
        let url = self.results_url(results_url)?;
        let what = "reading a message batch's first result";
        let resp = self.http.get(what, &url).await?;
        let mut stream = resp.bytes_stream();
        let mut head = Vec::new();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            head.extend_from_slice(&chunk);
            if head.contains(&b'\n') || head.len() > 1 << 20 {
                break;
            }
        }
        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
        #[derive(Deserialize)]
        struct Head {
            custom_id: String,
        }
        Ok(serde_json::from_slice::<Head>(line)
            .ok()
            .map(|h| h.custom_id))
    }

    /// A `results_url`, if it is on the API's own host: the key goes with the request, so
    /// one elsewhere is refused, not followed.
    fn results_url(&self, results_url: &str) -> Result<reqwest::Url, Error> {
        let url = reqwest::Url::parse(results_url)
            .map_err(|e| Error::Other(format!("the batch's results_url {results_url}: {e}")))?;
        if url.origin() != self.url("")?.origin() {
            return Err(Error::Other(format!(
                "the batch's results are on another host ({}); they are not fetched, since \
                 the API key would go with the request",
                url.origin().ascii_serialization()
            )));
        }
        Ok(url)
    }

    /// Streams a batch's results to `dest`. Only from the API's own host: the key goes with
    /// the request, so a `results_url` elsewhere is refused, not followed.
    async fn download(&self, results_url: &str, dest: &Path) -> Result<(), Error> {
        let url = self.results_url(results_url)?;
        self.http
            .download("downloading message batch results", &url, dest)
            .await
    }
}

/// Whether the part's file holds a line for `custom_id` (each line starts with it).
fn part_holds(file: &Path, custom_id: &str) -> Result<bool, Error> {
    use std::io::BufRead;
    let Ok(f) = std::fs::File::open(file) else {
        return Ok(false); // the file is gone: nothing to check against
    };
    let mut prefix = b"{\"custom_id\":".to_vec();
    serde_json::to_writer(&mut prefix, custom_id).expect("a string serializes");
    for line in std::io::BufReader::new(f).split(b'\n') {
        if line.map_err(|e| io_err(file, e))?.starts_with(&prefix) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The create's body, `{"requests":[line,line,…]}`, streamed from the part's file: every
/// newline but the last becomes a comma (a line is JSON that never holds a raw newline).
/// Also its length, sent as `Content-Length` (a proxy may refuse a chunked upload).
async fn requests_body(
    path: &Path,
) -> Result<
    (
        impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
        u64,
    ),
    Error,
> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| io_err(path, e))?;
    let len = file.metadata().await.map_err(|e| io_err(path, e))?.len();
    // The head and tail, less the last line's newline (every line ends with one).
    let total = len + 15 - u64::from(ends_with_newline(path)?);
    let mut pos = 0u64;
    let lines = tokio_util::io::ReaderStream::new(file).map(move |chunk| {
        chunk.map(|c| {
            let start = pos;
            pos += c.len() as u64;
            let mut out = c.to_vec();
            for (i, b) in out.iter_mut().enumerate() {
                if *b == b'\n' && start + (i as u64) + 1 < len {
                    *b = b',';
                }
            }
            if pos == len && out.last() == Some(&b'\n') {
                out.pop();
            }
            bytes::Bytes::from(out)
        })
    });
    let head = futures::stream::once(async {
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"requests\":["))
    });
    let tail =
        futures::stream::once(async { Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"]}")) });
    Ok((head.chain(lines).chain(tail), total))
}

fn ends_with_newline(path: &Path) -> Result<bool, Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    if f.metadata().map_err(|e| io_err(path, e))?.len() == 0 {
        return Ok(false);
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::End(-1))
        .and_then(|_| f.read_exact(&mut last))
        .map_err(|e| io_err(path, e))?;
    Ok(last[0] == b'\n')
}

/// A Message Batch as the API describes it.
#[derive(Debug, Deserialize)]
struct MessageBatch {
    id: String,
    processing_status: String,
    #[serde(default)]
    request_counts: Counts,
    created_at: Option<String>,
    ended_at: Option<String>,
    expires_at: Option<String>,
    cancel_initiated_at: Option<String>,
    results_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Counts {
    #[serde(default)]
    processing: u64,
    #[serde(default)]
    succeeded: u64,
    #[serde(default)]
    errored: u64,
    #[serde(default)]
    canceled: u64,
    #[serde(default)]
    expired: u64,
}

#[derive(Deserialize)]
struct List {
    data: Vec<MessageBatch>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// An RFC 3339 time as seconds since the epoch.
fn epoch(t: &str) -> Option<u64> {
    let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp()).ok()
}

impl MessageBatch {
    fn total(&self) -> u64 {
        let c = &self.request_counts;
        c.processing + c.succeeded + c.errored + c.canceled + c.expired
    }

    /// In the executor's vocabulary: `in_progress`, `cancelling`, and once ended `cancelled`
    /// (a cancel was asked for), `expired` (nothing ran before the 24 hours were up) or
    /// `completed`. Every ended batch's results are read: lines that never ran are pending.
    fn into_batch(self) -> Batch {
        let c = &self.request_counts;
        let status = match self.processing_status.as_str() {
            "ended" if self.cancel_initiated_at.is_some() => "cancelled",
            "ended" if c.expired > 0 && c.succeeded + c.errored == 0 => "expired",
            "ended" => "completed",
            "canceling" => "cancelling",
            _ => "in_progress",
        };
        let ended = status != "in_progress" && status != "cancelling";
        let mut times = Map::new();
        if let Some(t) = self.ended_at.as_deref().and_then(epoch) {
            times.insert("completed_at".into(), t.into());
        }
        Batch {
            request_counts: Some(LineCounts {
                total: self.total(),
                completed: c.succeeded,
                failed: c.errored,
            }),
            status: status.to_string(),
            output_file_id: self.results_url.filter(|_| ended),
            error_file_id: None,
            created_at: self.created_at.as_deref().and_then(epoch),
            expires_at: self.expires_at.as_deref().and_then(epoch),
            errors: None,
            metadata: None,
            times,
            id: self.id,
        }
    }
}

impl BatchApi for AnthropicBatches {
    fn write_line(&self, out: &mut Vec<u8>, custom_id: &str, body: &[u8], stream: bool) {
        write_line(out, custom_id, body, stream);
    }

    /// Within Anthropic's `^[a-zA-Z0-9_-]{1,64}$`.
    fn custom_id(&self, row: u64, fp: &[u8; 16], idh: u64) -> String {
        super::results::compact_custom_id(row, fp, idh)
    }

    fn outcome(&self) -> fn(&[u8]) -> Answer {
        outcome
    }

    /// Nothing to upload: the create reads the part's file where it lies.
    fn stage<'a>(&'a self, path: &'a Path, _name: &'a str) -> Fut<'a, Result<String, Error>> {
        Box::pin(async move { Ok(path.to_string_lossy().into_owned()) })
    }

    fn find_staged<'a>(&'a self, _name: &'a str) -> Fut<'a, Result<Option<String>, Error>> {
        Box::pin(async { Ok(None) })
    }

    fn unstage<'a>(&'a self, _handle: &'a str) -> Fut<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn create_once<'a>(
        &'a self,
        staged: &'a str,
        _metadata: &'a Map<String, Value>,
    ) -> Fut<'a, Result<Batch, CreateFailed>> {
        Box::pin(AnthropicBatches::create_once(self, staged))
    }

    fn find_batch<'a>(&'a self, lost: &'a Lookup) -> Fut<'a, Result<Option<Batch>, Error>> {
        Box::pin(AnthropicBatches::find_batch(self, lost))
    }

    fn retrieve<'a>(&'a self, id: &'a str) -> Fut<'a, Result<Batch, Error>> {
        Box::pin(AnthropicBatches::retrieve(self, id))
    }

    fn cancel<'a>(&'a self, id: &'a str) -> Fut<'a, Result<Batch, Error>> {
        Box::pin(AnthropicBatches::cancel(self, id))
    }

    fn download<'a>(&'a self, file: &'a str, dest: &'a Path) -> Fut<'a, Result<(), Error>> {
        Box::pin(AnthropicBatches::download(self, file, dest))
    }

    fn retrier(&self) -> crate::exec::retry::Retrier {
        self.http.retry.start()
    }
}

/// One request of a part: `{"custom_id", "params"}`, the online request's body without
/// `stream` (a batch answers whole).
pub fn write_line(out: &mut Vec<u8>, custom_id: &str, body: &[u8], stream: bool) {
    out.clear();
    out.extend_from_slice(b"{\"custom_id\":");
    serde_json::to_writer(&mut *out, custom_id).expect("a string serializes");
    out.extend_from_slice(b",\"params\":");
    if stream {
        let mut v: Map<String, Value> = serde_json::from_slice(body).expect("our own body parses");
        v.remove("stream");
        serde_json::to_writer(&mut *out, &v).expect("serializes");
    } else {
        out.extend_from_slice(body);
    }
    out.extend_from_slice(b"}\n");
}

#[derive(Deserialize)]
struct ResultLine<'a> {
    #[serde(borrow)]
    result: LineResult<'a>,
}

#[derive(Deserialize)]
struct LineResult<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Value>,
}

/// Reads one result line. `succeeded` is the message; `canceled` and `expired` never ran
/// (pending); `errored` fails its row when the request itself was refused (the API's 4xx
/// types), and is pending otherwise (`api_error`, `overloaded_error`: Anthropic bills no
/// errored request, so the next run sends it again).
pub fn outcome(line: &[u8]) -> Answer {
    let parsed: ResultLine = match serde_json::from_slice(line) {
        Ok(l) => l,
        Err(e) => {
            return Answer::Failed {
                status: None,
                message: format!("unreadable result line ({e})"),
            }
        }
    };
    let r = parsed.result;
    match r.kind {
        "succeeded" => {
            let body = r.message.map(|m| m.get().as_bytes()).unwrap_or(b"null");
            match parse_message(body) {
                Ok(c) => Answer::Answered(Box::new(c)),
                Err(e) => Answer::Failed {
                    status: Some(200),
                    message: format!("the answer is not a message: {}", e.message),
                },
            }
        }
        "errored" => {
            // `{"type": "error", "error": {"type", "message"}}`, as the online API's body.
            let err = r.error.unwrap_or_default();
            let inner = err.get("error").unwrap_or(&err);
            let etype = inner["type"].as_str().unwrap_or("api_error");
            let message = inner["message"].as_str().unwrap_or("the request failed");
            let status = match etype {
                "invalid_request_error" => 400,
                "authentication_error" => 401,
                "permission_error" => 403,
                "not_found_error" => 404,
                "request_too_large" => 413,
                _ => return Answer::NotRun,
            };
            Answer::Failed {
                status: Some(status),
                message: format!("{message} [{etype}]"),
            }
        }
        "canceled" | "expired" => Answer::NotRun,
        other => Answer::Failed {
            status: None,
            message: format!("a result of an unknown type `{other}`"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_answers_failures_or_not_run() {
        let ok = br#"{"custom_id":"r1-x-y","result":{"type":"succeeded","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":5,"output_tokens":1,"cache_read_input_tokens":3}}}}"#;
        match outcome(ok) {
            Answer::Answered(c) => {
                assert_eq!(c.text, "hi");
                let u = c.usage.unwrap();
                assert_eq!((u.prompt_tokens, u.cached_tokens), (8, Some(3)));
            }
            o => panic!("{o:?}"),
        }
        let bad = br#"{"custom_id":"a","result":{"type":"errored","error":{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too large"}}}}"#;
        match outcome(bad) {
            Answer::Failed { status, message } => {
                assert_eq!(status, Some(400));
                assert!(message.contains("max_tokens: too large"), "{message}");
            }
            o => panic!("{o:?}"),
        }
        let server = br#"{"custom_id":"a","result":{"type":"errored","error":{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}}}"#;
        assert!(matches!(outcome(server), Answer::NotRun));
        for kind in ["canceled", "expired"] {
            let line = format!(r#"{{"custom_id":"a","result":{{"type":"{kind}"}}}}"#);
            assert!(matches!(outcome(line.as_bytes()), Answer::NotRun));
        }
    }

    #[test]
    fn batches_translate_into_the_executors_states() {
        let b = |status: &str, cancel: bool, counts: Value| {
            let mut v = serde_json::json!({
                "id": "msgbatch_1", "type": "message_batch", "processing_status": status,
                "request_counts": counts, "created_at": "2026-01-01T00:00:00Z",
                "ended_at": "2026-01-01T00:10:00Z", "expires_at": "2026-01-02T00:00:00Z",
                "results_url": "https://api.anthropic.com/v1/messages/batches/msgbatch_1/results",
            });
            if cancel {
                v["cancel_initiated_at"] = "2026-01-01T00:05:00Z".into();
            }
            serde_json::from_value::<MessageBatch>(v)
                .unwrap()
                .into_batch()
        };
        let running = b("in_progress", false, serde_json::json!({"processing": 3}));
        assert_eq!(running.status, "in_progress");
        assert!(running.output_file_id.is_none() && !running.is_final());
        let done = b(
            "ended",
            false,
            serde_json::json!({"succeeded": 2, "errored": 1}),
        );
        assert_eq!(done.status, "completed");
        assert!(done.output_file_id.is_some());
        let c = done.request_counts.unwrap();
        assert_eq!((c.total, c.completed, c.failed), (3, 2, 1));
        assert_eq!(done.ended_at(), Some(1_767_225_600 + 600));
        assert_eq!(done.created_at, Some(1_767_225_600));
        let cancelled = b("ended", true, serde_json::json!({"canceled": 3}));
        assert_eq!(cancelled.status, "cancelled");
        assert!(cancelled.output_file_id.is_some());
        let expired = b("ended", false, serde_json::json!({"expired": 3}));
        assert_eq!(expired.status, "expired");
        assert_eq!(
            b("canceling", true, serde_json::json!({})).status,
            "cancelling"
        );
    }

    #[test]
    fn lines_are_custom_id_and_params_without_stream() {
        let api = AnthropicBatches {
            http: Http {
                client: reqwest::Client::new(),
                key: None,
                retry: RetryPolicy::new(0),
                classify: status_error,
            },
            endpoint: Endpoint::new(
                "http://127.0.0.1:1",
                None,
                None,
                crate::provider::endpoint::Auth::XApiKey,
                None,
                Vec::new(),
            ),
        };
        let mut out = Vec::new();
        api.write_line(&mut out, "r1-a-b", br#"{"model":"m","stream":true}"#, true);
        assert_eq!(
            out,
            b"{\"custom_id\":\"r1-a-b\",\"params\":{\"model\":\"m\"}}\n"
        );
    }

    #[tokio::test]
    async fn the_create_body_is_the_files_lines_as_one_array() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p1.jsonl");
        // Enough lines that the file arrives in several chunks.
        let mut text = String::new();
        for i in 0..5000 {
            text.push_str(&format!(
                "{{\"custom_id\":\"r{i}\",\"params\":{{\"t\":\"a\\nb\"}}}}\n"
            ));
        }
        std::fs::write(&p, &text).unwrap();
        let (body, len) = requests_body(&p).await.unwrap();
        let mut body = Box::pin(body);
        let mut bytes = Vec::new();
        while let Some(c) = body.next().await {
            bytes.extend_from_slice(&c.unwrap());
        }
        assert_eq!(
            bytes.len() as u64,
            len,
            "Content-Length is the body's length"
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let reqs = v["requests"].as_array().unwrap();
        assert_eq!(reqs.len(), 5000);
        assert_eq!(reqs[4999]["custom_id"], "r4999");
        assert_eq!(reqs[0]["params"]["t"], "a\nb");
    }
}
