//! The journal is the JSONL output itself: one line per finished row, appended and flushed as
//! each batch of rows finishes, so a crash or kill at any moment loses no finished row. This
//! module is the file layer: the one parser every reader of the journal uses, the appender,
//! the torn-tail repair and the lock. What the lines mean (which rows are done, compaction)
//! is `ledger`'s.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::Error;
use crate::ledger::record::{LineUsage, Record, Status};
use crate::provider::ErrorKind;

/// What the ledger needs of one journal line. Field order and spacing do not matter (a file
/// rewritten by another tool still reads), and nothing in it sizes an allocation.
#[derive(Debug, Deserialize)]
pub struct Line<'a> {
    pub row: u64,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    pub status: Status,
    #[serde(borrow, default)]
    pub fingerprint: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub error: Option<LineError<'a>>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
    #[serde(default)]
    pub cache_saved_usd: Option<f64>,
    #[serde(default)]
    pub unconfirmed_usd: Option<f64>,
    #[serde(default)]
    pub copied_from: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub usage: Option<LineUsage>,
    #[serde(borrow, default)]
    pub input: Option<&'a RawValue>,
    // For the report's charts: scalars, cheap to read on every line.
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub latency_ms: Option<u64>,
    #[serde(borrow, default)]
    pub finished_at: Option<Cow<'a, str>>,
    #[serde(default)]
    pub ttft_ms: Option<u64>,
    // For the CSV: kept as written, read only by what needs them.
    #[serde(borrow, default)]
    pub completion: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub variants: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub struct LineError<'a> {
    pub kind: ErrorKind,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(borrow, default)]
    pub message: Cow<'a, str>,
}

/// Parses one line (without its line ending). `Ok(None)` for a blank line; `Err` with the
/// reason for a line that is not a record.
pub fn parse_line(bytes: &[u8]) -> Result<Option<Line<'_>>, String> {
    let text = bytes.trim_ascii();
    if text.is_empty() {
        return Ok(None);
    }
    // UTF-8 checked once for the line, not string by string.
    let text = std::str::from_utf8(text).map_err(|e| format!("not UTF-8 text: {e}"))?;
    let line: Line = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if line.status == Status::Ok && line.fingerprint.is_none() {
        return Err("an ok record without a fingerprint".into());
    }
    if line.input.is_some_and(|i| !i.get().starts_with('{')) {
        return Err("`input` is not an object".into());
    }
    Ok(Some(line))
}

/// Whether a line is exactly as promptmill writes it (compact JSON, `row` first, LF only):
/// such a line can be copied byte for byte; any other is rewritten.
pub fn is_canonical(bytes: &[u8]) -> bool {
    bytes.starts_with(b"{\"row\":") && bytes.ends_with(b"}\n") && !bytes.contains(&b'\r')
}

/// Calls `each(offset, line_number, bytes)` for every line of the file, in order; `bytes`
/// includes the line ending. A missing file has no lines.
pub fn for_each_line(
    path: &Path,
    each: impl FnMut(u64, u64, &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    for_each_line_from(path, 0, 0, each)
}

/// `for_each_line` from byte `offset` (the start of a line), numbering lines after
/// `lines_before`.
pub fn for_each_line_from(
    path: &Path,
    offset: u64,
    lines_before: u64,
    mut each: impl FnMut(u64, u64, &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, e)),
    };
    if offset > 0 {
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| io_err(path, e))?;
    }
    let mut rdr = BufReader::with_capacity(256 * 1024, f);
    let mut buf = Vec::new();
    let (mut offset, mut number) = (offset, lines_before);
    loop {
        buf.clear();
        let n = rdr
            .read_until(b'\n', &mut buf)
            .map_err(|e| io_err(path, e))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        each(offset, number, &buf)?;
        offset += n as u64;
    }
}

pub fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Cuts a torn last line (a kill mid-write) so the next append starts on a fresh line; a
/// last line that is a whole record and only lacks its newline gets one instead. Returns the
/// number of bytes removed.
pub fn repair(path: &Path) -> Result<u64, Error> {
    let io = |e| io_err(path, e);
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
    if keep == len {
        return Ok(0);
    }
    // A last line without its newline (an editor, another tool) that is a whole record is
    // kept: only what does not parse is cut.
    let mut tail = Vec::with_capacity((len - keep) as usize);
    f.seek(SeekFrom::Start(keep)).map_err(io)?;
    (&mut f)
        .take(len - keep)
        .read_to_end(&mut tail)
        .map_err(io)?;
    let whole = matches!(parse_line(&tail), Ok(Some(_)));
    if whole {
        f.seek(SeekFrom::End(0)).map_err(io)?;
        f.write_all(b"\n").map_err(io)?;
    } else {
        f.set_len(keep).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    Ok(if whole { 0 } else { len - keep })
}

/// The appender: the one writer of the output during a run. Records are buffered and written
/// whole on `flush`; a write that fails is cut back to the last whole line, so a full disk
/// never leaves half a record for a later line to be glued onto, and the unwritten records
/// stay buffered for the next try.
pub struct Appender {
    path: PathBuf,
    file: File,
    /// The file's length after the last successful flush: everything before it is whole lines.
    durable: u64,
    pending: Vec<u8>,
    pending_records: usize,
}

impl Appender {
    pub fn open(path: &Path) -> Result<Appender, Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        let durable = file.metadata().map_err(|e| io_err(path, e))?.len();
        Ok(Appender {
            path: path.to_path_buf(),
            file,
            durable,
            pending: Vec::with_capacity(256 * 1024),
            pending_records: 0,
        })
    }

    /// Buffers one record; `flush` makes it durable against a process kill.
    pub fn append(&mut self, r: &Record) {
        serde_json::to_writer(&mut self.pending, r).expect("a record always serializes");
        self.pending.push(b'\n');
        self.pending_records += 1;
    }

    /// Records buffered and not yet on disk.
    pub fn unwritten(&self) -> usize {
        self.pending_records
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        match self.file.write_all(&self.pending) {
            Ok(()) => {
                self.durable += self.pending.len() as u64;
                self.pending.clear();
                self.pending_records = 0;
                Ok(())
            }
            Err(e) => {
                // Part of the batch may be on disk: cut it off so the file ends on a whole
                // line. If even that fails, the next run's repair cuts the torn tail.
                let _ = self.file.set_len(self.durable);
                Err(io_err(&self.path, e))
            }
        }
    }

    pub fn finish(mut self) -> Result<(), Error> {
        self.flush()?;
        self.file.sync_data().map_err(|e| io_err(&self.path, e))
    }
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
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(path, e))?;
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
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(path, e)),
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
    fn a_whole_last_record_without_its_newline_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        let last = r#"{"row":2,"id":"2","status":"error","error":{"kind":"server"}}"#;
        std::fs::write(&p, format!("{{\"row\":1}}\n{last}")).unwrap();
        assert_eq!(repair(&p).unwrap(), 0);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{{\"row\":1}}\n{last}\n")
        );
        assert_eq!(repair(&p).unwrap(), 0);
    }

    /// Every line the journal's parser takes, compaction's full parse takes too: a line
    /// another tool edited (no attempts, latency, input or usage counts) is never read as done
    /// and then refused by the next compaction.
    #[test]
    fn what_the_parser_takes_the_full_record_takes() {
        let fp = "0".repeat(32);
        let lines = [
            format!(r#"{{"row":1,"id":"1","status":"ok","fingerprint":"{fp}"}}"#),
            format!(
                r#"{{"status":"ok","id":"a","row":3,"fingerprint":"{fp}","usage":{{"prompt_tokens":4}},"completion":"x"}}"#
            ),
            r#"{"row":2,"id":"2","status":"error","error":{"kind":"server"},"input":{}}"#.into(),
        ];
        for l in &lines {
            assert!(matches!(parse_line(l.as_bytes()), Ok(Some(_))), "{l}");
            let r: Record = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            assert_eq!(r.attempts, 0);
        }
        let not_object =
            format!(r#"{{"row":1,"id":"1","status":"ok","fingerprint":"{fp}","input":5}}"#);
        assert!(parse_line(not_object.as_bytes()).is_err());
        assert!(serde_json::from_str::<Record>(&not_object).is_err());
    }

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
    fn lines_from_other_tools_parse_the_same() {
        let ours = br#"{"row":3,"id":"a","status":"ok","input":{"x":"1"},"fingerprint":"00112233445566778899aabbccddeeff","cost_usd":0.5}"#;
        let theirs = b"{\"cost_usd\": 0.5, \"status\": \"ok\", \"fingerprint\": \"00112233445566778899aabbccddeeff\",  \"id\": \"a\", \"input\": {\"x\": \"1\"}, \"row\": 3}\r\n";
        for l in [&ours[..], &theirs[..]] {
            let p = parse_line(l).unwrap().unwrap();
            assert_eq!((p.row, p.id.as_ref(), p.cost_usd), (3, "a", Some(0.5)));
            assert_eq!(
                p.fingerprint.as_deref(),
                Some("00112233445566778899aabbccddeeff")
            );
        }
        assert!(is_canonical(&[&ours[..], b"\n"].concat()));
        assert!(!is_canonical(theirs));
        assert!(parse_line(b"  \r\n").unwrap().is_none());
    }

    #[test]
    fn a_corrupt_row_number_is_a_bad_line_not_an_allocation() {
        for l in [
            &br#"{"row":99999999999999999999999,"id":"1","status":"ok","fingerprint":"x"}"#[..],
            br#"{"row":-1,"id":"1","status":"ok"}"#,
            b"not json",
            br#"{"row":1,"id":"1","status":"ok"}"#,
        ] {
            assert!(parse_line(l).is_err(), "{}", String::from_utf8_lossy(l));
        }
    }

    #[test]
    fn a_failed_write_leaves_whole_lines_and_keeps_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        let mut a = Appender::open(&p).unwrap();
        let r: Record = serde_json::from_str(
            r#"{"row":1,"id":"1","status":"ok","input":{},"completion":"x","finish_reason":null,
               "model":null,"usage":null,"cost_usd":null,"attempts":1,"latency_ms":1,
               "fingerprint":"00112233445566778899aabbccddeeff","error":null}"#,
        )
        .unwrap();
        a.append(&r);
        a.flush().unwrap();
        a.append(&r);
        assert_eq!(a.unwritten(), 1);
        a.flush().unwrap();
        assert_eq!(a.unwritten(), 0);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text
            .lines()
            .all(|l| parse_line(l.as_bytes()).unwrap().is_some()));
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
