//! Sorted runs of fixed-size records on disk, for what must not grow with the rows in memory:
//! chunks sorted in memory and spilled to anonymous temporary files, merged in one streaming
//! pass, and the merged file read back a block at a time through a small in-memory fence (the
//! first key of every 1 KB block). Positioned reads rather than a memory map: a mapped page the
//! kernel faults in (with 64 KB around it) counts as the process's memory until it is let go,
//! which at one lookup per row cost more than the read.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::ledger::journal::io_err;

/// The bytes a lookup reads: the fence holds one key per block, so a smaller block reads
/// (and copies) less per lookup and holds more fence in memory (8 bytes per block: half a byte
/// a record of the index's 64).
const BLOCK: usize = 1024;

/// Records per chunk sorted in memory before it is spilled: 8 MB of 64-byte entries.
pub const CHUNK: usize = 128 * 1024;

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

/// A file of sorted `rec`-byte records from byte `start` on, read a block at a time by
/// positioned reads (so none of it counts as this process's memory, and nothing is mapped
/// that another process could cut short); its fence holds the first 8 key bytes of every
/// block, as a big-endian number.
pub struct Table {
    file: Option<File>,
    /// For errors: the file's path, or what it is a scratch file for.
    path: PathBuf,
    start: u64,
    rec: usize,
    len: usize,
    per_block: usize,
    fence: Vec<u64>,
    /// The records read last: the first one's position, and their bytes.
    cache: RefCell<(usize, Vec<u8>)>,
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
            per_block: (BLOCK / rec).max(1),
            n: 0,
            fence: Vec::new(),
        }
    }
    pub fn push(&mut self, record: &[u8]) {
        if self.n.is_multiple_of(self.per_block) {
            self.fence.push(prefix(record));
        }
        self.n += 1;
    }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, at)
}

#[cfg(windows)]
fn read_at(f: &File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(f, buf, at)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                at += n as u64;
            }
        }
    }
    Ok(())
}

impl Table {
    /// The records (of `rec` bytes, `fence` collected over them) of `file` from byte `start`.
    pub fn new(
        file: &File,
        path: &Path,
        start: u64,
        rec: usize,
        fence: FenceBuilder,
    ) -> Result<Table, Error> {
        Ok(Table {
            file: Some(file.try_clone().map_err(|e| io_err(path, e))?),
            path: path.to_path_buf(),
            start,
            rec,
            len: fence.n,
            per_block: fence.per_block,
            fence: fence.fence,
            cache: RefCell::new((0, Vec::new())),
        })
    }

    /// No records.
    pub fn empty(rec: usize) -> Table {
        Table {
            file: None,
            path: PathBuf::new(),
            start: 0,
            rec,
            len: 0,
            per_block: (BLOCK / rec).max(1),
            fence: Vec::new(),
            cache: RefCell::new((0, Vec::new())),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Reads records `range` into the cache.
    fn load(&self, range: std::ops::Range<usize>) -> Result<(), Error> {
        let mut c = self.cache.borrow_mut();
        if c.0 == range.start && c.1.len() == range.len() * self.rec {
            return Ok(());
        }
        c.0 = range.start;
        c.1.resize(range.len() * self.rec, 0);
        let f = self.file.as_ref().expect("a record implies a file");
        let at = self.start + (range.start * self.rec) as u64;
        read_at(f, &mut c.1, at).map_err(|e| io_err(&self.path, e))
    }

    /// `f` of the record at `i`.
    pub fn with<T>(&self, i: usize, f: impl FnOnce(&[u8]) -> T) -> Result<T, Error> {
        {
            let c = self.cache.borrow();
            let n = c.1.len() / self.rec;
            if i >= c.0 && i < c.0 + n {
                let at = (i - c.0) * self.rec;
                return Ok(f(&c.1[at..at + self.rec]));
            }
        }
        self.load(i..i + 1)?;
        let c = self.cache.borrow();
        Ok(f(&c.1[..self.rec]))
    }

    /// The positions of every record whose first `key.len()` bytes equal `key`: one read of
    /// the block (rarely two) the fence points at.
    pub fn equal_range(&self, key: &[u8]) -> Result<std::ops::Range<usize>, Error> {
        if self.len == 0 {
            return Ok(0..0);
        }
        let p = prefix(key);
        let lo = self.fence.partition_point(|&f| f < p).saturating_sub(1) * self.per_block;
        let hi = (self.fence.partition_point(|&f| f <= p) * self.per_block).min(self.len);
        self.load(lo..hi)?;
        let c = self.cache.borrow();
        let (k, rec) = (key.len(), self.rec);
        let at = |i: usize| &c.1[(i - lo) * rec..(i - lo) * rec + k];
        let first = lo + partition(lo..hi, |i| at(i) < key);
        let end = first + partition(first..hi, |i| at(i) == key);
        Ok(first..end)
    }

    /// The records from the first, as a stream (for a merge).
    pub fn reader(&self) -> Result<std::io::Take<File>, Error> {
        let Some(f) = &self.file else {
            return Ok(scratch(&self.path)?.take(0));
        };
        let mut f = f.try_clone().map_err(|e| io_err(&self.path, e))?;
        f.seek(SeekFrom::Start(self.start))
            .map_err(|e| io_err(&self.path, e))?;
        Ok(f.take((self.len * self.rec) as u64))
    }

    /// Calls `each(i, record)` for every record in order.
    pub fn scan(&self, mut each: impl FnMut(usize, &[u8])) -> Result<(), Error> {
        if self.file.is_none() {
            return Ok(());
        }
        let mut r = BufReader::with_capacity(256 * 1024, self.reader()?);
        let mut rec = vec![0u8; self.rec];
        for i in 0..self.len {
            r.read_exact(&mut rec).map_err(|e| io_err(&self.path, e))?;
            each(i, &rec);
        }
        Ok(())
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
    fn runs_merge_in_order_and_a_table_finds_every_key() {
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
        let m = Table::new(&f, &near, 0, 8, fence).unwrap();
        assert_eq!(m.len(), 15000);
        for r in 0..3u64 {
            for i in (0..5000u64).step_by(97) {
                let k = (i * 7919 + r * 13).to_be_bytes();
                assert!(!m.equal_range(&k).unwrap().is_empty(), "{r} {i}");
            }
        }
        assert!(m.equal_range(&3u64.to_be_bytes()).unwrap().is_empty());
    }
}
