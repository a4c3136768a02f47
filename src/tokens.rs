//! Prompt token counting with the model's tiktoken encoding, the chat per-message overhead
//! included, as OpenAI bills it. The encoding is built once, lazily: a resumed run that sends
//! nothing never pays for loading it.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::chat::Message;
use crate::provider::TokenCounter;

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

    /// OpenAI's published recipe: 3 tokens per message, 1 more for a name, 3 to prime the reply.
    fn count_prompt(&self, messages: &[Message]) -> u64 {
        let mut n = 3;
        for m in messages {
            n += 3 + self.count_text(m.role.as_str()) + self.count_text(&m.content);
            if let Some(name) = &m.name {
                n += 1 + self.count_text(name);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;

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
}
