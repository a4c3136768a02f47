//! Rows rendered into their requests on a thread of their own, ahead of the dispatcher. The
//! template, the request body and its fingerprint are the dearest steps of a row the plan
//! finds done; here they run beside the dispatcher's plan (one index lookup a row) instead of
//! before it, so a rerun that sends nothing uses both cores.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::Error;
use crate::input::{chunks, RowResult, RowStream};
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

/// The prepared rows, in input order.
pub(super) type PreparedRows = chunks::Receiver<Item>;

/// Starts the thread that renders the rows of `rows` into requests; `capacity` rows at most
/// wait for the dispatcher. It reaches its end only when the input did.
pub(super) fn spawn(
    mut rows: RowStream,
    renderer: Arc<Renderer>,
    builder: Arc<Builder>,
    input: PathBuf,
    capacity: usize,
) -> Result<PreparedRows, Error> {
    let (mut tx, rx) = chunks::channel(capacity);
    std::thread::Builder::new()
        .name("prepare".into())
        .spawn(move || {
            while let Some(r) = rows.blocking_recv() {
                super::failpoint("render", r.as_ref().map_or(0, |row| row.number));
                let item = prepare(&builder, &renderer, &input, r);
                if tx.push(item, rows.has_ready()).is_err() {
                    return; // the dispatcher stopped reading
                }
            }
            if rows.ended() {
                tx.end();
            }
        })
        .map_err(|e| Error::Other(format!("cannot start the row renderer: {e}")))?;
    Ok(rx)
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
