//! Snapshots on disk (`--cache-dir`): one safetensors file per snapshot with
//! the token ids, the model's fingerprint and a checksum in its metadata.
//! Files are written by a background thread, atomically (a temporary
//! `.partial` name, then a rename), and read back on the engine thread. A file
//! from another model, a truncated, damaged or foreign file, or a failed write
//! (a full or read-only disk) is skipped with a warning: a miss, never a wrong
//! answer, never a panic.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mlx_rs::{Array, Dtype};
use parking_lot::{Condvar, Mutex};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::kv::LayerKv;
use crate::mlx::MlxError;

/// The file format; files of any other format are skipped.
const FORMAT: &str = "kvserve-kv-3";
/// The largest header read (the token list dominates: under 12 bytes a token).
const MAX_HEADER: u64 = 64 << 20;
/// Writes waiting at most; a snapshot offered beyond that is not written
/// (memory for copies waiting on a slow disk stays bounded).
const MAX_PENDING: u64 = 8;
/// [`Store::flush`] gives up when no write has finished for this long (a hung disk).
const FLUSH_STALL: Duration = Duration::from_secs(30);
/// The ending of files being written (and of leftovers of interrupted writes).
const PARTIAL: &str = "partial";

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
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A snapshot file's name (24 hex digits, the hash of its tokens) as the 3
/// words the other ranks of a pipeline name their shares by; `None` for any
/// other name.
pub fn key_of(path: &Path) -> Option<[u32; 3]> {
    let stem = path.file_stem()?.to_str()?;
    if !super::disk::is_snapshot(path) {
        return None;
    }
    let byte = |i: usize| u8::from_str_radix(&stem[2 * i..2 * i + 2], 16).ok();
    let word = |w: usize| -> Option<u32> { Some(u32::from_le_bytes([byte(4 * w)?, byte(4 * w + 1)?, byte(4 * w + 2)?, byte(4 * w + 3)?])) };
    Some([word(0)?, word(1)?, word(2)?])
}

/// Delete a snapshot file rank 0 no longer indexes, and the other ranks'
/// shares of it ([`forget_shares`]).
pub fn delete(path: &Path) {
    let _ = std::fs::remove_file(path);
    forget_shares(path);
}

/// Rank 0 of a pipeline deleted the snapshot file `path`: the other ranks'
/// shares of it go too (with the next message). Nothing elsewhere.
pub fn forget_shares(path: &Path) {
    if let (true, Some(key)) = (crate::cache::kv::remote::enabled(), key_of(path)) {
        crate::cache::kv::remote::unlink(key);
    }
}

/// A snapshot found on disk: its file and the tokens it holds.
pub struct OnDisk {
    pub path: PathBuf,
    pub tokens: Vec<u32>,
}

/// What a tensor of a snapshot file holds: an attention layer's keys or
/// values (`[B, kv_heads, tokens, head_dim]` in the file's dtype), or a
/// linear-attention layer's recurrent state (the convolution's last inputs,
/// `[B, kernel - 1, conv_dim]`, and the state matrices, `[B, heads, v_dim,
/// k_dim]`, each in its own dtype, exact as computed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Keys,
    Values,
    Conv,
    State,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Keys => "keys",
            Kind::Values => "values",
            Kind::Conv => "conv",
            Kind::State => "state",
        }
    }
}

/// One tensor of a snapshot file, at bytes `start..end` of the data section.
#[derive(Debug, Clone, PartialEq)]
struct Tensor {
    layer: usize,
    kind: Kind,
    dtype: Elem,
    shape: Vec<i32>,
    start: u64,
    end: u64,
}

impl Tensor {
    fn name(&self) -> String {
        format!("{}.{}", self.layer, self.kind.name())
    }
}

/// A snapshot file's header, every field checked against the others and
/// against the file's size (see [`parse_header`]).
#[derive(Debug)]
struct Header {
    fingerprint: String,
    /// The dtype of every tensor (the KV state's, `float16` as kvserve keeps it).
    dtype: String,
    tokens: Vec<u32>,
    checksum: String,
    /// In data order; they tile the data section exactly.
    tensors: Vec<Tensor>,
    layers: usize,
    /// Bytes before the data section (8 + the header's length).
    data_start: u64,
    data_len: u64,
}

/// `bytes` (a whole number of `T`s, any alignment) as `T`s.
fn pod_vec<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut v = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
    v
}

/// The element types snapshot files hold, with their names: the file's
/// metadata's (`float16`), safetensors' (`F16`) and MLX's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F16,
    BF16,
    F32,
}

impl Elem {
    const ALL: [Elem; 3] = [Elem::F16, Elem::BF16, Elem::F32];

    fn name(self) -> &'static str {
        match self {
            Elem::F16 => "float16",
            Elem::BF16 => "bfloat16",
            Elem::F32 => "float32",
        }
    }

    fn safetensors(self) -> &'static str {
        match self {
            Elem::F16 => "F16",
            Elem::BF16 => "BF16",
            Elem::F32 => "F32",
        }
    }

    fn size(self) -> u64 {
        match self {
            Elem::F16 | Elem::BF16 => 2,
            Elem::F32 => 4,
        }
    }

    fn from_name(name: &str) -> Option<Elem> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }

    fn from_safetensors(name: &str) -> Option<Elem> {
        Self::ALL.into_iter().find(|e| e.safetensors() == name)
    }

    /// How an array of `dtype` is written (anything but f16/bf16 as f32).
    fn of(dtype: Dtype) -> Elem {
        match dtype {
            Dtype::Float16 => Elem::F16,
            Dtype::Bfloat16 => Elem::BF16,
            _ => Elem::F32,
        }
    }
}

/// The checksum over everything that decides what a snapshot means: its
/// metadata, the layout of its tensors, and their bytes.
fn checksum(fingerprint: &str, dtype: &str, tokens: &[u32], tensors: &[Tensor], data: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for s in [FORMAT, fingerprint, dtype] {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    h.update((tokens.len() as u64).to_le_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    for t in tensors {
        let name = t.name();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        for d in &t.shape {
            h.update(d.to_le_bytes());
        }
        // A recurrent state's own dtype (keys and values have the file's, hashed above).
        if matches!(t.kind, Kind::Conv | Kind::State) {
            h.update(t.dtype.name().as_bytes());
        }
        h.update(t.start.to_le_bytes());
        h.update(t.end.to_le_bytes());
    }
    for d in data {
        h.update(d);
    }
    hex(&h.finalize())
}

/// `n` as a count of things in an `i32` shape dimension (at least 1).
fn dim(v: &Value) -> Option<i32> {
    v.as_u64().filter(|&d| d >= 1).and_then(|d| i32::try_from(d).ok())
}

/// Check a header (the JSON after the 8-byte length) of a file of
/// `file_size` bytes whose header is `header_len` bytes long. Everything the
/// reader later indexes or sizes by is checked here.
fn parse_header(json: &[u8], header_len: u64, file_size: u64) -> Result<Header, String> {
    let header: Value = serde_json::from_slice(json).map_err(|e| format!("the header is not JSON: {e}"))?;
    let Value::Object(header) = header else { return Err("the header is not a JSON object".into()) };
    let meta = header.get("__metadata__").and_then(Value::as_object).ok_or("no __metadata__: not a kvserve snapshot")?;
    let text = |k: &str| meta.get(k).and_then(Value::as_str).ok_or(format!("__metadata__.{k} is missing"));
    let format = meta.get("format").and_then(Value::as_str).unwrap_or("none");
    if format != FORMAT {
        return Err(format!("not a kvserve snapshot of this version (format {format:?}, expected {FORMAT:?})"));
    }
    let fingerprint = text("fingerprint")?.to_string();
    let dtype = text("dtype")?.to_string();
    let file_elem = Elem::from_name(&dtype).ok_or(format!("unknown dtype {dtype:?}"))?;
    let tokens: Vec<u32> = serde_json::from_str(text("tokens")?).map_err(|e| format!("the token ids do not parse: {e}"))?;
    if tokens.is_empty() {
        return Err("no token ids".into());
    }
    let n_tokens = i32::try_from(tokens.len()).map_err(|_| "too many token ids".to_string())?;
    let checksum = text("checksum")?.to_string();
    if checksum.len() != 64 || !checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the checksum is not a SHA-256".into());
    }

    let data_start = 8u64.checked_add(header_len).ok_or("the header length overflows")?;
    let data_len = file_size.checked_sub(data_start).ok_or("the header runs past the end of the file")?;
    let mut tensors = Vec::with_capacity(header.len().saturating_sub(1));
    for (name, v) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let (layer, kind) = name.split_once('.').ok_or(format!("unexpected tensor {name:?}"))?;
        let layer: usize = layer.parse().map_err(|_| format!("unexpected tensor {name:?}"))?;
        let kind = match kind {
            "keys" => Kind::Keys,
            "values" => Kind::Values,
            "conv" => Kind::Conv,
            "state" => Kind::State,
            _ => return Err(format!("unexpected tensor {name:?}")),
        };
        let kv = matches!(kind, Kind::Keys | Kind::Values);
        // Keys and values are in the file's dtype; a recurrent state in its own.
        let tdtype = match v["dtype"].as_str().and_then(Elem::from_safetensors) {
            Some(e) if !kv || e == file_elem => e,
            _ if kv => return Err(format!("tensor {name} has dtype {}, expected {} (the file's {dtype})", v["dtype"], file_elem.safetensors())),
            _ => return Err(format!("tensor {name} has dtype {}, expected F16, BF16 or F32", v["dtype"])),
        };
        let rank = if kind == Kind::Conv { 3 } else { 4 };
        let shape = match v["shape"].as_array().map(|s| s.iter().map(dim).collect::<Option<Vec<i32>>>()) {
            Some(Some(s)) if s.len() == rank => s,
            _ => return Err(format!("tensor {name} has shape {}, expected {rank} positive dimensions", v["shape"])),
        };
        if kv && shape[2] != n_tokens {
            return Err(format!("tensor {name} holds {} tokens; the file lists {n_tokens}", shape[2]));
        }
        let (start, end) = match v["data_offsets"].as_array().map(Vec::as_slice) {
            Some([s, e]) => (s.as_u64(), e.as_u64()),
            _ => (None, None),
        };
        let (Some(start), Some(end)) = (start, end) else {
            return Err(format!("tensor {name} has data_offsets {}, expected two byte offsets", v["data_offsets"]));
        };
        // MLX sizes arrays with i32 element counts.
        let elements = shape.iter().try_fold(1i32, |n, &d| n.checked_mul(d)).ok_or(format!("tensor {name} has shape {shape:?}: too large"))?;
        let bytes = u64::try_from(elements).ok().and_then(|n| n.checked_mul(tdtype.size())).ok_or(format!("tensor {name} is too large"))?;
        if end.checked_sub(start) != Some(bytes) {
            return Err(format!("tensor {name} has data_offsets [{start}, {end}] for {bytes} bytes of shape {shape:?}"));
        }
        if end > data_len {
            return Err(format!("tensor {name} ends at byte {end} of {data_len}: the file is truncated"));
        }
        tensors.push(Tensor { layer, kind, dtype: tdtype, shape, start, end });
    }
    // The data section is exactly the tensors, back to back, in order.
    tensors.sort_by_key(|t| t.start);
    let mut at = 0u64;
    for t in &tensors {
        if t.start != at {
            return Err(format!("tensor {} starts at byte {}, expected {at}: the data overlaps or has gaps", t.name(), t.start));
        }
        at = t.end;
    }
    if at != data_len {
        return Err(format!("the tensors cover {at} bytes of {data_len}: the file has bytes after the last tensor"));
    }
    // Two tensors for each layer 0..layers: keys and values agreeing in
    // batch, heads and tokens, or a recurrent state's conv and state.
    let layers = tensors.len() / 2;
    if layers == 0 {
        return Err("the file holds no layers".into());
    }
    let mut by_name: BTreeMap<(usize, Kind), &Tensor> = BTreeMap::new();
    for t in &tensors {
        if t.layer >= layers || by_name.insert((t.layer, t.kind), t).is_some() {
            return Err(format!("tensor {} does not fit {layers} layers of keys and values", t.name()));
        }
    }
    if by_name.len() != 2 * layers {
        return Err(format!("{} tensors for {layers} layers", tensors.len()));
    }
    for i in 0..layers {
        match (by_name.get(&(i, Kind::Keys)), by_name.get(&(i, Kind::Values)), by_name.get(&(i, Kind::Conv)), by_name.get(&(i, Kind::State))) {
            (Some(k), Some(v), None, None) => {
                if k.shape[..3] != v.shape[..3] {
                    return Err(format!("layer {i}: keys {:?} and values {:?} disagree", k.shape, v.shape));
                }
            }
            (None, None, Some(c), Some(st)) => {
                if c.shape[0] != st.shape[0] {
                    return Err(format!("layer {i}: conv {:?} and state {:?} disagree", c.shape, st.shape));
                }
            }
            _ => return Err(format!("layer {i} holds neither keys and values nor a recurrent state")),
        }
    }
    Ok(Header { fingerprint, dtype, tokens, checksum, tensors, layers, data_start, data_len })
}

/// Read and check a snapshot's header from `f` (at its start) without the data.
fn read_header(f: &mut std::fs::File) -> Result<Header, String> {
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let size = meta.len();
    if size == 0 {
        return Err("the file is empty".into());
    }
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| format!("the file is {size} bytes: too short for a header"))?;
    let n = u64::from_le_bytes(len);
    // The size was read before the length: the file may have changed since.
    let room = size.saturating_sub(8);
    if n == 0 || n > MAX_HEADER || n > room {
        return Err(format!("the header claims {n} bytes; the file has {room} after the length (truncated or not a snapshot)"));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(|e| format!("cannot read the header: {e}"))?;
    parse_header(&buf, n, size)
}

fn open_header(path: &Path) -> Result<(std::fs::File, Header), String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let h = read_header(&mut f)?;
    Ok((f, h))
}

fn is_partial(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some(PARTIAL)
}

/// Where a snapshot file is written before its rename: a name of this
/// process's own (`<name>.<pid>.partial`), so two servers sharing a folder
/// never write into one file.
fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension(format!("{}.{PARTIAL}", std::process::id()))
}

/// A `.partial` file another live process is writing now.
fn partial_of_live_process(path: &Path) -> bool {
    let pid = path.file_stem().and_then(|s| Path::new(s).extension()).and_then(|p| p.to_str()).and_then(|p| p.parse::<u32>().ok());
    pid.is_some_and(|pid| pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists())
}

/// The snapshot files in `dir` made for this `fingerprint`; others are
/// skipped with a warning (returned as text, one per file).
pub fn scan(dir: &Path, fingerprint: &str) -> (Vec<OnDisk>, Vec<String>) {
    let mut found = vec![];
    let mut warnings = vec![];
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            warnings.push(format!("{}: cannot list the cache folder: {e}", dir.display()));
            return (found, warnings);
        }
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if is_partial(&path) {
            warnings.push(format!("{}: skipped: an unfinished write (the server stopped while writing it)", path.display()));
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        match open_header(&path) {
            Ok((_, h)) if h.fingerprint != fingerprint => {
                warnings.push(format!("{}: skipped: made for another model, tokenizer or template", path.display()));
            }
            Ok((_, h)) => found.push(OnDisk { path, tokens: h.tokens }),
            Err(e) => warnings.push(format!("{}: skipped: {e}", path.display())),
        }
    }
    (found, warnings)
}

/// Read a snapshot back; checks it is this model's, holds `layers` layers of
/// `tokens` tokens, and matches its checksum.
pub fn load(path: &Path, layers: usize, tokens: usize, fingerprint: &str) -> Result<Vec<LayerKv>, StoreError> {
    let (mut f, h) = open_header(path).map_err(|e| file_err(path, e))?;
    if h.fingerprint != fingerprint {
        return Err(file_err(path, "made for another model, tokenizer or template"));
    }
    if h.layers != layers {
        return Err(file_err(path, format!("holds {} layers, the model has {layers}", h.layers)));
    }
    if h.tokens.len() != tokens {
        return Err(file_err(path, format!("holds {} tokens, expected {tokens}", h.tokens.len())));
    }
    // The tensors tile the data section (checked by parse_header).
    let n = usize::try_from(h.data_len).map_err(|_| file_err(path, "too large"))?;
    let mut data = vec![0u8; n];
    f.read_exact(&mut data)
        .map_err(|e| file_err(path, format!("cannot read {} bytes of data after byte {}: {e}", h.data_len, h.data_start)))?;
    if checksum(&h.fingerprint, &h.dtype, &h.tokens, &h.tensors, &[&data]) != h.checksum {
        return Err(file_err(path, "the checksum does not match: the file is damaged"));
    }
    let array = |t: &Tensor| -> Result<Array, StoreError> {
        // In bounds and a whole number of elements: checked by parse_header.
        let bytes = &data[t.start as usize..t.end as usize];
        Ok(match t.dtype {
            Elem::F16 => Array::from_slice(&pod_vec::<half::f16>(bytes), &t.shape),
            Elem::BF16 => Array::from_slice(&pod_vec::<half::bf16>(bytes), &t.shape),
            Elem::F32 => Array::from_slice(&pod_vec::<f32>(bytes), &t.shape),
        })
    };
    let mut arrays: BTreeMap<(usize, Kind), Array> = BTreeMap::new();
    for t in &h.tensors {
        arrays.insert((t.layer, t.kind), array(t)?);
    }
    let mut out = Vec::with_capacity(layers);
    for i in 0..layers {
        // parse_header checked that one pair or the other exists for every layer.
        let kv = (arrays.remove(&(i, Kind::Keys)), arrays.remove(&(i, Kind::Values)));
        let rec = (arrays.remove(&(i, Kind::Conv)), arrays.remove(&(i, Kind::State)));
        let layer = match (kv, rec) {
            ((Some(k), Some(v)), _) => {
                mlx_rs::transforms::eval([&k, &v]).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
                LayerKv::from_state(k, v)?
            }
            (_, (Some(c), Some(s))) => {
                mlx_rs::transforms::eval([&c, &s]).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
                LayerKv::from_recurrent(c, s, tokens as i32)
            }
            _ => return Err(file_err(path, format!("layer {i} is missing"))),
        };
        out.push(layer);
    }
    Ok(out)
}

/// An f16, bf16 or f32 array's data as bytes (evaluated here); `None` for
/// another dtype or a layout that is not row-contiguous.
fn bytes_of(a: &Array) -> Option<&[u8]> {
    match a.dtype() {
        Dtype::Float16 => a.try_as_slice::<half::f16>().ok().map(bytemuck::cast_slice),
        Dtype::Bfloat16 => a.try_as_slice::<half::bf16>().ok().map(bytemuck::cast_slice),
        Dtype::Float32 => a.try_as_slice::<f32>().ok().map(bytemuck::cast_slice),
        _ => None,
    }
}

/// The first `len` tokens of a KV buffer `[b, heads, capacity, dim]` as
/// `[b, heads, len, dim]` bytes, one copy; `None` where [`bytes_of`] gives
/// nothing (the caller slices it through MLX instead).
fn first_tokens(buf: &Array, len: i32) -> Option<(Elem, Vec<i32>, Vec<u8>)> {
    let shape = buf.shape().to_vec();
    if shape.len() != 4 || len < 0 || len > shape[2] {
        return None;
    }
    let (heads, cap) = ((shape[0] * shape[1]) as usize, shape[2] as usize);
    let bytes = bytes_of(buf).filter(|_| heads * cap > 0)?;
    let row = bytes.len() / (heads * cap);
    let take = len as usize * row;
    let mut out = Vec::with_capacity(heads * take);
    for h in 0..heads {
        out.extend_from_slice(&bytes[h * cap * row..h * cap * row + take]);
    }
    Some((Elem::of(buf.dtype()), vec![shape[0], shape[1], len, shape[3]], out))
}

/// A snapshot to write, copied out of MLX; the writer thread hashes it and
/// lays out the file.
struct PendingWrite {
    path: PathBuf,
    fingerprint: String,
    dtype: &'static str,
    tokens: Vec<u32>,
    /// In data order, with `data` (one buffer per tensor).
    tensors: Vec<Tensor>,
    data: Vec<Vec<u8>>,
}

impl PendingWrite {
    /// The safetensors header: 8-byte length, then JSON padded to 8 bytes.
    fn header(&self) -> Vec<u8> {
        let slices: Vec<&[u8]> = self.data.iter().map(Vec::as_slice).collect();
        let sum = checksum(&self.fingerprint, self.dtype, &self.tokens, &self.tensors, &slices);
        let mut header = Map::new();
        header.insert(
            "__metadata__".into(),
            json!({
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "dtype": self.dtype,
                "tokens": serde_json::to_string(&self.tokens).expect("ids serialize"),
                "checksum": sum,
            }),
        );
        for t in &self.tensors {
            header.insert(t.name(), json!({"dtype": t.dtype.safetensors(), "shape": t.shape, "data_offsets": [t.start, t.end]}));
        }
        let mut h = serde_json::to_vec(&Value::Object(header)).expect("header serializes");
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out
    }
}

enum Job {
    Write(PendingWrite),
    /// Tests: panic inside one write to this path, after its partial file
    /// is created (the writer must survive it and clean up).
    #[cfg(test)]
    PanicInWrite(PathBuf),
    /// Tests: end the writer thread as a crash would.
    #[cfg(test)]
    Crash,
}

/// What the writer thread has done, shared with [`Store`].
#[derive(Default)]
struct Progress {
    queued: u64,
    /// Writes finished, written or failed.
    done: u64,
    failed: u64,
    /// False once the writer thread has ended, for whatever reason.
    alive: bool,
}

#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
    /// After each write, snapshot files under this root are kept within this many bytes.
    bound: Mutex<Option<(PathBuf, u64)>>,
    /// Files known complete on disk: written by this store (or found when it
    /// opened), less those the bound deleted.
    written: Mutex<std::collections::HashSet<PathBuf>>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock());
        self.changed.notify_all();
    }
}

/// Held by the writer thread: marks it gone when the thread ends, even by a panic.
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.update(|p| p.alive = false);
    }
}

/// How [`Store::flush`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Every queued file was written or has failed.
    All,
    /// The writer thread is gone; `unwritten` files never will be.
    WriterGone { unwritten: u64 },
    /// No write finished for the stall limit (a hung disk).
    Stalled { unwritten: u64 },
}

/// Write the snapshot atomically: a `.partial` file, synced, then renamed.
fn write_atomically(w: &PendingWrite, tmp: &Path) -> std::io::Result<()> {
    let header = w.header();
    let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
    f.write_all(&header)?;
    for d in &w.data {
        f.write_all(d)?;
    }
    let f = f.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, &w.path)
}

/// The writer thread's loop: one job at a time; a failed or panicking write
/// is counted, warned about (once per kind of failure in a row) and its
/// partial file removed.
fn writer(rx: mpsc::Receiver<Job>, shared: Arc<Shared>) {
    let _alive = Alive(shared.clone());
    // Hashing and writing a 12K-token snapshot (~280 MB) took a core for
    // about half a second and slowed the next warm turn from 0.4 to 0.9 s
    // on 2 cores: the writer yields to everything else.
    if !crate::mlx::os::make_this_thread_idle() {
        tracing::debug!("the snapshot writer runs at normal priority (no idle scheduling class here)");
    }
    let mut last_error: Option<String> = None;
    for job in rx {
        let (w, fail) = match job {
            Job::Write(w) => (w, false),
            #[cfg(test)]
            Job::PanicInWrite(path) => {
                let w = PendingWrite { path, fingerprint: String::new(), dtype: "float32", tokens: vec![], tensors: vec![], data: vec![] };
                (w, true)
            }
            #[cfg(test)]
            Job::Crash => panic!("kv-store writer crashed on purpose (test)"),
        };
        let tmp = tmp_path(&w.path);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if fail {
                std::fs::write(&tmp, b"half a snapshot")?;
                panic!("a write panicked on purpose (test)");
            }
            write_atomically(&w, &tmp)
        }));
        let result = match outcome {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(p) => Err(format!(
                "the write panicked: {}",
                p.downcast_ref::<&str>().copied().or(p.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
            )),
        };
        let failed = result.is_err();
        match result {
            Ok(()) => {
                if last_error.take().is_some() {
                    tracing::info!("snapshots are written to disk again");
                }
                shared.written.lock().insert(w.path.clone());
                if let Some((root, bytes)) = shared.bound.lock().clone() {
                    let deleted = super::disk::enforce(&root, bytes, Some(&w.path));
                    let mut written = shared.written.lock();
                    for d in deleted {
                        written.remove(&d);
                    }
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                // A full or read-only disk fails every write the same way: say it once.
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!("{}: snapshot not written: {e} (the cache works from memory; repeats of this are logged at debug level)", w.path.display());
                } else {
                    tracing::debug!("{}: snapshot not written: {e}", w.path.display());
                }
                last_error = Some(e);
            }
        }
        shared.update(|p| {
            p.done += 1;
            p.failed += u64::from(failed);
        });
    }
}

/// Writes snapshot files on a background thread.
pub struct Store {
    pub dir: PathBuf,
    pub fingerprint: String,
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl Store {
    /// Use `dir` (created if missing) for snapshots of the model with
    /// `fingerprint`; one server per folder. Leftovers of interrupted writes
    /// are removed. Fails when the folder cannot be created or written (a
    /// read-only disk); a full disk fails the writes later, each a warning.
    pub fn open(dir: &Path, fingerprint: String) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, format!("cannot create: {e}")))?;
        if let Ok(rd) = std::fs::read_dir(dir) {
            for path in rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_partial(p) && !partial_of_live_process(p)) {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::warn!("{}: removed an unfinished snapshot (the server stopped while writing it)", path.display()),
                    Err(e) => tracing::warn!("{}: an unfinished snapshot, cannot remove it: {e}", path.display()),
                }
            }
        }
        let probe = dir.join(format!(".write-test.{PARTIAL}"));
        let writable = std::fs::File::create(&probe).and_then(|mut f| f.write_all(b"kvserve")).and_then(|_| std::fs::remove_file(&probe));
        if let Err(e) = writable {
            let _ = std::fs::remove_file(&probe);
            return Err(file_err(dir, format!("cannot write snapshots here: {e}")));
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared::default());
        shared.progress.lock().alive = true;
        let for_writer = shared.clone();
        std::thread::Builder::new()
            .name("kv-store".into())
            .spawn(move || writer(rx, for_writer))
            .map_err(|e| file_err(dir, format!("cannot start the writer thread: {e}")))?;
        Ok(Store { dir: dir.to_path_buf(), fingerprint, tx, shared })
    }

    /// Wait until every queued file is written or has failed. Never hangs:
    /// returns, with a warning, when the writer thread is gone or no write
    /// has finished for 30 s.
    pub fn flush(&self) -> Flushed {
        self.flush_stalling_after(FLUSH_STALL)
    }

    /// [`flush`](Self::flush), giving up after `stall` without progress.
    pub fn flush_stalling_after(&self, stall: Duration) -> Flushed {
        let mut p = self.shared.progress.lock();
        let (mut seen, mut since) = (p.done, Instant::now());
        loop {
            let unwritten = p.queued.saturating_sub(p.done);
            if unwritten == 0 {
                return Flushed::All;
            }
            if !p.alive {
                tracing::warn!("{}: {unwritten} snapshots not written: the writer thread has stopped", self.dir.display());
                return Flushed::WriterGone { unwritten };
            }
            if p.done != seen {
                (seen, since) = (p.done, Instant::now());
            }
            let left = stall.saturating_sub(since.elapsed());
            if left.is_zero() {
                tracing::warn!("{}: {unwritten} snapshots not written: no write finished in {stall:?}", self.dir.display());
                return Flushed::Stalled { unwritten };
            }
            self.shared.changed.wait_for(&mut p, left);
        }
    }

    /// Keep the snapshot files under `root` (this folder, or the per-user
    /// root above it) within `bytes`, deleting the least recently used after
    /// each write; checked once now.
    pub fn bound_disk(&self, root: &Path, bytes: u64) {
        *self.shared.bound.lock() = Some((root.to_path_buf(), bytes));
        let deleted = super::disk::enforce(root, bytes, None);
        let mut written = self.shared.written.lock();
        for d in deleted {
            written.remove(&d);
        }
    }

    /// Count `path` as complete on disk (a file found when the folder was scanned).
    pub fn mark_written(&self, path: &Path) {
        self.shared.written.lock().insert(path.to_path_buf());
    }

    /// Whether `path` is complete on disk, as far as this store knows.
    pub fn is_written(&self, path: &Path) -> bool {
        self.shared.written.lock().contains(path)
    }

    /// Writes queued and not yet finished.
    pub fn pending(&self) -> u64 {
        let p = self.shared.progress.lock();
        p.queued.saturating_sub(p.done)
    }

    /// Writes that failed so far (a full or read-only disk, a panic).
    pub fn failed_writes(&self) -> u64 {
        self.shared.progress.lock().failed
    }

    /// The file a snapshot of `tokens` goes to.
    pub fn path_for(&self, tokens: &[u32]) -> PathBuf {
        let mut h = Sha256::new();
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        let name = hex(&h.finalize()[..12]);
        self.dir.join(format!("{name}.safetensors"))
    }

    /// The file named by `key` (see [`key_of`]) in this folder.
    pub fn path_for_key(&self, key: [u32; 3]) -> PathBuf {
        let bytes: Vec<u8> = key.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.dir.join(format!("{}.safetensors", hex(&bytes)))
    }

    /// Queue `layers` (holding `tokens`) for writing; the copy out of MLX is
    /// made here, the disk write on the writer thread. Returns the file path.
    pub fn save(&self, tokens: &[u32], layers: &[LayerKv]) -> Result<PathBuf, StoreError> {
        let path = self.path_for(tokens);
        {
            let p = self.shared.progress.lock();
            if !p.alive {
                return Err(file_err(&path, "the writer thread has stopped"));
            }
            if p.queued.saturating_sub(p.done) >= MAX_PENDING {
                return Err(file_err(&path, format!("{MAX_PENDING} snapshots already wait for the disk")));
            }
        }
        let mut tensors = vec![];
        let mut data: Vec<Vec<u8>> = vec![];
        let mut dtype = Dtype::Float32;
        let mut offset = 0u64;
        // The layers other ranks hold (the last entry, on rank 0 of a
        // pipeline): each writes its share, named as this file, once this
        // one is queued.
        let mut remote = None;
        for (i, l) in layers.iter().enumerate() {
            if let Some(id) = l.remote_id() {
                remote = Some(id);
                continue;
            }
            // Keys and values straight from the cache's buffers: each
            // head's first tokens, one copy (slicing them in MLX and making
            // that contiguous was a second, single-threaded one: 0.26 s of
            // the engine's time for a 12K-token SmolLM2 snapshot).
            let direct = match (l.recurrent(), l.buffers()) {
                (None, Some((kb, vb))) => first_tokens(kb, l.offset()).zip(first_tokens(vb, l.offset())).map(|kv| (kb.dtype(), kv)),
                _ => None,
            };
            let pieces = match direct {
                Some((kv_dtype, (k, v))) => {
                    dtype = kv_dtype;
                    vec![(Kind::Keys, k), (Kind::Values, v)]
                }
                None => {
                    let pair = match l.recurrent() {
                        Some((c, st)) => [(Kind::Conv, c.clone()), (Kind::State, st.clone())],
                        None => {
                            let (k, v) = l.state().ok_or_else(|| file_err(&path, format!("layer {i} is empty")))?;
                            dtype = k.dtype();
                            [(Kind::Keys, k), (Kind::Values, v)]
                        }
                    };
                    let mut pieces = Vec::with_capacity(2);
                    for (kind, a) in pair {
                        let a = match a.dtype() {
                            Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32 => a,
                            _ => a.as_dtype(Dtype::Float32).map_err(MlxError::from)?,
                        };
                        let a = a.contiguous().map_err(MlxError::from)?;
                        a.eval().map_err(MlxError::from)?;
                        // safetensors is little-endian, as every platform MLX runs on.
                        let bytes = bytes_of(&a).ok_or_else(|| file_err(&path, format!("layer {i}: no data after making it contiguous")))?.to_vec();
                        pieces.push((kind, (Elem::of(a.dtype()), a.shape().to_vec(), bytes)));
                    }
                    pieces
                }
            };
            for (kind, (tdtype, shape, bytes)) in pieces {
                let end = offset + bytes.len() as u64;
                tensors.push(Tensor { layer: i, kind, dtype: tdtype, shape, start: offset, end });
                offset = end;
                data.push(bytes);
            }
        }
        let w = PendingWrite { path: path.clone(), fingerprint: self.fingerprint.clone(), dtype: Elem::of(dtype).name(), tokens: tokens.to_vec(), tensors, data };
        self.send(Job::Write(w)).map_err(|e| file_err(&path, e))?;
        if let Some(id) = remote {
            crate::cache::kv::remote::save(id, tokens);
        }
        Ok(path)
    }

    /// Queue a job, counted for [`flush`](Self::flush).
    fn send(&self, job: Job) -> Result<(), &'static str> {
        let mut p = self.shared.progress.lock();
        p.queued += 1;
        if self.tx.send(job).is_err() {
            p.queued -= 1;
            return Err("the writer thread has stopped");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "test-fingerprint";
    const LAYERS: usize = 2;

    /// A file's name gives the 3 words the other ranks of a pipeline name
    /// their shares by, and those words give the same name back.
    #[test]
    fn snapshot_names_round_trip_through_their_key() {
        let dir = std::env::temp_dir().join(format!("kvserve-key-{}", std::process::id()));
        let store = Store::open(&dir, FP.into()).unwrap();
        for tokens in [vec![], vec![1u32], vec![5, 6, 7, 8, 9]] {
            let path = store.path_for(&tokens);
            let key = key_of(&path).expect("a snapshot file's name");
            assert_eq!(store.path_for_key(key), path);
        }
        assert_eq!(key_of(Path::new("/m/model.safetensors")), None);
        assert_eq!(key_of(Path::new("/m/0123456789abcdef01234567.json")), None);
        assert_eq!(key_of(Path::new("/m/0123456789abcdef01234567.safetensors")), Some([0x67452301, 0xefcdab89, 0x67452301]));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A fresh folder in the temporary directory, removed when dropped.
    struct Folder(PathBuf);

    impl std::ops::Deref for Folder {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn folder(name: &str) -> Folder {
        let d = std::env::temp_dir().join(format!("kvserve-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Folder(d)
    }

    /// `LAYERS` layers holding `n` tokens of distinct values.
    fn layers(n: i32, seed: f32) -> Vec<LayerKv> {
        (0..LAYERS)
            .map(|i| {
                let len = (2 * n * 4) as usize;
                let k: Vec<f32> = (0..len).map(|j| seed + i as f32 + j as f32 * 0.5).collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                LayerKv::from_state(Array::from_slice(&k, &[1, 2, n, 4]), Array::from_slice(&v, &[1, 2, n, 4])).unwrap()
            })
            .collect()
    }

    fn values(l: &[LayerKv]) -> Vec<Vec<f32>> {
        l.iter()
            .flat_map(|l| {
                let (k, v) = l.state().unwrap();
                let f32s = |a: Array| a.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().to_vec();
                [f32s(k), f32s(v)]
            })
            .collect()
    }

    /// A good snapshot of `tokens` written through a store in `dir`; its bytes.
    fn good_file(dir: &Path, tokens: &[u32]) -> (PathBuf, Vec<u8>) {
        let s = Store::open(dir, FP.into()).unwrap();
        let path = s.save(tokens, &layers(tokens.len() as i32, 1.0)).unwrap();
        assert_eq!(s.flush(), Flushed::All);
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    /// The error of a load that must fail.
    fn err(r: Result<Vec<LayerKv>, StoreError>) -> String {
        match r {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    }

    /// The header JSON of a snapshot file's bytes.
    fn header_of(bytes: &[u8]) -> Value {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        serde_json::from_slice(&bytes[8..8 + n]).unwrap()
    }

    /// The same data with `header` as its header.
    fn with_header(bytes: &[u8], header: &Value) -> Vec<u8> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h = serde_json::to_vec(header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(&bytes[8 + n..]);
        out
    }

    #[test]
    fn a_cache_with_room_to_spare_saves_only_its_tokens() {
        // Buffers with capacity past the tokens (as a running request's
        // cache has): the file holds each head's first tokens, nothing more.
        let dir = folder("room");
        let mut grown = layers(3, 2.0);
        for l in &mut grown {
            l.reserve(3 + 13, 2, 4).unwrap();
        }
        assert!(grown[0].buffers().unwrap().0.shape()[2] > 3, "the buffers have room past the tokens");
        let s = Store::open(&dir, FP.into()).unwrap();
        let path = s.save(&[1, 2, 3], &grown).unwrap();
        assert_eq!(s.flush(), Flushed::All);
        let back = load(&path, LAYERS, 3, FP).unwrap();
        assert_eq!(values(&back), values(&layers(3, 2.0)));
        assert_eq!(values(&back), values(&grown));
    }

    #[test]
    fn a_snapshot_round_trips() {
        let dir = folder("roundtrip");
        let tokens = [5u32, 6, 7];
        let (path, _) = good_file(&dir, &tokens);
        let (found, warnings) = scan(&dir, FP);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].path.clone(), found[0].tokens.clone()), (path.clone(), tokens.to_vec()));
        let back = load(&path, LAYERS, 3, FP).unwrap();
        assert_eq!(values(&back), values(&layers(3, 1.0)));
        // Wrong expectations are refused, not served.
        assert!(err(load(&path, LAYERS + 1, 3, FP)).contains("holds 2 layers"));
        assert!(err(load(&path, LAYERS, 4, FP)).contains("holds 3 tokens"));
        assert!(err(load(&path, LAYERS, 3, "other")).contains("another model"));
        let (found, warnings) = scan(&dir, "other");
        assert!(found.is_empty() && warnings.len() == 1 && warnings[0].contains("another model"), "{warnings:?}");
    }

    #[test]
    fn damaged_truncated_and_foreign_files_are_skipped_with_a_warning() {
        let dir = folder("bad");
        let (good, bytes) = good_file(&dir, &[1, 2, 3, 4]);
        let h = header_of(&bytes);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let edit = |f: &dyn Fn(&mut Value)| {
            let mut h = h.clone();
            f(&mut h);
            with_header(&bytes, &h)
        };
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        let mut lying_len = bytes.clone();
        lying_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut extra = bytes.clone();
        extra.extend([0u8; 16]);
        // (file, bytes, what the warning says); each must be refused by scan or load.
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "empty"),
            ("short", vec![1, 2, 3], "too short"),
            ("random", (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(), "header"),
            ("lying-length", lying_len, "header claims"),
            ("truncated-data", bytes[..bytes.len() - 100].to_vec(), "truncated"),
            ("truncated-header", bytes[..8 + n / 2].to_vec(), "header claims"),
            ("garbage-header", with_header(&bytes, &json!("x")), "not a JSON object"),
            ("not-json", { let mut b = bytes.clone(); b[8 + n / 2] = b'{'; b[9 + n / 2] = 0xff; b }, "not JSON"),
            ("extra-bytes", extra, "after the last tensor"),
            ("flipped-bit", flipped, "checksum"),
            ("foreign-format", edit(&|h| h["__metadata__"]["format"] = json!("pytorch")), "not a kvserve snapshot"),
            ("no-metadata", edit(&|h| { h.as_object_mut().unwrap().remove("__metadata__"); }), "no __metadata__"),
            ("foreign-model", edit(&|h| h["__metadata__"]["fingerprint"] = json!("someone-else")), "another model"),
            ("bad-tokens", edit(&|h| h["__metadata__"]["tokens"] = json!("[1, 2, -3, 4]")), "token ids"),
            ("no-tokens", edit(&|h| h["__metadata__"]["tokens"] = json!("[]")), "no token ids"),
            ("fewer-tokens", edit(&|h| h["__metadata__"]["tokens"] = json!("[1, 2, 3]")), "holds 4 tokens; the file lists 3"),
            ("changed-tokens", edit(&|h| h["__metadata__"]["tokens"] = json!("[1, 2, 3, 5]")), "checksum"),
            ("changed-dtype", edit(&|h| h["__metadata__"]["dtype"] = json!("bfloat16")), "expected BF16"),
            ("unknown-dtype", edit(&|h| h["__metadata__"]["dtype"] = json!("int4")), "unknown dtype"),
            ("no-checksum", edit(&|h| { h["__metadata__"].as_object_mut().unwrap().remove("checksum"); }), "checksum is missing"),
            ("tensor-dtype", edit(&|h| h["0.keys"]["dtype"] = json!("F32")), "expected F16"),
            ("shape-3d", edit(&|h| h["0.keys"]["shape"] = json!([2, 4, 4])), "4 positive dimensions"),
            ("shape-zero", edit(&|h| h["0.keys"]["shape"] = json!([1, 0, 4, 4])), "4 positive dimensions"),
            ("shape-negative", edit(&|h| h["0.keys"]["shape"] = json!([1, -2, 4, 4])), "4 positive dimensions"),
            ("shape-huge", edit(&|h| h["0.keys"]["shape"] = json!([65536, 65536, 4, 4])), "too large"),
            ("shape-swapped", edit(&|h| { h["0.keys"]["shape"] = json!([1, 4, 4, 2]); h["0.values"]["shape"] = json!([1, 4, 4, 2]); }), "checksum"),
            ("shape-vs-bytes", edit(&|h| h["0.keys"]["shape"] = json!([1, 1, 4, 4])), "bytes of shape"),
            ("offsets-reversed", edit(&|h| { let o = h["0.keys"]["data_offsets"].clone(); h["0.keys"]["data_offsets"] = json!([o[1], o[0]]); }), "data_offsets"),
            ("offsets-missing", edit(&|h| h["0.keys"]["data_offsets"] = json!([0])), "two byte offsets"),
            ("offsets-past-end", edit(&|h| h["1.values"]["data_offsets"] = json!([1u64 << 40, (1u64 << 40) + 64])), "truncated"),
            ("offsets-overflow", edit(&|h| h["1.values"]["data_offsets"] = json!([u64::MAX - 8, u64::MAX])), "data_offsets"),
            ("offsets-overlap", edit(&|h| h["0.values"]["data_offsets"] = json!([0, 64])), "overlaps"),
            ("extra-tensor", edit(&|h| h["7.bias"] = json!({"dtype": "F32", "shape": [1, 1, 4, 1], "data_offsets": [0, 16]})), "unexpected tensor"),
            ("missing-layer", edit(&|h| { h.as_object_mut().unwrap().remove("1.values"); }), "after the last tensor"),
            ("renamed-layer", edit(&|h| { let t = h["1.values"].take(); h.as_object_mut().unwrap().remove("1.values"); h["5.values"] = t; }), "does not fit 2 layers"),
            ("keys-values-disagree", edit(&|h| { h["0.values"]["shape"] = json!([1, 1, 4, 8]); }), "disagree"),
        ];
        for (name, data, _) in &cases {
            std::fs::write(dir.join(format!("{name}.safetensors")), data).unwrap();
        }
        std::fs::write(dir.join("leftover.partial"), &bytes[..100]).unwrap();
        std::fs::create_dir(dir.join("folder.safetensors")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"not a snapshot").unwrap();

        let (found, warnings) = scan(&dir, FP);
        let warning = |file: &str| warnings.iter().find(|w| w.contains(&format!("/{file}:"))).cloned();
        let mut loaded = vec![];
        for (name, _, needle) in &cases {
            let file = format!("{name}.safetensors");
            let path = dir.join(&file);
            // Refused by scan (with a warning naming it) or by load (with an error saying why).
            let why = match found.iter().find(|f| f.path == path) {
                None => warning(&file).unwrap_or_else(|| panic!("{name}: neither found nor warned about: {warnings:?}")),
                Some(f) => {
                    loaded.push(*name);
                    match load(&path, LAYERS, f.tokens.len(), FP) {
                        Ok(_) => panic!("{name}: a bad file was loaded"),
                        Err(e) => e.to_string(),
                    }
                }
            };
            assert!(why.contains(needle), "{name}: {why:?} lacks {needle:?}");
            // load refuses it too when asked directly.
            assert!(load(&path, LAYERS, 4, FP).is_err(), "{name}: loaded");
        }
        // Only what needs the data to tell is left for load.
        loaded.sort();
        assert_eq!(loaded, ["changed-tokens", "flipped-bit", "shape-swapped"]);
        assert!(warning("leftover.partial").unwrap().contains("unfinished write"), "{warnings:?}");
        assert!(warning("folder.safetensors").unwrap().contains("not a regular file"), "{warnings:?}");
        assert!(warning("notes.txt").is_none());
        assert_eq!(found.iter().filter(|f| f.path == good).count(), 1);
        assert_eq!(found.len(), 1 + loaded.len());
        assert_eq!(warnings.len(), cases.len() - loaded.len() + 2, "{warnings:#?}");
        // Opening a store removes the leftover of an interrupted write.
        let _s = Store::open(&dir, FP.into()).unwrap();
        assert!(!dir.join("leftover.partial").exists());
    }

    #[test]
    fn a_panicking_write_is_counted_and_the_writer_goes_on() {
        let dir = folder("panic");
        let s = Store::open(&dir, FP.into()).unwrap();
        let doomed = dir.join("doomed.safetensors");
        s.send(Job::PanicInWrite(doomed.clone())).unwrap();
        let after = s.save(&[9, 9], &layers(2, 3.0)).unwrap();
        assert_eq!(s.flush(), Flushed::All);
        assert_eq!(s.failed_writes(), 1);
        assert!(!doomed.exists() && !tmp_path(&doomed).exists());
        assert_eq!(values(&load(&after, LAYERS, 2, FP).unwrap()), values(&layers(2, 3.0)));
    }

    #[test]
    fn flush_returns_when_the_writer_is_gone() {
        let dir = folder("gone");
        let s = Store::open(&dir, FP.into()).unwrap();
        s.send(Job::Crash).unwrap();
        let t0 = Instant::now();
        // The crash job itself never finishes; flush must notice the writer ended.
        assert_eq!(s.flush(), Flushed::WriterGone { unwritten: 1 });
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let e = s.save(&[1], &layers(1, 0.0)).unwrap_err().to_string();
        assert!(e.contains("writer thread has stopped"), "{e}");
        assert_eq!(s.flush(), Flushed::WriterGone { unwritten: 1 });
    }

    #[test]
    fn flush_gives_up_on_a_stalled_writer() {
        let dir = folder("stall");
        let s = Store::open(&dir, FP.into()).unwrap();
        // A write counted but never sent stands for one stuck on a hung disk.
        s.shared.update(|p| p.queued += 1);
        let t0 = Instant::now();
        assert_eq!(s.flush_stalling_after(Duration::from_millis(200)), Flushed::Stalled { unwritten: 1 });
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(5), "{waited:?}");
    }
}
