//! What the stages read and write: the model a stage starts from, the output directory it
//! may write (never the input, never someone else's model) and the SkipGPT or adapted model
//! directory it leaves there.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use skipgpt_model::io::checkpoint::{ROUTERS_FILE, ROUTING_FILE};
use skipgpt_model::{
    load_pretrained, save_peft_adapter, save_pretrained, save_routers, LlamaForCausalLM,
    StoreDtype, Tokenizer,
};
use skipgpt_train::fit::run_dir;
use skipgpt_train::resume::RunManifest;
use skipgpt_train::RunDir;

use crate::error::io;
use crate::{PipelineError, Result};

/// The tokenizer a stage needs, or an error naming the file it looked for.
pub fn require_tokenizer<T>(tokenizer: Option<T>, dir: &Path, stage: &'static str) -> Result<T> {
    tokenizer.ok_or_else(|| PipelineError::NoTokenizer {
        stage,
        path: dir.join("tokenizer.json"),
    })
}

/// Refuses an output directory that is the input model's: a stage never writes into the
/// model it reads.
pub fn check_out_dir(model: &Path, out: &Path) -> Result<()> {
    if same_dir(model, out) {
        return Err(PipelineError::Output {
            out: out.to_path_buf(),
            why: "is the input model's directory: choose another, the input is left untouched",
        });
    }
    Ok(())
}

/// The start of a stage that trains on top of `model` into `out`: the output is not the
/// input, the run directory may be (re)started, and the model (with autodiff) and its
/// tokenizer are loaded.
pub fn start_training_from<B: Backend>(
    model: &Path,
    out: &Path,
    resume: bool,
    stage: &'static str,
    device: &B::Device,
) -> Result<(RunDir, LlamaForCausalLM<Autodiff<B>>, Tokenizer)> {
    check_out_dir(model, out)?;
    // a model directory that no run of this program wrote (no `train/run.json`): writing the
    // output there would replace someone's model.safetensors, config.json and tokenizer.json
    let holds_model = [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ]
    .iter()
    .any(|f| out.join(f).exists());
    if holds_model && !run_dir(out).join(RunManifest::FILE).exists() {
        return Err(PipelineError::Output {
            out: out.to_path_buf(),
            why: "already holds a model that this command did not write: choose a new or empty directory, it is left untouched",
        });
    }
    let run = RunDir {
        path: run_dir(out),
        resume,
        label: stage.into(),
    };
    RunManifest::check(&run.path, run.resume)?;
    let pretrained = load_pretrained::<Autodiff<B>>(model, device)?;
    let tokenizer = require_tokenizer(pretrained.tokenizer, model, stage)?;
    Ok((run, pretrained.model, tokenizer))
}

/// The input model's files (hard-linked where possible: they are never written in place)
/// plus the routers and `skipgpt.json`; `config.json` last, so a directory with a config is
/// complete.
pub fn write_skipgpt_dir<B: Backend>(
    src: &Path,
    model: &LlamaForCausalLM<B>,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let files: Vec<PathBuf> = std::fs::read_dir(src)
        .map_err(io(src))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name != ROUTERS_FILE && name != ROUTING_FILE && !name.starts_with('.')
        })
        .collect();
    let (config, weights): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|p| p.file_name() == Some("config.json".as_ref()));
    for file in &weights {
        place_copy(file, &out.join(file.file_name().expect("a file")))?;
    }
    save_routers(model, out)?;
    for file in &config {
        place_copy(file, &out.join("config.json"))?;
    }
    Ok(())
}

/// Puts a copy of `src` at `dst` atomically: a hard link, or a copy, to a temporary name,
/// then a rename.
fn place_copy(src: &Path, dst: &Path) -> Result<()> {
    let name = dst.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dst.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(src, &tmp).is_err() {
        std::fs::copy(src, &tmp).map_err(io(src))?;
    }
    std::fs::rename(&tmp, dst).map_err(io(dst))?;
    // renaming a hard link over another link to the same file does nothing (POSIX), which
    // leaves the temporary name behind when `dst` already was this copy (a resumed run)
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// What a run with adapters writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdaptedOutput {
    /// The merged model in `out`, the adapter in `out/adapter`.
    #[default]
    Both,
    /// Only the merged model.
    Merged,
    /// Only the adapter, in the PEFT layout, directly in `out`.
    AdapterOnly,
}

/// Writes a model that carries adapters: merged into a self-contained model directory
/// (routers and `skipgpt.json` included when it has them) and/or the adapter alone in PEFT
/// layout. The adapter never shares a directory with full weights: transformers would load
/// it on top of its base model a second time.
pub fn write_adapted<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    base: &Path,
    out: &Path,
    output: AdaptedOutput,
) -> Result<()> {
    let Some(cfg) = model.lora_config.clone() else {
        return Err(PipelineError::InvalidSetting {
            name: "output",
            value: format!("{output:?}"),
            expected: "a model that carries adapters",
        });
    };
    if output != AdaptedOutput::Merged {
        let dir = match output {
            AdaptedOutput::AdapterOnly => out.to_path_buf(),
            _ => out.join("adapter"),
        };
        let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
        save_peft_adapter(
            &dir,
            &cfg,
            &model.export_lora(),
            &base.display().to_string(),
        )?;
    }
    if output != AdaptedOutput::AdapterOnly {
        let merged = model.clone().merge_lora();
        save_pretrained(&merged, Some(tokenizer), out, StoreDtype::F32)?;
        // what the weights do not carry: the chat template and special tokens, generation
        // defaults
        for name in TOKENIZER_SIDE_FILES {
            let file = base.join(name);
            if file.is_file() {
                place_copy(&file, &out.join(name))?;
            }
        }
    }
    Ok(())
}

/// The files beside the weights that a merged model keeps from its base.
const TOKENIZER_SIDE_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placing_the_same_copy_twice_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("src"), dir.path().join("out"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(&src, b"weights").unwrap();
        // the second time `out/model` is already a hard link to `src` (a resumed run)
        place_copy(&src, &out.join("model")).unwrap();
        place_copy(&src, &out.join("model")).unwrap();
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["model"]);
        assert_eq!(std::fs::read(out.join("model")).unwrap(), b"weights");
    }
}
