//! What wrote an output, kept beside it (`OUTPUT.job.json`): `merge` joins only outputs of one
//! job, and `status` knows how many rows a shard had.

use std::path::Path;

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
}

impl Stamp {
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_vec_pretty(self).expect("serializes");
        super::files::replace_bytes(path, &text)
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
