//! Spend carried across runs: what rows that ended with no record may have cost.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ledger::journal::io_err;

/// Unconfirmed spend of attempts whose rows ended with no record (stopped, interrupted),
/// carried across runs in `OUTPUT.spend.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Carried {
    pub unconfirmed_usd: f64,
}

impl Carried {
    pub fn read(path: &Path) -> Result<Carried, Error> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Input {
                path: path.to_path_buf(),
                message: format!("not a spend file: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Carried::default()),
            Err(e) => Err(io_err(path, e)),
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), Error> {
        super::files::replace_bytes(path, &serde_json::to_vec(self).expect("serializes"))
    }
}
