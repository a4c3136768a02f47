//! The embedded llama.cpp provider: one engine thread owns the model's context and decodes up
//! to `parallel` rows together (continuous batching), so rows/s grows with the job's concurrency.
//!
//! Decisions, mirroring the OpenAI API and llama.cpp's server:
//! - temperature unset = 1.0 (the API default); temperature 0 = greedy (deterministic);
//!   top_p unset = 1.0; max tokens unset = [`DEFAULT_MAX_TOKENS`].
//! - presence/frequency penalties count generated tokens only, as the API does.
//! - the prompt is the model's own chat template (llama.cpp's built-in template engine); if the
//!   model has none or the template rejects the messages, a plain "role: content" transcript.
//! - prompt_tokens include BOS; completion_tokens count sampled tokens except the
//!   end-of-generation token (as llama.cpp's server does).
//! - finish_reason: "stop" for end-of-generation or a stop string (text cut before it),
//!   "length" for the token cap or the end of the sequence's context.
//! - a row whose prompt begins like a prompt already in the KV cache (the template's fixed
//!   opening, a shared system prompt) reuses those cells instead of decoding them again, from
//!   its own slot or another's (llama.cpp's server has each slot decode it once); usage reports
//!   them as `cached_tokens`. See [`engine::Engine::adopt_prefix`].
//! - `n` choices: one sequence each (the slots are concurrency × n), seeds seed + i; the
//!   prompt is counted once in usage. A `response_format` holds every row to a grammar made
//!   from the schema. Both are in `sampling.rs`.
//!
//! The files: this one loads the model and answers requests; `engine.rs` is the decode loop on
//! its thread, `prompt.rs` the chat template and the prompt's tokens, `sampling.rs` how a row
//! picks its tokens. The JSON Schema → GBNF converter is `provider/grammar`: the job checks its
//! schema with it in builds without this feature too.

mod engine;
mod prompt;
mod sampling;

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use futures::future::BoxFuture;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatTemplate, LlamaModel};
use tokio::sync::oneshot;

use crate::chat::{Message, Params};
use crate::error::Error;
use crate::provider::{Completion, ErrorKind, Provider, ProviderError, Request};
use crate::tokens::TokenCounter;
use engine::{Job, PrefixReuse};
use sampling::{Draws, Sampling};

pub use prompt::Tokenizer;

/// Completion cap when the job sets neither `max_tokens` nor `max_completion_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 256;
/// Context per sequence when the job does not set one.
pub const DEFAULT_CONTEXT_TOKENS: u32 = 2048;
/// Most rows decoded together; a larger concurrency queues the extra rows.
pub const MAX_SLOTS: usize = 64;

/// The job's settings for the embedded engine (`[model]`, local provider only).
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// Context per sequence; `None` = [`DEFAULT_CONTEXT_TOKENS`].
    pub context_tokens: Option<u32>,
    /// Let a row start from KV cells another row's prompt left (see
    /// [`engine::Engine::adopt_prefix`]). Off, every row is decoded from scratch: at
    /// concurrency 1 and temperature 0 a row's text is then the same whatever rows ran before
    /// it.
    pub cache_prompt: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            context_tokens: None,
            cache_prompt: true,
        }
    }
}

/// llama.cpp may be initialised once per process; every model shares this backend.
fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // Route llama.cpp/ggml logging (otherwise printed on stderr) into tracing,
            // target "llama-cpp-2"; must happen before the first llama.cpp call.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A GGUF model loaded in-process.
pub struct LocalModel {
    model: Arc<LlamaModel>,
    model_name: String,
    path: PathBuf,
    template: Option<LlamaChatTemplate>,
    /// Tokens one sequence may hold: prompt + completion.
    seq_context: u32,
    parallel: usize,
    /// `None` once dropping, which ends the engine thread.
    jobs: Mutex<Option<Sender<Job>>>,
    engine: Mutex<Option<JoinHandle<()>>>,
    /// Choices drawn per prompt, so a re-asked prompt gets fresh seeds.
    draws: Draws,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("model_name", &self.model_name)
            .field("path", &self.path)
            .field("seq_context", &self.seq_context)
            .field("parallel", &self.parallel)
            .finish()
    }
}

impl LocalModel {
    /// Loads the model once per run; `parallel` = the job's concurrency (sequences decoded
    /// together).
    pub fn load(
        path: &Path,
        model_name: &str,
        params: &Params,
        parallel: usize,
        settings: EngineSettings,
    ) -> Result<Arc<LocalModel>, Error> {
        let model_err = |message: String| Error::Model {
            path: path.to_path_buf(),
            message,
        };
        crate::models::check_model_file(path)?;
        let backend = backend().map_err(|e| model_err(format!("cannot start llama.cpp: {e}")))?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| model_err(format!("llama.cpp could not load the model: {e}")))?;
        let model = Arc::new(model);
        let template = model.chat_template(None).ok();

        let parallel = slots(params, parallel);
        let mut sampling = Sampling::from_params(params);
        sampling.grammar = sampling::job_grammar(&model, params).map_err(model_err)?;
        let per_seq = settings
            .context_tokens
            .unwrap_or(DEFAULT_CONTEXT_TOKENS)
            .clamp(64, model.n_ctx_train().max(64));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
        let reuse = if settings.cache_prompt {
            PrefixReuse::of(&model)
        } else {
            PrefixReuse::Never
        };
        let setup = engine::Setup {
            sampling,
            model_name: model_name.to_string(),
            parallel,
            per_seq,
            threads,
            reuse,
        };
        let engine = engine::start(backend, Arc::clone(&model), setup).map_err(model_err)?;
        let seq_context = engine.seq_ctx;
        tracing::debug!(path = %path.display(), parallel, seq_context, threads, has_template = template.is_some(), "local model loaded");

        Ok(Arc::new(LocalModel {
            model,
            model_name: model_name.to_string(),
            path: path.to_path_buf(),
            template,
            seq_context,
            parallel,
            jobs: Mutex::new(Some(engine.jobs)),
            engine: Mutex::new(Some(engine.thread)),
            draws: Draws::default(),
        }))
    }

    /// Tokens one sequence (prompt + completion) may hold.
    pub fn context_per_sequence(&self) -> u32 {
        self.seq_context
    }
}

/// Sequence slots for a job's concurrency: each of a row's `n` choices is a sequence of its
/// own. Rows beyond the slots wait in the engine's queue; more slots than [`MAX_SLOTS`] only
/// cost KV memory (llama.cpp allows 256 sequences; 2 cores gain nothing past a few).
fn slots(params: &Params, concurrency: usize) -> usize {
    let choices = usize::try_from(params.choices()).unwrap_or(usize::MAX);
    concurrency.saturating_mul(choices).clamp(1, MAX_SLOTS)
}

impl Drop for LocalModel {
    fn drop(&mut self) {
        // Closing the channel ends the engine loop once its current rows are done.
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        if let Some(handle) = self.engine.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
    }
}

impl TokenCounter for LocalModel {
    fn count_prompt(&self, messages: &[Message]) -> u64 {
        self.tokenize_prompt(messages).len() as u64
    }

    fn count_text(&self, text: &str) -> u64 {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), false, false)
            .len() as u64
    }
}

impl Provider for LocalModel {
    fn complete<'a>(
        &'a self,
        req: &'a Request,
    ) -> BoxFuture<'a, Result<Completion, ProviderError>> {
        Box::pin(async move {
            // `images` in the job file are refused when it loads; these came in a row's own
            // messages (`from`), so only this row fails.
            if req.messages.iter().any(|m| m.content.has_images()) {
                return Err(ProviderError::new(
                    ErrorKind::Model,
                    crate::job::TEXT_ONLY_MODEL,
                ));
            }
            let prompt = self.tokenize_prompt(&req.messages);
            // At least one completion token must fit after the prompt.
            if prompt.len() as u64 >= u64::from(self.seq_context) {
                return Err(ProviderError::new(
                    ErrorKind::Model,
                    format!(
                        "the prompt is {} tokens; the model's context holds {} per row (prompt and completion)",
                        prompt.len(),
                        self.seq_context
                    ),
                ));
            }
            // One sequence per choice, each with its own draw of the seed.
            let n = req.choices.max(1);
            let first = self.draws.take(&prompt, n);
            let mut replies = Vec::with_capacity(n as usize);
            let sent = match self.jobs.lock() {
                Ok(guard) => (0..n).all(|i| {
                    let (reply, rx) = oneshot::channel();
                    replies.push(rx);
                    let job = Job {
                        prompt: prompt.clone(),
                        draw: first.wrapping_add(i),
                        reply,
                    };
                    guard.as_ref().is_some_and(|tx| tx.send(job).is_ok())
                }),
                Err(_) => false,
            };
            if !sent {
                return Err(ProviderError::new(
                    ErrorKind::Model,
                    "the local model engine has stopped",
                ));
            }
            sampling::gather(replies).await
        })
    }

    fn is_billed(&self) -> bool {
        false
    }
}

/// The fetched default model and the requests the unit tests in this folder send it.
#[cfg(test)]
mod testing {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::{EngineSettings, LocalModel};
    use crate::chat::Message;
    use crate::chat::{Params, Role};
    use crate::provider::Request;

    pub(super) fn model_path() -> PathBuf {
        let path =
            crate::models::default_model_path().expect("a cache folder (HOME) for the model");
        assert!(
            path.is_file(),
            "the default model is not at {}: run `promptmill fetch-model` first (CI fetches it \
             before the tests)",
            path.display()
        );
        path
    }

    pub(super) fn params(temperature: Option<f64>, max_tokens: u64) -> Params {
        Params {
            temperature,
            max_tokens: Some(max_tokens),
            seed: Some(42),
            ..Params::default()
        }
    }

    pub(super) fn request(messages: Vec<Message>) -> Request {
        Request {
            messages,
            choices: 1,
            body: bytes::Bytes::new(),
        }
    }

    pub(super) fn user(text: &str) -> Message {
        Message {
            role: Role::User,
            name: None,
            content: text.into(),
        }
    }

    pub(super) fn load(p: &Params, parallel: usize) -> Arc<LocalModel> {
        LocalModel::load(
            &model_path(),
            "smollm2",
            p,
            parallel,
            EngineSettings::default(),
        )
        .expect("model loads")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{load, model_path, params, request, user};
    use super::*;
    use crate::chat::Role;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn completes_and_counts_tokens() {
        let model = load(&params(Some(0.0), 8), 1);
        let msgs = vec![
            Message {
                role: Role::System,
                name: None,
                content: "You answer briefly.".into(),
            },
            user("Write a long story about a dragon."),
        ];
        let c = model.complete(&request(msgs.clone())).await.unwrap();
        assert!(!c.text.is_empty(), "empty completion");
        assert_eq!(c.usage.unwrap().prompt_tokens, model.count_prompt(&msgs));
        assert!(c.usage.unwrap().completion_tokens <= 8);
        assert_eq!(
            c.usage.unwrap().total_tokens,
            c.usage.unwrap().prompt_tokens + c.usage.unwrap().completion_tokens
        );
        if c.usage.unwrap().completion_tokens == 8 {
            assert_eq!(c.finish_reason.as_deref(), Some("length"));
        } else {
            assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        }
        assert_eq!(c.model.as_deref(), Some("smollm2"));
        assert!(!model.is_billed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prompt_longer_than_context_fails_the_row() {
        let p = params(Some(0.0), 8);
        let model = LocalModel::load(
            &model_path(),
            "m",
            &p,
            1,
            EngineSettings {
                context_tokens: Some(64),
                ..EngineSettings::default()
            },
        )
        .unwrap();
        let long = "word ".repeat(2000);
        let err = model
            .complete(&request(vec![user(&long)]))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model);
        assert!(err.message.contains("context"), "{}", err.message);
    }

    #[test]
    fn bad_files_are_model_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        let err = LocalModel::load(&p, "m", &Params::default(), 1, EngineSettings::default())
            .unwrap_err();
        assert!(matches!(err, Error::Model { .. }), "{err}");
        std::fs::write(&p, b"hello").unwrap();
        let err = LocalModel::load(&p, "m", &Params::default(), 1, EngineSettings::default())
            .unwrap_err();
        assert!(err.to_string().contains("GGUF"), "{err}");
    }
}
