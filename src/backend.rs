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

/// Runs `$body` with `B` bound to the chosen backend type and `device` to its default device.
/// A backend that was not compiled in is a clear error naming the cargo feature.
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
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::BackendKind::Cuda => {
                type $B = burn::backend::Cuda;
                let $device = burn::backend::cuda::CudaDevice::default();
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
