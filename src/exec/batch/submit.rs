//! Submitting this run's parts: upload, then create, each step in the log before and after.

use serde_json::Value;

use super::api::{Batch, CreateFailed};
use super::pass::NewPart;
use super::state::{now, Event};
use super::*;
use crate::error::Error;

impl Pass {
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
                rest.by_ref()
                    .for_each(|p| drop(std::fs::remove_file(&p.path)));
                break;
            }
            p.close()?;
            if let Err(e) = self.submit_part(&p).await {
                // The rest of this run's files are not sent: their rows stay pending.
                rest.by_ref()
                    .for_each(|p| drop(std::fs::remove_file(&p.path)));
                return Err(e);
            }
            done.batches += 1;
            done.requests += p.requests;
        }
        Ok(done)
    }

    /// One part: on record, uploaded, created as a batch; a step that fails abandons the part
    /// (its rows stay pending).
    async fn submit_part(&mut self, p: &NewPart) -> Result<(), Error> {
        let file = p
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.log.record(Event::BatchPart {
            part: p.id.clone(),
            file: file.clone(),
            requests: p.requests,
            bytes: p.bytes,
            worst_usd: p.worst_usd,
            at: now(),
        })?;
        self.log.record(Event::Uploading {
            part: p.id.clone(),
            at: now(),
        })?;
        let file_id = match self.client().stage(&p.path, &file).await {
            Ok(id) => {
                state::failpoint("batch:upload-done");
                id
            }
            Err(e) => return Err(self.give_up(&p.id, e)),
        };
        self.log.record(Event::Uploaded {
            part: p.id.clone(),
            file_id: file_id.clone(),
            at: now(),
        })?;
        let since = now();
        self.log.record(Event::Creating {
            part: p.id.clone(),
            at: since,
        })?;
        match self.create_batch(&p.id, &file_id, since).await {
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
                Ok(())
            }
            // The batch may exist and no lookup found it: the part stays `creating`, its rows
            // pinned, and the next run (or `batch status`/`cancel`) looks it up again.
            Err(f) if f.maybe_made => Err(f.error),
            Err(f) => {
                let _ = self.client().unstage(&file_id).await;
                Err(self.give_up(&p.id, f.error))
            }
        }
    }

    /// Creates the part's batch exactly once. A create is not idempotent, so after a failure
    /// that may have made the batch it is looked up by its metadata, and asked for again only
    /// when the server holds none.
    async fn create_batch(
        &self,
        part: &str,
        file_id: &str,
        since: u64,
    ) -> Result<Batch, CreateFailed> {
        let client = self.client();
        let meta = self.metadata(part);
        let mut retrier = client.retrier();
        loop {
            let f = match client.create_once(file_id, &meta).await {
                Ok(b) => return Ok(b),
                Err(f) => f,
            };
            if f.maybe_made {
                let mut lost = super::api::Lookup::of(&self.log, part, &self.dir)
                    .expect("the part is on record");
                lost.since = since;
                let found = client
                    .find_batch(&lost)
                    .await
                    .map_err(|error| CreateFailed {
                        error,
                        maybe_made: true,
                        retry: None,
                    })?;
                if let Some(b) = found {
                    tracing::info!("batch {} was created though its answer was lost", b.id);
                    return Ok(b);
                }
            }
            let delay = f.retry.as_ref().and_then(|e| retrier.next_delay(e));
            match delay {
                Some(d) => {
                    tracing::debug!("creating a batch: retrying in {d:?}: {}", f.error);
                    tokio::time::sleep(d).await;
                }
                // Out of retries. After an ambiguous failure the part stays `creating` even
                // though the lookup found nothing (a list can lag a create): the next run
                // looks again before anything is submitted anew.
                None => return Err(f),
            }
        }
    }

    /// The batch's metadata: which part, job and output it holds (how a batch whose create
    /// answer was lost is found again).
    fn metadata(&self, part: &str) -> serde_json::Map<String, Value> {
        let mut meta = serde_json::Map::new();
        meta.insert(META_PART.into(), Value::String(part.to_string()));
        meta.insert(
            "promptmill_job".into(),
            Value::String(self.job_name.clone()),
        );
        meta.insert(
            "promptmill_output".into(),
            Value::String(self.output_name.clone()),
        );
        meta
    }

    /// Abandons a part whose step failed, and gives back the step's error.
    fn give_up(&mut self, part: &str, e: Error) -> Error {
        let Some(part) = self.log.part(part).cloned() else {
            return e;
        };
        match self.abandon(&part, &e.to_string()) {
            Ok(()) => e,
            Err(log) => log,
        }
    }
}
