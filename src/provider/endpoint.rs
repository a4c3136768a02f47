//! Where requests go and how they are authorized: one place that knows the URL layout and the
//! key header of the service, so the online provider and the batch client agree.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};

use super::openai::ApiKey;
use crate::error::Error;
use crate::job::Job;

/// The service a job talks to: OpenAI's layout (`{base_url}/chat/completions`,
/// `{base_url}/files`, `{base_url}/batches`) with a bearer key.
#[derive(Clone)]
pub struct Endpoint {
    /// `base_url` without a trailing slash, e.g. `https://api.openai.com/v1`.
    base: String,
    key: Option<ApiKey>,
}

impl Endpoint {
    /// The job's endpoint and its key from the environment. A remote server needs a key; a
    /// server on this machine (llama.cpp, Ollama, vLLM) usually does not.
    pub fn from_job(job: &Job) -> Result<Endpoint, Error> {
        let key = std::env::var(&job.api_key_env)
            .ok()
            .filter(|k| !k.trim().is_empty());
        if key.is_none() && !super::is_loopback(&job.base_url) {
            return Err(Error::MissingKey {
                var: job.api_key_env.clone(),
            });
        }
        Ok(Endpoint {
            base: job.base_url.trim_end_matches('/').to_string(),
            key: key.map(ApiKey::new),
        })
    }

    pub fn key(&self) -> Option<&ApiKey> {
        self.key.as_ref()
    }

    /// An HTTP client that sends the key on every request.
    pub fn client(&self, timeout: Duration, pool: usize) -> Result<reqwest::Client, String> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(k) = &self.key {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", k.expose())).map_err(|_| {
                "the API key contains characters not allowed in an HTTP header".to_string()
            })?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .pool_max_idle_per_host(pool.max(1))
            .tcp_nodelay(true)
            .user_agent(concat!("promptmill/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    /// The chat completions URL.
    pub fn chat_url(&self) -> Result<reqwest::Url, String> {
        self.api_url("chat/completions")
    }

    /// The URL of an API resource below the base: `files`, `files/ID/content`, `batches`,
    /// `batches/ID/cancel`.
    pub fn api_url(&self, path: &str) -> Result<reqwest::Url, String> {
        let url = format!("{}/{path}", self.base);
        reqwest::Url::parse(&url).map_err(|e| format!("the base URL {url}: {e}"))
    }

    /// The `url` of a Batch API input line.
    pub fn batch_line_url(&self) -> &'static str {
        "/v1/chat/completions"
    }

    /// The model name a batch line carries.
    pub fn batch_line_model<'a>(&self, job_model: &'a str) -> &'a str {
        job_model
    }
}
