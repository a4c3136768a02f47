//! promptmill's integration tests: the real binary against the fake OpenAI server on 127.0.0.1.
//! One test binary (as ripgrep's), so llama.cpp is linked once: a module per feature, beside
//! this file. `cargo test --release --test tests ledger::` runs one module.

mod util;

mod anthropic;
mod anthropic_batch;
mod auth;
mod batch;
mod budget;
mod cli;
mod completions;
mod content;
mod csv_export;
mod dry_run;
mod end_to_end;
mod fetch_model;
mod gemini;
mod index;
mod input;
mod jobs_validate;
mod ledger;
// The embedded model, for real: the default model must have been fetched first.
#[cfg(feature = "local")]
mod local_model;
mod logs;
mod network;
mod object_store;
mod pacing;
mod parquet;
mod quiet_paths;
mod report;
mod resume;
mod retry;
mod shards;
mod signals;
mod streaming;
mod structured;
