//! Zero-shot multiple-choice scoring the way lm-evaluation-harness scores BoolQ, PIQA,
//! HellaSwag, WinoGrande, ARC and OpenBookQA: the log-likelihood of each continuation given
//! the context; `acc` picks the most likely choice, `acc_norm` the most likely per byte of
//! continuation text.
//!
//! A task is a JSONL file, one example per line:
//! `{"context": "...", "choices": ["...", "..."], "gold": 0}`.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{activation, backend::Backend, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use skipgpt_data::{OBJECTS, SUBJECTS, VERBS};
use skipgpt_model::engine::{sparse_forward, LogitRows, SparseCache};
use skipgpt_model::{LlamaForCausalLM, Routing, Tokenizer};

use crate::error::{EvalError, Result};
use crate::host_f64;

/// One question: the context, the candidate continuations and the index of the right one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McExample {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

/// A named list of examples (the name is the file stem).
#[derive(Debug, Clone, PartialEq)]
pub struct McTask {
    pub name: String,
    pub examples: Vec<McExample>,
}

impl McTask {
    /// Reads a JSONL task file; errors name the file and line.
    pub fn read(path: &Path) -> Result<McTask> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let bad = |line: usize, message: String| EvalError::Task {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let ex: McExample = serde_json::from_str(line).map_err(|e| {
                bad(
                    i + 1,
                    format!("{e} (expected {{\"context\": str, \"choices\": [str, ...], \"gold\": int}})"),
                )
            })?;
            if ex.choices.len() < 2 {
                return Err(bad(
                    i + 1,
                    format!("{} choices: need at least 2", ex.choices.len()),
                ));
            }
            if ex.gold >= ex.choices.len() {
                return Err(bad(
                    i + 1,
                    format!("gold {} but only {} choices", ex.gold, ex.choices.len()),
                ));
            }
            if ex.choices.iter().any(|c| c.is_empty()) {
                return Err(bad(i + 1, "an empty choice".into()));
            }
            examples.push(ex);
        }
        if examples.is_empty() {
            return Err(bad(0, "no examples".into()));
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("task")
            .to_string();
        Ok(McTask { name, examples })
    }

    /// Writes the task as `dir/{name}.jsonl` and returns the path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(format!("{}.jsonl", self.name));
        let io = |e| EvalError::Io {
            path: path.clone(),
            source: e,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut f = std::fs::File::create(&path).map_err(io)?;
        for ex in &self.examples {
            let line = serde_json::to_string(ex).expect("an example serialises");
            writeln!(f, "{line}").map_err(io)?;
        }
        Ok(path)
    }
}

/// Accuracy on one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McReport {
    pub task: String,
    pub examples: usize,
    /// Fraction where the most likely choice is the gold one.
    pub acc: f64,
    /// The same with log-likelihoods divided by the choice's length in bytes.
    pub acc_norm: f64,
}

/// Scores every example of `task`: one forward pass per (context, choice) pair, in batches of
/// `batch_size` pairs, through the sparse engine (skipped work is not computed, as at
/// inference). `progress` gets (pairs done, total).
pub fn evaluate_mc<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    task: &McTask,
    routing: Routing,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<McReport> {
    // requests: (example, tokens of context + choice, how many of them are the choice)
    let max_len = model.config.max_position_embeddings + 1;
    let mut requests: Vec<(usize, Vec<u32>, usize)> = Vec::new();
    for (e, ex) in task.examples.iter().enumerate() {
        let context = tokenizer.encode(&ex.context)?;
        for choice in &ex.choices {
            // as lm-eval: encode the whole text and take what follows the context's tokens,
            // so a merge across the boundary is tokenized the way the model saw such text
            let whole = tokenizer.encode(&format!("{}{choice}", ex.context))?;
            let shared = context
                .iter()
                .zip(&whole)
                .take_while(|(a, b)| a == b)
                .count()
                .min(whole.len().saturating_sub(1));
            let mut ids = whole;
            let mut n_cont = ids.len() - shared;
            if ids.len() > max_len {
                // keep the end: the continuation and as much context as fits
                ids.drain(..ids.len() - max_len);
                n_cont = n_cont.min(max_len - 1);
            }
            if ids.len() < 2 {
                return Err(EvalError::Input(format!(
                    "task {}: example {e} is too short to score (context and choice give {} token)",
                    task.name,
                    ids.len()
                )));
            }
            requests.push((e, ids, n_cont));
        }
    }
    let device = model.device();
    let layers = model.config.num_hidden_layers;
    let mut loglik = vec![0.0f64; requests.len()];
    let total = requests.len();
    let batch_size = batch_size.max(1);
    for (c, chunk) in requests.chunks(batch_size).enumerate() {
        // the engine takes sequences of different lengths as they are: no padding
        let inputs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|(_, ids, _)| ids[..ids.len() - 1].to_vec())
            .collect();
        let targets: Vec<i64> = chunk
            .iter()
            .flat_map(|(_, ids, _)| ids[1..].iter().map(|&i| i as i64))
            .collect();
        let rows = targets.len();
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [rows, 1]), &device);
        let mut cache = SparseCache::new(chunk.len(), layers);
        let logits = sparse_forward(model, &inputs, &mut cache, routing, LogitRows::All)?.logits;
        let logp = host_f64(activation::log_softmax(logits, 1).gather(1, targets));
        let mut start = 0;
        for (i, (_, ids, n_cont)) in chunk.iter().enumerate() {
            let end = start + ids.len() - 1;
            loglik[c * batch_size + i] = logp[end - n_cont..end].iter().sum();
            start = end;
        }
        progress((c * batch_size + chunk.len()).min(total), total);
    }

    let (mut right, mut right_norm) = (0usize, 0usize);
    let mut r = 0;
    for ex in &task.examples {
        let scores = &loglik[r..r + ex.choices.len()];
        r += ex.choices.len();
        let argmax = |f: &dyn Fn(usize) -> f64| {
            (0..scores.len())
                .max_by(|&a, &b| f(a).total_cmp(&f(b)))
                .expect("at least two choices")
        };
        right += usize::from(argmax(&|i| scores[i]) == ex.gold);
        right_norm += usize::from(argmax(&|i| scores[i] / ex.choices[i].len() as f64) == ex.gold);
    }
    let n = task.examples.len() as f64;
    Ok(McReport {
        task: task.name.clone(),
        examples: task.examples.len(),
        acc: right as f64 / n,
        acc_norm: right_norm as f64 / n,
    })
}

/// Three small tasks on the grammar of the built-in synthetic corpus, `n` examples each, for
/// demos and tests:
/// - `count-next`: the next number of a counting run (4 choices);
/// - `phrase-end`: the word that closes the fixed phrase "and so on, the ..." (4 choices);
/// - `word-order`: subject-verb-object against subject-object-verb (2 choices).
pub fn synthetic_mc_tasks(n: usize, seed: u64) -> Vec<McTask> {
    let mut rng = StdRng::seed_from_u64(seed);
    let pick = |list: &[&'static str], rng: &mut StdRng| list[rng.random_range(0..list.len())];
    let shuffle = |choices: Vec<String>, gold: &str, rng: &mut StdRng| {
        let mut choices = choices;
        choices.shuffle(rng);
        let gold = choices
            .iter()
            .position(|c| c == gold)
            .expect("gold among the choices");
        (choices, gold)
    };
    let mut count = Vec::new();
    let mut phrase = Vec::new();
    let mut order = Vec::new();
    for _ in 0..n {
        let (s, v, o) = (
            pick(&SUBJECTS, &mut rng),
            pick(&VERBS, &mut rng),
            pick(&OBJECTS, &mut rng),
        );
        let a: u32 = rng.random_range(1..60);
        let gold = format!(" {}", a + 3);
        let (choices, g) = shuffle(
            [a + 3, a + 2, a + 5, a + 13]
                .iter()
                .map(|x| format!(" {x}"))
                .collect(),
            &gold,
            &mut rng,
        );
        count.push(McExample {
            context: format!("{s} {v} {o}. then it counts {} {} {}", a, a + 1, a + 2),
            choices,
            gold: g,
        });

        let run: Vec<String> = (a..a + 6).map(|x| x.to_string()).collect();
        let noun = |o: &str| o.rsplit(' ').next().unwrap_or(o).to_string();
        let mut distractors: Vec<String> = Vec::new();
        while distractors.len() < 3 {
            let d = format!(" {}.", noun(pick(&OBJECTS, &mut rng)));
            if !distractors.contains(&d) {
                distractors.push(d);
            }
        }
        distractors.push(" end.".into());
        let (choices, g) = shuffle(distractors, " end.", &mut rng);
        phrase.push(McExample {
            context: format!(
                "{s} {v} {o}. then it counts {}. and so on, the",
                run.join(" ")
            ),
            choices,
            gold: g,
        });

        let right = format!(" {v} {o}.");
        let (choices, g) = shuffle(vec![right.clone(), format!(" {o} {v}.")], &right, &mut rng);
        order.push(McExample {
            context: s.to_string(),
            choices,
            gold: g,
        });
    }
    [
        ("count-next", count),
        ("phrase-end", phrase),
        ("word-order", order),
    ]
    .into_iter()
    .map(|(name, examples)| McTask {
        name: name.into(),
        examples,
    })
    .collect()
}
