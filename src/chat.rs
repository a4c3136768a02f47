//! The chat request's vocabulary, shared by the job file, the renderer and the providers:
//! messages with their roles, and the request's sampling parameters. Its own module so that
//! `job` and `provider` depend on it rather than on each other.

use serde::{Deserialize, Serialize};

/// A chat message as the API takes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub content: Content,
}

/// A message's content: plain text, or parts (text and images) in OpenAI's shape.
///
/// `Text` serializes as a bare JSON string, exactly as every message was sent before parts
/// existed: the body and fingerprint of a text-only job never change, so its outputs resume
/// without paying again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a message's content: `{"type":"text","text":…}` or
/// `{"type":"image_url","image_url":{"url":…,"detail":…}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageUrl {
    /// An https URL, or a `data:<mime>;base64,…` URL holding the file.
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
    /// Width and height in pixels, when known without a download (a file read at render
    /// time): the dry run's image tokens. Not part of the request, nor of its fingerprint.
    #[serde(skip)]
    pub size: Option<(u32, u32)>,
}

/// How closely the model looks at an image; what it costs depends on it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Detail {
    Low,
    High,
    Auto,
}

impl Detail {
    pub fn as_str(self) -> &'static str {
        match self {
            Detail::Low => "low",
            Detail::High => "high",
            Detail::Auto => "auto",
        }
    }
}

impl Content {
    /// The text the content holds: its text parts, joined by a blank line.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Content::Text(t) => std::borrow::Cow::Borrowed(t),
            Content::Parts(parts) => {
                let texts: Vec<&str> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Part::Text { text } => Some(text.as_str()),
                        Part::ImageUrl { .. } => None,
                    })
                    .collect();
                match texts.as_slice() {
                    [one] => std::borrow::Cow::Borrowed(one),
                    _ => std::borrow::Cow::Owned(texts.join("\n\n")),
                }
            }
        }
    }

    /// The images, in order.
    pub fn images(&self) -> impl Iterator<Item = &ImageUrl> {
        let parts: &[Part] = match self {
            Content::Text(_) => &[],
            Content::Parts(p) => p,
        };
        parts.iter().filter_map(|p| match p {
            Part::ImageUrl { image_url } => Some(image_url),
            Part::Text { .. } => None,
        })
    }

    pub fn has_images(&self) -> bool {
        self.images().next().is_some()
    }
}

impl From<String> for Content {
    fn from(s: String) -> Content {
        Content::Text(s)
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Content {
        Content::Text(s.to_string())
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// `stop` is a string or a list of strings in the API.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn as_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// The chat completions request fields, sent as written (unset fields are not sent).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Params {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Stream the completion (server-sent events) and assemble it; usage is asked for with
    /// `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<crate::chat::ServiceTier>,
    /// Choices per request (variants).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// `json_schema` (from `[output] schema`) or `json_object`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<serde_json::Value>,
    /// Any other request field, passed through verbatim (flattened into the body by the
    /// HTTP provider, so it is not serialized here).
    #[serde(skip)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Params {
    /// The completion token cap the API applies, if the job sets one.
    pub fn max_output_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Choices each request asks for.
    pub fn choices(&self) -> u64 {
        u64::from(self.n.unwrap_or(1).max(1))
    }
}

/// How requests go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One request per row, paced to the quota, answered now.
    #[default]
    Online,
    /// Files of requests submitted to the Batch API: half price, answered within 24 hours.
    Batch,
}

/// `[model] service_tier`: sent as the request's `service_tier`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTier {
    Auto,
    Default,
    Flex,
    Priority,
}

/// Token usage as the provider reports it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Prompt tokens served from the provider's prompt cache (billed at the cached rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Prompt tokens written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`), billed at the cache-write rate; part of `prompt_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
    /// Of `cache_write_tokens`, those written for an hour (Anthropic's 1-hour cache), billed at
    /// the 1-hour write rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h_tokens: Option<u64>,
    /// Reasoning tokens; already part of `completion_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    /// True when the server sent no usage and these counts come from the tokenizer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

impl Usage {
    /// Adds another request's usage: a row's attempts (re-asks, one request a choice) are
    /// billed together.
    pub fn add(&mut self, b: &Usage) {
        self.prompt_tokens += b.prompt_tokens;
        self.completion_tokens += b.completion_tokens;
        self.total_tokens += b.total_tokens;
        let sum = |x: Option<u64>, y: Option<u64>| match (x, y) {
            (None, None) => None,
            (x, y) => Some(x.unwrap_or(0) + y.unwrap_or(0)),
        };
        self.cached_tokens = sum(self.cached_tokens, b.cached_tokens);
        self.cache_write_tokens = sum(self.cache_write_tokens, b.cache_write_tokens);
        self.cache_write_1h_tokens = sum(self.cache_write_1h_tokens, b.cache_write_1h_tokens);
        self.reasoning_tokens = sum(self.reasoning_tokens, b.reasoning_tokens);
        self.estimated |= b.estimated;
    }
}

/// The API's rule for a message name.
pub fn is_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
