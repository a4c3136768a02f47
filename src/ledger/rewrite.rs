//! A record rewritten for the row that takes it: renumbered, with the row's current id and
//! fields, or as a free copy of another row's answer.

use std::path::Path;

use crate::error::Error;
use crate::ledger::record::{CopiedFrom, Record};

use super::index::{entry_of_record, Entry};
use super::{Keying, Planned};

/// The record `line` (at `offset` in `path`) rewritten for the row `p` names: its number, id,
/// fields and fingerprint. `copy`: as a free copy of another row's answer, from the given row
/// (`None`: the row the record itself names). With the line, its index entry (at offset 0),
/// made from the record rather than by parsing the line again.
pub(super) fn rewrite(
    line: &[u8],
    p: Planned,
    copy: Option<Option<u64>>,
    path: &Path,
    offset: u64,
    keying: Keying,
) -> Result<(Vec<u8>, Option<Entry>), Error> {
    let mut r: Record = serde_json::from_slice(line.trim_ascii()).map_err(|err| Error::Input {
        path: path.to_path_buf(),
        message: format!("the record at byte {offset}: {err}"),
    })?;
    if let Some(from_row) = copy {
        r.copied_from = Some(CopiedFrom {
            row: from_row.unwrap_or(r.row),
            id: r.id.clone(),
        });
        r.usage = None;
        r.cost_usd = Some(0.0);
        r.unconfirmed_usd = None;
        r.attempts = 0;
        r.latency_ms = 0;
    }
    r.row = p.row;
    if let Some(id) = p.id {
        r.id = id;
    }
    if let Some(input) = p.input {
        r.input = input;
    }
    if let Some(fp) = p.fingerprint {
        r.fingerprint = Some(fp);
    }
    let mut s = serde_json::to_vec(&r).expect("a record serializes");
    s.push(b'\n');
    let input = serde_json::to_vec(&r.input).expect("fields serialize");
    let entry = entry_of_record(&r, &input, &s, 0, keying);
    Ok((s, entry))
}
