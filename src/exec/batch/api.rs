//! What the batch executor asks of a vendor's batch API: one trait, and one file per vendor
//! behind it (`openai.rs`: OpenAI and Azure OpenAI). The executor (`pass`, `submit`, the
//! commands in `mod.rs`) speaks only this; a new vendor's batch endpoints are a new file that
//! implements it and a line in `vendor::for_job`.
//!
//! The vocabulary is the OpenAI Batch API's, as the first vendor's: a batch's `status` is one
//! of `validating`, `in_progress`, `finalizing`, `completed`, `failed`, `expired`,
//! `cancelling`, `cancelled`, and its counts are `total`, `completed`, `failed`. Another
//! vendor's file translates its own states into these.

use std::path::Path;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::results::Answer;
use super::state::{LineCounts, Log};
use crate::error::Error;
use crate::exec::retry::Retrier;
use crate::provider::{ErrorKind, ProviderError};

pub type Fut<'a, T> = BoxFuture<'a, T>;

/// A vendor's batch API, as the executor uses it. Every step that spends money (a create) is
/// made once and looked up, never sent blind twice (`create_once`, `find_batch`).
pub trait BatchApi: Send + Sync {
    /// One row's request as a line of this API's batch input (`custom_id` names the row and
    /// its request); `body` is the online request's, `stream` whether it asks to stream.
    fn write_line(&self, out: &mut Vec<u8>, custom_id: &str, body: &[u8], stream: bool);
    /// The `custom_id` of a row's line: the row and its key, as [`super::results`] reads
    /// them back.
    fn custom_id(&self, row: u64, fp: &[u8; 16], idh: u64) -> String {
        super::results::custom_id(row, fp, idh)
    }
    /// Reads one line of a downloaded results file.
    fn outcome(&self) -> fn(&[u8]) -> Answer;
    /// Makes a part's input file available to a create (an upload); its handle.
    fn stage<'a>(&'a self, path: &'a Path, name: &'a str) -> Fut<'a, Result<String, Error>>;
    /// The handle of a file staged as `name` by a run that stopped before recording it.
    fn find_staged<'a>(&'a self, name: &'a str) -> Fut<'a, Result<Option<String>, Error>>;
    /// Removes a staged file nothing will use.
    fn unstage<'a>(&'a self, handle: &'a str) -> Fut<'a, Result<(), Error>>;
    /// Asks once for a batch of the staged file, tagged with `metadata` (how `find_batch`
    /// finds it again). Never retried here: see [`CreateFailed`].
    fn create_once<'a>(
        &'a self,
        staged: &'a str,
        metadata: &'a Map<String, Value>,
    ) -> Fut<'a, Result<Batch, CreateFailed>>;
    /// The batch made of a part whose create's answer was lost, if the server holds one.
    fn find_batch<'a>(&'a self, lost: &'a Lookup) -> Fut<'a, Result<Option<Batch>, Error>>;
    fn retrieve<'a>(&'a self, id: &'a str) -> Fut<'a, Result<Batch, Error>>;
    fn cancel<'a>(&'a self, id: &'a str) -> Fut<'a, Result<Batch, Error>>;
    /// Downloads a results file (`Batch::output_file_id`, `error_file_id`) to `dest`, whole
    /// or not at all.
    fn download<'a>(&'a self, file: &'a str, dest: &'a Path) -> Fut<'a, Result<(), Error>>;
    /// The job's retry policy, for the steps the executor retries itself (a create).
    fn retrier(&self) -> Retrier;
}

/// What is known of a part whose create's answer was lost, for finding its batch again. A vendor
/// that tags batches (OpenAI's metadata, Gemini's display name) matches `part`; one that cannot
/// (Anthropic) matches the time, the number of requests and the ids not yet on record, and
/// calls two candidates none (the part stays `creating`: nothing is sent twice).
#[derive(Debug, Clone)]
pub struct Lookup {
    pub part: String,
    /// When the create began (seconds since the epoch): the batch was made at or after it.
    pub since: u64,
    pub requests: u64,
    /// Batch ids the log already holds for other parts: not this part's.
    pub known: Vec<String>,
    /// The part's input file, while it is kept: a vendor may check an ended candidate's
    /// results against its lines.
    pub file: std::path::PathBuf,
}

impl Lookup {
    /// What finding part `id`'s batch again needs: when its create began, its size, its file
    /// in the batch folder `dir`, and the batches already on record for the other parts.
    pub fn of(log: &Log, id: &str, dir: &Path) -> Option<Lookup> {
        let p = log.part(id)?;
        Some(Lookup {
            file: dir.join(&p.file),
            part: p.id.clone(),
            since: p.creating_at,
            requests: p.requests,
            known: log
                .parts
                .iter()
                .filter(|o| o.id != id)
                .filter_map(|o| o.batch_id.clone())
                .collect(),
        })
    }
}

/// A batch as the API describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Batch {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub request_counts: Option<LineCounts>,
    #[serde(default)]
    pub created_at: Option<u64>,
    #[serde(default)]
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub errors: Option<BatchErrors>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
    #[serde(flatten)]
    pub times: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchErrors {
    #[serde(default)]
    pub data: Vec<BatchError>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub line: Option<u64>,
}

impl Batch {
    pub fn is_final(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }

    /// When it reached its final status (seconds since the epoch), if the API says.
    pub fn ended_at(&self) -> Option<u64> {
        ["completed_at", "failed_at", "expired_at", "cancelled_at"]
            .iter()
            .find_map(|k| self.times.get(*k).and_then(Value::as_u64))
    }

    /// A failed batch's validation errors, each with its line number.
    pub fn problems(&self) -> Vec<String> {
        self.errors
            .iter()
            .flat_map(|e| &e.data)
            .map(|e| {
                let line = e.line.map(|l| format!("line {l}: ")).unwrap_or_default();
                let code = e
                    .code
                    .as_deref()
                    .map(|c| format!(" [{c}]"))
                    .unwrap_or_default();
                format!("{line}{}{code}", e.message.as_deref().unwrap_or("invalid"))
            })
            .collect()
    }
}

/// A create that failed. `maybe_made`: the request may have reached the server and made the
/// batch (a timeout, a reset, a 5xx, an answer that did not parse); a refused connection, a
/// 4xx or a 429 made nothing.
#[derive(Debug)]
pub struct CreateFailed {
    pub error: Error,
    pub maybe_made: bool,
    /// The failure as the retry policy judges it; None: not to be retried.
    pub retry: Option<ProviderError>,
}

impl CreateFailed {
    pub(super) fn before(error: Error) -> CreateFailed {
        CreateFailed {
            error,
            maybe_made: false,
            retry: None,
        }
    }

    pub(super) fn of(error: Error, e: ProviderError) -> CreateFailed {
        let maybe_made = !e.unreachable
            && matches!(
                e.kind,
                ErrorKind::Server
                    | ErrorKind::Timeout
                    | ErrorKind::Connection
                    | ErrorKind::InvalidResponse
            );
        CreateFailed {
            error,
            maybe_made,
            retry: Some(e),
        }
    }
}
