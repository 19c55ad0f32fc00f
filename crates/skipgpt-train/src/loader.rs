//! Batches for burn-train, laid out so that a run can be killed and resumed exactly.
//!
//! burn-train checkpoints at the end of an "epoch". A run of N optimizer steps is therefore cut
//! into epochs of `checkpoint_every` steps, and everything a step consumes is a pure function of
//! the seed and the step's index: which sequences it sees (a seeded permutation per pass over
//! the data), its Gumbel temperature and the seed of its Gumbel noise. Resuming from the
//! checkpoint of epoch e replays steps from e·checkpoint_every on exactly as the first run
//! would have.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::{mix, PackedDataset};
use crate::schedule::temperature_at;

/// One micro-batch: inputs, their next tokens, and what the step needs to know about itself.
#[derive(Debug, Clone)]
pub struct LmBatch<B: Backend> {
    /// `[batch, seq]`
    pub inputs: Tensor<B, 2, Int>,
    /// `[batch, seq]`: `inputs` shifted by one.
    pub targets: Tensor<B, 2, Int>,
    /// The optimizer step this micro-batch belongs to (0-based).
    pub step: usize,
    /// Gumbel temperature of that step.
    pub temperature: f64,
    /// Seed of this micro-batch's Gumbel noise.
    pub noise_seed: u64,
    /// `1 / accumulation`: burn-train sums accumulated gradients, we want their mean.
    pub loss_scale: f64,
}

impl<B: Backend> LmBatch<B> {
    /// Builds a batch from packed sequences of `seq_len + 1` tokens.
    pub fn from_sequences(seqs: &[&[u32]], device: &B::Device) -> Self {
        let b = seqs.len();
        let t = seqs[0].len() - 1;
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for s in seqs {
            inputs.extend(s[..t].iter().map(|&x| x as i64));
            targets.extend(s[1..].iter().map(|&x| x as i64));
        }
        LmBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [b, t]), device),
            targets: Tensor::from_data(TensorData::new(targets, [b, t]), device),
            step: 0,
            temperature: 1.0,
            noise_seed: 0,
            loss_scale: 1.0,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.inputs.dims().iter().product()
    }
}

/// The shape of a run: how many steps, how they are batched and cut into epochs.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    /// Optimizer steps in the whole run.
    pub total_steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// Optimizer steps per burn-train epoch (= per checkpoint).
    pub steps_per_epoch: usize,
    /// Seeds the data order and the Gumbel noise.
    pub seed: u64,
    /// Gumbel temperature at the first and the last step.
    pub temperature: (f64, f64),
}

impl StepPlan {
    pub fn num_epochs(&self) -> usize {
        self.total_steps.div_ceil(self.steps_per_epoch.max(1))
    }

    /// Optimizer steps `[start, end)` of a 1-based epoch.
    pub fn epoch_steps(&self, epoch: usize) -> (usize, usize) {
        let start = (epoch - 1) * self.steps_per_epoch;
        (start, (start + self.steps_per_epoch).min(self.total_steps))
    }

    /// Micro-batches in a 1-based epoch.
    pub fn epoch_micro_batches(&self, epoch: usize) -> usize {
        let (start, end) = self.epoch_steps(epoch);
        end.saturating_sub(start) * self.accumulation
    }
}

/// The training loader: each `iter()` yields the next epoch of the plan.
pub struct TrainLoader<B: Backend> {
    data: Arc<PackedDataset>,
    plan: Arc<StepPlan>,
    /// The 1-based epoch the next `iter()` yields; shared by the copies `to_device` makes.
    next_epoch: Arc<AtomicUsize>,
    /// `(index, count)` when this loader is one device's share of `count`: it yields the
    /// micro-batches `k` with `k mod count == index`, so that the micro-batches of one optimizer
    /// step are spread over the devices in the order one device would take them.
    shard: Option<(usize, usize)>,
    device: B::Device,
}

impl<B: Backend> TrainLoader<B> {
    /// A loader whose first `iter()` yields epoch `first_epoch` (1 for a new run, e + 1 when
    /// resuming from the checkpoint of epoch e).
    pub fn new(
        data: Arc<PackedDataset>,
        plan: StepPlan,
        first_epoch: usize,
        device: &B::Device,
    ) -> Self {
        TrainLoader {
            data,
            plan: Arc::new(plan),
            next_epoch: Arc::new(AtomicUsize::new(first_epoch)),
            shard: None,
            device: device.clone(),
        }
    }

    /// The micro-batch `micro` of the whole run (0-based).
    fn batch(&self, micro: usize, perms: &mut HashMap<usize, Vec<usize>>) -> LmBatch<B> {
        let plan = &self.plan;
        let n = self.data.len();
        let indices: Vec<usize> = (0..plan.batch_size)
            .map(|j| {
                let sample = micro * plan.batch_size + j;
                let (pass, pos) = (sample / n, sample % n);
                let perm = perms.entry(pass).or_insert_with(|| {
                    let mut p: Vec<usize> = (0..n).collect();
                    p.shuffle(&mut StdRng::seed_from_u64(mix(plan.seed, pass as u64)));
                    p
                });
                perm[pos]
            })
            .collect();
        let seqs: Vec<&[u32]> = indices
            .iter()
            .map(|&i| self.data.sequences[i].as_slice())
            .collect();
        let step = micro / plan.accumulation;
        LmBatch {
            step,
            temperature: temperature_at(
                step,
                plan.total_steps,
                plan.temperature.0,
                plan.temperature.1,
            ),
            noise_seed: mix(plan.seed ^ 0x5EED_0F6A_B6E1, micro as u64),
            loss_scale: 1.0 / plan.accumulation as f64,
            ..LmBatch::from_sequences(&seqs, &self.device)
        }
    }
}

impl<B: Backend> DataLoader<B, LmBatch<B>> for TrainLoader<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<LmBatch<B>> + 'a> {
        let epoch = self.next_epoch.fetch_add(1, Ordering::SeqCst);
        let (start, _) = self.plan.epoch_steps(epoch);
        let first = start * self.plan.accumulation;
        let count = self.plan.epoch_micro_batches(epoch);
        let micros: Vec<usize> = (0..count)
            .filter(|k| self.shard.is_none_or(|(i, n)| k % n == i))
            .map(|k| first + k)
            .collect();
        Box::new(TrainIter {
            loader: self,
            micros,
            next: 0,
            perms: HashMap::new(),
        })
    }

    fn num_items(&self) -> usize {
        let epoch = self.next_epoch.load(Ordering::SeqCst);
        let micros = self.plan.epoch_micro_batches(epoch);
        // k < micros with k mod n == i
        let mine = match self.shard {
            None => micros,
            Some((i, n)) => micros / n + usize::from(i < micros % n),
        };
        mine * self.plan.batch_size
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, LmBatch<B>>> {
        Arc::new(TrainLoader {
            data: self.data.clone(),
            plan: self.plan.clone(),
            next_epoch: self.next_epoch.clone(),
            shard: self.shard,
            device: device.clone(),
        })
    }

    /// burn-train's multi-device strategy splits a loader into equal item ranges, one per
    /// device (`split_dataloader`). A range is read as a share: range `i` of `n` becomes
    /// "micro-batches `k` with `k mod n == i`". Ranges are equal because a step's micro-batches
    /// are `grad_accum × devices` (see `fit`).
    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, LmBatch<B>>> {
        let all = self.num_items();
        let size = end.saturating_sub(start).max(1);
        let (index, count) = (start / size, (all / size).max(1));
        // a share of a share: positions within this share, composed
        let shard = match self.shard {
            None => (index, count),
            Some((i, n)) => (i + n * index, n * count),
        };
        Arc::new(TrainLoader {
            data: self.data.clone(),
            plan: self.plan.clone(),
            // a share is iterated once per epoch on its own, so it counts epochs on its own
            next_epoch: Arc::new(AtomicUsize::new(self.next_epoch.load(Ordering::SeqCst))),
            shard: Some(shard),
            device: self.device.clone(),
        })
    }
}

struct TrainIter<'a, B: Backend> {
    loader: &'a TrainLoader<B>,
    micros: Vec<usize>,
    next: usize,
    perms: HashMap<usize, Vec<usize>>,
}

impl<B: Backend> Iterator for TrainIter<'_, B> {
    type Item = LmBatch<B>;

    fn next(&mut self) -> Option<LmBatch<B>> {
        let micro = *self.micros.get(self.next)?;
        self.next += 1;
        Some(self.loader.batch(micro, &mut self.perms))
    }
}

impl<B: Backend> DataLoaderIterator<LmBatch<B>> for TrainIter<'_, B> {
    fn progress(&self) -> Progress {
        let bs = self.loader.plan.batch_size;
        Progress::new(self.next * bs, self.micros.len() * bs)
    }
}

/// The validation loader: the same fixed batches every epoch, in order.
pub struct ValidLoader<B: Backend> {
    data: Arc<PackedDataset>,
    batch_size: usize,
    device: B::Device,
}

impl<B: Backend> ValidLoader<B> {
    pub fn new(data: Arc<PackedDataset>, batch_size: usize, device: &B::Device) -> Self {
        ValidLoader {
            data,
            batch_size: batch_size.max(1),
            device: device.clone(),
        }
    }
}

impl<B: Backend> DataLoader<B, LmBatch<B>> for ValidLoader<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<LmBatch<B>> + 'a> {
        Box::new(ValidIter {
            loader: self,
            next: 0,
        })
    }

    fn num_items(&self) -> usize {
        self.data.len()
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, LmBatch<B>>> {
        Arc::new(ValidLoader {
            data: self.data.clone(),
            batch_size: self.batch_size,
            device: device.clone(),
        })
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, LmBatch<B>>> {
        let end = end.min(self.data.len());
        let start = start.min(end);
        Arc::new(ValidLoader {
            data: Arc::new(PackedDataset {
                seq_len: self.data.seq_len,
                sequences: self.data.sequences[start..end].to_vec(),
            }),
            batch_size: self.batch_size,
            device: self.device.clone(),
        })
    }
}

struct ValidIter<'a, B: Backend> {
    loader: &'a ValidLoader<B>,
    next: usize,
}

impl<B: Backend> Iterator for ValidIter<'_, B> {
    type Item = LmBatch<B>;

    fn next(&mut self) -> Option<LmBatch<B>> {
        let seqs = &self.loader.data.sequences;
        if self.next >= seqs.len() {
            return None;
        }
        let end = (self.next + self.loader.batch_size).min(seqs.len());
        let batch: Vec<&[u32]> = seqs[self.next..end].iter().map(Vec::as_slice).collect();
        self.next = end;
        Some(LmBatch::from_sequences(&batch, &self.loader.device))
    }
}

impl<B: Backend> DataLoaderIterator<LmBatch<B>> for ValidIter<'_, B> {
    fn progress(&self) -> Progress {
        Progress::new(self.next, self.loader.data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::NdArray<f32>;

    fn data(n: usize) -> Arc<PackedDataset> {
        Arc::new(PackedDataset {
            seq_len: 3,
            sequences: (0..n as u32)
                .map(|i| vec![i, i + 1, i + 2, i + 3])
                .collect(),
        })
    }

    fn plan() -> StepPlan {
        StepPlan {
            total_steps: 7,
            batch_size: 2,
            accumulation: 2,
            steps_per_epoch: 3,
            seed: 9,
            temperature: (5.0, 1.0),
        }
    }

    fn firsts(batches: &[LmBatch<B>]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| b.inputs.to_data().into_vec::<i64>().unwrap())
            .step_by(3)
            .collect()
    }

    #[test]
    fn epochs_cover_the_plan_and_resume_replays_them() {
        let device = Default::default();
        let loader = TrainLoader::<B>::new(data(5), plan(), 1, &device);
        let epochs: Vec<Vec<LmBatch<B>>> = (0..3).map(|_| loader.iter().collect()).collect();
        assert_eq!(
            epochs.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![6, 6, 2]
        );
        let steps: Vec<usize> = epochs.iter().flatten().map(|b| b.step).collect();
        assert_eq!(steps, vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]);
        assert_eq!(epochs[0][0].temperature, 5.0);
        assert_eq!(epochs[2][1].temperature, 1.0);
        assert!(epochs.iter().flatten().all(|b| b.loss_scale == 0.5));
        // every pass over the data sees each sequence once
        let seen = firsts(&epochs[0]);
        let mut first_pass = seen[..5].to_vec();
        first_pass.sort();
        assert_eq!(first_pass, vec![0, 1, 2, 3, 4]);
        // resuming at epoch 2 yields the same batches and noise seeds
        let resumed = TrainLoader::<B>::new(data(5), plan(), 2, &device);
        let again: Vec<LmBatch<B>> = resumed.iter().collect();
        assert_eq!(firsts(&again), firsts(&epochs[1]));
        let seeds = |v: &[LmBatch<B>]| v.iter().map(|b| b.noise_seed).collect::<Vec<_>>();
        assert_eq!(seeds(&again), seeds(&epochs[1]));
        // another seed, another order
        let other = TrainLoader::<B>::new(data(5), StepPlan { seed: 10, ..plan() }, 1, &device);
        let other: Vec<LmBatch<B>> = other.iter().collect();
        assert_ne!(firsts(&other), seen);
    }

    #[test]
    fn devices_share_each_step_in_the_order_one_device_takes_it() {
        use burn::data::dataloader::split::split_dataloader;
        let device: burn::backend::ndarray::NdArrayDevice = Default::default();
        // two devices, one micro-batch each per step: accumulation 2 over the devices
        let one = TrainLoader::<B>::new(data(5), plan(), 1, &device);
        let shares = split_dataloader(
            Arc::new(TrainLoader::<B>::new(data(5), plan(), 1, &device)),
            &[device, device],
        );
        assert_eq!(shares.len(), 2);
        assert_eq!(shares[0].num_items(), 6);
        for epoch in 1..=3 {
            let all: Vec<LmBatch<B>> = one.iter().collect();
            let a: Vec<LmBatch<B>> = shares[0].iter().collect();
            let b: Vec<LmBatch<B>> = shares[1].iter().collect();
            assert_eq!(a.len(), b.len(), "epoch {epoch}");
            assert_eq!(a.len() + b.len(), all.len(), "epoch {epoch}");
            // round r of the multi-device loop takes a[r] and b[r]: micro-batches 2r and 2r + 1
            let interleaved: Vec<LmBatch<B>> =
                a.into_iter().zip(b).flat_map(|(x, y)| [x, y]).collect();
            assert_eq!(firsts(&interleaved), firsts(&all), "epoch {epoch}");
            let key = |v: &[LmBatch<B>]| {
                v.iter()
                    .map(|b| (b.step, b.noise_seed, b.loss_scale.to_bits()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(key(&interleaved), key(&all), "epoch {epoch}");
        }
    }

    #[test]
    fn validation_batches_are_fixed() {
        let device = Default::default();
        let loader = ValidLoader::<B>::new(data(5), 2, &device);
        let sizes: Vec<usize> = loader.iter().map(|b| b.inputs.dims()[0]).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        assert_eq!(
            firsts(&loader.iter().collect::<Vec<_>>()),
            vec![0, 1, 2, 3, 4]
        );
    }
}
