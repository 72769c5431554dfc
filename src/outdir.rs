//! An output folder owned by one peftkit process at a time, and what a crashed one left in it:
//!
//! - [`OutputLock`]: an exclusive lock, `flock(2)` on a lock file that holds the owner's pid and command. The
//!   kernel drops the lock when its owner dies (even by kill -9), so a stale lock file is taken over at once; the
//!   pid only names the owner in the error a second process gets.
//! - [`clean_stale`]: removes the temporary files and folders peftkit itself creates (`.NAME.tmp-PID`, see
//!   [`crate::fsutil::tmp_name`]) whose process is gone — nothing else, and nothing of a live process.
//! - [`Staging`]: a set of files that must appear together (an adapter's weights and its config). They are
//!   written into a hidden folder; once all are on disk the folder gets a marker listing them in order, and only
//!   then are they renamed into place one by one, the config last. A crash before the marker leaves only the
//!   hidden folder (removed by [`clean_stale`]); a crash after it is finished by [`clean_stale`] (the renames
//!   are redone from the marker), so the next peftkit command always sees all the files or none.

use crate::fsutil::{self, parent_of, pid_alive, tmp_pid};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The lock file inside a training output folder.
pub const LOCK_FILE: &str = ".peftkit.lock";
/// The marker of a complete [`Staging`] folder: the names of its files, in the order they are moved into place.
pub const COMPLETE_MARK: &str = ".peftkit-complete";

/// Errors of the output folder.
#[derive(Debug, thiserror::Error)]
pub enum OutDirError {
    #[error(
        "{target} is in use by another peftkit process (pid {pid}{}); wait for it to finish, or stop it \
         (`kill {pid}`). Its lock file is {lock}",
        if .command.is_empty() { String::new() } else { format!(": `{}`", .command) }
    )]
    Locked { target: PathBuf, lock: PathBuf, pid: u32, command: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl OutDirError {
    /// Every error here is about the user's folder (busy, unwritable): exit code 2.
    pub fn is_user_error(&self) -> bool {
        true
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutDirError + '_ {
    move |source| OutDirError::Io { path: path.to_path_buf(), source }
}

/// An exclusive lock on an output (a folder or a file), held until dropped; the lock file is removed then.
#[derive(Debug)]
pub struct OutputLock {
    file: File,
    path: PathBuf,
    /// The folder this lock created (removed with the lock when it is still empty).
    created: Option<PathBuf>,
}

/// The owner recorded in a lock file: its pid and command.
fn read_owner(file: &mut File) -> Option<(u32, String)> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    Some((pid, lines.next().unwrap_or("").trim().to_string()))
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

impl OutputLock {
    /// Locks `target` through the lock file `lock` (created if missing), recording this process's pid and
    /// `command`. Fails at once with [`OutDirError::Locked`], naming the owner's pid, when another process holds
    /// it. A lock file left by a process that died is taken over.
    pub fn acquire(target: &Path, lock: &Path, command: &str) -> Result<Self, OutDirError> {
        if let Some(parent) = lock.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        // A few rounds: the file may be removed by its previous owner between our open and our lock, and a new
        // owner may not have written its pid yet.
        let mut last_owner = None;
        for _ in 0..40 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(lock)
                .map_err(io_err(lock))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    match read_owner(&mut file) {
                        Some((pid, command)) if pid_alive(pid) && pid != std::process::id() => {
                            return Err(OutDirError::Locked {
                                target: target.to_path_buf(),
                                lock: lock.to_path_buf(),
                                pid,
                                command,
                            })
                        }
                        // Locked, but the owner has not written its pid yet: ask again shortly.
                        owner => last_owner = owner,
                    }
                    std::thread::sleep(std::time::Duration::from_millis(25));
                    continue;
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(OutDirError::Io { path: lock.to_path_buf(), source: e })
                }
            }
            // The lock is ours, if the file is still the one at `lock` (its owner may have removed it meanwhile).
            let here = std::fs::metadata(lock);
            let mine = file.metadata().map_err(io_err(lock))?;
            if !here.is_ok_and(|h| same_file(&h, &mine)) {
                continue;
            }
            if let Some((pid, _)) = read_owner(&mut file).filter(|(pid, _)| *pid != std::process::id()) {
                tracing::info!("{}: took over the lock of pid {pid}, which is no longer running", lock.display());
            }
            let text = format!("{}\n{}\n", std::process::id(), command.replace('\n', " "));
            let written = (|| {
                file.set_len(0)?;
                file.rewind()?;
                file.write_all(text.as_bytes())?;
                file.sync_all()
            })();
            written.map_err(io_err(lock))?;
            return Ok(OutputLock { file, path: lock.to_path_buf(), created: None });
        }
        let (pid, command) = last_owner.unwrap_or((0, String::new()));
        Err(OutDirError::Locked { target: target.to_path_buf(), lock: lock.to_path_buf(), pid, command })
    }

    /// Locks the training output folder `dir` (created if missing): the lock file is `dir/.peftkit.lock`.
    /// A run that fails before writing anything leaves no empty folder behind.
    pub fn folder(dir: &Path, command: &str) -> Result<Self, OutDirError> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        match Self::acquire(dir, &dir.join(LOCK_FILE), command) {
            Ok(mut lock) => {
                lock.created = created.then(|| dir.to_path_buf());
                Ok(lock)
            }
            Err(e) => {
                if created {
                    let _ = std::fs::remove_dir(dir);
                }
                Err(e)
            }
        }
    }

    /// Locks an output that is replaced as a whole (`merge --out`): the lock file is its hidden sibling
    /// `.NAME.peftkit.lock`, which outlives the replacement.
    pub fn sibling(out: &Path, command: &str) -> Result<Self, OutDirError> {
        let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        Self::acquire(out, &out.with_file_name(format!(".{name}.peftkit.lock")), command)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed only while it is still our file; the lock itself goes with the file handle.
        if let (Ok(here), Ok(mine)) = (std::fs::metadata(&self.path), self.file.metadata()) {
            if same_file(&here, &mine) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        if let Some(dir) = &self.created {
            // Only when empty (remove_dir refuses otherwise).
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The owner of the lock file `path` while a live process other than this one holds it: its pid.
pub fn lock_owner(path: &Path) -> Option<u32> {
    let mut file = File::open(path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(_) => read_owner(&mut file).map(|(pid, _)| pid).filter(|&p| p != std::process::id()),
    }
}

/// Removes, from `dir`, the temporary files and folders of peftkit processes that are gone: `.NAME.tmp-PID` where
/// `ours(NAME)` (a name peftkit writes there) and PID is dead, or is this process's own pid (an earlier process's:
/// the caller holds the folder's lock). A complete [`Staging`] folder is finished (its files moved into `dir`)
/// rather than removed. Returns what was done, one line each, for the log.
pub fn clean_stale(dir: &Path, ours: &dyn Fn(&str) -> bool) -> Result<Vec<String>, OutDirError> {
    let mut done = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(done) };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = tmp_pid(&name) else { continue };
        let stem = name.strip_prefix('.').and_then(|n| n.rsplit_once(crate::fsutil::TMP_MARK)).map_or("", |(s, _)| s);
        if !ours(stem) || pid_alive(pid) && pid != std::process::id() {
            continue;
        }
        let path = e.path();
        if path.join(COMPLETE_MARK).is_file() {
            let moved = roll_forward(&path, dir)?;
            done.push(format!("finished saving {} (interrupted after it was complete)", moved.join(", ")));
            continue;
        }
        remove_any(&path)?;
        done.push(format!("removed {} (left by pid {pid}, which is no longer running)", path.display()));
    }
    Ok(done)
}

/// Removes a file or a folder (a missing one is fine).
pub fn remove_any(path: &Path) -> Result<(), OutDirError> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(OutDirError::Io { path: path.to_path_buf(), source: e })
        }
        _ => Ok(()),
    }
}

/// What a crashed `merge --out OUT` leaves beside OUT: its temporary output `.OUT.tmp-PID` and combined adapter
/// `.OUT.combined-PID` (removed) and, when it
/// died while swapping an old OUT for the new one, the old one moved aside as `.OUT.old-PID` (put back when OUT is
/// missing, else removed). Only for PIDs that are gone. Returns what was done, one line each.
pub fn clean_replaced_output(out: &Path) -> Result<Vec<String>, OutDirError> {
    let mut done = Vec::new();
    let Some(name) = out.file_name().map(|n| n.to_string_lossy().to_string()) else { return Ok(done) };
    let parent = parent_of(out);
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(done) };
    let pid_of = |entry: &str, kind: &str| -> Option<u32> {
        let rest = entry.strip_prefix(&format!(".{name}.{kind}-"))?;
        rest.bytes().all(|b| b.is_ascii_digit()).then(|| rest.parse().ok()).flatten()
    };
    for e in entries.flatten() {
        let entry = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        let gone = |p: &u32| !pid_alive(*p) || *p == std::process::id();
        if let Some(pid) = pid_of(&entry, "tmp").or_else(|| pid_of(&entry, "combined")).filter(gone) {
            remove_any(&path)?;
            done.push(format!("removed {} (left by pid {pid}, which is no longer running)", path.display()));
        } else if let Some(pid) = pid_of(&entry, "old").filter(gone) {
            if std::fs::symlink_metadata(out).is_err() {
                std::fs::rename(&path, out).map_err(io_err(out))?;
                done.push(format!(
                    "restored {} from {} (pid {pid} stopped while replacing it)",
                    out.display(),
                    path.display()
                ));
            } else {
                remove_any(&path)?;
                done.push(format!("removed {} (left by pid {pid}, which is no longer running)", path.display()));
            }
        }
    }
    Ok(done)
}

/// A folder that replaces `out` whole: written as the hidden sibling `.OUT.tmp-PID`, then renamed into place by
/// [`ReplacementFolder::persist`] (an existing `out` moved aside as `.OUT.old-PID` first and deleted once the new
/// one is in place). Dropped before that, the folder is removed; a killed process's leftovers are
/// [`clean_replaced_output`]'s. Used by `merge` for the merged model and by `merge --to adapter`.
#[derive(Debug)]
pub struct ReplacementFolder {
    path: PathBuf,
    persisted: bool,
}

impl ReplacementFolder {
    /// A fresh, empty `.OUT.tmp-PID` beside `out` (its parent created if needed).
    pub fn create(out: &Path) -> Result<Self, OutDirError> {
        let path = crate::fsutil::tmp_name(out);
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        // A leftover of an earlier process with the same id.
        remove_any(&path)?;
        std::fs::create_dir(&path).map_err(io_err(&path))?;
        Ok(Self { path, persisted: false })
    }

    /// Where to write the new folder's files.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the folder to `out`. An existing `out` (the caller decided it may be replaced) is moved aside first
    /// and deleted once the new folder is in place; if the rename fails it is put back.
    pub fn persist(mut self, out: &Path) -> Result<(), OutDirError> {
        let mut old = None;
        if out.is_dir() {
            let name = out.file_name().unwrap_or_default().to_string_lossy().to_string();
            let aside = out.with_file_name(format!(".{name}.old-{}", std::process::id()));
            remove_any(&aside)?;
            std::fs::rename(out, &aside).map_err(io_err(out))?;
            old = Some(aside);
        }
        if let Err(e) = std::fs::rename(&self.path, out) {
            if let Some(aside) = &old {
                let _ = std::fs::rename(aside, out);
            }
            return Err(OutDirError::Io { path: out.to_path_buf(), source: e });
        }
        self.persisted = true;
        crate::fsutil::sync_dir(parent_of(out));
        if let Some(aside) = old {
            if let Err(e) = std::fs::remove_dir_all(&aside) {
                tracing::warn!("could not remove the replaced folder {}: {e}", aside.display());
            }
        }
        Ok(())
    }
}

impl Drop for ReplacementFolder {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Files that must appear together in `parent`: written into a hidden folder `parent/.NAME.tmp-PID`, then moved
/// into place by [`Staging::commit`]. Dropped before the commit, the folder is removed.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    parent: PathBuf,
    committed: bool,
}

impl Staging {
    /// A fresh staging folder `.NAME.tmp-PID` inside `parent`.
    pub fn create(parent: &Path, name: &str) -> Result<Self, OutDirError> {
        let dir = fsutil::tmp_name(&parent.join(name));
        remove_any(&dir)?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Staging { dir, parent: parent.to_path_buf(), committed: false })
    }

    /// The folder to write the files into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves every file into the parent folder, those named in `last` last (in that order), once all of them are
    /// on disk. Returns the names, in the order they were moved.
    pub fn commit(mut self, last: &[&str]) -> Result<Vec<String>, OutDirError> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(io_err(&self.dir))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n != COMPLETE_MARK && !last.contains(&n.as_str()))
            .collect();
        names.sort();
        names.extend(last.iter().filter(|n| self.dir.join(n).exists()).map(|n| n.to_string()));
        for n in &names {
            if let Ok(f) = File::open(self.dir.join(n)) {
                let _ = f.sync_all();
            }
        }
        fsutil::write_atomic(&self.dir.join(COMPLETE_MARK), names.join("\n").as_bytes()).map_err(io_err(&self.dir))?;
        // From here on the files are as good as in place: a crash is finished by `clean_stale`.
        self.committed = true;
        roll_forward(&self.dir, &self.parent)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Moves the files a complete staging folder lists (those still there) into `parent`, in order, then removes it.
fn roll_forward(staging: &Path, parent: &Path) -> Result<Vec<String>, OutDirError> {
    let mark = staging.join(COMPLETE_MARK);
    let list = std::fs::read_to_string(&mark).map_err(io_err(&mark))?;
    let names: Vec<String> = list.lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
    for n in &names {
        if n.contains('/') || n == "." || n == ".." {
            continue;
        }
        let from = staging.join(n);
        if std::fs::symlink_metadata(&from).is_ok() {
            let to = parent.join(n);
            std::fs::rename(&from, &to).map_err(io_err(&to))?;
        }
    }
    fsutil::sync_dir(parent);
    remove_any(staging)?;
    fsutil::sync_dir(parent);
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process id that is not running: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!pid_alive(pid));
        pid
    }

    #[test]
    fn a_second_lock_fails_naming_the_owner_and_a_dead_owners_lock_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("run");
        // A lock file left by a process that died (kill -9): no flock on it, a dead pid in it.
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join(LOCK_FILE), format!("{}\npeftkit train old.yaml\n", dead_pid())).unwrap();
        let lock = OutputLock::folder(&out, "peftkit train a.yaml").unwrap();
        let text = std::fs::read_to_string(out.join(LOCK_FILE)).unwrap();
        assert_eq!(text, format!("{}\npeftkit train a.yaml\n", std::process::id()));
        // Another process holding the lock: the same check run from a child `flock` holder is in tests/crash.rs;
        // here, a second handle of this process is refused like a second process (flock is per open file).
        let mut f = File::open(out.join(LOCK_FILE)).unwrap();
        assert!(f.try_lock().is_err());
        assert_eq!(read_owner(&mut f).map(|o| o.0), Some(std::process::id()));
        drop(lock);
        assert!(!out.join(LOCK_FILE).exists(), "the lock file goes with the lock");
        assert!(out.is_dir(), "a folder that was there stays");
        // A folder the lock created goes with it while empty.
        let fresh = d.path().join("fresh");
        drop(OutputLock::folder(&fresh, "x").unwrap());
        assert!(!fresh.exists());
        // Free again.
        drop(OutputLock::folder(&out, "x").unwrap());
    }

    #[test]
    fn sibling_lock_sits_beside_the_output() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("merged");
        let lock = OutputLock::sibling(&out, "peftkit merge").unwrap();
        assert_eq!(lock.path(), d.path().join(".merged.peftkit.lock"));
        assert!(!out.exists());
    }

    #[test]
    fn only_dead_processes_temporaries_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        // This process's own pid: an earlier process's (the caller holds the folder's lock).
        let live = std::process::id();
        let parent_pid = std::os::unix::process::parent_id(); // alive, and not this process
        for n in [format!(".adapter_model.safetensors.tmp-{dead}"), format!(".metrics.jsonl.tmp-{live}")] {
            std::fs::write(d.path().join(n), b"x").unwrap();
        }
        std::fs::create_dir(d.path().join(format!(".step-000004.tmp-{dead}"))).unwrap();
        std::fs::write(d.path().join(format!(".README.md.tmp-{parent_pid}")), b"x").unwrap();
        for keep in ["adapter_config.json", "notes.tmp", ".hidden", "x.tmp-1"] {
            std::fs::write(d.path().join(keep), b"x").unwrap();
        }
        // Someone else's file with a name like ours: not a name peftkit writes here, kept.
        std::fs::write(d.path().join(format!(".notes.txt.tmp-{dead}")), b"x").unwrap();
        let ours = |stem: &str| {
            ["adapter_model.safetensors", "metrics.jsonl", "README.md"].contains(&stem) || stem.starts_with("step-")
        };
        let done = clean_stale(d.path(), &ours).unwrap();
        assert_eq!(done.len(), 3, "{done:?}");
        let mut left: Vec<String> =
            std::fs::read_dir(d.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        left.sort();
        let mut want = vec![
            format!(".README.md.tmp-{parent_pid}"),
            format!(".notes.txt.tmp-{dead}"),
            ".hidden".into(),
            "adapter_config.json".into(),
            "notes.tmp".into(),
            "x.tmp-1".into(),
        ];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn staged_files_appear_together_and_a_crash_after_the_marker_is_finished() {
        let d = tempfile::tempdir().unwrap();
        // Dropped before the commit: nothing appears, nothing is left.
        {
            let s = Staging::create(d.path(), "save").unwrap();
            std::fs::write(s.path().join("adapter_model.safetensors"), b"w").unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        // Committed: all files in place, the config last, no staging folder.
        let s = Staging::create(d.path(), "save").unwrap();
        for n in ["adapter_model.safetensors", "README.md", "adapter_config.json"] {
            std::fs::write(s.path().join(n), n).unwrap();
        }
        let order = s.commit(&["adapter_config.json"]).unwrap();
        assert_eq!(order, ["README.md", "adapter_model.safetensors", "adapter_config.json"]);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 3);
        // A process killed after the marker, with only the weights moved: the next clean finishes the move.
        let e = tempfile::tempdir().unwrap();
        let staging = e.path().join(format!(".save.tmp-{}", dead_pid()));
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("adapter_config.json"), b"c").unwrap();
        std::fs::write(staging.join(COMPLETE_MARK), "adapter_model.safetensors\nadapter_config.json").unwrap();
        std::fs::write(e.path().join("adapter_model.safetensors"), b"w").unwrap();
        let done = clean_stale(e.path(), &|s| s == "save").unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(e.path().join("adapter_config.json").is_file());
        assert!(!staging.exists());
        // Killed before the marker: the staging folder is removed and nothing appears.
        let staging = e.path().join(format!(".save.tmp-{}", dead_pid()));
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("README.md"), b"new").unwrap();
        clean_stale(e.path(), &|s| s == "save").unwrap();
        assert!(!staging.exists() && !e.path().join("README.md").exists());
    }

    #[test]
    fn a_merge_killed_while_replacing_its_output_gets_the_old_one_back() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("merged");
        let dead = dead_pid();
        std::fs::create_dir(d.path().join(format!(".merged.old-{dead}"))).unwrap();
        std::fs::create_dir(d.path().join(format!(".merged.tmp-{dead}"))).unwrap();
        std::fs::create_dir(d.path().join(format!(".merged2.tmp-{dead}"))).unwrap();
        let done = clean_replaced_output(&out).unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        assert!(out.is_dir());
        assert!(d.path().join(format!(".merged2.tmp-{dead}")).exists(), "another output's leftovers are its own");
    }
}
