//! The Batch API: the job's pending rows as files of requests, uploaded and submitted as
//! batches at half price, and collected into the same records as an online run.
//!
//! A run in batch mode is an ordinary run (`schedule`) whose rows, instead of being sent, are
//! routed here: a row with a downloaded result gets its record, a row in a batch still running
//! waits, and any other row goes into a new input file. Every step is in the batch log
//! (`state`) before and after it happens:
//!
//! ```text
//! part written → uploading → uploaded → creating → created → finished (downloaded) → collected
//! ```
//!
//! so a run killed between two steps redoes or looks up the step it was in, and no row is
//! submitted while an earlier batch holds it.

pub mod client;
pub mod export;
pub mod results;
pub mod state;

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::Error;
use crate::job::{BatchLimits, Job};
use crate::journal::io_err;
use client::{Batch, Client};
use results::{Answerer, Outcome, Results, Unmatched};
use state::{now, Event, Log, Part, Stage};

/// The metadata key that names a batch's part: how a batch created by a killed run is found.
pub const META_PART: &str = "promptmill_part";

/// Where a row goes in this run.
pub enum Route {
    /// A batch answered it: write its record.
    Result { outcome: Outcome, from: Answerer },
    /// A batch still running holds it.
    InFlight,
    /// Not in any batch: send it (online) or put it in a new file (batch mode).
    New,
}

/// Splits lines into files within the limits: requests per file and bytes per file.
pub struct Splitter {
    limits: BatchLimits,
    /// (requests, bytes) of each file so far.
    pub files: Vec<(u64, u64)>,
}

impl Splitter {
    pub fn new(limits: BatchLimits) -> Splitter {
        Splitter {
            limits,
            files: Vec::new(),
        }
    }

    /// A line longer than a whole file cannot be submitted.
    pub fn check(&self, len: u64) -> Result<(), String> {
        if len > self.limits.max_bytes_per_file {
            return Err(format!(
                "the request is {len} bytes as a batch line, over the file limit of {} bytes \
                 ([batch] max_bytes_per_file)",
                self.limits.max_bytes_per_file
            ));
        }
        Ok(())
    }

    /// Counts a line; `true` when it starts a new file.
    pub fn add(&mut self, len: u64) -> bool {
        let new = self.files.last().is_none_or(|&(n, b)| {
            n as usize >= self.limits.max_requests_per_file
                || b + len > self.limits.max_bytes_per_file
        });
        if new {
            self.files.push((0, 0));
        }
        let f = self.files.last_mut().expect("a file");
        f.0 += 1;
        f.1 += len;
        new
    }
}

/// A row's request as OpenAI's Batch API reads it, and engines that read the same files
/// (vLLM's `run-batch`): OpenAI's route, the job's own model.
pub fn write_openai_line(out: &mut Vec<u8>, p: &crate::request::Prepared, idh: u64, stream: bool) {
    write_line(
        out,
        "/v1/chat/completions",
        None,
        p.row.number,
        &p.fingerprint,
        idh,
        &p.request.body,
        stream,
    );
}

/// One Batch API input line: `{"custom_id", "method", "url", "body"}`. The body is the online
/// request's, without streaming (the Batch API answers whole) and, where the service wants
/// it, naming the deployment.
#[allow(clippy::too_many_arguments)]
pub fn write_line(
    out: &mut Vec<u8>,
    url: &str,
    model: Option<&str>,
    row: u64,
    fp: &[u8; 16],
    idh: u64,
    body: &[u8],
    stream: bool,
) {
    out.clear();
    out.extend_from_slice(b"{\"custom_id\":");
    serde_json::to_writer(&mut *out, &results::custom_id(row, fp, idh)).expect("serializes");
    out.extend_from_slice(b",\"method\":\"POST\",\"url\":");
    serde_json::to_writer(&mut *out, url).expect("a string serializes");
    out.extend_from_slice(b",\"body\":");
    if !stream && model.is_none() {
        out.extend_from_slice(body);
    } else {
        let mut v: serde_json::Map<String, Value> =
            serde_json::from_slice(body).expect("our own body parses");
        v.remove("stream");
        v.remove("stream_options");
        if let Some(m) = model {
            v.insert("model".into(), Value::String(m.to_string()));
        }
        serde_json::to_writer(&mut *out, &v).expect("serializes");
    }
    out.extend_from_slice(b"}\n");
}

/// A part being written this run.
struct NewPart {
    id: String,
    path: PathBuf,
    w: Option<BufWriter<File>>,
    requests: u64,
    bytes: u64,
    worst_usd: f64,
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
    log: Log,
    dir: PathBuf,
    client: Option<Client>,
    results: Results,
    /// Keys of rows in batches still running, sorted.
    in_flight: Vec<([u8; 16], u64)>,
    /// Parts whose results this run collects.
    finishing: Vec<String>,
    splitter: Splitter,
    line_url: &'static str,
    /// The model each line's body must name, when it is not the job's (Azure: the deployment).
    line_model: Option<String>,
    new_parts: Vec<NewPart>,
    run_tag: String,
    job_name: String,
    output_name: String,
    line: Vec<u8>,
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
        let log = Log::load(&job.batches_path())?;
        let dir = job.batch_dir();
        let has_open = log.open_parts().next().is_some();
        let client = if has_open || need_client {
            Some(Client::for_job(job)?)
        } else {
            None
        };
        let (line_url, line_model) = match &client {
            Some(c) => {
                let m = c.endpoint().batch_line_model(&job.model);
                (
                    c.endpoint().batch_line_url(),
                    (m != job.model).then(|| m.to_string()),
                )
            }
            None => ("/v1/chat/completions", None),
        };
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut pass = Pass {
            log,
            dir,
            client,
            results: Results::default(),
            in_flight: Vec::new(),
            finishing: Vec::new(),
            splitter: Splitter::new(job.batch.clone()),
            line_url,
            line_model,
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
    fn remove_strays(&self) {
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

    fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a client when batches are open")
    }

    /// Brings every open part up to date with the server.
    async fn refresh(&mut self) -> Result<(), Error> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let open: Vec<Part> = self.log.open_parts().cloned().collect();
        for part in open {
            match part.stage {
                Stage::Written | Stage::Uploading | Stage::Uploaded => {
                    // Never submitted: its rows go into this run's files. An upload that may
                    // have happened is removed (an unused file costs nothing, but clutters).
                    let file_id = match (&part.file_id, part.stage) {
                        (Some(id), _) => Some(id.clone()),
                        (None, Stage::Uploading) => {
                            self.client().find_file(&part.file).await.ok().flatten()
                        }
                        _ => None,
                    };
                    if let Some(id) = file_id {
                        let _ = self.client().delete_file(&id).await;
                    }
                    self.abandon(&part, "the run stopped before it was submitted")?;
                }
                Stage::Creating => {
                    match self.client().find_batch(&part.id, part.creating_at).await? {
                        Some(b) => {
                            tracing::info!(
                                "batch {} of {} was created before the last run stopped; following it",
                                b.id,
                                part.file
                            );
                            self.log.record(Event::Created {
                                part: part.id.clone(),
                                batch_id: b.id.clone(),
                                at: b.created_at.unwrap_or_else(now),
                            })?;
                            self.check(&part.id, b).await?;
                        }
                        None => {
                            if let Some(id) = &part.file_id {
                                let _ = self.client().delete_file(id).await;
                            }
                            self.abandon(&part, "no batch was created before the run stopped")?;
                        }
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

    fn abandon(&mut self, part: &Part, why: &str) -> Result<(), Error> {
        self.log.record(Event::Abandoned {
            part: part.id.clone(),
            why: why.into(),
            at: now(),
        })?;
        let _ = std::fs::remove_file(self.dir.join(&part.file));
        Ok(())
    }

    /// Downloads the results of a batch that ended; a batch still running stays as it is.
    async fn check(&mut self, part: &str, b: Batch) -> Result<(), Error> {
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
    fn invalid_lines(&self, part: &str, b: &Batch) -> Result<Option<String>, Error> {
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
    fn index(&mut self) -> Result<(), Error> {
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
                        #[derive(serde::Deserialize)]
                        struct Head<'a> {
                            #[serde(borrow)]
                            custom_id: &'a str,
                        }
                        if let Some((_, fp, idh)) = serde_json::from_slice::<Head>(&line)
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

    /// Whether any batch is still running on the server.
    pub fn has_running(&self) -> bool {
        self.log.open_parts().any(|p| p.stage == Stage::Created)
    }

    /// Whether anything needs the server: batches open, or results to collect.
    pub fn is_idle(&self) -> bool {
        self.log.open_parts().next().is_none() && self.new_parts.is_empty()
    }

    /// Where this run's row goes.
    pub fn route(&mut self, fp: &[u8; 16], idh: u64) -> Result<Route, Error> {
        if !self.results.is_empty() {
            if let Some((outcome, from)) = self.results.take(fp, idh)? {
                if !matches!(outcome, Outcome::NotRun) {
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
            .filter(|r| !matches!(r, Ok(u) if matches!(u.outcome, Outcome::NotRun)))
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
        write_line(
            &mut line,
            self.line_url,
            self.line_model.as_deref(),
            row,
            fp,
            idh,
            body,
            stream,
        );
        let r = self.add_line(&line, worst_usd);
        self.line = line;
        r
    }

    fn add_line(&mut self, line: &[u8], worst_usd: f64) -> Result<Result<(), String>, Error> {
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

    fn start_part(&mut self) -> Result<(), Error> {
        if let Some(p) = self.new_parts.last_mut() {
            close(p)?;
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

    /// The files this run would submit: (requests, bytes) each.
    pub fn planned(&self) -> Vec<(u64, u64)> {
        self.new_parts
            .iter()
            .map(|p| (p.requests, p.bytes))
            .collect()
    }

    /// Uploads and submits this run's files, one step at a time, each on record before and
    /// after. `stop`: a signal arrived; files not yet begun are dropped (their rows stay
    /// pending).
    pub async fn submit(
        &mut self,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Submitted, Error> {
        let mut done = Submitted::default();
        let parts = std::mem::take(&mut self.new_parts);
        let mut rest = parts.into_iter();
        while let Some(mut p) = rest.next() {
            if stop.is_cancelled() {
                let _ = std::fs::remove_file(&p.path);
                for p in rest.by_ref() {
                    let _ = std::fs::remove_file(&p.path);
                }
                break;
            }
            close(&mut p)?;
            let file = p
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.log.record(Event::Part {
                part: p.id.clone(),
                file: file.clone(),
                requests: p.requests,
                bytes: p.bytes,
                worst_usd: p.worst_usd,
                at: now(),
            })?;
            let client = self.client.as_ref().expect("a client in batch mode");
            self.log.record(Event::Uploading {
                part: p.id.clone(),
                at: now(),
            })?;
            let file_id = match client.upload(&p.path, &file).await {
                Ok(id) => {
                    state::failpoint("batch:upload-done");
                    id
                }
                Err(e) => {
                    let part = self.log.part(&p.id).cloned().expect("just recorded");
                    self.abandon(&part, &e.to_string())?;
                    for p in rest.by_ref() {
                        let _ = std::fs::remove_file(&p.path);
                    }
                    return Err(e);
                }
            };
            self.log.record(Event::Uploaded {
                part: p.id.clone(),
                file_id: file_id.clone(),
                at: now(),
            })?;
            self.log.record(Event::Creating {
                part: p.id.clone(),
                at: now(),
            })?;
            let mut meta = serde_json::Map::new();
            meta.insert(META_PART.into(), Value::String(p.id.clone()));
            meta.insert(
                "promptmill_job".into(),
                Value::String(self.job_name.clone()),
            );
            meta.insert(
                "promptmill_output".into(),
                Value::String(self.output_name.clone()),
            );
            let client = self.client.as_ref().expect("a client in batch mode");
            match client.create(&file_id, &meta).await {
                Ok(b) => {
                    state::failpoint("batch:create-done");
                    self.log.record(Event::Created {
                        part: p.id.clone(),
                        batch_id: b.id.clone(),
                        at: b.created_at.unwrap_or_else(now),
                    })?;
                    tracing::info!(
                        "submitted batch {} ({} requests, {} bytes)",
                        b.id,
                        p.requests,
                        p.bytes
                    );
                    done.batches += 1;
                    done.requests += p.requests;
                }
                Err(e) => {
                    let _ = client.delete_file(&file_id).await;
                    let part = self.log.part(&p.id).cloned().expect("just recorded");
                    self.abandon(&part, &e.to_string())?;
                    for p in rest.by_ref() {
                        let _ = std::fs::remove_file(&p.path);
                    }
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    /// Frees the result index and the in-flight keys once every row is routed: compaction,
    /// which comes next, needs the memory (40 bytes a result line).
    pub fn release_index(&mut self) {
        self.results = Results::default();
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

fn close(p: &mut NewPart) -> Result<(), Error> {
    if let Some(w) = p.w.take() {
        w.into_inner()
            .map_err(|e| io_err(&p.path, e.into_error()))?
            .sync_all()
            .map_err(|e| io_err(&p.path, e))?;
    }
    Ok(())
}

/// One line per batch for `batch status`, asking the server about those still running.
pub async fn status(job: &Job) -> Result<Vec<String>, Error> {
    let log = Log::load(&job.batches_path())?;
    let open: Vec<Part> = log.open_parts().cloned().collect();
    let client = if open.iter().any(|p| p.batch_id.is_some()) {
        Some(Client::for_job(job)?)
    } else {
        None
    };
    let t = now();
    let mut lines = Vec::new();
    let collected = log
        .parts
        .iter()
        .filter(|p| p.stage == Stage::Collected)
        .count();
    for p in &open {
        let Some(id) = &p.batch_id else {
            lines.push(format!(
                "{}: {} requests, not submitted yet (the next run submits them)",
                p.file, p.requests
            ));
            continue;
        };
        let (status, counts, expires) = match (&client, p.stage) {
            (Some(c), Stage::Created) => {
                let b = c.retrieve(id).await?;
                (
                    b.status.clone(),
                    b.request_counts.unwrap_or_default(),
                    b.expires_at,
                )
            }
            _ => (
                format!(
                    "{} (results downloaded; the next run or `batch collect` writes them)",
                    p.status.clone().unwrap_or_default()
                ),
                p.counts,
                None,
            ),
        };
        let age = t.saturating_sub(p.created_at);
        let left = expires
            .map(|e| format!(", {} left", hms(e.saturating_sub(t))))
            .unwrap_or_default();
        lines.push(format!(
            "{id}  {status}  {}/{} done, {} failed  ({} requests, age {}{left}){}",
            counts.completed,
            counts.total.max(p.requests),
            counts.failed,
            p.requests,
            hms(age),
            if p.cancel_requested {
                "  cancel requested"
            } else {
                ""
            }
        ));
    }
    if open.is_empty() {
        lines.push("no batches in flight".into());
    }
    if collected > 0 {
        lines.push(format!("{collected} earlier batch(es) collected"));
    }
    Ok(lines)
}

/// Asks the server to cancel every batch still running; what they finished is kept and
/// collected by the next run.
pub async fn cancel(job: &Job) -> Result<Vec<String>, Error> {
    let _lock = crate::journal::Lock::acquire(&job.lock_path())?;
    let mut log = Log::load(&job.batches_path())?;
    let running: Vec<Part> = log
        .open_parts()
        .filter(|p| p.stage == Stage::Created)
        .cloned()
        .collect();
    if running.is_empty() {
        return Ok(vec!["no batches running".into()]);
    }
    let client = Client::for_job(job)?;
    let mut lines = Vec::new();
    for p in running {
        let id = p.batch_id.clone().expect("created");
        log.record(Event::CancelRequested {
            part: p.id.clone(),
            at: now(),
        })?;
        match client.cancel(&id).await {
            Ok(b) => lines.push(format!("{id}: {}", b.status)),
            Err(e) => lines.push(format!("{id}: {e}")),
        }
    }
    Ok(lines)
}

fn hms(s: u64) -> String {
    format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
}

/// Waits until a running batch of the job ends (or there is none), checking with backoff from
/// a few seconds up to `[batch] poll_s`, and showing the request counts. `Ok(false)`: a signal
/// arrived first.
pub async fn wait_any(
    job: &Job,
    signals: &crate::schedule::Signals,
    quiet: bool,
) -> Result<bool, Error> {
    let log = Log::load(&job.batches_path())?;
    let running: Vec<String> = log
        .open_parts()
        .filter(|p| p.stage == Stage::Created)
        .filter_map(|p| p.batch_id.clone())
        .collect();
    if running.is_empty() {
        return Ok(true);
    }
    let client = Client::for_job(job)?;
    let bar = crate::report::spinner(quiet);
    let mut delay = std::time::Duration::from_secs(2).min(job.batch.poll);
    let mut last_log = std::time::Instant::now();
    loop {
        let mut line = Vec::new();
        let mut ended = false;
        for id in &running {
            let b = client.retrieve(id).await?;
            let c = b.request_counts.unwrap_or_default();
            line.push(format!(
                "{id} {} {}/{} ({} failed)",
                b.status, c.completed, c.total, c.failed
            ));
            ended |= b.is_final();
        }
        let msg = format!("waiting for batches: {}", line.join(", "));
        match &bar {
            Some(b) => b.set_message(msg),
            None if !quiet && last_log.elapsed() >= std::time::Duration::from_secs(60) => {
                last_log = std::time::Instant::now();
                tracing::info!("{msg}");
            }
            None => {}
        }
        if ended {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(true);
        }
        tokio::select! {
            _ = signals.stop.cancelled() => {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                return Ok(false);
            }
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(job.batch.poll.max(std::time::Duration::from_millis(10)));
    }
}
