//! The job file: TOML → `RawJob` (serde, as written) → `Job` (validated, paths resolved,
//! secrets refused). Nothing downstream reads the TOML again.

pub mod stamp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::chat::{Detail, Mode, Params, Role, ServiceTier, Stop};
use crate::cost::Pricing;
use crate::error::Error;
pub use crate::provider::endpoint::Auth;
use crate::shape::{Checks, OutputShape};

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The completion tokens a request is assumed to use where no cap is set (the dry run's
/// bound; the worst case of an unconfirmed attempt). A budget requires a real cap.
pub const ASSUMED_MAX_OUTPUT: u64 = 4096;

/// The longest `timeout_s` and `outage_s` a job may set: a day. Longer is a typo, and a
/// duration past what the clock can hold would panic.
pub const MAX_TIMEOUT_S: f64 = 86_400.0;

/// The longest `shutdown_grace_s` and `batch.poll_s`: an hour.
pub const MAX_GRACE_S: f64 = 3_600.0;

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
    #[serde(default)]
    pub batch: RawBatch,
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
    /// Required, except with `from` (the data gives each message's role).
    pub role: Option<Role>,
    pub name: Option<String>,
    pub template: Option<String>,
    pub content: Option<String>,
    /// A row field holding a whole messages array, inserted at this point.
    pub from: Option<String>,
    /// Inline Tera templates, each rendering to an https URL or an image file's path.
    pub images: Option<Vec<String>>,
    pub image_detail: Option<Detail>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Openai,
    Local,
}

/// `[model] provider` as written. Azure OpenAI is the OpenAI HTTP provider on Azure's URL
/// layout, so a validated `Job` knows it as `ProviderKind::Openai` with a `deployment`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawProvider {
    #[default]
    Openai,
    Azure,
    Local,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    #[serde(default)]
    pub provider: RawProvider,
    pub name: Option<String>,
    /// The GGUF file for `provider = "local"`.
    pub path: Option<String>,
    /// Local model context per sequence, in tokens.
    pub context_tokens: Option<u32>,
    /// Local model: may a row reuse the KV cells of a prompt prefix already decoded (default
    /// true, as llama.cpp's server's `cache_prompt`).
    pub cache_prompt: Option<bool>,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    /// Azure OpenAI: the deployment that answers (`provider = "azure"` only).
    pub deployment: Option<String>,
    /// Added as `?api-version=…` to every request URL (Azure OpenAI needs it).
    pub api_version: Option<String>,
    /// `bearer` (default) or `api-key` (default for `provider = "azure"`).
    pub auth: Option<Auth>,
    /// A PEM file of extra CA certificates to trust (a corporate or private CA).
    pub ca_file: Option<String>,
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
    /// OpenAI's processing tier: `flex` is slower and billed at batch prices.
    pub service_tier: Option<ServiceTier>,
    /// Choices per row (variants); default 1.
    pub n: Option<u32>,
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
            service_tier: self.service_tier,
            n: self.n,
            response_format: None,
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
    /// `online` (default) or `batch` (the provider's Batch API).
    pub mode: Option<Mode>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
/// The input file's format.
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    Csv,
    Jsonl,
}

/// `[batch]`: how requests are split into Batch API input files. The defaults are OpenAI's
/// limits; other providers set their own.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    pub max_requests_per_file: Option<usize>,
    pub max_bytes_per_file: Option<u64>,
    /// Seconds between status checks while `run --wait` or `batch collect --wait` waits (the
    /// first checks come sooner, backing off up to this).
    pub poll_s: Option<f64>,
}

/// Validated `[batch]`.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub max_requests_per_file: usize,
    pub max_bytes_per_file: u64,
    pub poll: Duration,
}

/// OpenAI's Batch API limits per input file.
pub const BATCH_MAX_REQUESTS: usize = 50_000;
pub const BATCH_MAX_BYTES: u64 = 200_000_000;

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
    /// A JSON Schema the completion must follow: a file (relative to the job file) or an
    /// inline table. Sent as `response_format` json_schema (strict).
    pub schema: Option<toml::Value>,
    /// The schema's name in the request (default: the file's stem, or `output`).
    pub schema_name: Option<String>,
    /// `json_object`: ask for JSON without a schema.
    pub response_format: Option<String>,
    /// Times a completion that breaks the schema or a check is asked for again (default 2).
    pub max_invalid: Option<u32>,
    pub checks: Option<Checks>,
}

/// Where a message's text comes from.
#[derive(Debug, Clone)]
pub enum MessageSource {
    /// A template file's name as registered in Tera (its path under a template folder).
    Template(String),
    Inline(String),
    /// Not one message but every message of the array this row field holds (`from`).
    Field(String),
}

#[derive(Debug, Clone)]
pub struct MessageSpec {
    /// The templated message's role; a `Field` source's messages carry their own (this is
    /// then `User` and unused).
    pub role: Role,
    pub name: Option<String>,
    pub source: MessageSource,
    /// Inline Tera templates of the message's images (https URLs or file paths).
    pub images: Vec<String>,
    pub image_detail: Option<Detail>,
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
    pub cache_prompt: bool,
    pub base_url: String,
    pub api_key_env: String,
    /// Azure OpenAI's deployment: `Some` means Azure's URL layout (`provider = "azure"`).
    pub deployment: Option<String>,
    /// The `api-version` query parameter every request carries.
    pub api_version: Option<String>,
    pub auth: Auth,
    /// Extra CA certificates (PEM) to trust, checked to hold at least one certificate.
    pub ca_file: Option<PathBuf>,
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
    pub mode: Mode,
    pub batch: BatchLimits,
    /// This run's shard of the input, if the job is split (`--shard K/N`).
    pub shard: Option<crate::shard::Shard>,
    /// What a completion must look like: schema, checks, and how often to ask again.
    pub shape: OutputShape,
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
            if let Some(from) = m.from {
                let also = [
                    ("role", m.role.is_some()),
                    ("name", m.name.is_some()),
                    ("template", m.template.is_some()),
                    ("content", m.content.is_some()),
                    ("images", m.images.is_some()),
                    ("image_detail", m.image_detail.is_some()),
                ];
                if let Some((key, _)) = also.iter().find(|(_, set)| *set) {
                    return Err(bad(
                        &format!("{field}.{key}"),
                        "a `from` message inserts the row's messages as they are: it takes no \
                         role, name, template, content or images"
                            .into(),
                    ));
                }
                if from.is_empty() {
                    return Err(bad(
                        &format!("{field}.from"),
                        "names the row field that holds the messages".into(),
                    ));
                }
                messages.push(MessageSpec {
                    role: Role::User,
                    name: None,
                    source: MessageSource::Field(from),
                    images: Vec::new(),
                    image_detail: None,
                });
                continue;
            }
            let Some(role) = m.role else {
                return Err(bad(
                    &format!("{field}.role"),
                    "needs a `role` (system, developer, user, assistant), or `from` to insert \
                     a row field's messages"
                        .into(),
                ));
            };
            let images = m.images.unwrap_or_default();
            if !images.is_empty() && role != Role::User {
                return Err(bad(
                    &format!("{field}.images"),
                    format!(
                        "images go in user messages; the API takes none in a {} message",
                        role.as_str()
                    ),
                ));
            }
            if m.image_detail.is_some() && images.is_empty() {
                return Err(bad(
                    &format!("{field}.image_detail"),
                    "sets how images are looked at, and the message has no `images`".into(),
                ));
            }
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
                // An image needs no words beside it.
                (None, None) if !images.is_empty() => MessageSource::Inline(String::new()),
                (None, None) => {
                    return Err(bad(&field, "needs `template`, `content` or `from`".into()))
                }
            };
            if let Some(name) = &m.name {
                if !crate::chat::is_name(name) {
                    return Err(bad(
                        &format!("{field}.name"),
                        "a message name is 1 to 64 letters, digits, `_` or `-`".into(),
                    ));
                }
            }
            messages.push(MessageSpec {
                role,
                name: m.name,
                source,
                images,
                image_detail: m.image_detail,
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
        let azure = model.provider == RawProvider::Azure;
        let provider = match model.provider {
            RawProvider::Openai | RawProvider::Azure => ProviderKind::Openai,
            RawProvider::Local => ProviderKind::Local,
        };
        let deployment = match (&model.deployment, azure) {
            (Some(d), true) => {
                // Azure's rule for deployment names; anything else would not be one URL segment.
                let ok = (2..=64).contains(&d.len())
                    && d.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    return Err(bad(
                        "model.deployment",
                        format!("`{d}` is not a deployment name (2 to 64 letters, digits, `-`, `_` or `.`)"),
                    ));
                }
                Some(d.clone())
            }
            (None, true) => return Err(bad(
                "model.deployment",
                "provider = \"azure\" needs the deployment's name, as the Azure portal shows it"
                    .into(),
            )),
            (Some(_), false) => {
                return Err(bad(
                    "model.deployment",
                    "a deployment is for provider = \"azure\"; for OpenAI-compatible servers the \
                     model is `name`"
                        .into(),
                ))
            }
            (None, false) => None,
        };
        let (model_name, model_path) = match model.provider {
            // Azure: the deployment decides the model; `name` tells promptmill which model
            // that is, for its price and tokenizer.
            RawProvider::Azure => (
                model
                    .name
                    .clone()
                    .unwrap_or_else(|| deployment.clone().unwrap_or_default()),
                None,
            ),
            RawProvider::Openai => {
                let name = model
                    .name
                    .clone()
                    .ok_or_else(|| bad("model.name", "the model name is required".into()))?;
                (name, None)
            }
            RawProvider::Local => {
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
        let env = |var: &str| std::env::var(var).ok().filter(|s| !s.is_empty());
        let base_url = match (&model.base_url, azure) {
            (Some(u), _) => u.clone(),
            (None, false) => env("OPENAI_BASE_URL").unwrap_or_else(|| DEFAULT_BASE_URL.to_string()),
            (None, true) => env("AZURE_OPENAI_ENDPOINT").ok_or_else(|| {
                bad(
                    "model.base_url",
                    "provider = \"azure\" needs the resource's endpoint, \
                     https://NAME.openai.azure.com (or set AZURE_OPENAI_ENDPOINT)"
                        .into(),
                )
            })?,
        };
        let base_url = base_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(bad(
                "model.base_url",
                format!("`{base_url}` is not an http(s) URL"),
            ));
        }
        if azure && (base_url.contains("/deployments/") || base_url.ends_with("/openai")) {
            return Err(bad(
                "model.base_url",
                format!(
                    "`{base_url}`: for provider = \"azure\" give the resource's endpoint \
                     (https://NAME.openai.azure.com); promptmill adds /openai/deployments/… \
                     itself from `deployment`"
                ),
            ));
        }
        if base_url.contains('?') {
            return Err(bad(
                "model.base_url",
                format!("`{base_url}` has a query; set `api_version` instead of writing ?api-version= in the URL"),
            ));
        }
        let api_key_env = model.api_key_env.clone().unwrap_or_else(|| {
            if azure {
                "AZURE_OPENAI_API_KEY".into()
            } else {
                "OPENAI_API_KEY".into()
            }
        });
        let api_version = match &model.api_version {
            Some(v) => {
                let ok = !v.is_empty()
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !ok {
                    return Err(bad(
                        "model.api_version",
                        format!("`{v}` is not an API version (like \"2024-10-21\")"),
                    ));
                }
                Some(v.clone())
            }
            None if azure => {
                return Err(bad(
                    "model.api_version",
                    "Azure OpenAI needs an api-version on every request, e.g. \
                     api_version = \"2024-10-21\" (see Azure's API version lifecycle page)"
                        .into(),
                ))
            }
            None => None,
        };
        let auth = model
            .auth
            .unwrap_or(if azure { Auth::ApiKey } else { Auth::Bearer });
        let ca_file = match &model.ca_file {
            Some(f) => {
                let p = expand_home(f).unwrap_or_else(|| resolve(f));
                crate::provider::endpoint::read_ca_file(&p).map_err(|e| bad("model.ca_file", e))?;
                Some(p)
            }
            None => None,
        };
        let mut params = model.params();
        let shape = output_shape(path, &dir, &raw.output)?;
        params.response_format = match &shape.schema {
            Some((name, schema)) => Some(serde_json::json!({
                "type": "json_schema",
                "json_schema": {"name": name, "strict": true, "schema": schema},
            })),
            None if shape.json_object => Some(serde_json::json!({"type": "json_object"})),
            None => None,
        };
        if let Some(n) = params.n {
            if !(1..=128).contains(&n) {
                return Err(bad("model.n", "must be between 1 and 128".into()));
            }
        }
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
        // Flex requests queue for capacity: OpenAI's advice is a 15-minute timeout.
        let flex = params.service_tier == Some(ServiceTier::Flex);
        let timeout_s = run.timeout_s.unwrap_or(if flex { 900.0 } else { 120.0 });
        if !(timeout_s > 0.0 && timeout_s <= MAX_TIMEOUT_S) {
            return Err(bad(
                "run.timeout_s",
                format!("must be a positive number of seconds, at most {MAX_TIMEOUT_S} (a day)"),
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
        let seconds = |field: &str, v: Option<f64>, default: f64, max: f64| {
            let v = v.unwrap_or(default);
            if !(v >= 0.0 && v <= max) {
                return Err(bad(
                    field,
                    format!("must be a non-negative number of seconds, at most {max}"),
                ));
            }
            Ok(Duration::from_secs_f64(v))
        };
        let shutdown_grace = seconds(
            "run.shutdown_grace_s",
            run.shutdown_grace_s,
            25.0,
            MAX_GRACE_S,
        )?;
        let outage = seconds("run.outage_s", run.outage_s, 60.0, MAX_TIMEOUT_S)?;
        let output = ov
            .output
            .clone()
            .unwrap_or_else(|| resolve(&raw.output.path));
        let csv = raw.output.csv.as_deref().map(resolve);
        // A shard has outputs of its own (and so its own lock, summary and batches).
        let (output, csv) = match ov.shard {
            Some(sh) => (sh.path(&output), csv.map(|c| sh.path(&c))),
            None => (output, csv),
        };
        if provider == ProviderKind::Local {
            if let Some(i) = messages.iter().position(|m| !m.images.is_empty()) {
                return Err(bad(
                    &format!("messages[{i}].images"),
                    TEXT_ONLY_MODEL.into(),
                ));
            }
            // The embedded model is held to the schema by a grammar: a schema it cannot
            // express is refused here, not left unenforced.
            if let Some(rf) = &params.response_format {
                crate::provider::grammar::for_response_format(rf).map_err(|e| {
                    bad(
                        "output.schema",
                        format!(
                            "{e} (the local model is held to the schema by a grammar; change \
                             the schema, or use an HTTP provider)"
                        ),
                    )
                })?;
            }
        }
        let mode = ov.mode.or(run.mode).unwrap_or_default();
        if mode == Mode::Batch && provider == ProviderKind::Local {
            return Err(bad(
                "run.mode",
                "batch mode sends files to an HTTP provider's Batch API; the local model runs online".into(),
            ));
        }
        let rb = raw.batch;
        let batch = BatchLimits {
            max_requests_per_file: rb.max_requests_per_file.unwrap_or(BATCH_MAX_REQUESTS),
            max_bytes_per_file: rb.max_bytes_per_file.unwrap_or(BATCH_MAX_BYTES),
            poll: seconds("batch.poll_s", rb.poll_s, 30.0, MAX_GRACE_S)?,
        };
        if batch.max_requests_per_file == 0 {
            return Err(bad(
                "batch.max_requests_per_file",
                "must be at least 1".into(),
            ));
        }
        if batch.max_bytes_per_file < 1024 {
            return Err(bad(
                "batch.max_bytes_per_file",
                "must be at least 1024".into(),
            ));
        }
        Ok(Job {
            file: path.to_path_buf(),
            input,
            input_format,
            id_column: raw.input.id,
            messages,
            template_dirs,
            provider,
            model: model_name,
            model_path,
            context_tokens: model.context_tokens,
            cache_prompt: model.cache_prompt.unwrap_or(true),
            base_url,
            api_key_env,
            deployment,
            api_version,
            auth,
            ca_file,
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
            mode,
            batch,
            shard: ov.shard,
            shape,
        })
    }
}

/// `[output]`'s schema, response format and checks, read and checked.
fn output_shape(path: &Path, dir: &Path, out: &RawOutput) -> Result<OutputShape, Error> {
    let bad = |field: &str, msg: String| Error::Job {
        path: path.to_path_buf(),
        field: field.to_string(),
        message: msg,
    };
    let schema = match &out.schema {
        None => None,
        Some(toml::Value::String(file)) => {
            let f = dir.join(file);
            let text = std::fs::read(&f)
                .map_err(|e| bad("output.schema", format!("cannot read {}: {e}", f.display())))?;
            let v: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| bad("output.schema", format!("{}: not JSON: {e}", f.display())))?;
            let name = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "output".into());
            Some((name, v))
        }
        Some(t @ toml::Value::Table(_)) => Some((
            "output".to_string(),
            serde_json::to_value(t).map_err(|e| bad("output.schema", e.to_string()))?,
        )),
        Some(_) => {
            return Err(bad(
                "output.schema",
                "a schema file's path, or an [output.schema] table".into(),
            ))
        }
    };
    let schema = match schema {
        Some((name, v)) => {
            if v.get("type").and_then(|t| t.as_str()) != Some("object") {
                return Err(bad(
                    "output.schema",
                    "the API takes an object at the top (\"type\": \"object\")".into(),
                ));
            }
            let name = out.schema_name.clone().unwrap_or(name);
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return Err(bad(
                    "output.schema_name",
                    format!("`{name}`: 1 to 64 letters, digits, `_` or `-`"),
                ));
            }
            Some((name, v))
        }
        None => None,
    };
    let json_object = match out.response_format.as_deref() {
        None | Some("text") => false,
        Some("json_object") => true,
        Some("json_schema") if schema.is_some() => false,
        Some(other) => {
            return Err(bad(
                "output.response_format",
                format!(
                    "`{other}`: \"json_object\", or give a schema ([output] schema) for json_schema"
                ),
            ))
        }
    };
    let checks = out.checks.clone().unwrap_or_default();
    if let (Some(lo), Some(hi)) = (checks.min_chars, checks.max_chars) {
        if lo > hi {
            return Err(bad(
                "output.checks.min_chars",
                format!("{lo} is more than max_chars {hi}"),
            ));
        }
    }
    let shape = OutputShape {
        schema,
        json_object,
        checks,
        max_invalid: out.max_invalid.unwrap_or(2),
    };
    // The schema, regexes and templates compile here, so a bad one stops the job at load.
    crate::shape::Shape::compile(&shape).map_err(|(field, message)| bad(&field, message))?;
    Ok(shape)
}
/// Why a job or row with images cannot run on the embedded model.
pub const TEXT_ONLY_MODEL: &str =
    "the local model reads text only; images need an HTTP provider with a vision model";

/// `extra` keys the job owns, each with where to set it instead.
const RESERVED_EXTRA: &[(&str, &str)] = &[
    ("model", "set by [model] name"),
    ("messages", "set by [[messages]]"),
    ("stream", "set by [model] stream"),
    (
        "stream_options",
        "set by promptmill when [model] stream = true",
    ),
    ("n", "set by [model] n"),
    (
        "response_format",
        "set by [output] schema or [output] response_format",
    ),
    ("temperature", "set by [model] temperature"),
    ("service_tier", "set by [model] service_tier"),
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

    fn job(model: &str, run: &str) -> Result<Job, Error> {
        let text = format!(
            "[input]\npath = \"d.csv\"\n[[messages]]\nrole = \"user\"\ncontent = \"x\"\n\
             [model]\n{model}\n[run]\n{run}\n[output]\npath = \"o.jsonl\"\n"
        );
        let raw: RawJob = toml::from_str(&text).unwrap();
        Job::from_raw(Path::new("jobs/j.toml"), raw, &Overrides::default())
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::Job { field, .. } => field,
            e => panic!("not a job error: {e}"),
        }
    }

    fn with_messages(messages: &str, model: &str) -> Result<Job, Error> {
        let text = format!(
            "[input]\npath = \"d.csv\"\n{messages}\n[model]\n{model}\n[output]\npath = \"o.jsonl\"\n"
        );
        let raw: RawJob = toml::from_str(&text).unwrap();
        Job::from_raw(Path::new("jobs/j.toml"), raw, &Overrides::default())
    }

    #[test]
    fn from_and_images_are_checked_where_the_job_loads() {
        let ok = with_messages(
            "[[messages]]\nfrom = \"chat\"\n[[messages]]\nrole = \"user\"\n\
             images = [\"{{ p }}\"]\nimage_detail = \"low\"",
            "name = \"m\"",
        )
        .unwrap();
        assert!(matches!(&ok.messages[0].source, MessageSource::Field(f) if f == "chat"));
        assert_eq!(ok.messages[1].images, ["{{ p }}"]);
        assert_eq!(ok.messages[1].image_detail, Some(Detail::Low));
        let cases = [
            ("from = \"chat\"\nrole = \"user\"", "m", "messages[0].role"),
            (
                "from = \"chat\"\nimages = [\"x\"]",
                "m",
                "messages[0].images",
            ),
            ("from = \"\"", "m", "messages[0].from"),
            ("content = \"x\"", "m", "messages[0].role"),
            ("role = \"user\"", "m", "messages[0]"),
            (
                "role = \"system\"\nimages = [\"x\"]",
                "m",
                "messages[0].images",
            ),
            (
                "role = \"user\"\ncontent = \"x\"\nimage_detail = \"low\"",
                "m",
                "messages[0].image_detail",
            ),
        ];
        for (m, name, field) in cases {
            let e = with_messages(&format!("[[messages]]\n{m}"), &format!("name = \"{name}\""))
                .expect_err(m);
            assert_eq!(field_of(e), field, "{m}");
        }
        let local = with_messages(
            "[[messages]]\nrole = \"user\"\nimages = [\"x.png\"]",
            "provider = \"local\"\npath = \"m.gguf\"",
        );
        match local {
            Err(Error::Job { field, message, .. }) => {
                assert_eq!(field, "messages[0].images");
                assert_eq!(message, TEXT_ONLY_MODEL);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_schema_the_local_grammar_cannot_hold_is_refused_where_the_job_loads() {
        let load = |provider: &str, property: &str| {
            let text = format!(
                "[input]\npath = \"d.csv\"\n[[messages]]\nrole = \"user\"\ncontent = \"x\"\n\
                 [model]\n{provider}\n[output]\npath = \"o.jsonl\"\n[output.schema]\n\
                 type = \"object\"\nrequired = [\"code\"]\n\
                 [output.schema.properties.code]\ntype = \"string\"\n{property}\n"
            );
            let raw: RawJob = toml::from_str(&text).unwrap();
            Job::from_raw(Path::new("jobs/j.toml"), raw, &Overrides::default())
        };
        let local = "provider = \"local\"\npath = \"m.gguf\"";
        assert!(load(local, "maxLength = 8").is_ok());
        match load(local, "pattern = \"^[A-Z]+$\"") {
            Err(Error::Job { field, message, .. }) => {
                assert_eq!(field, "output.schema");
                assert!(message.contains("/properties/code"), "{message}");
                assert!(message.contains("`pattern`"), "{message}");
                assert!(message.contains("HTTP provider"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // An HTTP provider takes it: the API enforces patterns itself.
        assert!(load("name = \"m\"", "pattern = \"^[A-Z]+$\"").is_ok());
    }

    #[test]
    fn flex_waits_fifteen_minutes_unless_the_job_says_otherwise() {
        let flex = "name = \"gpt-5-mini\"\nservice_tier = \"flex\"";
        let j = job(flex, "").unwrap();
        assert_eq!(j.timeout, Duration::from_secs(900));
        assert_eq!(j.params.service_tier, Some(ServiceTier::Flex));
        assert_eq!(
            job(flex, "timeout_s = 60").unwrap().timeout,
            Duration::from_secs(60)
        );
        assert_eq!(
            job("name = \"gpt-5-mini\"", "").unwrap().timeout,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn azure_takes_the_resource_deployment_and_api_version() {
        let j = job(
            "provider = \"azure\"\nbase_url = \"https://res.openai.azure.com/\"\n\
             deployment = \"mini-prod\"\napi_version = \"2024-10-21\"\nname = \"gpt-4o-mini\"",
            "",
        )
        .unwrap();
        assert_eq!(j.provider, ProviderKind::Openai);
        assert_eq!(j.base_url, "https://res.openai.azure.com");
        assert_eq!(j.deployment.as_deref(), Some("mini-prod"));
        assert_eq!(j.api_version.as_deref(), Some("2024-10-21"));
        assert_eq!(
            j.auth,
            Auth::ApiKey,
            "Azure's keys go in the api-key header"
        );
        assert_eq!(j.api_key_env, "AZURE_OPENAI_API_KEY");
        assert_eq!(j.model, "gpt-4o-mini");

        // Without `name`, the deployment stands for the model.
        let j = job(
            "provider = \"azure\"\nbase_url = \"https://res.openai.azure.com\"\n\
             deployment = \"gpt-4o-mini\"\napi_version = \"2024-10-21\"\nauth = \"bearer\"",
            "",
        )
        .unwrap();
        assert_eq!(j.model, "gpt-4o-mini");
        assert_eq!(j.auth, Auth::Bearer, "an Entra ID token is a bearer token");

        // OpenAI's default stays bearer.
        assert_eq!(job("name = \"m\"", "").unwrap().auth, Auth::Bearer);
    }

    #[test]
    fn azure_mistakes_name_the_field() {
        let base = "provider = \"azure\"\nbase_url = \"https://res.openai.azure.com\"\n";
        let cases = [
            (
                format!("{base}api_version = \"2024-10-21\""),
                "model.deployment",
            ),
            (format!("{base}deployment = \"d1\""), "model.api_version"),
            (
                format!("{base}deployment = \"d1\"\napi_version = \"2024-10-21&x=1\""),
                "model.api_version",
            ),
            (
                format!("{base}deployment = \"a/b\"\napi_version = \"2024-10-21\""),
                "model.deployment",
            ),
            (
                "provider = \"azure\"\n\
                 base_url = \"https://r.openai.azure.com/openai/deployments/d1/chat/completions\"\n\
                 deployment = \"d1\"\napi_version = \"2024-10-21\""
                    .to_string(),
                "model.base_url",
            ),
            (
                "name = \"m\"\ndeployment = \"d1\"".to_string(),
                "model.deployment",
            ),
            (
                "name = \"m\"\nbase_url = \"https://x/v1?api-version=1\"".to_string(),
                "model.base_url",
            ),
            (
                "name = \"m\"\nca_file = \"no-such-ca.pem\"".to_string(),
                "model.ca_file",
            ),
        ];
        for (model, field) in cases {
            let e = job(&model, "").expect_err(&model);
            assert_eq!(field_of(e), field, "{model}");
        }
        // A typo in `auth` is a TOML error, not a silent bearer.
        let text = "[input]\npath = \"d.csv\"\n[[messages]]\nrole = \"user\"\ncontent = \"x\"\n\
                    [model]\nname = \"m\"\nauth = \"apikey\"\n[output]\npath = \"o.jsonl\"\n";
        assert!(toml::from_str::<RawJob>(text).is_err());
    }
}
