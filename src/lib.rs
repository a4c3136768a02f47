//! promptmill turns rows of data into LLM completions at scale.
//!
//! One row's path, module by module:
//!
//! ```text
//! job       jobs/NAME.toml → validated Job (paths, params, limits; keys refused)
//! input     CSV | JSONL, streamed on a thread → Row { number, id, fields } or RowError
//! render    Tera, loaded once → the row's chat messages
//!   content   a row field's own messages array (`from`), image files and URLs → parts
//! schedule  fingerprint → skip if done (journal) → budget → concurrency → pace → provider
//!   pace      RPM/TPM spacing, learned from x-ratelimit-* headers, slowed by 429s
//!   retry     which failures retry, and when (backoff with jitter, retry-after)
//!   provider  openai (HTTP, plain or streamed) | local (llama.cpp, in process; a schema
//!             becomes a grammar the model writes within)
//!   tokens    prompt tokens with the model's tiktoken encoding
//!   cost      price table × usage
//!   batch     or, in batch mode: rows → Batch API files → batches → results by custom_id
//! journal   the JSONL output: appended per row, repaired, resumed, compacted into row order
//! output    the record
//! export    the CSV export: the JSONL output → one CSV line per record
//! report    progress and the summary
//! report_html  the HTML report: an output file → one self-contained page
//! app       the commands, wired from the CLI
//! ```

// A failed attempt carries the server's rate-limit headers by value; failures are the rare path,
// so their size does not matter and boxing would only add noise.
#![allow(clippy::result_large_err)]

pub mod app;
pub mod batch;
pub mod chat;
pub mod cli;
pub mod content;
pub mod cost;
pub mod error;
pub mod export;
pub mod input;
pub mod job;
pub mod journal;
pub mod ledger;
pub mod models;
pub mod output;
pub mod pace;
pub mod plan;
pub mod provider;
pub mod render;
pub mod report;
pub mod report_html;
pub mod request;
pub mod retry;
pub mod schedule;
pub mod shape;
pub mod shard;
pub mod tokens;
