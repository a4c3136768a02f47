//! Every file that belongs to an output, named in one place, and the one way a file is
//! rewritten: a temporary file beside it, fsynced, renamed over it, and the folder fsynced, so
//! a crash leaves the old file or the new one, never a torn one.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use crate::error::Error;
use crate::ledger::journal::io_err;

/// The companions of the JSONL output `out/x.jsonl`.
#[derive(Debug, Clone)]
pub struct Files {
    output: PathBuf,
}

impl Files {
    pub fn new(output: &Path) -> Files {
        Files {
            output: output.to_path_buf(),
        }
    }

    pub fn output(&self) -> &Path {
        &self.output
    }

    /// `OUTPUT.summary.json`.
    pub fn summary(&self) -> PathBuf {
        sibling(&self.output, ".summary.json")
    }

    /// Held while a run writes the output.
    pub fn lock(&self) -> PathBuf {
        sibling(&self.output, ".lock")
    }

    /// `OUTPUT.report.html`.
    pub fn report(&self) -> PathBuf {
        report_path(&self.output)
    }

    /// Records of rows that left the input: paid for, so never deleted.
    pub fn stale(&self) -> PathBuf {
        companion(&self.output, "stale")
    }

    /// What `--fresh` (or a merge over an existing output) moved out of the way.
    pub fn prev(&self) -> PathBuf {
        companion(&self.output, "prev")
    }

    /// Lines of the output that were not records.
    pub fn rejected(&self) -> PathBuf {
        companion(&self.output, "rejected").with_extension("txt")
    }

    /// Unconfirmed spend of rows that ended with no record, carried across runs.
    pub fn spend(&self) -> PathBuf {
        sibling(&self.output, ".spend.json")
    }

    /// The run's plan spool (temporary).
    pub fn plan(&self) -> PathBuf {
        sibling(&self.output, ".plan")
    }

    /// What job wrote this output: compared by `merge`.
    pub fn stamp(&self) -> PathBuf {
        sibling(&self.output, ".job.json")
    }

    /// The Batch API log: every step of every batch, recorded before and after it happens.
    pub fn batches(&self) -> PathBuf {
        sibling(&self.output, ".batches.jsonl")
    }

    /// A piped input (stdin, a FIFO), kept while `run --wait` reads it on every pass.
    pub fn input_copy(&self, ext: &str) -> PathBuf {
        sibling(&self.output, &format!(".input.{ext}"))
    }

    /// Batch input files as uploaded, and results as downloaded.
    pub fn batch_dir(&self) -> PathBuf {
        sibling(&self.output, ".batches.d")
    }
}

/// Whether a file name is an output's, not one of its companions (`.stale`, `.prev`, …).
pub fn is_output_name(name: &str) -> bool {
    name.ends_with(".jsonl")
        && ![
            ".stale.jsonl",
            ".prev.jsonl",
            ".rejected.jsonl",
            ".batches.jsonl",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// `out/x.jsonl` → `out/x.KIND.jsonl`: the output's companions that hold records.
pub fn companion(output: &Path, kind: &str) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.clone(), String::new()),
    };
    output.with_file_name(format!("{stem}.{kind}{ext}"))
}

/// `out/x.jsonl` → `out/x.jsonl.report.html`, for a job's output or any output file.
pub fn report_path(output: &Path) -> PathBuf {
    sibling(output, ".report.html")
}

/// `out/x.jsonl` + `.lock` → `out/x.jsonl.lock`.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `path` as seen from the folder `dir`, both made absolute against the working folder and
/// their `..` taken lexically: `out/x.csv` from `out` is `x.csv`, from `runs/a` it is
/// `../../out/x.csv`. A path with no root in common with `dir` comes back absolute.
pub fn relative_to(path: &Path, dir: &Path) -> PathBuf {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let (Ok(p), Ok(d)) = (std::path::absolute(path), std::path::absolute(dir)) else {
        return path.to_path_buf();
    };
    let (p, d) = (normal(&p), normal(&d));
    let common = p.iter().zip(&d).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return p.iter().collect();
    }
    let mut out: PathBuf = d[common..].iter().map(|_| Component::ParentDir).collect();
    out.extend(&p[common..]);
    out
}

/// The components of an absolute path, `.` left out and `..` taken off what it follows.
fn normal(p: &Path) -> Vec<Component<'_>> {
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Replaces `path` with what `write` writes, atomically (see the module doc). The temporary
/// file is `PATH.tmp`; on an error it is removed and `path` is untouched.
pub fn replace<F>(path: &Path, write: F) -> Result<(), Error>
where
    F: FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
{
    let mut p = Pending::create(path)?;
    let tmp = p.tmp.clone();
    write(p.writer()).map_err(|e| io_err(&tmp, e))?;
    p.commit()
}

/// A replacement of `path` being written, for writers that cannot be one closure (several
/// files written in one pass): the same steps as `replace`, one at a time. Written to
/// `PATH.tmp`; `sync` flushes and fsyncs it, `commit` (which syncs first if need be) renames it
/// over `path` and fsyncs the folder. Dropped before `commit`, the temporary file is removed
/// and `path` is untouched.
pub struct Pending {
    path: PathBuf,
    tmp: PathBuf,
    w: Option<BufWriter<File>>,
    synced: bool,
    /// Bytes given to `write_all` since the disk was last asked to start on them.
    unstarted: usize,
}

/// How much `write_all` takes before it asks the disk to start writing.
const WRITEBACK_EVERY: usize = 8 << 20;

impl Pending {
    pub fn create(path: &Path) -> Result<Pending, Error> {
        Pending::create_as(path, ".tmp")
    }

    /// With the temporary file `PATH` + `suffix` (a second replacement of the same file).
    pub fn create_as(path: &Path, suffix: &str) -> Result<Pending, Error> {
        let tmp = sibling(path, suffix);
        let f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        Ok(Pending {
            path: path.to_path_buf(),
            tmp,
            w: Some(BufWriter::with_capacity(256 * 1024, f)),
            synced: false,
            unstarted: 0,
        })
    }

    /// The temporary file's writer.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.w.as_mut().expect("written before commit")
    }

    /// The temporary file's path.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// Writes `bytes`; every few megabytes the disk is asked to start writing what it has
    /// (Linux), so the `sync` at the end has little left to wait for.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.put(bytes).map_err(|e| io_err(&self.tmp, e))
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let w = self.w.as_mut().expect("written before commit");
        w.write_all(bytes)?;
        self.unstarted += bytes.len();
        if self.unstarted >= WRITEBACK_EVERY {
            self.unstarted = 0;
            start_writeback(w.get_ref());
        }
        Ok(())
    }

    /// Everything written is on disk (not yet in place).
    pub fn sync(&mut self) -> Result<(), Error> {
        if !self.synced {
            let w = self.w.as_mut().expect("synced before commit");
            w.flush().map_err(|e| io_err(&self.tmp, e))?;
            w.get_ref().sync_all().map_err(|e| io_err(&self.tmp, e))?;
            self.synced = true;
        }
        Ok(())
    }

    /// Puts the file in place of `path`, durably.
    pub fn commit(mut self) -> Result<(), Error> {
        self.sync()?;
        drop(self.w.take());
        let r = rename_durably(&self.tmp, &self.path);
        if r.is_err() && self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        r
    }
}

/// Asks the kernel to start writing the file's dirty pages, without waiting for them.
fn start_writeback(f: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a syscall on a descriptor `f` holds open, with no memory passed; the flag
        // only starts the write-out of pages already written (a hint: its result is moot).
        unsafe {
            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}

/// Writes go through `write_all` (and its early write-out).
impl Write for Pending {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.put(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer().flush()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.w.take().is_some() {
            // Not committed: the temporary file is litter (an error says what went wrong).
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `replace` with bytes already in memory.
pub fn replace_bytes(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    replace(path, |w| w.write_all(bytes))
}

/// Renames `from` over `to` and fsyncs the folder, so the rename itself survives a crash.
pub fn rename_durably(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::rename(from, to).map_err(|e| io_err(to, e))?;
    sync_dir(to)
}

/// Fsyncs the folder that holds `path` (a no-op where folders cannot be opened).
pub fn sync_dir(path: &Path) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| io_err(dir, e))?;
        d.sync_all().map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn companions_sit_beside_the_output() {
        let f = Files::new(Path::new("out/x.jsonl"));
        assert_eq!(f.stale(), PathBuf::from("out/x.stale.jsonl"));
        assert_eq!(f.rejected(), PathBuf::from("out/x.rejected.txt"));
        assert_eq!(f.lock(), PathBuf::from("out/x.jsonl.lock"));
        assert_eq!(f.report(), PathBuf::from("out/x.jsonl.report.html"));
    }

    #[test]
    fn a_path_relative_to_a_folder() {
        let r = |p: &str, d: &str| relative_to(Path::new(p), Path::new(d));
        assert_eq!(r("out/x.csv", "out"), PathBuf::from("x.csv"));
        assert_eq!(r("x.csv", ""), PathBuf::from("x.csv"));
        assert_eq!(r("out/x.csv", "runs/a"), PathBuf::from("../../out/x.csv"));
        assert_eq!(r("csv/x.csv", "out/../out"), PathBuf::from("../csv/x.csv"));
        assert_eq!(r("/data/x.csv", "/data/out"), PathBuf::from("../x.csv"));
    }

    #[test]
    fn a_pending_replacement_dropped_before_commit_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, b"old").unwrap();
        let mut w = Pending::create(&p).unwrap();
        w.writer().write_all(b"new").unwrap();
        w.sync().unwrap();
        drop(w);
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(!sibling(&p, ".tmp").exists());
        let mut w = Pending::create(&p).unwrap();
        w.writer().write_all(b"new").unwrap();
        w.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(!sibling(&p, ".tmp").exists());
    }

    #[test]
    fn a_failed_replace_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        replace_bytes(&p, b"old").unwrap();
        let e = replace(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(!sibling(&p, ".tmp").exists());
    }
}
