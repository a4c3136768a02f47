//! The one assembler: a validated job → the provider that answers it, the tokenizer whose
//! counts match it, the wire format its requests are spelled in, the price it is billed at,
//! and the identity its fingerprints carry. No other module reads the job to build these, so
//! another API is one more arm here and one file under `provider/`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::chat::{Mode, ServiceTier};
use crate::cost::{Price, Pricing, Tier};
use crate::error::Error;
use crate::job::{Job, ProviderKind};
use crate::provider::anthropic::{Anthropic, AnthropicWire};
use crate::provider::endpoint::{read_ca_file, Endpoint};
use crate::provider::gemini::{Gemini, GeminiWire};
use crate::provider::openai::{OpenAi, OpenAiWire};
use crate::provider::{Completion, ErrorKind, Provider, ProviderError, Request, Wire};
use crate::tokens::TokenCounter;

/// The provider for a run, the tokenizer whose counts match it, and who it is.
pub struct Backend {
    pub provider: Arc<dyn Provider>,
    pub counter: Arc<dyn TokenCounter>,
    /// How each row's request body is spelled for this provider.
    pub wire: Arc<dyn Wire>,
    /// The job's `[pricing]`, or `None` to look the returned model up in the built-in table.
    pub pricing: Option<Pricing>,
    /// Which of the model's prices applies: batch mode and the flex tier bill batch rates.
    pub tier: Tier,
    /// Who answers, as the fingerprint knows it ([`provider_identity`]).
    pub identity: String,
}

impl Backend {
    /// The provider for the job, and the tokenizer whose counts match it. Checks the key (HTTP)
    /// or loads the model (local) before anything is sent; with `need_provider` false
    /// (estimate, render, status, export) nothing is checked or loaded that sending would need.
    pub fn for_job(job: &Job, need_provider: bool) -> Result<Backend, Error> {
        let pricing = job.pricing;
        let tier = tier(job);
        match job.served.provider {
            // Azure OpenAI too: `Endpoint` knows its URL layout and key header.
            ProviderKind::Openai => {
                let counter = Arc::new(crate::tokens::Tiktoken::new(&job.served.model));
                let provider = http(job, need_provider, |e, l, stream| {
                    OpenAi::new(e, l.timeout, l.concurrency, stream)
                })?;
                Ok(Backend {
                    provider,
                    counter,
                    wire: Arc::new(OpenAiWire {
                        cache_key: cache_key(job),
                    }),
                    pricing,
                    tier,
                    identity: provider_identity(job, None),
                })
            }
            ProviderKind::Anthropic => {
                let provider = http(job, need_provider, |e, l, stream| {
                    Anthropic::new(e, l.timeout, l.concurrency, stream)
                })?;
                Ok(Backend {
                    provider,
                    // Claude's tokenizer is not public: OpenAI's o200k counts with a margin
                    // stand in, and the server's usage is what is billed.
                    counter: Arc::new(crate::tokens::Scaled {
                        inner: crate::tokens::Tiktoken::new("gpt-4o"),
                        factor: crate::tokens::CLAUDE_MARGIN,
                    }),
                    wire: Arc::new(AnthropicWire {
                        cache: job.served.prompt_cache,
                        shared_messages: shared_messages(job),
                    }),
                    pricing,
                    tier,
                    identity: provider_identity(job, None),
                })
            }
            ProviderKind::Gemini => gemini_backend(job, pricing, tier, need_provider),
            ProviderKind::Local => local_backend(job, pricing, tier, need_provider),
        }
    }

    /// The price of a completion from `model` (as returned), falling back to the job's model.
    pub fn price_for(&self, returned: Option<&str>, job_model: &str) -> Option<Price> {
        self.price_at(self.tier, returned, job_model)
    }

    /// The price at a given tier: results collected from the Batch API are billed at batch
    /// rates, whatever mode the run that collects them is in.
    pub fn price_at(&self, tier: Tier, returned: Option<&str>, job_model: &str) -> Option<Price> {
        if !self.provider.is_billed() {
            return Some(Price::FREE);
        }
        if let Some(p) = &self.pricing {
            return Some(p.at(tier));
        }
        returned
            .and_then(|m| crate::cost::lookup_tier(m, tier))
            .or_else(|| crate::cost::lookup_tier(job_model, tier))
    }
}

/// The job's endpoint and its key from the environment. A remote server needs a key; a
/// server on this machine (llama.cpp, Ollama, vLLM) usually does not.
pub fn endpoint(job: &Job) -> Result<Endpoint, Error> {
    let key = std::env::var(&job.served.api_key_env)
        .ok()
        .filter(|k| !k.trim().is_empty());
    if key.is_none() && !crate::provider::endpoint::is_loopback(&job.served.base_url) {
        return Err(Error::MissingKey {
            var: job.served.api_key_env.clone(),
        });
    }
    let extra_roots = match &job.served.ca_file {
        Some(p) => read_ca_file(p).map_err(|message| Error::Job {
            path: job.file.clone(),
            field: "model.ca_file".into(),
            message,
        })?,
        None => Vec::new(),
    };
    Ok(Endpoint::new(
        &job.served.base_url,
        job.served.deployment.clone(),
        job.served.api_version.clone(),
        job.served.auth,
        key,
        extra_roots,
    ))
}

/// How many of the job's first messages are the same for every row: plain text, inline or in a
/// template file, with no Tera tag and no image. The prompt cache's breakpoint goes after them.
pub fn shared_messages(job: &Job) -> usize {
    use crate::job::MessageSource;
    job.messages
        .iter()
        .take_while(|m| {
            let plain = |t: &[u8]| {
                ![b"{{", b"{%", b"{#"]
                    .iter()
                    .any(|tag| t.windows(2).any(|w| w == *tag))
            };
            m.images.is_empty()
                && match &m.source {
                    MessageSource::Inline(t) => plain(t.as_bytes()),
                    MessageSource::Template(name) => {
                        job.template_source(name).is_some_and(|t| plain(&t))
                    }
                    MessageSource::Field(_) => false,
                }
        })
        .count()
}

/// The `prompt_cache_key` the job's OpenAI requests carry: its own, or with `auto`
/// `pm-{job}-{hash}`, the hash over the model and the messages every row shares (their role
/// and text), so jobs that share a prefix share a key and a changed prefix gets a new one.
pub fn cache_key(job: &Job) -> Option<String> {
    use crate::job::{CacheKey, MessageSource};
    use sha2::{Digest, Sha256};
    match &job.served.prompt_cache_key {
        CacheKey::Off => None,
        CacheKey::Fixed(k) => Some(k.clone()),
        CacheKey::Auto => {
            let mut h = Sha256::new();
            h.update(job.served.model.as_bytes());
            for m in job.messages.iter().take(shared_messages(job)) {
                h.update([0]);
                h.update(m.role.as_str().as_bytes());
                h.update([0]);
                match &m.source {
                    MessageSource::Inline(t) => h.update(t.as_bytes()),
                    MessageSource::Template(name) => {
                        h.update(job.template_source(name).unwrap_or_default())
                    }
                    MessageSource::Field(_) => {}
                }
            }
            let stem = job
                .file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Keys are short and plain: the job's name cut to 40 characters of [A-Za-z0-9_-].
            let stem: String = stem
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(40)
                .collect();
            let hash = crate::fingerprint::hex(&h.finalize()[..6]);
            Some(format!("pm-{stem}-{hash}"))
        }
    }
}

/// The HTTP provider `make` builds on the job's endpoint (with its limits and whether it
/// streams), after the key is checked; none when nothing will be sent.
fn http<P: Provider + 'static>(
    job: &Job,
    need_provider: bool,
    make: impl FnOnce(&Endpoint, &crate::job::Limits, bool) -> Result<P, String>,
) -> Result<Arc<dyn Provider>, Error> {
    if !need_provider {
        return Ok(Arc::new(NoProvider { billed: true }));
    }
    let p = make(
        &endpoint(job)?,
        &job.limits,
        job.params.stream.unwrap_or(false),
    );
    Ok(Arc::new(p.map_err(Error::Other)?))
}

/// Google's Gemini API: its provider (the model goes in the URL), a scaled count standing in
/// for its tokenizer, and its wire.
fn gemini_backend(
    job: &Job,
    pricing: Option<Pricing>,
    tier: Tier,
    need_provider: bool,
) -> Result<Backend, Error> {
    let provider = http(job, need_provider, |e, l, stream| {
        Gemini::new(e, &job.served.model, l.timeout, l.concurrency, stream)
    })?;
    Ok(Backend {
        provider,
        // Gemini's tokenizer is not public either: o200k with its own margin (the model's
        // name is unknown to tiktoken, which falls back to o200k), images by Gemini's rule.
        counter: Arc::new(crate::tokens::Scaled {
            inner: crate::tokens::Tiktoken::new(&job.served.model),
            factor: crate::tokens::GEMINI_MARGIN,
        }),
        wire: Arc::new(GeminiWire),
        pricing,
        tier,
        identity: provider_identity(job, None),
    })
}

/// The local model file: the job's `path`, else the fetched default.
pub fn local_model_path(job: &Job) -> Result<PathBuf, Error> {
    job.served
        .model_path
        .clone()
        .or_else(crate::models::default_model_path)
        .ok_or_else(|| Error::Model {
            path: "(no path)".into(),
            message: "no model path and no cache folder (set HOME or PROMPTMILL_MODEL_DIR)".into(),
        })
}

#[cfg(feature = "local")]
fn local_backend(
    job: &Job,
    pricing: Option<Pricing>,
    tier: Tier,
    need_provider: bool,
) -> Result<Backend, Error> {
    use crate::provider::local;
    let path = local_model_path(job)?;
    let name = if job.served.model.is_empty() {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        job.served.model.clone()
    };
    // The file's checksum is part of every row's fingerprint: another file is another model.
    crate::models::check_model_file(&path)?;
    let sha = crate::models::sha256_cached(&path)?;
    let identity = provider_identity(job, Some(&sha));
    // The engine reads the messages; the body is the OpenAI spelling, so that outputs
    // written before rows were keyed by request identity are still recognised.
    let wire = Arc::new(OpenAiWire::default());
    if !need_provider {
        // Counting prompts needs the vocabulary, not the weights.
        return Ok(Backend {
            provider: Arc::new(NoProvider { billed: false }),
            counter: Arc::new(local::Tokenizer::load(&path)?),
            wire,
            pricing,
            tier,
            identity,
        });
    }
    let model = local::LocalModel::load(
        &path,
        &name,
        &job.params,
        job.limits.concurrency,
        local::EngineSettings {
            context_tokens: job.served.context_tokens,
            cache_prompt: job.served.cache_prompt,
        },
    )?;
    Ok(Backend {
        provider: model.clone(),
        counter: model,
        wire,
        pricing,
        tier,
        identity,
    })
}

#[cfg(not(feature = "local"))]
fn local_backend(
    job: &Job,
    _pricing: Option<Pricing>,
    _tier: Tier,
    _need_provider: bool,
) -> Result<Backend, Error> {
    Err(Error::Job {
        path: job.file.clone(),
        field: "model.provider".into(),
        message:
            "this promptmill was built without the `local` feature; rebuild with default features"
                .into(),
    })
}

/// The price tier a job's rows are billed at.
pub fn tier(job: &Job) -> Tier {
    if job.mode == Mode::Batch {
        Tier::Batch
    } else if job.params.service_tier == Some(ServiceTier::Flex) {
        Tier::Flex
    } else {
        Tier::Standard
    }
}

/// Stands in for the provider where nothing is sent (estimate, render); `billed` as the
/// provider it stands for (a local model costs nothing).
struct NoProvider {
    billed: bool,
}

impl Provider for NoProvider {
    fn complete<'a>(
        &'a self,
        _req: &'a Request,
    ) -> futures::future::BoxFuture<'a, Result<Completion, ProviderError>> {
        Box::pin(async {
            Err(ProviderError::new(
                ErrorKind::BadRequest,
                "nothing is sent in this mode",
            ))
        })
    }

    fn is_billed(&self) -> bool {
        self.billed
    }
}

/// Who answers a job's requests, as far as it changes the completion: the HTTP endpoint's host
/// (and port), or the local model's file checksum and context size.
pub fn provider_identity(job: &Job, local_model_sha256: Option<&str>) -> String {
    match job.served.provider {
        ProviderKind::Openai => format!("openai:{}", host_and_port(&job.served.base_url)),
        ProviderKind::Anthropic => {
            format!("anthropic:{}", host_and_port(&job.served.base_url))
        }
        ProviderKind::Gemini => format!("gemini:{}", host_and_port(&job.served.base_url)),
        ProviderKind::Local => format!(
            "local:{}:ctx={}",
            local_model_sha256.unwrap_or("unknown"),
            job.served
                .context_tokens
                .map_or("default".into(), |c| c.to_string())
        ),
    }
}

/// `https://user@API.example.com:8443/v1` → `api.example.com:8443` (the URL itself when it
/// does not parse; `Job` has checked it is http(s) already).
pub fn host_and_port(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or_default();
            match u.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_string(),
            }
        }
        Err(_) => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_local_model_file_is_another_provider() {
        let dir = tempfile::tempdir().unwrap();
        let job = |ctx: &str| {
            let p = dir.path().join("job.toml");
            std::fs::write(
                &p,
                format!(
                    "[input]\npath = \"d.csv\"\n[[messages]]\nrole = \"user\"\ncontent = \"x\"\n\
                     [model]\nprovider = \"local\"\npath = \"m.gguf\"\n{ctx}\n\
                     [output]\npath = \"o.jsonl\"\n"
                ),
            )
            .unwrap();
            Job::load(&p, &Default::default()).unwrap()
        };
        let a = provider_identity(&job(""), Some("aa"));
        assert_ne!(a, provider_identity(&job(""), Some("bb")));
        assert_ne!(
            a,
            provider_identity(&job("context_tokens = 512"), Some("aa"))
        );
    }

    #[test]
    fn the_provider_is_known_by_host_and_port() {
        assert_eq!(
            host_and_port("https://u:p@API.Example.com/v1"),
            "api.example.com"
        );
        assert_eq!(host_and_port("http://127.0.0.1:8080/v1"), "127.0.0.1:8080");
    }
}
