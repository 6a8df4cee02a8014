//! The per-user snapshot folder and its disk bound. `--cache-dir auto` (the
//! default of `kvserve claude`) keeps each model's snapshots in
//! `$XDG_CACHE_HOME/kvserve/kv/<key>` (else `~/.cache/kvserve/kv/<key>`),
//! the key being the first 16 hex digits of the model's fingerprint (weights,
//! config, tokenizer, template). Disk use under a root is bounded: past the
//! bound, the least recently used snapshot files (oldest modification time;
//! reading a file touches it) are deleted. `kvserve cache ls|rm|clear` lists
//! and prunes the folder.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The file naming the model a folder's snapshots belong to.
pub const MODEL_FILE: &str = "model.json";
/// Hex digits of the fingerprint that name a model's folder.
pub const KEY_LEN: usize = 16;
/// The default bound: this share of the free space where the folder is...
pub const FREE_SHARE: f64 = 0.10;
/// ... and at most this many bytes.
pub const MAX_DEFAULT_BYTES: u64 = 50_000_000_000;

/// `$XDG_CACHE_HOME/kvserve/kv`, else `~/.cache/kvserve/kv`.
pub fn user_root() -> Option<PathBuf> {
    crate::config::xdg_dir("XDG_CACHE_HOME", ".cache").map(|d| d.join("kvserve/kv"))
}

/// The default disk bound for a folder at `path`: 10% of the space free on
/// its file system, counting the snapshots already there as free (so the
/// bound does not shrink as the cache fills), at most 50 GB (1 GB when the
/// free space is unknown).
pub fn default_budget(path: &Path) -> u64 {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let ours: u64 = snapshot_files(path).iter().map(|f| f.bytes).sum();
    match crate::mlx::os::free_disk_bytes(existing) {
        Some(free) => (((free + ours) as f64 * FREE_SHARE) as u64).min(MAX_DEFAULT_BYTES),
        None => 1 << 30,
    }
}

/// A snapshot file with its size and last use.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub used: SystemTime,
}

/// A kvserve snapshot file by its name: 24 lowercase hex digits (the token
/// hash `Store` names files by) and `.safetensors`. Anything else (a model's
/// `model.safetensors`, say) is never counted or deleted.
pub fn is_snapshot(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()) == Some("safetensors")
        && p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| s.len() == 24 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The snapshot files in `root` and in its model folders (those with a
/// `model.json`) one level down.
pub fn snapshot_files(root: &Path) -> Vec<SnapshotFile> {
    let mut out = vec![];
    let mut dirs = vec![root.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(root) {
        dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir() && p.join(MODEL_FILE).exists()));
    }
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let path = e.path();
            if !is_snapshot(&path) {
                continue;
            }
            if let Ok(m) = e.metadata() {
                out.push(SnapshotFile { bytes: m.len(), used: m.modified().unwrap_or(SystemTime::UNIX_EPOCH), path });
            }
        }
    }
    out
}

/// Delete the least recently used snapshot files under `root` until they
/// take at most `budget` bytes; `keep` (the file just written) stays.
/// Returns the files deleted.
pub fn enforce(root: &Path, budget: u64, keep: Option<&Path>) -> Vec<PathBuf> {
    let mut files = snapshot_files(root);
    let mut total: u64 = files.iter().map(|f| f.bytes).sum();
    let mut deleted = vec![];
    if total <= budget {
        return deleted;
    }
    files.sort_by(|a, b| a.used.cmp(&b.used).then(a.path.cmp(&b.path)));
    let (mut n, mut freed) = (0, 0);
    for f in files {
        if total <= budget {
            break;
        }
        if keep.is_some_and(|k| k == f.path) {
            continue;
        }
        match std::fs::remove_file(&f.path) {
            Ok(()) => {
                super::store::forget_shares(&f.path);
                total -= f.bytes;
                freed += f.bytes;
                n += 1;
                deleted.push(f.path);
            }
            Err(e) => tracing::warn!("{}: cannot delete it to keep the cache folder within its bound: {e}", f.path.display()),
        }
    }
    if n > 0 {
        tracing::info!("prompt cache on disk: deleted the {n} least recently used snapshots ({freed} bytes) to stay within {budget} bytes");
    }
    deleted
}

/// Mark a snapshot file as just used (it is then the last to be deleted).
pub fn touch(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Write the file naming the model of a per-model folder.
pub fn write_model_file(dir: &Path, model: &Path, fingerprint: &str) {
    let v = serde_json::json!({"model": model.display().to_string(), "fingerprint": fingerprint});
    let _ = std::fs::write(dir.join(MODEL_FILE), v.to_string());
}

/// One model's folder under a root, for `kvserve cache ls`.
#[derive(Debug)]
pub struct ModelFolder {
    pub key: String,
    pub path: PathBuf,
    /// The model path it was made for (from its `model.json`), if known.
    pub model: Option<String>,
    pub snapshots: usize,
    pub bytes: u64,
    pub last_used: Option<SystemTime>,
}

/// The model folders under `root` (those with a `model.json`), and any
/// snapshot files directly in `root` as one entry keyed `.`.
pub fn folders(root: &Path) -> Vec<ModelFolder> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(root) else { return out };
    let mut dirs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_dir() && p.join(MODEL_FILE).exists()).collect();
    dirs.sort();
    let summarize = |path: &Path, files: Vec<SnapshotFile>, key: String, model: Option<String>| ModelFolder {
        key,
        path: path.to_path_buf(),
        model,
        snapshots: files.len(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        last_used: files.iter().map(|f| f.used).max(),
    };
    for d in dirs {
        let files: Vec<SnapshotFile> = snapshot_files(&d).into_iter().filter(|f| f.path.parent() == Some(d.as_path())).collect();
        let model = std::fs::read_to_string(d.join(MODEL_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["model"].as_str().map(str::to_string));
        let key = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.push(summarize(&d, files, key, model));
    }
    let top: Vec<SnapshotFile> = snapshot_files(root).into_iter().filter(|f| f.path.parent() == Some(root)).collect();
    if !top.is_empty() {
        out.push(summarize(root, top, ".".into(), None));
    }
    out
}

/// Remove the folders whose key starts with `which` or whose model path
/// contains it; returns what was removed. Refuses an empty pattern.
pub fn remove_matching(root: &Path, which: &str) -> Result<Vec<ModelFolder>, String> {
    if which.trim().is_empty() {
        return Err("give a folder key or part of a model path (see `kvserve cache ls`)".into());
    }
    let matched: Vec<ModelFolder> =
        folders(root).into_iter().filter(|f| f.key != "." && (f.key.starts_with(which) || f.model.as_deref().is_some_and(|m| m.contains(which)))).collect();
    if matched.is_empty() {
        return Err(format!("no model folder in {} matches '{which}' (see `kvserve cache ls`)", root.display()));
    }
    for f in &matched {
        std::fs::remove_dir_all(&f.path).map_err(|e| format!("{}: {e}", f.path.display()))?;
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn file(p: &Path, bytes: usize, age_s: u64) {
        std::fs::write(p, vec![0u8; bytes]).unwrap();
        let f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s)).unwrap();
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_new_one_stays() {
        let root = std::env::temp_dir().join(format!("kvserve-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (a, b) = (root.join("aaaa"), root.join("bbbb"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        write_model_file(&a, Path::new("/models/A"), "aaaa0000");
        write_model_file(&b, Path::new("/models/B"), "bbbb0000");
        let name = |c: char| format!("{}.safetensors", c.to_string().repeat(24));
        file(&a.join(name('1')), 1000, 500);
        file(&b.join(name('2')), 1000, 400);
        file(&a.join(name('3')), 1000, 300);
        file(&b.join(name('4')), 1000, 200);
        // The newest file is older than one read just now.
        file(&a.join(name('e')), 1000, 10_000);
        touch(&a.join(name('1')));
        std::fs::write(a.join("notes.txt"), "not a snapshot").unwrap();
        // A model's own weights, older than everything, in the root and in a model folder: never touched.
        file(&root.join("model.safetensors"), 5000, 99_999);
        file(&a.join("model-00001-of-00002.safetensors"), 5000, 99_999);
        // A folder without model.json is not a model folder.
        std::fs::create_dir_all(root.join("other")).unwrap();
        file(&root.join("other").join(name('5')), 1000, 99_999);
        assert_eq!(snapshot_files(&root).len(), 5);
        assert!(enforce(&root, 10_000, None).is_empty(), "within the bound: nothing deleted");
        let deleted = enforce(&root, 2500, Some(&a.join(name('e'))));
        assert_eq!(deleted, [b.join(name('2')), a.join(name('3')), b.join(name('4'))]);
        let mut left: Vec<String> = snapshot_files(&root).iter().map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, [name('1'), name('e')], "the file read last and the one just written stay");
        assert!(a.join("notes.txt").exists() && root.join("model.safetensors").exists() && a.join("model-00001-of-00002.safetensors").exists());
        assert!(root.join("other").join(name('5')).exists());

        let fs = folders(&root);
        assert_eq!(fs.len(), 2);
        assert_eq!((fs[0].key.as_str(), fs[0].model.as_deref(), fs[0].snapshots, fs[0].bytes), ("aaaa", Some("/models/A"), 2, 2000));
        assert_eq!((fs[1].key.as_str(), fs[1].snapshots), ("bbbb", 0));
        assert!(remove_matching(&root, "").is_err());
        assert!(remove_matching(&root, "zzz").unwrap_err().contains("no model folder"));
        let gone = remove_matching(&root, "/models/B").unwrap();
        assert_eq!(gone.len(), 1);
        assert!(!b.exists() && a.exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_default_bound_is_a_share_of_the_free_space() {
        let b = default_budget(&std::env::temp_dir().join("does/not/exist/yet"));
        assert!(b > 0 && b <= MAX_DEFAULT_BYTES, "{b}");
        let free = crate::mlx::os::free_disk_bytes(&std::env::temp_dir()).unwrap();
        let want = ((free as f64 * FREE_SHARE) as u64).min(MAX_DEFAULT_BYTES);
        // Free space moves as other processes write: within 1%.
        assert!(b.abs_diff(want) <= want / 100 + 1, "{b} vs {want}");
    }
}
