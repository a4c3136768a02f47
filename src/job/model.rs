//! `[model]`: which model, served where and reached how (provider, name or GGUF path,
//! base_url, Azure's deployment and api_version, auth, extra CA certificates), and the request
//! parameters with their ranges. `extra` may not set what the job's own keys set, and no
//! value in it may look like a key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::messages::MessageSpec;
use super::raw::{RawModel, RawProvider};
use super::{expand_home, JobFile};
use crate::chat::Params;
use crate::error::Error;
use crate::provider::endpoint::Auth;

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
pub const GEMINI_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// Why a job or row with images cannot run on the embedded model.
pub const TEXT_ONLY_MODEL: &str =
    "the local model reads text only; images need an HTTP provider with a vision model";

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// Google's Gemini API.
    Gemini,
    Local,
}

/// The validated model and its endpoint: `Job`'s fields of the same names.
#[derive(Debug, Clone)]
pub struct Served {
    pub provider: ProviderKind,
    pub model: String,
    pub model_path: Option<PathBuf>,
    pub context_tokens: Option<u32>,
    /// Read by the embedded model only: an HTTP-only build carries it unread.
    #[cfg_attr(not(feature = "local"), allow(dead_code))]
    pub cache_prompt: bool,
    pub base_url: String,
    pub api_key_env: String,
    pub deployment: Option<String>,
    pub api_version: Option<String>,
    pub auth: Auth,
    pub ca_file: Option<PathBuf>,
    pub prompt_cache: crate::provider::anthropic::PromptCache,
    /// OpenAI's `prompt_cache_key`: `Auto` derives one from the job and its shared prefix.
    pub prompt_cache_key: CacheKey,
}

/// `[model] prompt_cache_key` for OpenAI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheKey {
    Off,
    /// Derived from the job and the prefix every row shares.
    Auto,
    Fixed(String),
}

/// Keys never live in job files: `api_key` is there only to be refused with this message.
pub(super) fn refuse_api_key(jf: &JobFile, m: &RawModel) -> Result<(), Error> {
    if m.api_key.is_some() {
        return Err(jf.bad(
            "model.api_key",
            "API keys are not accepted in job files; put the key in the environment or in .env \
             and name the variable with `api_key_env`"
                .into(),
        ));
    }
    Ok(())
}

/// `[model]`'s model and endpoint, checked. Azure OpenAI is the OpenAI HTTP provider on
/// Azure's URL layout: `ProviderKind::Openai` with a `deployment`.
pub(super) fn served(jf: &JobFile, m: &RawModel) -> Result<Served, Error> {
    let azure = m.provider == RawProvider::Azure;
    let provider = match m.provider {
        RawProvider::Openai | RawProvider::Azure => ProviderKind::Openai,
        RawProvider::Anthropic => ProviderKind::Anthropic,
        RawProvider::Gemini => ProviderKind::Gemini,
        RawProvider::Local => ProviderKind::Local,
    };
    if m.prompt_cache.is_some() && provider != ProviderKind::Anthropic {
        return Err(jf.bad(
            "model.prompt_cache",
            "prompt_cache sets Anthropic's cache breakpoint; OpenAI, Gemini and the local model \
             cache shared prefixes by themselves"
                .into(),
        ));
    }
    let deployment = deployment(jf, m, azure)?;
    let (model, model_path) = name_and_path(jf, m, deployment.as_deref())?;
    let base_url = base_url(jf, m, azure)?;
    let prompt_cache_key = cache_key(jf, m, provider, &base_url)?;
    let api_key_env = m.api_key_env.clone().unwrap_or_else(|| {
        match m.provider {
            RawProvider::Azure => "AZURE_OPENAI_API_KEY",
            RawProvider::Anthropic => "ANTHROPIC_API_KEY",
            RawProvider::Gemini => gemini_key_env(),
            RawProvider::Openai | RawProvider::Local => "OPENAI_API_KEY",
        }
        .into()
    });
    let api_version = api_version(jf, m, azure)?;
    let auth = m.auth.unwrap_or(match m.provider {
        RawProvider::Azure => Auth::ApiKey,
        RawProvider::Anthropic => Auth::XApiKey,
        RawProvider::Gemini => Auth::XGoogApiKey,
        RawProvider::Openai | RawProvider::Local => Auth::Bearer,
    });
    let ca_file = match &m.ca_file {
        Some(f) => {
            let p = expand_home(f).unwrap_or_else(|| jf.resolve(f));
            crate::provider::endpoint::read_ca_file(&p).map_err(|e| jf.bad("model.ca_file", e))?;
            Some(p)
        }
        None => None,
    };
    Ok(Served {
        provider,
        model,
        model_path,
        context_tokens: m.context_tokens,
        cache_prompt: m.cache_prompt.unwrap_or(true),
        base_url,
        api_key_env,
        deployment,
        api_version,
        auth,
        ca_file,
        prompt_cache: m.prompt_cache.unwrap_or_default(),
        prompt_cache_key,
    })
}

/// OpenAI's `prompt_cache_key`. By default `auto` on OpenAI's own API only: a server that
/// copies the API (Azure, vLLM, a proxy) may refuse a field it does not know, so there the
/// job turns it on.
fn cache_key(
    jf: &JobFile,
    m: &RawModel,
    provider: ProviderKind,
    base_url: &str,
) -> Result<CacheKey, Error> {
    let Some(k) = m.prompt_cache_key.as_deref() else {
        let openai = provider == ProviderKind::Openai
            && m.provider != RawProvider::Azure
            && reqwest::Url::parse(base_url).is_ok_and(|u| u.host_str() == Some("api.openai.com"));
        return Ok(if openai {
            CacheKey::Auto
        } else {
            CacheKey::Off
        });
    };
    if provider != ProviderKind::Openai {
        return Err(jf.bad(
            "model.prompt_cache_key",
            "prompt_cache_key is OpenAI's request field; Anthropic's cache is `prompt_cache`"
                .into(),
        ));
    }
    Ok(match k {
        "off" => CacheKey::Off,
        "auto" => CacheKey::Auto,
        k if !k.is_empty() && k.len() <= 256 => CacheKey::Fixed(k.to_string()),
        _ => {
            return Err(jf.bad(
                "model.prompt_cache_key",
                "must be \"auto\", \"off\" or a key of 1 to 256 characters".into(),
            ))
        }
    })
}

/// Gemini's key variable: `GEMINI_API_KEY`, else `GOOGLE_API_KEY` when only that one is set
/// (Google's SDKs read both).
fn gemini_key_env() -> &'static str {
    let set = |v: &str| std::env::var(v).is_ok_and(|k| !k.trim().is_empty());
    if !set("GEMINI_API_KEY") && set("GOOGLE_API_KEY") {
        "GOOGLE_API_KEY"
    } else {
        "GEMINI_API_KEY"
    }
}

/// Azure's deployment: required there, refused elsewhere.
fn deployment(jf: &JobFile, m: &RawModel, azure: bool) -> Result<Option<String>, Error> {
    match (&m.deployment, azure) {
        (Some(d), true) => {
            // Azure's rule for deployment names; anything else would not be one URL segment.
            let ok = (2..=64).contains(&d.len())
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(jf.bad(
                    "model.deployment",
                    format!(
                        "`{d}` is not a deployment name (2 to 64 letters, digits, `-`, `_` or `.`)"
                    ),
                ));
            }
            Ok(Some(d.clone()))
        }
        (None, true) => Err(jf.bad(
            "model.deployment",
            "provider = \"azure\" needs the deployment's name, as the Azure portal shows it".into(),
        )),
        (Some(_), false) => Err(jf.bad(
            "model.deployment",
            "a deployment is for provider = \"azure\"; for OpenAI-compatible servers the \
             model is `name`"
                .into(),
        )),
        (None, false) => Ok(None),
    }
}

/// The model's name, and for `provider = "local"` its GGUF file.
fn name_and_path(
    jf: &JobFile,
    m: &RawModel,
    deployment: Option<&str>,
) -> Result<(String, Option<PathBuf>), Error> {
    match m.provider {
        // Azure: the deployment decides the model; `name` tells promptmill which model
        // that is, for its price and tokenizer.
        RawProvider::Azure => Ok((
            m.name
                .clone()
                .unwrap_or_else(|| deployment.unwrap_or_default().to_string()),
            None,
        )),
        RawProvider::Openai | RawProvider::Anthropic | RawProvider::Gemini => {
            let name = m
                .name
                .clone()
                .ok_or_else(|| jf.bad("model.name", "the model name is required".into()))?;
            Ok((name, None))
        }
        RawProvider::Local => {
            // No path: the default model, which `provider::build` finds in the cache.
            let p = m
                .path
                .as_deref()
                .map(|p| expand_home(p).unwrap_or_else(|| jf.resolve(p)));
            let name = m.name.clone().unwrap_or_else(|| {
                p.as_deref()
                    .and_then(Path::file_stem)
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            Ok((name, p))
        }
    }
}

/// The endpoint: as written, else from the environment (OpenAI's default, or Azure's
/// resource endpoint, which has none), without a trailing `/`.
fn base_url(jf: &JobFile, m: &RawModel, azure: bool) -> Result<String, Error> {
    let env = |var: &str| std::env::var(var).ok().filter(|s| !s.is_empty());
    let base_url = match (&m.base_url, azure) {
        (Some(u), _) => u.clone(),
        (None, false) if m.provider == RawProvider::Anthropic => {
            env("ANTHROPIC_BASE_URL").unwrap_or_else(|| ANTHROPIC_BASE_URL.to_string())
        }
        (None, false) if m.provider == RawProvider::Gemini => {
            env("GEMINI_BASE_URL").unwrap_or_else(|| GEMINI_BASE_URL.to_string())
        }
        (None, false) => env("OPENAI_BASE_URL").unwrap_or_else(|| DEFAULT_BASE_URL.to_string()),
        (None, true) => env("AZURE_OPENAI_ENDPOINT").ok_or_else(|| {
            jf.bad(
                "model.base_url",
                "provider = \"azure\" needs the resource's endpoint, \
                 https://NAME.openai.azure.com (or set AZURE_OPENAI_ENDPOINT)"
                    .into(),
            )
        })?,
    };
    let base_url = base_url.trim_end_matches('/').to_string();
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err(jf.bad(
            "model.base_url",
            format!("`{base_url}` is not an http(s) URL"),
        ));
    }
    if azure && (base_url.contains("/deployments/") || base_url.ends_with("/openai")) {
        return Err(jf.bad(
            "model.base_url",
            format!(
                "`{base_url}`: for provider = \"azure\" give the resource's endpoint \
                 (https://NAME.openai.azure.com); promptmill adds /openai/deployments/… \
                 itself from `deployment`"
            ),
        ));
    }
    if base_url.contains('?') {
        return Err(jf.bad(
            "model.base_url",
            format!("`{base_url}` has a query; set `api_version` instead of writing ?api-version= in the URL"),
        ));
    }
    Ok(base_url)
}

/// The `api-version` query parameter: one URL-safe word, required by Azure.
fn api_version(jf: &JobFile, m: &RawModel, azure: bool) -> Result<Option<String>, Error> {
    match &m.api_version {
        Some(v) => {
            let ok = !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(jf.bad(
                    "model.api_version",
                    format!("`{v}` is not an API version (like \"2024-10-21\")"),
                ));
            }
            Ok(Some(v.clone()))
        }
        None if azure => Err(jf.bad(
            "model.api_version",
            "Azure OpenAI needs an api-version on every request, e.g. \
             api_version = \"2024-10-21\" (see Azure's API version lifecycle page)"
                .into(),
        )),
        None => Ok(None),
    }
}

/// The request parameters, with the `response_format` that `[output]` asks for, each in
/// its range, and `extra` kept to what the job's own keys do not set.
pub(super) fn params(
    jf: &JobFile,
    m: &RawModel,
    response_format: Option<serde_json::Value>,
) -> Result<Params, Error> {
    let mut params = m.params();
    params.response_format = response_format;
    if let Some(n) = params.n {
        if !(1..=128).contains(&n) {
            return Err(jf.bad("model.n", "must be between 1 and 128".into()));
        }
    }
    let p = &params;
    check_range(jf, "model.temperature", p.temperature, 0.0, 2.0)?;
    check_range(jf, "model.top_p", p.top_p, 0.0, 1.0)?;
    check_range(jf, "model.presence_penalty", p.presence_penalty, -2.0, 2.0)?;
    check_range(
        jf,
        "model.frequency_penalty",
        p.frequency_penalty,
        -2.0,
        2.0,
    )?;
    if p.max_tokens == Some(0) || p.max_completion_tokens == Some(0) {
        return Err(jf.bad("model.max_tokens", "must be at least 1".into()));
    }
    // What the job sets through its own keys is not overridden from `extra`: the request
    // must be what the job says, and its fingerprint must mean what it covers.
    for (reserved, owner) in RESERVED_EXTRA {
        if p.extra.contains_key(*reserved) {
            return Err(jf.bad(&format!("model.extra.{reserved}"), owner.to_string()));
        }
    }
    refuse_secret_values(
        jf,
        "model.extra",
        &serde_json::Value::Object(p.extra.clone()),
    )?;
    Ok(params)
}

/// With `provider = "anthropic"`: the API has no default `max_tokens`, so the job must set
/// one, and no `n` (several choices are several requests, not built yet).
pub(super) fn refuse_what_anthropic_cannot_do(
    jf: &JobFile,
    provider: ProviderKind,
    params: &Params,
) -> Result<(), Error> {
    if provider != ProviderKind::Anthropic {
        return Ok(());
    }
    if params.max_output_tokens().is_none() {
        return Err(jf.bad(
            "model.max_tokens",
            "Anthropic's Messages API requires max_tokens on every request; set it in [model]"
                .into(),
        ));
    }
    if params.service_tier.is_some() {
        return Err(jf.bad(
            "model.service_tier",
            "service_tier is OpenAI's; Anthropic has no such request field".into(),
        ));
    }
    Ok(())
}

/// With `provider = "gemini"`: what generateContent has no field for is refused, each by its
/// field (`max_tokens` is optional: the model has its own cap).
pub(super) fn refuse_what_gemini_cannot_do(
    jf: &JobFile,
    provider: ProviderKind,
    params: &Params,
) -> Result<(), Error> {
    if provider != ProviderKind::Gemini {
        return Ok(());
    }
    let max = crate::provider::gemini::MAX_CANDIDATES;
    if params.n.is_some_and(|n| n > max) {
        return Err(jf.bad(
            "model.n",
            format!("Gemini answers at most {max} candidates a request (candidateCount)"),
        ));
    }
    if params.service_tier.is_some() {
        return Err(jf.bad(
            "model.service_tier",
            "service_tier is OpenAI's; the Gemini API has no such request field".into(),
        ));
    }
    if params.user.is_some() {
        return Err(jf.bad(
            "model.user",
            "the Gemini API has no end-user field; remove `user`".into(),
        ));
    }
    if params.extra.contains_key("contents") || params.extra.contains_key("systemInstruction") {
        return Err(jf.bad(
            "model.extra",
            "contents and systemInstruction are set by [[messages]]".into(),
        ));
    }
    Ok(())
}

/// With `provider = "local"`, what the embedded model cannot do is refused at load: images,
/// and a schema its grammar cannot express.
pub(super) fn refuse_what_local_cannot_do(
    jf: &JobFile,
    provider: ProviderKind,
    messages: &[MessageSpec],
    params: &Params,
) -> Result<(), Error> {
    if provider != ProviderKind::Local {
        return Ok(());
    }
    if let Some(i) = messages.iter().position(|m| !m.images.is_empty()) {
        return Err(jf.bad(&format!("messages[{i}].images"), TEXT_ONLY_MODEL.into()));
    }
    // The embedded model is held to the schema by a grammar: a schema it cannot
    // express is refused here, not left unenforced.
    if let Some(rf) = &params.response_format {
        crate::provider::grammar::for_response_format(rf).map_err(|e| {
            jf.bad(
                "output.schema",
                format!(
                    "{e} (the local model is held to the schema by a grammar; change \
                     the schema, or use an HTTP provider)"
                ),
            )
        })?;
    }
    Ok(())
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

fn check_range(jf: &JobFile, field: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), Error> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(jf.bad(field, format!("{x} is outside {lo}..={hi}")))
        }
        _ => Ok(()),
    }
}

/// A value that looks like an OpenAI key in the job file is refused (and never echoed).
fn refuse_secret_values(jf: &JobFile, field: &str, v: &serde_json::Value) -> Result<(), Error> {
    match v {
        serde_json::Value::String(s) if s.starts_with("sk-") && s.len() > 20 => Err(jf.bad(
            field,
            "looks like an API key; keys are not accepted in job files (use api_key_env)".into(),
        )),
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                refuse_secret_values(jf, &format!("{field}.{k}"), v)?;
            }
            Ok(())
        }
        serde_json::Value::Array(a) => a
            .iter()
            .try_for_each(|v| refuse_secret_values(jf, field, v)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{field_of, job};
    use super::*;
    use crate::job::{Job, Overrides, RawJob};

    #[test]
    fn the_prompt_cache_key_is_auto_on_openais_own_api_only_unless_the_job_says() {
        let key = |model: &str| job(model, "").map(|j| j.served.prompt_cache_key);
        assert_eq!(key("name = \"gpt-4o\"").unwrap(), CacheKey::Auto);
        let local = "name = \"m\"\nbase_url = \"http://127.0.0.1:8000/v1\"";
        assert_eq!(key(local).unwrap(), CacheKey::Off);
        assert_eq!(
            key(&format!("{local}\nprompt_cache_key = \"auto\"")).unwrap(),
            CacheKey::Auto
        );
        assert_eq!(
            key("name = \"gpt-4o\"\nprompt_cache_key = \"blog\"").unwrap(),
            CacheKey::Fixed("blog".into())
        );
        assert_eq!(
            key("name = \"gpt-4o\"\nprompt_cache_key = \"off\"").unwrap(),
            CacheKey::Off
        );
        let e = key("name = \"gpt-4o\"\nprompt_cache_key = \"\"").unwrap_err();
        assert_eq!(field_of(e), "model.prompt_cache_key");
        let claude = "provider = \"anthropic\"\nname = \"claude-sonnet-4-5\"\nmax_tokens = 9";
        assert_eq!(key(claude).unwrap(), CacheKey::Off);
        let e = key(&format!("{claude}\nprompt_cache_key = \"k\"")).unwrap_err();
        assert_eq!(field_of(e), "model.prompt_cache_key");
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
    fn azure_takes_the_resource_deployment_and_api_version() {
        let j = job(
            "provider = \"azure\"\nbase_url = \"https://res.openai.azure.com/\"\n\
             deployment = \"mini-prod\"\napi_version = \"2024-10-21\"\nname = \"gpt-4o-mini\"",
            "",
        )
        .unwrap();
        assert_eq!(j.served.provider, ProviderKind::Openai);
        assert_eq!(j.served.base_url, "https://res.openai.azure.com");
        assert_eq!(j.served.deployment.as_deref(), Some("mini-prod"));
        assert_eq!(j.served.api_version.as_deref(), Some("2024-10-21"));
        assert_eq!(
            j.served.auth,
            Auth::ApiKey,
            "Azure's keys go in the api-key header"
        );
        assert_eq!(j.served.api_key_env, "AZURE_OPENAI_API_KEY");
        assert_eq!(j.served.model, "gpt-4o-mini");

        // Without `name`, the deployment stands for the model.
        let j = job(
            "provider = \"azure\"\nbase_url = \"https://res.openai.azure.com\"\n\
             deployment = \"gpt-4o-mini\"\napi_version = \"2024-10-21\"\nauth = \"bearer\"",
            "",
        )
        .unwrap();
        assert_eq!(j.served.model, "gpt-4o-mini");
        assert_eq!(
            j.served.auth,
            Auth::Bearer,
            "an Entra ID token is a bearer token"
        );

        // OpenAI's default stays bearer.
        assert_eq!(job("name = \"m\"", "").unwrap().served.auth, Auth::Bearer);
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
