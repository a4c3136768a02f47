//! The output record (one per row, one JSON line) and the CSV export in input order.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::provider::{ErrorKind, Usage};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordError {
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub message: String,
}

/// Where a copied record came from: an earlier row with a byte-identical request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CopiedFrom {
    pub row: u64,
    pub id: String,
}

/// One finished row. `row` comes first: a canonical line starts with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub row: u64,
    pub id: String,
    pub status: Status,
    pub input: Map<String, Value>,
    pub completion: Option<String>,
    pub finish_reason: Option<String>,
    pub model: Option<String>,
    pub usage: Option<Usage>,
    pub cost_usd: Option<f64>,
    pub attempts: u32,
    pub latency_ms: u64,
    /// Hash of the request's identity (`request` module); `None` when the row never got as
    /// far as a request.
    pub fingerprint: Option<String>,
    pub error: Option<RecordError>,
    /// Set on a row that was not sent because an earlier row made the same request; such a
    /// record costs nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_from: Option<CopiedFrom>,
    /// The worst-case cost of attempts the server may have billed without giving a usable
    /// completion (a timeout after sending, a stream cut off, an unusable 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unconfirmed_usd: Option<f64>,
    /// Fields another tool added to the line: kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Writes the CSV export from the (ordered, compacted) JSONL output.
pub fn export_csv(jsonl: &Path, csv_path: &Path) -> Result<u64, Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| Error::Io {
            path: path.clone(),
            source: e,
        }
    };
    let f = std::fs::File::open(jsonl).map_err(io(jsonl))?;
    if let Some(dir) = csv_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = crate::job::sibling(csv_path, ".tmp");
    let out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = csv::Writer::from_writer(std::io::BufWriter::new(out));
    let mut columns: Option<Vec<String>> = None;
    let mut n = 0;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io(jsonl))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line).map_err(|e| Error::Input {
            path: jsonl.to_path_buf(),
            message: format!("record {}: {e}", n + 1),
        })?;
        let cols = columns.get_or_insert_with(|| {
            // The first record's input columns; for CSV input that is the header's order.
            let cols: Vec<String> = r.input.keys().cloned().collect();
            let mut head = cols.clone();
            head.extend(
                [
                    "completion",
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "cost_usd",
                    "status",
                    "error",
                ]
                .map(String::from),
            );
            let _ = w.write_record(&head);
            cols
        });
        let mut rec: Vec<String> = cols
            .iter()
            .map(|c| match r.input.get(c) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            })
            .collect();
        let u = r.usage.unwrap_or_default();
        let opt = |has: bool, v: u64| if has { v.to_string() } else { String::new() };
        rec.push(r.completion.clone().unwrap_or_default());
        rec.push(opt(r.usage.is_some(), u.prompt_tokens));
        rec.push(opt(r.usage.is_some(), u.completion_tokens));
        rec.push(opt(r.usage.is_some(), u.total_tokens));
        rec.push(r.cost_usd.map(|c| format!("{c:.8}")).unwrap_or_default());
        rec.push(match r.status {
            Status::Ok => "ok".into(),
            Status::Error => "error".into(),
        });
        rec.push(
            r.error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default(),
        );
        w.write_record(&rec)
            .map_err(|e| Error::Other(format!("{}: {e}", csv_path.display())))?;
        n += 1;
    }
    let mut inner = w
        .into_inner()
        .map_err(|e| Error::Other(format!("{}: {e}", csv_path.display())))?;
    inner.flush().map_err(io(&tmp))?;
    drop(inner);
    std::fs::rename(&tmp, csv_path).map_err(io(csv_path))?;
    Ok(n)
}
