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

/// One finished row. `row` comes first: the journal reads it from each line's prefix.
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
    /// Hash of the exact request body; `None` when the row never got as far as a request.
    pub fingerprint: Option<String>,
    pub error: Option<RecordError>,
}
