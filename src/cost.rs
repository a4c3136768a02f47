//! Prices × usage → USD. A built-in, dated table for OpenAI's chat models; dated snapshot names
//! map to their family; the job's `[pricing]` overrides. Pure, so it is unit-tested.

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
];

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
];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

impl Price {
    /// Cached prompt tokens at the cached rate, the rest at the input rate; reasoning tokens
    /// are inside `completion_tokens` and are charged once, with them.
    pub fn cost(&self, u: &Usage) -> f64 {
        let cached = u.cached_tokens.unwrap_or(0).min(u.prompt_tokens);
        let fresh = u.prompt_tokens - cached;
        (fresh as f64 * self.input
            + cached as f64 * self.cached_input
            + u.completion_tokens as f64 * self.output)
            / 1_000_000.0
    }

    /// The most a request can cost: every prompt token at the input rate, every allowed
    /// output token at the output rate.
    pub fn bound(&self, prompt_tokens: u64, max_output: u64) -> f64 {
        (prompt_tokens as f64 * self.input + max_output as f64 * self.output) / 1_000_000.0
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
        Some(Price {
            input,
            cached_input: cached.unwrap_or(input),
            output,
        })
    };
    let model = model.trim().to_ascii_lowercase();
    let model = model.strip_prefix("openai/").unwrap_or(&model);
    if let Some(p) = find(model) {
        return Some(p);
    }
    if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == model) {
        return find(to);
    }
    find(strip_date(model))
}

impl Pricing {
    /// The job's own rates at a tier: batch and flex use the `batch_*` rates when given, else
    /// the online ones (so a budget never counts on a discount it was not told of).
    pub fn at(&self, tier: Tier) -> Price {
        let online = Price {
            input: self.input,
            cached_input: self.cached_input.unwrap_or(self.input),
            output: self.output,
        };
        match tier {
            Tier::Standard => online,
            Tier::Batch | Tier::Flex => {
                let input = self.batch_input.unwrap_or(online.input);
                Price {
                    input,
                    cached_input: self
                        .batch_cached_input
                        .or(self.batch_input.map(|_| input))
                        .unwrap_or(online.cached_input),
                    output: self.batch_output.unwrap_or(online.output),
                }
            }
        }
    }
}

fn strip_date(model: &str) -> &str {
    let b = model.as_bytes();
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
            estimated: false,
        }
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
        }
        .at(Tier::Standard);
        assert_eq!(p.cached_input, 1.0);
        assert!((p.bound(1_000_000, 500_000) - 2.0).abs() < 1e-12);
    }
}
