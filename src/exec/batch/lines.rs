//! Batch input lines: one row's request in the Batch API's line format, and the split of
//! lines into files within the limits.

use serde_json::Value;

use super::*;
use crate::job::BatchLimits;

/// Splits lines into files within the limits: requests per file and bytes per file.
pub struct Splitter {
    pub(super) limits: BatchLimits,
    /// (requests, bytes) of each file so far.
    pub files: Vec<(u64, u64)>,
}

impl Splitter {
    pub fn new(limits: BatchLimits) -> Splitter {
        Splitter {
            limits,
            files: Vec::new(),
        }
    }

    /// A line longer than a whole file cannot be submitted.
    pub fn check(&self, len: u64) -> Result<(), String> {
        if len > self.limits.max_bytes_per_file {
            return Err(format!(
                "the request is {len} bytes as a batch line, over the file limit of {} bytes \
                 ([batch] max_bytes_per_file)",
                self.limits.max_bytes_per_file
            ));
        }
        Ok(())
    }

    /// Counts a line; `true` when it starts a new file.
    pub fn add(&mut self, len: u64) -> bool {
        let new = self.files.last().is_none_or(|&(n, b)| {
            n as usize >= self.limits.max_requests_per_file
                || b + len > self.limits.max_bytes_per_file
        });
        if new {
            self.files.push((0, 0));
        }
        let f = self.files.last_mut().expect("a file");
        f.0 += 1;
        f.1 += len;
        new
    }
}

/// A row's request as OpenAI's Batch API reads it, and engines that read the same files
/// (vLLM's `run-batch`): OpenAI's route, the job's own model.
pub fn write_openai_line(out: &mut Vec<u8>, p: &crate::request::Prepared, idh: u64, stream: bool) {
    write_line(
        out,
        "/v1/chat/completions",
        None,
        p.row.number,
        &p.fingerprint,
        idh,
        &p.request.body,
        stream,
    );
}

/// One Batch API input line: `{"custom_id", "method", "url", "body"}`. The body is the online
/// request's, without streaming (the Batch API answers whole) and, where the service wants
/// it, naming the deployment.
#[allow(clippy::too_many_arguments)]
pub fn write_line(
    out: &mut Vec<u8>,
    url: &str,
    model: Option<&str>,
    row: u64,
    fp: &[u8; 16],
    idh: u64,
    body: &[u8],
    stream: bool,
) {
    out.clear();
    out.extend_from_slice(b"{\"custom_id\":");
    serde_json::to_writer(&mut *out, &results::custom_id(row, fp, idh)).expect("serializes");
    out.extend_from_slice(b",\"method\":\"POST\",\"url\":");
    serde_json::to_writer(&mut *out, url).expect("a string serializes");
    out.extend_from_slice(b",\"body\":");
    if !stream && model.is_none() {
        out.extend_from_slice(body);
    } else {
        let mut v: serde_json::Map<String, Value> =
            serde_json::from_slice(body).expect("our own body parses");
        v.remove("stream");
        v.remove("stream_options");
        if let Some(m) = model {
            v.insert("model".into(), Value::String(m.to_string()));
        }
        serde_json::to_writer(&mut *out, &v).expect("serializes");
    }
    out.extend_from_slice(b"}\n");
}
