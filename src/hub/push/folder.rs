//! The folder to push: every file listed (resume checkpoints and VCS folders left out), a model card required,
//! and nothing half-written: no temporary names, complete safetensors, JSON and JSON Lines, a weights index
//! whose shards are present. Each file is hashed (sha256) and sampled for the preupload call, and checked
//! again before the commit.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

use super::{PushError, MODEL_CARD, SKIPPED_DIRS};

/// Bytes of each file sent to the preupload call.
const SAMPLE_LEN: usize = 512;

/// A local file to push.
#[derive(Clone, Debug)]
pub(super) struct LocalFile {
    /// Path in the repo (`/`-separated, relative to the folder).
    pub(super) rel: String,
    pub(super) path: PathBuf,
    pub(super) size: u64,
    pub(super) modified: Option<SystemTime>,
    pub(super) sha256: String,
    pub(super) sample: Vec<u8>,
}

/// Paths left out of an upload, each with the reason.
pub(super) type Skipped = Vec<(String, &'static str)>;

/// Lists and checks the folder: a model card, no temporary or truncated files, complete safetensors and JSON.
/// Returns the files (sorted by path) and the paths left out.
pub(super) fn scan_folder(folder: &Path) -> Result<(Vec<LocalFile>, Skipped), PushError> {
    let bad = |reason: String| PushError::Folder { folder: folder.to_path_buf(), reason };
    let meta = std::fs::metadata(folder).map_err(|e| bad(format!("cannot read the folder ({e})")))?;
    if !meta.is_dir() {
        return Err(bad("not a folder; push takes an adapter or model folder".into()));
    }
    let own_name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if is_temporary_name(&own_name) {
        return Err(PushError::HalfWritten {
            path: folder.to_path_buf(),
            reason: "a temporary folder: a job (e.g. `peftkit merge`) is still writing it, or stopped before it \
                     finished"
                .into(),
        });
    }
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    walk(folder, folder, &mut found, &mut skipped)?;
    found.sort();
    if found.is_empty() {
        return Err(bad("the folder is empty".into()));
    }
    let card = folder.join(MODEL_CARD);
    match std::fs::metadata(&card) {
        Ok(m) if m.is_file() && m.len() > 0 => {}
        _ => {
            return Err(bad(format!(
                "no model card ({MODEL_CARD}); every pushed repo needs one. peftkit writes it with the adapter \
                 (`peftkit train`) or the merged model (`peftkit merge`); write one by hand for other folders"
            )))
        }
    }
    let names: Vec<&str> = found.iter().map(|(rel, _)| rel.as_str()).collect();
    let has = |n: &str| names.contains(&n);
    if has("adapter_config.json") && !names.iter().any(|n| n.starts_with("adapter_model.")) {
        return Err(bad("adapter_config.json without adapter_model.safetensors: the adapter is incomplete".into()));
    }
    if names.iter().any(|n| n.starts_with("adapter_model.")) && !has("adapter_config.json") {
        return Err(bad("adapter weights without adapter_config.json: the adapter is incomplete".into()));
    }
    let weights = |n: &&str| n.ends_with(".safetensors") || n.ends_with(".bin") || n.ends_with(".gguf");
    if has("config.json") && !has("adapter_config.json") && !names.iter().any(weights) {
        return Err(
            bad("config.json without weights (no .safetensors, .bin or .gguf): the model is incomplete".into()),
        );
    }
    for (rel, path) in &found {
        check_complete(rel, path, folder)?;
    }
    let mut files = Vec::with_capacity(found.len());
    for (rel, path) in found {
        let meta = std::fs::metadata(&path).map_err(|source| PushError::Io { path: path.clone(), source })?;
        let (sha256, sample) = hash_file(&path)?;
        files.push(LocalFile { rel, size: meta.len(), modified: meta.modified().ok(), sha256, sample, path });
    }
    Ok((files, skipped))
}

fn walk(
    root: &Path,
    dir: &Path,
    found: &mut Vec<(String, PathBuf)>,
    skipped: &mut Vec<(String, &'static str)>,
) -> Result<(), PushError> {
    let io = |source| PushError::Io { path: dir.to_path_buf(), source };
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io)?.collect::<Result<_, _>>().map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = path
            .strip_prefix(root)
            .map(|r| r.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"))
            .unwrap_or_else(|_| name.clone());
        let link = std::fs::symlink_metadata(&path).map(|m| m.file_type().is_symlink()).unwrap_or(false);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) if link => {
                return Err(PushError::Folder {
                    folder: root.to_path_buf(),
                    reason: format!("{rel} is a link to nothing (a dangling symlink); fix or delete it"),
                })
            }
            Err(source) => return Err(PushError::Io { path: path.clone(), source }),
        };
        if meta.is_dir() && link {
            // A linked folder may lead outside the folder (or back into it): not followed.
            skipped.push((format!("{rel}/"), "a link to a folder, not followed"));
        } else if meta.is_dir() {
            if is_temporary_name(&name) {
                return Err(PushError::HalfWritten {
                    path,
                    reason: "a temporary folder: a job is still writing it (or stopped before it finished)".into(),
                });
            }
            if dir == root && SKIPPED_DIRS.contains(&name.as_str()) {
                let why = if name == "checkpoints" { "training resume state" } else { "not model content" };
                skipped.push((format!("{rel}/"), why));
            } else {
                walk(root, &path, found, skipped)?;
            }
        } else if meta.is_file() {
            if dir == root && name == crate::outdir::LOCK_FILE {
                // peftkit's lock: a live owner is still writing the folder; a dead one's (or our own) is no content.
                if let Some(pid) = crate::outdir::lock_owner(&path) {
                    return Err(PushError::HalfWritten {
                        path,
                        reason: format!("peftkit (pid {pid}) is still writing this folder; wait for it to finish"),
                    });
                }
                continue;
            }
            if let Some(pid) = crate::fsutil::tmp_pid(&name).filter(|&p| !crate::fsutil::pid_alive(p)) {
                return Err(PushError::HalfWritten {
                    path,
                    reason: format!(
                        "a temporary file of peftkit (pid {pid}, which stopped before it finished); the next \
                         peftkit command on this folder (e.g. `peftkit train --resume`) removes it, or delete it"
                    ),
                });
            }
            if is_temporary_name(&name) {
                return Err(PushError::HalfWritten {
                    path,
                    reason: "a temporary file: a job is still writing this folder (or stopped before it finished); \
                             wait for it to finish, or delete the file"
                        .into(),
                });
            }
            found.push((rel, path));
        }
    }
    Ok(())
}

/// Names peftkit and other tools give files while they are being written.
fn is_temporary_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.contains(".tmp-")
        || [".tmp", ".part", ".partial", ".incomplete", ".crdownload", ".lock"].iter().any(|s| lower.ends_with(s))
}

/// A file whose format says how long it is must be whole: safetensors (header + data), JSON, JSON Lines, and a
/// weights index whose shards are all present.
fn check_complete(rel: &str, path: &Path, folder: &Path) -> Result<(), PushError> {
    let half = |reason: String| PushError::HalfWritten { path: path.to_path_buf(), reason };
    let io = |source| PushError::Io { path: path.to_path_buf(), source };
    if rel.ends_with(".safetensors") {
        let actual = std::fs::metadata(path).map_err(io)?.len();
        let expected = safetensors_length(path).map_err(|e| half(format!("not a complete safetensors file ({e})")))?;
        if actual != expected {
            return Err(half(format!(
                "truncated or padded: its header describes {expected} bytes but the file has {actual}"
            )));
        }
    } else if rel.ends_with(".json") {
        let text = std::fs::read_to_string(path).map_err(io)?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| half(format!("not complete JSON (line {}, column {}: {e})", e.line(), e.column())))?;
        if rel.ends_with(".safetensors.index.json") {
            let shards =
                value.get("weight_map").and_then(Value::as_object).ok_or_else(|| half("no weight_map".into()))?;
            let dir = Path::new(rel).parent().map(|p| folder.join(p)).unwrap_or_else(|| folder.to_path_buf());
            for shard in shards.values().filter_map(Value::as_str) {
                if Path::new(shard).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                    return Err(half(format!("names the shard {shard:?}, which is not a plain file name")));
                }
                if !dir.join(shard).is_file() {
                    return Err(half(format!("names the shard {shard}, which is missing")));
                }
            }
        }
    } else if rel.ends_with(".jsonl") {
        use std::io::BufRead;
        let reader = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(io)?;
            if !line.trim().is_empty() {
                serde_json::from_str::<Value>(&line)
                    .map_err(|e| half(format!("line {}: not complete JSON ({e})", i + 1)))?;
            }
        }
    }
    Ok(())
}

/// The length a safetensors file must have: 8 + header length + the end of the last tensor's data.
fn safetensors_length(path: &Path) -> Result<u64, String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| "shorter than its 8-byte header length".to_string())?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(format!("header length {n} is not plausible"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|_| "the JSON header is cut short".to_string())?;
    let header: Value = serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    let map = header.as_object().ok_or("the header is not a JSON object")?;
    let mut end = 0u64;
    for (name, info) in map.iter().filter(|(k, _)| *k != "__metadata__") {
        let offsets = info.get("data_offsets").and_then(Value::as_array).ok_or(format!("{name}: no data_offsets"))?;
        let stop = offsets.get(1).and_then(Value::as_u64).ok_or(format!("{name}: bad data_offsets"))?;
        end = end.max(stop);
    }
    (8 + n).checked_add(end).ok_or_else(|| "data offsets overflow".to_string())
}

fn hash_file(path: &Path) -> Result<(String, Vec<u8>), PushError> {
    crate::fsutil::sha256_file_sample(path, SAMPLE_LEN)
        .map_err(|source| PushError::Io { path: path.to_path_buf(), source })
}

/// Files must be as they were when hashed: same size and modification time.
pub(super) fn recheck(files: &[LocalFile]) -> Result<(), PushError> {
    for f in files {
        let meta = std::fs::metadata(&f.path).map_err(|_| PushError::Changed { path: f.path.clone() })?;
        if meta.len() != f.size || meta.modified().ok() != f.modified {
            return Err(PushError::Changed { path: f.path.clone() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names() {
        for n in [".adapter_model.safetensors.tmp-1234", "x.tmp", "model.part", "a.incomplete", "b.lock"] {
            assert!(is_temporary_name(n), "{n}");
        }
        for n in ["adapter_model.safetensors", "README.md", "tmp.json", "metrics.jsonl"] {
            assert!(!is_temporary_name(n), "{n}");
        }
    }

    #[test]
    fn safetensors_length_reads_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let t = candle_core::Tensor::zeros((3, 5), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("w".to_string(), t)]), &p).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(safetensors_length(&p).unwrap(), len);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        assert_eq!(safetensors_length(&p).unwrap(), len);
        std::fs::write(&p, &bytes[..6]).unwrap();
        assert!(safetensors_length(&p).is_err());
    }
}
