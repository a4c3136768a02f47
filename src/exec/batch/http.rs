//! What every vendor's batch endpoints share: one attempt classified by the vendor's error
//! table, retries for the calls that are safe to repeat, a JSON answer read, and a results
//! file streamed to disk whole or not at all. The key never appears in what it reports.

use std::path::Path;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::error::Error;
use crate::exec::retry::RetryPolicy;
use crate::ledger::journal::io_err;
use crate::provider::endpoint::ApiKey;
use crate::provider::openai::transport_error;
use crate::provider::{ErrorKind, ProviderError};

/// A vendor's reading of a non-2xx answer: its status and body → the failure's class.
pub type Classify = fn(Option<&ApiKey>, u16, &[u8]) -> ProviderError;

/// A batch API's HTTP client, with the job's retry policy and the vendor's error table.
pub struct Http {
    pub client: reqwest::Client,
    pub key: Option<ApiKey>,
    pub retry: RetryPolicy,
    pub classify: Classify,
}

/// A call that failed after its retries, as the user reads it.
pub fn failed(what: &str, e: &ProviderError) -> Error {
    Error::Other(format!("{what}: {e}"))
}

impl Http {
    /// One attempt: the response if it succeeded, else the failure as the error table
    /// classifies it (with the server's `retry-after`).
    pub async fn attempt(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        match req.send().await {
            Ok(resp) if resp.status().is_success() => Ok(resp),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let wait = crate::provider::openai::retry_after(resp.headers());
                let body = resp.bytes().await.unwrap_or_default();
                let mut e = (self.classify)(self.key.as_ref(), status, &body);
                e.retry_after = e.retry_after.or(wait);
                Err(e)
            }
            Err(e) => Err(transport_error(self.key.as_ref(), e)),
        }
    }

    /// Sends what `make` builds until it succeeds, or fails in a way retrying cannot fix.
    /// Only for calls that are safe to repeat: a create is not (`BatchApi::create_once`).
    pub async fn call<F, Fut>(&self, what: &str, make: F) -> Result<reqwest::Response, Error>
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

    /// A GET, retried.
    pub async fn get(&self, what: &str, url: &reqwest::Url) -> Result<reqwest::Response, Error> {
        self.call(what, || async { Ok(self.client.get(url.clone())) })
            .await
    }

    /// The answer's body as `T`; one that does not parse is an invalid response.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        resp: reqwest::Response,
    ) -> Result<T, Error> {
        let body = resp
            .bytes()
            .await
            .map_err(|e| failed(what, &transport_error(self.key.as_ref(), e)))?;
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

    /// Streams a GET's answer to `dest` (written beside it, synced, then renamed): a results
    /// file of a million lines is never held in memory, and never half there.
    pub async fn download(&self, what: &str, url: &reqwest::Url, dest: &Path) -> Result<(), Error> {
        let resp = self.get(what, url).await?;
        let tmp = dest.with_extension("part");
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_err(&tmp, e))?;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| failed(what, &transport_error(self.key.as_ref(), e)))?;
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
