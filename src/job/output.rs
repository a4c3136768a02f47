//! `[output]`: where records (and the CSV) go, a shard's own paths, and what a completion
//! must look like: a schema (a file or an inline table), a response format, checks.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::raw::RawOutput;
use super::{JobFile, Overrides};
use crate::error::Error;
use crate::shape::OutputShape;
use crate::store::{self, lock, session, session::RemoteOutput};

/// Where a run writes: the output, CSV and Parquet paths (local: an object-store output's are
/// its mirror's), and the store's side when the output is on one.
pub(super) struct Paths {
    pub output: PathBuf,
    pub csv: Option<PathBuf>,
    pub parquet: Option<PathBuf>,
    pub remote: Option<RemoteOutput>,
}

/// The output and CSV paths, resolved; a shard has outputs of its own (and so its own lock,
/// summary and batches). An object-store URL is mapped to its mirror under the working
/// folder, and remembered for the checkpoints and the publishing.
pub(super) fn paths(jf: &JobFile, out: &RawOutput, ov: &Overrides) -> Result<Paths, Error> {
    let shard = |p: PathBuf| match ov.shard {
        Some(sh) => sh.path(&p),
        None => p,
    };
    let output = shard(ov.output.clone().unwrap_or_else(|| jf.resolve(&out.path)));
    let csv = out.csv.as_deref().map(|c| shard(jf.resolve(c)));
    let parquet = out.parquet.as_deref().map(|c| shard(jf.resolve(c)));
    let work = store::work_dir().join("out");
    let mut extra = Vec::new();
    let mut local = |p: PathBuf| -> Result<PathBuf, Error> {
        match p.to_str().filter(|s| store::is_url(s)) {
            Some(s) => {
                let url = store::Url::parse(s)?;
                let l = url.local_under(&work);
                extra.push((l.clone(), url));
                Ok(l)
            }
            None => Ok(p),
        }
    };
    let (output, csv, parquet) = (
        local(output)?,
        csv.map(&mut local).transpose()?,
        parquet.map(&mut local).transpose()?,
    );
    let (checkpoint, stale) = store_timing(jf, out)?;
    let remote = match extra.iter().position(|(l, _)| *l == output) {
        Some(i) => {
            let (local, url) = extra.remove(i);
            Some(RemoteOutput {
                url,
                local,
                extra,
                checkpoint,
                stale,
            })
        }
        None if !extra.is_empty() => {
            return Err(jf.bad(
                "output.csv",
                "the CSV or Parquet is on an object store and the output is not: put the \
                 output there too (it is what a fresh run resumes from)"
                    .into(),
            ))
        }
        None => None,
    };
    Ok(Paths {
        output,
        csv,
        parquet,
        remote,
    })
}

/// `[output] checkpoint_s` and `lock_stale_s`, bounded, and the stale timeout long enough
/// that a live run's lock is never taken over.
fn store_timing(jf: &JobFile, out: &RawOutput) -> Result<(Duration, Duration), Error> {
    let secs = |field: &str, v: Option<f64>, default: Duration, lo: Duration, hi: Duration| {
        bounded_secs(jf, field, v, default, lo, hi)
    };
    let checkpoint = secs(
        "output.checkpoint_s",
        out.checkpoint_s,
        session::DEFAULT_CHECKPOINT,
        session::MIN_CHECKPOINT,
        session::MAX_CHECKPOINT,
    )?;
    let stale = secs(
        "output.lock_stale_s",
        out.lock_stale_s,
        session::DEFAULT_STALE,
        lock::MIN_STALE,
        lock::MAX_STALE,
    )?;
    if stale < checkpoint * 3 {
        return Err(jf.bad(
            "output.lock_stale_s",
            format!(
                "{} s is less than three checkpoints ({} s each): a live run's lock would be \
                 taken over",
                stale.as_secs_f64(),
                checkpoint.as_secs_f64()
            ),
        ));
    }
    Ok((checkpoint, stale))
}

/// A duration in seconds from the job file, within its bounds (a timeout of 1e20 s is an
/// error, not a stall).
fn bounded_secs(
    jf: &JobFile,
    field: &str,
    v: Option<f64>,
    default: Duration,
    lo: Duration,
    hi: Duration,
) -> Result<Duration, Error> {
    let Some(v) = v else {
        return Ok(default);
    };
    if !(v.is_finite() && v >= lo.as_secs_f64() && v <= hi.as_secs_f64()) {
        return Err(jf.bad(
            field,
            format!(
                "{v}: between {} and {} seconds",
                lo.as_secs_f64(),
                hi.as_secs_f64()
            ),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `[output]`'s schema, response format and checks, read and checked.
pub(super) fn shape(jf: &JobFile, out: &RawOutput) -> Result<OutputShape, Error> {
    let schema = match read_schema(jf, out)? {
        Some((name, v)) => Some(named_schema(jf, out, name, v)?),
        None => None,
    };
    let json_object = match out.response_format.as_deref() {
        None | Some("text") => false,
        Some("json_object") => true,
        Some("json_schema") if schema.is_some() => false,
        Some(other) => {
            return Err(jf.bad(
                "output.response_format",
                format!(
                    "`{other}`: \"json_object\", or give a schema ([output] schema) for json_schema"
                ),
            ))
        }
    };
    let checks = out.checks.clone().unwrap_or_default();
    if let (Some(lo), Some(hi)) = (checks.min_chars, checks.max_chars) {
        if lo > hi {
            return Err(jf.bad(
                "output.checks.min_chars",
                format!("{lo} is more than max_chars {hi}"),
            ));
        }
    }
    let shape = OutputShape {
        schema,
        json_object,
        checks,
        max_invalid: out.max_invalid.unwrap_or(2),
    };
    // The schema, regexes and templates compile here, so a bad one stops the job at load.
    crate::shape::Shape::compile(&shape).map_err(|(field, message)| jf.bad(&field, message))?;
    Ok(shape)
}

/// The schema as written, with its default name: a JSON file's stem (the file relative to the
/// job's folder), or `output` for an inline table.
fn read_schema(jf: &JobFile, out: &RawOutput) -> Result<Option<(String, Value)>, Error> {
    match &out.schema {
        None => Ok(None),
        Some(toml::Value::String(file)) => {
            let f = jf.resolve_read("output.schema", file)?;
            let text = std::fs::read(&f).map_err(|e| {
                jf.bad("output.schema", format!("cannot read {}: {e}", f.display()))
            })?;
            let v: Value = serde_json::from_slice(&text)
                .map_err(|e| jf.bad("output.schema", format!("{}: not JSON: {e}", f.display())))?;
            let name = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "output".into());
            Ok(Some((name, v)))
        }
        Some(t @ toml::Value::Table(_)) => Ok(Some((
            "output".to_string(),
            serde_json::to_value(t).map_err(|e| jf.bad("output.schema", e.to_string()))?,
        ))),
        Some(_) => Err(jf.bad(
            "output.schema",
            "a schema file's path, or an [output.schema] table".into(),
        )),
    }
}

/// A schema the API takes (an object at the top) under its name: `schema_name`, else the
/// default, 1 to 64 letters, digits, `_` or `-`.
fn named_schema(
    jf: &JobFile,
    out: &RawOutput,
    default_name: String,
    v: Value,
) -> Result<(String, Value), Error> {
    if v.get("type").and_then(|t| t.as_str()) != Some("object") {
        return Err(jf.bad(
            "output.schema",
            "the API takes an object at the top (\"type\": \"object\")".into(),
        ));
    }
    let name = out.schema_name.clone().unwrap_or(default_name);
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(jf.bad(
            "output.schema_name",
            format!("`{name}`: 1 to 64 letters, digits, `_` or `-`"),
        ));
    }
    Ok((name, v))
}

/// The request's `response_format` for a shape: json_schema (strict) with a schema,
/// json_object when asked for, else none.
pub(super) fn response_format(shape: &OutputShape) -> Option<Value> {
    match &shape.schema {
        Some((name, schema)) => Some(serde_json::json!({
            "type": "json_schema",
            "json_schema": {"name": name, "strict": true, "schema": schema},
        })),
        None if shape.json_object => Some(serde_json::json!({"type": "json_object"})),
        None => None,
    }
}
