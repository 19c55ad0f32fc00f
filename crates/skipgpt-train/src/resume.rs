//! What makes a run resumable after being killed at any point:
//!
//! - [`AtomicRecorder`]: burn-train's checkpoints written through a temporary file and a
//!   rename, so a kill mid-write leaves the previous checkpoint intact and no half file;
//! - [`latest_checkpoint`]: the last epoch whose model, optimizer and scheduler states were all
//!   written (burn-train writes the three on a background thread, one after the other);
//! - [`RunManifest`]: the settings a run was started with, checked on `--resume` so that a
//!   resumed run cannot silently continue with other data or hyper-parameters;
//! - [`RunLock`]: one run at a time in a run directory;
//! - [`store_only_trainable`]: checkpoints hold what training changes (routers, adapters) and
//!   the optimizer's state for it, not the frozen base model a run starts from anyway.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::record::{FileRecorder, FullPrecisionSettings, Recorder, RecorderError};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use skipgpt_data::DataError;
use skipgpt_model::io::atomic_write::atomic_write;

use crate::error::{Result, TrainError};

/// Named MessagePack records (burn's `NamedMpkFileRecorder` format, full precision), written
/// atomically.
#[derive(Debug, Default, Clone)]
pub struct AtomicRecorder;

impl<B: Backend> Recorder<B> for AtomicRecorder {
    type Settings = FullPrecisionSettings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: Serialize>(&self, item: I, mut file: PathBuf) -> Result<(), RecorderError> {
        file.set_extension(<Self as FileRecorder<B>>::file_extension());
        let bytes = rmp_serde::encode::to_vec_named(&item)
            .map_err(|e| RecorderError::Unknown(e.to_string()))?;
        atomic_write(&file, &bytes).map_err(|e| RecorderError::Unknown(e.to_string()))
    }

    fn load_item<I: DeserializeOwned>(&self, file: &mut PathBuf) -> Result<I, RecorderError> {
        file.set_extension(<Self as FileRecorder<B>>::file_extension());
        let reader = std::fs::File::open(&*file).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                RecorderError::FileNotFound(format!("{}: {e}", file.display()))
            }
            _ => RecorderError::Unknown(format!("{}: {e}", file.display())),
        })?;
        rmp_serde::decode::from_read(std::io::BufReader::new(reader))
            .map_err(|e| RecorderError::Unknown(format!("{}: {e}", file.display())))
    }
}

impl<B: Backend> FileRecorder<B> for AtomicRecorder {
    fn file_extension() -> &'static str {
        "mpk"
    }
}

/// Makes the frozen parameters of `module` (those that need no gradient) cost nothing in a
/// checkpoint: each saves as a one-element placeholder, and loading a checkpoint keeps the
/// value the parameter already holds. Returns the module and how many parameters are frozen.
///
/// Why this is sound: a run, fresh or resumed, starts from the same frozen weights (the
/// manifest checks the base and the routing), and training never changes them. Without it
/// every checkpoint of router tuning copies the whole base model next to a few thousand
/// router weights: about 100× the routers' size, and two base models on disk at 7B.
/// Checkpoints written before this (whole models) still load: their frozen tensors are
/// ignored the same way.
///
/// The hooks are burn's parameter mappers, which live only on the training module:
/// [`burn::module::AutodiffModule::valid`] drops them, so the trained model a run returns
/// records every tensor again.
pub fn store_only_trainable<B: AutodiffBackend, M: Module<B>>(module: M) -> (M, usize) {
    struct Freeze {
        frozen: usize,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Freeze {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            if tensor.is_require_grad() {
                return Param::from_mapped_value(id, tensor, mapper);
            }
            self.frozen += 1;
            let device = tensor.device();
            // a handle to the same storage: keeping it copies nothing
            let value = tensor.clone();
            Param::from_mapped_value(id, tensor, mapper)
                .save_mapper(move |_| Tensor::zeros([1; D], &device))
                .load_mapper(move |_| value.clone())
        }
    }
    let mut freeze = Freeze { frozen: 0 };
    let module = module.map(&mut freeze);
    (module, freeze.frozen)
}

/// The checkpoint directory burn-train uses inside a run directory.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// The last epoch with a complete checkpoint (model, optimizer and scheduler), if any.
///
/// A part that is there but is not a whole record (cut short by a full disk, a copy, a hand)
/// makes its epoch incomplete: the previous checkpoint is used, and a warning names the file.
pub fn latest_checkpoint(run_dir: &Path) -> Option<usize> {
    let dir = checkpoint_dir(run_dir);
    let entries = std::fs::read_dir(&dir).ok()?;
    let mut epochs: Vec<usize> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("model-")?
                .strip_suffix(".mpk")?
                .parse::<usize>()
                .ok()
        })
        .collect();
    epochs.sort_unstable_by(|a, b| b.cmp(a));
    epochs.into_iter().find(|&epoch| {
        ["model", "optim", "scheduler"].iter().all(|part| {
            let file = dir.join(format!("{part}-{epoch}.mpk"));
            if !file.is_file() {
                return false;
            }
            let whole = is_whole_record(&file);
            if !whole {
                eprintln!(
                    "warning: {} is damaged (not a whole record); resuming from the checkpoint before it",
                    file.display()
                );
            }
            whole
        })
    })
}

/// Whether `path` holds one complete MessagePack document, and nothing after it. Streamed: a
/// checkpoint can be larger than memory.
fn is_whole_record(path: &Path) -> bool {
    use std::io::Read;
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let mut de = rmp_serde::Deserializer::new(std::io::BufReader::new(file));
    serde::de::IgnoredAny::deserialize(&mut de).is_ok()
        && de.into_inner().read(&mut [0u8]).is_ok_and(|n| n == 0)
}

/// One run at a time in a run directory: `.lock` holds the running process's id, created
/// exclusively and removed when the lock is dropped. A lock whose process is gone (killed,
/// crashed) is stale and taken over.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl RunLock {
    pub const FILE: &'static str = ".lock";

    /// Takes the lock of `run_dir` (created if needed), or names the process holding it.
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        let io = |e| DataError::Io {
            path: run_dir.to_path_buf(),
            source: e,
        };
        std::fs::create_dir_all(run_dir).map_err(io)?;
        let path = run_dir.join(Self::FILE);
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    use std::io::Write;
                    write!(file, "{}", std::process::id()).map_err(io)?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if process_alive(pid) => {
                            return Err(TrainError::RunLocked {
                                dir: run_dir.to_path_buf(),
                                lock: path,
                                pid,
                            })
                        }
                        // stale (or half written by a process killed at that instant)
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(io(e).into()),
            }
        }
        Err(TrainError::Training(format!(
            "{}: could not take the run lock",
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a process with this id is running (on Linux, `/proc/PID`; elsewhere every lock
/// counts as held).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Removes what a killed write left behind in a run directory and its checkpoints: temporary
/// files (`.NAME.*.tmp`).
pub fn remove_stale_temporaries(run_dir: &Path) {
    for dir in [run_dir.to_path_buf(), checkpoint_dir(run_dir)] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The `config.json` keys a run manifest records: a checkpoint only loads into the shapes it
/// was saved from, so a resume must keep them.
pub const ARCHITECTURE_KEYS: [&str; 7] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
];

/// The settings of a run, as JSON, in `run.json` of its run directory.
#[derive(Debug, Clone, PartialEq)]
pub struct RunManifest(pub serde_json::Map<String, serde_json::Value>);

impl RunManifest {
    pub const FILE: &'static str = "run.json";

    /// Refuses a new run over an existing one, and a resume without a run: callers can check
    /// this before any work (tokenizer training, model loading) that [`RunManifest::begin`]
    /// would then refuse.
    pub fn check(run_dir: &Path, resume: bool) -> Result<()> {
        match (resume, run_dir.join(Self::FILE).exists()) {
            (false, true) => Err(TrainError::RunExists(run_dir.to_path_buf())),
            (true, false) => Err(TrainError::NothingToResume(run_dir.to_path_buf())),
            _ => Ok(()),
        }
    }

    /// Starts a run in `run_dir`, or checks that `resume` continues the same one.
    /// Returns the epoch to resume after (0 for a fresh start).
    pub fn begin(&self, run_dir: &Path, resume: bool) -> Result<usize> {
        Self::check(run_dir, resume)?;
        let path = run_dir.join(Self::FILE);
        if !resume {
            let text = serde_json::to_string_pretty(&self.0).expect("json");
            atomic_write(&path, text.as_bytes())?;
            return Ok(0);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::Io {
            path: path.clone(),
            source: e,
        })?;
        let saved: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| DataError::Jsonl {
                path: path.clone(),
                line: e.line(),
                message: e.to_string(),
            })?;
        // settings added after a run was made, with the value every earlier run had
        let earlier_default = |key: &str| match key {
            "devices" => serde_json::json!(1),
            _ => serde_json::Value::Null,
        };
        let mut differences = Vec::new();
        for (key, value) in &self.0 {
            // the architecture was recorded from this version on; earlier runs cannot be checked
            if !saved.contains_key(key) && ARCHITECTURE_KEYS.contains(&key.as_str()) {
                continue;
            }
            let before = saved
                .get(key)
                .cloned()
                .unwrap_or_else(|| earlier_default(key));
            if &before != value {
                differences.push((key.clone(), before.to_string(), value.to_string()));
            }
        }
        if !differences.is_empty() {
            return Err(TrainError::ResumeMismatch { path, differences });
        }
        remove_stale_temporaries(run_dir);
        Ok(latest_checkpoint(run_dir).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_directory_is_locked_by_one_run_and_a_stale_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("process {}", std::process::id())) && err.contains(".lock"),
            "{err}"
        );
        drop(lock);
        assert!(!dir.path().join(RunLock::FILE).exists());
        // a lock left by a process that is gone
        let gone = u32::MAX - 7;
        std::fs::write(dir.path().join(RunLock::FILE), gone.to_string()).unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        let held = std::fs::read_to_string(dir.path().join(RunLock::FILE)).unwrap();
        assert_eq!(held, std::process::id().to_string());
        drop(lock);
    }

    #[test]
    fn a_resume_with_other_settings_names_every_key_that_differs() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = |hidden: u64, head: u64, lr: f64| {
            let mut m = serde_json::Map::new();
            m.insert("hidden_size".into(), serde_json::json!(hidden));
            m.insert("head_dim".into(), serde_json::json!(head));
            m.insert("lr".into(), serde_json::json!(lr));
            RunManifest(m)
        };
        manifest(64, 16, 1e-3).begin(dir.path(), false).unwrap();
        let err = manifest(128, 32, 1e-3)
            .begin(dir.path(), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hidden_size = 64, now 128") && err.contains("head_dim = 16, now 32"),
            "{err}"
        );
        assert!(!err.contains("lr"), "{err}");
    }
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};

    type B = burn::backend::NdArray<f32>;

    #[test]
    fn records_round_trip_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let device = Default::default();
        let linear: Linear<B> = LinearConfig::new(3, 2).init(&device);
        // parameters initialise lazily, and a clone of an uninitialised one draws its own
        let weight = linear.weight.val().into_data();
        let path = dir.path().join("model-1");
        Recorder::<B>::record(&AtomicRecorder, linear.clone().into_record(), path.clone()).unwrap();
        let record = Recorder::<B>::load(&AtomicRecorder, path, &device).unwrap();
        let loaded = LinearConfig::new(3, 2)
            .init::<B>(&device)
            .load_record(record);
        assert_eq!(loaded.weight.val().into_data(), weight);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["model-1.mpk".to_string()]);
    }

    #[test]
    fn latest_checkpoint_needs_all_three_parts() {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpoint_dir(dir.path());
        std::fs::create_dir_all(&ck).unwrap();
        assert_eq!(latest_checkpoint(dir.path()), None);
        for part in ["model", "optim", "scheduler"] {
            std::fs::write(ck.join(format!("{part}-1.mpk")), b"x").unwrap();
        }
        // killed while writing epoch 2: its optimizer state never landed
        std::fs::write(ck.join("model-2.mpk"), b"x").unwrap();
        std::fs::write(ck.join(".optim-2.mpk.77.tmp"), b"half").unwrap();
        assert_eq!(latest_checkpoint(dir.path()), Some(1));
    }

    #[test]
    fn a_damaged_latest_checkpoint_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpoint_dir(dir.path());
        std::fs::create_dir_all(&ck).unwrap();
        let whole = rmp_serde::encode::to_vec_named(&vec![1.5f32; 100]).unwrap();
        for epoch in [1, 2] {
            for part in ["model", "optim", "scheduler"] {
                std::fs::write(ck.join(format!("{part}-{epoch}.mpk")), &whole).unwrap();
            }
        }
        assert_eq!(latest_checkpoint(dir.path()), Some(2));
        // epoch 2's model cut short; then its optimizer state empty
        std::fs::write(ck.join("model-2.mpk"), &whole[..whole.len() / 2]).unwrap();
        assert_eq!(latest_checkpoint(dir.path()), Some(1));
        std::fs::write(ck.join("model-2.mpk"), &whole).unwrap();
        std::fs::write(ck.join("optim-2.mpk"), b"").unwrap();
        assert_eq!(latest_checkpoint(dir.path()), Some(1));
        // a killed write's temporary is removed on resume
        std::fs::write(ck.join(".model-3.mpk.a1b2c3.tmp"), b"half").unwrap();
        remove_stale_temporaries(dir.path());
        assert!(!ck.join(".model-3.mpk.a1b2c3.tmp").exists());
        assert!(ck.join("model-1.mpk").exists());
    }

    #[test]
    fn manifest_guards_resume() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = serde_json::Map::new();
        m.insert("steps".into(), 10.into());
        let manifest = RunManifest(m.clone());
        let err = manifest.begin(dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("no run to resume"), "{err}");
        assert_eq!(manifest.begin(dir.path(), false).unwrap(), 0);
        let err = manifest.begin(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("--resume"), "{err}");
        assert_eq!(manifest.begin(dir.path(), true).unwrap(), 0);
        m.insert("steps".into(), 20.into());
        let err = RunManifest(m)
            .begin(dir.path(), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("steps") && err.contains("10") && err.contains("20"),
            "{err}"
        );
    }
}
