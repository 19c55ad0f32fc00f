//! The process's heap: glibc's allocator keeps freed memory resident unless told otherwise,
//! which a long-lived process (the server, `chat`) or a peak-memory benchmark would carry for
//! its whole life.

/// One heap for every thread. glibc gives every thread that allocates its own heap, and a
/// product's per-task buffers leave each of them holding memory it never returns: one heap
/// for all keeps a quantized model's peak memory closer to its file's size. Its lock is rarely
/// contended: the threads compute far longer than they allocate. Call before any other thread
/// exists.
pub fn use_one_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called from `main` before any other thread exists
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands the heap's free pages back to the system. Worth calling after work that frees more
/// than it keeps: loading a model (a GGUF's tokenizer is built through its metadata arrays and
/// a JSON document), or the server's start-up calibration (a forward pass per bias shift).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system
    unsafe {
        libc::malloc_trim(0);
    }
}
