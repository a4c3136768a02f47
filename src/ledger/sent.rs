//! The requests sent this run (the first 8 bytes of each fingerprint), so a later row with the
//! same request is copied, not sent again. Exact, and flat in memory: the latest keys in a
//! hash set, the older ones in one sorted scratch file (merged with each spilled chunk) behind
//! a bloom filter, so a request not sent before costs no disk read.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use fastbloom::BloomFilter;

use crate::error::Error;
use crate::ledger::journal::io_err;
use crate::ledger::runs::{self, FenceBuilder, Table};

/// Keys held in the hash set before they are spilled: about 4 MB.
const CHUNK: usize = 256 * 1024;

pub struct Sent {
    /// Scratch files go beside this path.
    near: PathBuf,
    recent: HashSet<u64>,
    /// Every spilled key, sorted (big-endian), and its mapping.
    spilled: Option<Table>,
    filter: BloomFilter,
    /// What `filter` was sized for, and how many keys it holds.
    capacity: usize,
    in_filter: usize,
}

impl Sent {
    pub fn new(near: &Path) -> Sent {
        Sent {
            near: near.to_path_buf(),
            recent: HashSet::new(),
            spilled: None,
            filter: new_filter(CHUNK),
            capacity: CHUNK,
            in_filter: 0,
        }
    }

    pub fn contains(&self, head: u64) -> Result<bool, Error> {
        if self.recent.contains(&head) {
            return Ok(true);
        }
        match &self.spilled {
            Some(t) if self.filter.contains_hash(head) => {
                Ok(!t.equal_range(&head.to_be_bytes())?.is_empty())
            }
            _ => Ok(false),
        }
    }

    pub fn insert(&mut self, head: u64) -> Result<(), Error> {
        self.recent.insert(head);
        if self.recent.len() >= CHUNK {
            self.spill()?;
        }
        Ok(())
    }

    /// Merges the hash set's keys into the sorted file, and into the filter (grown to twice
    /// what it holds when it is full, from the file).
    fn spill(&mut self) -> Result<(), Error> {
        let mut keys: Vec<[u8; 8]> = self.recent.drain().map(u64::to_be_bytes).collect();
        keys.sort_unstable();
        let chunk = runs::spill(&self.near, keys.iter().map(|k| &k[..]))?;
        let mut inputs: Vec<Box<dyn Read>> = vec![Box::new(chunk)];
        if let Some(t) = self.spilled.take() {
            inputs.push(Box::new(t.reader()?));
        }
        let mut fence = FenceBuilder::new(8);
        let out = runs::scratch(&self.near)?;
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, out);
        let grow = self.in_filter + keys.len() > self.capacity;
        if grow {
            self.capacity = (self.in_filter + keys.len()) * 2;
            self.filter = new_filter(self.capacity);
            self.in_filter = 0;
        }
        runs::merge(
            inputs,
            8,
            &self.near,
            |a, b| a.cmp(b),
            |k| {
                fence.push(k);
                std::io::Write::write_all(&mut w, k).map_err(|e| io_err(&self.near, e))?;
                if grow {
                    self.filter.insert_hash(runs::prefix(k));
                    self.in_filter += 1;
                }
                Ok(())
            },
        )?;
        if !grow {
            for k in &keys {
                self.filter.insert_hash(runs::prefix(k));
            }
            self.in_filter += keys.len();
        }
        let f = w
            .into_inner()
            .map_err(|e| io_err(&self.near, e.into_error()))?;
        self.spilled = Some(Table::new(&f, &self.near, 0, 8, fence)?);
        Ok(())
    }
}

fn new_filter(n: usize) -> BloomFilter {
    BloomFilter::with_false_pos(0.01).expected_items(n.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_exactly_after_spilling() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sent::new(&dir.path().join("o.jsonl"));
        let key = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let n = CHUNK as u64 * 3 + 10;
        for i in 0..n {
            s.insert(key(i)).unwrap();
        }
        assert!(s.spilled.is_some());
        for i in (0..n).step_by(1013) {
            assert!(s.contains(key(i)).unwrap(), "{i}");
        }
        let absent = (n..n + 20_000)
            .filter(|&i| s.contains(key(i)).unwrap())
            .count();
        assert_eq!(absent, 0);
    }
}
