//! The index: every key's latest record, loaded once from the journal (and the stale file)
//! by the one parser in `journal`, for resuming and for compacting.

use std::path::Path;

use crate::error::Error;
use crate::fingerprint::fingerprint_bytes;
use crate::ledger::journal::{self, Line};
use crate::ledger::record::Status;

use super::*;

pub(super) const OUTCOME_MASK: u8 = 3;
pub(super) const COPY: u8 = 4;
/// The line records money: a cost or an unconfirmed cost.
pub(super) const PAID: u8 = 8;
pub(super) const REFERENCED: u8 = 16;

/// One key's latest record. 48 bytes: a 1,000,000-row output's index is under 50 MB.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub fp: [u8; 16],
    /// The id's hash when the job has an id column, else 0.
    pub idh: u64,
    /// Hash of (row, id, input) as written, 0 when the line must be rewritten anyway; equal
    /// to the current row's [`ident`] when the record can be kept byte for byte.
    pub ident: u64,
    pub offset: u64,
    /// The first row that took this record during compaction: later rows copy from it.
    pub(super) first_row: u32,
    pub(super) flags: u8,
}

impl Entry {
    pub fn outcome(&self) -> Outcome {
        match self.flags & OUTCOME_MASK {
            0 => Outcome::Ok,
            1 => Outcome::FailedFinal,
            2 => Outcome::FailedTransient,
            _ => Outcome::Input,
        }
    }
    pub fn is_copy(&self) -> bool {
        self.flags & COPY != 0
    }
    pub(super) fn key(&self) -> ([u8; 16], u64) {
        (self.fp, self.idh)
    }
}

/// Everything the journal (and the stale file) says, loaded once.
#[derive(Default)]
pub struct Index {
    /// Sorted by key; one entry per key.
    pub(super) entries: Vec<Entry>,
    /// Records replaced by a later record of the same key that cost money: kept, as stale.
    pub(super) superseded_paid: Vec<u64>,
    /// (line number, offset) of lines that are not records.
    pub unreadable: Vec<(u64, u64)>,
    pub records: u64,
    /// Cost of every record in the output (the stale file's is `stale_spend`).
    pub spent_usd: f64,
    /// Worst-case cost of attempts that may have been billed without a usable completion.
    pub unconfirmed_usd: f64,
    pub mean_completion_tokens: Option<f64>,
    /// The stale file's records: not rows of this output, but answers a restored row can copy.
    pub(super) stale: Option<Box<Index>>,
}

impl Index {
    /// Adds the stale file's records as copy sources, so a row deleted from the input and put
    /// back later is not paid for again.
    pub fn with_stale(mut self, stale: &Path, keying: Keying) -> Result<Index, Error> {
        let ix = Index::load(stale, keying)?;
        self.stale = (ix.records > 0).then(|| Box::new(ix));
        Ok(self)
    }

    /// What the stale file's records cost (they were paid for).
    /// What the output has spent: its records, the stale file's, and what rows that ended
    /// with no record may have cost (`carried`).
    pub fn spent_usd_with(&self, carried: &super::Carried) -> f64 {
        self.spent_usd + self.unconfirmed_usd + self.stale_spent_usd() + carried.unconfirmed_usd
    }

    pub fn stale_spent_usd(&self) -> f64 {
        self.stale
            .as_ref()
            .map_or(0.0, |s| s.spent_usd + s.unconfirmed_usd)
    }

    /// Reads the journal at `path` (and the stale file's spend). Memory: 48 bytes per key.
    pub fn load(path: &Path, keying: Keying) -> Result<Index, Error> {
        let mut ix = Index::default();
        let mut last_dedup = 0usize;
        let (mut ok_rows, mut ok_tokens) = (0u64, 0u64);
        journal::for_each_line(path, |offset, number, bytes| {
            let line = match journal::parse_line(bytes) {
                Ok(Some(l)) => l,
                Ok(None) => return Ok(()),
                Err(why) => {
                    if ix.unreadable.len() < 5 {
                        tracing::warn!(
                            "{}: line {number} is not a record ({why}); it is kept aside",
                            path.display()
                        );
                    }
                    ix.unreadable.push((number, offset));
                    return Ok(());
                }
            };
            let Some(e) = entry_of(&line, bytes, offset, keying) else {
                if ix.unreadable.len() < 5 {
                    tracing::warn!(
                        "{}: line {number} has a malformed fingerprint; it is kept aside",
                        path.display()
                    );
                }
                ix.unreadable.push((number, offset));
                return Ok(());
            };
            ix.records += 1;
            ix.spent_usd += line.cost_usd.unwrap_or(0.0);
            ix.unconfirmed_usd += line.unconfirmed_usd.unwrap_or(0.0);
            if line.status == Status::Ok && line.copied_from.is_none() {
                if let Some(u) = &line.usage {
                    ok_rows += 1;
                    ok_tokens += u.completion_tokens;
                }
            }
            ix.entries.push(e);
            // Keep duplicates (reruns of a key) from piling up in memory.
            if ix.entries.len() >= 1024 && ix.entries.len() >= 2 * last_dedup {
                ix.dedup();
                last_dedup = ix.entries.len();
            }
            Ok(())
        })?;
        if ix.unreadable.len() > 5 {
            tracing::warn!(
                "{}: {} lines in all are not records; they are kept aside",
                path.display(),
                ix.unreadable.len()
            );
        }
        ix.dedup();
        if ok_rows > 0 {
            ix.mean_completion_tokens = Some(ok_tokens as f64 / ok_rows as f64);
        }
        Ok(ix)
    }

    /// One entry per key: the latest original record, else the latest copy. In place, so a
    /// large index never exists twice.
    pub(super) fn dedup(&mut self) {
        self.entries.sort_unstable_by(|a, b| {
            a.key()
                .cmp(&b.key())
                .then((!a.is_copy()).cmp(&!b.is_copy()))
                .then(a.offset.cmp(&b.offset))
        });
        // Sorted best-last within a key: keep each key's last entry.
        let mut kept = 0;
        for i in 0..self.entries.len() {
            let e = self.entries[i];
            if kept > 0 && self.entries[kept - 1].key() == e.key() {
                let old = self.entries[kept - 1];
                if old.flags & PAID != 0 {
                    self.superseded_paid.push(old.offset);
                }
                self.entries[kept - 1] = e;
            } else {
                self.entries[kept] = e;
                kept += 1;
            }
        }
        self.entries.truncate(kept);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn position(&self, fp: &[u8; 16], idh: u64) -> Option<usize> {
        self.entries
            .binary_search_by(|e| e.key().cmp(&(*fp, idh)))
            .ok()
    }

    pub fn get(&self, fp: &[u8; 16], idh: u64) -> Option<&Entry> {
        self.position(fp, idh).map(|i| &self.entries[i])
    }

    /// A record of the same request under any id, to copy from: an ok original first.
    pub(super) fn source_index(&self, fp: &[u8; 16], ok_only: bool) -> Option<usize> {
        let start = self.entries.partition_point(|e| e.fp < *fp);
        let end = start + self.entries[start..].partition_point(|e| e.fp == *fp);
        let rank = |e: &Entry| {
            (
                e.outcome() == Outcome::Ok,
                !e.is_copy(),
                e.flags & REFERENCED != 0,
            )
        };
        (start..end)
            .filter(|&i| !ok_only || self.entries[i].outcome() == Outcome::Ok)
            .max_by_key(|&i| rank(&self.entries[i]))
    }

    /// Whether an ok record of this request exists under any id (the stale file's included).
    pub fn has_ok_source(&self, fp: &[u8; 16]) -> bool {
        self.source_index(fp, true).is_some()
            || self.stale.as_ref().is_some_and(|s| s.has_ok_source(fp))
    }
}

pub(super) fn entry_of(line: &Line, bytes: &[u8], offset: u64, keying: Keying) -> Option<Entry> {
    let outcome = match (&line.status, &line.error) {
        (Status::Ok, _) => Outcome::Ok,
        (Status::Error, Some(e)) => error_outcome(e.kind),
        (Status::Error, None) => Outcome::FailedTransient,
    };
    let (fp, idh) = match (&line.fingerprint, outcome) {
        (Some(f), _) => (fingerprint_bytes(f)?, keying.id_hash(&line.id)),
        (None, Outcome::Input) => {
            let msg = line
                .error
                .as_ref()
                .map(|e| e.message.as_ref())
                .unwrap_or("");
            (input_error_key(line.row, msg), 0)
        }
        // A failure without a request fingerprint that is not an input error: nothing to key
        // it by; it is superseded by whatever the row gets next.
        (None, _) => (input_error_key(line.row, "no fingerprint"), 0),
    };
    let ident = if journal::is_canonical(bytes) {
        let input = line.input.map(|r| r.get().as_bytes()).unwrap_or(b"{}");
        ident(line.row, &line.id, input)
    } else {
        0
    };
    let mut flags = outcome as u8;
    if line.copied_from.is_some() {
        flags |= COPY;
    }
    if line.cost_usd.unwrap_or(0.0) > 0.0 || line.unconfirmed_usd.unwrap_or(0.0) > 0.0 {
        flags |= PAID;
    }
    Some(Entry {
        fp,
        idh,
        ident,
        offset,
        first_row: 0,
        flags,
    })
}
