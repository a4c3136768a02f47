//! The Files and Batches endpoints: upload, create, retrieve, cancel, list, download. Every
//! call is retried like a chat request (429, 5xx, connection) and classified by the same
//! error table; the key never appears in what it reports.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::state::LineCounts;
use crate::error::Error;
use crate::exec::retry::RetryPolicy;
use crate::ledger::journal::io_err;
use crate::provider::endpoint::Endpoint;
use crate::provider::openai::{status_error, transport_error};
use crate::provider::{ErrorKind, ProviderError};

/// A batch as the API describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Batch {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub request_counts: Option<LineCounts>,
    #[serde(default)]
    pub created_at: Option<u64>,
    #[serde(default)]
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub errors: Option<BatchErrors>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
    #[serde(flatten)]
    pub times: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchErrors {
    #[serde(default)]
    pub data: Vec<BatchError>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub line: Option<u64>,
}

impl Batch {
    pub fn is_final(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }

    /// When it reached its final status (seconds since the epoch), if the API says.
    pub fn ended_at(&self) -> Option<u64> {
        ["completed_at", "failed_at", "expired_at", "cancelled_at"]
            .iter()
            .find_map(|k| self.times.get(*k).and_then(Value::as_u64))
    }

    /// A failed batch's validation errors, each with its line number.
    pub fn problems(&self) -> Vec<String> {
        self.errors
            .iter()
            .flat_map(|e| &e.data)
            .map(|e| {
                let line = e.line.map(|l| format!("line {l}: ")).unwrap_or_default();
                let code = e
                    .code
                    .as_deref()
                    .map(|c| format!(" [{c}]"))
                    .unwrap_or_default();
                format!("{line}{}{code}", e.message.as_deref().unwrap_or("invalid"))
            })
            .collect()
    }
}

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

/// A create that failed. `maybe_made`: the request may have reached the server and made the
/// batch (a timeout, a reset, a 5xx, an answer that did not parse); a refused connection, a
/// 4xx or a 429 made nothing.
#[derive(Debug)]
pub struct CreateFailed {
    pub error: Error,
    pub maybe_made: bool,
    /// The failure as the retry policy judges it; None: not to be retried.
    pub retry: Option<ProviderError>,
}

impl CreateFailed {
    fn before(error: Error) -> CreateFailed {
        CreateFailed {
            error,
            maybe_made: false,
            retry: None,
        }
    }

    fn of(what: &str, e: ProviderError) -> CreateFailed {
        let maybe_made = !e.unreachable
            && matches!(
                e.kind,
                ErrorKind::Server
                    | ErrorKind::Timeout
                    | ErrorKind::Connection
                    | ErrorKind::InvalidResponse
            );
        CreateFailed {
            error: failed(what, &e),
            maybe_made,
            retry: Some(e),
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    endpoint: Endpoint,
    retry: RetryPolicy,
}

/// A call that failed after its retries, as the user reads it.
fn failed(what: &str, e: &ProviderError) -> Error {
    Error::Other(format!("{what}: {e}"))
}

impl Client {
    pub fn new(endpoint: Endpoint, timeout: Duration, max_retries: u32) -> Result<Client, Error> {
        // Uploads are up to 200 MB: give them time, and never less than the job's timeout.
        let http = endpoint
            .client(timeout.max(Duration::from_secs(600)), 2)
            .map_err(Error::Other)?;
        Ok(Client {
            http,
            endpoint,
            retry: RetryPolicy::new(max_retries),
        })
    }

    /// The job's endpoint, key, timeout and retries.
    pub fn for_job(job: &crate::job::Job) -> Result<Client, Error> {
        Client::new(
            crate::backend::endpoint(job)?,
            job.limits.timeout,
            job.limits.max_retries,
        )
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, Error> {
        self.endpoint.api_url(path).map_err(Error::Other)
    }

    /// One attempt: the response if it succeeded, else the failure as the error table
    /// classifies it.
    async fn attempt(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        match req.send().await {
            Ok(resp) if resp.status().is_success() => Ok(resp),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.bytes().await.unwrap_or_default();
                Err(status_error(self.endpoint.key(), status, &body, None, None))
            }
            Err(e) => Err(transport_error(self.endpoint.key(), e)),
        }
    }

    /// Sends what `make` builds until it succeeds, or fails in a way retrying cannot fix.
    /// Only for calls that are safe to repeat: a create is not (see `create`).
    async fn call<F, Fut>(&self, what: &str, make: F) -> Result<reqwest::Response, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<reqwest::RequestBuilder, Error>>,
    {
        let mut retrier = self.retry.start();
        loop {
            let err = match self.attempt(make().await?).await {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            match retrier.next_delay(&err) {
                Some(d) => {
                    tracing::debug!("{what}: retrying in {d:?}: {err}");
                    tokio::time::sleep(d).await;
                }
                None => return Err(failed(what, &err)),
            }
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        resp: reqwest::Response,
    ) -> Result<T, Error> {
        let body = resp
            .bytes()
            .await
            .map_err(|e| failed(what, &transport_error(self.endpoint.key(), e)))?;
        serde_json::from_slice(&body).map_err(|e| {
            failed(
                what,
                &ProviderError::new(
                    ErrorKind::InvalidResponse,
                    format!("unexpected answer ({e})"),
                ),
            )
        })
    }

    /// Uploads a batch input file (purpose `batch`), streamed from disk; returns its id.
    pub async fn upload(&self, path: &Path, name: &str) -> Result<String, Error> {
        let url = self.url("files")?;
        let what = format!("uploading {}", path.display());
        let resp = self
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
                Ok(self.http.post(url.clone()).multipart(form))
            })
            .await?;
        let f: FileObject = self.json(&what, resp).await?;
        Ok(f.id)
    }

    /// The uploaded batch files whose name is `name`, newest first.
    pub async fn find_file(&self, name: &str) -> Result<Option<String>, Error> {
        let mut url = self.url("files")?;
        url.query_pairs_mut().append_pair("purpose", "batch");
        let what = "listing uploaded files";
        let resp = self
            .call(what, || async { Ok(self.http.get(url.clone())) })
            .await?;
        let list: List<FileObject> = self.json(what, resp).await?;
        Ok(list
            .data
            .into_iter()
            .filter(|f| f.filename.as_deref() == Some(name))
            .max_by_key(|f| f.created_at.unwrap_or(0))
            .map(|f| f.id))
    }

    pub async fn delete_file(&self, id: &str) -> Result<(), Error> {
        let url = self.url(&format!("files/{id}"))?;
        self.call("deleting a file", || async {
            Ok(self.http.delete(url.clone()))
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
            .attempt(self.http.post(url).json(&body))
            .await
            .map_err(|e| CreateFailed::of(&what, e))?;
        // A 200 whose body is lost or garbled: the batch was made.
        self.json(&what, resp).await.map_err(|error| CreateFailed {
            error,
            maybe_made: true,
            retry: None,
        })
    }

    /// The retry policy for the create loop, which retries by hand (see `create_once`).
    pub fn retrier(&self) -> crate::exec::retry::Retrier {
        self.retry.start()
    }

    pub async fn retrieve(&self, id: &str) -> Result<Batch, Error> {
        let url = self.url(&format!("batches/{id}"))?;
        let what = format!("checking batch {id}");
        let resp = self
            .call(&what, || async { Ok(self.http.get(url.clone())) })
            .await?;
        self.json(&what, resp).await
    }

    pub async fn cancel(&self, id: &str) -> Result<Batch, Error> {
        let url = self.url(&format!("batches/{id}/cancel"))?;
        let what = format!("cancelling batch {id}");
        let resp = self
            .call(&what, || async { Ok(self.http.post(url.clone())) })
            .await?;
        self.json(&what, resp).await
    }

    /// The batch created from part `part` at or after `since`, found by its metadata: a run
    /// killed between asking for a batch and recording its id adopts it instead of
    /// submitting again.
    pub async fn find_batch(&self, part: &str, since: u64) -> Result<Option<Batch>, Error> {
        let mut after: Option<String> = None;
        loop {
            let mut url = self.url("batches")?;
            url.query_pairs_mut().append_pair("limit", "100");
            if let Some(a) = &after {
                url.query_pairs_mut().append_pair("after", a);
            }
            let what = "listing batches";
            let resp = self
                .call(what, || async { Ok(self.http.get(url.clone())) })
                .await?;
            let list: List<Batch> = self.json(what, resp).await?;
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

    /// Downloads a file's content to `dest` (written beside it, synced, then renamed).
    pub async fn download(&self, file_id: &str, dest: &Path) -> Result<(), Error> {
        let url = self.url(&format!("files/{file_id}/content"))?;
        let what = format!("downloading {file_id}");
        let resp = self
            .call(&what, || async { Ok(self.http.get(url.clone())) })
            .await?;
        let tmp = dest.with_extension("part");
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_err(&tmp, e))?;
        let mut stream = resp.bytes_stream();
        use futures::StreamExt;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| failed(&what, &transport_error(self.endpoint.key(), e)))?;
            f.write_all(&chunk).await.map_err(|e| io_err(&tmp, e))?;
        }
        f.sync_all().await.map_err(|e| io_err(&tmp, e))?;
        drop(f);
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| io_err(dest, e))?;
        crate::ledger::files::sync_dir(dest)
    }
}
