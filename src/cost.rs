//! Prices × usage → USD. A built-in, dated table for OpenAI's chat models; dated snapshot names
//! map to their family; the job's `[pricing]` overrides. Pure, so it is unit-tested.

use crate::job::Pricing;
use crate::provider::Usage;

/// The date the built-in prices were copied from OpenAI's pricing page.
pub const PRICES_AS_OF: &str = "2025-11-15";

/// (family, input, cached input, output), USD per 1M tokens. `None` cached: no cache discount.
const TABLE: &[(&str, f64, Option<f64>, f64)] = &[
    ("gpt-3.5-turbo", 0.50, None, 1.50),
    ("gpt-3.5-turbo-16k", 3.00, None, 4.00),
    ("gpt-4", 30.00, None, 60.00),
    ("gpt-4-32k", 60.00, None, 120.00),
    ("gpt-4-turbo", 10.00, None, 30.00),
    ("gpt-4o", 2.50, Some(1.25), 10.00),
    // The first gpt-4o snapshot kept its launch price.
    ("gpt-4o-2024-05-13", 5.00, None, 15.00),
    ("chatgpt-4o-latest", 5.00, None, 15.00),
    ("gpt-4o-mini", 0.15, Some(0.075), 0.60),
    ("gpt-4.1", 2.00, Some(0.50), 8.00),
    ("gpt-4.1-mini", 0.40, Some(0.10), 1.60),
    ("gpt-4.1-nano", 0.10, Some(0.025), 0.40),
    ("gpt-4.5-preview", 75.00, Some(37.50), 150.00),
    ("o1", 15.00, Some(7.50), 60.00),
    ("o1-mini", 1.10, Some(0.55), 4.40),
    ("o1-pro", 150.00, None, 600.00),
    ("o3", 2.00, Some(0.50), 8.00),
    ("o3-mini", 1.10, Some(0.55), 4.40),
    ("o3-pro", 20.00, None, 80.00),
    ("o4-mini", 1.10, Some(0.275), 4.40),
    ("gpt-5", 1.25, Some(0.125), 10.00),
    ("gpt-5-mini", 0.25, Some(0.025), 2.00),
    ("gpt-5-nano", 0.05, Some(0.005), 0.40),
    ("gpt-5-chat-latest", 1.25, Some(0.125), 10.00),
    ("gpt-5-pro", 15.00, None, 120.00),
    ("gpt-5.1", 1.25, Some(0.125), 10.00),
    ("gpt-5.1-chat-latest", 1.25, Some(0.125), 10.00),
];

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

impl From<Pricing> for Price {
    fn from(p: Pricing) -> Price {
        Price {
            input: p.input,
            cached_input: p.cached_input.unwrap_or(p.input),
            output: p.output,
        }
    }
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

/// The built-in price of a model, by exact name, alias, or family after its date suffix
/// (`-2024-08-06` or `-0613`) is removed.
pub fn lookup(model: &str) -> Option<Price> {
    let find = |name: &str| {
        TABLE
            .iter()
            .find(|(n, ..)| *n == name)
            .map(|&(_, input, cached, output)| Price {
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
    fn override_without_cached_rate_uses_the_input_rate() {
        let p: Price = Pricing {
            input: 1.0,
            cached_input: None,
            output: 2.0,
        }
        .into();
        assert_eq!(p.cached_input, 1.0);
        assert!((p.bound(1_000_000, 500_000) - 2.0).abs() < 1e-12);
    }
}
