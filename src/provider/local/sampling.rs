//! How a row picks its tokens: the sampler chain resolved once from the job's params, the
//! greedy shortcut, the grammar when the job asks for JSON (`provider/grammar` turns the schema
//! into GBNF), which seed each choice draws with, and the `n` choices of a request gathered
//! into one completion.
//!
//! Seeds: choice i of the first request for a prompt samples with `seed + i`, so choice 0 is
//! what the same job with `n = 1` writes. The same prompt asked again in the same run (the
//! scheduler re-asking for choices that broke the schema or a check) draws on from where it
//! stopped, `seed + n`, `seed + n + 1`, …: a re-ask is a fresh draw, never a copy of an answer
//! already judged, and a rerun of the job repeats the same draws. Without a seed every choice
//! gets a random one. At temperature 0 every draw is the same greedy text.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use super::DEFAULT_MAX_TOKENS;
use crate::chat::Params;
use crate::provider::{Choice, Completion, ErrorKind, ProviderError};

/// The likeliest tokens a pick the grammar refused is made again from.
const TOP_K: usize = 1024;

/// The grammar's start rule, as `grammar.rs` writes it.
const ROOT: &str = "root";

/// Sampling settings resolved from the job's params once, applied to every row.
#[derive(Debug, Clone)]
pub(super) struct Sampling {
    temperature: f32,
    top_p: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    /// `None` = a fresh random seed per row.
    seed: Option<u32>,
    pub(super) max_tokens: u64,
    pub(super) stop: Vec<String>,
    /// GBNF from the job's `response_format` (see `provider/grammar`): every row is held to it.
    pub(super) grammar: Option<String>,
}

impl Sampling {
    pub(super) fn from_params(p: &Params) -> Self {
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
    pub(super) fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.grammar.is_none()
    }

    /// One sampler chain per row, so each row's random state is its own; `draw` steps the
    /// seed (see [`seed_for`]).
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
            chain.push(LlamaSampler::dist(seed_for(self.seed, draw)));
        }
        LlamaSampler::chain_simple(chain)
    }

    /// The chain and, when the job asks for JSON, its grammar.
    pub(super) fn row_sampler(&self, model: &LlamaModel, draw: u32) -> Result<RowSampler, String> {
        let grammar = match &self.grammar {
            Some(g) => Some(grammar_sampler(model, g)?),
            None => None,
        };
        Ok(RowSampler::new(
            self.sampler(model.n_vocab(), draw),
            grammar,
        ))
    }
}

/// A row's sampler: the job's sampling chain, and the grammar when the job asks for JSON.
pub(super) struct RowSampler {
    chain: LlamaSampler,
    grammar: Option<LlamaSampler>,
    /// The step's candidates, reused: one entry per vocabulary token.
    cur: LlamaTokenDataArray,
}

impl RowSampler {
    fn new(chain: LlamaSampler, grammar: Option<LlamaSampler>) -> Self {
        RowSampler {
            chain,
            grammar,
            cur: LlamaTokenDataArray::new(Vec::new(), false),
        }
    }

    /// Picks and accepts the next token from the logits at `idx`.
    ///
    /// With a grammar, the chain picks from every token first and the grammar only checks that
    /// pick (one token: cheap), as llama.cpp's own server does. When the grammar refuses it,
    /// the pick is made again among the [`TOP_K`] likeliest tokens the grammar allows, and
    /// among every token it allows only when none of those is: the grammar over Gemma 3's
    /// 262k-token vocabulary took 30–60 ms per token, over 1,024 tokens about 1 ms. Greedy
    /// decoding picks the same token either way; sampling leaves out only the far tail.
    pub(super) fn sample(&mut self, ctx: &LlamaContext<'_>, idx: i32) -> LlamaToken {
        let Some(grammar) = self.grammar.as_mut() else {
            return self.chain.sample(ctx, idx);
        };
        let cur = &mut self.cur;
        let fill = |cur: &mut LlamaTokenDataArray| {
            cur.data.clear();
            cur.data.extend(ctx.candidates_ith(idx));
            cur.selected = None;
            cur.sorted = false;
        };
        fill(cur);
        cur.apply_sampler(&mut self.chain);
        let mut token = cur
            .selected_token()
            .expect("the chain ends in a selecting sampler");
        let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 1.0, 0.0)], false);
        one.apply_sampler(grammar);
        if one.data[0].logit() == f32::NEG_INFINITY {
            // The pick breaks the grammar: pick again among the most likely tokens it allows
            // (every token it allows when none of those is).
            fill(cur);
            let k = TOP_K.min(cur.data.len());
            cur.data
                .select_nth_unstable_by(k - 1, |a, b| b.logit().total_cmp(&a.logit()));
            cur.data.truncate(k);
            cur.apply_sampler(grammar);
            if cur.data.iter().all(|d| d.logit() == f32::NEG_INFINITY) {
                fill(cur);
                cur.apply_sampler(grammar);
            }
            cur.apply_sampler(&mut self.chain);
            token = cur
                .selected_token()
                .expect("the chain ends in a selecting sampler");
        }
        // The pick passed the grammar: accepting it cannot fail (llama.cpp aborts on a token
        // its grammar refuses, an end-of-generation token included).
        grammar.accept(token);
        self.chain.accept(token);
        token
    }
}

/// The token with the highest logit, the first one on a tie: what llama.cpp's greedy sampler
/// picks, without its copy of every logit into a candidate array first (per row and token,
/// 49,152 entries for SmolLM2, 262,144 for Gemma 3).
pub(super) fn argmax(logits: &[f32]) -> LlamaToken {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    LlamaToken::new(i32::try_from(best).expect("vocabulary fits in i32"))
}

/// The grammar sampler for a GBNF text; `Err` when llama.cpp refuses it.
fn grammar_sampler(model: &LlamaModel, gbnf: &str) -> Result<LlamaSampler, String> {
    LlamaSampler::grammar(model, gbnf, ROOT).map_err(|e| {
        format!("llama.cpp refused the grammar made from the output schema ({e}); its log says why")
    })
}

/// The GBNF for the job's `response_format`, checked by llama.cpp once here rather than on
/// every row.
pub(super) fn job_grammar(model: &LlamaModel, params: &Params) -> Result<Option<String>, String> {
    let Some(rf) = &params.response_format else {
        return Ok(None);
    };
    let gbnf = crate::provider::grammar::for_response_format(rf)
        .map_err(|e| format!("the output schema cannot be a grammar: {e}"))?;
    if let Some(g) = &gbnf {
        grammar_sampler(model, g)?;
    }
    Ok(gbnf)
}

/// The seed of a choice: `seed + draw`, skipping `u32::MAX` (llama.cpp's "random").
fn seed_for(seed: Option<u32>, draw: u32) -> u32 {
    match seed {
        None => u32::MAX,
        Some(s) => match s.wrapping_add(draw) {
            u32::MAX => 0,
            s => s,
        },
    }
}

/// How many choices each prompt has drawn in this run, so a prompt asked again draws on.
/// Bounded: two generations of at most [`Draws::GENERATION`] prompts each; a re-ask follows
/// its first answer closely, long before its prompt ages out.
#[derive(Default)]
pub(super) struct Draws {
    maps: Mutex<[HashMap<u64, u32>; 2]>,
}

impl Draws {
    const GENERATION: usize = 100_000;

    /// The first draw for `n` more choices of this prompt.
    pub(super) fn take(&self, prompt: &[LlamaToken], n: u32) -> u32 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for t in prompt {
            t.0.hash(&mut h);
        }
        let key = h.finish();
        let Ok(mut maps) = self.maps.lock() else {
            return 0;
        };
        let first = maps[0]
            .get(&key)
            .or_else(|| maps[1].get(&key))
            .copied()
            .unwrap_or(0);
        if maps[0].len() >= Self::GENERATION {
            maps[1] = std::mem::take(&mut maps[0]);
        }
        maps[0].insert(key, first.wrapping_add(n));
        first
    }
}

/// One completion from a request's choices, in order: the first is also `text` and
/// `finish_reason`; the prompt is counted once, every choice's tokens are added. A failed
/// choice fails the request.
pub(super) async fn gather(
    choices: Vec<oneshot::Receiver<Result<Completion, ProviderError>>>,
) -> Result<Completion, ProviderError> {
    let n = choices.len();
    let stopped = || ProviderError::new(ErrorKind::Model, "the local model engine has stopped");
    let mut done = Vec::with_capacity(n);
    for c in futures::future::join_all(choices).await {
        done.push(c.unwrap_or_else(|_| Err(stopped()))?);
    }
    let mut first = done.remove(0);
    if n == 1 {
        return Ok(first);
    }
    let mut usage = first.usage.unwrap_or_default();
    let mut all = vec![Choice {
        text: first.text.clone(),
        finish_reason: first.finish_reason.clone(),
        refusal: None,
    }];
    for c in done {
        let u = c.usage.unwrap_or_default();
        usage.completion_tokens += u.completion_tokens;
        all.push(Choice {
            text: c.text,
            finish_reason: c.finish_reason,
            refusal: None,
        });
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    first.usage = Some(usage);
    first.choices = all;
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{load, model_path, params, request, user};
    use super::*;
    use crate::chat::Usage;
    use crate::provider::Provider;
    use serde_json::json;

    #[test]
    fn seeds_step_per_draw_and_never_mean_random() {
        assert_eq!(seed_for(Some(42), 0), 42);
        assert_eq!(seed_for(Some(42), 2), 44);
        assert_eq!(seed_for(Some(u32::MAX - 1), 1), 0);
        assert_eq!(seed_for(None, 3), u32::MAX);
    }

    #[test]
    fn a_prompt_asked_again_draws_on() {
        let d = Draws::default();
        let a = [LlamaToken(1), LlamaToken(2)];
        let b = [LlamaToken(2), LlamaToken(1)];
        assert_eq!(d.take(&a, 3), 0);
        assert_eq!(d.take(&b, 1), 0);
        assert_eq!(d.take(&a, 1), 3);
        assert_eq!(d.take(&a, 2), 4);
        assert_eq!(d.take(&b, 1), 1);
    }

    #[tokio::test]
    async fn choices_are_gathered_with_the_prompt_counted_once() {
        let mut rxs = Vec::new();
        for (text, c) in [("a", 3), ("bb", 5)] {
            let (tx, rx) = oneshot::channel();
            tx.send(Ok(Completion {
                text: text.into(),
                finish_reason: Some("stop".into()),
                usage: Some(Usage {
                    prompt_tokens: 10,
                    completion_tokens: c,
                    total_tokens: 10 + c,
                    ..Usage::default()
                }),
                ..Completion::default()
            }))
            .unwrap();
            rxs.push(rx);
        }
        let c = gather(rxs).await.unwrap();
        assert_eq!(c.text, "a");
        let u = c.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (10, 8, 18)
        );
        let texts: Vec<&str> = c.choices.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["a", "bb"]);
    }

    fn ask(text: &str, n: u32) -> crate::provider::Request {
        crate::provider::Request {
            messages: vec![crate::chat::Message {
                role: crate::chat::Role::User,
                name: None,
                content: text.into(),
            }],
            choices: n,
            body: bytes::Bytes::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_local_model_writes_json_that_follows_the_schema() {
        let schema = json!({
            "type": "object",
            "properties": {
                "headline": {"type": "string", "maxLength": 30},
                "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}
            },
            "required": ["headline", "stars", "tags"],
            "additionalProperties": false
        });
        let params = crate::chat::Params {
            temperature: Some(0.8),
            seed: Some(7),
            max_tokens: Some(120),
            response_format: Some(json!({"type": "json_schema", "json_schema": {
                "name": "ad", "strict": true, "schema": schema
            }})),
            ..Default::default()
        };
        let model = load(&params, 3);
        let reqs: Vec<_> = ["running shoes", "a cookbook", "green tea"]
            .iter()
            .map(|p| ask(&format!("Write an ad for {p} as JSON."), 1))
            .collect();
        let done = futures::future::join_all(reqs.iter().map(|r| model.complete(r))).await;
        for c in done {
            let c = c.unwrap();
            let v: serde_json::Value = serde_json::from_str(&c.text)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", c.text));
            assert!(jsonschema::is_valid(&schema, &v), "{}", c.text);
            assert_eq!(c.finish_reason.as_deref(), Some("stop"), "{}", c.text);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn n_choices_draw_their_own_seeds_and_count_the_prompt_once() {
        use crate::tokens::TokenCounter;
        let params = crate::chat::Params {
            temperature: Some(1.0),
            seed: Some(42),
            max_tokens: Some(16),
            n: Some(3),
            ..Default::default()
        };
        let model = load(&params, 1);
        let req = ask("Write a short poem about the sea.", 3);
        let c = model.complete(&req).await.unwrap();
        assert_eq!(c.choices.len(), 3);
        assert_eq!(c.text, c.choices[0].text);
        assert_eq!(c.finish_reason, c.choices[0].finish_reason);
        let texts: std::collections::HashSet<&str> =
            c.choices.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts.len(), 3, "{:?}", c.choices);
        let u = c.usage.unwrap();
        assert_eq!(u.prompt_tokens, model.count_prompt(&req.messages));
        let each: u64 = c.choices.iter().map(|c| model.count_text(&c.text)).sum();
        assert!(
            u.completion_tokens >= 3 && u.completion_tokens <= 48,
            "{u:?} ({each})"
        );
        assert_eq!(u.total_tokens, u.prompt_tokens + u.completion_tokens);
        // Asked again (a re-ask for one choice): a fresh draw, not one of the three.
        let again = model
            .complete(&ask("Write a short poem about the sea.", 1))
            .await
            .unwrap();
        assert!(again.choices.is_empty());
        assert!(!texts.contains(again.text.as_str()), "{}", again.text);
    }

    /// llama.cpp's own grammar engine on the converter's output, through the default model's
    /// tokenizer: every token of a valid document is admitted and the document may end there;
    /// a broken one is refused somewhere.
    #[test]
    fn llama_cpp_admits_what_the_schema_allows_and_refuses_the_rest() {
        let path = model_path();
        let backend = super::super::backend().unwrap();
        let model = LlamaModel::load_from_file(
            backend,
            &path,
            &llama_cpp_2::model::params::LlamaModelParams::default(),
        )
        .unwrap();
        let admits = |gbnf: &str, doc: &str| -> bool {
            let mut g = grammar_sampler(&model, gbnf).expect("llama.cpp parses the grammar");
            let tokens = model.vocab().tokenize(doc.as_bytes(), false, false);
            let ok = |g: &mut LlamaSampler, t: LlamaToken| {
                let mut one =
                    LlamaTokenDataArray::new(vec![LlamaTokenData::new(t, 1.0, 0.0)], false);
                one.apply_sampler(g);
                one.data[0].logit() != f32::NEG_INFINITY
            };
            for t in tokens {
                if !ok(&mut g, t) {
                    return false;
                }
                g.accept(t);
            }
            ok(&mut g, model.vocab().eos())
        };
        let schema = json!({
            "type": "object",
            "properties": {
                "headline": {"type": "string", "maxLength": 12},
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "tone": {"enum": ["calm", "loud"]},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
                "note": {"type": ["string", "null"]},
                "when": {"type": "string", "format": "date"},
                "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
            },
            "required": ["headline", "rating", "tone", "tags", "when", "meta"],
            "additionalProperties": false
        });
        let gbnf = crate::provider::grammar::from_schema(&schema).unwrap();
        for good in [
            r#"{"headline": "Fresh \"pie\"", "rating": 5, "tone": "calm", "tags": ["a"], "when": "2024-02-29", "meta": {"ok": true}}"#,
            r#"{"headline":"","rating":1,"tone":"loud","tags":["a","b"],"note":null,"when":"1999-12-01","meta":{"ok":false}}"#,
            "{\n  \"headline\": \"Héllo wörld\",\n  \"rating\": 3,\n  \"tone\": \"calm\",\n  \"tags\": [\"x\"],\n  \"note\": \"n\",\n  \"when\": \"2000-01-01\",\n  \"meta\": {\"ok\": true}\n}",
        ] {
            assert!(admits(&gbnf, good), "refused: {good}");
            let v: serde_json::Value = serde_json::from_str(good).unwrap();
            assert!(jsonschema::is_valid(&schema, &v), "the test's own document: {good}");
        }
        for bad in [
            // Too long a headline, a rating out of range, an unknown tone, no tags, a property
            // out of order, an extra property, a missing one, not a date, trailing text.
            r#"{"headline": "thirteen chars", "rating": 5, "tone": "calm", "tags": ["a"], "when": "2024-02-29", "meta": {"ok": true}}"#,
            r#"{"headline": "h", "rating": 6, "tone": "calm", "tags": ["a"], "when": "2024-02-29", "meta": {"ok": true}}"#,
            r#"{"headline": "h", "rating": 0, "tone": "calm", "tags": ["a"], "when": "2024-02-29", "meta": {"ok": true}}"#,
            r#"{"headline": "h", "rating": 2, "tone": "shy", "tags": ["a"], "when": "2024-02-29", "meta": {"ok": true}}"#,
            r#"{"headline": "h", "rating": 2, "tone": "calm", "tags": [], "when": "2024-02-29", "meta": {"ok": true}}"#,
            r#"{"rating": 2, "headline": "h", "tone": "calm", "tags": ["a"], "when": "2024-02-29", "meta": {"ok": true}}"#,
            r#"{"headline": "h", "rating": 2, "tone": "calm", "tags": ["a"], "when": "2024-02-29", "meta": {"ok": true}, "x": 1}"#,
            r#"{"headline": "h", "rating": 2, "tone": "calm", "tags": ["a"], "when": "2024-02-29"}"#,
            r#"{"headline": "h", "rating": 2, "tone": "calm", "tags": ["a"], "when": "tomorrow", "meta": {"ok": true}}"#,
            r#"{"headline": "h", "rating": 2, "tone": "calm", "tags": ["a"], "when": "2024-02-29", "meta": {"ok": true}} and more"#,
            r#"```json {"headline": "h"}"#,
        ] {
            assert!(!admits(&gbnf, bad), "admitted: {bad}");
        }
        // llama.cpp reads a repetition bound past 2,000 as none: the converter's cap keeps
        // the longest bound it writes one llama.cpp enforces.
        let max = crate::provider::grammar::MAX_REPEAT;
        let long = crate::provider::grammar::from_schema(&json!({
            "type": "object", "properties": {"s": {"type": "string", "maxLength": max}},
            "required": ["s"]
        }))
        .unwrap();
        let doc = |n: u64| format!(r#"{{"s": "{}"}}"#, "ab".repeat(n as usize / 2));
        assert!(admits(&long, &doc(max)));
        assert!(!admits(&long, &doc(max + 2)));
        let any = crate::provider::grammar::json_object();
        assert!(admits(&any, r#"{"a": [1, 2.5e3, {"b": null}], "c": "d"}"#));
        assert!(admits(&any, "{}"));
        assert!(!admits(&any, "[1]"));
        assert!(!admits(&any, r#"{"a": 01}"#));
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0]), LlamaToken::new(1));
        assert_eq!(argmax(&[3.0]), LlamaToken::new(0));
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1e30]), LlamaToken::new(1));
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
}
