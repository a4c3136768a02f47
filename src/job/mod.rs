//! The job file: TOML → `RawJob` (serde, as written, in `raw`) → `Job` (validated, paths
//! resolved, secrets refused). Nothing downstream reads the TOML again. Each part of the file
//! is checked in its own module: `messages`, `model`, `run` (with `[batch]`) and `output`;
//! `Job::from_raw` runs them in the order their errors are reported.

mod messages;
mod model;
mod output;
mod raw;
mod run;
pub mod stamp;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chat::{Mode, Params};
use crate::cost::Pricing;
use crate::error::Error;
use crate::shape::OutputShape;
pub use messages::{MessageSource, MessageSpec};
pub use model::ProviderKind;
pub use model::{CacheKey, Served};
// Only the embedded model refuses images with it.
#[cfg(feature = "local")]
pub use model::TEXT_ONLY_MODEL;
pub use raw::{RawInput, RawJob};
pub use run::{BatchLimits, Limits};

/// The completion tokens a request is assumed to use where no cap is set (the dry run's
/// bound; the worst case of an unconfirmed attempt). A budget requires a real cap.
pub const ASSUMED_MAX_OUTPUT: u64 = 4096;

/// The rows the HTML report's table holds by default, besides every failed row.
pub const DEFAULT_REPORT_ROWS: usize = 1000;
/// Failed rows the report's table holds past its first rows (a run where everything fails
/// would otherwise make a page as large as its output).
pub const DEFAULT_REPORT_FAILED_ROWS: usize = 1000;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
/// The input file's format.
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    Csv,
    Jsonl,
    /// A file, a folder of part files, or a glob of them, read row group by row group.
    Parquet,
}

/// A validated job: every path resolved, every default applied.
#[derive(Debug, Clone)]
pub struct Job {
    pub file: PathBuf,
    pub input: PathBuf,
    pub input_format: InputFormat,
    pub id_column: Option<String>,
    /// Parquet: the columns to read, when the job names them (`[input] columns`).
    pub input_columns: Option<Vec<String>>,
    pub messages: Vec<MessageSpec>,
    pub template_dirs: Vec<PathBuf>,
    /// Who answers: `[model]`'s provider, model and endpoint.
    pub served: Served,
    pub params: Params,
    /// `[run]`'s limits: concurrency, rates, retries, timeouts, budget.
    pub limits: Limits,
    pub output: PathBuf,
    pub csv: Option<PathBuf>,
    /// `[output] parquet`: the records as a typed table.
    pub parquet: Option<PathBuf>,
    /// Quote CSV cells that a spreadsheet would run as a formula (CSV injection).
    pub csv_escape_formulas: bool,
    /// Write the HTML report after each run.
    pub report: bool,
    /// The report table's first rows (failed rows past them are added, up to
    /// `report_failed_rows`).
    pub report_rows: usize,
    pub report_failed_rows: usize,
    pub pricing: Option<Pricing>,
    pub mode: Mode,
    pub batch: BatchLimits,
    /// This run's shard of the input, if the job is split (`--shard K/N`).
    pub shard: Option<crate::shard::Shard>,
    /// What a completion must look like: schema, checks, and how often to ask again.
    pub shape: OutputShape,
    /// The output's object-store side, when `[output] path` is a URL: `output`, `csv` and
    /// `parquet` are then its local mirror's paths.
    pub remote: Option<crate::store::session::RemoteOutput>,
}

/// Command-line values that override the job file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub input: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub concurrency: Option<usize>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_cost_usd: Option<f64>,
    pub mode: Option<Mode>,
    pub shard: Option<crate::shard::Shard>,
}

impl Job {
    /// A message template's text as the template folders hold it (the first folder that has
    /// it, as Tera registered them); `None` when no folder does.
    pub fn template_source(&self, name: &str) -> Option<Vec<u8>> {
        self.template_dirs
            .iter()
            .find_map(|d| std::fs::read(d.join(name)).ok())
    }

    pub fn load(path: &Path, overrides: &Overrides) -> Result<Job, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let raw: RawJob = toml::from_str(&text).map_err(|e| toml_error(path, &text, e))?;
        Job::from_raw(path, raw, overrides)
    }

    fn from_raw(path: &Path, raw: RawJob, ov: &Overrides) -> Result<Job, Error> {
        let jf = JobFile::new(path);
        model::refuse_api_key(&jf, &raw.model)?;
        let (input, input_format) = input(&jf, &raw.input, ov)?;
        let raw_templates: Vec<String> = raw
            .messages
            .iter()
            .filter_map(|m| m.template.clone())
            .collect();
        let messages = messages::specs(&jf, raw.messages)?;
        let mut template_dirs = messages::store_template_dirs(&jf, &raw_templates)?;
        template_dirs.extend(messages::template_dirs(&jf.dir));
        let served = model::served(&jf, &raw.model)?;
        let shape = output::shape(&jf, &raw.output)?;
        let params = model::params(&jf, &raw.model, output::response_format(&shape))?;
        let limits = run::limits(&jf, &raw.run, ov, &params)?;
        let output::Paths {
            output,
            csv,
            parquet,
            remote,
        } = output::paths(&jf, &raw.output, ov)?;
        model::refuse_what_local_cannot_do(&jf, served.provider, &messages, &params)?;
        model::refuse_what_anthropic_cannot_do(&jf, served.provider, &params)?;
        model::refuse_what_gemini_cannot_do(&jf, served.provider, &params)?;
        let mode = run::mode(&jf, &raw.run, ov, served.provider)?;
        if mode == Mode::Batch && served.provider == ProviderKind::Anthropic && params.choices() > 1
        {
            // A batch line is one request, and Claude answers one choice a request.
            return Err(jf.bad(
                "model.n",
                "n > 1 with Claude is n requests a row, which runs online; a Message Batch \
                 holds one request a row (leave n out, or run with --mode online)"
                    .into(),
            ));
        }
        let batch = run::batch_limits(&jf, &raw.batch, served.provider)?;
        if mode == Mode::Batch && remote.is_some() {
            // The batch log (what was created, before it was sent) would have to reach the
            // store before each create; it lives on local disk only.
            return Err(jf.bad(
                "output.path",
                "batch mode keeps its batch log beside the output on local disk: run it with \
                 a local output (or with --mode online)"
                    .into(),
            ));
        }
        Ok(Job {
            file: path.to_path_buf(),
            input,
            input_format,
            id_column: raw.input.id,
            input_columns: raw.input.columns,
            messages,
            template_dirs,
            served,
            params,
            limits,
            output,
            csv,
            parquet,
            csv_escape_formulas: raw.output.csv_escape_formulas.unwrap_or(false),
            report: raw.output.report.unwrap_or(true),
            report_rows: raw.output.report_rows.unwrap_or(DEFAULT_REPORT_ROWS),
            report_failed_rows: raw
                .output
                .report_failed_rows
                .unwrap_or(DEFAULT_REPORT_FAILED_ROWS),
            pricing: raw.pricing,
            mode,
            batch,
            shard: ov.shard,
            shape,
            remote,
        })
    }
}

/// The input file (the command line's, else the job's) and its format: as written, else
/// told by the extension.
fn input(jf: &JobFile, raw: &RawInput, ov: &Overrides) -> Result<(PathBuf, InputFormat), Error> {
    let input = match &ov.input {
        Some(p) => match p.to_str().filter(|s| crate::store::is_url(s)) {
            Some(s) => jf.fetch("input.path", s, true)?,
            None => p.clone(),
        },
        None => jf.resolve_input(&raw.path)?,
    };
    let format = match raw.format {
        Some(f) => f,
        None => match input.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => InputFormat::Csv,
            Some(e) if e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("ndjson") => {
                InputFormat::Jsonl
            }
            Some(e) if e.eq_ignore_ascii_case("parquet") || e.eq_ignore_ascii_case("pq") => {
                InputFormat::Parquet
            }
            // A folder of part files (a Spark or Hugging Face export).
            _ if input.is_dir() => InputFormat::Parquet,
            _ => {
                return Err(jf.bad(
                    "input.format",
                    format!(
                        "cannot tell the format of {} from its extension; set format = \"csv\", \"jsonl\" or \"parquet\"",
                        input.display()
                    ),
                ))
            }
        },
    };
    Ok((input, format))
}

/// The job file being checked: its path, which every error names, and its folder, which
/// relative paths are resolved against.
struct JobFile<'a> {
    path: &'a Path,
    dir: PathBuf,
}

impl JobFile<'_> {
    fn new(path: &Path) -> JobFile<'_> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        JobFile { path, dir }
    }

    /// The error for `field` of this job.
    fn bad(&self, field: &str, message: String) -> Error {
        Error::Job {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            message,
        }
    }

    /// A path as written in the job: relative to the job's folder (tidied), `-` kept as is,
    /// an object-store URL kept as written (`file://` becomes its path).
    fn resolve(&self, p: &str) -> PathBuf {
        if p == "-" {
            return PathBuf::from("-");
        }
        if crate::store::is_url(p) {
            return match p.strip_prefix("file://") {
                Some(path) => PathBuf::from(path),
                None => PathBuf::from(p),
            };
        }
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            tidy(&self.dir.join(p))
        }
    }
}

impl JobFile<'_> {
    /// A file the job reads: a local path, or an object fetched to the working folder.
    fn resolve_read(&self, field: &str, p: &str) -> Result<PathBuf, Error> {
        match crate::store::is_url(p) && !p.starts_with("file://") {
            true => self.fetch(field, p, false),
            false => Ok(self.resolve(p)),
        }
    }

    /// The input: a file, or on a store an object, a folder (`…/`) or a glob of part files.
    fn resolve_input(&self, p: &str) -> Result<PathBuf, Error> {
        match crate::store::is_url(p) && !p.starts_with("file://") {
            true => self.fetch("input.path", p, true),
            false => Ok(self.resolve(p)),
        }
    }

    fn fetch(&self, field: &str, url: &str, many: bool) -> Result<PathBuf, Error> {
        let several = many && (url.ends_with('/') || url.contains(['*', '?', '[']));
        let got = if several {
            crate::store::stage::fetch_many(url)
        } else {
            crate::store::stage::fetch(url)
        };
        got.map_err(|e| self.bad(field, e.to_string()))
    }
}

/// `jobs/../out/x.jsonl` → `out/x.jsonl`, lexically, so messages show the path a user would write.
fn tidy(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir if !out.is_empty() => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

fn expand_home(p: &str) -> Option<PathBuf> {
    let rest = p.strip_prefix("~/")?;
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(rest))
}

fn toml_error(path: &Path, text: &str, e: toml::de::Error) -> Error {
    let (line, column) = match e.span() {
        Some(span) => line_col(text, span.start),
        None => (0, 0),
    };
    Error::Toml {
        path: path.to_path_buf(),
        line,
        column,
        message: e.message().to_string(),
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_relative_to_the_job_are_tidied() {
        assert_eq!(
            tidy(Path::new("jobs/../out/x.jsonl")),
            PathBuf::from("out/x.jsonl")
        );
        assert_eq!(tidy(Path::new("./data.csv")), PathBuf::from("./data.csv"));
        assert_eq!(tidy(Path::new("../a/./b")), PathBuf::from("../a/b"));
        assert_eq!(tidy(Path::new("a/..")), PathBuf::from("."));
    }

    pub(super) fn job(model: &str, run: &str) -> Result<Job, Error> {
        let text = format!(
            "[input]\npath = \"d.csv\"\n[[messages]]\nrole = \"user\"\ncontent = \"x\"\n\
             [model]\n{model}\n[run]\n{run}\n[output]\npath = \"o.jsonl\"\n"
        );
        let raw: RawJob = toml::from_str(&text).unwrap();
        Job::from_raw(Path::new("jobs/j.toml"), raw, &Overrides::default())
    }
    pub(super) fn field_of(e: Error) -> String {
        match e {
            Error::Job { field, .. } => field,
            e => panic!("not a job error: {e}"),
        }
    }

    pub(super) fn with_messages(messages: &str, model: &str) -> Result<Job, Error> {
        let text = format!(
            "[input]\npath = \"d.csv\"\n{messages}\n[model]\n{model}\n[output]\npath = \"o.jsonl\"\n"
        );
        let raw: RawJob = toml::from_str(&text).unwrap();
        Job::from_raw(Path::new("jobs/j.toml"), raw, &Overrides::default())
    }
}
