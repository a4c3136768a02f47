//! One row → one request, and the request's identity: the one place that builds the body the
//! provider sends and the fingerprint the ledger knows the row by.
//!
//! The fingerprint covers exactly what changes the completion (the model, the messages, the
//! sampling parameters, `extra`, and which provider answers: the base URL's host, or the local
//! model file's checksum and context size). It leaves out transport (`stream`,
//! `stream_options`, timeouts) and the key order inside `extra`, so toggling streaming or
//! re-ordering a TOML table never re-pays a finished row.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::chat::{Message, Params};
use crate::input::Row;
use crate::job::{Job, ProviderKind};
use crate::render::Renderer;

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// The inverse of [`hex`] for a 128-bit fingerprint; `None` for anything else.
pub fn fingerprint_bytes(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One row's request, rendered once and shared by every attempt.
#[derive(Debug)]
pub struct Request {
    pub messages: Vec<Message>,
    /// The exact JSON body the HTTP provider posts.
    pub body: bytes::Bytes,
}

/// One row, rendered: what is needed to send it and to record it.
pub struct Prepared {
    pub row: Row,
    pub request: Request,
    /// 128 bits of SHA-256 over the request's identity (see the module doc).
    pub fingerprint: [u8; 16],
}

/// Builds every row's request for one job: the parts shared by all rows are serialized and
/// hashed once.
pub struct Builder {
    model: String,
    params: Params,
    /// The hasher after the identity's constant prefix; cloned per row.
    prefix: Sha256,
}

impl Builder {
    /// `provider_identity`: who answers (see [`provider_identity`]).
    pub fn new(job: &Job, provider_identity: &str) -> Builder {
        let mut sampling = job.params.clone();
        // Transport and bookkeeping, not what the model is asked.
        sampling.stream = None;
        sampling.user = None;
        sampling.extra = Map::new();
        let mut extra = Value::Object(job.params.extra.clone());
        sort_keys(&mut extra);
        let constant = serde_json::json!({
            "provider": provider_identity,
            "model": job.model,
            "params": sampling,
            "extra": extra,
        });
        let mut prefix = Sha256::new();
        prefix.update(serde_json::to_vec(&constant).expect("the identity serializes"));
        prefix.update(b"\nmessages:");
        Builder {
            model: job.model.clone(),
            params: job.params.clone(),
            prefix,
        }
    }

    /// Renders a row into its request; the error text names the input, row and field.
    pub fn prepare(
        &self,
        input: &std::path::Path,
        renderer: &Renderer,
        row: Row,
    ) -> Result<Prepared, (Row, String)> {
        let messages = match renderer.render(&row.fields) {
            Ok(m) => m,
            Err(e) => {
                let msg = format!("{}: row {}: {e}", crate::input::describe(input), row.number);
                return Err((row, msg));
            }
        };
        let json = serde_json::value::to_raw_value(&messages).expect("messages serialize");
        let body = crate::provider::openai::request_body(&self.model, &json, &self.params);
        let mut h = self.prefix.clone();
        h.update(json.get().as_bytes());
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&h.finalize()[..16]);
        Ok(Prepared {
            row,
            request: Request { messages, body },
            fingerprint,
        })
    }
}

/// One input row as the planning commands (estimate, export, status) see it.
pub enum Rendered {
    Ready(Prepared),
    /// Unreadable or unrenderable: its row number (`run` writes its error record).
    Unreadable(u64),
}

impl Builder {
    /// Every input row, or the first `limit`, read and rendered in input order.
    pub fn rendered<'a>(
        &'a self,
        job: &'a crate::job::Job,
        renderer: &'a Renderer,
        limit: Option<u64>,
    ) -> Result<impl Iterator<Item = Rendered> + 'a, crate::error::Error> {
        let take = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        Ok(job.source().reader()?.take(take).map(move |r| match r {
            Ok(row) => match self.prepare(&job.input, renderer, row) {
                Ok(p) => Rendered::Ready(p),
                Err((row, _)) => Rendered::Unreadable(row.number),
            },
            Err(e) => Rendered::Unreadable(e.number),
        }))
    }
}

/// The fingerprint promptmill recorded before rows were keyed by request identity: 128 bits of
/// the request body's SHA-256. Read only to recognise records of older outputs.
pub fn legacy_fingerprint(body: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&Sha256::digest(body)[..16]);
    out
}

/// Who answers a job's requests, as far as it changes the completion: the HTTP endpoint's host
/// (and port), or the local model's file checksum and context size.
pub fn provider_identity(job: &Job, local_model_sha256: Option<&str>) -> String {
    match job.provider {
        ProviderKind::Openai => format!("openai:{}", host_and_port(&job.base_url)),
        ProviderKind::Local => format!(
            "local:{}:ctx={}",
            local_model_sha256.unwrap_or("unknown"),
            job.context_tokens
                .map_or("default".into(), |c| c.to_string())
        ),
    }
}

/// `https://user@API.example.com:8443/v1` → `api.example.com:8443` (the URL itself when it
/// does not parse; `Job` has checked it is http(s) already).
pub fn host_and_port(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or_default();
            match u.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_string(),
            }
        }
        Err(_) => url.to_string(),
    }
}

/// Objects' keys in sorted order, recursively: key order in a TOML table is not meaning.
fn sort_keys(v: &mut Value) {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = std::mem::take(m).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, mut v) in entries {
                sort_keys(&mut v);
                m.insert(k, v);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_a_fingerprint() {
        let b: [u8; 16] = core::array::from_fn(|i| (i * 17) as u8);
        assert_eq!(fingerprint_bytes(&hex(&b)), Some(b));
        assert_eq!(fingerprint_bytes("abc"), None);
        assert_eq!(fingerprint_bytes(&"zz".repeat(16)), None);
    }

    #[test]
    fn another_local_model_file_is_another_provider() {
        let dir = tempfile::tempdir().unwrap();
        let job = |ctx: &str| {
            let p = dir.path().join("job.toml");
            std::fs::write(
                &p,
                format!(
                    "[input]\npath = \"d.csv\"\n[[messages]]\nrole = \"user\"\ncontent = \"x\"\n\
                     [model]\nprovider = \"local\"\npath = \"m.gguf\"\n{ctx}\n\
                     [output]\npath = \"o.jsonl\"\n"
                ),
            )
            .unwrap();
            Job::load(&p, &Default::default()).unwrap()
        };
        let a = provider_identity(&job(""), Some("aa"));
        assert_ne!(a, provider_identity(&job(""), Some("bb")));
        assert_ne!(
            a,
            provider_identity(&job("context_tokens = 512"), Some("aa"))
        );
    }

    #[test]
    fn the_provider_is_known_by_host_and_port() {
        assert_eq!(
            host_and_port("https://u:p@API.Example.com/v1"),
            "api.example.com"
        );
        assert_eq!(host_and_port("http://127.0.0.1:8080/v1"), "127.0.0.1:8080");
    }

    #[test]
    fn nested_keys_are_sorted() {
        let mut v = serde_json::json!({"b": {"y": 1, "x": [ {"d": 1, "c": 2} ]}, "a": 0});
        sort_keys(&mut v);
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"a":0,"b":{"x":[{"c":2,"d":1}],"y":1}}"#
        );
    }
}
