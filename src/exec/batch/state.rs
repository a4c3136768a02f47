//! The batch log beside the output (`OUTPUT.batches.jsonl`): every step of every batch,
//! appended and synced before and after it happens, so a run killed between any two steps
//! resumes from the last one recorded, and nothing is submitted twice.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ledger::journal::io_err;

/// Request counts as the API reports them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LineCounts {
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
}

/// One line of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The input file is written and synced (in the batch folder).
    BatchPart {
        part: String,
        file: String,
        requests: u64,
        bytes: u64,
        /// The most its requests can cost, at batch prices: counted against the budget until
        /// the results are in.
        worst_usd: f64,
        at: u64,
    },
    /// About to upload: after this, the file may exist on the server.
    Uploading {
        part: String,
        at: u64,
    },
    Uploaded {
        part: String,
        file_id: String,
        at: u64,
    },
    /// About to create the batch: after this, it may exist (found again by its metadata).
    Creating {
        part: String,
        at: u64,
    },
    Created {
        part: String,
        batch_id: String,
        at: u64,
    },
    /// Never submitted (a run stopped before), or its batch could not be created: its rows
    /// are pending again.
    Abandoned {
        part: String,
        why: String,
        at: u64,
    },
    CancelRequested {
        part: String,
        at: u64,
    },
    /// The batch reached a final status and its result files are downloaded.
    Finished {
        part: String,
        status: String,
        #[serde(default)]
        output: Option<String>,
        #[serde(default)]
        errors: Option<String>,
        #[serde(default)]
        counts: LineCounts,
        /// Seconds from creation to the final status, as the API reports them.
        #[serde(default)]
        took_s: u64,
        /// Validation errors of a failed batch, with their line numbers.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        problems: Vec<String>,
        at: u64,
    },
    /// Every result is in the output's records.
    Collected {
        part: String,
        at: u64,
    },
}

/// Kills the process at a named point when `PROMPTMILL_FAILPOINT` names it: how the tests
/// kill a run between any two steps of a batch. Costs one environment lookup per step.
pub fn failpoint(name: &str) {
    if std::env::var("PROMPTMILL_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::BatchPart { .. } => "batch:part",
            Event::Uploading { .. } => "batch:uploading",
            Event::Uploaded { .. } => "batch:uploaded",
            Event::Creating { .. } => "batch:creating",
            Event::Created { .. } => "batch:created",
            Event::Abandoned { .. } => "batch:abandoned",
            Event::CancelRequested { .. } => "batch:cancel_requested",
            Event::Finished { .. } => "batch:finished",
            Event::Collected { .. } => "batch:collected",
        }
    }

    fn part(&self) -> &str {
        match self {
            Event::BatchPart { part, .. }
            | Event::Uploading { part, .. }
            | Event::Uploaded { part, .. }
            | Event::Creating { part, .. }
            | Event::Created { part, .. }
            | Event::Abandoned { part, .. }
            | Event::CancelRequested { part, .. }
            | Event::Finished { part, .. }
            | Event::Collected { part, .. } => part,
        }
    }
}

/// How far a part got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Written,
    Uploading,
    Uploaded,
    Creating,
    Created,
    Finished,
    Collected,
    Abandoned,
}

/// One input file and its batch, as the log tells it.
#[derive(Debug, Clone)]
pub struct BatchPart {
    pub id: String,
    /// The input file's name in the batch folder.
    pub file: String,
    pub requests: u64,
    pub worst_usd: f64,
    pub stage: Stage,
    pub file_id: Option<String>,
    pub batch_id: Option<String>,
    /// When `Creating` was logged: a batch found later was created after it.
    pub creating_at: u64,
    pub created_at: u64,
    pub cancel_requested: bool,
    pub status: Option<String>,
    pub output: Option<String>,
    pub errors: Option<String>,
    pub counts: LineCounts,
    pub took_s: u64,
    pub problems: Vec<String>,
}

impl BatchPart {
    /// Submitted (or perhaps submitted: a create whose answer was lost) and not yet
    /// collected: its rows must not be sent again.
    pub fn pins_rows(&self) -> bool {
        matches!(
            self.stage,
            Stage::Creating | Stage::Created | Stage::Finished
        )
    }
}

/// The log, folded into parts in the order they were written.
pub struct Log {
    path: PathBuf,
    pub parts: Vec<BatchPart>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Log {
    /// Reads the log; a missing log is an empty one. A torn last line (a kill mid-append) is
    /// ignored: the step it began is redone or looked up.
    pub fn load(path: &Path) -> Result<Log, Error> {
        let mut log = Log {
            path: path.to_path_buf(),
            parts: Vec::new(),
        };
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(log),
            Err(e) => return Err(io_err(path, e)),
        };
        let mut offset = 0usize;
        let mut n = 0usize;
        while offset < text.len() {
            n += 1;
            let end = text[offset..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| offset + i + 1);
            let line = &text[offset..end.unwrap_or(text.len())];
            match serde_json::from_slice::<Event>(line) {
                Ok(ev) if end.is_some() => log.apply(ev),
                _ if line.iter().all(u8::is_ascii_whitespace) => {}
                // A last line with no newline was cut off by a kill mid-append: cut it away
                // so the next step starts on a line of its own; the step it began is checked
                // again.
                _ if end.is_none() => {
                    tracing::warn!(
                        "{}: line {n}: a step cut off by an interrupted run; it is checked again",
                        path.display()
                    );
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(|e| io_err(path, e))?;
                    f.set_len(offset as u64)
                        .and_then(|()| f.sync_data())
                        .map_err(|e| io_err(path, e))?;
                    break;
                }
                Ok(_) => unreachable!("a complete line"),
                Err(e) => {
                    return Err(Error::Input {
                        path: path.to_path_buf(),
                        message: format!(
                            "line {n}: not a batch log event ({e}); this file records batches \
                             submitted and paid for, so it is not rewritten: fix or remove \
                             the line"
                        ),
                    })
                }
            }
            offset = end.unwrap_or(text.len());
        }
        Ok(log)
    }

    fn apply(&mut self, ev: Event) {
        if let Event::BatchPart {
            part,
            file,
            requests,
            worst_usd,
            ..
        } = &ev
        {
            self.parts.push(BatchPart {
                id: part.clone(),
                file: file.clone(),
                requests: *requests,
                worst_usd: *worst_usd,
                stage: Stage::Written,
                file_id: None,
                batch_id: None,
                creating_at: 0,
                created_at: 0,
                cancel_requested: false,
                status: None,
                output: None,
                errors: None,
                counts: LineCounts::default(),
                took_s: 0,
                problems: Vec::new(),
            });
            return;
        }
        let Some(p) = self.parts.iter_mut().rev().find(|p| p.id == ev.part()) else {
            return;
        };
        match ev {
            Event::BatchPart { .. } => {}
            Event::Uploading { .. } => p.stage = Stage::Uploading,
            Event::Uploaded { file_id, .. } => {
                p.stage = Stage::Uploaded;
                p.file_id = Some(file_id);
            }
            Event::Creating { at, .. } => {
                p.stage = Stage::Creating;
                p.creating_at = at;
            }
            Event::Created { batch_id, at, .. } => {
                p.stage = Stage::Created;
                p.batch_id = Some(batch_id);
                p.created_at = at;
            }
            Event::Abandoned { .. } => p.stage = Stage::Abandoned,
            Event::CancelRequested { .. } => p.cancel_requested = true,
            Event::Finished {
                status,
                output,
                errors,
                counts,
                took_s,
                problems,
                ..
            } => {
                p.stage = Stage::Finished;
                p.status = Some(status);
                p.output = output;
                p.errors = errors;
                p.counts = counts;
                p.took_s = took_s;
                p.problems = problems;
            }
            Event::Collected { .. } => p.stage = Stage::Collected,
        }
    }

    /// Appends one step and syncs it to disk before returning: the step is on record before
    /// the next one starts.
    pub fn record(&mut self, ev: Event) -> Result<(), Error> {
        let mut line = serde_json::to_vec(&ev).expect("an event serializes");
        line.push(b'\n');
        let path = &self.path;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .map_err(|e| io_err(path, e))?;
        let name = ev.name();
        self.apply(ev);
        failpoint(name);
        Ok(())
    }

    pub fn part(&self, id: &str) -> Option<&BatchPart> {
        self.parts.iter().find(|p| p.id == id)
    }

    /// Parts whose batch exists and whose results are not all in the output yet.
    pub fn open_parts(&self) -> impl Iterator<Item = &BatchPart> {
        self.parts
            .iter()
            .filter(|p| !matches!(p.stage, Stage::Collected | Stage::Abandoned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_fold_into_stages_and_a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.batches.jsonl");
        let mut log = Log::load(&path).unwrap();
        log.record(Event::BatchPart {
            part: "p1".into(),
            file: "p1.jsonl".into(),
            requests: 3,
            bytes: 10,
            worst_usd: 0.5,
            at: 1,
        })
        .unwrap();
        log.record(Event::Uploading {
            part: "p1".into(),
            at: 2,
        })
        .unwrap();
        log.record(Event::Uploaded {
            part: "p1".into(),
            file_id: "file-1".into(),
            at: 3,
        })
        .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"event\":\"creat")
            .unwrap();
        let mut log = Log::load(&path).unwrap();
        let p = log.part("p1").unwrap();
        assert_eq!(p.stage, Stage::Uploaded);
        assert_eq!(p.file_id.as_deref(), Some("file-1"));
        assert!(!p.pins_rows());
        // The torn step was cut away: the next one starts on its own line.
        log.record(Event::Abandoned {
            part: "p1".into(),
            why: "test".into(),
            at: 4,
        })
        .unwrap();
        let log = Log::load(&path).unwrap();
        assert_eq!(log.part("p1").unwrap().stage, Stage::Abandoned);
    }

    #[test]
    fn a_damaged_line_in_the_middle_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.batches.jsonl");
        std::fs::write(
            &path,
            "garbage\n{\"event\":\"collected\",\"part\":\"x\",\"at\":1}\n",
        )
        .unwrap();
        let e = Log::load(&path).err().unwrap().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
