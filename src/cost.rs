//! Prices × usage → USD. A built-in, dated table for OpenAI's chat models, Anthropic's Claude
//! models and Google's Gemini models; dated snapshot names map to their family; the job's `[pricing]` overrides. Pure, so
//! it is unit-tested.

use serde::{Deserialize, Serialize};

use crate::chat::Usage;

/// Rates in USD per 1M tokens, as OpenAI's pricing page gave them on 2025-11-15: (family, online, batch, flex offered). `batch` is the Batch API
/// price (half the online price for every model OpenAI offers in batch; `None` where it does
/// not); the flex tier bills at the batch rates for the models that offer it.
const TABLE: &[(&str, Rates, Option<Rates>, bool)] = &[
    (
        "gpt-3.5-turbo",
        r(0.50, None, 1.50),
        Some(r(0.25, None, 0.75)),
        false,
    ),
    ("gpt-3.5-turbo-16k", r(3.00, None, 4.00), None, false),
    (
        "gpt-4",
        r(30.00, None, 60.00),
        Some(r(15.0, None, 30.0)),
        false,
    ),
    ("gpt-4-32k", r(60.00, None, 120.00), None, false),
    (
        "gpt-4-turbo",
        r(10.00, None, 30.00),
        Some(r(5.0, None, 15.0)),
        false,
    ),
    (
        "gpt-4o",
        r(2.50, Some(1.25), 10.00),
        Some(r(1.25, Some(0.625), 5.0)),
        false,
    ),
    // The first gpt-4o snapshot kept its launch price.
    (
        "gpt-4o-2024-05-13",
        r(5.00, None, 15.00),
        Some(r(2.5, None, 7.5)),
        false,
    ),
    ("chatgpt-4o-latest", r(5.00, None, 15.00), None, false),
    (
        "gpt-4o-mini",
        r(0.15, Some(0.075), 0.60),
        Some(r(0.075, Some(0.0375), 0.3)),
        false,
    ),
    (
        "gpt-4.1",
        r(2.00, Some(0.50), 8.00),
        Some(r(1.0, Some(0.25), 4.0)),
        false,
    ),
    (
        "gpt-4.1-mini",
        r(0.40, Some(0.10), 1.60),
        Some(r(0.2, Some(0.05), 0.8)),
        false,
    ),
    (
        "gpt-4.1-nano",
        r(0.10, Some(0.025), 0.40),
        Some(r(0.05, Some(0.0125), 0.2)),
        false,
    ),
    (
        "gpt-4.5-preview",
        r(75.00, Some(37.50), 150.00),
        Some(r(37.5, Some(18.75), 75.0)),
        false,
    ),
    (
        "o1",
        r(15.00, Some(7.50), 60.00),
        Some(r(7.5, Some(3.75), 30.0)),
        false,
    ),
    (
        "o1-mini",
        r(1.10, Some(0.55), 4.40),
        Some(r(0.55, Some(0.275), 2.2)),
        false,
    ),
    (
        "o1-pro",
        r(150.00, None, 600.00),
        Some(r(75.0, None, 300.0)),
        false,
    ),
    (
        "o3",
        r(2.00, Some(0.50), 8.00),
        Some(r(1.0, Some(0.25), 4.0)),
        true,
    ),
    (
        "o3-mini",
        r(1.10, Some(0.55), 4.40),
        Some(r(0.55, Some(0.275), 2.2)),
        false,
    ),
    (
        "o3-pro",
        r(20.00, None, 80.00),
        Some(r(10.0, None, 40.0)),
        false,
    ),
    (
        "o4-mini",
        r(1.10, Some(0.275), 4.40),
        Some(r(0.55, Some(0.1375), 2.2)),
        true,
    ),
    (
        "gpt-5",
        r(1.25, Some(0.125), 10.00),
        Some(r(0.625, Some(0.0625), 5.0)),
        true,
    ),
    (
        "gpt-5-mini",
        r(0.25, Some(0.025), 2.00),
        Some(r(0.125, Some(0.0125), 1.0)),
        true,
    ),
    (
        "gpt-5-nano",
        r(0.05, Some(0.005), 0.40),
        Some(r(0.025, Some(0.0025), 0.2)),
        true,
    ),
    (
        "gpt-5-chat-latest",
        r(1.25, Some(0.125), 10.00),
        None,
        false,
    ),
    (
        "gpt-5-pro",
        r(15.00, None, 120.00),
        Some(r(7.5, None, 60.0)),
        false,
    ),
    (
        "gpt-5.1",
        r(1.25, Some(0.125), 10.00),
        Some(r(0.625, Some(0.0625), 5.0)),
        true,
    ),
    (
        "gpt-5.1-chat-latest",
        r(1.25, Some(0.125), 10.00),
        None,
        false,
    ),
    // Anthropic's pricing page, read 2025-11-24: input, cache read, output; the Message
    // Batches API at half of each. Cache writes are priced by rule ([`CLAUDE_CACHE_WRITE`]).
    // Sonnet's prompts over 200,000 tokens (a 1M-context beta) bill higher: not in this table.
    (
        "claude-opus-4-5",
        r(5.00, Some(0.50), 25.00),
        Some(r(2.50, Some(0.25), 12.50)),
        false,
    ),
    (
        "claude-opus-4-1",
        r(15.00, Some(1.50), 75.00),
        Some(r(7.50, Some(0.75), 37.50)),
        false,
    ),
    (
        "claude-opus-4",
        r(15.00, Some(1.50), 75.00),
        Some(r(7.50, Some(0.75), 37.50)),
        false,
    ),
    (
        "claude-sonnet-4-5",
        r(3.00, Some(0.30), 15.00),
        Some(r(1.50, Some(0.15), 7.50)),
        false,
    ),
    (
        "claude-sonnet-4",
        r(3.00, Some(0.30), 15.00),
        Some(r(1.50, Some(0.15), 7.50)),
        false,
    ),
    (
        "claude-3-7-sonnet",
        r(3.00, Some(0.30), 15.00),
        Some(r(1.50, Some(0.15), 7.50)),
        false,
    ),
    (
        "claude-haiku-4-5",
        r(1.00, Some(0.10), 5.00),
        Some(r(0.50, Some(0.05), 2.50)),
        false,
    ),
    (
        "claude-3-5-haiku",
        r(0.80, Some(0.08), 4.00),
        Some(r(0.40, Some(0.04), 2.00)),
        false,
    ),
    (
        "claude-3-haiku",
        r(0.25, Some(0.03), 1.25),
        Some(r(0.125, Some(0.015), 0.625)),
        false,
    ),
    (
        "claude-3-opus",
        r(15.00, Some(1.50), 75.00),
        Some(r(7.50, Some(0.75), 37.50)),
        false,
    ),
    // Google's Gemini API pricing (paid tier, text/image/video input) as of 2025-11, not
    // re-read from Google's page for this table: the input, output and long-context figures
    // agree with published summaries; the cache-read rates (a tenth of input) are the ones to
    // check first.
    // input, cached input (context caching, implicit or explicit), output (thinking
    // included); the Batch API at half of each. Gemini 2.5 Pro's prompts over 200,000 tokens
    // bill at [`LONG_PROMPT`]'s rates. Cache storage (explicit caches only) is not billed per
    // request.
    (
        "gemini-2.5-pro",
        r(1.25, Some(0.125), 10.00),
        Some(r(0.625, Some(0.0625), 5.00)),
        false,
    ),
    (
        "gemini-2.5-flash",
        r(0.30, Some(0.03), 2.50),
        Some(r(0.15, Some(0.015), 1.25)),
        false,
    ),
    (
        "gemini-2.5-flash-lite",
        r(0.10, Some(0.01), 0.40),
        Some(r(0.05, Some(0.005), 0.20)),
        false,
    ),
    (
        "gemini-2.0-flash",
        r(0.10, Some(0.025), 0.40),
        Some(r(0.05, Some(0.0125), 0.20)),
        false,
    ),
    (
        "gemini-2.0-flash-lite",
        r(0.075, None, 0.30),
        Some(r(0.0375, None, 0.15)),
        false,
    ),
];

/// Rates for prompts longer than a threshold, where a model bills every token of the request
/// higher: (family, threshold in prompt tokens, online, batch). Gemini 2.5 Pro, as of 2025-11.
const LONG_PROMPT: &[(&str, u64, Rates, Rates)] = &[(
    "gemini-2.5-pro",
    200_000,
    r(2.50, Some(0.25), 15.00),
    r(1.25, Some(0.125), 7.50),
)];

/// Anthropic bills a cache write at a multiple of the input rate of its tier (the batch
/// discount applies to it too): 1.25× for the 5-minute cache, 2× for the 1-hour cache.
const CLAUDE_CACHE_WRITE: (f64, f64) = (1.25, 2.0);

/// (input, cached input, output); `None` cached: no cache discount.
type Rates = (f64, Option<f64>, f64);

const fn r(input: f64, cached: Option<f64>, output: f64) -> Rates {
    (input, cached, output)
}

/// USD per 1M tokens.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    pub input: f64,
    pub cached_input: Option<f64>,
    pub output: f64,
    /// Batch API and flex-tier rates; without them, batch and flex rows are priced at the
    /// rates above (never lower than what is known).
    pub batch_input: Option<f64>,
    pub batch_cached_input: Option<f64>,
    pub batch_output: Option<f64>,
    /// Prompt-cache writes (Anthropic's 5-minute and 1-hour caches); without them a write is
    /// priced at the tier's input rate.
    #[serde(default)]
    pub cache_write_input: Option<f64>,
    #[serde(default)]
    pub cache_write_1h_input: Option<f64>,
    #[serde(default)]
    pub batch_cache_write_input: Option<f64>,
    #[serde(default)]
    pub batch_cache_write_1h_input: Option<f64>,
}

/// Which of a model's prices applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Online requests at the standard tier.
    Standard,
    /// The Batch API.
    Batch,
    /// Online requests with `service_tier = "flex"`: batch rates, slower answers.
    Flex,
}

/// Names that are not a family plus a date suffix.
const ALIASES: &[(&str, &str)] = &[
    ("gpt-4-turbo-preview", "gpt-4-turbo"),
    ("gpt-4-1106-preview", "gpt-4-turbo"),
    ("gpt-4-0125-preview", "gpt-4-turbo"),
    ("gpt-4-1106-vision-preview", "gpt-4-turbo"),
    ("gpt-4-vision-preview", "gpt-4-turbo"),
    // Gemini's moving aliases (`gemini-flash-latest`, less its `-latest`).
    ("gemini-pro", "gemini-2.5-pro"),
    ("gemini-flash", "gemini-2.5-flash"),
    ("gemini-flash-lite", "gemini-2.5-flash-lite"),
];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    /// A prompt-cache read.
    pub cached_input: f64,
    pub output: f64,
    /// A prompt-cache write: 5 minutes, and 1 hour.
    pub cache_write: f64,
    pub cache_write_1h: f64,
    /// Other rates for a prompt over a length (Gemini 2.5 Pro past 200,000 tokens).
    pub long: Option<LongPrompt>,
}

/// The rates of a request whose prompt is longer than `above` tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongPrompt {
    pub above: u64,
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

impl Price {
    /// Rates that charge nothing (the local model).
    pub const FREE: Price = Price {
        input: 0.0,
        cached_input: 0.0,
        output: 0.0,
        cache_write: 0.0,
        cache_write_1h: 0.0,
        long: None,
    };

    /// The rates that apply to a request of `prompt_tokens`.
    fn for_prompt(&self, prompt_tokens: u64) -> Price {
        match self.long {
            Some(l) if prompt_tokens > l.above => Price {
                input: l.input,
                cached_input: l.cached_input,
                output: l.output,
                cache_write: l.input,
                cache_write_1h: l.input,
                long: None,
            },
            _ => *self,
        }
    }

    /// Cache reads at the cached rate, cache writes at the write rates, the rest of the prompt
    /// at the input rate; reasoning tokens are inside `completion_tokens` and are charged
    /// once, with them.
    pub fn cost(&self, u: &Usage) -> f64 {
        let p = self.for_prompt(u.prompt_tokens);
        let cached = u.cached_tokens.unwrap_or(0).min(u.prompt_tokens);
        let written = u
            .cache_write_tokens
            .unwrap_or(0)
            .min(u.prompt_tokens - cached);
        let written_1h = u.cache_write_1h_tokens.unwrap_or(0).min(written);
        let fresh = u.prompt_tokens - cached - written;
        (fresh as f64 * p.input
            + cached as f64 * p.cached_input
            + (written - written_1h) as f64 * p.cache_write
            + written_1h as f64 * p.cache_write_1h
            + u.completion_tokens as f64 * p.output)
            / 1_000_000.0
    }

    /// What the prompt cache saved (or, when writes outweigh reads, cost) against the same
    /// tokens at the input rate.
    pub fn cache_saving(&self, u: &Usage) -> f64 {
        let uncached = Usage {
            cached_tokens: None,
            cache_write_tokens: None,
            cache_write_1h_tokens: None,
            ..*u
        };
        self.cost(&uncached) - self.cost(u)
    }

    /// The most a request can cost: every prompt token at the input rate, every allowed
    /// output token at the output rate (the long-prompt rates past their threshold).
    pub fn bound(&self, prompt_tokens: u64, max_output: u64) -> f64 {
        let p = self.for_prompt(prompt_tokens);
        (prompt_tokens as f64 * p.input + max_output as f64 * p.output) / 1_000_000.0
    }
}

/// The built-in online price of a model, by exact name, alias, or family after its date suffix
/// (`-2024-08-06` or `-0613`) is removed.
#[cfg(test)]
pub fn lookup(model: &str) -> Option<Price> {
    lookup_tier(model, Tier::Standard)
}

/// The built-in price of a model at a tier; `None` when the model is unknown or the tier is
/// not offered for it.
pub fn lookup_tier(model: &str, tier: Tier) -> Option<Price> {
    let find = |name: &str| {
        let &(_, online, batch, flex) = TABLE.iter().find(|(n, ..)| *n == name)?;
        let (input, cached, output) = match tier {
            Tier::Standard => online,
            Tier::Batch => batch?,
            Tier::Flex if flex => batch?,
            Tier::Flex => return None,
        };
        let (w5, w1h) = if name.starts_with("claude-") {
            CLAUDE_CACHE_WRITE
        } else {
            (1.0, 1.0)
        };
        let long =
            LONG_PROMPT
                .iter()
                .find(|(n, ..)| *n == name)
                .map(|&(_, above, online, batch)| {
                    let (input, cached, output) = match tier {
                        Tier::Standard => online,
                        Tier::Batch | Tier::Flex => batch,
                    };
                    LongPrompt {
                        above,
                        input,
                        cached_input: cached.unwrap_or(input),
                        output,
                    }
                });
        Some(Price {
            input,
            cached_input: cached.unwrap_or(input),
            output,
            cache_write: input * w5,
            cache_write_1h: input * w1h,
            long,
        })
    };
    let model = model.trim().to_ascii_lowercase();
    let model = ["openai/", "anthropic/", "models/", "google/"]
        .iter()
        .find_map(|p| model.strip_prefix(p))
        .unwrap_or(&model);
    // Anthropic's moving aliases name the family's newest snapshot.
    let model = model.strip_suffix("-latest").unwrap_or(model);
    if let Some(p) = find(model) {
        return Some(p);
    }
    if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == model) {
        return find(to);
    }
    find(strip_date(model)).or_else(|| find(gemini_family(model)?))
}

/// A Gemini snapshot's family: `gemini-2.5-flash-preview-09-2025` and `gemini-2.0-flash-001`
/// are priced as `gemini-2.5-flash` and `gemini-2.0-flash`.
fn gemini_family(model: &str) -> Option<&str> {
    if !model.starts_with("gemini-") {
        return None;
    }
    if let Some(i) = model.find("-preview") {
        return Some(&model[..i]);
    }
    let (head, tail) = model.rsplit_once('-')?;
    (tail.len() == 3 && tail.bytes().all(|c| c.is_ascii_digit())).then_some(head)
}

impl Pricing {
    /// The job's own rates at a tier: batch and flex use the `batch_*` rates when given, else
    /// the online ones (so a budget never counts on a discount it was not told of).
    pub fn at(&self, tier: Tier) -> Price {
        let online = Price {
            input: self.input,
            cached_input: self.cached_input.unwrap_or(self.input),
            output: self.output,
            cache_write: self.cache_write_input.unwrap_or(self.input),
            cache_write_1h: self.cache_write_1h_input.unwrap_or(self.input),
            long: None,
        };
        match tier {
            Tier::Standard => online,
            Tier::Batch | Tier::Flex => {
                let input = self.batch_input.unwrap_or(online.input);
                let batch_or = |batch: Option<f64>, online: f64| {
                    batch.or(self.batch_input.map(|_| input)).unwrap_or(online)
                };
                Price {
                    input,
                    cached_input: batch_or(self.batch_cached_input, online.cached_input),
                    output: self.batch_output.unwrap_or(online.output),
                    cache_write: batch_or(self.batch_cache_write_input, online.cache_write),
                    cache_write_1h: batch_or(
                        self.batch_cache_write_1h_input,
                        online.cache_write_1h,
                    ),
                    long: None,
                }
            }
        }
    }
}

fn strip_date(model: &str) -> &str {
    let b = model.as_bytes();
    // -YYYYMMDD (Anthropic's snapshots: claude-sonnet-4-5-20250929)
    if b.len() > 9 {
        let tail = &model[model.len() - 9..];
        if tail.starts_with('-') && tail[1..].bytes().all(|c| c.is_ascii_digit()) {
            return &model[..model.len() - 9];
        }
    }
    // -YYYY-MM-DD
    if b.len() > 11 {
        let tail = &model[model.len() - 11..];
        let t = tail.as_bytes();
        if t[0] == b'-'
            && t[5] == b'-'
            && t[8] == b'-'
            && [1, 2, 3, 4, 6, 7, 9, 10]
                .iter()
                .all(|&i| t[i].is_ascii_digit())
        {
            return &model[..model.len() - 11];
        }
    }
    // -MMDD (gpt-4-0613, gpt-3.5-turbo-0125)
    if b.len() > 5 {
        let tail = &model[model.len() - 5..];
        if tail.starts_with('-') && tail[1..].bytes().all(|c| c.is_ascii_digit()) {
            return &model[..model.len() - 5];
        }
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(p: u64, c: u64, cached: Option<u64>, reasoning: Option<u64>) -> Usage {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            cached_tokens: cached,
            reasoning_tokens: reasoning,
            ..Usage::default()
        }
    }

    fn no_cache_rates() -> Pricing {
        Pricing {
            input: 0.0,
            cached_input: None,
            output: 0.0,
            batch_input: None,
            batch_cached_input: None,
            batch_output: None,
            cache_write_input: None,
            cache_write_1h_input: None,
            batch_cache_write_input: None,
            batch_cache_write_1h_input: None,
        }
    }

    #[test]
    fn claude_snapshots_and_cache_rates_stack_with_the_batch_discount() {
        let p = lookup("claude-sonnet-4-5-20250929").unwrap();
        assert_eq!(Some(p), lookup("anthropic/claude-sonnet-4-5"));
        assert_eq!(
            lookup("claude-3-5-haiku-latest"),
            lookup("claude-3-5-haiku")
        );
        assert_eq!((p.input, p.cached_input, p.output), (3.0, 0.30, 15.0));
        assert!((p.cache_write - 3.75).abs() < 1e-12 && (p.cache_write_1h - 6.0).abs() < 1e-12);
        let b = lookup_tier("claude-sonnet-4-5", Tier::Batch).unwrap();
        assert!((b.cache_write - 1.875).abs() < 1e-12, "{b:?}");
        assert_eq!(b.cached_input, 0.15);
        // 2,000 written (500 of them for an hour), 1,000 read, 100 fresh, 50 out.
        let u = Usage {
            prompt_tokens: 3100,
            completion_tokens: 50,
            total_tokens: 3150,
            cached_tokens: Some(1000),
            cache_write_tokens: Some(2000),
            cache_write_1h_tokens: Some(500),
            ..Usage::default()
        };
        let want = (100.0 * 3.0 + 1000.0 * 0.30 + 1500.0 * 3.75 + 500.0 * 6.0 + 50.0 * 15.0) / 1e6;
        assert!(
            (p.cost(&u) - want).abs() < 1e-12,
            "{} != {want}",
            p.cost(&u)
        );
        let saved = (3100.0 * 3.0 + 50.0 * 15.0) / 1e6 - want;
        assert!((p.cache_saving(&u) - saved).abs() < 1e-12);
    }

    #[test]
    fn gemini_names_map_to_their_family_and_batch_is_half() {
        let f = lookup("gemini-2.5-flash").unwrap();
        assert_eq!((f.input, f.cached_input, f.output), (0.30, 0.03, 2.50));
        for name in [
            "models/gemini-2.5-flash",
            "gemini-2.5-flash-preview-09-2025",
            "gemini-flash-latest",
            "Gemini-2.5-Flash",
        ] {
            assert_eq!(lookup(name), Some(f), "{name}");
        }
        assert_eq!(lookup("gemini-2.0-flash-001"), lookup("gemini-2.0-flash"));
        assert_eq!(
            lookup("gemini-2.5-flash-lite-preview-06-17"),
            lookup("gemini-2.5-flash-lite")
        );
        // 2.5 Pro's prompts over 200,000 tokens bill every token at the long rates.
        let pro = lookup("gemini-2.5-pro").unwrap();
        assert_eq!(pro.input, 1.25);
        let short = usage(200_000, 1000, Some(100_000), None);
        let want = (100_000.0 * 1.25 + 100_000.0 * 0.125 + 1000.0 * 10.0) / 1e6;
        assert!((pro.cost(&short) - want).abs() < 1e-12);
        let long = usage(200_001, 1000, Some(100_000), None);
        let want = (100_001.0 * 2.50 + 100_000.0 * 0.25 + 1000.0 * 15.0) / 1e6;
        assert!(
            (pro.cost(&long) - want).abs() < 1e-12,
            "{}",
            pro.cost(&long)
        );
        assert!((pro.bound(300_000, 100) - (300_000.0 * 2.5 + 100.0 * 15.0) / 1e6).abs() < 1e-12);
        let b = lookup_tier("gemini-2.5-pro", Tier::Batch).unwrap();
        assert!((b.cost(&long) * 2.0 - pro.cost(&long)).abs() < 1e-12);
        // 2.0 Flash-Lite has no cache discount: a cached token is an input token.
        let l = lookup("gemini-2.0-flash-lite").unwrap();
        assert_eq!(l.cached_input, l.input);
        let b = lookup_tier("gemini-2.5-flash", Tier::Batch).unwrap();
        assert_eq!((b.input, b.cached_input, b.output), (0.15, 0.015, 1.25));
        assert_eq!(lookup("gemini-9-ultra"), None);
        // Implicit cache hits at the cache-read rate, thinking inside the output.
        let u = usage(1000, 100, Some(600), Some(40));
        let want = (400.0 * 0.30 + 600.0 * 0.03 + 100.0 * 2.50) / 1e6;
        assert!((f.cost(&u) - want).abs() < 1e-12);
    }

    #[test]
    fn snapshots_map_to_their_family() {
        assert_eq!(lookup("gpt-4o-2024-08-06"), lookup("gpt-4o"));
        assert_eq!(lookup("gpt-4-0613"), lookup("gpt-4"));
        assert_eq!(lookup("gpt-3.5-turbo-0125").unwrap().input, 0.50);
        assert_eq!(lookup("gpt-4o-mini-2024-07-18").unwrap().output, 0.60);
        assert_eq!(lookup("gpt-4.1-nano-2025-04-14").unwrap().input, 0.10);
        assert_eq!(lookup("o3-mini-2025-01-31").unwrap().output, 4.40);
        assert_eq!(lookup("gpt-5-mini-2025-08-07").unwrap().input, 0.25);
        assert_eq!(lookup("gpt-4-1106-preview").unwrap().input, 10.0);
        // The one snapshot priced unlike its family.
        assert_eq!(lookup("gpt-4o-2024-05-13").unwrap().input, 5.0);
        assert_eq!(lookup("my-finetune"), None);
        assert_eq!(lookup("llama3:8b"), None);
    }

    #[test]
    fn cached_tokens_at_the_cached_rate_and_reasoning_charged_once() {
        let p = lookup("gpt-4o").unwrap();
        // 1000 prompt, 400 of them cached; 200 completion of which 50 reasoning.
        let c = p.cost(&usage(1000, 200, Some(400), Some(50)));
        let want = (600.0 * 2.50 + 400.0 * 1.25 + 200.0 * 10.0) / 1e6;
        assert!((c - want).abs() < 1e-12, "{c} != {want}");
    }

    #[test]
    fn no_cache_discount_means_cached_tokens_pay_full_input() {
        let p = lookup("gpt-4").unwrap();
        let c = p.cost(&usage(1000, 0, Some(1000), None));
        assert!((c - 0.03).abs() < 1e-12);
    }

    #[test]
    fn batch_rates_are_half_and_flex_only_where_offered() {
        let b = lookup_tier("gpt-4o-mini-2024-07-18", Tier::Batch).unwrap();
        assert_eq!((b.input, b.cached_input, b.output), (0.075, 0.0375, 0.30));
        assert_eq!(lookup_tier("gpt-4o-mini", Tier::Flex), None);
        let f = lookup_tier("gpt-5-mini", Tier::Flex).unwrap();
        assert_eq!((f.input, f.cached_input, f.output), (0.125, 0.0125, 1.0));
        assert_eq!(lookup_tier("chatgpt-4o-latest", Tier::Batch), None);
        assert_eq!(
            lookup_tier("o3", Tier::Flex),
            lookup_tier("o3", Tier::Batch)
        );
        for (name, online, batch, _) in TABLE {
            if let Some(b) = batch {
                assert!((b.0 * 2.0 - online.0).abs() < 1e-9, "{name}");
                assert!((b.2 * 2.0 - online.2).abs() < 1e-9, "{name}");
            }
        }
    }

    #[test]
    fn job_rates_without_batch_rates_are_the_online_ones() {
        let mut p = Pricing {
            input: 1.0,
            cached_input: Some(0.5),
            output: 2.0,
            batch_input: None,
            batch_cached_input: None,
            batch_output: None,
            ..no_cache_rates()
        };
        assert_eq!(p.at(Tier::Batch), p.at(Tier::Standard));
        p.batch_input = Some(0.4);
        p.batch_output = Some(0.8);
        let b = p.at(Tier::Flex);
        assert_eq!((b.input, b.cached_input, b.output), (0.4, 0.4, 0.8));
    }

    #[test]
    fn override_without_cached_rate_uses_the_input_rate() {
        let p = Pricing {
            input: 1.0,
            cached_input: None,
            output: 2.0,
            batch_input: None,
            batch_cached_input: None,
            batch_output: None,
            ..no_cache_rates()
        }
        .at(Tier::Standard);
        assert_eq!(p.cached_input, 1.0);
        assert!((p.bound(1_000_000, 500_000) - 2.0).abs() < 1e-12);
    }
}
