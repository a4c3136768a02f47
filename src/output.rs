//! The output record: one per row, one JSON line.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
    /// `batch` when the Batch API answered the row (online rows leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::job::Mode>,
    /// The batch that answered the row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// Fields another tool added to the line: kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}
