//! The journal is the JSONL output itself: one line per finished row, appended and flushed as
//! each row finishes, so a crash or kill at any moment loses no finished row. On start it is
//! read back (a torn last line is cut off) to know which rows are done and with which request
//! fingerprint; at the end it is rewritten in input order with one line per row.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Error;
use crate::output::{Record, Status};

/// Row numbers past this are treated as foreign lines, so a corrupt number cannot make the
/// per-row index allocate without bound.
const MAX_ROW: u64 = 1 << 28;

/// What an earlier run left for one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub ok: bool,
    /// The first 16 bytes of the request fingerprint; `None` for rows that never got a request
    /// (input errors), which are always looked at again.
    pub fingerprint: Option<[u8; 16]>,
}

/// Per-row state from earlier runs, indexed by row number (rows are dense from 1).
#[derive(Default)]
pub struct Resume {
    rows: Vec<Option<Done>>,
    pub records: u64,
    /// Mean completion tokens of earlier ok rows, for the dry run's expected cost.
    pub mean_completion_tokens: Option<f64>,
}

impl Resume {
    pub fn get(&self, row: u64) -> Option<Done> {
        self.rows
            .get(row.checked_sub(1)? as usize)
            .copied()
            .flatten()
    }

    fn set(&mut self, row: u64, d: Done) {
        let i = (row - 1) as usize;
        if self.rows.len() <= i {
            self.rows.resize(i + 1, None);
        }
        self.rows[i] = Some(d);
    }
}

/// Lower-case hex; the inverse of [`fingerprint_bytes`] for fingerprints.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

pub fn fingerprint_bytes(hex: &str) -> Option<[u8; 16]> {
    if hex.len() < 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[derive(Deserialize)]
struct Entry {
    row: u64,
    status: Status,
    fingerprint: Option<String>,
    usage: Option<EntryUsage>,
}

#[derive(Deserialize)]
struct EntryUsage {
    completion_tokens: u64,
}

/// Cuts a torn last line (a kill mid-write) so the next append starts on a fresh line.
/// Returns the number of bytes removed.
pub fn repair(path: &Path) -> Result<u64, Error> {
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    let len = f.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok(0);
    }
    // Scan back from the end for the last newline, in blocks.
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    let keep = loop {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        f.read_exact(&mut buf[..n]).map_err(io)?;
        if let Some(p) = buf[..n].iter().rposition(|&b| b == b'\n') {
            break start + p as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        end = start;
    };
    if keep < len {
        f.set_len(keep).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    Ok(len - keep)
}

/// Reads what earlier runs finished. Lines that do not parse are skipped with a warning:
/// they are not trusted as done, so their rows run again.
pub fn load(path: &Path) -> Result<Resume, Error> {
    let mut r = Resume::default();
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(r),
        Err(e) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    let mut rdr = BufReader::with_capacity(256 * 1024, f);
    let mut line = Vec::new();
    let mut n = 0u64;
    let (mut ok_rows, mut ok_tokens) = (0u64, 0u64);
    loop {
        line.clear();
        let got = rdr.read_until(b'\n', &mut line).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        if got == 0 {
            break;
        }
        n += 1;
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<Entry>(&line) {
            Ok(e) if e.row > 0 && e.row <= MAX_ROW => {
                let ok = e.status == Status::Ok;
                if ok {
                    if let Some(u) = &e.usage {
                        ok_rows += 1;
                        ok_tokens += u.completion_tokens;
                    }
                }
                r.set(
                    e.row,
                    Done {
                        ok,
                        fingerprint: e.fingerprint.as_deref().and_then(fingerprint_bytes),
                    },
                );
                r.records += 1;
            }
            _ => tracing::warn!(
                "{}: line {n} is not a record; its row will run again",
                path.display()
            ),
        }
    }
    if ok_rows > 0 {
        r.mean_completion_tokens = Some(ok_tokens as f64 / ok_rows as f64);
    }
    Ok(r)
}

/// The appender: the one writer of the output during a run.
pub struct Appender {
    path: PathBuf,
    w: BufWriter<File>,
    line: Vec<u8>,
}

impl Appender {
    pub fn open(path: &Path) -> Result<Appender, Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Io {
                path: dir.to_path_buf(),
                source: e,
            })?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok(Appender {
            path: path.to_path_buf(),
            w: BufWriter::with_capacity(256 * 1024, f),
            line: Vec::with_capacity(4096),
        })
    }

    /// Buffers one record; `flush` makes it durable against a process kill.
    pub fn append(&mut self, r: &Record) -> Result<(), Error> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, r).expect("a record always serializes");
        self.line.push(b'\n');
        self.w.write_all(&self.line).map_err(|e| Error::Io {
            path: self.path.clone(),
            source: e,
        })
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        self.w.flush().map_err(|e| Error::Io {
            path: self.path.clone(),
            source: e,
        })
    }

    pub fn finish(mut self) -> Result<(), Error> {
        self.flush()?;
        self.w.get_ref().sync_data().map_err(|e| Error::Io {
            path: self.path.clone(),
            source: e,
        })
    }
}

/// The row number from a line's prefix (`{"row":123,`) without parsing the rest.
fn row_of(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"row\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Rows indexed per compaction pass. The index costs 12 bytes a row, so it stays near 1.5 MB
/// however long the output: an output of more rows is compacted in several passes (each one
/// reads the file again, from the page cache as a rule).
const COMPACT_PASS_ROWS: u64 = 1 << 17;

/// Where the last record of each row in `lo..lo + COMPACT_PASS_ROWS` lies in the file.
struct PassIndex {
    lo: u64,
    rows: u64,
    offsets: Vec<u64>,
    lens: Vec<u32>,
}

impl PassIndex {
    fn new(lo: u64, rows: u64) -> PassIndex {
        PassIndex {
            lo,
            rows,
            offsets: Vec::new(),
            lens: Vec::new(),
        }
    }

    fn note(&mut self, row: u64, pos: u64, len: u32) {
        if row < self.lo || row >= self.lo + self.rows {
            return;
        }
        let i = (row - self.lo) as usize;
        if self.offsets.len() <= i {
            // Grow by doubling, but never past one pass's rows.
            let want = (self.offsets.capacity() * 2)
                .max(i + 1)
                .min(self.rows as usize);
            self.offsets.reserve_exact(want - self.offsets.len());
            self.lens.reserve_exact(want - self.lens.len());
            self.offsets.resize(i + 1, u64::MAX);
            self.lens.resize(i + 1, 0);
        }
        self.offsets[i] = pos;
        self.lens[i] = len;
    }
}

/// Reads every line from the start: `each(row, offset, length)`, `row` `None` for a line that
/// is not one of our records.
fn scan_lines(
    rdr: &mut BufReader<File>,
    mut each: impl FnMut(Option<u64>, u64, u32),
) -> std::io::Result<()> {
    rdr.seek(SeekFrom::Start(0))?;
    let mut line = Vec::new();
    let mut pos = 0u64;
    loop {
        line.clear();
        let n = rdr.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        // Row numbers are dense from 1; anything else is not one of our records.
        let row = row_of(&line).filter(|&r| r > 0 && r <= MAX_ROW);
        each(row, pos, n as u32);
        pos += n as u64;
    }
}

/// Rewrites the output in row order with only the last record of each row, atomically
/// (temp file + rename). Skipped when it is already in order without duplicates.
/// Memory: bounded (see `COMPACT_PASS_ROWS`), whatever the number of rows.
pub fn compact(path: &Path) -> Result<(), Error> {
    compact_in_passes(path, COMPACT_PASS_ROWS)
}

fn compact_in_passes(path: &Path, pass_rows: u64) -> Result<(), Error> {
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let mut rdr = BufReader::with_capacity(256 * 1024, f);
    // The first pass also tells whether there is anything to do.
    let mut index = PassIndex::new(1, pass_rows);
    let mut last = 0u64;
    let mut in_order = true;
    scan_lines(&mut rdr, |row, pos, n| match row {
        Some(row) => {
            if row <= last {
                in_order = false;
            }
            last = last.max(row);
            index.note(row, pos, n);
        }
        None => in_order = false, // a foreign line: rewrite without it
    })
    .map_err(io)?;
    if in_order {
        return Ok(());
    }
    let tmp = crate::job::sibling(path, ".compact");
    let mut out = BufWriter::with_capacity(256 * 1024, File::create(&tmp).map_err(io)?);
    let mut buf = Vec::new();
    loop {
        // Records are nearly in row order already (they finish about in the order they were
        // sent), so most moves stay inside the read buffer: no system call.
        rdr.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut at = 0u64;
        for (&off, &len) in index.offsets.iter().zip(&index.lens) {
            if off == u64::MAX {
                continue;
            }
            rdr.seek_relative(off as i64 - at as i64).map_err(io)?;
            buf.resize(len as usize, 0);
            rdr.read_exact(&mut buf).map_err(io)?;
            out.write_all(&buf).map_err(io)?;
            at = off + len as u64;
        }
        let lo = index.lo + pass_rows;
        if lo > last {
            break;
        }
        index = PassIndex::new(lo, pass_rows);
        scan_lines(&mut rdr, |row, pos, n| {
            if let Some(row) = row {
                index.note(row, pos, n);
            }
        })
        .map_err(io)?;
    }
    let out = out.into_inner().map_err(|e| io(e.into_error()))?;
    out.sync_all().map_err(io)?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// The lock that keeps two runs off one output. Holds an OS file lock, released by the OS if
/// the process dies, so a stale lock file never blocks a later run.
pub struct Lock {
    // The lock file stays on disk after the run: deleting it would let a run that opened the
    // old file and one that creates a new one both hold "the" lock.
    _file: File,
}

impl Lock {
    pub fn acquire(path: &Path) -> Result<Lock, Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Io {
                path: dir.to_path_buf(),
                source: e,
            })?;
        }
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut since = String::new();
                let _ = f.read_to_string(&mut since);
                return Err(Error::Locked {
                    path: path.to_path_buf(),
                    since: since.trim().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
        let stamp = format!(
            "pid {} at unix time {}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        let _ = f.set_len(0);
        let _ = f.write_all(stamp.as_bytes());
        Ok(Lock { _file: f })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        std::fs::write(&p, "{\"row\":1}\n{\"row\":2,\"sta").unwrap();
        assert_eq!(repair(&p).unwrap(), 13);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"row\":1}\n");
        assert_eq!(repair(&p).unwrap(), 0);
    }

    #[test]
    fn compaction_orders_rows_and_keeps_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        std::fs::write(
            &p,
            "{\"row\":2,\"v\":\"a\"}\n{\"row\":1,\"v\":\"b\"}\n{\"row\":2,\"v\":\"c\"}\n",
        )
        .unwrap();
        compact(&p).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"row\":1,\"v\":\"b\"}\n{\"row\":2,\"v\":\"c\"}\n"
        );
    }

    #[test]
    fn compaction_in_several_passes_gives_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        let mut text = String::new();
        // Out of order, a rerun of rows 3 and 7, a gap (row 5), a foreign line.
        for (row, v) in [(2, "a"), (1, "b"), (3, "c"), (7, "d"), (4, "e"), (3, "f")] {
            text.push_str(&format!("{{\"row\":{row},\"v\":\"{v}\"}}\n"));
        }
        text.push_str("not a record\n{\"row\":6,\"v\":\"g\"}\n{\"row\":7,\"v\":\"h\"}\n");
        let want = "{\"row\":1,\"v\":\"b\"}\n{\"row\":2,\"v\":\"a\"}\n{\"row\":3,\"v\":\"f\"}\n\
                    {\"row\":4,\"v\":\"e\"}\n{\"row\":6,\"v\":\"g\"}\n{\"row\":7,\"v\":\"h\"}\n";
        for pass_rows in [1, 2, 3, 100] {
            std::fs::write(&p, &text).unwrap();
            compact_in_passes(&p, pass_rows).unwrap();
            assert_eq!(
                std::fs::read_to_string(&p).unwrap(),
                want,
                "{pass_rows} rows a pass"
            );
        }
    }

    #[test]
    fn a_second_lock_on_the_same_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl.lock");
        let first = Lock::acquire(&p).unwrap();
        assert!(matches!(Lock::acquire(&p), Err(Error::Locked { .. })));
        drop(first);
        Lock::acquire(&p).unwrap();
    }
}
