//! Small process-level helpers: peak memory, human-readable sizes.

/// Peak resident set size of this process in MiB (`VmHWM` from /proc/self/status; `None` where unavailable).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Current resident set size in MiB (`VmRSS`).
pub fn rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Process-wide settings for CPU training, applied once at start-up (before any tensor work):
/// - glibc malloc keeps freed blocks up to 32 MiB in its heap and does not hand memory back after every free, so
///   the many activation-sized buffers of a training step are reused instead of being mapped, zero-filled by the
///   kernel and unmapped again each time (measured: a large share of a step went to page faults);
/// - candle's element-wise worker pool spins only briefly before parking, so it does not compete for the cores
///   with the matrix-multiply threads (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, unless the user set it).
pub fn tune_runtime() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
}
