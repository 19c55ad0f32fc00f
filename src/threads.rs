//! The CPU thread count, shared by the CLI (`--threads`) and the benchmarks.

/// Sets the number of CPU threads (`--threads`) for every CPU backend: rayon's global pool
/// (burn-flex and its gemm kernels, burn-ndarray's element-wise work) and matrixmultiply's
/// threads (burn-ndarray's matmul). Without it rayon honours `RAYON_NUM_THREADS`, else it uses
/// every core.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let Some(n) = threads.or_else(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
    }) else {
        return Ok(());
    };
    if n == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    // read by matrixmultiply when its thread pool starts, which is after this point
    std::env::set_var("MATMUL_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("--threads {n}: {e}"))
}
