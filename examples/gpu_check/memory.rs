//! GPU memory as `nvidia-smi` reports it, sampled while a section runs.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The GPU's used memory, sampled by `nvidia-smi` every 100 ms; its peak over the section.
pub(crate) struct GpuMemory {
    baseline: Option<u64>,
    peak: Arc<AtomicU64>,
    child: Option<std::process::Child>,
}

impl GpuMemory {
    pub(crate) fn start() -> Self {
        let baseline = nvidia_smi(&["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok());
        let peak = Arc::new(AtomicU64::new(0));
        let child = Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "100",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .map(|mut child| {
                let out = child.stdout.take().unwrap();
                let peak = peak.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        if let Ok(mib) = line.trim().parse::<u64>() {
                            peak.fetch_max(mib, Ordering::Relaxed);
                        }
                    }
                });
                child
            });
        GpuMemory {
            baseline,
            peak,
            child,
        }
    }

    pub(crate) fn peak_mib(&self) -> Option<u64> {
        self.child.as_ref()?;
        std::thread::sleep(Duration::from_millis(250)); // one more sample
        Some(self.peak.load(Ordering::Relaxed))
    }

    pub(crate) fn baseline_mib(&self) -> Option<u64> {
        self.baseline
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn nvidia_smi(args: &[&str]) -> String {
    Command::new("nvidia-smi")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "nvidia-smi not available".into())
}
