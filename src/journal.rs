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
            Ok(e) if e.row > 0 => {
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

/// Rewrites the output in row order with only the last record of each row, atomically
/// (temp file + rename). Skipped when it is already in order without duplicates.
/// Memory: 12 bytes per row for the index.
pub fn compact(path: &Path) -> Result<(), Error> {
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
    let mut offsets: Vec<u64> = Vec::new();
    let mut lens: Vec<u32> = Vec::new();
    let mut line = Vec::new();
    let mut pos = 0u64;
    let mut last = 0u64;
    let mut in_order = true;
    loop {
        line.clear();
        let n = rdr.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 {
            break;
        }
        if let Some(row) = row_of(&line) {
            if row <= last {
                in_order = false;
            }
            last = last.max(row);
            let i = (row - 1) as usize;
            if offsets.len() <= i {
                offsets.resize(i + 1, u64::MAX);
                lens.resize(i + 1, 0);
            }
            offsets[i] = pos;
            lens[i] = n as u32;
        } else {
            in_order = false; // a foreign line: rewrite without it
        }
        pos += n as u64;
    }
    if in_order {
        return Ok(());
    }
    let tmp = crate::job::sibling(path, ".compact");
    let mut src = rdr.into_inner();
    let mut out = BufWriter::with_capacity(256 * 1024, File::create(&tmp).map_err(io)?);
    let mut buf = Vec::new();
    for (i, &off) in offsets.iter().enumerate() {
        if off == u64::MAX {
            continue;
        }
        buf.resize(lens[i] as usize, 0);
        src.seek(SeekFrom::Start(off)).map_err(io)?;
        src.read_exact(&mut buf).map_err(io)?;
        out.write_all(&buf).map_err(io)?;
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
    fn a_second_lock_on_the_same_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl.lock");
        let first = Lock::acquire(&p).unwrap();
        assert!(matches!(Lock::acquire(&p), Err(Error::Locked { .. })));
        drop(first);
        Lock::acquire(&p).unwrap();
    }
}
