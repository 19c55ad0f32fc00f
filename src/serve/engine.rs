//! The scheduler: one thread owns the model and the engine's cache of `--max-seqs` slots, and
//! runs steps. Each step every running request gets its next input (a chunk of its prompt, or
//! the token it last produced), all of them go through the sparse engine in one call, and the
//! requests whose prompt is in sample their next token.
//!
//! - **Joining**: waiting requests take free slots at the start of a step.
//! - **Chunked prefill**: every decoding request feeds its token each step, and the prompts
//!   still being read share at most [`PREFILL_BUDGET`] tokens per step, handed out in order of
//!   arrival. A long prompt therefore does not stall the decoding streams, and under a burst
//!   of requests the earliest answers first instead of every prompt advancing together and
//!   all of them answering late.
//! - **Leaving**: a request leaves when it ends (end-of-sequence, `max_tokens`) or when its
//!   client has gone (its channel closed: a disconnect, or a stop string the HTTP side found);
//!   its slot is emptied ([`SparseCache::reset_sequence`]) before the next step.
//! - **Compute budgets**: each request's `skip` budget becomes a shift of the routers' SKIP
//!   logits for its rows ([`super::budget`]); requests of every budget, dense among them, run
//!   in the step's one engine call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use skipgpt_model::engine::{sparse_forward_shifted, LogitRows, SparseCache};
use skipgpt_model::LlamaForCausalLM;
use tokio::sync::mpsc::UnboundedSender;

use super::budget::{routing_of, Budgets};
use super::metrics::Metrics;
use super::sampler::Sampler;

/// Prompt tokens fed per step, over all requests (llama.cpp's default micro-batch).
pub const PREFILL_BUDGET: usize = 512;

/// A request as the engine runs it.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Tokens that end the answer (empty with `ignore_eos`).
    pub eos: Vec<u32>,
    pub sampler: Sampler,
    /// `Some(k)`: report each token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// The `skip` budget: `None` the model's own routing, `Some(0.0)` dense.
    pub skip: Option<f64>,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

/// What the engine tells a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        id: u32,
        logprobs: Option<TokenLogprobs>,
        /// So far: skipped (token, layer) attention and MLP decisions, and decisions per
        /// module kind.
        skips: (usize, usize, usize),
    },
    /// The answer is over (`stop`: end-of-sequence, `length`: `max_tokens`); nothing follows.
    Done {
        finish_reason: &'static str,
    },
    Failed(String),
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A running request in its slot.
struct Running {
    job: Job,
    /// The router shift of the request's budget ([`Budgets::shift`]).
    shift: f64,
    fed: usize,
    generated: usize,
    last: u32,
    last_at: Instant,
    attn_skipped: usize,
    mlp_skipped: usize,
    decisions: usize,
}

/// The engine thread's state.
pub struct Scheduler<B: Backend> {
    model: LlamaForCausalLM<B>,
    budgets: Budgets,
    cache: SparseCache<B>,
    slots: Vec<Option<Running>>,
    jobs: Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl<B: Backend> Scheduler<B> {
    pub fn new(
        model: LlamaForCausalLM<B>,
        budgets: Budgets,
        max_seqs: usize,
        jobs: Receiver<Job>,
        waiting: Arc<AtomicUsize>,
        running: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache = SparseCache::new(max_seqs, model.config.num_hidden_layers);
        Scheduler {
            model,
            budgets,
            cache,
            slots: (0..max_seqs).map(|_| None).collect(),
            jobs,
            waiting,
            running,
            metrics,
        }
    }

    /// Runs until every sender of jobs is gone and every request has ended.
    pub fn run(mut self) {
        loop {
            if !self.admit() {
                return;
            }
            self.drop_cancelled();
            if self.slots.iter().all(Option::is_none) {
                continue;
            }
            self.step();
        }
    }

    /// Takes waiting jobs into free slots; blocks while nothing runs. False once no job can
    /// come any more and nothing runs.
    fn admit(&mut self) -> bool {
        while let Some(free) = self.slots.iter().position(Option::is_none) {
            let idle = self.slots.iter().all(Option::is_none);
            let job = if idle {
                match self.jobs.recv_timeout(Duration::from_millis(200)) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => return true,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            } else {
                match self.jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                // its client left while it waited
                self.metrics.cancelled();
                continue;
            }
            self.metrics.queue_wait(job.arrived.elapsed());
            self.running.fetch_add(1, Ordering::SeqCst);
            let last = *job.prompt.last().unwrap_or(&0);
            let shift = self.budgets.shift(job.skip);
            self.slots[free] = Some(Running {
                job,
                shift,
                fed: 0,
                generated: 0,
                last,
                last_at: Instant::now(),
                attn_skipped: 0,
                mlp_skipped: 0,
                decisions: 0,
            });
        }
        true
    }

    /// Frees the slots of requests whose client has gone.
    fn drop_cancelled(&mut self) {
        for s in 0..self.slots.len() {
            if self.slots[s]
                .as_ref()
                .is_some_and(|r| r.job.events.is_closed())
            {
                self.metrics.cancelled();
                self.free(s);
            }
        }
    }

    fn free(&mut self, s: usize) {
        self.slots[s] = None;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.cache
            .reset_sequence(s)
            .expect("the slot is one of the cache's");
    }

    /// One engine call for every request that feeds tokens this step.
    fn step(&mut self) {
        let t = Instant::now();
        let inputs = self.inputs();
        let members: Vec<usize> = (0..self.slots.len())
            .filter(|&s| !inputs[s].is_empty())
            .collect();
        self.step_members(&members, &inputs);
        self.metrics.step(members.len(), t.elapsed());
    }

    /// What each slot feeds this step: its last token when decoding; the next piece of its
    /// prompt while the step's prompt budget lasts, earliest arrival first; else nothing.
    fn inputs(&self) -> Vec<Vec<u32>> {
        let mut inputs = vec![Vec::new(); self.slots.len()];
        let mut by_arrival: Vec<(Instant, usize)> = (self.slots.iter().enumerate())
            .filter_map(|(s, r)| Some((r.as_ref()?.job.arrived, s)))
            .collect();
        by_arrival.sort();
        let mut budget = PREFILL_BUDGET;
        for (_, s) in by_arrival {
            let r = self.slots[s].as_ref().expect("a running slot");
            inputs[s] = if r.fed < r.job.prompt.len() {
                let end = (r.fed + budget).min(r.job.prompt.len());
                budget -= end - r.fed;
                r.job.prompt[r.fed..end].to_vec()
            } else {
                vec![r.last]
            };
        }
        inputs
    }

    /// Runs the slots `members` on their `inputs`, each at its own budget.
    fn step_members(&mut self, members: &[usize], inputs: &[Vec<u32>]) {
        let shifts: Vec<f64> = (self.slots.iter())
            .map(|r| r.as_ref().map_or(0.0, |r| r.shift))
            .collect();
        let routing = (routing_of(&self.model), &shifts[..]);
        let (model, cache) = (&self.model, &mut self.cache);
        let out = sparse_forward_shifted(model, inputs, cache, routing, LogitRows::Last);
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                for &s in members {
                    let r = self.slots[s].take().expect("a member runs");
                    let _ = r.job.events.send(Event::Failed(e.to_string()));
                    self.free(s);
                }
                return;
            }
        };
        let [_, vocab] = out.logits.dims();
        let logits: Vec<f32> = out
            .logits
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 after convert");
        // gates come per new token in sequence order; logits one row per sequence with input
        let mut token_at = 0;
        for (row, &s) in members.iter().enumerate() {
            let n = inputs[s].len();
            let r = self.slots[s].as_mut().expect("a member runs");
            r.attn_skipped += count_skips(&out.attn_gates, token_at, n);
            r.mlp_skipped += count_skips(&out.mlp_gates, token_at, n);
            r.decisions += n * out.attn_gates.len();
            token_at += n;
            r.fed += if r.fed < r.job.prompt.len() { n } else { 0 };
            if r.fed < r.job.prompt.len() {
                continue;
            }
            let mut row_logits = logits[row * vocab..(row + 1) * vocab].to_vec();
            if self.emit(s, &mut row_logits) {
                self.free(s);
            }
        }
        self.metrics
            .tokens_in(members.iter().map(|&s| inputs[s].len()).sum());
    }

    /// Samples slot `s`'s next token and sends it; true when the request is over.
    fn emit(&mut self, s: usize, logits: &mut [f32]) -> bool {
        let r = self.slots[s].as_mut().expect("a member runs");
        let logprobs = r.job.logprobs.map(|k| (log_softmax(logits), k));
        let sampled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.job.sampler.next(logits)));
        let Ok(id) = sampled else {
            let _ = r.job.events.send(Event::Failed("sampling failed".into()));
            return true;
        };
        let logprobs = logprobs.map(|(lp, k)| TokenLogprobs {
            logprob: lp[id as usize],
            top: top_k(&lp, k),
        });
        r.generated += 1;
        r.last = id;
        let now = Instant::now();
        match r.generated {
            1 => self.metrics.token_out(Some(now - r.job.arrived), None),
            _ => self.metrics.token_out(None, Some(now - r.last_at)),
        }
        r.last_at = now;
        let skips = (r.attn_skipped, r.mlp_skipped, r.decisions);
        if r.job
            .events
            .send(Event::Token {
                id,
                logprobs,
                skips,
            })
            .is_err()
        {
            self.metrics.cancelled();
            return true;
        }
        let finish = if r.job.eos.contains(&id) {
            "stop"
        } else if r.generated >= r.job.max_tokens {
            "length"
        } else {
            return false;
        };
        self.metrics
            .finished(r.attn_skipped, r.mlp_skipped, r.decisions);
        let _ = r.job.events.send(Event::Done {
            finish_reason: finish,
        });
        true
    }
}

/// Skipped decisions among tokens `from..from + n` over every layer's gates.
fn count_skips(gates: &[Vec<bool>], from: usize, n: usize) -> usize {
    gates
        .iter()
        .map(|layer| {
            layer
                .get(from..from + n)
                .map_or(0, |g| g.iter().filter(|&&x| !x).count())
        })
        .sum()
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    logits.iter().map(|&x| x - lse).collect()
}

/// The `k` largest entries, largest first.
fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(k - 1, |&a, &b| {
        values[b as usize].total_cmp(&values[a as usize])
    });
    order.truncate(k);
    order.sort_by(|&a, &b| values[b as usize].total_cmp(&values[a as usize]));
    order.into_iter().map(|i| (i, values[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::sampler::SamplingParams;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    type B = burn::backend::NdArray<f32>;

    fn tiny() -> LlamaForCausalLM<B> {
        tiny_from("model")
    }

    fn tiny_from(dir: &str) -> LlamaForCausalLM<B> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/llama-tiny")
            .join(dir);
        skipgpt_model::load_pretrained::<B>(&dir, &Default::default())
            .unwrap()
            .model
    }

    fn job(prompt: &[u32], max_tokens: usize) -> (Job, UnboundedReceiver<Event>) {
        let (events, rx) = unbounded_channel();
        let sampler = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            prompt,
        );
        let job = Job {
            prompt: prompt.to_vec(),
            max_tokens,
            eos: Vec::new(),
            sampler,
            logprobs: None,
            skip: None,
            events,
            arrived: Instant::now(),
        };
        (job, rx)
    }

    /// A scheduler of `slots` slots, and the sender to give it jobs.
    fn scheduler(slots: usize) -> (Scheduler<B>, std::sync::mpsc::Sender<Job>, Arc<AtomicUsize>) {
        scheduler_of(tiny(), slots)
    }

    fn scheduler_of(
        model: LlamaForCausalLM<B>,
        slots: usize,
    ) -> (Scheduler<B>, std::sync::mpsc::Sender<Job>, Arc<AtomicUsize>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(Metrics::new(waiting.clone()));
        let s = Scheduler::new(
            model,
            Budgets::fixed(),
            slots,
            rx,
            waiting.clone(),
            running.clone(),
            metrics,
        );
        (s, tx, running)
    }

    fn submit(tx: &std::sync::mpsc::Sender<Job>, s: &Scheduler<B>, job: Job) {
        s.waiting.fetch_add(1, Ordering::SeqCst);
        tx.send(job).unwrap();
    }

    fn tokens(rx: &mut UnboundedReceiver<Event>) -> Vec<u32> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            if let Event::Token { id, .. } = e {
                out.push(id);
            }
        }
        out
    }

    #[test]
    fn a_request_whose_client_left_gives_its_slot_back_within_one_step() {
        let (mut s, tx, running) = scheduler(1);
        let (a, mut a_rx) = job(&[5, 17, 42], 100);
        submit(&tx, &s, a);
        assert!(s.admit());
        s.step();
        assert_eq!(tokens(&mut a_rx).len(), 1);
        assert_eq!(running.load(Ordering::SeqCst), 1);
        // the client goes: before the next step the slot is free and its cache empty
        drop(a_rx);
        s.drop_cancelled();
        assert!(s.slots[0].is_none());
        assert_eq!(s.cache.seq_len(0), 0);
        assert_eq!(running.load(Ordering::SeqCst), 0);

        // the next request takes the slot and answers as it does on a fresh scheduler
        let (b, mut b_rx) = job(&[7, 9], 6);
        submit(&tx, &s, b);
        assert!(s.admit());
        for _ in 0..6 {
            s.step();
        }
        let reused = tokens(&mut b_rx);
        let (mut fresh, tx2, _) = scheduler(1);
        let (b, mut b_rx) = job(&[7, 9], 6);
        submit(&tx2, &fresh, b);
        assert!(fresh.admit());
        for _ in 0..6 {
            fresh.step();
        }
        assert_eq!(reused.len(), 6);
        assert_eq!(reused, tokens(&mut b_rx));
        assert!(s.slots[0].is_none(), "a finished request leaves its slot");
    }

    /// The tokens and skipped decisions of `jobs` run together on the routed tiny model.
    fn run_routed(jobs: Vec<(Job, UnboundedReceiver<Event>)>) -> Vec<(Vec<u32>, usize)> {
        let (mut s, tx, _) = scheduler_of(tiny_from("model-routed"), jobs.len());
        let mut receivers = Vec::new();
        for (job, rx) in jobs {
            submit(&tx, &s, job);
            receivers.push(rx);
        }
        assert!(s.admit());
        for _ in 0..6 {
            s.step();
        }
        let mut out = Vec::new();
        for mut rx in receivers {
            let (mut ids, mut skipped) = (Vec::new(), 0);
            while let Ok(e) = rx.try_recv() {
                if let Event::Token { id, skips, .. } = e {
                    ids.push(id);
                    skipped = skips.0 + skips.1;
                }
            }
            out.push((ids, skipped));
        }
        out
    }

    #[test]
    fn requests_of_different_budgets_share_a_step_and_answer_as_each_would_alone() {
        let budget_job = |skip: Option<f64>| {
            let (mut j, rx) = job(&[5, 17, 42, 9], 6);
            j.skip = skip;
            (j, rx)
        };
        let together = run_routed(vec![budget_job(None), budget_job(Some(0.0))]);
        let routed_alone = run_routed(vec![budget_job(None)]);
        let dense_alone = run_routed(vec![budget_job(Some(0.0))]);
        assert_eq!(together[0], routed_alone[0]);
        assert_eq!(together[1], dense_alone[0]);
        assert!(together[0].1 > 0, "the routed request skips");
        assert_eq!(together[1].1, 0, "the dense request skips nothing");
    }

    #[test]
    fn prompts_are_read_in_order_of_arrival_so_the_earliest_request_answers_first() {
        let (mut s, tx, _) = scheduler(3);
        let prompt: Vec<u32> = (0..PREFILL_BUDGET as u32).map(|i| 3 + i % 400).collect();
        let (first, mut first_rx) = job(&prompt, 5);
        let (second, mut second_rx) = job(&prompt[..PREFILL_BUDGET / 2], 5);
        let (third, mut third_rx) = job(&prompt[..PREFILL_BUDGET / 2], 5);
        for j in [first, second, third] {
            submit(&tx, &s, j);
        }
        assert!(s.admit());
        // the first prompt takes the whole first step's budget; the other two share the second
        s.step();
        let answered = |rx: &mut UnboundedReceiver<Event>| tokens(rx).len();
        assert_eq!(
            [
                answered(&mut first_rx),
                answered(&mut second_rx),
                answered(&mut third_rx)
            ],
            [1, 0, 0]
        );
        s.step();
        assert_eq!(
            [
                answered(&mut first_rx),
                answered(&mut second_rx),
                answered(&mut third_rx)
            ],
            [1, 1, 1]
        );
    }

    #[test]
    fn a_long_prompt_goes_in_chunks_beside_another_requests_decoding() {
        let (mut s, tx, _) = scheduler(2);
        let (short, mut short_rx) = job(&[5, 17], 50);
        let long_prompt: Vec<u32> = (0..(PREFILL_BUDGET as u32 * 2 + 10))
            .map(|i| 3 + i % 400)
            .collect();
        let (long, mut long_rx) = job(&long_prompt, 2);
        submit(&tx, &s, short);
        submit(&tx, &s, long);
        assert!(s.admit());
        // three steps to feed the long prompt; the short one gains a token at each
        for step in 1..=3 {
            s.step();
            assert_eq!(tokens(&mut short_rx).len(), 1, "step {step}");
            let long_tokens = tokens(&mut long_rx).len();
            assert_eq!(long_tokens, usize::from(step == 3), "step {step}");
        }
    }
}
