//! The prompt a row's messages become: the model's own chat template (llama.cpp's built-in
//! template engine), or a plain "role: content" transcript when the model has none or the
//! template rejects the messages; and that prompt's tokens.

use llama_cpp_2::model::LlamaChatMessage;
use llama_cpp_2::token::LlamaToken;

use super::LocalModel;
use crate::chat::Message;
use crate::chat::Role;

impl LocalModel {
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
    pub(super) fn tokenize_prompt(&self, messages: &[Message]) -> Vec<LlamaToken> {
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
