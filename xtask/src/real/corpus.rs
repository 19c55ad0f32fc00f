//! The corpus of the real-model experiment: the Python documentation from Debian's `python3.11-doc`, whole files held out by a hash of their path, and the cloze task made from held-out prose.

use crate::run;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use skipgpt_eval::McExample;
use std::path::{Path, PathBuf};

use super::*;

/// One line of the corpus files (`corpus/train.jsonl`, `valid.jsonl`): a file of the
/// documentation, its path under `_sources/` and its text.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Doc {
    pub(super) file: String,
    pub(super) text: String,
}

/// `corpus/split.json`: which files are held out, and by what rule.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Split {
    pub(super) rule: String,
    pub(super) files: usize,
    pub(super) held_out: Vec<String>,
}

/// A file of the documentation is held out when the FNV-1a hash of its path (relative to
/// `_sources`) is 0 mod 10: about a tenth of the files, fixed by their names alone, so the
/// split does not depend on the order a directory lists them in.
pub fn is_held_out(relative: &str) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in relative.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.is_multiple_of(10)
}

/// Where the corpus went: training and held-out documents (JSONL, one file per line), and the
/// cloze task made from the held-out ones.
pub struct Corpus {
    pub train: PathBuf,
    pub valid: PathBuf,
    pub cloze: PathBuf,
}

pub(super) fn corpus(work: &Path, mc_examples: usize) -> Result<Corpus> {
    let dir = work.join("corpus");
    let out = Corpus {
        train: dir.join("train.jsonl"),
        valid: dir.join("valid.jsonl"),
        cloze: dir.join("cloze.jsonl"),
    };
    if out.cloze.exists() {
        return Ok(out);
    }
    let deb_dir = dir.join("deb");
    std::fs::create_dir_all(&deb_dir)?;
    let sources = deb_dir.join("x").join(SOURCES);
    if !sources.exists() {
        let status = std::process::Command::new("apt-get")
            .args(["download", "python3.11-doc"])
            .current_dir(&deb_dir)
            .status()
            .context("apt-get download python3.11-doc")?;
        if !status.success() {
            bail!("apt-get download python3.11-doc failed ({status})");
        }
        let deb = std::fs::read_dir(&deb_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("no .deb after apt-get download")?;
        run("dpkg", &["-x", s(&deb), s(&deb_dir.join("x"))])?;
    }
    let mut files = Vec::new();
    collect(&sources, &mut files)?;
    files.sort();
    let (mut train, mut valid, mut held) = (String::new(), String::new(), Vec::new());
    let mut held_names = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&sources)?.to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path)?;
        let held_out = is_held_out(&rel);
        let doc = Doc { file: rel, text };
        let line = serde_json::to_string(&doc)?;
        if held_out {
            valid.push_str(&line);
            valid.push('\n');
            held_names.push(doc.file);
            held.push(doc.text);
        } else {
            train.push_str(&line);
            train.push('\n');
        }
    }
    std::fs::write(&out.train, train)?;
    std::fs::write(&out.valid, valid)?;
    std::fs::write(
        dir.join("split.json"),
        serde_json::to_string_pretty(&Split {
            rule: "held out iff FNV-1a-64(path relative to _sources) % 10 == 0".into(),
            files: files.len(),
            held_out: held_names,
        })?,
    )?;
    let tasks = cloze_tasks(&held, mc_examples);
    let mut text = String::new();
    for t in &tasks {
        text.push_str(&serde_json::to_string(t)?);
        text.push('\n');
    }
    std::fs::write(&out.cloze, text)?;
    Ok(out)
}

pub(super) fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.to_string_lossy().ends_with(".rst.txt") {
            out.push(path);
        }
    }
    Ok(())
}

/// A word the cloze task can ask for or offer: letters only, 4 to 14 of them.
pub(super) fn is_word(w: &str) -> bool {
    (4..=14).contains(&w.len()) && w.chars().all(|c| c.is_ascii_alphabetic())
}

/// Last-word cloze from held-out prose: a paragraph of plain sentences (no markup lines) whose
/// last sentence ends in `word.`; the context is the paragraph up to that word (at most 60
/// words), the gold choice is the word, and three distractors are other words of the same
/// document, drawn by a fixed hash so the task is the same on every machine. Lines with reST
/// markup (`..`, `::`, `:func:` roles, tables, indented code) are not used.
pub fn cloze_tasks(docs: &[String], max: usize) -> Vec<McExample> {
    let mut tasks = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        let vocab: Vec<&str> = {
            let mut v: Vec<&str> = doc
                .split(|c: char| !c.is_ascii_alphabetic())
                .filter(|w| is_word(w))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        if vocab.len() < 20 {
            continue;
        }
        for (p, para) in doc.split("\n\n").enumerate() {
            let clean = para.lines().all(|l| {
                !l.starts_with(' ')
                    && !l.contains("..")
                    && !l.contains("::")
                    && !l.contains('`')
                    && !l.contains('*')
                    && !l.contains('|')
                    && !l.contains('=')
                    && !l.contains('-')
            });
            let text = para.split_whitespace().collect::<Vec<_>>().join(" ");
            let Some(body) = text.strip_suffix('.') else {
                continue;
            };
            let words: Vec<&str> = body.split(' ').collect();
            if !clean || words.len() < 12 {
                continue;
            }
            let gold = *words.last().unwrap();
            if !is_word(gold) {
                continue;
            }
            let start = words.len().saturating_sub(61);
            let context = words[start..words.len() - 1].join(" ");
            let mut choices = vec![format!(" {gold}")];
            let mut k = (d * 7919 + p * 104_729) as u64;
            while choices.len() < 4 {
                k = k.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let w = vocab[(k >> 33) as usize % vocab.len()];
                let c = format!(" {w}");
                if !w.eq_ignore_ascii_case(gold) && !choices.contains(&c) {
                    choices.push(c);
                }
            }
            // the gold answer's position, also by the hash
            let gold_at = (k >> 40) as usize % 4;
            choices.swap(0, gold_at);
            tasks.push(McExample {
                context,
                choices,
                gold: gold_at,
            });
        }
    }
    // spread over documents rather than the first few
    if tasks.len() > max {
        let step = tasks.len() as f64 / max as f64;
        tasks = (0..max)
            .map(|i| tasks[(i as f64 * step) as usize].clone())
            .collect();
    }
    tasks
}

/// A small fixed slice of held-out text for the published models' test: the first 3000
/// characters of the first four held-out files.
pub const SLICE: &str = "tests/fixtures/smollm2/heldout.jsonl";

pub(super) fn write_slice(corpus: &Corpus) -> Result<()> {
    let mut out = String::new();
    for line in std::fs::read_to_string(&corpus.valid)?.lines().take(4) {
        let doc: Doc = serde_json::from_str(line)?;
        let slice = Doc {
            text: doc.text.chars().take(3000).collect(),
            ..doc
        };
        out.push_str(&serde_json::to_string(&slice)?);
        out.push('\n');
    }
    std::fs::write(SLICE, out)?;
    Ok(())
}
