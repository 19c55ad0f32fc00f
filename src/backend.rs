//! Backend selection: compiled in with cargo features, chosen at run time with `--backend`.

use clap::ValueEnum;

/// A Burn backend the binary may have been built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// CPU (burn-ndarray): always works, slowest. Feature `ndarray` (default).
    Ndarray,
    /// GPU through WebGPU/Vulkan/Metal (burn-wgpu). Feature `wgpu`.
    Wgpu,
    /// NVIDIA GPU (burn-cuda). Feature `cuda`.
    Cuda,
}

impl BackendKind {
    /// The fastest backend this binary was built with.
    pub fn best_available() -> Self {
        if cfg!(feature = "cuda") {
            BackendKind::Cuda
        } else if cfg!(feature = "wgpu") {
            BackendKind::Wgpu
        } else {
            BackendKind::Ndarray
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Ndarray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// Starts `B` on `device` by allocating one small tensor, turning a panic from inside the
/// backend (cudarc panics when libcuda is missing; wgpu when no adapter is found) into an
/// error that says what is missing. (The CPU backend cannot fail to start.)
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn probe<B: burn::tensor::backend::Backend>(
    kind: BackendKind,
    device: &B::Device,
) -> anyhow::Result<()> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        burn::tensor::Tensor::<B, 1>::zeros([1], device).into_data()
    }));
    std::panic::set_hook(hook);
    started.map(drop).map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown error");
        let need = match kind {
            BackendKind::Cuda => {
                "an NVIDIA driver (libcuda.so) and a visible GPU (check `nvidia-smi`)"
            }
            BackendKind::Wgpu => "a GPU with a Vulkan, Metal or DirectX 12 driver",
            BackendKind::Ndarray => "nothing",
        };
        anyhow::anyhow!(
            "the {} backend could not start ({}): it needs {need}; `--backend ndarray` runs on the CPU",
            kind.name(),
            why.lines().next().unwrap_or(why)
        )
    })
}

/// Runs `$body` with `B` bound to the chosen backend type and `device` to its default device,
/// after checking that a GPU backend starts. A backend that was not compiled in is a clear
/// error naming the cargo feature.
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, |$B:ident, $device:ident| $body:expr) => {{
        match $kind {
            #[cfg(feature = "ndarray")]
            $crate::backend::BackendKind::Ndarray => {
                type $B = burn::backend::NdArray<f32>;
                let $device = burn::backend::ndarray::NdArrayDevice::default();
                $body
            }
            #[cfg(feature = "wgpu")]
            $crate::backend::BackendKind::Wgpu => {
                type $B = burn::backend::Wgpu;
                let $device = burn::backend::wgpu::WgpuDevice::default();
                $crate::backend::probe::<$B>($kind, &$device)?;
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::BackendKind::Cuda => {
                type $B = burn::backend::Cuda;
                let $device = burn::backend::cuda::CudaDevice::default();
                $crate::backend::probe::<$B>($kind, &$device)?;
                $body
            }
            #[allow(unreachable_patterns)]
            other => anyhow::bail!(
                "this binary was built without the `{0}` backend; rebuild with `cargo build --release --features {0}`",
                other.name()
            ),
        }
    }};
}
