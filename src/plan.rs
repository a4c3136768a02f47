//! The planner: for each input row, in input order, what this run does with it: nothing (done
//! before), a copy (the same request was answered already), or a request. `run` and
//! `estimate` share it, so the dry run's "to send" is what the run sends.

use serde_json::{Map, Value};

use crate::error::Error;
use crate::fingerprint::hex;
use crate::job::Job;
use crate::ledger::files::Files;
use crate::ledger::{self, Index, Keying, Outcome, Planned, Sent, Spool};
use crate::request::Prepared;
use crate::shard;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the request.
    Send,
    /// An earlier run finished it (ok).
    Done,
    /// An earlier run's final verdict was a failure, or the row is unreadable as before.
    DoneFailed,
    /// Another row made the byte-identical request (this run or before): copy its record.
    Copy,
    /// An unreadable row with no record of that yet: write its error record.
    WriteError,
}

pub struct Planner {
    pub index: Index,
    keying: Keying,
    retry_failed: bool,
    /// The first 8 bytes of every fingerprint sent this run: a later identical row copies.
    sent: Sent,
    spool: Option<Spool>,
}

/// How a job's rows are keyed in the ledger.
pub fn keying(job: &Job) -> Keying {
    Keying {
        by_id: job.id_column.is_some(),
    }
}

/// The index of a job's output as it stands, the stale file's records included. `locked`:
/// the caller holds the output's lock, so it may bring the index files up to date on disk.
pub fn load_index(job: &Job, locked: bool) -> Result<Index, Error> {
    let keying = keying(job);
    Index::open(&job.output, keying, locked)?.with_stale(
        &Files::new(&job.output).stale(),
        keying,
        locked,
    )
}

impl Planner {
    /// The planner of a job's output as it stands, for the commands that plan without
    /// running (estimate, export, status): each says what `run` would do.
    pub fn for_job(job: &Job, retry_failed: bool) -> Result<Planner, Error> {
        Ok(Planner::new(
            load_index(job, false)?,
            keying(job),
            retry_failed,
            None,
            &job.output,
        ))
    }

    /// `spool`: where the run's plan goes (none for a dry run); `output`: scratch files go
    /// beside it.
    pub fn new(
        index: Index,
        keying: Keying,
        retry_failed: bool,
        spool: Option<Spool>,
        output: &std::path::Path,
    ) -> Planner {
        Planner {
            index,
            keying,
            retry_failed,
            sent: Sent::new(output),
            spool,
        }
    }

    /// The spool, finished, for compaction.
    pub fn finish(self) -> Result<Option<ledger::Plan>, Error> {
        self.spool.map(Spool::finish).transpose()
    }

    pub fn plan(&mut self, p: &Prepared) -> Result<Decision, Error> {
        self.plan_keyed(p, self.keying.id_hash(&p.row.id))
    }

    /// `plan`, for a caller that already has the row's id hash (`Keying::id_hash`).
    pub fn plan_keyed(&mut self, p: &Prepared, idh: u64) -> Result<Decision, Error> {
        let mut found = self.index.get(&p.fingerprint, idh)?;
        let mut legacy = None;
        if found.is_none() && self.index.records > 0 {
            // An output written before rows were keyed by request identity: its records carry
            // the body's hash. Upgrading must not re-pay them.
            let old = crate::fingerprint::legacy_fingerprint(&p.request.body);
            if let Some(e) = self.index.get(&old, idh)? {
                found = Some(e);
                legacy = Some(old);
            }
        }
        let decision = match found.map(|e| e.outcome()) {
            Some(Outcome::Ok) => Decision::Done,
            Some(Outcome::FailedFinal) if !self.retry_failed => Decision::DoneFailed,
            _ => {
                let head = u64::from_le_bytes(p.fingerprint[..8].try_into().expect("8 bytes"));
                if self.sent.contains(head)? || self.index.has_ok_source(&p.fingerprint)? {
                    Decision::Copy
                } else {
                    self.sent.insert(head)?;
                    Decision::Send
                }
            }
        };
        if self.spool.is_none() {
            return Ok(decision);
        }
        let kept = matches!(decision, Decision::Done | Decision::DoneFailed);
        let in_place = legacy.is_none() && kept;
        let (key, current, refingerprint) = match (legacy, found) {
            // A kept legacy record is rewritten with the current fingerprint; a legacy record
            // that is replaced (sent again) is superseded by the new one.
            (Some(old), _) if kept => (old, false, Some(hex(&p.fingerprint))),
            (Some(_), _) => (p.fingerprint, decision == Decision::Send, None),
            // The record is kept byte for byte only when it already says this row, id and
            // fields; otherwise compaction rewrites it with them.
            (None, Some(e)) if decision != Decision::Copy && e.ident != 0 => {
                let input = serde_json::to_vec(&p.row.fields).expect("fields serialize");
                let same = ledger::ident(p.row.number, &p.row.id, &input) == e.ident;
                (p.fingerprint, same, None)
            }
            (None, Some(_)) => (p.fingerprint, false, None),
            (None, None) => (p.fingerprint, decision == Decision::Send, None),
        };
        let at = found
            .filter(|_| in_place && current)
            .map(|e| (e.offset, e.line_len()));
        self.spool_row(
            p.row.number,
            &key,
            idh,
            (current, at),
            &p.row.id,
            &p.row.fields,
            refingerprint,
        )?;
        Ok(decision)
    }

    /// An unreadable (or unrenderable) row: `fields` is what could be read of it.
    pub fn plan_input_error(
        &mut self,
        row: u64,
        id: &str,
        message: &str,
        fields: &Map<String, Value>,
    ) -> Result<Decision, Error> {
        let key = ledger::input_error_key(row, message);
        let found = self.index.get(&key, 0)?;
        let decision = if found.is_some() {
            Decision::DoneFailed
        } else {
            Decision::WriteError
        };
        if self.spool.is_some() {
            let current = match found {
                Some(e) if e.ident != 0 => {
                    let input = serde_json::to_vec(fields).expect("fields serialize");
                    ledger::ident(row, id, &input) == e.ident
                }
                Some(_) => false,
                None => true,
            };
            let at = found.filter(|_| current).map(|e| (e.offset, e.line_len()));
            self.spool_row(row, &key, 0, (current, at), id, fields, None)?;
        }
        Ok(decision)
    }

    /// `current`: the record already says this row, id and fields; `at`: it is kept byte for
    /// byte, where it stands (offset, length).
    #[allow(clippy::too_many_arguments)]
    fn spool_row(
        &mut self,
        row: u64,
        fp: &[u8; 16],
        idh: u64,
        (current, at): (bool, Option<(u64, u32)>),
        id: &str,
        fields: &Map<String, Value>,
        refingerprint: Option<String>,
    ) -> Result<(), Error> {
        let Some(spool) = self.spool.as_mut() else {
            return Ok(());
        };
        spool.push(
            &Planned {
                row,
                fp: hex(fp),
                idh,
                id: (!current).then(|| id.to_string()),
                input: (!current).then(|| fields.clone()),
                fingerprint: refingerprint,
            },
            at,
        )
    }
}

/// Whether this run's shard (if any) owns a rendered row.
pub fn owns(job: &Job, p: &Prepared) -> bool {
    job.shard.is_none_or(|sh| {
        sh.owns(if job.id_column.is_some() {
            shard::id_key(&p.row.id)
        } else {
            shard::content_key(&p.request.messages)
        })
    })
}

/// Whether this run's shard (if any) owns a row that could not be read or rendered.
pub fn owns_unreadable(job: &Job, row: u64) -> bool {
    job.shard.is_none_or(|sh| sh.owns(shard::row_key(row)))
}
