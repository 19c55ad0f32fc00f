//! A decoding step's threads, kept awake between its parallel products.
//!
//! A decoding step on the CPU runs some 200 small parallel products (each weight matrix once,
//! tens of microseconds each) with serial work between them. Handed to rayon one by one, each
//! product wakes the pool's other threads, which fall asleep again in the serial stretch after
//! it: on a machine with few cores a product then waits for a woken thread about as long
//! as it takes. [`run`] instead occupies every thread of rayon's pool for the length of one
//! step: one thread (the leader) runs the step, the others spin, waiting for the leader's next
//! [`par_map`], and take their share of it the moment it is published. llama.cpp keeps its
//! threads the same way.
//!
//! Outside [`run`], [`par_map`] is rayon's parallel iterator. Inside it, rayon's own parallel
//! work on the leader (burn-flex's operations) finds the other threads busy and runs on the
//! leader alone: a team is only for steps whose parallel work goes through [`par_map`].

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

/// Spins of an idle helper between two yields of its core: about 10 µs of spinning, short
/// enough that a helper waiting through a long serial stretch (or sharing its core) hands
/// the core over now and then.
const SPINS_BEFORE_YIELD: u32 = 1 << 12;

thread_local! {
    /// The team this thread leads, while it runs [`run`]'s step.
    static LEADING: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with every thread of rayon's pool at its disposal: `f` runs on one of them, and
/// its [`par_map`] calls are shared with the others, which wait spinning in between. Inside
/// another team `f` just runs; with a pool of one thread it runs on that thread (where rayon's
/// parallel work needs no hand-over).
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if !LEADING.get().is_null() {
        return f();
    }
    if rayon::current_num_threads() < 2 {
        // `scope` runs its body on a pool thread (at once if this is one)
        return rayon::scope(|_| f());
    }
    let shared = Shared::new();
    let step = Mutex::new(Some(f));
    let mut results = rayon::broadcast(|ctx| {
        if ctx.index() != 0 {
            shared.help();
            return None;
        }
        // stop the helpers however the step ends (a panic included)
        let _stop = StopOnDrop(&shared);
        let f = step.lock().expect("one leader").take().expect("one leader");
        LEADING.set(&shared);
        let _lead = LeadOnDrop;
        Some(f())
    });
    results.swap_remove(0).expect("thread 0 leads")
}

/// `task(0)`, ..., `task(n - 1)` in parallel, in order: on the team's threads inside [`run`],
/// on rayon's pool elsewhere.
pub fn par_map<T: Send>(n: usize, task: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let leading = LEADING.get();
    if leading.is_null() {
        return (0..n).into_par_iter().map(&task).collect();
    }
    if n <= 1 {
        return (0..n).map(task).collect();
    }
    // one slot per task, each written once (uncontended locks: `T` need only be `Send`)
    let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let fill = |i: usize| {
        let out = task(i);
        *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
    };
    // SAFETY: `leading` is the team this thread leads; it outlives the step
    unsafe { &*leading }.share(n, &fill);
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every task ran")
        })
        .collect()
}

/// A job: `n` tasks, each a call of `task` with its index.
#[derive(Clone, Copy)]
struct Job {
    task: *const (dyn Fn(usize) + Sync),
    n: usize,
}

/// What the leader and its helpers share.
///
/// The leader publishes a job by writing `job` and bumping `generation` to an even number;
/// while it replaces a job the number is odd. A helper that sees a new even number registers
/// in `active`, checks the number again, and only then reads `job`; the leader writes `job`
/// only once `active` is 0. Tasks are claimed from `next` and counted in `done`; the leader
/// returns from [`Shared::share`] once every task is done, so no task outlives its job.
struct Shared {
    generation: AtomicUsize,
    job: UnsafeCell<Job>,
    next: AtomicUsize,
    done: AtomicUsize,
    active: AtomicUsize,
    stop: AtomicBool,
    /// A task panicked on a helper; the leader panics once the job is done.
    panicked: AtomicBool,
}

// SAFETY: `job` is written by the leader only while no helper reads it (the protocol above);
// the task it points to is `Sync`
unsafe impl Sync for Shared {}

fn nothing(_: usize) {}

impl Shared {
    fn new() -> Self {
        Shared {
            generation: AtomicUsize::new(0),
            job: UnsafeCell::new(Job {
                task: &nothing,
                n: 0,
            }),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        }
    }

    /// The leader: publishes `task` × `n`, takes its share, and waits for the rest.
    fn share(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        let generation = self.generation.load(Ordering::Relaxed);
        // close the old job and wait until no helper reads it
        self.generation.store(generation + 1, Ordering::SeqCst);
        while self.active.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        // SAFETY: the lifetime is erased; `task` is only called for claimed indices below
        // `n`, and this function returns only after all of them are done
        let task: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(task) };
        // SAFETY: no helper reads `job` while the generation is odd and `active` is 0
        unsafe { *self.job.get() = Job { task, n } };
        self.next.store(0, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.generation.store(generation + 2, Ordering::Release);
        // the leader's own share: a panic waits for the helpers' tasks before it goes on
        let mine = catch_unwind(AssertUnwindSafe(|| self.work(Job { task, n })));
        while self.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        if let Err(panic) = mine {
            resume_unwind(panic);
        }
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a task of the decoding team panicked");
        }
    }

    /// Claims and runs tasks of `job` until none is left.
    fn work(&self, job: Job) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= job.n {
                return;
            }
            // SAFETY: `i < n`, so the leader is still waiting in `share` and `task` is alive
            let ran = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.task)(i) }));
            if ran.is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    /// A helper: takes part in every job until the leader stops.
    fn help(&self) {
        let mut seen = 0;
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            let generation = self.generation.load(Ordering::Acquire);
            if generation == seen || generation % 2 == 1 {
                idle += 1;
                if idle.is_multiple_of(SPINS_BEFORE_YIELD) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            self.active.fetch_add(1, Ordering::SeqCst);
            if self.generation.load(Ordering::SeqCst) == generation {
                // SAFETY: registered in `active` under this generation: the leader does not
                // replace the job until this helper leaves
                let job = unsafe { *self.job.get() };
                self.work(job);
                seen = generation;
                idle = 0;
            }
            self.active.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Stops the helpers when the leader's step ends.
struct StopOnDrop<'a>(&'a Shared);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
    }
}

/// Clears the thread's team when the leader's step ends.
struct LeadOnDrop;

impl Drop for LeadOnDrop {
    fn drop(&mut self) {
        LEADING.set(std::ptr::null());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    #[test]
    fn a_team_runs_every_task_once_in_order_over_many_jobs() {
        for threads in [1, 2, 4] {
            let sums = pool(threads).install(|| {
                run(|| {
                    (0..500)
                        .map(|job| {
                            let out = par_map(job % 37, |i| i * 1000 + job);
                            assert_eq!(
                                out,
                                (0..job % 37).map(|i| i * 1000 + job).collect::<Vec<_>>()
                            );
                            out.iter().sum::<usize>()
                        })
                        .sum::<usize>()
                })
            });
            let want: usize = (0..500)
                .map(|job| (0..job % 37).map(|i| i * 1000 + job).sum::<usize>())
                .sum();
            assert_eq!(sums, want, "{threads} threads");
        }
    }

    #[test]
    fn tasks_run_on_more_than_one_thread_and_rayon_still_works_on_the_leader() {
        let p = pool(2);
        let (threads, inner) = p.install(|| {
            run(|| {
                let ids = par_map(64, |_| {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    std::thread::current().id()
                });
                let mut distinct = ids.clone();
                distinct.sort_by_key(|id| format!("{id:?}"));
                distinct.dedup();
                // rayon's own parallel work inside a step runs (on the leader)
                let inner: usize = (0..1000usize).into_par_iter().sum();
                (distinct.len(), inner)
            })
        });
        assert_eq!(threads, 2);
        assert_eq!(inner, 499_500);
    }

    #[test]
    fn a_panicking_task_panics_the_step_without_hanging_the_pool() {
        let p = pool(2);
        let outcome = p.install(|| {
            catch_unwind(AssertUnwindSafe(|| {
                run(|| {
                    par_map(16, |i| {
                        if i == 11 {
                            panic!("task {i}");
                        }
                        i
                    })
                })
            }))
        });
        assert!(outcome.is_err());
        // the pool is free again
        assert_eq!(
            p.install(|| run(|| par_map(4, |i| i * 2))),
            vec![0, 2, 4, 6]
        );
    }

    #[test]
    fn outside_a_team_par_map_is_rayons() {
        assert_eq!(par_map(5, |i| i + 1), vec![1, 2, 3, 4, 5]);
    }
}
