//! What wrote an output, kept beside it (`OUTPUT.job.json`): `merge` joins only outputs of one
//! job, and `status` knows how many rows a shard had.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ledger::journal::io_err;
use crate::shard::Shard;

/// What wrote an output: which job, model, request constants and messages, and which shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stamp {
    pub job: String,
    pub model: String,
    /// Of the request's constant part: model, parameters, `extra`, who answers.
    pub params: String,
    /// Of the messages: roles, names, inline text and template files.
    pub messages: String,
    pub shard: Option<Shard>,
    /// Rows in the whole input when this shard last read all of it.
    pub input_rows: Option<u64>,
    /// Of those, this shard's.
    #[serde(default)]
    pub rows: Option<u64>,
    /// What the CSV of the merged output needs (stamps written before these read as none):
    /// the job's `[output] csv` without the shard's tag, relative to this output's folder.
    #[serde(default)]
    pub csv: Option<PathBuf>,
    #[serde(default)]
    pub csv_escape_formulas: bool,
    /// The CSV input's header, in order (`None`: a JSONL input, whose columns are the records').
    #[serde(default)]
    pub csv_input_columns: Option<Vec<String>>,
    /// The schema's top-level properties, in order (`None`: the records' `data` keys).
    #[serde(default)]
    pub csv_data_columns: Option<Vec<String>>,
}

impl Stamp {
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_vec_pretty(self).expect("serializes");
        super::files::replace_bytes(path, &text)
    }

    /// Where the stamp's `csv` is, for an output at `output`.
    pub fn csv_beside(&self, output: &Path) -> Option<PathBuf> {
        let dir = output.parent().unwrap_or(Path::new(""));
        self.csv.as_ref().map(|c| dir.join(c))
    }

    pub fn read(path: &Path) -> Result<Option<Stamp>, Error> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Input {
                    path: path.to_path_buf(),
                    message: format!("not a promptmill job stamp: {e}"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path, e)),
        }
    }
}
