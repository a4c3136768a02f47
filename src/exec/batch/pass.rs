//! One run's batch state: the log, refreshed from the server; results routed to their rows;
//! the parts this run writes.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::api::{Batch, BatchApi};
use super::results::{Answer, Answerer, Results, Unmatched};
use super::state::{now, BatchPart, Event, Log, Stage};
use super::*;
use crate::error::Error;
use crate::job::Job;
use crate::ledger::journal::io_err;

/// A part being written this run.
pub(super) struct NewPart {
    pub(super) id: String,
    pub(super) path: PathBuf,
    pub(super) w: Option<BufWriter<File>>,
    pub(super) requests: u64,
    pub(super) bytes: u64,
    pub(super) worst_usd: f64,
}

impl NewPart {
    /// Makes the part's file durable before it is uploaded.
    pub(super) fn close(&mut self) -> Result<(), Error> {
        if let Some(w) = self.w.take() {
            w.into_inner()
                .map_err(|e| io_err(&self.path, e.into_error()))?
                .sync_all()
                .map_err(|e| io_err(&self.path, e))?;
        }
        Ok(())
    }
}

/// What this run submitted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Submitted {
    pub batches: u64,
    pub requests: u64,
}

/// Batch state for one run: what the log says, refreshed from the server, and the parts this
/// run writes.
pub struct Pass {
    pub(super) log: Log,
    pub(super) dir: PathBuf,
    pub(super) client: Option<Box<dyn BatchApi>>,
    pub(super) results: Results,
    /// Keys of rows in batches still running, sorted.
    pub(super) in_flight: Vec<([u8; 16], u64)>,
    /// Parts whose results this run collects.
    pub(super) finishing: Vec<String>,
    pub(super) splitter: Splitter,
    pub(super) new_parts: Vec<NewPart>,
    pub(super) run_tag: String,
    pub(super) job_name: String,
    pub(super) output_name: String,
    pub(super) line: Vec<u8>,
    /// Batches still running, and their requests.
    pub running: (u64, u64),
    /// Batches that ended failed, with the API's errors.
    pub failed_batches: Vec<String>,
    /// Set when a row did not fit the budget: the run stops after submitting what did.
    pub budget_stop: Option<String>,
    /// Reading another engine's results: lines that match no pending row are reported, not
    /// recorded (nothing of this job paid for them).
    pub importing: bool,
}

impl Pass {
    /// Reads the batch log and, when batches are open, asks the server how they are doing and
    /// downloads the results of those that ended. `need_client`: this run may submit.
    /// `import`: a results file from another engine, read like a downloaded batch's.
    pub async fn open(job: &Job, need_client: bool, import: Option<&Path>) -> Result<Pass, Error> {
        let log = Log::load(&crate::ledger::files::Files::new(&job.output).batches())?;
        let dir = crate::ledger::files::Files::new(&job.output).batch_dir();
        let has_open = log.open_parts().next().is_some();
        let client = if has_open || need_client {
            Some(super::vendor::for_job(job)?)
        } else {
            None
        };
        // Results imported from another engine are in OpenAI's format, as `export` wrote.
        let parse = client
            .as_ref()
            .map_or(openai::outcome as fn(&[u8]) -> Answer, |c| c.outcome());
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut pass = Pass {
            log,
            dir,
            client,
            results: Results::new(parse),
            in_flight: Vec::new(),
            finishing: Vec::new(),
            splitter: Splitter::new(job.batch.clone()),
            new_parts: Vec::new(),
            run_tag: format!("{:x}-{:x}", now(), std::process::id()),
            job_name: name(&job.file),
            output_name: name(&job.output),
            line: Vec::with_capacity(4096),
            running: (0, 0),
            failed_batches: Vec::new(),
            budget_stop: None,
            importing: false,
        };
        pass.remove_strays();
        if has_open {
            pass.refresh().await?;
        }
        pass.index()?;
        if let Some(file) = import {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            pass.results.add_file(
                file,
                Answerer {
                    batch_id: format!("import:{name}"),
                    took_ms: 0,
                },
            )?;
            pass.results.seal();
            pass.importing = true;
        }
        Ok(pass)
    }

    /// Input files a killed run wrote but never put on record: nothing refers to them (their
    /// rows are planned again), so they only take space. The run holds the output's lock.
    pub(super) fn remove_strays(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with('p') && name.ends_with(".jsonl");
            if ours && !self.log.parts.iter().any(|p| p.file == name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    pub(super) fn client(&self) -> &dyn BatchApi {
        self.client
            .as_deref()
            .expect("a client when batches are open")
    }

    /// Brings every open part up to date with the server.
    pub(super) async fn refresh(&mut self) -> Result<(), Error> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let open: Vec<BatchPart> = self.log.open_parts().cloned().collect();
        for part in open {
            match part.stage {
                Stage::Written | Stage::Uploading | Stage::Uploaded => {
                    // Never submitted: its rows go into this run's files. An upload that may
                    // have happened is removed (an unused file costs nothing, but clutters).
                    let file_id = match (&part.file_id, part.stage) {
                        (Some(id), _) => Some(id.clone()),
                        (None, Stage::Uploading) => {
                            self.client().find_staged(&part.file).await.ok().flatten()
                        }
                        _ => None,
                    };
                    if let Some(id) = file_id {
                        let _ = self.client().unstage(&id).await;
                    }
                    self.abandon(&part, "the run stopped before it was submitted")?;
                }
                Stage::Creating => {
                    let client = self
                        .client
                        .as_deref()
                        .expect("a client when batches are open");
                    if let Some(b) =
                        settle_creating(client, &mut self.log, &self.dir, &part).await?
                    {
                        tracing::info!(
                            "batch {} of {} was created before the last run stopped; following it",
                            b.id,
                            part.file
                        );
                        self.check(&part.id, b).await?;
                    }
                }
                Stage::Created => {
                    let id = part.batch_id.clone().expect("a created part has its batch");
                    let b = self.client().retrieve(&id).await?;
                    self.check(&part.id, b).await?;
                }
                Stage::Finished | Stage::Collected | Stage::Abandoned => {}
            }
        }
        Ok(())
    }

    pub(super) fn abandon(&mut self, part: &BatchPart, why: &str) -> Result<(), Error> {
        self.log.record(Event::Abandoned {
            part: part.id.clone(),
            why: why.into(),
            at: now(),
        })?;
        let _ = std::fs::remove_file(self.dir.join(&part.file));
        Ok(())
    }

    /// Downloads the results of a batch that ended; a batch still running stays as it is.
    pub(super) async fn check(&mut self, part: &str, b: Batch) -> Result<(), Error> {
        if !b.is_final() {
            return Ok(());
        }
        let mut output = None;
        let mut errors = None;
        if let Some(f) = &b.output_file_id {
            let name = format!("{}.output.jsonl", b.id);
            self.client().download(f, &self.dir.join(&name)).await?;
            output = Some(name);
        }
        if let Some(f) = &b.error_file_id {
            let name = format!("{}.errors.jsonl", b.id);
            self.client().download(f, &self.dir.join(&name)).await?;
            errors = Some(name);
        }
        let problems = b.problems();
        if b.status == "failed" {
            // Lines the validation named fail their rows (sending them again would fail the
            // same way); the others were never run and are pending.
            let named = self.invalid_lines(part, &b)?;
            if named.is_some() {
                errors = named;
            }
        }
        let took_s = match (b.created_at, b.ended_at()) {
            (Some(a), Some(z)) => z.saturating_sub(a),
            _ => 0,
        };
        self.log.record(Event::Finished {
            part: part.to_string(),
            status: b.status.clone(),
            output,
            errors,
            counts: b.request_counts.unwrap_or_default(),
            took_s,
            problems,
            at: now(),
        })?;
        Ok(())
    }

    /// A failed batch's named lines as result lines of their own, so those rows fail.
    pub(super) fn invalid_lines(&self, part: &str, b: &Batch) -> Result<Option<String>, Error> {
        let Some(p) = self.log.part(part) else {
            return Ok(None);
        };
        let errs: Vec<_> = b
            .errors
            .iter()
            .flat_map(|e| &e.data)
            .filter_map(|e| e.line.map(|l| (l, e)))
            .collect();
        if errs.is_empty() {
            return Ok(None);
        }
        let path = self.dir.join(&p.file);
        let f = File::open(&path).map_err(|e| io_err(&path, e))?;
        let name = format!("{}.invalid.jsonl", b.id);
        let out_path = self.dir.join(&name);
        let mut out = BufWriter::new(File::create(&out_path).map_err(|e| io_err(&out_path, e))?);
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|e| io_err(&path, e))?;
            let n = n as u64 + 1;
            for (_, e) in errs.iter().filter(|(l, _)| *l == n) {
                let id = serde_json::from_str::<Value>(&line)
                    .ok()
                    .and_then(|v| v.get("custom_id").and_then(Value::as_str).map(String::from));
                let Some(id) = id else { continue };
                let v = serde_json::json!({
                    "custom_id": id,
                    "response": null,
                    "error": {
                        "code": e.code.clone().unwrap_or_else(|| "invalid_request".into()),
                        "message": format!(
                            "the batch failed validation at line {n} of {}: {}",
                            p.file,
                            e.message.as_deref().unwrap_or("invalid")
                        ),
                    }
                });
                serde_json::to_writer(&mut out, &v).expect("serializes");
                out.write_all(b"\n").map_err(|e| io_err(&out_path, e))?;
            }
        }
        out.into_inner()
            .map_err(|e| io_err(&out_path, e.into_error()))?
            .sync_all()
            .map_err(|e| io_err(&out_path, e))?;
        Ok(Some(name))
    }

    /// Indexes the results to collect and the rows still in flight.
    pub(super) fn index(&mut self) -> Result<(), Error> {
        for p in self.log.open_parts() {
            match p.stage {
                Stage::Finished => {
                    let batch = p.batch_id.clone().unwrap_or_default();
                    for f in p.output.iter().chain(p.errors.iter()) {
                        let from = Answerer {
                            batch_id: batch.clone(),
                            took_ms: p.took_s * 1000,
                        };
                        self.results.add_file(&self.dir.join(f), from)?;
                    }
                    if p.status.as_deref() == Some("failed") {
                        self.failed_batches.push(format!(
                            "batch {batch} ({}) failed validation: {}",
                            p.file,
                            if p.problems.is_empty() {
                                "no reason given".to_string()
                            } else {
                                p.problems.join("; ")
                            }
                        ));
                    }
                    self.finishing.push(p.id.clone());
                }
                Stage::Created => {
                    self.running.0 += 1;
                    let path = self.dir.join(&p.file);
                    let f = File::open(&path).map_err(|e| io_err(&path, e))?;
                    for line in BufReader::new(f).split(b'\n') {
                        let line = line.map_err(|e| io_err(&path, e))?;
                        if let Some((_, fp, idh)) = serde_json::from_slice::<results::Head>(&line)
                            .ok()
                            .and_then(|h| results::parse_custom_id(h.custom_id))
                        {
                            self.in_flight.push((fp, idh));
                            self.running.1 += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        self.results.seal();
        self.in_flight.sort_unstable();
        Ok(())
    }

    /// The worst case of every request submitted and not yet collected, in USD.
    pub fn open_worst_usd(&self) -> f64 {
        self.log
            .open_parts()
            .filter(|p| p.pins_rows())
            .map(|p| p.worst_usd)
            .sum()
    }

    /// Where this run's row goes.
    pub fn route(&mut self, fp: &[u8; 16], idh: u64) -> Result<Route, Error> {
        if !self.results.is_empty() {
            if let Some((outcome, from)) = self.results.take(fp, idh)? {
                if !matches!(outcome, Answer::NotRun) {
                    return Ok(Route::Result { outcome, from });
                }
            }
        }
        if self.in_flight.binary_search(&(*fp, idh)).is_ok() {
            return Ok(Route::InFlight);
        }
        Ok(Route::New)
    }

    /// A row this run leaves as it is (done before): its results, if any, are not orphans.
    pub fn touch(&mut self, fp: &[u8; 16], idh: u64) -> Result<(), Error> {
        if !self.results.is_empty() {
            self.results.take(fp, idh)?;
        }
        Ok(())
    }

    /// Results no row of this run's input matched (rows that left the input): each with its
    /// row number and key, to be recorded so that compaction keeps them in the stale file.
    pub fn unmatched(&self) -> Result<Vec<Unmatched>, Error> {
        self.results
            .unmatched()
            .map(|i| self.results.entry(i))
            .filter(|r| !matches!(r, Ok(u) if matches!(u.outcome, Answer::NotRun)))
            .collect()
    }

    /// Adds a row's request to this run's files. `Err(message)` when the line alone is over
    /// the file size limit.
    pub fn add(
        &mut self,
        row: u64,
        fp: &[u8; 16],
        idh: u64,
        body: &[u8],
        stream: bool,
        worst_usd: f64,
    ) -> Result<Result<(), String>, Error> {
        let mut line = std::mem::take(&mut self.line);
        let id = self.client().custom_id(row, fp, idh);
        self.client().write_line(&mut line, &id, body, stream);
        let r = self.add_line(&line, worst_usd);
        self.line = line;
        r
    }

    pub(super) fn add_line(
        &mut self,
        line: &[u8],
        worst_usd: f64,
    ) -> Result<Result<(), String>, Error> {
        let len = line.len() as u64;
        if let Err(e) = self.splitter.check(len) {
            return Ok(Err(e));
        }
        if self.splitter.add(len) {
            self.start_part()?;
        }
        let p = self.new_parts.last_mut().expect("a part was started");
        let w = p.w.as_mut().expect("open while adding");
        w.write_all(line).map_err(|e| io_err(&p.path, e))?;
        p.requests += 1;
        p.bytes += len;
        p.worst_usd += worst_usd;
        Ok(Ok(()))
    }

    pub(super) fn start_part(&mut self) -> Result<(), Error> {
        if let Some(p) = self.new_parts.last_mut() {
            p.close()?;
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let id = format!("p{}-{:04}", self.run_tag, self.new_parts.len() + 1);
        let path = self.dir.join(format!("{id}.jsonl"));
        let f = File::create(&path).map_err(|e| io_err(&path, e))?;
        self.new_parts.push(NewPart {
            id,
            path,
            w: Some(BufWriter::with_capacity(1 << 20, f)),
            requests: 0,
            bytes: 0,
            worst_usd: 0.0,
        });
        Ok(())
    }

    /// Frees the result index and the in-flight keys once every row is routed: compaction,
    /// which comes next, needs the memory (40 bytes a result line).
    pub fn release_index(&mut self) {
        self.results = Results::new(self.results.parser());
        self.in_flight = Vec::new();
    }

    /// Drops this run's files unsubmitted (a dry run, or a run that stopped before submitting).
    pub fn discard(&mut self) {
        for p in self.new_parts.drain(..) {
            drop(p.w);
            let _ = std::fs::remove_file(&p.path);
        }
    }

    /// Every result of the parts collected this run is in the output: they are done.
    pub fn mark_collected(&mut self) -> Result<(), Error> {
        for id in std::mem::take(&mut self.finishing) {
            self.log.record(Event::Collected {
                part: id,
                at: now(),
            })?;
        }
        Ok(())
    }
}
