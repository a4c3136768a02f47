//! Prompt token counting with the model's tiktoken encoding, the chat per-message overhead
//! included, as OpenAI bills it, and images by OpenAI's published tile rule. The encoding is
//! built once, lazily: a resumed run that sends nothing never pays for loading it.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::chat::{Content, Detail, ImageUrl, Message, Part};

/// Counts a chat request's prompt tokens with the model's own tokenizer.
pub trait TokenCounter: Send + Sync {
    fn count_prompt(&self, messages: &[Message]) -> u64;
    /// A completion's tokens, for servers that send no usage.
    fn count_text(&self, text: &str) -> u64;
    /// The counts stand in for a tokenizer that is not public: the dry run says so.
    fn is_estimate(&self) -> bool {
        false
    }
}

pub struct Tiktoken {
    model: String,
    bpe: OnceLock<CoreBPE>,
}

impl Tiktoken {
    pub fn new(model: &str) -> Tiktoken {
        Tiktoken {
            model: model.to_string(),
            bpe: OnceLock::new(),
        }
    }

    fn bpe(&self) -> &CoreBPE {
        self.bpe.get_or_init(|| {
            // Models tiktoken does not know (other vendors' names, fine-tunes) get o200k_base,
            // the encoding of every current OpenAI chat model.
            tiktoken_rs::get_bpe_from_model(&self.model)
                .or_else(|_| tiktoken_rs::o200k_base())
                .expect("the built-in o200k_base encoding loads")
        })
    }
}

impl TokenCounter for Tiktoken {
    fn count_text(&self, text: &str) -> u64 {
        self.bpe().encode_with_special_tokens(text).len() as u64
    }

    /// OpenAI's published recipe: 3 tokens per message, 1 more for a name, 3 to prime the reply;
    /// each text part counted as text, each image by [`image_tokens`].
    fn count_prompt(&self, messages: &[Message]) -> u64 {
        let mut n = 3;
        for m in messages {
            n += 3 + self.count_text(m.role.as_str());
            match &m.content {
                Content::Text(t) => n += self.count_text(t),
                Content::Parts(parts) => {
                    for p in parts {
                        n += match p {
                            Part::Text { text } => self.count_text(text),
                            Part::ImageUrl { image_url } => {
                                image_tokens(&self.model, image_url).tokens
                            }
                        };
                    }
                }
            }
            if let Some(name) = &m.name {
                n += 1 + self.count_text(name);
            }
        }
        n
    }
}

/// The margin on Claude's estimated counts ([`Scaled`]).
pub const CLAUDE_MARGIN: f64 = 1.25;

/// The margin on Gemini's estimated counts ([`Scaled`]): Gemini's SentencePiece vocabulary
/// (256k pieces) splits English about as o200k does, other scripts and code differently; 1.25
/// keeps the worst case above what is billed, as for Claude.
pub const GEMINI_MARGIN: f64 = 1.25;

/// Counts for a model whose tokenizer is not public (Claude, Gemini): another tokenizer's counts times
/// a margin, so the budget's worst case stays above what is billed. An estimate, and said so.
pub struct Scaled<C> {
    pub inner: C,
    /// Claude's tokenizers give from about as many to a quarter more tokens than o200k for
    /// English prose (more for code and other scripts): 1.25 keeps the worst case above.
    pub factor: f64,
}

impl<C: TokenCounter> TokenCounter for Scaled<C> {
    fn count_prompt(&self, messages: &[Message]) -> u64 {
        (self.inner.count_prompt(messages) as f64 * self.factor).ceil() as u64
    }
    fn count_text(&self, text: &str) -> u64 {
        (self.inner.count_text(text) as f64 * self.factor).ceil() as u64
    }
    fn is_estimate(&self) -> bool {
        true
    }
}

/// An image's prompt tokens, and whether its size was assumed (an https URL, not fetched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokens {
    pub tokens: u64,
    pub assumed: bool,
}

/// The size assumed for an image whose dimensions are not known without a download: the
/// largest the tile rule keeps, so the count is an upper bound.
pub const ASSUMED_IMAGE_SIZE: (u32, u32) = (2048, 2048);

/// An image's prompt tokens by OpenAI's published rule ("Calculating costs", in the vision
/// guide: https://platform.openai.com/docs/guides/images-vision#calculating-costs).
///
/// `detail: low` costs the base tokens alone. `high` (and `auto`, counted as high: an upper
/// bound, since the model may pick low) scales the image to fit in 2048×2048, then its
/// shortest side down to 768 px, and costs the base plus a price per 512-px tile. Base and
/// tile: 85 and 170 for gpt-4o, gpt-4.1, gpt-4-turbo and the o-series; 2833 and 5667 for
/// gpt-4o-mini (its image price in dollars is gpt-4o's, at a twentieth of the token rate).
/// Other models (other vendors' names, fine-tunes) are counted as gpt-4o. The guide gives
/// gpt-4.1-mini, gpt-4.1-nano and o4-mini a rule by 32-px patches instead; they are counted
/// by tiles here, an estimate of the same order.
pub fn image_tokens(model: &str, image: &ImageUrl) -> ImageTokens {
    if is_gemini(model) {
        return gemini_image_tokens(image);
    }
    let (base, tile) = tile_prices(model);
    if image.detail == Some(Detail::Low) {
        return ImageTokens {
            tokens: base,
            assumed: false,
        };
    }
    let ((w, h), assumed) = match image.size {
        Some(s) => (s, false),
        None => (ASSUMED_IMAGE_SIZE, true),
    };
    let (w, h) = fit(f64::from(w.max(1)), f64::from(h.max(1)));
    let tiles = (w / 512.0).ceil() * (h / 512.0).ceil();
    ImageTokens {
        tokens: base + tile * tiles as u64,
        assumed,
    }
}

fn is_gemini(model: &str) -> bool {
    let m = model.to_ascii_lowercase();
    m.starts_with("gemini") || m.contains("/gemini")
}

/// Gemini's tokens per image tile.
pub const GEMINI_TILE_TOKENS: u64 = 258;

/// An image's prompt tokens on Gemini, by Google's rule for the 2.x models: 258 when both sides
/// are at most 384 px, else 258 a tile of the crops it is cut into. The crop side is taken as
/// the shorter side over 1.5 (between 256 and 768 px), the rule's smallest tiles, so the count
/// errs high where Google's description leaves the tiling open; `detail` does not change it
/// (Gemini's `mediaResolution` would, through `extra`).
pub fn gemini_image_tokens(image: &ImageUrl) -> ImageTokens {
    let ((w, h), assumed) = match image.size {
        Some(s) => (s, false),
        None => (ASSUMED_IMAGE_SIZE, true),
    };
    let (w, h) = (u64::from(w.max(1)), u64::from(h.max(1)));
    if w <= 384 && h <= 384 {
        return ImageTokens {
            tokens: GEMINI_TILE_TOKENS,
            assumed,
        };
    }
    let unit = (w.min(h) * 2 / 3).clamp(256, 768);
    ImageTokens {
        tokens: GEMINI_TILE_TOKENS * w.div_ceil(unit) * h.div_ceil(unit),
        assumed,
    }
}

/// Base and per-tile tokens of a model's images.
fn tile_prices(model: &str) -> (u64, u64) {
    // Snapshot names (`gpt-4o-mini-2024-07-18`) and fine-tunes (`ft:gpt-4o-mini:…`) too.
    let m = model.strip_prefix("ft:").unwrap_or(model);
    if m.starts_with("gpt-4o-mini") {
        (2833, 5667)
    } else {
        (85, 170)
    }
}

/// The high-detail resize: into 2048×2048, then the shortest side to 768 (both only ever
/// shrink the image, keeping its aspect).
fn fit(mut w: f64, mut h: f64) -> (f64, f64) {
    if w > 2048.0 || h > 2048.0 {
        let s = 2048.0 / w.max(h);
        (w, h) = (w * s, h * s);
    }
    if w.min(h) > 768.0 {
        let s = 768.0 / w.min(h);
        (w, h) = (w * s, h * s);
    }
    (w.floor(), h.floor())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;

    #[test]
    fn gemini_images_cost_258_a_tile() {
        let img = |size: Option<(u32, u32)>| ImageUrl {
            url: "x".into(),
            detail: Some(Detail::Low),
            size,
        };
        let t = |size| image_tokens("gemini-2.5-flash", &img(size)).tokens;
        assert_eq!(t(Some((384, 200))), 258);
        // 768×768: crops of 512 px, 2×2 tiles.
        assert_eq!(t(Some((768, 768))), 4 * 258);
        assert_eq!(t(Some((3000, 1000))), 258 * 5 * 2);
        let unknown = image_tokens("models/gemini-2.5-pro", &img(None));
        assert!(unknown.assumed);
        assert_eq!(unknown.tokens, 258 * 9);
        // Never under OpenAI's high-detail count of the same image, which the budget used before.
        assert!(t(Some((1024, 1024))) > image_tokens("gpt-4o", &img(Some((1024, 1024)))).tokens);
    }

    #[test]
    fn counts_match_openai_cookbook_example() {
        // The cookbook's "How to count tokens" example for gpt-4o family style: two short
        // messages. "Hello" is 1 token, "system"/"user" 1 each: 3 + (3+1+1)*2... computed
        // from the encoding itself so the overhead is what is checked.
        let t = Tiktoken::new("gpt-4o");
        let msgs = vec![
            Message {
                role: Role::System,
                name: None,
                content: "You are terse.".into(),
            },
            Message {
                role: Role::User,
                name: Some("ann".into()),
                content: "Hello there".into(),
            },
        ];
        let body = t.count_text("system")
            + t.count_text("You are terse.")
            + t.count_text("user")
            + t.count_text("Hello there")
            + t.count_text("ann");
        assert_eq!(t.count_prompt(&msgs), 3 + 3 + 3 + 1 + body);
        assert_eq!(t.count_text("Hello there"), 2);
    }

    fn img(size: Option<(u32, u32)>, detail: Option<Detail>) -> ImageUrl {
        ImageUrl {
            url: "https://example.com/x.png".into(),
            detail,
            size,
        }
    }

    #[test]
    fn image_tokens_follow_openais_worked_examples() {
        let tok = |m: &str, s, d| image_tokens(m, &img(Some(s), d)).tokens;
        // The guide's examples: 1024×1024 high → 768×768, 4 tiles: 765.
        assert_eq!(tok("gpt-4o", (1024, 1024), Some(Detail::High)), 765);
        // 2048×4096 high → 1024×2048 → 768×1536, 6 tiles: 1105.
        assert_eq!(tok("gpt-4o", (2048, 4096), Some(Detail::High)), 1105);
        // 4096×8192 low: 85, whatever the size.
        assert_eq!(tok("gpt-4o", (4096, 8192), Some(Detail::Low)), 85);
        // Auto is counted as high; a small image is not scaled up: 1 tile.
        assert_eq!(tok("gpt-4.1", (100, 50), None), 255);
        assert_eq!(tok("gpt-4.1", (100, 50), Some(Detail::Auto)), 255);
        // gpt-4o-mini: 2833 + 5667 per tile.
        assert_eq!(tok("gpt-4o-mini", (1024, 1024), None), 2833 + 4 * 5667);
        assert_eq!(
            tok("gpt-4o-mini-2024-07-18", (1024, 1024), Some(Detail::Low)),
            2833
        );
        // A URL: 2048×2048 assumed → 768×768, 4 tiles, and said so.
        assert_eq!(
            image_tokens("gpt-4o", &img(None, None)),
            ImageTokens {
                tokens: 765,
                assumed: true
            }
        );
        assert!(!image_tokens("gpt-4o", &img(None, Some(Detail::Low))).assumed);
    }

    #[test]
    fn a_prompt_with_parts_counts_its_text_and_images() {
        let t = Tiktoken::new("gpt-4o");
        let text = |s: &str| Message {
            role: Role::User,
            name: None,
            content: s.into(),
        };
        let parts = Message {
            role: Role::User,
            name: None,
            content: Content::Parts(vec![
                Part::Text {
                    text: "Describe it.".into(),
                },
                Part::ImageUrl {
                    image_url: img(Some((512, 512)), Some(Detail::High)),
                },
            ]),
        };
        assert_eq!(
            t.count_prompt(std::slice::from_ref(&parts)),
            t.count_prompt(&[text("Describe it.")]) + 255
        );
    }
}
