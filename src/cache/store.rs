//! Snapshots on disk (`--cache-dir`): one safetensors file per snapshot with
//! the token ids and the model's fingerprint in its metadata. Files are
//! written by a background thread, atomically (a temporary name, then a
//! rename), and read back by MLX on the engine thread. A file from another
//! model, a truncated or corrupt file, or a failed write is skipped with a
//! warning: a miss, never a wrong answer.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use mlx_rs::{Array, Dtype};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::kv::LayerKv;
use crate::mlx::MlxError;

const FORMAT: &str = "kvserve-kv-1";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error(transparent)]
    Mlx(#[from] MlxError),
}

fn file_err(path: &Path, message: impl Into<String>) -> StoreError {
    StoreError::File { file: path.display().to_string(), message: message.into() }
}

/// A fingerprint of what a KV state depends on: the weights (name, size and
/// first MiB of each file), the config, the tokenizer and the chat template.
pub fn fingerprint(files: &[PathBuf], template: Option<&str>) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        if let Ok(meta) = std::fs::metadata(f) {
            h.update(meta.len().to_le_bytes());
        }
        if let Ok(file) = std::fs::File::open(f) {
            let mut head = Vec::with_capacity(1 << 20);
            let _ = file.take(1 << 20).read_to_end(&mut head);
            h.update(&head);
        }
    }
    h.update(template.unwrap_or("").as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A snapshot found on disk: its file and the tokens it holds.
pub struct OnDisk {
    pub path: PathBuf,
    pub tokens: Vec<u32>,
}

/// Read a safetensors header (8-byte length, then JSON) without the data.
fn read_header(path: &Path) -> Result<(Value, u64), String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| "truncated header".to_string())?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 || 8 + n > size {
        return Err("truncated or invalid header".into());
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(|_| "truncated header".to_string())?;
    let header: Value = serde_json::from_slice(&buf).map_err(|e| format!("header is not JSON: {e}"))?;
    // Every tensor's data must lie inside the file.
    let data = size - 8 - n;
    for (k, v) in header.as_object().into_iter().flatten() {
        if k == "__metadata__" {
            continue;
        }
        let end = v["data_offsets"][1].as_u64().ok_or(format!("tensor {k} has no data_offsets"))?;
        if end > data {
            return Err(format!("tensor {k} ends at byte {end} of {data}: the file is truncated"));
        }
    }
    Ok((header, n))
}

/// The snapshot files in `dir` made for this `fingerprint`; others are
/// skipped with a warning (returned as text, one per file).
pub fn scan(dir: &Path, fingerprint: &str) -> (Vec<OnDisk>, Vec<String>) {
    let mut found = vec![];
    let mut warnings = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else { return (found, warnings) };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let meta = match read_header(&path) {
            Ok((h, _)) => h["__metadata__"].clone(),
            Err(e) => {
                warnings.push(format!("{}: skipped: {e}", path.display()));
                continue;
            }
        };
        if meta["format"].as_str() != Some(FORMAT) {
            warnings.push(format!("{}: skipped: not a kvserve snapshot", path.display()));
            continue;
        }
        if meta["fingerprint"].as_str() != Some(fingerprint) {
            warnings.push(format!("{}: skipped: made for another model, tokenizer or template", path.display()));
            continue;
        }
        let tokens: Option<Vec<u32>> = meta["tokens"].as_str().and_then(|t| serde_json::from_str(t).ok());
        match tokens {
            Some(tokens) if !tokens.is_empty() => found.push(OnDisk { path, tokens }),
            _ => warnings.push(format!("{}: skipped: no token ids", path.display())),
        }
    }
    (found, warnings)
}

/// Read a snapshot back; checks it holds `layers` layers of `tokens` tokens.
pub fn load(path: &Path, layers: usize, tokens: usize, fingerprint: &str) -> Result<Vec<LayerKv>, StoreError> {
    let (header, _) = read_header(path).map_err(|e| file_err(path, e))?;
    let meta = &header["__metadata__"];
    if meta["fingerprint"].as_str() != Some(fingerprint) {
        return Err(file_err(path, "made for another model"));
    }
    let dtype = match meta["dtype"].as_str() {
        Some("float16") => Dtype::Float16,
        Some("bfloat16") => Dtype::Bfloat16,
        _ => Dtype::Float32,
    };
    let arrays = Array::load_safetensors(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let mut out = Vec::with_capacity(layers);
    for i in 0..layers {
        let get = |k: &str| -> Result<Array, StoreError> {
            let a = arrays.get(&format!("{i}.{k}")).ok_or_else(|| file_err(path, format!("layer {i} has no {k}")))?;
            if a.ndim() != 4 || a.shape()[2] as usize != tokens {
                return Err(file_err(path, format!("layer {i} {k} has shape {:?}, expected {tokens} tokens", a.shape())));
            }
            Ok(a.as_dtype(dtype).map_err(MlxError::from)?)
        };
        let (k, v) = (get("keys")?, get("values")?);
        mlx_rs::transforms::eval([&k, &v]).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
        out.push(LayerKv::from_state(k, v));
    }
    if arrays.len() != 2 * layers {
        return Err(file_err(path, format!("holds {} tensors, expected {}", arrays.len(), 2 * layers)));
    }
    Ok(out)
}

/// A file to write: its header and data, ready to go to disk.
struct PendingWrite {
    path: PathBuf,
    bytes: Vec<u8>,
}

/// Writes snapshot files on a background thread.
pub struct Store {
    pub dir: PathBuf,
    pub fingerprint: String,
    tx: mpsc::Sender<PendingWrite>,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    queued: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Use `dir` (created if missing) for snapshots of the model with `fingerprint`.
    pub fn open(dir: &Path, fingerprint: String) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, format!("cannot create: {e}")))?;
        let (tx, rx) = mpsc::channel::<PendingWrite>();
        let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = written.clone();
        std::thread::Builder::new()
            .name("kv-store".into())
            .spawn(move || {
                for w in rx {
                    let tmp = w.path.with_extension("partial");
                    let result = std::fs::File::create(&tmp).and_then(|mut f| {
                        f.write_all(&w.bytes)?;
                        f.sync_all()
                    });
                    match result.and_then(|_| std::fs::rename(&tmp, &w.path)) {
                        Ok(()) => {}
                        Err(e) => {
                            let _ = std::fs::remove_file(&tmp);
                            tracing::warn!("{}: snapshot not written: {e}", w.path.display());
                        }
                    }
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
            .map_err(|e| file_err(dir, format!("cannot start the writer thread: {e}")))?;
        Ok(Store { dir: dir.to_path_buf(), fingerprint, tx, written, queued: 0.into() })
    }

    /// Wait until every queued file is written (or has failed).
    pub fn flush(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        while self.written.load(SeqCst) < self.queued.load(SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The file a snapshot of `tokens` goes to.
    pub fn path_for(&self, tokens: &[u32]) -> PathBuf {
        let mut h = Sha256::new();
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        let name: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.safetensors"))
    }

    /// Queue `layers` (holding `tokens`) for writing; the copy out of MLX is
    /// made here, the disk write on the writer thread. Returns the file path.
    pub fn save(&self, tokens: &[u32], layers: &[LayerKv]) -> Result<PathBuf, StoreError> {
        let path = self.path_for(tokens);
        let mut tensors: BTreeMap<String, (Vec<i32>, Vec<u8>)> = BTreeMap::new();
        let mut dtype = Dtype::Float32;
        for (i, l) in layers.iter().enumerate() {
            let (k, v) = l.state().ok_or_else(|| file_err(&path, format!("layer {i} is empty")))?;
            dtype = k.dtype();
            for (name, a) in [("keys", k), ("values", v)] {
                let a = a.contiguous().and_then(|a| a.as_dtype(Dtype::Float32)).map_err(MlxError::from)?;
                a.eval().map_err(MlxError::from)?;
                // safetensors is little-endian, as every platform MLX runs on.
                let data: Vec<u8> = bytemuck::cast_slice::<f32, u8>(a.as_slice::<f32>()).to_vec();
                tensors.insert(format!("{i}.{name}"), (a.shape().to_vec(), data));
            }
        }
        let dtype_name = match dtype {
            Dtype::Float16 => "float16",
            Dtype::Bfloat16 => "bfloat16",
            _ => "float32",
        };
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            json!({
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "dtype": dtype_name,
                "tokens": serde_json::to_string(tokens).expect("ids serialize"),
            }),
        );
        let mut offset = 0usize;
        for (name, (shape, data)) in &tensors {
            header.insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + data.len()]}));
            offset += data.len();
        }
        let mut h = serde_json::to_vec(&Value::Object(header)).expect("header serializes");
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut bytes = Vec::with_capacity(8 + h.len() + offset);
        bytes.extend((h.len() as u64).to_le_bytes());
        bytes.extend(h);
        for (_, data) in tensors.values() {
            bytes.extend(data);
        }
        self.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.tx
            .send(PendingWrite { path: path.clone(), bytes })
            .map_err(|_| file_err(&path, "the writer thread has stopped"))?;
        Ok(path)
    }
}
