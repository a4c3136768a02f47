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

use std::sync::Arc;

use crate::backend::Backend;
use crate::chat::Params;
use crate::input::Row;
use crate::job::Job;
use crate::provider::{Request, Wire};
use crate::render::Renderer;

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
    wire: Arc<dyn Wire>,
}

impl Builder {
    /// The backend says who answers (its identity) and how the body is spelled (its wire).
    pub fn new(job: &Job, backend: &Backend) -> Builder {
        let provider_identity = backend.identity.as_str();
        let mut sampling = job.params.clone();
        // Transport and bookkeeping, not what the model is asked.
        sampling.stream = None;
        sampling.user = None;
        sampling.extra = Map::new();
        let mut extra = Value::Object(job.params.extra.clone());
        sort_keys(&mut extra);
        let constant = serde_json::json!({
            "provider": provider_identity,
            "model": job.served.model,
            "params": sampling,
            "extra": extra,
        });
        let mut prefix = Sha256::new();
        prefix.update(serde_json::to_vec(&constant).expect("the identity serializes"));
        prefix.update(b"\nmessages:");
        Builder {
            model: job.served.model.clone(),
            params: job.params.clone(),
            prefix,
            wire: backend.wire.clone(),
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
        let body = self.wire.body(&self.model, &messages, &json, &self.params);
        let mut h = self.prefix.clone();
        h.update(json.get().as_bytes());
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&h.finalize()[..16]);
        Ok(Prepared {
            row,
            request: Request {
                messages,
                choices: u32::try_from(self.params.choices()).unwrap_or(u32::MAX),
                body,
            },
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
        Ok(crate::input::Source::of(job)
            .reader()?
            .take(take)
            .map(move |r| match r {
                Ok(row) => match self.prepare(&job.input, renderer, row) {
                    Ok(p) => Rendered::Ready(p),
                    Err((row, _)) => Rendered::Unreadable(row.number),
                },
                Err(e) => Rendered::Unreadable(e.number),
            }))
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

    /// A row's fingerprint as the release before the layout change computed it (its `render`
    /// printed this value for this job and row): every output written since resumes without
    /// paying again only while this holds.
    #[test]
    fn the_fingerprint_is_the_one_earlier_releases_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.toml");
        std::fs::write(
            &p,
            "[input]\npath = \"in.csv\"\n[[messages]]\nrole = \"system\"\n\
             content = \"You write one sentence.\"\n[[messages]]\nrole = \"user\"\n\
             content = \"Summarize: {{ title }}\"\n[model]\nname = \"gpt-4o-mini\"\n\
             base_url = \"https://api.openai.com/v1\"\ntemperature = 0.2\nmax_tokens = 50\n\
             [model.extra]\nb = 1\na = { y = 2, x = 3 }\n[output]\npath = \"o.jsonl\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("in.csv"), "title\nBike lanes\n").unwrap();
        let job = Job::load(&p, &Default::default()).unwrap();
        let backend = Backend::for_job(&job, false).unwrap();
        let renderer = Renderer::new(&job).unwrap();
        let builder = Builder::new(&job, &backend);
        let row = crate::input::Source::of(&job)
            .reader()
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let prepared = builder.prepare(&job.input, &renderer, row).ok().unwrap();
        assert_eq!(
            crate::fingerprint::hex(&prepared.fingerprint),
            "64161752809b83c5ca6ccb00b4bb80e3"
        );
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
