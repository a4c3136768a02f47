//! Every file that belongs to an output, named in one place, and the one way a file is
//! rewritten: a temporary file beside it, fsynced, renamed over it, and the folder fsynced, so
//! a crash leaves the old file or the new one, never a torn one.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

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

/// Replaces `path` with what `write` writes, atomically (see the module doc). The temporary
/// file is `PATH.tmp`; on an error it is removed and `path` is untouched.
pub fn replace<F>(path: &Path, write: F) -> Result<(), Error>
where
    F: FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
{
    let tmp = sibling(path, ".tmp");
    let result = (|| {
        let mut w = BufWriter::with_capacity(256 * 1024, File::create(&tmp)?);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(&tmp, e));
    }
    rename_durably(&tmp, path)
}

/// `replace` with bytes already in memory.
pub fn replace_bytes(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    replace(path, |w| w.write_all(bytes))
}

/// Fsyncs a file written by other means, then renames it over `to` durably.
pub fn sync_and_rename(from: &Path, to: &Path) -> Result<(), Error> {
    File::open(from)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(from, e))?;
    rename_durably(from, to)
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
