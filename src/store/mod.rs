//! Object-store paths (`s3://`, `gs://`, `az://`, `file://`): the one seam under the job's
//! files. What the job reads (input, schema, templates, images) is fetched to a local working
//! folder and read from there; an output lives in a local mirror while the run goes and is
//! checkpointed to the store as numbered pieces (`mirror`); the run's lock is a conditional
//! put (`lock`). Everything above this module keeps working on local paths.
//!
//! Credentials come from each cloud's standard environment (`AWS_*` including
//! `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_*`) through the
//! `object_store` crate; they are never formatted into a message: errors are rebuilt here from
//! the URL and the error's kind.

mod client;
pub mod listing;
pub mod lock;
pub mod mirror;
pub mod session;
pub mod stage;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use object_store::path::Path as Key;
use object_store::ObjectStore;

use crate::error::Error;

/// The schemes read through `object_store`.
const SCHEMES: [&str; 6] = ["s3", "s3a", "gs", "az", "abfs", "file"];

/// Whether a path as written in a job or on the command line is an object-store URL.
pub fn is_url(s: &str) -> bool {
    s.split_once("://")
        .is_some_and(|(scheme, _)| SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()))
}

/// An object-store URL, split: `s3://bucket/a/b.jsonl` → scheme `s3`, bucket `bucket`, key
/// `a/b.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Url {
    pub scheme: String,
    pub bucket: String,
    pub key: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, Error> {
        let (scheme, rest) = s
            .split_once("://")
            .filter(|(sc, _)| SCHEMES.contains(&sc.to_ascii_lowercase().as_str()))
            .ok_or_else(|| Error::Other(format!("`{s}` is not an object-store URL")))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "file" {
            // file:///abs/path: the "bucket" is empty and the key is the absolute path.
            return Ok(Url {
                scheme,
                bucket: String::new(),
                key: rest.trim_start_matches('/').to_string(),
            });
        }
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Other(format!("`{s}`: no bucket")));
        }
        Ok(Url {
            scheme,
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The same object with `suffix` appended to its key (`x.jsonl` → `x.jsonl.lock`).
    pub fn with_suffix(&self, suffix: &str) -> Url {
        Url {
            key: format!("{}{suffix}", self.key),
            ..self.clone()
        }
    }

    /// Another object in the same bucket.
    pub fn with_key(&self, key: String) -> Url {
        Url {
            key,
            ..self.clone()
        }
    }

    pub fn object_key(&self) -> Key {
        Key::from(self.key.as_str())
    }

    /// Where this object is mirrored under the working folder: `{work}/{scheme}/{bucket}/{key}`.
    pub fn local_under(&self, work: &std::path::Path) -> PathBuf {
        let bucket = if self.bucket.is_empty() {
            "_"
        } else {
            &self.bucket
        };
        let mut p = work.join(&self.scheme).join(bucket);
        for part in self.key.split('/').filter(|s| !s.is_empty() && *s != "..") {
            p.push(part);
        }
        p
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.scheme == "file" {
            write!(f, "file:///{}", self.key)
        } else {
            write!(f, "{}://{}/{}", self.scheme, self.bucket, self.key)
        }
    }
}

/// The local working folder: `PROMPTMILL_WORK_DIR`, else `.promptmill-work` in the current
/// folder. On Kubernetes it is the pod's own disk (an `emptyDir`): nothing in it is needed
/// once the run has pushed its output, and a fresh pod starts from the store.
pub fn work_dir() -> PathBuf {
    std::env::var_os("PROMPTMILL_WORK_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".promptmill-work"))
}

/// A bucket's client, made once per (scheme, bucket) and shared.
pub fn store_for(url: &Url) -> Result<Arc<dyn ObjectStore>, Error> {
    client::store_for(url)
}

/// Runs a store future to its end from synchronous code, on the store's own runtime, so it
/// can be called from a plain thread or from inside the run's runtime alike.
pub fn block_on<F, T>(f: F) -> T
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        // One worker: store calls are few and I/O-bound, and every thread that allocates
        // brings its own malloc arena (memory one thread frees another cannot reuse).
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store")
            .enable_all()
            .build()
            .expect("the object-store runtime starts")
    });
    let handle = rt.spawn(f);
    futures::executor::block_on(handle).expect("an object-store task does not panic")
}

/// A streamed upload: parts of 5 MB (S3's least), at most two in flight, so an upload holds
/// about 15 MB however large the file.
pub(crate) fn part_writer(
    store: Arc<dyn ObjectStore>,
    url: &Url,
) -> object_store::buffered::BufWriter {
    object_store::buffered::BufWriter::with_capacity(store, url.object_key(), 5 << 20)
        .with_max_concurrency(2)
}

/// An object-store error as a message that names the URL and what went wrong, never the
/// client's configuration (which holds the credentials).
pub fn err(url: &Url, what: &str, e: &object_store::Error) -> Error {
    use object_store::Error as E;
    let why = match e {
        E::NotFound { .. } => "not found".to_string(),
        E::AlreadyExists { .. } => "already exists".to_string(),
        E::Precondition { .. } => "changed by someone else (precondition failed)".to_string(),
        E::NotModified { .. } => "not modified".to_string(),
        E::PermissionDenied { .. } => "permission denied (check the credentials)".to_string(),
        E::Unauthenticated { .. } => "not authenticated (check the credentials)".to_string(),
        E::NotSupported { .. } | E::NotImplemented => "not supported by this store".to_string(),
        // The generic error's text is the HTTP client's: a status and a URL, and no
        // header. Scrubbed anyway, in case a store echoes a signed query string.
        other => scrub(&other.to_string()),
    };
    Error::Other(format!("{what} {url}: {why}"))
}

/// Whether the error is "the object is not there".
pub fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// Drops query strings (a presigned or SAS URL carries its signature there) and the values of
/// the credential variables, should a message ever carry one.
fn scrub(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split_inclusive(char::is_whitespace) {
        match word.find('?') {
            Some(i) if word.contains("://") => {
                out.push_str(&word[..i]);
                out.push_str("?…");
                if word.ends_with(char::is_whitespace) {
                    out.push(' ');
                }
            }
            _ => out.push_str(word),
        }
    }
    for var in client::SECRET_VARS {
        if let Ok(v) = std::env::var(var) {
            if v.len() >= 4 {
                out = out.replace(&v, "[redacted]");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_bucket_and_key() {
        let u = Url::parse("s3://b/out/x.jsonl").unwrap();
        assert_eq!((u.scheme.as_str(), u.bucket.as_str()), ("s3", "b"));
        assert_eq!(u.key, "out/x.jsonl");
        assert_eq!(u.to_string(), "s3://b/out/x.jsonl");
        assert_eq!(u.with_suffix(".lock").key, "out/x.jsonl.lock");
        let f = Url::parse("file:///tmp/a/b.csv").unwrap();
        assert_eq!(f.key, "tmp/a/b.csv");
        assert_eq!(f.to_string(), "file:///tmp/a/b.csv");
        assert!(Url::parse("s3:///x").is_err());
        assert!(is_url("gs://b/k") && is_url("AZ://c/k") && !is_url("out/x.jsonl"));
        assert!(!is_url("https://example.com/x.png"));
    }

    #[test]
    fn a_mirror_path_cannot_climb_out_of_the_working_folder() {
        let u = Url::parse("s3://b/../../etc/passwd").unwrap();
        let p = u.local_under(std::path::Path::new("/w"));
        assert_eq!(p, PathBuf::from("/w/s3/b/etc/passwd"));
    }

    #[test]
    fn signed_query_strings_and_secrets_are_scrubbed() {
        let s = scrub("GET http://h/b/k?X-Amz-Signature=abc failed");
        assert_eq!(s, "GET http://h/b/k?… failed");
    }
}
