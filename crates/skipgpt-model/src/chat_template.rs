//! A model's chat template: the Jinja text that turns a conversation into the prompt the
//! model was trained on, rendered as transformers' `apply_chat_template` renders it (with
//! minijinja and Python's string methods), so that an instruct model is prompted in its own
//! format.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// The template text, the special tokens it may print, and where it came from.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    origin: PathBuf,
}

impl ChatTemplate {
    /// The template of a model directory: `chat_template` in `tokenizer_config.json` (a
    /// string, or a list of named templates of which `default` is taken), with its
    /// `bos_token` and `eos_token`.
    /// A GGUF file's template is its `tokenizer.chat_template`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let (config, path) = if crate::io::gguf::is_gguf(dir) {
            let config = crate::io::gguf::gguf_tokenizer_config(dir)?;
            (config, dir.to_path_buf())
        } else {
            let path = dir.join("tokenizer_config.json");
            let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
            (crate::error::from_json_text(&text, &path)?, path)
        };
        let template = match &config["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string)
                .ok_or_else(|| ModelError::Config {
                    path: path.clone(),
                    message: "`chat_template` is a list without a `default` template".into(),
                })?,
            _ => {
                return Err(ModelError::Config {
                    path,
                    message: "no `chat_template` (a string): this model has no chat format; give one with --chat-template".into(),
                })
            }
        };
        let token = |key: &str| match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        Ok(ChatTemplate {
            source: template,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            origin: path,
        })
    }

    /// A template from a file of Jinja text, with no special tokens defined.
    pub fn from_file(path: &Path) -> Result<Self> {
        let source = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Ok(ChatTemplate {
            source,
            bos_token: String::new(),
            eos_token: String::new(),
            origin: path.to_path_buf(),
        })
    }

    /// The prompt text of `messages`; with `add_generation_prompt`, it ends where the
    /// assistant's answer begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        // transformers' environment: a block tag's newline and the indentation before it are
        // not output, so templates can be written over many lines
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        let fail = |e: minijinja::Error| ModelError::Config {
            path: self.origin.clone(),
            message: format!("chat template: {e}"),
        };
        env.add_template("chat", &self.source).map_err(fail)?;
        let template = env.get_template("chat").map_err(fail)?;
        template
            .render(minijinja::context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its tokenizer_config.json ships it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn write_config(value: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), value.to_string()).unwrap();
        dir
    }

    #[test]
    fn smollm2s_template_renders_its_chatml_prompt() {
        let dir = write_config(serde_json::json!({ "chat_template": SMOLLM2 }));
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        let text = t.render(&[ChatMessage::user("Hi there")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let without = t.render(&[ChatMessage::user("Hi there")], false).unwrap();
        assert!(without.ends_with("Hi there<|im_end|>\n"), "{without}");
    }

    #[test]
    fn templates_use_special_tokens_python_methods_and_may_raise() {
        let dir = write_config(serde_json::json!({
            "chat_template": "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}[{{ m.content.strip() | upper }}]{% endfor %}",
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
        }));
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user("  hi ")], true).unwrap(),
            "<s>[HI]"
        );
        let system = ChatMessage {
            role: "system".into(),
            content: "x".into(),
        };
        let err = t.render(&[system], true).unwrap_err().to_string();
        assert!(
            err.contains("no system messages") && err.contains("tokenizer_config.json"),
            "{err}"
        );
    }

    #[test]
    fn block_tags_leave_neither_their_newline_nor_their_indentation() {
        let dir = write_config(serde_json::json!({
            "chat_template": "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n>{% endif %}",
        }));
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        let m = [ChatMessage::user("a"), ChatMessage::user("b")];
        assert_eq!(t.render(&m, true).unwrap(), "[a]\n[b]\n>");
    }

    #[test]
    fn a_model_without_a_template_is_told_so() {
        let dir = write_config(serde_json::json!({ "bos_token": "<s>" }));
        let err = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chat_template") && err.contains("--chat-template"),
            "{err}"
        );
    }
}
