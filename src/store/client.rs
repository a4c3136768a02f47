//! One client per bucket, configured from the cloud's standard environment variables, over an
//! HTTP client that follows no redirect (a signed request is never replayed to another host).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::client::{ClientOptions, HttpClient, HttpConnector};
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::{ObjectStore, RetryConfig};

use super::Url;
use crate::error::Error;

/// Variables whose values are secrets: scrubbed from any message that might echo one.
pub(super) const SECRET_VARS: [&str; 6] = [
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_CLIENT_SECRET",
];

/// A whole request's limit: a 10 MB part or a small object takes far less; a stalled
/// connection is given up and retried by the client's own policy.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Clients by (scheme, bucket).
type Stores = Mutex<HashMap<(String, String), Arc<dyn ObjectStore>>>;

pub(super) fn store_for(url: &Url) -> Result<Arc<dyn ObjectStore>, Error> {
    static STORES: OnceLock<Stores> = OnceLock::new();
    let map = STORES.get_or_init(Default::default);
    let id = (url.scheme.clone(), url.bucket.clone());
    if let Some(s) = map.lock().unwrap().get(&id) {
        return Ok(s.clone());
    }
    let store = build(url)?;
    map.lock().unwrap().insert(id, store.clone());
    Ok(store)
}

fn build(url: &Url) -> Result<Arc<dyn ObjectStore>, Error> {
    let root = format!("{}://{}", url.scheme, url.bucket);
    let bad = |e: object_store::Error| {
        // The builder's errors name a missing or malformed setting, never its value.
        Error::Other(format!(
            "cannot open {root}: {}",
            super::scrub(&e.to_string())
        ))
    };
    let retry = RetryConfig {
        max_retries: 5,
        retry_timeout: Duration::from_secs(120),
        ..Default::default()
    };
    Ok(match url.scheme.as_str() {
        "s3" | "s3a" => Arc::new(
            AmazonS3Builder::from_env()
                .with_bucket_name(&url.bucket)
                .with_http_connector(NoRedirects)
                .with_retry(retry)
                .build()
                .map_err(bad)?,
        ),
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&url.bucket)
                .with_http_connector(NoRedirects)
                .with_retry(retry)
                .build()
                .map_err(bad)?,
        ),
        "az" | "abfs" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_container_name(&url.bucket)
                .with_http_connector(NoRedirects)
                .with_retry(retry)
                .build()
                .map_err(bad)?,
        ),
        // file:///abs/path: keys are absolute paths without their leading slash.
        _ => Arc::new(LocalFileSystem::new()),
    })
}

/// reqwest with redirects off, the system's CAs (our reqwest's rustls-native-roots), the
/// proxies from the environment, and bounded timeouts.
#[derive(Debug)]
struct NoRedirects;

impl HttpConnector for NoRedirects {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        // http:// only where the user allowed it (`AWS_ALLOW_HTTP=true`, a local store).
        let allow_http = options
            .get_config_value(&object_store::ClientConfigKey::AllowHttp)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .https_only(!allow_http)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "http",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(client))
    }
}
