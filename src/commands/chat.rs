//! `skipgpt chat`: a conversation in the terminal under the model's chat template, the answer
//! printed as it comes. `/reset` forgets the conversation, `/skip F` sets the compute budget
//! (the fraction of routed parameters to skip; `/skip 0` is dense), `/quit` ends. Ctrl-C stops
//! the answer being written, not the program. Lines from a pipe work the same, one message
//! per line.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use skipgpt_model::engine::{sparse_forward_shifted, LogitRows, SparseCache};
use skipgpt_model::{ChatMessage, ChatTemplate, LlamaForCausalLM, Tokenizer};

use crate::args::ModelArgs;
use crate::backend::BackendKind;
use crate::serve::budget::{routing_of, Budgets};
use crate::serve::sampler::{Sampler, SamplingParams};
use crate::serve::text::AnswerText;
use crate::with_backend;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A Jinja chat template to use instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<std::path::PathBuf>,
    /// A system message to begin the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature (0: the most likely token each time).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// New tokens per answer at most.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
}

/// An answer is being written (Ctrl-C stops it) / Ctrl-C asked it to stop.
static ANSWERING: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_interrupt(_: libc::c_int) {
    if ANSWERING.load(Ordering::SeqCst) {
        STOP.store(true, Ordering::SeqCst);
    } else {
        // SAFETY: _exit is async-signal-safe
        unsafe { libc::_exit(130) };
    }
}

pub fn run(backend: BackendKind, args: ChatArgs) -> Result<()> {
    with_backend!(backend, |B, device| chat_on::<B>(&args, &device))
}

fn chat_on<B: Backend>(args: &ChatArgs, device: &B::Device) -> Result<()> {
    let pretrained = args.model.load::<B>(device)?;
    let tokenizer = pretrained
        .tokenizer
        .context("the chat needs the model's tokenizer")?;
    let template = match &args.chat_template {
        Some(path) => ChatTemplate::from_file(path)?,
        None => ChatTemplate::from_model_dir(&args.model.dir)?,
    };
    let model = pretrained.model;
    #[cfg(unix)]
    // SAFETY: installs a handler that only touches atomics and calls _exit
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
    let terminal = std::io::stdin().is_terminal();
    if terminal {
        eprintln!(
            "chat with {} — /reset, /skip 0.3, /quit; Ctrl-C stops an answer",
            args.model.dir.display()
        );
    }
    let mut session = Session {
        model: &model,
        tokenizer: &tokenizer,
        template: &template,
        history: Vec::new(),
        budgets: None,
        skip: None,
        args,
    };
    session.reset();
    let stdin = std::io::stdin();
    loop {
        if terminal {
            print!("> ");
            std::io::stdout().flush()?;
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim();
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            [] => continue,
            ["/quit"] | ["/exit"] => return Ok(()),
            ["/reset"] => {
                session.reset();
                println!("(conversation reset)");
            }
            ["/skip", value] => match session.set_skip(value) {
                Ok(note) => println!("({note})"),
                Err(e) => println!("(error: {e:#})"),
            },
            [cmd, ..] if cmd.starts_with('/') => {
                println!("(unknown command {cmd}: /reset, /skip F, /quit)")
            }
            _ => session.answer(line)?,
        }
    }
}

struct Session<'a, B: Backend> {
    model: &'a LlamaForCausalLM<B>,
    tokenizer: &'a Tokenizer,
    template: &'a ChatTemplate,
    history: Vec<ChatMessage>,
    budgets: Option<Budgets>,
    /// `None`: the model's own routing.
    skip: Option<f64>,
    args: &'a ChatArgs,
}

impl<B: Backend> Session<'_, B> {
    fn reset(&mut self) {
        self.history.clear();
        if let Some(system) = &self.args.system {
            self.history.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
    }

    fn set_skip(&mut self, value: &str) -> Result<String> {
        let skip: f64 = value
            .parse()
            .with_context(|| format!("/skip {value}: expected a fraction such as 0.3"))?;
        if !(0.0..1.0).contains(&skip) {
            bail!("/skip {skip}: expected a fraction in [0, 1)");
        }
        if skip > 0.0 && self.model.routing_config.is_none() {
            bail!("this model has no routers (give --routers DIR): it runs dense");
        }
        if skip > 0.0 && self.budgets.is_none() {
            self.budgets = Some(Budgets::calibrate_on_builtin(self.model, self.tokenizer)?);
            crate::memory::release_free_heap();
        }
        self.skip = Some(skip);
        Ok(if skip == 0.0 {
            "dense: every module runs".into()
        } else {
            format!("skipping {:.0}% of routed parameters", 100.0 * skip)
        })
    }

    /// Answers `message` under the history, printing as it comes; the answer joins the
    /// history.
    fn answer(&mut self, message: &str) -> Result<()> {
        self.history.push(ChatMessage::user(message));
        let prompt = self.template.render(&self.history, true)?;
        let ids = self.tokenizer.encode_plain(&prompt)?.0;
        let config = &self.model.config;
        let max_tokens = self
            .args
            .max_tokens
            .min(config.max_position_embeddings.saturating_sub(ids.len()));
        if max_tokens == 0 {
            self.history.pop();
            println!("(the conversation fills the model's context: /reset)");
            return Ok(());
        }
        let fixed = Budgets::fixed();
        let shift = self.budgets.as_ref().unwrap_or(&fixed).shift(self.skip);
        let routing = (routing_of(self.model), &[shift][..]);
        let mut sampler = Sampler::new(
            SamplingParams {
                temperature: self.args.temperature,
                top_p: self.args.top_p,
                seed: self.args.seed,
                ..Default::default()
            },
            &ids,
        );
        let mut cache = SparseCache::new(1, config.num_hidden_layers);
        let mut text = AnswerText::new(Vec::new());
        let mut input = ids;
        let mut answer = String::new();
        ANSWERING.store(true, Ordering::SeqCst);
        STOP.store(false, Ordering::SeqCst);
        let mut out = std::io::stdout();
        for _ in 0..max_tokens {
            let step =
                sparse_forward_shifted(self.model, &[input], &mut cache, routing, LogitRows::Last)?;
            let mut logits: Vec<f32> = step
                .logits
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 after convert");
            let id = sampler.next(&mut logits);
            if config.eos_token_ids.contains(&id) || STOP.load(Ordering::SeqCst) {
                break;
            }
            let piece = text.push(self.tokenizer, Some(id), false).text;
            answer.push_str(&piece);
            write!(out, "{piece}")?;
            out.flush()?;
            input = vec![id];
        }
        ANSWERING.store(false, Ordering::SeqCst);
        let rest = text.push(self.tokenizer, None, true).text;
        answer.push_str(&rest);
        writeln!(out, "{rest}")?;
        if STOP.swap(false, Ordering::SeqCst) {
            eprintln!("(stopped)");
        }
        self.history.push(ChatMessage {
            role: "assistant".into(),
            content: answer,
        });
        Ok(())
    }
}
