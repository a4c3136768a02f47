//! Downloaded result files, indexed by row key: a line is found by its `custom_id`, whatever
//! order the lines came back in, and read from disk only when its row is written. The index
//! holds 40 bytes a line, never the completions.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Error;
use crate::ledger::journal::io_err;
use crate::provider::{Completion, ErrorKind};

/// A result no row of the input matched.
pub struct Unmatched {
    pub row: u64,
    pub fp: [u8; 16],
    pub outcome: Answer,
    pub from: Answerer,
}

/// What a result line says about its row.
#[derive(Debug)]
pub enum Answer {
    Answered(Box<Completion>),
    /// The API's answer was an error: the row fails (a `--retry-failed` sends it again).
    Failed {
        status: Option<u16>,
        message: String,
    },
    /// Never run (the batch expired or was cancelled first): the row is pending.
    NotRun,
}

/// A row's key as a batch line's `custom_id` carries it: `r{row}-{fingerprint}[-{id hash}]`.
pub fn custom_id(row: u64, fp: &[u8; 16], idh: u64) -> String {
    let fp = crate::fingerprint::hex(fp);
    if idh == 0 {
        format!("r{row}-{fp}")
    } else {
        format!("r{row}-{fp}-{idh:016x}")
    }
}

/// A row's key within 64 characters of `[A-Za-z0-9_-]` (Anthropic's `custom_id`):
/// `r{row}-{fingerprint}-{id hash}` in base 62, the last two of fixed width (22 and 11).
pub fn compact_custom_id(row: u64, fp: &[u8; 16], idh: u64) -> String {
    let mut s = String::with_capacity(47);
    s.push('r');
    base62(&mut s, u128::from(row), 0);
    s.push('-');
    base62(&mut s, u128::from_be_bytes(*fp), 22);
    s.push('-');
    base62(&mut s, u128::from(idh), 11);
    s
}

const B62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `n` in base 62, left-padded with zeros to `width`.
fn base62(out: &mut String, mut n: u128, width: usize) {
    let mut digits = Vec::with_capacity(22);
    while n > 0 || digits.is_empty() {
        digits.push(B62[(n % 62) as usize]);
        n /= 62;
    }
    digits.resize(width.max(digits.len()), b'0');
    out.extend(digits.iter().rev().map(|&d| d as char));
}

fn unbase62(s: &str) -> Option<u128> {
    s.bytes().try_fold(0u128, |n, b| {
        let d = B62.iter().position(|&c| c == b)? as u128;
        n.checked_mul(62)?.checked_add(d)
    })
}

/// The row number and key in a `custom_id`, if it is one of ours: either spelling
/// ([`custom_id`]'s hex, [`compact_custom_id`]'s base 62), told apart by the key's width.
pub fn parse_custom_id(id: &str) -> Option<(u64, [u8; 16], u64)> {
    let mut it = id.split('-');
    let row = it.next()?.strip_prefix('r')?;
    let fp = it.next()?;
    let idh = it.next();
    if it.next().is_some() {
        return None;
    }
    if fp.len() == 22 {
        let idh = idh.filter(|h| h.len() == 11)?;
        return Some((
            u64::try_from(unbase62(row)?).ok()?,
            unbase62(fp)?.to_be_bytes(),
            u64::try_from(unbase62(idh)?).ok()?,
        ));
    }
    let fp = crate::fingerprint::fingerprint_bytes(fp)?;
    let idh = match idh {
        Some(h) => u64::from_str_radix(h, 16).ok()?,
        None => 0,
    };
    Some((row.parse().ok()?, fp, idh))
}

#[derive(Debug, Clone, Copy)]
struct ResultEntry {
    fp: [u8; 16],
    idh: u64,
    offset: u64,
    len: u32,
    file: u16,
    /// Matched to a row of this run's input.
    used: bool,
}

/// A line's row key: `custom_id` (OpenAI), `key` (Gemini).
#[derive(Deserialize)]
pub(super) struct Head<'a> {
    #[serde(borrow, alias = "key")]
    pub custom_id: &'a str,
}

/// The batch a result came from, and how long it took from submission to its end.
#[derive(Debug, Clone, Default)]
pub struct Answerer {
    pub batch_id: String,
    pub took_ms: u64,
}

/// Every downloaded line of the batches being collected.
pub struct Results {
    files: Vec<(PathBuf, File, Answerer)>,
    entries: Vec<ResultEntry>,
    /// The vendor's reading of one result line (`BatchApi::outcome`).
    parse: fn(&[u8]) -> Answer,
}

impl Results {
    /// The vendor's reading of a result line, for an index that starts over.
    pub fn parser(&self) -> fn(&[u8]) -> Answer {
        self.parse
    }

    pub fn new(parse: fn(&[u8]) -> Answer) -> Results {
        Results {
            files: Vec::new(),
            entries: Vec::new(),
            parse,
        }
    }

    /// Indexes one downloaded file of batch `batch_id`. Lines that are not ours are reported
    /// and skipped.
    pub fn add_file(&mut self, path: &Path, from: Answerer) -> Result<(), Error> {
        let file = u16::try_from(self.files.len())
            .map_err(|_| Error::Other("more than 65535 batch result files at once".into()))?;
        // Streamed: a results file of a million lines is hundreds of megabytes.
        let mut reader = std::io::BufReader::with_capacity(
            1 << 20,
            File::open(path).map_err(|e| io_err(path, e))?,
        );
        let mut line = Vec::with_capacity(4096);
        let mut offset = 0u64;
        let mut n = 0u64;
        loop {
            line.clear();
            let k = std::io::BufRead::read_until(&mut reader, b'\n', &mut line)
                .map_err(|e| io_err(path, e))?;
            if k == 0 {
                break;
            }
            n += 1;
            let start = offset;
            offset += k as u64;
            let trimmed = line.trim_ascii_end();
            if trimmed.is_empty() {
                continue;
            }
            let key = serde_json::from_slice::<Head>(trimmed)
                .ok()
                .and_then(|h| parse_custom_id(h.custom_id));
            let Some((_, fp, idh)) = key else {
                tracing::warn!(
                    "{}: line {n}: not a result line for one of this job's requests; skipped",
                    path.display()
                );
                continue;
            };
            self.entries.push(ResultEntry {
                fp,
                idh,
                offset: start,
                len: trimmed.len() as u32,
                file,
                used: false,
            });
        }
        let f = File::open(path).map_err(|e| io_err(path, e))?;
        self.files.push((path.to_path_buf(), f, from));
        Ok(())
    }

    /// Sorts the index; call once, after the last `add_file`.
    pub fn seal(&mut self) {
        self.entries.sort_unstable_by_key(|e| (e.fp, e.idh));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, fp: &[u8; 16], idh: u64) -> Option<usize> {
        let i = self.entries.partition_point(|e| (e.fp, e.idh) < (*fp, idh));
        (i < self.entries.len() && self.entries[i].fp == *fp && self.entries[i].idh == idh)
            .then_some(i)
    }

    /// The result for a row, marking it matched. A row answered in two batches (an earlier
    /// batch expired with the line already run) keeps its first answer.
    pub fn take(&mut self, fp: &[u8; 16], idh: u64) -> Result<Option<(Answer, Answerer)>, Error> {
        let Some(first) = self.find(fp, idh) else {
            return Ok(None);
        };
        let mut chosen = None;
        let mut i = first;
        while i < self.entries.len() && self.entries[i].fp == *fp && self.entries[i].idh == idh {
            self.entries[i].used = true;
            let outcome = self.read(i)?;
            if chosen.is_none() && !matches!(outcome.0, Answer::NotRun) {
                chosen = Some(outcome);
            }
            i += 1;
        }
        Ok(chosen.or(Some((Answer::NotRun, Answerer::default()))))
    }

    /// Lines no row of this run's input matched: answers for rows that left the input.
    pub fn unmatched(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.entries.len()).filter(|&i| !self.entries[i].used)
    }

    /// ResultEntry `i`'s row number, key, outcome and batch.
    pub fn entry(&self, i: usize) -> Result<Unmatched, Error> {
        let e = self.entries[i];
        let buf = self.bytes(i)?;
        let row = serde_json::from_slice::<Head>(&buf)
            .ok()
            .and_then(|h| parse_custom_id(h.custom_id))
            .map_or(0, |k| k.0);
        Ok(Unmatched {
            row,
            fp: e.fp,
            outcome: (self.parse)(&buf),
            from: self.files[e.file as usize].2.clone(),
        })
    }

    fn bytes(&self, i: usize) -> Result<Vec<u8>, Error> {
        let e = self.entries[i];
        let (path, f, _) = &self.files[e.file as usize];
        let mut buf = vec![0u8; e.len as usize];
        f.read_exact_at(&mut buf, e.offset)
            .map_err(|err| io_err(path, err))?;
        Ok(buf)
    }

    fn read(&self, i: usize) -> Result<(Answer, Answerer), Error> {
        let buf = self.bytes(i)?;
        let from = self.files[self.entries[i].file as usize].2.clone();
        Ok(((self.parse)(&buf), from))
    }
}

/// The kind every failed batch line gets: final, so a plain rerun leaves it and
/// `--retry-failed` sends it again.
pub const FAILED_KIND: ErrorKind = ErrorKind::BatchLine;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ids_round_trip() {
        let fp = [7u8; 16];
        assert_eq!(parse_custom_id(&custom_id(12, &fp, 0)), Some((12, fp, 0)));
        assert_eq!(
            parse_custom_id(&custom_id(3, &fp, 0xdead_beef_0000_0001)),
            Some((3, fp, 0xdead_beef_0000_0001))
        );
        assert_eq!(parse_custom_id("request-1"), None);
        assert_eq!(parse_custom_id("r1-zz"), None);
    }

    #[test]
    fn compact_ids_fit_anthropics_pattern_at_the_extremes_and_round_trip() {
        for (row, fp, idh) in [
            (u64::MAX, [0xffu8; 16], u64::MAX),
            (0, [0u8; 16], 0),
            (12, [7u8; 16], 0xdead_beef_0000_0001),
        ] {
            let id = compact_custom_id(row, &fp, idh);
            assert!(id.len() <= 64, "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(parse_custom_id(&id), Some((row, fp, idh)), "{id}");
        }
        // A hex key is never read as base 62, nor the reverse.
        let fp = [0xabu8; 16];
        assert_eq!(parse_custom_id(&custom_id(5, &fp, 9)), Some((5, fp, 9)));
    }
}
