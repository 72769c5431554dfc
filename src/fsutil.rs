//! File helpers every writer shares: temporary names (`.NAME.tmp-PID`), atomic writes (temporary file, fsync,
//! rename, fsync of the folder), sha256 of bytes and of files, and whether a process id is alive.
//!
//! One module, so that the temporary names peftkit creates, and so the names [`crate::outdir`] may clean up after a
//! crash, are defined in one place. Reference: POSIX rename(2) replaces its target atomically within a filesystem;
//! a file's data reaches the disk before the rename only after fsync(2), and the rename itself after an fsync of the
//! folder.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The marker in every temporary name peftkit gives a file or folder: `.NAME` + `TMP_MARK` + `PID`.
pub const TMP_MARK: &str = ".tmp-";

/// `dir/.name.tmp-<pid>`: the temporary name used before a rename into place.
pub fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}{TMP_MARK}{}", std::process::id()))
}

/// The process id in a temporary name peftkit creates (`.NAME.tmp-PID`, see [`tmp_name`]); `None` for any
/// other name.
pub fn tmp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (stem, pid) = rest.rsplit_once(TMP_MARK)?;
    if stem.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename: a crash leaves either the
/// old file or the whole new one (and at worst a `.NAME.tmp-PID` file, which [`crate::outdir`] removes).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_name(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        // On disk before the rename, so a crash leaves either the old file or the whole new one.
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // A full disk or a refused rename: no half file left behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(parent_of(path));
    Ok(())
}

/// The folder holding `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Makes a rename inside `dir` durable (best effort: not every filesystem supports syncing a directory).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Lower-case hex sha256 of a file, streamed, with its first `sample_len` bytes.
pub fn sha256_file_sample(path: &Path, sample_len: usize) -> std::io::Result<(String, Vec<u8>)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut sample = Vec::with_capacity(sample_len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if sample.len() < sample_len {
            let take = (sample_len - sample.len()).min(n);
            sample.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
    }
    Ok((format!("{:x}", hasher.finalize()), sample))
}

/// Lower-case hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_file_sample(path, 0).map(|(h, _)| h)
}

/// Whether a process with id `pid` exists (`kill(pid, 0)`: success, or EPERM for another user's process).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Why `dir` cannot become an output folder: it, or a folder above it, exists and is not a folder. Checked before
/// a run starts so that the error names the path, not "File exists (os error 17)" at the first write.
pub fn output_dir_problem(dir: &Path) -> Option<String> {
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
mod tests {
    use super::*;

    #[test]
    fn temporary_names_carry_the_pid() {
        let t = tmp_name(Path::new("out/adapter_model.safetensors"));
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!(".adapter_model.safetensors.tmp-{}", std::process::id()));
        assert_eq!(tmp_pid(name), Some(std::process::id()));
        assert_eq!(tmp_pid(".step-000004.tmp-77"), Some(77));
        for other in ["adapter.tmp-1", ".tmp-1", ".x.tmp-", ".x.tmp-12a", ".x.tmp", "x.lock", ".x.old-12"] {
            assert_eq!(tmp_pid(other), None, "{other}");
        }
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        // A write that cannot complete (the target is a folder) leaves no temporary file either.
        std::fs::create_dir(d.path().join("dir")).unwrap();
        std::fs::write(d.path().join("dir/x"), b"").unwrap();
        assert!(write_atomic(&d.path().join("dir"), b"x").is_err());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn sha256_of_bytes_and_files_agree_with_the_standard_vector() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(b"abc"), abc);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"abc").unwrap();
        assert_eq!(sha256_file(&d.path().join("f")).unwrap(), abc);
        assert_eq!(sha256_file_sample(&d.path().join("f"), 2).unwrap(), (abc.to_string(), b"ab".to_vec()));
    }

    #[test]
    fn own_pid_is_alive_and_an_unused_one_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
        // pid_max is at most 2^22 on Linux.
        assert!(!pid_alive((1 << 22) + 1));
    }
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
