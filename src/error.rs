//! Errors the user sees: each variant's text, its hint and its exit code, in one place.

use std::path::PathBuf;

/// Exit codes: 0 all rows ok, 1 some rows failed, 2 the job could not run or was stopped,
/// 130 interrupted by Ctrl-C, 143 by SIGTERM.
pub const EXIT_OK: i32 = 0;
pub const EXIT_ROWS_FAILED: i32 = 1;
pub const EXIT_STOPPED: i32 = 2;
pub const EXIT_INTERRUPTED: i32 = 130;
/// Stopped by SIGTERM (128 + 15, as shells report it).
pub const EXIT_TERMINATED: i32 = 143;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Toml {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: `{field}`: {message}", path.display())]
    Job {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },
    #[error("the API key variable {var} is not set (in the environment or in .env)")]
    MissingKey { var: String },
    #[error("another promptmill run holds {} (started {since}); refusing to run twice on the same output", path.display())]
    Locked { path: PathBuf, since: String },
    #[error("model {}: {message}", path.display())]
    Model { path: PathBuf, message: String },
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// What to do about it, printed under the error.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::MissingKey { var } => Some(format!(
                "export {var}=... or put `{var}=...` in a .env file in the working folder; \
                 or point `[model] api_key_env` at another variable"
            )),
            Error::Locked { .. } => Some(
                "wait for the other run to finish; if no run is alive, the lock is stale and \
                 the next run takes it over"
                    .into(),
            ),
            Error::Model { .. } => Some(
                "run `promptmill fetch-model` to download the default model, or set \
                 `[model] path` to a .gguf file"
                    .into(),
            ),
            _ => None,
        }
    }

    pub fn exit_code(&self) -> i32 {
        EXIT_STOPPED
    }
}
