//! The index: every key's latest record, for resuming and for compacting. Its entries live on
//! disk, sorted by key in the index file beside the output (`indexfile`), and are read
//! memory-mapped; what stays in memory is a bloom filter over the keys (so a row that is not
//! done costs no disk read) and the fence of the file's blocks: about 1.7 bytes a record.
//! On disk, 64 bytes a record.

use fastbloom::BloomFilter;

use crate::error::Error;
use crate::ledger::journal::Line;
use crate::ledger::record::Status;
use crate::ledger::runs::Table;

use super::*;

pub(super) const OUTCOME_MASK: u8 = 3;
pub(super) const COPY: u8 = 4;
/// The line records money: a cost or an unconfirmed cost.
pub(super) const PAID: u8 = 8;
/// An ok original record with usage: its completion tokens count in the mean.
pub(super) const USAGE: u8 = 16;

/// An entry's size on disk: fingerprint 16, id hash 8, ident 8, offset and flags 8, cost 8,
/// unconfirmed cost 8, completion tokens 4, line length 4. The money and tokens are there so an
/// index file can be written for a compacted output without parsing it again.
pub(super) const REC: usize = 64;
/// The sort key: the fingerprint and the id hash (big-endian, so bytes sort as the numbers).
pub(super) const KEY: usize = 24;

/// One key's latest record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub fp: [u8; 16],
    /// The id's hash when the job has an id column, else 0.
    pub idh: u64,
    /// Hash of (row, id, input) as written, 0 when the line must be rewritten anyway; equal
    /// to the current row's [`ident`] when the record can be kept byte for byte.
    pub ident: u64,
    /// Where the record starts in the journal (under 2^56).
    pub offset: u64,
    pub(super) flags: u8,
    /// The line's `cost_usd` and `unconfirmed_usd` (0 when absent).
    pub(super) cost: f64,
    pub(super) unconfirmed: f64,
    /// Completion tokens, when `USAGE` is set.
    pub(super) tokens: u32,
    /// The line's length with its line end (0: unknown), so compaction can keep a line in
    /// place without reading it.
    pub(super) len: u32,
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
    /// The record's line length with its line end (0: unknown).
    pub fn line_len(&self) -> u32 {
        self.len
    }

    pub(super) fn encode(&self) -> [u8; REC] {
        let mut b = [0u8; REC];
        b[..16].copy_from_slice(&self.fp);
        b[16..24].copy_from_slice(&self.idh.to_be_bytes());
        b[24..32].copy_from_slice(&self.ident.to_le_bytes());
        b[32..40].copy_from_slice(&(self.offset | u64::from(self.flags) << 56).to_le_bytes());
        b[40..48].copy_from_slice(&self.cost.to_le_bytes());
        b[48..56].copy_from_slice(&self.unconfirmed.to_le_bytes());
        b[56..60].copy_from_slice(&self.tokens.to_le_bytes());
        b[60..64].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> Entry {
        let word = |r: std::ops::Range<usize>| -> [u8; 8] { b[r].try_into().expect("8 bytes") };
        let last = u64::from_le_bytes(word(32..40));
        Entry {
            fp: b[..16].try_into().expect("16 bytes"),
            idh: u64::from_be_bytes(word(16..24)),
            ident: u64::from_le_bytes(word(24..32)),
            offset: last & ((1 << 56) - 1),
            flags: (last >> 56) as u8,
            cost: f64::from_le_bytes(word(40..48)),
            unconfirmed: f64::from_le_bytes(word(48..56)),
            tokens: u32::from_le_bytes(b[56..60].try_into().expect("4 bytes")),
            len: u32::from_le_bytes(b[60..64].try_into().expect("4 bytes")),
        }
    }
}

/// The order of encoded entries: by key, then copies before originals, then by offset, so
/// the last of a key is its latest original record (else its latest copy).
pub(super) fn cmp_encoded(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let rank = |x: &[u8]| {
        let last = u64::from_le_bytes(x[32..40].try_into().expect("8 bytes"));
        ((last >> 56) as u8 & COPY == 0, last & ((1 << 56) - 1))
    };
    a[..KEY].cmp(&b[..KEY]).then_with(|| rank(a).cmp(&rank(b)))
}

/// Everything the journal (and the stale file) says.
pub struct Index {
    /// Sorted by key; one entry per key.
    pub(super) entries: Table,
    /// Over the fingerprints of `entries`; `None` when there are none.
    pub(super) filter: Option<BloomFilter>,
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

impl Default for Index {
    fn default() -> Index {
        Index {
            entries: Table::empty(REC),
            filter: None,
            superseded_paid: Vec::new(),
            unreadable: Vec::new(),
            records: 0,
            spent_usd: 0.0,
            unconfirmed_usd: 0.0,
            mean_completion_tokens: None,
            stale: None,
        }
    }
}

/// The bloom filter's hash of a fingerprint: bytes the fence does not use.
pub(super) fn filter_hash(fp: &[u8; 16]) -> u64 {
    u64::from_le_bytes(fp[8..16].try_into().expect("8 bytes"))
}

impl Index {
    /// What the output has spent: its records, the stale file's, and what rows that ended
    /// with no record may have cost (`carried`).
    pub fn spent_usd_with(&self, carried: &super::Carried) -> f64 {
        self.spent_usd + self.unconfirmed_usd + self.stale_spent_usd() + carried.unconfirmed_usd
    }

    /// What the stale file's records cost (they were paid for).
    pub fn stale_spent_usd(&self) -> f64 {
        self.stale
            .as_ref()
            .map_or(0.0, |s| s.spent_usd + s.unconfirmed_usd)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn entry(&self, i: usize) -> Result<Entry, Error> {
        self.entries.with(i, Entry::decode)
    }

    fn maybe(&self, fp: &[u8; 16]) -> bool {
        self.filter
            .as_ref()
            .is_some_and(|f| f.contains_hash(filter_hash(fp)))
    }

    pub(super) fn position(&self, fp: &[u8; 16], idh: u64) -> Result<Option<usize>, Error> {
        if !self.maybe(fp) {
            return Ok(None);
        }
        let mut key = [0u8; KEY];
        key[..16].copy_from_slice(fp);
        key[16..].copy_from_slice(&idh.to_be_bytes());
        let r = self.entries.equal_range(&key)?;
        Ok((!r.is_empty()).then_some(r.start))
    }

    pub fn get(&self, fp: &[u8; 16], idh: u64) -> Result<Option<Entry>, Error> {
        self.position(fp, idh)?.map(|i| self.entry(i)).transpose()
    }

    /// A record of the same request under any id, to copy from: an ok original first, then
    /// one no row took yet (`taken`: compaction's first taker of each entry, 0 for none).
    pub(super) fn source_index(
        &self,
        fp: &[u8; 16],
        ok_only: bool,
        taken: &[u32],
    ) -> Result<Option<usize>, Error> {
        if !self.maybe(fp) {
            return Ok(None);
        }
        let mut best = None;
        for i in self.entries.equal_range(fp)? {
            let e = self.entry(i)?;
            if ok_only && e.outcome() != Outcome::Ok {
                continue;
            }
            let referenced = taken.get(i).is_some_and(|&t| t != 0);
            let rank = (e.outcome() == Outcome::Ok, !e.is_copy(), referenced);
            // The last of equal ranks wins, as `max_by_key` would.
            if best.is_none_or(|(r, _)| rank >= r) {
                best = Some((rank, i));
            }
        }
        Ok(best.map(|(_, i)| i))
    }

    /// Whether an ok record of this request exists under any id (the stale file's included).
    pub fn has_ok_source(&self, fp: &[u8; 16]) -> Result<bool, Error> {
        if self.source_index(fp, true, &[])?.is_some() {
            return Ok(true);
        }
        match &self.stale {
            Some(s) => s.has_ok_source(fp),
            None => Ok(false),
        }
    }
}

/// What an index entry is made of, from a parsed line or from a record compaction rewrote.
struct Facts<'a> {
    row: u64,
    id: &'a str,
    ok: bool,
    error: Option<(crate::provider::ErrorKind, &'a str)>,
    fingerprint: Option<&'a str>,
    copied: bool,
    cost: f64,
    unconfirmed: f64,
    completion_tokens: Option<u64>,
    /// The `input` object as written; `None` when the line cannot be kept byte for byte.
    input: Option<&'a [u8]>,
}

pub(super) fn entry_of(line: &Line, bytes: &[u8], offset: u64, keying: Keying) -> Option<Entry> {
    let input = super::journal::is_canonical(bytes)
        .then(|| line.input.map(|r| r.get().as_bytes()).unwrap_or(b"{}"));
    let facts = Facts {
        row: line.row,
        id: &line.id,
        ok: line.status == Status::Ok,
        error: line.error.as_ref().map(|e| (e.kind, e.message.as_ref())),
        fingerprint: line.fingerprint.as_deref(),
        copied: line.copied_from.is_some(),
        cost: line.cost_usd.unwrap_or(0.0),
        unconfirmed: line.unconfirmed_usd.unwrap_or(0.0),
        completion_tokens: line.usage.as_ref().map(|u| u.completion_tokens),
        input,
    };
    entry_from(&facts, bytes.len(), offset, keying)
}

/// The entry of a record compaction serialized itself (`line`, canonical by construction),
/// without parsing the line again; `input` is its `input` object as serialized.
pub(super) fn entry_of_record(
    r: &crate::ledger::record::Record,
    input: &[u8],
    line: &[u8],
    offset: u64,
    keying: Keying,
) -> Option<Entry> {
    let facts = Facts {
        row: r.row,
        id: &r.id,
        ok: r.status == Status::Ok,
        error: r.error.as_ref().map(|e| (e.kind, e.message.as_str())),
        fingerprint: r.fingerprint.as_deref(),
        copied: r.copied_from.is_some(),
        cost: r.cost_usd.unwrap_or(0.0),
        unconfirmed: r.unconfirmed_usd.unwrap_or(0.0),
        completion_tokens: r.usage.as_ref().map(|u| u.completion_tokens),
        input: Some(input),
    };
    entry_from(&facts, line.len(), offset, keying)
}

fn entry_from(f: &Facts, len: usize, offset: u64, keying: Keying) -> Option<Entry> {
    let outcome = match (f.ok, f.error) {
        (true, _) => Outcome::Ok,
        (false, Some((kind, _))) => error_outcome(kind),
        (false, None) => Outcome::FailedTransient,
    };
    let (fp, idh) = match (f.fingerprint, outcome) {
        (Some(fp), _) => (
            crate::fingerprint::fingerprint_bytes(fp)?,
            keying.id_hash(f.id),
        ),
        (None, Outcome::Input) => (input_error_key(f.row, f.error.map_or("", |e| e.1)), 0),
        // A failure without a request fingerprint that is not an input error: nothing to key
        // it by; it is superseded by whatever the row gets next.
        (None, _) => (input_error_key(f.row, "no fingerprint"), 0),
    };
    let ident = f.input.map_or(0, |input| ident(f.row, f.id, input));
    let mut flags = outcome as u8;
    if f.copied {
        flags |= COPY;
    }
    if f.cost > 0.0 || f.unconfirmed > 0.0 {
        flags |= PAID;
    }
    let mut tokens = 0;
    if f.ok && !f.copied {
        if let Some(t) = f.completion_tokens {
            flags |= USAGE;
            tokens = t.min(u64::from(u32::MAX)) as u32;
        }
    }
    Some(Entry {
        fp,
        idh,
        ident,
        offset,
        flags,
        cost: f.cost,
        unconfirmed: f.unconfirmed,
        tokens,
        len: u32::try_from(len).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_through_its_bytes() {
        let e = Entry {
            fp: [7; 16],
            idh: 0x0102_0304_0506_0708,
            ident: 99,
            offset: (1 << 56) - 1,
            flags: PAID | COPY | 2,
            cost: 0.25,
            unconfirmed: 1.5,
            tokens: 7,
            len: 300,
        };
        assert_eq!(Entry::decode(&e.encode()), e);
        let orig = Entry { flags: 0, ..e };
        assert!(
            cmp_encoded(&e.encode(), &orig.encode()).is_lt(),
            "a copy sorts first"
        );
    }
}
