//! Prompt files: one prompt a line, put into the model's chat format (or left as raw text)
//! and tokenized, for self-data and the generation check.

use std::path::{Path, PathBuf};

use skipgpt_model::{ChatMessage, ChatTemplate, Tokenizer};

use crate::error::io;
use crate::{PipelineError, Result};

/// How prompts reach the model.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    /// The model's own chat template (`tokenizer_config.json`), as a user turn followed by the
    /// start of the assistant's answer.
    #[default]
    Chat,
    /// A chat template from this file instead of the model's.
    ChatTemplateFile(PathBuf),
    /// The text as it is, continued.
    Raw,
}

/// The prompts of `path`: one a line, blank lines and lines starting with `#` skipped; `\n`
/// in a line stands for a newline.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.replace("\\n", "\n"))
        .collect();
    if prompts.is_empty() {
        return Err(PipelineError::InvalidSetting {
            name: "prompts",
            value: path.display().to_string(),
            expected: "a file with at least one prompt (one per line)",
        });
    }
    Ok(prompts)
}

/// Each prompt as the text the model continues.
pub fn render_prompts(
    prompts: &[String],
    format: &PromptFormat,
    model_dir: &Path,
) -> Result<Vec<String>> {
    let template = match format {
        PromptFormat::Raw => return Ok(prompts.to_vec()),
        PromptFormat::Chat => ChatTemplate::from_model_dir(model_dir)?,
        PromptFormat::ChatTemplateFile(path) => ChatTemplate::from_file(path)?,
    };
    prompts
        .iter()
        .map(|p| Ok(template.render(&[ChatMessage::user(p.clone())], true)?))
        .collect()
}

/// Token ids of rendered prompts. A chat prompt carries its own special tokens, so nothing is
/// added (transformers' `apply_chat_template(..., tokenize=True)`); raw text gets what the
/// tokenizer adds.
pub fn tokenize_prompts(
    rendered: &[String],
    format: &PromptFormat,
    tokenizer: &Tokenizer,
) -> Result<Vec<Vec<u32>>> {
    rendered
        .iter()
        .map(|text| {
            let ids = match format {
                PromptFormat::Raw => tokenizer.encode(text)?,
                _ => tokenizer.encode_plain(text)?.0,
            };
            if ids.is_empty() {
                return Err(PipelineError::InvalidSetting {
                    name: "prompt",
                    value: format!("{text:?}"),
                    expected: "a prompt of at least one token",
                });
            }
            Ok(ids)
        })
        .collect()
}
