//! OpenAI's Batch API (and Azure OpenAI's, the same on its own routes): the input line
//! (`{custom_id, method, url, body}`), the result line, and the Files and Batches endpoints
//! (upload, create, retrieve, cancel, list, download). Every call but a create is retried like
//! a chat request (429, 5xx, connection) and classified by the same error table; the key never
//! appears in what it reports. The first vendor behind [`BatchApi`].

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::api::{Batch, BatchApi, CreateFailed, Fut, Lookup};
use super::http::{failed, Http};
use super::results::Answer;
use crate::error::Error;
use crate::exec::retry::RetryPolicy;
use crate::ledger::journal::io_err;
use crate::provider::endpoint::Endpoint;
use crate::provider::openai::{parse_completion, status_error};

#[derive(Deserialize)]
struct FileObject {
    id: String,
    #[serde(default)]
    filename: Option<String>,
    #[serde(default)]
    created_at: Option<u64>,
}

#[derive(Deserialize)]
struct List<T> {
    data: Vec<T>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// OpenAI's (or Azure's) Files and Batches endpoints for one job.
pub struct OpenAiBatches {
    http: Http,
    endpoint: Endpoint,
    /// The route each line names, and the model its body must name when it is not the job's
    /// (Azure: the deployment).
    line_url: &'static str,
    line_model: Option<String>,
}

impl OpenAiBatches {
    pub fn new(
        endpoint: Endpoint,
        timeout: Duration,
        max_retries: u32,
    ) -> Result<OpenAiBatches, Error> {
        // Uploads are up to 200 MB: give them time, and never less than the job's timeout.
        let http = endpoint
            .client(timeout.max(Duration::from_secs(600)), 2)
            .map_err(Error::Other)?;
        Ok(OpenAiBatches {
            http: Http {
                client: http,
                key: endpoint.key().cloned(),
                retry: RetryPolicy::new(max_retries),
                classify: |key, status, body| status_error(key, status, body, None, None),
            },
            line_url: endpoint.batch_line_url(),
            line_model: None,
            endpoint,
        })
    }

    /// The job's endpoint, key, timeout and retries.
    pub fn for_job(job: &crate::job::Job) -> Result<OpenAiBatches, Error> {
        let mut b = OpenAiBatches::new(
            crate::backend::endpoint(job)?,
            job.limits.timeout,
            job.limits.max_retries,
        )?;
        let m = b.endpoint.batch_line_model(&job.served.model);
        b.line_model = (m != job.served.model).then(|| m.to_string());
        Ok(b)
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, Error> {
        self.endpoint.api_url(path).map_err(Error::Other)
    }

    /// Uploads a batch input file (purpose `batch`), streamed from disk; returns its id.
    pub async fn upload(&self, path: &Path, name: &str) -> Result<String, Error> {
        let url = self.url("files")?;
        let what = format!("uploading {}", path.display());
        let resp = self
            .http
            .call(&what, || async {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| io_err(path, e))?;
                let len = file.metadata().await.map_err(|e| io_err(path, e))?.len();
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
                let part = reqwest::multipart::Part::stream_with_length(body, len)
                    .file_name(name.to_string())
                    .mime_str("application/jsonl")
                    .expect("a valid mime type");
                let form = reqwest::multipart::Form::new()
                    .text("purpose", "batch")
                    .part("file", part);
                Ok(self.http.client.post(url.clone()).multipart(form))
            })
            .await?;
        let f: FileObject = self.http.json(&what, resp).await?;
        Ok(f.id)
    }

    /// The uploaded batch files whose name is `name`, newest first.
    pub async fn find_file(&self, name: &str) -> Result<Option<String>, Error> {
        let mut url = self.url("files")?;
        url.query_pairs_mut().append_pair("purpose", "batch");
        let what = "listing uploaded files";
        let resp = self
            .http
            .call(what, || async { Ok(self.http.client.get(url.clone())) })
            .await?;
        let list: List<FileObject> = self.http.json(what, resp).await?;
        Ok(list
            .data
            .into_iter()
            .filter(|f| f.filename.as_deref() == Some(name))
            .max_by_key(|f| f.created_at.unwrap_or(0))
            .map(|f| f.id))
    }

    pub async fn delete_file(&self, id: &str) -> Result<(), Error> {
        let url = self.url(&format!("files/{id}"))?;
        self.http
            .call("deleting a file", || async {
                Ok(self.http.client.delete(url.clone()))
            })
            .await?;
        Ok(())
    }

    /// Asks for a batch once. Creating one is not idempotent, so this never retries: the
    /// caller looks the batch up by its metadata after a failure that may have made it
    /// (`CreateFailed::maybe_made`) before it asks again.
    pub async fn create_once(
        &self,
        file_id: &str,
        metadata: &serde_json::Map<String, Value>,
    ) -> Result<Batch, CreateFailed> {
        let url = self.url("batches").map_err(CreateFailed::before)?;
        let body = serde_json::json!({
            "input_file_id": file_id,
            "endpoint": self.endpoint.batch_line_url(),
            "completion_window": "24h",
            "metadata": metadata,
        });
        let what = format!("creating a batch from {file_id}");
        let resp = self
            .http
            .attempt(self.http.client.post(url).json(&body))
            .await
            .map_err(|e| CreateFailed::of(failed(&what, &e), e))?;
        // A 200 whose body is lost or garbled: the batch was made.
        self.http
            .json(&what, resp)
            .await
            .map_err(|error| CreateFailed {
                error,
                maybe_made: true,
                retry: None,
            })
    }

    pub async fn retrieve(&self, id: &str) -> Result<Batch, Error> {
        let url = self.url(&format!("batches/{id}"))?;
        let what = format!("checking batch {id}");
        let resp = self
            .http
            .call(&what, || async { Ok(self.http.client.get(url.clone())) })
            .await?;
        self.http.json(&what, resp).await
    }

    pub async fn cancel(&self, id: &str) -> Result<Batch, Error> {
        let url = self.url(&format!("batches/{id}/cancel"))?;
        let what = format!("cancelling batch {id}");
        let resp = self
            .http
            .call(&what, || async { Ok(self.http.client.post(url.clone())) })
            .await?;
        self.http.json(&what, resp).await
    }

    /// The batch created from part `part` at or after `since`, found by its metadata: a run
    /// killed between asking for a batch and recording its id adopts it instead of
    /// submitting again.
    pub async fn find_batch(&self, lost: &Lookup) -> Result<Option<Batch>, Error> {
        let (part, since) = (lost.part.as_str(), lost.since);
        let mut after: Option<String> = None;
        loop {
            let mut url = self.url("batches")?;
            url.query_pairs_mut().append_pair("limit", "100");
            if let Some(a) = &after {
                url.query_pairs_mut().append_pair("after", a);
            }
            let what = "listing batches";
            let resp = self
                .http
                .call(what, || async { Ok(self.http.client.get(url.clone())) })
                .await?;
            let list: List<Batch> = self.http.json(what, resp).await?;
            let mut older = false;
            for b in &list.data {
                let mine = b
                    .metadata
                    .as_ref()
                    .and_then(|m| m.get(super::META_PART))
                    .and_then(Value::as_str)
                    == Some(part);
                if mine {
                    return Ok(Some(b.clone()));
                }
                // Newest first: past the moment the step began, it cannot be there.
                older |= b.created_at.is_some_and(|c| c + 60 < since);
            }
            if !list.has_more || older || list.data.is_empty() {
                return Ok(None);
            }
            after = list
                .last_id
                .or_else(|| list.data.last().map(|b| b.id.clone()));
        }
    }

    /// Downloads a file's content to `dest`, whole or not at all.
    pub async fn download(&self, file_id: &str, dest: &Path) -> Result<(), Error> {
        let url = self.url(&format!("files/{file_id}/content"))?;
        self.http
            .download(&format!("downloading {file_id}"), &url, dest)
            .await
    }
}

impl BatchApi for OpenAiBatches {
    fn write_line(&self, out: &mut Vec<u8>, custom_id: &str, body: &[u8], stream: bool) {
        write_line(
            out,
            self.line_url,
            self.line_model.as_deref(),
            custom_id,
            body,
            stream,
        );
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
        Box::pin(OpenAiBatches::create_once(self, staged, metadata))
    }

    fn find_batch<'a>(&'a self, lost: &'a Lookup) -> Fut<'a, Result<Option<Batch>, Error>> {
        Box::pin(OpenAiBatches::find_batch(self, lost))
    }

    fn retrieve<'a>(&'a self, id: &'a str) -> Fut<'a, Result<Batch, Error>> {
        Box::pin(OpenAiBatches::retrieve(self, id))
    }

    fn cancel<'a>(&'a self, id: &'a str) -> Fut<'a, Result<Batch, Error>> {
        Box::pin(OpenAiBatches::cancel(self, id))
    }

    fn download<'a>(&'a self, file: &'a str, dest: &'a Path) -> Fut<'a, Result<(), Error>> {
        Box::pin(OpenAiBatches::download(self, file, dest))
    }

    fn retrier(&self) -> crate::exec::retry::Retrier {
        self.http.retry.start()
    }
}

/// A row's request as OpenAI's Batch API reads it, and engines that read the same files
/// (vLLM's `run-batch`): OpenAI's route, the job's own model. What `export` writes and the
/// dry run sizes.
pub fn write_openai_line(out: &mut Vec<u8>, p: &crate::request::Prepared, idh: u64, stream: bool) {
    let id = super::results::custom_id(p.row.number, &p.fingerprint, idh);
    write_line(
        out,
        "/v1/chat/completions",
        None,
        &id,
        &p.request.body,
        stream,
    );
}

/// One Batch API input line: `{"custom_id", "method", "url", "body"}`. The body is the online
/// request's, without streaming (the Batch API answers whole) and, where the service wants
/// it, naming the deployment.
fn write_line(
    out: &mut Vec<u8>,
    url: &str,
    model: Option<&str>,
    custom_id: &str,
    body: &[u8],
    stream: bool,
) {
    out.clear();
    out.extend_from_slice(b"{\"custom_id\":");
    serde_json::to_writer(&mut *out, custom_id).expect("a string serializes");
    out.extend_from_slice(b",\"method\":\"POST\",\"url\":");
    serde_json::to_writer(&mut *out, url).expect("a string serializes");
    out.extend_from_slice(b",\"body\":");
    if !stream && model.is_none() {
        out.extend_from_slice(body);
    } else {
        let mut v: serde_json::Map<String, Value> =
            serde_json::from_slice(body).expect("our own body parses");
        v.remove("stream");
        v.remove("stream_options");
        if let Some(m) = model {
            v.insert("model".into(), Value::String(m.to_string()));
        }
        serde_json::to_writer(&mut *out, &v).expect("serializes");
    }
    out.extend_from_slice(b"}\n");
}

#[derive(Deserialize)]
struct ResultLine<'a> {
    #[serde(borrow, default)]
    response: Option<Response<'a>>,
    #[serde(default)]
    error: Option<LineError>,
}

#[derive(Deserialize)]
struct Response<'a> {
    status_code: u16,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct LineError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Reads one result line. A line whose `response.status_code` is not 2xx fails its row with
/// the API's message, whether or not `error` is set.
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
    match (parsed.response, parsed.error) {
        (Some(r), _) if (200..300).contains(&r.status_code) => {
            let body = r.body.map(|b| b.get().as_bytes()).unwrap_or(b"null");
            match parse_completion(body) {
                Ok(c) => Answer::Answered(Box::new(c)),
                Err(e) => Answer::Failed {
                    status: Some(r.status_code),
                    message: format!("the answer is not a chat completion: {}", e.message),
                },
            }
        }
        (Some(r), _) => {
            let body = r.body.map(|b| b.get().as_bytes()).unwrap_or(b"");
            let e = status_error(None, r.status_code, body, None, None);
            Answer::Failed {
                status: Some(r.status_code),
                message: e.message,
            }
        }
        (None, Some(e))
            if matches!(e.code.as_deref(), Some("batch_expired" | "batch_cancelled")) =>
        {
            Answer::NotRun
        }
        (None, Some(e)) => Answer::Failed {
            status: None,
            message: format!(
                "{}{}",
                e.message.as_deref().unwrap_or("the request failed"),
                e.code.map(|c| format!(" [{c}]")).unwrap_or_default()
            ),
        },
        (None, None) => Answer::Failed {
            status: None,
            message: "a result line with neither a response nor an error".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_2xx_line_fails_with_the_apis_message_even_when_error_is_null() {
        let line = br#"{"id":"b1","custom_id":"r1-x","response":{"status_code":400,"request_id":"q","body":{"error":{"message":"bad max_tokens","type":"invalid_request_error","code":"invalid_value"}}},"error":null}"#;
        match outcome(line) {
            Answer::Failed { status, message } => {
                assert_eq!(status, Some(400));
                assert!(message.contains("bad max_tokens"), "{message}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn expired_lines_are_not_run_and_answers_parse() {
        let line = br#"{"custom_id":"r1-x","response":null,"error":{"code":"batch_expired","message":"expired"}}"#;
        assert!(matches!(outcome(line), Answer::NotRun));
        let line = br#"{"custom_id":"r1-x","response":{"status_code":200,"body":{"model":"m","choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}},"error":null}"#;
        match outcome(line) {
            Answer::Answered(c) => {
                assert_eq!(c.text, "hi");
                assert_eq!(c.usage.unwrap().prompt_tokens, 3);
            }
            o => panic!("{o:?}"),
        }
    }
}
