//! Backend selection: compiled in with cargo features, chosen at run time with `--backend`.

use clap::ValueEnum;

/// A Burn backend the binary may have been built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// CPU (burn-flex: gemm kernels, every core). Feature `cpu` (default).
    Cpu,
    /// CPU through burn-ndarray: the reference CPU backend, slower. Feature `ndarray` (default).
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
        } else if cfg!(feature = "cpu") {
            BackendKind::Cpu
        } else {
            BackendKind::Ndarray
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
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
    start::<B>(device).map_err(|why| {
        let need = match kind {
            BackendKind::Cuda => {
                "an NVIDIA driver (libcuda.so) and a visible GPU (check `nvidia-smi`)"
            }
            BackendKind::Wgpu => "a GPU with a Vulkan, Metal or DirectX 12 driver",
            BackendKind::Cpu | BackendKind::Ndarray => "nothing",
        };
        anyhow::anyhow!(
            "the {} backend could not start ({why}): it needs {need}; `--backend cpu` runs on the CPU",
            kind.name(),
        )
    })
}

/// The devices of `--devices 0,1,...` (device `i` is the i-th CUDA GPU, or the i-th discrete
/// GPU wgpu finds), or `default` alone when none are given. Each must start. On the CPU
/// backend every index names the same CPU: N indices run N data-parallel workers sharing its
/// cores, which computes what N GPUs would (useful for testing, not for speed).
pub fn training_devices<B: burn::tensor::backend::Backend>(
    indices: &[usize],
    default: &B::Device,
) -> anyhow::Result<Vec<B::Device>> {
    use burn::tensor::backend::{Device, DeviceId};
    if indices.is_empty() {
        return Ok(vec![default.clone()]);
    }
    let mut devices = Vec::with_capacity(indices.len());
    for (k, &i) in indices.iter().enumerate() {
        if indices[..k].contains(&i) {
            anyhow::bail!("--devices: device {i} is given twice");
        }
        let index = u16::try_from(i)
            .map_err(|_| anyhow::anyhow!("--devices: {i} is not a device index"))?;
        // type 0 is "a GPU by index" for both cubecl runtimes; the CPU backend ignores it
        let device = B::Device::from_id(DeviceId::new(0, index));
        start::<B>(&device).map_err(|why| {
            anyhow::anyhow!("--devices: device {i} ({device:?}) could not start: {why}")
        })?;
        devices.push(device);
    }
    Ok(devices)
}

/// Allocates one small tensor on `device`, turning a panic inside the backend into its message.
fn start<B: burn::tensor::backend::Backend>(device: &B::Device) -> Result<(), String> {
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
        why.lines().next().unwrap_or(why).to_string()
    })
}

/// Runs `$body` with `B` bound to the chosen backend type and `device` to its default device,
/// after checking that a GPU backend starts. A backend that was not compiled in is a clear
/// error naming the cargo feature.
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, |$B:ident, $device:ident| $body:expr) => {{
        match $kind {
            #[cfg(feature = "cpu")]
            $crate::backend::BackendKind::Cpu => {
                type $B = burn::backend::Flex;
                let $device = burn::backend::flex::FlexDevice;
                $body
            }
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

/// A training stage run through [`train_with_backend!`] on `$args.train.devices`, its report
/// shown as `$args.report` asks (`--json`, or `$print`).
#[macro_export]
macro_rules! train_and_show {
    ($kind:expr, $args:expr, $($stage:ident)::+, $config:expr, $print:expr) => {{
        let report = $crate::train_with_backend!($kind, &$args.train.devices, $($stage)::+, $config)?;
        $args.report.show(&report, $print)
    }};
}

/// Runs the pipeline's training stage `$stage` (`skipgpt_pipeline::pretrain`, `tune_routers`,
/// `finetune_lora`) with `$config` on the chosen backend, over the `--devices` of `$devices`.
#[macro_export]
macro_rules! train_with_backend {
    ($kind:expr, $devices:expr, $($stage:ident)::+, $config:expr) => {
        $crate::with_backend!($kind, |B, device| {
            let devices = $crate::backend::training_devices::<burn::backend::Autodiff<B>>(
                $devices, &device,
            )?;
            $($stage)::+::<B>($config, &devices)
        })
    };
}
