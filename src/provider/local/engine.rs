//! The decode loop, on a thread of its own that owns the model's context: up to `parallel` rows
//! share one batch per step (continuous batching). A step decodes the next token of every
//! generating row and then chunks of the prompts still being read, and samples one token per
//! row. A row whose prompt begins like one already in the KV cache starts from those cells
//! (see [`Engine::adopt_prefix`]).

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use tokio::sync::oneshot;

use super::sampling::{argmax, RowSampler, Sampling};
use crate::chat::Usage;
use crate::provider::{Completion, ErrorKind, ProviderError};

/// Most tokens handed to one `llama_decode` call; long prompts are ingested in chunks so the
/// rows already generating keep advancing while a new row's prompt is read.
const BATCH_TOKENS: u32 = 512;

/// A row handed to the engine thread.
pub(super) struct Job {
    pub(super) prompt: Vec<LlamaToken>,
    /// Which draw of this prompt the choice is: steps the seed.
    pub(super) draw: u32,
    pub(super) reply: oneshot::Sender<Result<Completion, ProviderError>>,
}

/// What the engine starts with, as `LocalModel::load` resolved it from the job.
pub(super) struct Setup {
    pub(super) sampling: Sampling,
    pub(super) model_name: String,
    /// Sequence slots: rows decoded together.
    pub(super) parallel: usize,
    /// Tokens asked for per sequence.
    pub(super) per_seq: u32,
    pub(super) threads: i32,
    pub(super) reuse: PrefixReuse,
}

/// A running engine: where its rows go, its thread, and the tokens one sequence may hold.
pub(super) struct Started {
    pub(super) jobs: Sender<Job>,
    pub(super) thread: JoinHandle<()>,
    pub(super) seq_ctx: u32,
}

/// Starts the engine thread and waits until its context is made, so a context llama.cpp
/// cannot make fails the load, not the first row.
pub(super) fn start(
    backend: &'static LlamaBackend,
    model: Arc<LlamaModel>,
    setup: Setup,
) -> Result<Started, String> {
    let n_seq = u32::try_from(setup.parallel).map_err(|_| "concurrency too large".to_string())?;
    let ctx_params = context_params(setup.per_seq, n_seq, setup.threads);
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<u32, String>>();
    let thread = std::thread::Builder::new()
        .name("promptmill-llama".into())
        .spawn(move || {
            // The context borrows the model, so both live on this thread's stack.
            let ctx = match model.new_context(backend, ctx_params) {
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
            Engine::new(&model, ctx, setup, seq_ctx).run(&jobs_rx);
        })
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    let seq_ctx = match ready_rx.recv() {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err("the engine thread died while starting".into()),
    };
    Ok(Started {
        jobs: jobs_tx,
        thread,
        seq_ctx,
    })
}

/// One unified KV cache: attention then spans only the cells in use, not every sequence's
/// full share (measured: 70 → 100 generated tokens/s at concurrency 4 with 2048-token
/// sequences). The engine stops each row at `seq_ctx` tokens, so one long row still cannot
/// take the others' room.
fn context_params(per_seq: u32, n_seq: u32, threads: i32) -> LlamaContextParams {
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(per_seq.saturating_mul(n_seq)))
        .with_n_seq_max(n_seq)
        .with_n_batch(BATCH_TOKENS.max(n_seq))
        .with_n_ubatch(BATCH_TOKENS.max(n_seq))
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_kv_unified(true)
}

/// Whether, and from which sequences, a new row may take over KV cells of a prompt prefix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum PrefixReuse {
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
    pub(super) fn of(model: &LlamaModel) -> Self {
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
    fn new(model: &'m LlamaModel, ctx: LlamaContext<'m>, setup: Setup, seq_ctx: u32) -> Self {
        let Setup {
            sampling,
            model_name,
            parallel,
            reuse,
            ..
        } = setup;
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

    /// Decodes until the model is dropped (its sender closed) and no row is left.
    fn run(mut self, jobs: &Receiver<Job>) {
        while self.admit(jobs) {
            self.drop_cancelled();
            if !self.active.is_empty() {
                self.step();
            }
        }
    }

    /// Admits new rows into free slots; blocks only when there is nothing to decode. False
    /// when it blocked and the channel closed: the engine is done.
    fn admit(&mut self, jobs: &Receiver<Job>) -> bool {
        while self.active.len() < self.parallel {
            let job = if self.active.is_empty() {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return false,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            self.seat(job);
        }
        true
    }

    /// Gives a row a free slot, with its sampler and the cells of the longest prompt prefix
    /// the cache holds. A row whose caller gave up, or whose sampler llama.cpp refuses, gets
    /// none.
    fn seat(&mut self, job: Job) {
        if job.reply.is_closed() {
            return;
        }
        let sampler = match self.sampling.row_sampler(self.model, job.draw) {
            Ok(s) => s,
            Err(e) => {
                let _ = job.reply.send(Err(ProviderError::new(ErrorKind::Model, e)));
                return;
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

    /// Rows whose caller gave up (timeout, cancelled run) free their slot at once.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].reply.is_closed() {
                let seq = self.active.remove(i).expect("index in range");
                self.release(seq.slot);
            } else {
                i += 1;
            }
        }
    }

    /// Builds one batch (the next token of every generating row, then prompt chunks of rows
    /// still reading their prompt), decodes it once and samples one token per row.
    fn step(&mut self) {
        self.batch.clear();
        let used = self.batch_pending();
        let used = self.batch_prompts(used);
        if used == 0 {
            return;
        }
        if let Err(e) = self.ctx.decode(&mut self.batch) {
            self.fail_all(e);
            return;
        }
        for seq in &self.active {
            let peak = &mut self.peak[seq.slot as usize];
            *peak = (*peak).max(seq.n_past);
        }
        let picked = self.sample();
        for (i, token) in picked {
            if let Step::Finish(reason) = self.accept(i, token) {
                let seq = self.active.remove(i).expect("index in range");
                self.finish(seq, reason);
            }
        }
    }

    /// Puts every generating row's last sampled token in the batch; returns the tokens used.
    fn batch_pending(&mut self) -> usize {
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
        used
    }

    /// Fills the batch's room after `used` tokens with the next chunks of the prompts still
    /// being read; returns the tokens used in all.
    fn batch_prompts(&mut self, mut used: usize) -> usize {
        let capacity = self.capacity;
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
        used
    }

    /// Every row in a batch that failed to decode is in an unknown state: fail them, free
    /// their cells.
    fn fail_all(&mut self, e: DecodeError) {
        tracing::warn!(error = %e, "llama_decode failed");
        let failed: Vec<Seq> = self.active.drain(..).collect();
        for seq in failed {
            self.release(seq.slot);
            let _ = seq.reply.send(Err(ProviderError::new(
                ErrorKind::Model,
                format!("llama.cpp decode failed: {e}"),
            )));
        }
    }

    /// One token per row with fresh logits, each from the row's own sampler, highest row
    /// index first, so removing a finished row leaves the others' indices valid. (Sampling
    /// rows on several threads measured no faster here: it competes with llama.cpp's OpenMP
    /// threads, which spin between decodes.)
    fn sample(&mut self) -> Vec<(usize, LlamaToken)> {
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
        picked.sort_unstable_by_key(|p| std::cmp::Reverse(p.0));
        picked
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
                ..Usage::default()
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
    use super::super::testing::{load, model_path, params, request, user};
    use super::super::{EngineSettings, LocalModel};
    use super::*;
    use crate::chat::Message;
    use crate::chat::Role;
    use crate::provider::{Provider, Request};
    use crate::tokens::TokenCounter;

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
}
