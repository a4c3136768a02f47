//! Rows rendered into their requests on a thread of their own, ahead of the dispatcher. The
//! template, the request body and its fingerprint are the dearest steps of a row the plan
//! finds done; here they run beside the dispatcher's plan (one index lookup a row) instead of
//! before it, so a rerun that sends nothing uses both cores.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::input::{RowResult, RowStream};
use crate::render::Renderer;
use crate::request::{Builder, Prepared};

/// A row that could not be read or rendered: it gets an error record of its own.
pub(super) struct Unreadable {
    pub(super) number: u64,
    pub(super) id: String,
    pub(super) input: Map<String, Value>,
    pub(super) message: String,
}

/// One input row, prepared. `fatal`: reading the input failed here, so it was not read whole.
pub(super) struct Item {
    pub(super) fatal: bool,
    pub(super) prepared: Result<Prepared, Unreadable>,
}

enum Chunk {
    Items(Vec<Item>),
    /// The input ended (as opposed to the thread stopping before it did).
    End,
}

/// Items a chunk carries at most: the dispatcher is woken once a chunk, not once a row.
const CHUNK: usize = 64;

/// The prepared rows, in input order.
pub(super) struct PreparedRows {
    rx: mpsc::Receiver<Chunk>,
    ready: VecDeque<Item>,
    ended: bool,
}

impl PreparedRows {
    /// The next row; `None` when there are no more: at the end of the input, or because the
    /// thread preparing them stopped first (then [`PreparedRows::ended`] is false).
    pub(super) async fn recv(&mut self) -> Option<Item> {
        loop {
            if let Some(i) = self.ready.pop_front() {
                return Some(i);
            }
            match self.rx.recv().await? {
                Chunk::Items(items) => self.ready.extend(items),
                Chunk::End => {
                    self.ended = true;
                    return None;
                }
            }
        }
    }

    /// The whole input was read: only then may rows missing from it count as gone.
    pub(super) fn ended(&self) -> bool {
        self.ended
    }
}

/// Starts the thread that renders the rows of `rows` into requests; `capacity` rows at most
/// wait for the dispatcher.
pub(super) fn spawn(
    mut rows: RowStream,
    renderer: Arc<Renderer>,
    builder: Arc<Builder>,
    input: PathBuf,
    capacity: usize,
) -> Result<PreparedRows, Error> {
    let (tx, rx) = mpsc::channel((capacity / CHUNK).max(1));
    std::thread::Builder::new()
        .name("prepare".into())
        .spawn(move || {
            let mut chunk = Vec::with_capacity(CHUNK);
            while let Some(r) = rows.blocking_recv() {
                super::failpoint("render", r.as_ref().map_or(0, |row| row.number));
                chunk.push(prepare(&builder, &renderer, &input, r));
                // A partial chunk goes when the next row would be waited for, or when the
                // dispatcher has nothing queued: a slow pipe's rows are not held up.
                if chunk.len() >= CHUNK || !rows.has_ready() || tx.capacity() == tx.max_capacity() {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                    if tx.blocking_send(Chunk::Items(full)).is_err() {
                        return; // the dispatcher stopped reading
                    }
                }
            }
            if !chunk.is_empty() && tx.blocking_send(Chunk::Items(chunk)).is_err() {
                return;
            }
            if rows.ended() {
                let _ = tx.blocking_send(Chunk::End);
            }
        })
        .map_err(|e| Error::Other(format!("cannot start the row renderer: {e}")))?;
    Ok(PreparedRows {
        rx,
        ready: VecDeque::new(),
        ended: false,
    })
}

/// A row read, rendered into its request; or why it could not be.
fn prepare(builder: &Builder, renderer: &Renderer, input: &std::path::Path, r: RowResult) -> Item {
    match r {
        Err(e) => Item {
            fatal: e.fatal,
            prepared: Err(Unreadable {
                number: e.number,
                id: e.number.to_string(),
                input: Map::new(),
                message: e.message,
            }),
        },
        Ok(row) => Item {
            fatal: false,
            prepared: builder
                .prepare(input, renderer, row)
                .map_err(|(row, message)| Unreadable {
                    number: row.number,
                    id: row.id,
                    input: row.fields,
                    message,
                }),
        },
    }
}
