//! Where requests go and how they are authorized: one place that knows the URL layout, the key
//! header, the `api-version` query and the extra CA certificates of the service, so the online
//! provider and the batch client agree.
//!
//! Two layouts: OpenAI's (`{base_url}/chat/completions`, `{base_url}/files`, …) and Azure
//! OpenAI's (`{resource}/openai/deployments/{deployment}/chat/completions`,
//! `{resource}/openai/files`, …). Proxies (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`)
//! and the system's CA store are reqwest's business: both are on in every client built here.

use std::path::Path;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};

use serde::Deserialize;

/// How the key is sent: `Authorization: Bearer KEY` (OpenAI and most servers, and Azure with a
/// Microsoft Entra ID token), `api-key: KEY` (Azure OpenAI's keys) or `x-api-key: KEY` with
/// the `anthropic-version` every request needs (Anthropic's), or `x-goog-api-key: KEY`
/// (Google's Gemini API; never `?key=` in the URL, where logs would keep it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Auth {
    #[serde(rename = "bearer")]
    Bearer,
    #[serde(rename = "api-key")]
    ApiKey,
    #[serde(rename = "x-api-key")]
    XApiKey,
    #[serde(rename = "x-goog-api-key")]
    XGoogApiKey,
}

/// The Messages API version promptmill speaks (the one every current feature is under).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The API key, kept out of every `Debug` and `Display`.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> ApiKey {
        ApiKey(key)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

/// The service a job talks to, its key and how the key is sent.
#[derive(Clone)]
pub struct Endpoint {
    /// `base_url` without a trailing slash: `https://api.openai.com/v1`, or for Azure the
    /// resource's endpoint `https://NAME.openai.azure.com`.
    base: String,
    /// `Some`: Azure OpenAI's layout, requests to this deployment.
    deployment: Option<String>,
    api_version: Option<String>,
    auth: Auth,
    key: Option<ApiKey>,
    /// From `[model] ca_file`: trusted as well as the built-in and the system's roots.
    extra_roots: Vec<reqwest::Certificate>,
}

/// Azure OpenAI's header for its keys.
const API_KEY: HeaderName = HeaderName::from_static("api-key");
/// Anthropic's.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Google's.
const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

impl Endpoint {
    /// An endpoint from its parts (the assembler reads them from the job). `key` is the value of
    /// the job's key variable, if set.
    pub fn new(
        base: &str,
        deployment: Option<String>,
        api_version: Option<String>,
        auth: Auth,
        key: Option<String>,
        extra_roots: Vec<reqwest::Certificate>,
    ) -> Endpoint {
        Endpoint {
            base: base.trim_end_matches('/').to_string(),
            deployment,
            api_version,
            auth,
            key: key.map(ApiKey::new),
            extra_roots,
        }
    }

    pub fn key(&self) -> Option<&ApiKey> {
        self.key.as_ref()
    }

    /// The headers every request carries: the content type and the key, marked sensitive so
    /// that no debug output of a request shows it.
    fn default_headers(&self) -> Result<HeaderMap, String> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.auth == Auth::XApiKey {
            headers.insert(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static(ANTHROPIC_VERSION),
            );
        }
        if let Some(k) = &self.key {
            let (name, value) = match self.auth {
                Auth::Bearer => (AUTHORIZATION, format!("Bearer {}", k.expose())),
                Auth::ApiKey => (API_KEY, k.expose().to_string()),
                Auth::XApiKey => (X_API_KEY, k.expose().to_string()),
                Auth::XGoogApiKey => (X_GOOG_API_KEY, k.expose().to_string()),
            };
            let mut v = HeaderValue::from_str(&value).map_err(|_| {
                "the API key contains characters not allowed in an HTTP header".to_string()
            })?;
            v.set_sensitive(true);
            headers.insert(name, v);
        }
        Ok(headers)
    }

    /// An HTTP client that sends the key on every request. It goes through the proxy the
    /// environment names (unless `NO_PROXY` exempts the host) and trusts the built-in roots,
    /// the system's store and the job's `ca_file`.
    pub fn client(&self, timeout: Duration, pool: usize) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder()
            .default_headers(self.default_headers()?)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .pool_max_idle_per_host(pool.max(1))
            .tcp_nodelay(true)
            .redirect(same_origin_redirects())
            .user_agent(concat!("promptmill/", env!("CARGO_PKG_VERSION")));
        for cert in &self.extra_roots {
            builder = builder.add_root_certificate(cert.clone());
        }
        builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))
    }

    /// The chat completions URL: `{base}/chat/completions`, or for Azure the deployment's
    /// `{resource}/openai/deployments/{deployment}/chat/completions`.
    pub fn chat_url(&self) -> Result<reqwest::Url, String> {
        match &self.deployment {
            Some(d) => self.url(&format!("openai/deployments/{d}/chat/completions")),
            None => self.url("chat/completions"),
        }
    }

    /// Anthropic's Messages URL, `{base}/v1/messages` (the base is the host,
    /// `https://api.anthropic.com`).
    pub fn messages_url(&self) -> Result<reqwest::Url, String> {
        self.url("v1/messages")
    }

    /// The URL of an API resource below the base: `files`, `files/ID/content`, `batches`,
    /// `batches/ID/cancel` (for Azure, below the resource's `/openai`). A query in `path`
    /// (`batches?limit=100`) is kept; `api-version` is added to it.
    pub fn api_url(&self, path: &str) -> Result<reqwest::Url, String> {
        match &self.deployment {
            Some(_) => self.url(&format!("openai/{path}")),
            None => self.url(path),
        }
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, String> {
        let url = format!("{}/{path}", self.base);
        let mut u = reqwest::Url::parse(&url).map_err(|e| format!("the base URL {url}: {e}"))?;
        if let Some(v) = &self.api_version {
            u.query_pairs_mut().append_pair("api-version", v);
        }
        Ok(u)
    }

    /// The `url` of a Batch API input line: OpenAI's `/v1/chat/completions`; Azure's
    /// `/chat/completions` (its batch files name the operation, not the full path).
    pub fn batch_line_url(&self) -> &'static str {
        match self.deployment {
            Some(_) => "/chat/completions",
            None => "/v1/chat/completions",
        }
    }

    /// The model name a batch line carries: the job's model, or on Azure the deployment
    /// (Azure routes each line by it).
    pub fn batch_line_model<'a>(&'a self, job_model: &'a str) -> &'a str {
        self.deployment.as_deref().unwrap_or(job_model)
    }
}

/// The certificates of a PEM file, for `[model] ca_file`: an unreadable file, one that holds
/// no certificate, or one rustls cannot take is an error that names the file.
pub fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        format!(
            "{}: not a PEM file of certificates ({})",
            path.display(),
            error_chain(&e)
        )
    })?;
    if certs.is_empty() {
        return Err(format!(
            "{}: holds no certificate (expected one or more -----BEGIN CERTIFICATE----- blocks)",
            path.display()
        ));
    }
    // Parsing the PEM does not look inside the DER; adding the certificates to a client does.
    let mut b = reqwest::Client::builder().tls_built_in_root_certs(false);
    for c in &certs {
        b = b.add_root_certificate(c.clone());
    }
    b.build().map_err(|e| {
        format!(
            "{}: a certificate in it is not valid ({})",
            path.display(),
            error_chain(&e)
        )
    })?;
    Ok(certs)
}

/// An error and its causes, on one line: reqwest's own text stops at the top.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Redirects are followed only within the endpoint's own origin (scheme, host and port), at
/// most 10: every request carries the key in a default header (`Authorization` or Azure's
/// `api-key`), and reqwest strips only `Authorization` on a cross-host redirect. A redirect to
/// another origin is an error naming both, and nothing is sent there.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first().map(|u| u.origin());
        if attempt.previous().len() > 10 {
            attempt.error("more than 10 redirects")
        } else if first.as_ref() == Some(&attempt.url().origin()) {
            attempt.follow()
        } else {
            let to = attempt.url().origin().ascii_serialization();
            attempt.error(format!(
                "a redirect to another host ({to}) is not followed: the API key would go with it"
            ))
        }
    })
}

/// A server on this machine (llama.cpp, Ollama, vLLM): it usually needs no key.
pub fn is_loopback(url: &str) -> bool {
    let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
    else {
        return false;
    };
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(
        base: &str,
        deployment: Option<&str>,
        version: Option<&str>,
        auth: Auth,
    ) -> Endpoint {
        Endpoint {
            base: base.into(),
            deployment: deployment.map(String::from),
            api_version: version.map(String::from),
            auth,
            key: Some(ApiKey::new("k-123".into())),
            extra_roots: Vec::new(),
        }
    }

    #[test]
    fn openai_layout_is_below_the_base_url() {
        let e = endpoint("https://api.openai.com/v1", None, None, Auth::Bearer);
        assert_eq!(
            e.chat_url().unwrap().as_str(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            e.api_url("files/f1/content").unwrap().as_str(),
            "https://api.openai.com/v1/files/f1/content"
        );
        assert_eq!(e.batch_line_url(), "/v1/chat/completions");
        assert_eq!(e.batch_line_model("gpt-4o-mini"), "gpt-4o-mini");
    }

    #[test]
    fn azure_layout_uses_the_deployment_and_the_api_version_everywhere() {
        let e = endpoint(
            "https://res.openai.azure.com",
            Some("mini-prod"),
            Some("2024-10-21"),
            Auth::ApiKey,
        );
        assert_eq!(
            e.chat_url().unwrap().as_str(),
            "https://res.openai.azure.com/openai/deployments/mini-prod/chat/completions?api-version=2024-10-21"
        );
        for (path, want) in [
            (
                "files",
                "https://res.openai.azure.com/openai/files?api-version=2024-10-21",
            ),
            (
                "files/file-1/content",
                "https://res.openai.azure.com/openai/files/file-1/content?api-version=2024-10-21",
            ),
            (
                "batches",
                "https://res.openai.azure.com/openai/batches?api-version=2024-10-21",
            ),
            (
                "batches/b1/cancel",
                "https://res.openai.azure.com/openai/batches/b1/cancel?api-version=2024-10-21",
            ),
            (
                "batches?limit=100",
                "https://res.openai.azure.com/openai/batches?limit=100&api-version=2024-10-21",
            ),
        ] {
            assert_eq!(e.api_url(path).unwrap().as_str(), want);
        }
        assert_eq!(e.batch_line_url(), "/chat/completions");
        assert_eq!(e.batch_line_model("gpt-4o-mini"), "mini-prod");
    }

    #[test]
    fn an_api_version_also_applies_to_the_openai_layout() {
        // Azure's v1 API and API gateways: OpenAI's paths with a version query.
        let e = endpoint("https://gw.example.com/v1", None, Some("v1"), Auth::ApiKey);
        assert_eq!(
            e.chat_url().unwrap().as_str(),
            "https://gw.example.com/v1/chat/completions?api-version=v1"
        );
    }

    #[test]
    fn the_key_goes_in_one_header_marked_sensitive() {
        let h = endpoint("https://x", None, None, Auth::Bearer)
            .default_headers()
            .unwrap();
        assert_eq!(h[AUTHORIZATION], "Bearer k-123");
        assert!(h[AUTHORIZATION].is_sensitive());
        assert!(h.get("api-key").is_none());

        let h = endpoint("https://x", Some("d1"), Some("v"), Auth::ApiKey)
            .default_headers()
            .unwrap();
        assert_eq!(h["api-key"], "k-123");
        assert!(h["api-key"].is_sensitive());
        assert!(h.get(AUTHORIZATION).is_none());
        let shown = format!("{h:?}");
        assert!(!shown.contains("k-123"), "{shown}");

        let h = endpoint("https://api.anthropic.com", None, None, Auth::XApiKey)
            .default_headers()
            .unwrap();
        assert_eq!(h["x-api-key"], "k-123");
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(h["anthropic-version"], ANTHROPIC_VERSION);
        assert!(h.get(AUTHORIZATION).is_none());
    }

    #[test]
    fn a_ca_file_that_is_missing_or_not_pem_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = read_ca_file(&missing).unwrap_err();
        assert!(e.contains("nope.pem"), "{e}");

        let text = dir.path().join("text.pem");
        std::fs::write(&text, "not a certificate\n").unwrap();
        let e = read_ca_file(&text).unwrap_err();
        assert!(
            e.contains("text.pem") && e.contains("no certificate"),
            "{e}"
        );

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read_ca_file(&broken).unwrap_err();
        assert!(e.contains("broken.pem"), "{e}");
    }
}
