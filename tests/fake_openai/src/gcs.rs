//! Google Cloud Storage's XML API under `/gcs`, as much of it as `object_store`'s GCS client
//! speaks for objects under 5 MB: GET and HEAD (with `ETag`, `Last-Modified` and
//! `x-goog-generation`), PUT with `x-goog-if-generation-match` (0: only if absent; N: only if
//! still generation N), PUT with `x-goog-copy-source`, DELETE, and the bucket listing
//! (`?list-type=2&prefix=`). Any bucket exists. The client is pointed here by a service-account
//! file with `"gcs_base_url": "http://127.0.0.1:PORT/gcs"` and `"disable_oauth": true`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use hyper::body::Incoming;

use crate::Shared;

pub(crate) const PREFIX: &str = "/gcs/";

const MAX_OBJECT: usize = 64 * 1024 * 1024;

#[derive(Default)]
pub(crate) struct State {
    objects: BTreeMap<(String, String), Object>,
    next_generation: u64,
}

struct Object {
    data: Bytes,
    generation: u64,
    modified: SystemTime,
}

pub(crate) fn is_path(p: &str) -> bool {
    p.starts_with(PREFIX)
}

pub(crate) async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path()[PREFIX.len()..].to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let (bucket, key) = match path.split_once('/') {
        Some((b, k)) => (decode(b), decode(k)),
        None => (decode(&path), String::new()),
    };
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let if_generation = header("x-goog-if-generation-match");
    let copy_source = header("x-goog-copy-source");
    let method = req.method().clone();
    if key.is_empty() && method == Method::GET {
        return list(shared, &bucket, &query);
    }
    match method {
        Method::GET | Method::HEAD => get(shared, &bucket, &key, method == Method::HEAD),
        Method::DELETE => {
            let gone = shared.gcs.lock().unwrap().objects.remove(&(bucket, key));
            status(if gone.is_some() {
                StatusCode::NO_CONTENT
            } else {
                StatusCode::NOT_FOUND
            })
        }
        Method::PUT => {
            let data = match copy_source {
                Some(src) => {
                    let src = decode(&src);
                    let (b, k) = src.split_once('/').unwrap_or((&src, ""));
                    let st = shared.gcs.lock().unwrap();
                    match st.objects.get(&(b.to_string(), k.to_string())) {
                        Some(o) => o.data.clone(),
                        None => return status(StatusCode::NOT_FOUND),
                    }
                }
                None => match axum::body::to_bytes(Body::new(req.into_body()), MAX_OBJECT).await {
                    Ok(b) => b,
                    Err(_) => return status(StatusCode::PAYLOAD_TOO_LARGE),
                },
            };
            put(shared, bucket, key, data, if_generation)
        }
        // Multipart uploads (objects of 5 MB and more) are not spoken here.
        _ => status(StatusCode::NOT_IMPLEMENTED),
    }
}

impl State {
    /// An object's bytes, for tests.
    pub(crate) fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        self.objects
            .get(&(bucket.to_string(), key.to_string()))
            .map(|o| o.data.to_vec())
    }

    /// The keys of a bucket, sorted.
    pub(crate) fn keys(&self, bucket: &str) -> Vec<String> {
        self.objects
            .keys()
            .filter(|(b, _)| b == bucket)
            .map(|(_, k)| k.clone())
            .collect()
    }
}

/// Puts an object as a test's setup does (no condition).
pub(crate) fn put_object(shared: &Shared, bucket: &str, key: &str, data: Vec<u8>) {
    put(shared, bucket.into(), key.into(), data.into(), None);
}

fn put(
    shared: &Shared,
    bucket: String,
    key: String,
    data: Bytes,
    if_generation: Option<String>,
) -> Response<Body> {
    let mut st = shared.gcs.lock().unwrap();
    let id = (bucket, key);
    let current = st.objects.get(&id).map(|o| o.generation);
    if let Some(want) = if_generation {
        let ok = match (want.trim(), current) {
            ("0", None) => true,
            (w, Some(g)) => w == g.to_string(),
            _ => false,
        };
        if !ok {
            return status(StatusCode::PRECONDITION_FAILED);
        }
    }
    st.next_generation += 1;
    let generation = 1_000 + st.next_generation;
    st.objects.insert(
        id,
        Object {
            data,
            generation,
            modified: SystemTime::now(),
        },
    );
    let mut r = status(StatusCode::OK);
    set_version(&mut r, generation);
    r
}

fn get(shared: &Shared, bucket: &str, key: &str, head: bool) -> Response<Body> {
    let st = shared.gcs.lock().unwrap();
    let Some(o) = st.objects.get(&(bucket.to_string(), key.to_string())) else {
        return status(StatusCode::NOT_FOUND);
    };
    let body = if head {
        Body::empty()
    } else {
        Body::from(o.data.clone())
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(o.data.len()));
    h.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_str(&httpdate(o.modified)).unwrap(),
    );
    set_version(&mut r, o.generation);
    r
}

fn list(shared: &Shared, bucket: &str, query: &str) -> Response<Body> {
    let prefix = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("prefix="))
        .map(decode)
        .unwrap_or_default();
    let st = shared.gcs.lock().unwrap();
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><IsTruncated>false</IsTruncated>",
    );
    for ((b, k), o) in st.objects.iter() {
        if b == bucket && k.starts_with(&prefix) {
            xml.push_str(&format!(
                "<Contents><Key>{}</Key><Size>{}</Size><LastModified>{}</LastModified><ETag>\"g{}\"</ETag></Contents>",
                escape(k),
                o.data.len(),
                rfc3339(o.modified),
                o.generation
            ));
        }
    }
    xml.push_str("</ListBucketResult>");
    let mut r = Response::new(Body::from(xml));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    r
}

fn set_version(r: &mut Response<Body>, generation: u64) {
    let h = r.headers_mut();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"g{generation}\"")).unwrap(),
    );
    h.insert("x-goog-generation", HeaderValue::from(generation));
}

fn status(s: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = s;
    r
}

/// `%2F` → `/`, `+` kept (the client encodes every byte but letters and digits).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn civil(t: SystemTime) -> (i64, u32, u32, u64, u64, u64, u64) {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = ((days + 4).rem_euclid(7)) as u64;
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60, weekday)
}

fn rfc3339(t: SystemTime) -> String {
    let (y, m, d, hh, mm, ss, _) = civil(t);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.000Z")
}

fn httpdate(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d, hh, mm, ss, wd) = civil(t);
    format!(
        "{}, {d:02} {} {y:04} {hh:02}:{mm:02}:{ss:02} GMT",
        DAYS[wd as usize],
        MONTHS[m as usize - 1]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_spelled_as_http_and_rfc3339_want() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_677_523);
        assert_eq!(super::httpdate(t), "Mon, 07 Dec 2026 21:05:23 GMT");
        assert_eq!(super::rfc3339(t), "2026-12-07T21:05:23.000Z");
        assert_eq!(super::decode("out%2Fa%2Ejsonl"), "out/a.jsonl");
    }
}
