//! The prompt a row's messages become: the model's own chat template (llama.cpp's built-in
//! template engine), or a plain "role: content" transcript when the model has none or the
//! template rejects the messages; and that prompt's tokens.

use std::path::Path;

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use super::LocalModel;
use crate::chat::Message;
use crate::chat::Role;
use crate::error::Error;
use crate::tokens::TokenCounter;

impl LocalModel {
    /// The prompt text the model sees for these messages.
    pub fn render_prompt(&self, messages: &[Message]) -> String {
        render(&self.model, self.template.as_ref(), messages)
    }

    /// The prompt's tokens, BOS included once.
    pub(super) fn tokenize_prompt(&self, messages: &[Message]) -> Vec<LlamaToken> {
        tokenize(&self.model, self.template.as_ref(), messages)
    }
}

/// The model's vocabulary and chat template alone (llama.cpp's `vocab_only`: no weights, no
/// context): what counting a prompt needs where nothing is generated (estimate, render,
/// status, export). It counts exactly as the loaded model does.
pub struct Tokenizer {
    model: LlamaModel,
    template: Option<LlamaChatTemplate>,
}

impl Tokenizer {
    pub fn load(path: &Path) -> Result<Tokenizer, Error> {
        let model_err = |message: String| Error::Model {
            path: path.to_path_buf(),
            message,
        };
        // The caller (`backend`) has checked the file, before hashing it.
        let backend =
            super::backend().map_err(|e| model_err(format!("cannot start llama.cpp: {e}")))?;
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| model_err(format!("llama.cpp could not read the model: {e}")))?;
        let template = model.chat_template(None).ok();
        tracing::debug!(path = %path.display(), "local model's vocabulary loaded (vocabulary only)");
        Ok(Tokenizer { model, template })
    }
}

impl TokenCounter for Tokenizer {
    fn count_prompt(&self, messages: &[Message]) -> u64 {
        tokenize(&self.model, self.template.as_ref(), messages).len() as u64
    }

    fn count_text(&self, text: &str) -> u64 {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), false, false)
            .len() as u64
    }
}

/// The prompt text `model` sees for these messages, through its template if it has one.
fn render(
    model: &LlamaModel,
    template: Option<&LlamaChatTemplate>,
    messages: &[Message],
) -> String {
    let Some(tmpl) = template else {
        return plain_prompt(messages);
    };
    let apply = |msgs: &[(String, String)]| -> Option<String> {
        let chat: Vec<LlamaChatMessage> = msgs
            .iter()
            .map(|(r, c)| LlamaChatMessage::new(r.clone(), c.clone()))
            .collect::<Result<_, _>>()
            .ok()?;
        model.apply_chat_template(tmpl, &chat, true).ok()
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
fn tokenize(
    model: &LlamaModel,
    template: Option<&LlamaChatTemplate>,
    messages: &[Message],
) -> Vec<LlamaToken> {
    let prompt = render(model, template, messages);
    let vocab = model.vocab();
    let mut tokens = vocab.tokenize(prompt.as_bytes(), true, true);
    // A template that writes `<bos>` itself plus add_special would give two.
    let bos = vocab.bos();
    if tokens.len() >= 2 && tokens[0] == bos && tokens[1] == bos {
        tokens.remove(0);
    }
    tokens
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

#[cfg(test)]
mod tests {
    use super::*;

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
