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
//!   them as `cached_tokens`. See [`Engine::adopt_prefix`].
//! - `n` choices: one sequence each (the slots are concurrency × n), seeds seed + i; the
//!   prompt is counted once in usage. A `response_format` holds every row to a grammar made
//!   from the schema. Both are in `constrained.rs`.

mod sampling;

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use futures::future::BoxFuture;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use crate::provider::{
    Completion, ErrorKind, Message, Provider, ProviderError, Request, TokenCounter, Usage,
};
use sampling::{Draws, RowSampler};
use crate::chat::{Params, Role};
use crate::error::Error;

/// Completion cap when the job sets neither `max_tokens` nor `max_completion_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 256;
/// Context per sequence when the job does not set one.
pub const DEFAULT_CONTEXT_TOKENS: u32 = 2048;
/// Most tokens handed to one `llama_decode` call; long prompts are ingested in chunks so the
/// rows already generating keep advancing while a new row's prompt is read.
const BATCH_TOKENS: u32 = 512;
/// Most rows decoded together; a larger concurrency queues the extra rows.
pub const MAX_SLOTS: usize = 64;

/// The job's settings for the embedded engine (`[model]`, local provider only).
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// Context per sequence; `None` = [`DEFAULT_CONTEXT_TOKENS`].
    pub context_tokens: Option<u32>,
    /// Let a row start from KV cells another row's prompt left (see [`Engine::adopt_prefix`]).
    /// Off, every row is decoded from scratch: at concurrency 1 and temperature 0 a row's text
    /// is then the same whatever rows ran before it.
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
pub(super) fn backend() -> Result<&'static LlamaBackend, String> {
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

/// Sampling settings resolved from the job's params once, applied to every row.
#[derive(Debug, Clone)]
struct Sampling {
    temperature: f32,
    top_p: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    /// `None` = a fresh random seed per row.
    seed: Option<u32>,
    max_tokens: u64,
    stop: Vec<String>,
    /// GBNF from the job's `response_format` (see `grammar.rs`): every row is held to it.
    grammar: Option<String>,
}

impl Sampling {
    fn from_params(p: &Params) -> Self {
        Sampling {
            temperature: p.temperature.unwrap_or(1.0) as f32,
            top_p: p.top_p.unwrap_or(1.0) as f32,
            presence_penalty: p.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: p.frequency_penalty.unwrap_or(0.0) as f32,
            // The API takes an i64; llama.cpp seeds are u32 (u32::MAX means "random" there).
            seed: p.seed.map(|s| s as u32),
            max_tokens: p.max_output_tokens().unwrap_or(DEFAULT_MAX_TOKENS).max(1),
            stop: p
                .stop
                .as_ref()
                .map(|s| s.as_vec())
                .unwrap_or_default()
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            grammar: None,
        }
    }

    /// Greedy with nothing that needs the row's history: the token is the logits' argmax,
    /// taken straight from the logits (see [`argmax`]). Never with a grammar: its sampler
    /// must see (and accept) every token.
    fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.grammar.is_none()
    }

    /// One sampler chain per row, so each row's random state is its own; `draw` steps the
    /// seed (see `constrained.rs`).
    fn sampler(&self, n_vocab: i32, draw: u32) -> LlamaSampler {
        let mut chain = Vec::new();
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            let last_n = i32::try_from(self.max_tokens).unwrap_or(i32::MAX);
            chain.push(LlamaSampler::penalties(
                n_vocab,
                last_n,
                1.0,
                self.frequency_penalty,
                self.presence_penalty,
            ));
        }
        if self.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if self.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(self.top_p, 1));
            }
            chain.push(LlamaSampler::temp(self.temperature));
            chain.push(LlamaSampler::dist(sampling::seed_for(self.seed, draw)));
        }
        LlamaSampler::chain_simple(chain)
    }

    /// The chain and, when the job asks for JSON, its grammar.
    fn row_sampler(&self, model: &LlamaModel, draw: u32) -> Result<RowSampler, String> {
        let grammar = match &self.grammar {
            Some(g) => Some(sampling::grammar_sampler(model, g)?),
            None => None,
        };
        Ok(RowSampler::new(
            self.sampler(model.n_vocab(), draw),
            grammar,
        ))
    }
}

/// A row handed to the engine thread.
struct Job {
    prompt: Vec<LlamaToken>,
    /// Which draw of this prompt the choice is: steps the seed.
    draw: u32,
    reply: oneshot::Sender<Result<Completion, ProviderError>>,
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

        // Rows beyond the slots wait in the engine's queue; more slots than this only costs
        // KV memory (llama.cpp allows 256 sequences; 2 cores gain nothing past a few).
        // Each of a row's `n` choices is a sequence of its own.
        let choices = usize::try_from(params.choices()).unwrap_or(usize::MAX);
        let parallel = parallel.saturating_mul(choices).clamp(1, MAX_SLOTS);
        let grammar = job_grammar(&model, params).map_err(model_err)?;
        let per_seq = settings
            .context_tokens
            .unwrap_or(DEFAULT_CONTEXT_TOKENS)
            .clamp(64, model.n_ctx_train().max(64));
        let n_seq =
            u32::try_from(parallel).map_err(|_| model_err("concurrency too large".into()))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
        // One unified KV cache: attention then spans only the cells in use, not every
        // sequence's full share (measured: 70 → 100 generated tokens/s at concurrency 4 with
        // 2048-token sequences). The engine stops each row at `seq_ctx` tokens, so one long
        // row still cannot take the others' room.
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(per_seq.saturating_mul(n_seq)))
            .with_n_seq_max(n_seq)
            .with_n_batch(BATCH_TOKENS.max(n_seq))
            .with_n_ubatch(BATCH_TOKENS.max(n_seq))
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_kv_unified(true);

        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<u32, String>>();
        let engine_model = Arc::clone(&model);
        let mut engine_sampling = Sampling::from_params(params);
        engine_sampling.grammar = grammar;
        let engine_name = model_name.to_string();
        let reuse = if settings.cache_prompt {
            PrefixReuse::of(&model)
        } else {
            PrefixReuse::Never
        };
        let engine = std::thread::Builder::new()
            .name("promptmill-llama".into())
            .spawn(move || {
                // The context borrows the model, so both live on this thread's stack.
                let ctx = match engine_model.new_context(backend, ctx_params) {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot create a context: {e}")));
                        return;
                    }
                };
                let seq_ctx = ctx.n_ctx() / n_seq;
                tracing::debug!(
                    n_ctx = ctx.n_ctx(),
                    n_batch = ctx.n_batch(),
                    seq_ctx,
                    "llama context ready"
                );
                let _ = ready_tx.send(Ok(seq_ctx));
                Engine::new(
                    &engine_model,
                    ctx,
                    engine_sampling,
                    engine_name,
                    parallel,
                    seq_ctx,
                    reuse,
                )
                .run(&jobs_rx);
            })
            .map_err(|e| model_err(format!("cannot start the engine thread: {e}")))?;
        let seq_context = match ready_rx.recv() {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(model_err(e)),
            Err(_) => return Err(model_err("the engine thread died while starting".into())),
        };
        tracing::debug!(path = %path.display(), parallel, seq_context, threads, has_template = template.is_some(), "local model loaded");

        Ok(Arc::new(LocalModel {
            model,
            model_name: model_name.to_string(),
            path: path.to_path_buf(),
            template,
            seq_context,
            parallel,
            jobs: Mutex::new(Some(jobs_tx)),
            engine: Mutex::new(Some(engine)),
            draws: Draws::default(),
        }))
    }

    /// Tokens one sequence (prompt + completion) may hold.
    pub fn context_per_sequence(&self) -> u32 {
        self.seq_context
    }

    /// The prompt text the model sees for these messages.
    pub fn render_prompt(&self, messages: &[Message]) -> String {
        let Some(tmpl) = &self.template else {
            return plain_prompt(messages);
        };
        let apply = |msgs: &[(String, String)]| -> Option<String> {
            let chat: Vec<LlamaChatMessage> = msgs
                .iter()
                .map(|(r, c)| LlamaChatMessage::new(r.clone(), c.clone()))
                .collect::<Result<_, _>>()
                .ok()?;
            self.model.apply_chat_template(tmpl, &chat, true).ok()
        };
        let msgs: Vec<(String, String)> = messages
            .iter()
            .map(|m| (chat_role(m.role).to_string(), m.content.text().into_owned()))
            .collect();
        if let Some(p) = apply(&msgs) {
            return p;
        }
        // Some templates (Gemma's, in some versions) refuse the system role: fold it into the
        // first user message and try again.
        if let Some(p) = apply(&fold_system(&msgs)) {
            return p;
        }
        plain_prompt(messages)
    }

    /// The prompt's tokens, BOS included once.
    fn tokenize_prompt(&self, messages: &[Message]) -> Vec<LlamaToken> {
        let prompt = self.render_prompt(messages);
        let vocab = self.model.vocab();
        let mut tokens = vocab.tokenize(prompt.as_bytes(), true, true);
        // A template that writes `<bos>` itself plus add_special would give two.
        let bos = vocab.bos();
        if tokens.len() >= 2 && tokens[0] == bos && tokens[1] == bos {
            tokens.remove(0);
        }
        tokens
    }
}

/// The GBNF for the job's `response_format`, checked by llama.cpp once here rather than on
/// every row.
fn job_grammar(model: &LlamaModel, params: &Params) -> Result<Option<String>, String> {
    let Some(rf) = &params.response_format else {
        return Ok(None);
    };
    let gbnf = crate::provider::grammar::for_response_format(rf)
        .map_err(|e| format!("the output schema cannot be a grammar: {e}"))?;
    if let Some(g) = &gbnf {
        sampling::grammar_sampler(model, g)?;
    }
    Ok(gbnf)
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

fn chat_role(role: Role) -> &'static str {
    match role {
        Role::System | Role::Developer => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

fn fold_system(msgs: &[(String, String)]) -> Vec<(String, String)> {
    let system: Vec<&str> = msgs
        .iter()
        .filter(|(r, _)| r == "system")
        .map(|(_, c)| c.as_str())
        .collect();
    let mut rest: Vec<(String, String)> = msgs
        .iter()
        .filter(|(r, _)| r != "system")
        .cloned()
        .collect();
    if system.is_empty() {
        return rest;
    }
    let sys = system.join("\n\n");
    match rest.iter_mut().find(|(r, _)| r == "user") {
        Some((_, c)) => *c = format!("{sys}\n\n{c}"),
        None => rest.insert(0, ("user".into(), sys)),
    }
    rest
}

/// The fallback prompt for models without a usable chat template.
fn plain_prompt(messages: &[Message]) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str(chat_role(m.role));
        s.push_str(": ");
        s.push_str(&m.content.text());
        s.push('\n');
    }
    s.push_str("assistant:");
    s
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
            let n = sampling::choices_asked(&req.body);
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

/// Whether, and from which sequences, a new row may take over KV cells of a prompt prefix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PrefixReuse {
    /// Recurrent and hybrid models keep a state, not per-position cells: nothing to share.
    Never,
    /// Full attention: any prefix still in a sequence's cells is complete.
    Always,
    /// Sliding-window attention over this many positions: llama.cpp may overwrite a cell once
    /// its sequence has moved a window past it, so only sequences that never grew that long
    /// are sure to hold their whole prefix.
    Within(u32),
}

impl PrefixReuse {
    fn of(model: &LlamaModel) -> Self {
        if model.is_recurrent() || model.is_hybrid() {
            return PrefixReuse::Never;
        }
        let arch = model
            .meta_val_str("general.architecture")
            .unwrap_or_default();
        let key = format!("{arch}.attention.sliding_window");
        let stated = model
            .meta_val_str(&key)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|&w| w > 0);
        // Architectures whose window llama.cpp sets in code, with or without that key
        // (src/models/*.cpp); the smaller of the two is the safe one.
        let built_in = match arch.as_str() {
            "gemma2" | "exaone4" | "smallthinker" => Some(4096),
            "exaone-moe" => Some(128),
            "llama4" => Some(8192),
            _ => None,
        };
        match (stated, built_in) {
            (Some(a), Some(b)) => PrefixReuse::Within(a.min(b)),
            (Some(w), None) | (None, Some(w)) => PrefixReuse::Within(w),
            (None, None) => PrefixReuse::Always,
        }
    }

    /// Whether a sequence that has held at most `peak` positions still has every cell.
    fn intact(self, peak: u32) -> bool {
        match self {
            PrefixReuse::Never => false,
            PrefixReuse::Always => true,
            PrefixReuse::Within(w) => peak < w,
        }
    }
}

/// The token with the highest logit, the first one on a tie: what llama.cpp's greedy sampler
/// picks, without its copy of every logit into a candidate array first (per row and token,
/// 49,152 entries for SmolLM2, 262,144 for Gemma 3).
fn argmax(logits: &[f32]) -> LlamaToken {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    LlamaToken::new(i32::try_from(best).expect("vocabulary fits in i32"))
}

/// A row being decoded in one of the context's sequence slots.
struct Seq {
    slot: i32,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens already in the KV cache.
    fed: usize,
    /// Positions used in this sequence's KV cells (= next token's position).
    n_past: u32,
    /// Prompt tokens whose cells came from an earlier prompt (see [`Engine::adopt_prefix`]).
    reused: usize,
    /// The last sampled token, to be decoded in the next step.
    pending: Option<LlamaToken>,
    /// Index in the current batch whose logits this sequence samples from.
    logits_at: Option<i32>,
    sampler: RowSampler,
    generated: u64,
    bytes: Vec<u8>,
    text: String,
    decoder: encoding_rs::Decoder,
    reply: oneshot::Sender<Result<Completion, ProviderError>>,
}

enum Step {
    Continue,
    Finish(&'static str),
}

struct Engine<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    sampling: Sampling,
    model_name: String,
    parallel: usize,
    seq_ctx: u32,
    free_slots: Vec<i32>,
    active: VecDeque<Seq>,
    /// Tokens per decode call: llama.cpp caps `n_batch` at `n_ctx`, so read it back.
    capacity: usize,
    batch: LlamaBatch<'static>,
    longest_stop: usize,
    reuse: PrefixReuse,
    /// Per slot: the prompt tokens whose cells its sequence holds, from position 0. A free
    /// slot keeps its last row's, so that the next row may start from them.
    cached: Vec<Vec<LlamaToken>>,
    /// Per slot: the most positions its sequence has held since it was last emptied.
    peak: Vec<u32>,
}

impl<'m> Engine<'m> {
    fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        sampling: Sampling,
        model_name: String,
        parallel: usize,
        seq_ctx: u32,
        reuse: PrefixReuse,
    ) -> Self {
        let longest_stop = sampling.stop.iter().map(String::len).max().unwrap_or(0);
        // n_ctx >= 64 × parallel, so a step with one token per row always fits.
        let capacity = ctx.n_batch() as usize;
        Engine {
            model,
            ctx,
            sampling,
            model_name,
            parallel,
            seq_ctx,
            free_slots: (0..parallel as i32).rev().collect(),
            active: VecDeque::new(),
            capacity,
            batch: LlamaBatch::new(capacity, 1),
            longest_stop,
            reuse,
            cached: vec![Vec::new(); parallel],
            peak: vec![0; parallel],
        }
    }

    fn run(mut self, jobs: &Receiver<Job>) {
        loop {
            // Admit new rows into free slots; block only when there is nothing to decode.
            while self.active.len() < self.parallel {
                let job = if self.active.is_empty() {
                    match jobs.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                };
                if job.reply.is_closed() {
                    continue;
                }
                let sampler = match self.sampling.row_sampler(self.model, job.draw) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = job.reply.send(Err(ProviderError::new(ErrorKind::Model, e)));
                        continue;
                    }
                };
                let slot = self
                    .free_slots
                    .pop()
                    .expect("a free slot while below `parallel`");
                let reused = self.adopt_prefix(slot, &job.prompt);
                self.active.push_back(Seq {
                    slot,
                    prompt: job.prompt,
                    fed: reused,
                    n_past: reused as u32,
                    reused,
                    pending: None,
                    logits_at: None,
                    sampler,
                    generated: 0,
                    bytes: Vec::new(),
                    text: String::new(),
                    decoder: encoding_rs::UTF_8.new_decoder_without_bom_handling(),
                    reply: job.reply,
                });
            }
            // Rows whose caller gave up (timeout, cancelled run) free their slot at once.
            let mut i = 0;
            while i < self.active.len() {
                if self.active[i].reply.is_closed() {
                    let seq = self.active.remove(i).expect("index in range");
                    self.release(seq.slot);
                } else {
                    i += 1;
                }
            }
            if self.active.is_empty() {
                continue;
            }
            self.step();
        }
    }

    /// Builds one batch (the next token of every generating row, then prompt chunks of rows
    /// still reading their prompt), decodes it once and samples one token per row.
    fn step(&mut self) {
        self.batch.clear();
        let capacity = self.capacity;
        let mut used = 0usize;
        for seq in self.active.iter_mut() {
            seq.logits_at = None;
            if let Some(tok) = seq.pending.take() {
                self.batch
                    .add(tok, seq.n_past as i32, &[seq.slot], true)
                    .expect("batch sized for every slot");
                seq.logits_at = Some(used as i32);
                seq.n_past += 1;
                used += 1;
            }
        }
        for seq in self.active.iter_mut() {
            if seq.fed >= seq.prompt.len() || used >= capacity {
                continue;
            }
            let take = (seq.prompt.len() - seq.fed).min(capacity - used);
            for k in 0..take {
                let last = seq.fed + k + 1 == seq.prompt.len();
                self.batch
                    .add(
                        seq.prompt[seq.fed + k],
                        seq.n_past as i32,
                        &[seq.slot],
                        last,
                    )
                    .expect("within capacity");
                if last {
                    seq.logits_at = Some(used as i32);
                }
                seq.n_past += 1;
                used += 1;
            }
            self.cached[seq.slot as usize].extend_from_slice(&seq.prompt[seq.fed..seq.fed + take]);
            seq.fed += take;
        }
        if used == 0 {
            return;
        }

        if let Err(e) = self.ctx.decode(&mut self.batch) {
            // Every row in this batch is in an unknown state: fail them, free their cells.
            tracing::warn!(error = %e, "llama_decode failed");
            let failed: Vec<Seq> = self.active.drain(..).collect();
            for seq in failed {
                self.release(seq.slot);
                let _ = seq.reply.send(Err(ProviderError::new(
                    ErrorKind::Model,
                    format!("llama.cpp decode failed: {e}"),
                )));
            }
            return;
        }

        for seq in &self.active {
            let peak = &mut self.peak[seq.slot as usize];
            *peak = (*peak).max(seq.n_past);
        }

        // One token per row with fresh logits, each from the row's own sampler. (Sampling rows
        // on several threads measured no faster here: it competes with llama.cpp's OpenMP
        // threads, which spin between decodes.)
        let greedy = self.sampling.is_plain_greedy();
        let mut picked: Vec<(usize, LlamaToken)> = Vec::with_capacity(self.active.len());
        for (i, seq) in self.active.iter_mut().enumerate() {
            if let Some(idx) = seq.logits_at {
                let token = if greedy {
                    argmax(self.ctx.get_logits_ith(idx))
                } else {
                    seq.sampler.sample(&self.ctx, idx)
                };
                picked.push((i, token));
            }
        }
        // Highest index first, so removing a finished row leaves the others' indices valid.
        picked.sort_unstable_by_key(|p| std::cmp::Reverse(p.0));
        for (i, token) in picked {
            if let Step::Finish(reason) = self.accept(i, token) {
                let seq = self.active.remove(i).expect("index in range");
                self.finish(seq, reason);
            }
        }
    }

    /// Records a sampled token for row `i` and decides whether the row is done.
    fn accept(&mut self, i: usize, token: LlamaToken) -> Step {
        let vocab = self.model.vocab();
        let max_tokens = self.sampling.max_tokens;
        let seq = &mut self.active[i];
        if vocab.is_eog(token) {
            return Step::Finish("stop");
        }
        seq.generated += 1;
        seq.bytes.clear();
        vocab.token_to_piece_into(token, &mut seq.bytes, false, None);
        let before = seq.text.len();
        // A UTF-8 character may span tokens: the streaming decoder keeps the partial bytes.
        let max = seq
            .decoder
            .max_utf8_buffer_length(seq.bytes.len())
            .unwrap_or(seq.bytes.len() * 3 + 4);
        seq.text.reserve(max);
        let _ = seq
            .decoder
            .decode_to_string(&seq.bytes, &mut seq.text, false);
        if self.longest_stop > 0 {
            // Only a match overlapping the new text can be new.
            let mut from = before.saturating_sub(self.longest_stop - 1);
            while !seq.text.is_char_boundary(from) {
                from -= 1;
            }
            let hit = self
                .sampling
                .stop
                .iter()
                .filter_map(|s| seq.text[from..].find(s.as_str()).map(|at| from + at))
                .min();
            if let Some(at) = hit {
                seq.text.truncate(at);
                return Step::Finish("stop");
            }
        }
        if seq.generated >= max_tokens || seq.n_past >= self.seq_ctx {
            return Step::Finish("length");
        }
        seq.pending = Some(token);
        Step::Continue
    }

    fn finish(&mut self, mut seq: Seq, reason: &'static str) {
        // The cells stay: the next row in any slot may begin with this prompt's prefix.
        self.free_slots.push(seq.slot);
        let _ = seq.decoder.decode_to_string(&[], &mut seq.text, true);
        // The plain "assistant:" prompt makes the model open with a space; the API's texts
        // do not start with whitespace, so drop it.
        let lead = seq.text.len() - seq.text.trim_start().len();
        seq.text.drain(..lead);
        let prompt_tokens = seq.prompt.len() as u64;
        let completion = Completion {
            text: seq.text,
            finish_reason: Some(reason.to_string()),
            model: Some(self.model_name.clone()),
            usage: Some(Usage {
                prompt_tokens,
                completion_tokens: seq.generated,
                total_tokens: prompt_tokens + seq.generated,
                cached_tokens: (seq.reused > 0).then_some(seq.reused as u64),
                reasoning_tokens: None,
                estimated: false,
            }),
            rate_limits: None,
            ..Completion::default()
        };
        let _ = seq.reply.send(Ok(completion));
    }

    /// Frees a slot and its KV cells (a row cancelled or failed: its cells are not trusted).
    fn release(&mut self, slot: i32) {
        self.empty(slot);
        self.free_slots.push(slot);
    }

    fn empty(&mut self, slot: i32) {
        let _ = self.ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
        self.cached[slot as usize].clear();
        self.peak[slot as usize] = 0;
    }

    /// Readies slot `dst` for `prompt` and returns how many of its first tokens already have
    /// cells there: the longest prefix any slot holds (its own last row's, or another row's,
    /// whose cells llama.cpp then shares between both sequences: one unified KV cache, no
    /// copy). The last prompt token is always decoded again, for its logits. Rows built from
    /// one template share at least its opening, and a long shared system prompt is decoded
    /// once per run rather than once per row.
    fn adopt_prefix(&mut self, dst: i32, prompt: &[LlamaToken]) -> usize {
        let limit = prompt.len().saturating_sub(1);
        let mut best = (0usize, dst);
        for (s, cached) in self.cached.iter().enumerate() {
            if !self.reuse.intact(self.peak[s]) {
                continue;
            }
            let n = cached
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(limit);
            // On a tie, the slot's own cells: nothing to share.
            if n > best.0 || (n == best.0 && n > 0 && s as i32 == dst) {
                best = (n, s as i32);
            }
        }
        let (n, src) = best;
        if n == 0 {
            self.empty(dst);
            return 0;
        }
        let to = n as u32;
        if src == dst {
            // Drop what follows the prefix (the rest of the old prompt, its completion).
            if !matches!(
                self.ctx
                    .clear_kv_cache_seq(Some(dst as u32), Some(to), None),
                Ok(true)
            ) {
                self.empty(dst);
                return 0;
            }
            self.cached[dst as usize].truncate(n);
        } else {
            self.empty(dst);
            if self
                .ctx
                .copy_kv_cache_seq(src, dst, None, Some(to))
                .is_err()
            {
                self.empty(dst);
                return 0;
            }
            let prefix = self.cached[src as usize][..n].to_vec();
            self.cached[dst as usize] = prefix;
            self.peak[dst as usize] = to;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_path() -> PathBuf {
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

    fn params(temperature: Option<f64>, max_tokens: u64) -> Params {
        Params {
            temperature,
            max_tokens: Some(max_tokens),
            seed: Some(42),
            ..Params::default()
        }
    }

    fn request(messages: Vec<Message>) -> Request {
        Request {
            messages,
            body: bytes::Bytes::new(),
        }
    }

    fn user(text: &str) -> Message {
        Message {
            role: Role::User,
            name: None,
            content: text.into(),
        }
    }

    fn load(p: &Params, parallel: usize) -> Arc<LocalModel> {
        LocalModel::load(
            &model_path(),
            "smollm2",
            p,
            parallel,
            EngineSettings::default(),
        )
        .expect("model loads")
    }

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
    async fn greedy_and_seeded_sampling_are_deterministic() {
        for (temperature, prompt) in [
            (0.0, "Name three colours."),
            (0.8, "Tell me a fact about the sea."),
        ] {
            // Two loads, as two runs: within one, a prompt asked again draws a fresh seed.
            let req = request(vec![user(prompt)]);
            let p = params(Some(temperature), 8);
            let a = load(&p, 1).complete(&req).await.unwrap();
            let b = load(&p, 1).complete(&req).await.unwrap();
            assert_eq!(a.text, b.text, "temperature {temperature}");
        }
    }

    fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> u64 {
        a.iter().zip(b).take_while(|(x, y)| x == y).count() as u64
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_prompt_prefix_is_decoded_once() {
        let system = Message {
            role: Role::System,
            name: None,
            content: "You are a careful copywriter. Keep every answer short and plain. "
                .repeat(6)
                .into(),
        };
        let ask = |q: &str| request(vec![system.clone(), user(q)]);
        let (a, b, c) = (
            ask("Name a fruit."),
            ask("Name a colour."),
            ask("Name a city."),
        );
        let model = load(&params(Some(0.0), 4), 2);
        let tokens = |r: &Request| model.tokenize_prompt(&r.messages);
        let (ta, tb, tc) = (tokens(&a), tokens(&b), tokens(&c));
        let shared = common_prefix(&ta, &tb);
        // The system prompt and the template's opening, then the questions part.
        assert!(shared > 60, "{shared}");
        assert_eq!(common_prefix(&ta, &tc), shared);
        assert_eq!(common_prefix(&tb, &tc), shared);

        let first = model.complete(&a).await.unwrap();
        assert_eq!(first.usage.unwrap().cached_tokens, None);
        // Two at once: one in the slot `a` left (its own cells), one in the other slot
        // (cells shared from the first).
        let (rb, rc) = tokio::join!(model.complete(&b), model.complete(&c));
        for (r, t) in [(rb.unwrap(), &tb), (rc.unwrap(), &tc)] {
            let u = r.usage.unwrap();
            assert_eq!(u.cached_tokens, Some(shared));
            assert_eq!(u.prompt_tokens, t.len() as u64);
            assert!(u.completion_tokens > 0 && !r.text.is_empty(), "{r:?}");
        }
        // A prompt still whole in some slot: all but its last token, which is decoded again
        // for its logits. (`a`'s cells past the shared part went to `b`.)
        let again = model.complete(&b).await.unwrap();
        assert_eq!(
            again.usage.unwrap().cached_tokens,
            Some(tb.len() as u64 - 1)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_cache_prompt_a_row_reads_the_same_whatever_ran_before_it() {
        let p = params(Some(0.0), 8);
        let settings = EngineSettings {
            cache_prompt: false,
            ..EngineSettings::default()
        };
        let fresh = || LocalModel::load(&model_path(), "m", &p, 1, settings).unwrap();
        let target = request(vec![user("Translate into French: the shop opens at nine.")]);
        let alone = fresh().complete(&target).await.unwrap();
        let model = fresh();
        for q in [
            "Translate into French: the cat sat on the mat.",
            "Translate into French: the shop is closed.",
        ] {
            let r = model.complete(&request(vec![user(q)])).await.unwrap();
            assert_eq!(r.usage.unwrap().cached_tokens, None);
        }
        let after = model.complete(&target).await.unwrap();
        assert_eq!(after.usage.unwrap().cached_tokens, None);
        assert_eq!(after.text, alone.text);
    }

    #[test]
    fn prefixes_are_reused_only_from_sequences_that_kept_every_cell() {
        assert!(PrefixReuse::Always.intact(100_000));
        assert!(!PrefixReuse::Never.intact(0));
        // A sliding window of 512: a sequence that reached 512 positions may have lost its
        // first cells to newer tokens.
        assert!(PrefixReuse::Within(512).intact(511));
        assert!(!PrefixReuse::Within(512).intact(512));
        let model = load(&params(Some(0.0), 4), 1);
        // SmolLM2 (llama architecture) attends to every position.
        assert_eq!(PrefixReuse::of(&model.model), PrefixReuse::Always);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_rows_all_complete() {
        let model = load(&params(Some(0.0), 8), 4);
        let reqs: Vec<Request> = [
            "What is 2+2?",
            "Say hello.",
            "Name a fruit.",
            "Describe the moon in detail, please.",
        ]
        .iter()
        .map(|t| request(vec![user(t)]))
        .collect();
        let (a, b, c, d) = tokio::join!(
            model.complete(&reqs[0]),
            model.complete(&reqs[1]),
            model.complete(&reqs[2]),
            model.complete(&reqs[3]),
        );
        for (r, c) in reqs.iter().zip([a, b, c, d]) {
            let c = c.unwrap();
            assert!(!c.text.is_empty() || c.usage.unwrap().completion_tokens == 0);
            assert_eq!(
                c.usage.unwrap().prompt_tokens,
                model.count_prompt(&r.messages)
            );
            assert!(c.usage.unwrap().completion_tokens <= 8);
        }
        // More rows than slots: the extra rows wait for a free slot.
        let many: Vec<_> = (0..9)
            .map(|i| request(vec![user(&format!("Count to {i}."))]))
            .collect();
        let done = futures::future::join_all(many.iter().map(|r| model.complete(r))).await;
        assert!(done.into_iter().all(|r| r.is_ok()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_string_cuts_the_text() {
        let mut p = params(Some(0.0), 16);
        let probe = load(&p, 1);
        let req = request(vec![user(
            "List the numbers from 1 to 20, comma separated.",
        )]);
        let full = probe.complete(&req).await.unwrap();
        drop(probe);
        // Stop at the second character of the free-running text.
        let Some(stop) = full.text.chars().nth(1).filter(|c| !c.is_whitespace()) else {
            return;
        };
        p.stop = Some(crate::chat::Stop::One(stop.to_string()));
        let model = load(&p, 1);
        let c = model.complete(&req).await.unwrap();
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        assert!(
            !c.text.contains(stop),
            "{:?} still holds the stop string {stop:?}",
            c.text
        );
        assert!(full.text.starts_with(&c.text));
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

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0]), LlamaToken::new(1));
        assert_eq!(argmax(&[3.0]), LlamaToken::new(0));
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1e30]), LlamaToken::new(1));
    }

    /// The greedy shortcut must pick what llama.cpp's greedy sampler picks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn greedy_shortcut_matches_the_greedy_sampler() {
        let plain = load(&params(Some(0.0), 12), 1);
        // A penalty of 0 leaves the logits alone, but sends the row through the sampler chain.
        let mut p = params(Some(0.0), 12);
        p.presence_penalty = Some(1e-9);
        let chain = load(&p, 1);
        for prompt in ["Name three colours.", "What is the capital of France?"] {
            let req = request(vec![user(prompt)]);
            let a = plain.complete(&req).await.unwrap();
            let b = chain.complete(&req).await.unwrap();
            assert_eq!(a.text, b.text, "{prompt}");
        }
    }

    #[test]
    fn system_is_folded_into_the_first_user_message() {
        let msgs = vec![
            ("system".to_string(), "S".to_string()),
            ("user".to_string(), "U".to_string()),
        ];
        assert_eq!(
            fold_system(&msgs),
            vec![("user".to_string(), "S\n\nU".to_string())]
        );
    }
}
