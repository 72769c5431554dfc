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

/// Why `dir` cannot become an output folder: it, or a folder above it, exists and is not a folder. Checked before
/// a run starts so that the error names the path, not "File exists (os error 17)" at the first write.
pub fn output_dir_problem(dir: &std::path::Path) -> Option<String> {
    dir.ancestors().filter(|a| !a.as_os_str().is_empty()).find_map(|a| match std::fs::metadata(a) {
        Ok(m) if !m.is_dir() => Some(if a == dir {
            format!("{} exists and is not a folder", dir.display())
        } else {
            format!("{}: {} is a file, not a folder, so nothing can be written under it", dir.display(), a.display())
        }),
        _ => None,
    })
}

#[cfg(test)]
mod output_dir_tests {
    #[test]
    fn output_under_a_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("afile");
        std::fs::write(&file, "x").unwrap();
        let msg = super::output_dir_problem(&file.join("sub/out")).unwrap();
        assert!(
            msg.ends_with(&format!("{} is a file, not a folder, so nothing can be written under it", file.display())),
            "{msg}"
        );
        assert!(super::output_dir_problem(&file).unwrap().ends_with("exists and is not a folder"));
        assert_eq!(super::output_dir_problem(&dir.path().join("new/out")), None);
    }
}
