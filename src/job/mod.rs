//! The job file: TOML → `RawJob` (serde, as written) → `Job` (validated, paths resolved,
//! secrets refused). Nothing downstream reads the TOML again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::chat::{Params, Role, Stop};
use crate::error::Error;
pub use crate::input::InputFormat;

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The completion tokens a request is assumed to use where no cap is set (the dry run's
/// bound; the worst case of an unconfirmed attempt). A budget requires a real cap.
pub const ASSUMED_MAX_OUTPUT: u64 = 4096;

/// The rows the HTML report's table holds by default, besides every failed row.
pub const DEFAULT_REPORT_ROWS: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub input: RawInput,
    #[serde(default)]
    pub messages: Vec<RawMessage>,
    pub model: RawModel,
    #[serde(default)]
    pub run: RawRun,
    pub output: RawOutput,
    #[serde(default)]
    pub pricing: Option<Pricing>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    pub path: String,
    pub format: Option<InputFormat>,
    pub id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMessage {
    pub role: Role,
    pub name: Option<String>,
    pub template: Option<String>,
    pub content: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Openai,
    Local,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    #[serde(default)]
    pub provider: ProviderKind,
    pub name: Option<String>,
    /// The GGUF file for `provider = "local"`.
    pub path: Option<String>,
    /// Local model context per sequence, in tokens.
    pub context_tokens: Option<u32>,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    /// Present only to be refused with a clear message: keys never live in job files.
    pub api_key: Option<toml::Value>,
    // The request fields are listed here rather than flattened from `Params`, because serde
    // cannot deny unknown keys through a flatten, and a typo like `temprature` must not pass.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    pub stream: Option<bool>,
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl RawModel {
    fn params(&self) -> Params {
        Params {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_tokens,
            max_completion_tokens: self.max_completion_tokens,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            stop: self.stop.clone(),
            seed: self.seed,
            user: self.user.clone(),
            stream: self.stream,
            extra: self.extra.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRun {
    pub concurrency: Option<usize>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_retries: Option<u32>,
    pub timeout_s: Option<f64>,
    pub max_cost_usd: Option<f64>,
    /// Seconds requests in flight get to finish after SIGTERM or Ctrl-C.
    pub shutdown_grace_s: Option<f64>,
    /// Seconds without one successful request, every attempt failing transiently, before
    /// the job stops as an outage (an unreachable endpoint stops it sooner).
    pub outage_s: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub path: String,
    pub csv: Option<String>,
    pub csv_escape_formulas: Option<bool>,
    /// Write `OUTPUT.report.html` after each run (default true).
    pub report: Option<bool>,
    /// Rows the report's table holds besides every failed row (default 1,000).
    pub report_rows: Option<usize>,
}

/// USD per 1M tokens.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    pub input: f64,
    pub cached_input: Option<f64>,
    pub output: f64,
}

/// Where a message's text comes from.
#[derive(Debug, Clone)]
pub enum MessageSource {
    /// A template file's name as registered in Tera (its path under a template folder).
    Template(String),
    Inline(String),
}

#[derive(Debug, Clone)]
pub struct MessageSpec {
    pub role: Role,
    pub name: Option<String>,
    pub source: MessageSource,
}

/// A validated job: every path resolved, every default applied.
#[derive(Debug, Clone)]
pub struct Job {
    pub file: PathBuf,
    pub input: PathBuf,
    pub input_format: InputFormat,
    pub id_column: Option<String>,
    pub messages: Vec<MessageSpec>,
    pub template_dirs: Vec<PathBuf>,
    pub provider: ProviderKind,
    pub model: String,
    pub model_path: Option<PathBuf>,
    pub context_tokens: Option<u32>,
    pub base_url: String,
    pub api_key_env: String,
    pub params: Params,
    pub concurrency: usize,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_retries: u32,
    pub timeout: Duration,
    pub max_cost_usd: Option<f64>,
    pub shutdown_grace: Duration,
    pub outage: Duration,
    pub output: PathBuf,
    pub csv: Option<PathBuf>,
    /// Quote CSV cells that a spreadsheet would run as a formula (CSV injection).
    pub csv_escape_formulas: bool,
    /// Write the HTML report after each run.
    pub report: bool,
    /// The report table's first rows (every failed row is added).
    pub report_rows: usize,
    pub pricing: Option<Pricing>,
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
}

impl Job {
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Job, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let raw: RawJob = toml::from_str(&text).map_err(|e| toml_error(path, &text, e))?;
        Job::from_raw(path, raw, overrides)
    }

    fn from_raw(path: &Path, raw: RawJob, ov: &Overrides) -> Result<Job, Error> {
        let bad = |field: &str, msg: String| Error::Job {
            path: path.to_path_buf(),
            field: field.to_string(),
            message: msg,
        };
        if raw.model.api_key.is_some() {
            return Err(bad(
                "model.api_key",
                "API keys are not accepted in job files; put the key in the environment or in .env \
                 and name the variable with `api_key_env`"
                    .into(),
            ));
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let resolve = |p: &str| -> PathBuf {
            if p == "-" {
                return PathBuf::from("-");
            }
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                tidy(&dir.join(p))
            }
        };

        let input = ov.input.clone().unwrap_or_else(|| resolve(&raw.input.path));
        let input_format = match raw.input.format {
            Some(f) => f,
            None => match input.extension().and_then(|e| e.to_str()) {
                Some(e) if e.eq_ignore_ascii_case("csv") => InputFormat::Csv,
                Some(e) if e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("ndjson") => {
                    InputFormat::Jsonl
                }
                _ => {
                    return Err(bad(
                        "input.format",
                        format!(
                            "cannot tell the format of {} from its extension; set format = \"csv\" or \"jsonl\"",
                            input.display()
                        ),
                    ))
                }
            },
        };

        if raw.messages.is_empty() {
            return Err(bad("messages", "the job has no [[messages]]".into()));
        }
        let mut messages = Vec::with_capacity(raw.messages.len());
        for (i, m) in raw.messages.into_iter().enumerate() {
            let field = format!("messages[{i}]");
            let source = match (m.template, m.content) {
                (Some(t), None) => {
                    let tp = Path::new(&t);
                    if tp.is_absolute()
                        || tp
                            .components()
                            .any(|c| c == std::path::Component::ParentDir)
                    {
                        return Err(bad(
                            &format!("{field}.template"),
                            format!(
                                "template `{t}` must be a relative path inside a template folder"
                            ),
                        ));
                    }
                    MessageSource::Template(t.replace('\\', "/"))
                }
                (None, Some(c)) => MessageSource::Inline(c),
                (Some(_), Some(_)) => {
                    return Err(bad(
                        &field,
                        "give either `template` or `content`, not both".into(),
                    ))
                }
                (None, None) => return Err(bad(&field, "needs `template` or `content`".into())),
            };
            if let Some(name) = &m.name {
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !ok {
                    return Err(bad(
                        &format!("{field}.name"),
                        "a message name is 1 to 64 letters, digits, `_` or `-`".into(),
                    ));
                }
            }
            messages.push(MessageSpec {
                role: m.role,
                name: m.name,
                source,
            });
        }

        // Template folders: the job's own, then the project's (beside jobs/, then the working folder).
        let mut template_dirs: Vec<PathBuf> = Vec::new();
        for cand in [
            dir.join("templates"),
            dir.join("..").join("templates"),
            PathBuf::from("templates"),
        ] {
            if cand.is_dir() {
                let canon = cand.canonicalize().unwrap_or(cand);
                if !template_dirs.contains(&canon) {
                    template_dirs.push(canon);
                }
            }
        }

        let model = raw.model;
        let (model_name, model_path) = match model.provider {
            ProviderKind::Openai => {
                let name = model
                    .name
                    .clone()
                    .ok_or_else(|| bad("model.name", "the model name is required".into()))?;
                (name, None)
            }
            ProviderKind::Local => {
                // No path: the default model, which `provider::build` finds in the cache.
                let p = model
                    .path
                    .as_deref()
                    .map(|p| expand_home(p).unwrap_or_else(|| resolve(p)));
                let name = model.name.clone().unwrap_or_else(|| {
                    p.as_deref()
                        .and_then(Path::file_stem)
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
                (name, p)
            }
        };
        let base_url = model
            .base_url
            .clone()
            .or_else(|| {
                std::env::var("OPENAI_BASE_URL")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        let base_url = base_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(bad(
                "model.base_url",
                format!("`{base_url}` is not an http(s) URL"),
            ));
        }
        let api_key_env = model
            .api_key_env
            .clone()
            .unwrap_or_else(|| "OPENAI_API_KEY".into());
        let params = model.params();
        let p = &params;
        check_range(path, "model.temperature", p.temperature, 0.0, 2.0)?;
        check_range(path, "model.top_p", p.top_p, 0.0, 1.0)?;
        check_range(
            path,
            "model.presence_penalty",
            p.presence_penalty,
            -2.0,
            2.0,
        )?;
        check_range(
            path,
            "model.frequency_penalty",
            p.frequency_penalty,
            -2.0,
            2.0,
        )?;
        if p.max_tokens == Some(0) || p.max_completion_tokens == Some(0) {
            return Err(bad("model.max_tokens", "must be at least 1".into()));
        }
        // What the job sets through its own keys is not overridden from `extra`: the request
        // must be what the job says, and its fingerprint must mean what it covers.
        for (reserved, owner) in RESERVED_EXTRA {
            if p.extra.contains_key(*reserved) {
                return Err(bad(&format!("model.extra.{reserved}"), owner.to_string()));
            }
        }
        refuse_secret_values(
            path,
            "model.extra",
            &serde_json::Value::Object(p.extra.clone()),
        )?;

        let run = raw.run;
        let concurrency = ov.concurrency.or(run.concurrency).unwrap_or(8);
        if concurrency == 0 {
            return Err(bad("run.concurrency", "must be at least 1".into()));
        }
        let rpm = ov.rpm.or(run.rpm).filter(|&v| v > 0);
        let tpm = ov.tpm.or(run.tpm).filter(|&v| v > 0);
        let timeout_s = run.timeout_s.unwrap_or(120.0);
        if !(timeout_s > 0.0 && timeout_s.is_finite()) {
            return Err(bad(
                "run.timeout_s",
                "must be a positive number of seconds".into(),
            ));
        }
        let max_cost_usd = ov.max_cost_usd.or(run.max_cost_usd);
        if let Some(c) = max_cost_usd {
            if !(c >= 0.0 && c.is_finite()) {
                return Err(bad(
                    "run.max_cost_usd",
                    "must be a non-negative number".into(),
                ));
            }
        }
        if max_cost_usd.is_some() && params.max_output_tokens().is_none() {
            return Err(bad(
                "run.max_cost_usd",
                "a budget needs a completion cap: set [model] max_tokens (or \
                 max_completion_tokens), since without one a request's cost has no upper bound \
                 (reasoning models can write tens of thousands of tokens)"
                    .into(),
            ));
        }
        let seconds = |field: &str, v: Option<f64>, default: f64| -> Result<Duration, Error> {
            let v = v.unwrap_or(default);
            if !(v >= 0.0 && v.is_finite()) {
                return Err(bad(
                    field,
                    "must be a non-negative number of seconds".into(),
                ));
            }
            Ok(Duration::from_secs_f64(v))
        };
        let shutdown_grace = seconds("run.shutdown_grace_s", run.shutdown_grace_s, 25.0)?;
        let outage = seconds("run.outage_s", run.outage_s, 60.0)?;
        let output = ov
            .output
            .clone()
            .unwrap_or_else(|| resolve(&raw.output.path));
        let csv = raw.output.csv.as_deref().map(resolve);
        Ok(Job {
            file: path.to_path_buf(),
            input,
            input_format,
            id_column: raw.input.id,
            messages,
            template_dirs,
            provider: model.provider,
            model: model_name,
            model_path,
            context_tokens: model.context_tokens,
            base_url,
            api_key_env,
            params,
            concurrency,
            rpm,
            tpm,
            max_retries: run.max_retries.unwrap_or(6),
            timeout: Duration::from_secs_f64(timeout_s),
            max_cost_usd,
            shutdown_grace,
            outage,
            output,
            csv,
            csv_escape_formulas: raw.output.csv_escape_formulas.unwrap_or(false),
            report: raw.output.report.unwrap_or(true),
            report_rows: raw.output.report_rows.unwrap_or(DEFAULT_REPORT_ROWS),
            pricing: raw.pricing,
        })
    }

    /// The job's input, ready to stream.
    pub fn source(&self) -> crate::input::Source {
        crate::input::Source {
            path: self.input.clone(),
            format: self.input_format,
            id_column: self.id_column.clone(),
        }
    }

    /// `OUTPUT.summary.json`, beside the JSONL output.
    pub fn summary_path(&self) -> PathBuf {
        sibling(&self.output, ".summary.json")
    }

    pub fn lock_path(&self) -> PathBuf {
        sibling(&self.output, ".lock")
    }

    /// `OUTPUT.report.html`, beside the JSONL output.
    pub fn report_path(&self) -> PathBuf {
        report_path(&self.output)
    }

    fn companion(&self, kind: &str) -> PathBuf {
        companion(&self.output, kind)
    }

    /// Records of rows that left the input: paid for, so never deleted.
    pub fn stale_path(&self) -> PathBuf {
        self.companion("stale")
    }

    /// What `--fresh` moved out of the way.
    pub fn prev_path(&self) -> PathBuf {
        self.companion("prev")
    }

    /// Lines of the output that were not records.
    pub fn rejected_path(&self) -> PathBuf {
        self.companion("rejected").with_extension("txt")
    }

    /// Unconfirmed spend of rows that ended with no record, carried across runs.
    pub fn spend_path(&self) -> PathBuf {
        sibling(&self.output, ".spend.json")
    }

    /// The run's plan spool (temporary).
    pub fn plan_path(&self) -> PathBuf {
        sibling(&self.output, ".plan")
    }
}

/// `extra` keys the job owns, each with where to set it instead.
const RESERVED_EXTRA: &[(&str, &str)] = &[
    ("model", "set by [model] name"),
    ("messages", "set by [[messages]]"),
    ("stream", "set by [model] stream"),
    (
        "stream_options",
        "set by promptmill when [model] stream = true",
    ),
    (
        "n",
        "promptmill keeps one choice per row; variants are not supported yet",
    ),
    ("temperature", "set by [model] temperature"),
    ("top_p", "set by [model] top_p"),
    ("max_tokens", "set by [model] max_tokens"),
    (
        "max_completion_tokens",
        "set by [model] max_completion_tokens",
    ),
    ("presence_penalty", "set by [model] presence_penalty"),
    ("frequency_penalty", "set by [model] frequency_penalty"),
    ("stop", "set by [model] stop"),
    ("seed", "set by [model] seed"),
    ("user", "set by [model] user"),
];

/// `out/x.jsonl` → `out/x.KIND.jsonl`: the output's companions that hold records.
pub fn companion(output: &Path, kind: &str) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.clone(), String::new()),
    };
    output.with_file_name(format!("{stem}.{kind}{ext}"))
}

/// `out/x.jsonl` → `out/x.jsonl.report.html`, for a job's output or any output file.
pub fn report_path(output: &Path) -> PathBuf {
    sibling(output, ".report.html")
}

/// `out/x.jsonl` + `.lock` → `out/x.jsonl.lock`.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
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

fn check_range(path: &Path, field: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), Error> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(Error::Job {
            path: path.to_path_buf(),
            field: field.into(),
            message: format!("{x} is outside {lo}..={hi}"),
        }),
        _ => Ok(()),
    }
}

/// A value that looks like an OpenAI key in the job file is refused (and never echoed).
fn refuse_secret_values(path: &Path, field: &str, v: &serde_json::Value) -> Result<(), Error> {
    match v {
        serde_json::Value::String(s) if s.starts_with("sk-") && s.len() > 20 => Err(Error::Job {
            path: path.to_path_buf(),
            field: field.into(),
            message: "looks like an API key; keys are not accepted in job files (use api_key_env)"
                .into(),
        }),
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                refuse_secret_values(path, &format!("{field}.{k}"), v)?;
            }
            Ok(())
        }
        serde_json::Value::Array(a) => a
            .iter()
            .try_for_each(|v| refuse_secret_values(path, field, v)),
        _ => Ok(()),
    }
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
}
