//! The ledger: what the journal says is done, known by request rather than by position.
//!
//! A row's key is its request fingerprint (and its id's hash, when the job names an id
//! column); an unreadable row's key is a hash of its row number and error. The index of those
//! keys is loaded once, by the one parser in `journal`, for resuming and for compacting.
//!
//! During a run the planner writes the plan spool: one line per input row, in input order,
//! naming the row's key (and its current id and fields when its record must be rewritten).
//! Compaction walks the spool and writes each row's record in input order; a second row with
//! the same request gets a copy that says where it came from. Records no row asked for moved
//! to `OUTPUT.stale.jsonl` (they were paid for); lines that are not records to
//! `OUTPUT.rejected.txt`. Nothing is deleted but superseded records that cost nothing.

mod compact;
pub mod files;
mod index;
mod indexfile;
pub mod journal;
pub mod record;
mod rewrite;
pub mod runs;
mod sent;
mod spend;
pub mod stamp;

use std::hash::{Hash, Hasher};

use sha2::{Digest, Sha256};

use crate::provider::ErrorKind;

pub use compact::{compact, move_appending, Plan, Planned, Sidecars, Spool};
pub use index::Index;
pub use sent::Sent;
pub use spend::Carried;

/// How a key's latest record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The API's verdict (400, 404, 422, …): sent again only with `--retry-failed`.
    FailedFinal,
    /// Connection, timeout, 5xx or 429 after all retries: sent again by a plain rerun.
    FailedTransient,
    /// The row could not be read or rendered.
    Input,
}

/// Whether the id column is part of a row's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keying {
    pub by_id: bool,
}

impl Keying {
    pub fn id_hash(&self, id: &str) -> u64 {
        if !self.by_id {
            return 0;
        }
        let mut h = stable_hasher();
        id.hash(&mut h);
        h.finish() | 1
    }
}

/// SipHash-1-3 with zero keys: what `std::hash::DefaultHasher::new()` computes today, from a
/// crate that promises it stays so. An id's hash is part of a batch line's `custom_id`, so a
/// rebuild between submit and collect must not change it (std does not promise that).
fn stable_hasher() -> siphasher::sip::SipHasher13 {
    siphasher::sip::SipHasher13::new()
}

/// The identity of a row's record as written: its number, id and fields.
pub fn ident(row: u64, id: &str, input_json: &[u8]) -> u64 {
    let mut h = stable_hasher();
    row.hash(&mut h);
    id.hash(&mut h);
    input_json.hash(&mut h);
    h.finish() | 1
}

/// The key of an unreadable row's record: same row, same error, same record.
pub fn input_error_key(row: u64, message: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"input-error\0");
    h.update(row.to_le_bytes());
    h.update(message.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

pub fn error_outcome(kind: ErrorKind) -> Outcome {
    match kind {
        ErrorKind::Input => Outcome::Input,
        k if k.is_final_verdict() => Outcome::FailedFinal,
        _ => Outcome::FailedTransient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hashes outputs and batches in flight already carry: they must never change.
    #[test]
    fn id_hashes_are_stable_across_builds() {
        let k = Keying { by_id: true };
        assert_eq!(k.id_hash("row-42"), {
            let mut h = std::hash::DefaultHasher::new();
            "row-42".hash(&mut h);
            h.finish() | 1
        });
        assert_eq!(format!("{:016x}", k.id_hash("row-42")), "b2dd7c8a72b73209");
        assert_eq!(Keying { by_id: false }.id_hash("row-42"), 0);
    }
}
