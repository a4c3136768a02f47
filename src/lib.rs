//! promptmill turns rows of data into LLM completions at scale.
//!
//! The modules, from the bottom up: each uses only those below it (`modgraph.py` checks).
//! One row's path: `input` → `render` → `request` → `plan` → `exec` (dispatch → send) →
//! `ledger` (the writer appends its record) → `output`.
//!
//! ```text
//! app        the commands, wired from the CLI: run, estimate, inspect (render, validate),
//!            outputs (merge, status, export, report); logging, runtime, signals; the one
//!            place an error becomes a message and an exit code
//! cli        the command line (clap)
//! exec       the run: open (lock, --fresh, repair, index) → dispatch (budget, concurrency,
//!            pacing) → send (retries, circuit breaker, re-asking; several: n choices as n
//!            requests where the API has no `n`) → writer (the one task that
//!            appends) → finish (compaction, CSV, summary, exit code); pace, retry, signals,
//!            budget, breaker, records
//!   batch    the batch executor over the same plan and writer, speaking the `api` trait:
//!            openai, anthropic, gemini (each vendor's endpoints), http (what they share),
//!            vendor (which one a job uses), lines, pass (the log's use), submit, results,
//!            state (the step log), export
//! plan       per row: done, copy, send, input error, another shard's
//! output     what is made from records: csv, parquet, merge, html (the report: tally,
//!            table, page, svg charts, text)
//! report     the progress line and the end-of-run summary
//! request    one row → its chat request, its wire body and its fingerprint
//! render     Tera, loaded once → the row's chat messages
//! content    a row field's own messages array (`from`), image files and URLs → parts
//! backend    the one assembler: a job → provider, token counter, wire, price, identity
//! input      rows: CSV | JSONL | Parquet, streamed on a thread → Row { number, id, fields } or
//!            RowError
//! job        the job file: raw (serde) → validated Job through messages, model, run, output
//!            (paths, params, limits; keys refused); stamp
//! ledger     the output's files: journal (append, repair, lock), record, index (done by
//!            request), compact, spend, stamp, files (every companion path; atomic replace)
//! shape      what a completion must look like: schema, checks, judging
//! shard      which shard owns a row
//! store      object-store URLs: fetched inputs, an output mirrored locally and checkpointed
//!            to the store in pieces, the conditional-put lock
//! provider   the contract (Provider, Wire, Request, Completion, ErrorKind, ProviderError,
//!            RateLimits); openai (HTTP, plain or streamed), anthropic (Claude's Messages
//!            API, plain or streamed), gemini (Google's generateContent, plain or SSE),
//!            endpoint (URLs, keys, CAs),
//!            local (llama.cpp, in process), grammar (JSON Schema → GBNF)
//! cost       prices × usage → USD
//! tokens     prompt tokens with the model's tiktoken encoding; the TokenCounter trait
//! models     the local models: catalogue, download, checksum, cache
//! chat       the request's vocabulary: Message, Content, Params, Stop, Mode, ServiceTier,
//!            Usage; imports nothing of the crate
//! error      errors and exit codes
//! fingerprint  hex and the fingerprint's bytes
//! ```

// A failed attempt carries the server's rate-limit headers by value; failures are the rare path,
// so their size does not matter and boxing would only add noise.
#![allow(clippy::result_large_err)]

pub mod app;
pub(crate) mod backend;
pub mod chat;
pub mod cli;
pub(crate) mod content;
pub(crate) mod cost;
pub(crate) mod error;
pub(crate) mod exec;
pub(crate) mod fingerprint;
pub(crate) mod input;
pub(crate) mod job;
pub(crate) mod ledger;
pub mod models;
pub(crate) mod output;
pub(crate) mod plan;
pub mod provider;
pub(crate) mod render;
pub(crate) mod report;
pub(crate) mod request;
pub(crate) mod shape;
pub(crate) mod shard;
pub(crate) mod store;
pub(crate) mod tokens;
