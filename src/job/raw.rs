//! The job file as written: the serde types TOML is read into, unknown keys refused. `Job`
//! (in `super`) is what they become once checked.

use serde::Deserialize;

use super::InputFormat;
use crate::chat::{Detail, Mode, Params, Role, ServiceTier, Stop};
use crate::cost::Pricing;
use crate::provider::endpoint::Auth;
use crate::shape::Checks;

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
    /// Parquet: the columns to read and keep; by default those the job's messages mention,
    /// its id and its `from` fields.
    pub columns: Option<Vec<String>>,
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

/// `[model] provider` as written. Azure OpenAI is the OpenAI HTTP provider on Azure's URL
/// layout, so a validated `Job` knows it as `ProviderKind::Openai` with a `deployment`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawProvider {
    #[default]
    Openai,
    Azure,
    Anthropic,
    /// Google's Gemini API (generateContent).
    Gemini,
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
    /// Anthropic: how long the prefix every row shares is cached (`5m`, `1h`, `off`).
    pub prompt_cache: Option<crate::provider::anthropic::PromptCache>,
    /// OpenAI: `prompt_cache_key`, `"auto"` (from the job and its shared prefix) or `"off"`.
    pub prompt_cache_key: Option<String>,
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
    pub(super) fn params(&self) -> Params {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub path: String,
    pub csv: Option<String>,
    /// The records as a typed Parquet table, written when the run finishes.
    pub parquet: Option<String>,
    /// An object-store output: seconds between checkpoints of its journal (default 10).
    pub checkpoint_s: Option<f64>,
    /// An object-store output: seconds a lock may go unrenewed before another run takes it
    /// over (default 60).
    pub lock_stale_s: Option<f64>,
    pub csv_escape_formulas: Option<bool>,
    /// Write `OUTPUT.report.html` after each run (default true).
    pub report: Option<bool>,
    /// Rows the report's table holds first (default 1,000).
    pub report_rows: Option<usize>,
    /// Failed rows the report's table holds past its first rows (default 1,000).
    pub report_failed_rows: Option<usize>,
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
