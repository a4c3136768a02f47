//! Sorted runs of fixed-size records on disk, for what must not grow with the rows in memory:
//! chunks sorted in memory and spilled to anonymous temporary files, merged in one streaming
//! pass, and the merged file read back memory-mapped through a small in-memory fence (the first
//! key of every 4 KB block).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use memmap2::{Mmap, UncheckedAdvice};

use crate::error::Error;
use crate::ledger::journal::io_err;

/// Records per chunk sorted in memory before it is spilled: 8 MB of 64-byte entries.
pub const CHUNK: usize = 128 * 1024;

/// Lookups between two releases of the mapped pages. A fault maps the pages around the one
/// read too (64 KB), so this keeps what a large mapped file counts in the process's memory
/// to about 4 MB.
const RELEASE_EVERY: u32 = 64;

/// An anonymous temporary file beside `near` (on its disk, gone when closed or killed), or in
/// the system's temporary folder when that folder cannot take one.
pub fn scratch(near: &Path) -> Result<File, Error> {
    let dir = near
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::tempfile_in(dir)
        .or_else(|_| tempfile::tempfile())
        .map_err(|e| io_err(dir, e))
}

/// Writes sorted records of `rec` bytes to a scratch file and hands it back rewound.
pub fn spill<'a>(near: &Path, records: impl Iterator<Item = &'a [u8]>) -> Result<File, Error> {
    let mut w = BufWriter::with_capacity(64 * 1024, scratch(near)?);
    for r in records {
        w.write_all(r).map_err(|e| io_err(near, e))?;
    }
    let mut f = w.into_inner().map_err(|e| io_err(near, e.into_error()))?;
    f.seek(SeekFrom::Start(0)).map_err(|e| io_err(near, e))?;
    Ok(f)
}

/// One run being read in order, a record at a time.
struct Reader {
    r: BufReader<Box<dyn Read>>,
    rec: Vec<u8>,
    run: usize,
}

impl Reader {
    fn next(&mut self) -> std::io::Result<bool> {
        match self.r.read_exact(&mut self.rec) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A heap item: the run's current record, ordered so the heap pops the smallest first (ties:
/// the earlier run first, so a merge is stable).
struct Head<'c, C> {
    reader: Reader,
    cmp: &'c C,
}

impl<C: Fn(&[u8], &[u8]) -> Ordering> PartialEq for Head<'_, C> {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl<C: Fn(&[u8], &[u8]) -> Ordering> Eq for Head<'_, C> {}
impl<C: Fn(&[u8], &[u8]) -> Ordering> PartialOrd for Head<'_, C> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<C: Fn(&[u8], &[u8]) -> Ordering> Ord for Head<'_, C> {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.cmp)(&o.reader.rec, &self.reader.rec).then(o.reader.run.cmp(&self.reader.run))
    }
}

/// Merges sorted runs of `rec`-byte records (each read from its start) in one streaming pass,
/// calling `each` with every record in `cmp` order.
pub fn merge(
    runs: Vec<Box<dyn Read>>,
    rec: usize,
    near: &Path,
    cmp: impl Fn(&[u8], &[u8]) -> Ordering,
    mut each: impl FnMut(&[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut heap = BinaryHeap::with_capacity(runs.len());
    for (run, f) in runs.into_iter().enumerate() {
        let mut reader = Reader {
            r: BufReader::with_capacity(32 * 1024, f),
            rec: vec![0; rec],
            run,
        };
        if reader.next().map_err(|e| io_err(near, e))? {
            heap.push(Head { reader, cmp: &cmp });
        }
    }
    while let Some(mut top) = heap.peek_mut() {
        each(&top.reader.rec)?;
        if !top.reader.next().map_err(|e| io_err(near, e))? {
            std::collections::binary_heap::PeekMut::pop(top);
        }
    }
    Ok(())
}

/// A file of sorted `rec`-byte records from byte `start` on, mapped for lookups; its fence
/// holds the first 8 key bytes of every block, as a big-endian number.
pub struct Mapped {
    map: Option<Mmap>,
    start: usize,
    rec: usize,
    len: usize,
    per_block: usize,
    fence: Vec<u64>,
    touched: std::cell::Cell<u32>,
}

/// The first 8 bytes of a key, as a number that sorts as the bytes do.
pub fn prefix(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[..8].try_into().expect("a key has 8 bytes or more"))
}

/// Collects a fence while the records of a file are written or read in order.
pub struct FenceBuilder {
    per_block: usize,
    n: usize,
    fence: Vec<u64>,
}

impl FenceBuilder {
    pub fn new(rec: usize) -> FenceBuilder {
        FenceBuilder {
            per_block: (4096 / rec).max(1),
            n: 0,
            fence: Vec::new(),
        }
    }
    pub fn push(&mut self, record: &[u8]) {
        if self.n % self.per_block == 0 {
            self.fence.push(prefix(record));
        }
        self.n += 1;
    }
}

impl Mapped {
    /// Maps `file`, whose records (of `rec` bytes, `fence` collected over them) start at
    /// byte `start`. The file is never written again once mapped: it was written by this
    /// process and is replaced only by a rename, never truncated.
    pub fn new(
        file: &File,
        start: usize,
        rec: usize,
        fence: FenceBuilder,
    ) -> std::io::Result<Mapped> {
        let len = fence.n;
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the file is ours (a scratch file, or the index written beside the output
            // under the output's lock, and replaced only by a rename): nothing truncates it
            // while it is mapped.
            let m = unsafe { Mmap::map(file) }?;
            let _ = m.advise(memmap2::Advice::Random);
            Some(m)
        };
        Ok(Mapped {
            map,
            start,
            rec,
            len,
            per_block: fence.per_block,
            fence: fence.fence,
            touched: std::cell::Cell::new(0),
        })
    }

    /// No records.
    pub fn empty(rec: usize) -> Mapped {
        Mapped {
            map: None,
            start: 0,
            rec,
            len: 0,
            per_block: (4096 / rec).max(1),
            fence: Vec::new(),
            touched: std::cell::Cell::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Calls `each(i, record)` for every record in order, letting go of the pages read every
    /// 4 MB, so a scan of a large file does not count it whole as this process's memory.
    pub fn scan(&self, mut each: impl FnMut(usize, &[u8])) {
        let step = (1 << 20) / self.rec;
        for i in 0..self.len {
            each(i, self.get(i));
            if (i + 1) % step == 0 {
                self.release();
            }
        }
        self.release();
    }

    fn release(&self) {
        if let Some(m) = &self.map {
            // SAFETY: a read-only shared mapping of a file: dropping its pages loses
            // nothing, the next read faults them back in from the page cache.
            let _ = unsafe { m.unchecked_advise(UncheckedAdvice::DontNeed) };
        }
    }

    /// The record at `i`.
    pub fn get(&self, i: usize) -> &[u8] {
        let m = self.map.as_ref().expect("a record implies a mapping");
        let at = self.start + i * self.rec;
        &m[at..at + self.rec]
    }

    /// The positions of every record whose first `key.len()` bytes equal `key`.
    pub fn equal_range(&self, key: &[u8]) -> std::ops::Range<usize> {
        if self.len == 0 {
            return 0..0;
        }
        self.tick();
        let p = prefix(key);
        let lo = self.fence.partition_point(|&f| f < p).saturating_sub(1) * self.per_block;
        let hi = (self.fence.partition_point(|&f| f <= p) * self.per_block).min(self.len);
        let k = key.len();
        let first = lo + partition(lo..hi, |i| &self.get(i)[..k] < key);
        let end = first + partition(first..hi, |i| &self.get(i)[..k] == key);
        first..end
    }

    /// Lets the kernel take back the mapped pages now and then: they stay in the page cache,
    /// but no longer count as this process's memory.
    fn tick(&self) {
        let n = self.touched.get() + 1;
        self.touched.set(n);
        if n % RELEASE_EVERY == 0 {
            self.release();
        }
    }
}

/// The number of leading positions in `range` for which `pred` holds (`pred` holds on a
/// prefix of the range).
fn partition(range: std::ops::Range<usize>, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (range.start, range.end);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo - range.start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_in_order_and_a_mapped_file_finds_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let near = dir.path().join("x");
        let mut runs = Vec::new();
        for r in 0..3u64 {
            let mut keys: Vec<[u8; 8]> = (0..5000u64)
                .map(|i| (i * 7919 + r * 13).to_be_bytes())
                .collect();
            keys.sort_unstable();
            let f = spill(&near, keys.iter().map(|k| &k[..])).unwrap();
            runs.push(Box::new(f) as Box<dyn Read>);
        }
        let mut out = Vec::new();
        let mut fence = FenceBuilder::new(8);
        merge(
            runs,
            8,
            &near,
            |a, b| a.cmp(b),
            |r| {
                fence.push(r);
                out.extend_from_slice(r);
                Ok(())
            },
        )
        .unwrap();
        assert!(out
            .chunks(8)
            .zip(out.chunks(8).skip(1))
            .all(|(a, b)| a <= b));
        let f = spill(&near, std::iter::once(&out[..])).unwrap();
        let m = Mapped::new(&f, 0, 8, fence).unwrap();
        assert_eq!(m.len(), 15000);
        for r in 0..3u64 {
            for i in (0..5000u64).step_by(97) {
                let k = (i * 7919 + r * 13).to_be_bytes();
                assert!(!m.equal_range(&k).is_empty(), "{r} {i}");
            }
        }
        assert!(m.equal_range(&3u64.to_be_bytes()).is_empty());
    }
}
