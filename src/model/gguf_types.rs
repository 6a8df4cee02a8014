//! Reads and checks a GGUF file's header before MLX sees the file: the
//! metadata, the tensor infos and their data ranges, and that the model they
//! describe is whole and self-consistent. MLX's loader trusts the header (an
//! offset past the end reads outside the mapping; a zero head count divides
//! by zero later) and silently turns tensor types it has no kernel for into
//! float16; kvserve refuses all of these, naming the field.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufReader, Read};
use std::path::Path;

/// A problem in a GGUF file's header. The caller adds the file's path; every
/// message is one line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GgufError {
    /// The file cannot be opened or its length read.
    #[error("cannot read: {0}")]
    Io(String),
    /// The container itself: magic, version, counts, a header cut short.
    #[error("cannot load GGUF: {0}")]
    Format(String),
    /// A tensor of a type kvserve has no kernel for.
    #[error("tensor '{tensor}' has type {ty}, which kvserve does not load ({}); convert the model to one of these", loaded_types())]
    UnsupportedType { tensor: String, ty: String },
    /// A metadata key or a tensor that is missing, malformed, or disagrees
    /// with the rest of the header. `field` is the key or `tensor 'name'`.
    #[error("{field} {problem}")]
    Field { field: String, problem: String },
}

type Result<T> = std::result::Result<T, GgufError>;

fn field(field: impl Into<String>, problem: impl Into<String>) -> GgufError {
    GgufError::Field { field: field.into(), problem: problem.into() }
}

fn tensor_field(name: &str) -> String {
    format!("tensor '{name}'")
}

fn truncated(what: &str) -> GgufError {
    GgufError::Format(format!("the header is truncated (reading {what})"))
}

/// The ggml name of a tensor type id.
pub fn type_name(t: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16",
        "I32", "I64", "F64", "IQ1_M", "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4",
        "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4",
    ];
    NAMES.get(t as usize).map_or_else(|| format!("type {t}"), |n| n.to_string())
}

/// (values per block, bytes per block) of the tensor types kvserve loads.
fn block_layout(t: u32) -> Option<(u64, u64)> {
    super::gguf_quants::block_layout(t).map(|(n, b)| (n as u64, b as u64))
}

/// The tensor types kvserve loads, by name, for messages.
pub fn loaded_types() -> String {
    super::gguf_quants::LOADED.iter().map(|t| type_name(*t)).collect::<Vec<_>>().join(", ")
}

/// Architectures whose GGUF tensors kvserve maps to its own layers.
pub const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "qwen3"];

// Bounds on what a header may claim; far above any real model, low enough
// that products of them fit in an i32 (MLX's shape type).
const MAX_HEADS: i128 = 1024;
const MAX_HEAD_DIM: i128 = 4096;
const MAX_WIDTH: i128 = 1 << 20;
const MAX_LAYERS: i128 = 4096;
const MAX_CONTEXT: i128 = 1 << 24;
/// Integer arrays longer than this (far past any vocabulary) are skipped, not kept.
const MAX_KEPT_INTS: u64 = 1 << 24;
/// GGML keeps at most four dimensions per tensor.
const MAX_DIMS: u32 = 4;
/// Smallest encodings: a metadata entry (empty key, type, one byte) and a
/// tensor info (empty name, dimension count, one dimension, type, offset).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// One metadata value. Arrays keep their element type and length, and their
/// elements only when those are integers (token types); strings and floats
/// in arrays are skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array { item: u32, len: u64, ints: Vec<i64>, strings: Vec<String> },
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Str(_) => "a string",
            Value::Array { .. } => "an array",
        }
    }
}

/// One tensor info: `dims` in GGUF order (the fastest-varying first), `offset`
/// relative to the start of the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub offset: u64,
}

/// A GGUF header whose structure has been checked: every tensor is of a type
/// kvserve loads, has no zero dimension, and its data lies inside the file.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub meta: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts, in bytes from the start of the file.
    pub data_start: u64,
    pub file_len: u64,
}

struct Reader<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| truncated(what))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.remaining() {
            return Err(truncated(what));
        }
        let got = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink()).map_err(|e| GgufError::Io(e.to_string()))?;
        self.pos += got;
        if got != n {
            return Err(truncated(what));
        }
        Ok(())
    }
    /// A length-prefixed string; its length is checked against the file
    /// before anything is allocated.
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.remaining() {
            return Err(truncated(what));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).map_err(|_| truncated(what))?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// One metadata value of type `t` for `key`.
    fn value(&mut self, t: u32, key: &str, depth: u32) -> Result<Value> {
        Ok(match t {
            0 => Value::Int(self.bytes::<1>(key)?[0].into()),
            1 => Value::Int(i8::from_le_bytes(self.bytes(key)?).into()),
            2 => Value::Int(u16::from_le_bytes(self.bytes(key)?).into()),
            3 => Value::Int(i16::from_le_bytes(self.bytes(key)?).into()),
            4 => Value::Int(u32::from_le_bytes(self.bytes(key)?).into()),
            5 => Value::Int(i32::from_le_bytes(self.bytes(key)?).into()),
            6 => Value::Float(f32::from_le_bytes(self.bytes(key)?).into()),
            7 => Value::Bool(self.bytes::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            10 => Value::Int(u64::from_le_bytes(self.bytes(key)?).into()),
            11 => Value::Int(i64::from_le_bytes(self.bytes(key)?).into()),
            12 => Value::Float(f64::from_le_bytes(self.bytes(key)?)),
            9 => {
                let item = self.u32(key)?;
                let len = self.u64(key)?;
                // Every element takes at least one byte (strings eight), so a
                // length the rest of the file cannot hold is refused before
                // any loop or allocation.
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 if depth < 2 => 12,
                    _ => return Err(field(key, format!("is an array of value type {item}, which is not a GGUF type"))),
                };
                if len.checked_mul(min).is_none_or(|n| n > self.remaining()) {
                    return Err(field(
                        key,
                        format!("claims {len} elements, more than the {} bytes left in the file can hold", self.remaining()),
                    ));
                }
                let mut ints = Vec::new();
                let mut strings = Vec::new();
                match item {
                    // Integers are kept (token types); up to a bound, so a
                    // huge byte array cannot ask for eight times its size.
                    0..=5 | 10 | 11 if len <= MAX_KEPT_INTS => {
                        ints.reserve(len as usize);
                        for _ in 0..len {
                            let Value::Int(v) = self.value(item, key, depth + 1)? else { unreachable!("integer item") };
                            ints.push(v.clamp(i64::MIN.into(), i64::MAX.into()) as i64);
                        }
                    }
                    0..=7 | 10..=12 => self.skip(len * min, key)?,
                    // Strings are kept (the tokenizer's tokens and merges):
                    // their lengths were checked against the file above.
                    8 => {
                        // (a count the file cannot hold was refused above; the
                        // reservation is still capped, as a String is 24 bytes)
                        strings.reserve(len.min(1 << 16) as usize);
                        for _ in 0..len {
                            strings.push(self.string(key)?);
                        }
                    }
                    _ => (0..len).try_for_each(|_| self.value(9, key, depth + 1).map(drop))?,
                }
                Value::Array { item, len, ints, strings }
            }
            _ => return Err(field(key, format!("has value type {t}, which is not a GGUF type"))),
        })
    }
}

/// Read the header of the GGUF file at `path` and check its structure: the
/// magic and version, counts the file can hold, every tensor's type,
/// dimensions and data range.
pub fn read_header(path: &Path) -> Result<Header> {
    let f = std::fs::File::open(path).map_err(|e| GgufError::Io(e.to_string()))?;
    let len = f.metadata().map_err(|e| GgufError::Io(e.to_string()))?.len();
    let mut r = Reader { r: BufReader::new(f), pos: 0, len };
    if len < 4 || &r.bytes::<4>("the magic")? != b"GGUF" {
        return Err(GgufError::Format("not a GGUF file (no GGUF magic)".into()));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Format(format!("GGUF version {version} is not supported (2, 3)")));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kvs = r.u64("the metadata count")?;
    if n_kvs > r.remaining() / MIN_KV_BYTES {
        return Err(GgufError::Format(format!(
            "the header claims {n_kvs} metadata entries, more than the file's {len} bytes can hold; the header is truncated or corrupt"
        )));
    }
    if n_tensors > r.remaining() / MIN_TENSOR_BYTES {
        return Err(GgufError::Format(format!(
            "the header claims {n_tensors} tensors, more than the file's {len} bytes can hold; the header is truncated or corrupt"
        )));
    }
    let mut meta = HashMap::new();
    for i in 0..n_kvs {
        let key = r.string(&format!("metadata key {i}"))?;
        let t = r.u32(&key)?;
        let v = r.value(t, &key, 0)?;
        if meta.insert(key.clone(), v).is_some() {
            return Err(field(key, "appears twice in the metadata"));
        }
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = BTreeSet::new();
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor info {i}"))?;
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(field(tensor_field(&name), format!("claims {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")));
        }
        let dims = (0..n_dims).map(|_| r.u64(&name)).collect::<Result<Vec<u64>>>()?;
        let ty = r.u32(&name)?;
        let offset = r.u64(&name)?;
        if !names.insert(name.clone()) {
            return Err(field(tensor_field(&name), "appears twice in the tensor infos"));
        }
        tensors.push(TensorInfo { name, dims, ty, offset });
    }
    let alignment = match meta.get("general.alignment") {
        None => 32,
        Some(Value::Int(a)) if *a > 0 && *a <= 1 << 16 && (*a as u64).is_power_of_two() => *a as u64,
        Some(v) => return Err(field("general.alignment", format!("is {v:?}; it must be a power of two up to 65536"))),
    };
    let data_start = r.pos.next_multiple_of(alignment);
    for t in &tensors {
        check_tensor_data(t, alignment, data_start, len)?;
    }
    Ok(Header { version, meta, tensors, data_start, file_len: len })
}

/// A tensor's type, dimensions and data range.
fn check_tensor_data(t: &TensorInfo, alignment: u64, data_start: u64, file_len: u64) -> Result<()> {
    let name = tensor_field(&t.name);
    let Some((block, block_bytes)) = block_layout(t.ty) else {
        return Err(GgufError::UnsupportedType { tensor: t.name.clone(), ty: type_name(t.ty) });
    };
    if t.dims.contains(&0) {
        return Err(field(name, format!("has a zero dimension (shape {:?})", t.dims)));
    }
    if let Some(d) = t.dims.iter().find(|d| **d > i32::MAX as u64) {
        return Err(field(name, format!("has dimension {d}, more than MLX's limit of {}", i32::MAX)));
    }
    if t.dims[0] % block != 0 {
        return Err(field(
            name,
            format!("has rows of {} values, not a multiple of the {} block size {block}", t.dims[0], type_name(t.ty)),
        ));
    }
    let bytes = t
        .dims
        .iter()
        .try_fold(1u64, |n, d| n.checked_mul(*d))
        .and_then(|n| (n / block).checked_mul(block_bytes))
        .ok_or_else(|| field(&name, format!("has shape {:?}, too large to address", t.dims)))?;
    if t.offset % alignment != 0 {
        return Err(field(name, format!("has data offset {}, not a multiple of the alignment {alignment}", t.offset)));
    }
    let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(bytes));
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(field(
            name,
            format!(
                "has data at offset {} of {bytes} bytes, past the end of the file ({file_len} bytes, data from byte {data_start}); the file is truncated or the offset is wrong",
                t.offset
            ),
        )),
    }
}

/// What the header says about the model, checked for consistency. Counts
/// are positive and small enough that their products fit in an i32.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub arch: String,
    pub hidden: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub layers: i32,
    pub head_dim: i32,
    pub ffn: i32,
    /// Rows of `token_embd.weight`, which is also the number of tokens.
    pub vocab: i32,
    pub context_length: Option<i32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
}

/// Read `path`'s header and check it describes a model kvserve can build;
/// returns the header (metadata and tensor infos) and the model's shape.
pub fn check_header(path: &Path) -> Result<(Header, ModelShape)> {
    let h = read_header(path)?;
    let shape = check_model(&h)?;
    Ok((h, shape))
}

struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    fn int(&self, key: &str) -> Result<Option<i128>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Int(v)) => Ok(Some(*v)),
            Some(v) => Err(field(key, format!("is {}; it must be an integer", v.kind()))),
        }
    }
    fn in_range(&self, key: &str, lo: i128, hi: i128) -> Result<Option<i32>> {
        match self.int(key)? {
            None => Ok(None),
            Some(v) if (lo..=hi).contains(&v) => Ok(Some(v as i32)),
            Some(v) => Err(field(key, format!("is {v}; it must be between {lo} and {hi}"))),
        }
    }
    fn require(&self, key: &str, lo: i128, hi: i128) -> Result<i32> {
        self.in_range(key, lo, hi)?.ok_or_else(|| field(key, "is missing from the metadata"))
    }
    fn float(&self, key: &str, ok: impl Fn(f64) -> bool, want: &str) -> Result<()> {
        let v = match self.0.get(key) {
            None => return Ok(()),
            Some(Value::Float(v)) => *v,
            Some(Value::Int(v)) => *v as f64,
            Some(v) => return Err(field(key, format!("is {}; it must be a number", v.kind()))),
        };
        if ok(v) {
            Ok(())
        } else {
            Err(field(key, format!("is {v}; it must be {want}")))
        }
    }
    /// An array's element type and length; `item` is the type it must hold.
    fn array(&self, key: &str, items: &[u32], what: &str) -> Result<Option<(u64, &[i64])>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array { item, len, ints, .. }) if items.contains(item) => Ok(Some((*len, ints))),
            Some(v) => Err(field(key, format!("is {}; it must be an array of {what}", describe(v)))),
        }
    }
    fn typed(&self, key: &str, ok: fn(&Value) -> bool, what: &str) -> Result<()> {
        match self.0.get(key) {
            Some(v) if !ok(v) => Err(field(key, format!("is {}; it must be {what}", describe(v)))),
            _ => Ok(()),
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Array { item, .. } => format!("an array of value type {item}"),
        v => v.kind().to_string(),
    }
}

/// The tensors every layer needs, with the shape (GGUF order) each must have.
fn layer_tensors(s: &ModelShape, k: &dyn Fn(&str) -> String) -> Vec<(&'static str, Vec<u64>, String)> {
    let (h, q, kv, f) = (s.hidden as u64, (s.heads * s.head_dim) as u64, (s.kv_heads * s.head_dim) as u64, s.ffn as u64);
    let hid = format!("{} {h}", k("embedding_length"));
    let qs = format!("{hid}, {} {} x head dim {}", k("attention.head_count"), s.heads, s.head_dim);
    let kvs = format!("{hid}, {} {} x head dim {}", k("attention.head_count_kv"), s.kv_heads, s.head_dim);
    let ff = format!("{hid}, {} {f}", k("feed_forward_length"));
    let mut t = vec![
        ("attn_norm.weight", vec![h], hid.clone()),
        ("attn_q.weight", vec![h, q], qs.clone()),
        ("attn_k.weight", vec![h, kv], kvs.clone()),
        ("attn_v.weight", vec![h, kv], kvs.clone()),
        ("attn_output.weight", vec![q, h], qs.clone()),
        ("ffn_norm.weight", vec![h], hid.clone()),
        ("ffn_gate.weight", vec![h, f], ff.clone()),
        ("ffn_up.weight", vec![h, f], ff.clone()),
        ("ffn_down.weight", vec![f, h], ff),
    ];
    let hd = format!("head dim {}", s.head_dim);
    match s.arch.as_str() {
        "qwen2" => t.extend([
            ("attn_q.bias", vec![q], qs),
            ("attn_k.bias", vec![kv], kvs.clone()),
            ("attn_v.bias", vec![kv], kvs),
        ]),
        "qwen3" => t.extend([
            ("attn_q_norm.weight", vec![s.head_dim as u64], hd.clone()),
            ("attn_k_norm.weight", vec![s.head_dim as u64], hd),
        ]),
        _ => {}
    }
    t
}

/// Check that `h` describes a model kvserve can build: the hyperparameters
/// are present and sane, every layer's tensors are there with the shapes the
/// hyperparameters imply, and the vocabulary agrees with the embedding.
pub fn check_model(h: &Header) -> Result<ModelShape> {
    let m = Meta(&h.meta);
    let arch = match h.meta.get("general.architecture") {
        Some(Value::Str(a)) if ARCHITECTURES.contains(&a.as_str()) => a.clone(),
        Some(Value::Str(a)) => {
            return Err(field("general.architecture", format!("is '{a}', which kvserve does not run ({})", ARCHITECTURES.join(", "))))
        }
        Some(v) => return Err(field("general.architecture", format!("is {}; it must be a string", v.kind()))),
        None => return Err(field("general.architecture", "is missing from the metadata")),
    };
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = m.require(&k("embedding_length"), 1, MAX_WIDTH)?;
    let heads = m.require(&k("attention.head_count"), 1, MAX_HEADS)?;
    let kv_heads = m.in_range(&k("attention.head_count_kv"), 1, MAX_HEADS)?.unwrap_or(heads);
    if heads % kv_heads != 0 {
        return Err(field(
            k("attention.head_count_kv"),
            format!("is {kv_heads}, which does not divide {} {heads}", k("attention.head_count")),
        ));
    }
    let layers = m.require(&k("block_count"), 1, MAX_LAYERS)?;
    let ffn = m.require(&k("feed_forward_length"), 1, MAX_WIDTH)?;
    let head_dim = match m.in_range(&k("attention.key_length"), 1, MAX_HEAD_DIM)? {
        Some(d) => d,
        None if hidden % heads == 0 && i128::from(hidden / heads) <= MAX_HEAD_DIM => hidden / heads,
        None => {
            return Err(field(
                k("attention.head_count"),
                format!("is {heads}, which does not divide {} {hidden} into heads of at most {MAX_HEAD_DIM} (and {} is not given)", k("embedding_length"), k("attention.key_length")),
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(field(
            k("attention.head_count"),
            format!("{heads} gives an odd head dimension {head_dim}; rotary embeddings need it even"),
        ));
    }
    if let Some(v) = m.in_range(&k("attention.value_length"), 1, MAX_HEAD_DIM)? {
        if v != head_dim {
            return Err(field(k("attention.value_length"), format!("is {v}; kvserve needs it equal to the key head dimension {head_dim}")));
        }
    }
    // kvserve rotates whole heads (llama.cpp's n_rot may be smaller).
    if let Some(r) = m.in_range(&k("rope.dimension_count"), 1, MAX_HEAD_DIM)? {
        if r != head_dim {
            return Err(field(k("rope.dimension_count"), format!("is {r}; kvserve needs it equal to the head dimension {head_dim}")));
        }
    }
    let context_length = m.in_range(&k("context_length"), 1, MAX_CONTEXT)?;
    m.float(&k("rope.freq_base"), |x| x.is_finite() && x > 0.0, "a positive finite number")?;
    m.float(&k("attention.layer_norm_rms_epsilon"), |x| x.is_finite() && (0.0..1.0).contains(&x), "between 0 and 1")?;

    let by_name: HashMap<&str, &TensorInfo> = h.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let need = |name: &str, dims: &[u64], why: &str| -> Result<()> {
        match by_name.get(name) {
            None => Err(field(tensor_field(name), "is missing")),
            Some(t) if t.dims != dims => {
                Err(field(tensor_field(name), format!("has shape {:?}; {why} needs {dims:?} (GGUF order)", t.dims)))
            }
            Some(_) => Ok(()),
        }
    };
    let embd = by_name.get("token_embd.weight").ok_or_else(|| field(tensor_field("token_embd.weight"), "is missing"))?;
    if embd.dims.len() != 2 || embd.dims[0] != hidden as u64 {
        return Err(field(
            tensor_field("token_embd.weight"),
            format!("has shape {:?}; {} {hidden} needs [{hidden}, vocabulary size]", embd.dims, k("embedding_length")),
        ));
    }
    // Dimensions are at most i32::MAX (checked in read_header).
    let vocab = embd.dims[1] as i32;
    if let Some(v) = m.int(&k("vocab_size"))? {
        if v != i128::from(vocab) {
            return Err(field(k("vocab_size"), format!("is {v} but tensor 'token_embd.weight' has {vocab} rows (one per token)")));
        }
    }
    let hid = format!("{} {hidden}", k("embedding_length"));
    need("output_norm.weight", &[hidden as u64], &hid)?;
    if by_name.contains_key("output.weight") {
        need("output.weight", &[hidden as u64, vocab as u64], &format!("{hid} and token_embd.weight"))?;
    }

    let mut present = BTreeSet::new();
    for t in &h.tensors {
        if let Some(n) = t.name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<u64>().ok()) {
            present.insert(n);
        }
    }
    if let Some(&last) = present.last() {
        if last >= layers as u64 {
            return Err(field(k("block_count"), format!("is {layers} but the file has tensors for layer {last} (blk.{last})")));
        }
    }
    if present.len() < layers as usize {
        return Err(field(
            k("block_count"),
            format!("is {layers} but the file has tensors for only {} layers", present.len()),
        ));
    }
    let shape = ModelShape {
        arch: arch.clone(),
        hidden,
        heads,
        kv_heads,
        layers,
        head_dim,
        ffn,
        vocab,
        context_length,
        bos: None,
        eos: None,
        unk: None,
        pad: None,
    };
    let per_layer = layer_tensors(&shape, &k);
    for i in 0..layers {
        for (part, dims, why) in &per_layer {
            need(&format!("blk.{i}.{part}"), dims, why)?;
        }
    }
    check_tokenizer(&m, shape)
}

/// Token types llama.cpp defines (normal, unknown, control, user-defined,
/// unused, byte) and 0 for undefined.
const MAX_TOKEN_TYPE: i64 = 6;

/// The vocabulary agrees with the embedding; token types, scores and merges
/// have the right kinds and lengths; special token ids are in range.
fn check_tokenizer(m: &Meta, mut s: ModelShape) -> Result<ModelShape> {
    const TOKENS: &str = "tokenizer.ggml.tokens";
    let (n_tokens, _) = m.array(TOKENS, &[8], "strings")?.ok_or_else(|| field(TOKENS, "is missing from the metadata"))?;
    if n_tokens != s.vocab as u64 {
        return Err(field(
            TOKENS,
            format!("has {n_tokens} entries but tensor 'token_embd.weight' has {} rows (one per token)", s.vocab),
        ));
    }
    const INTS: [u32; 8] = [0, 1, 2, 3, 4, 5, 10, 11];
    if let Some((n, types)) = m.array("tokenizer.ggml.token_type", &INTS, "integers")? {
        if n != n_tokens {
            return Err(field("tokenizer.ggml.token_type", format!("has {n} entries but {TOKENS} has {n_tokens}")));
        }
        if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| !(0..=MAX_TOKEN_TYPE).contains(*t)) {
            return Err(field("tokenizer.ggml.token_type", format!("entry {i} is {t}; token types are 0 to {MAX_TOKEN_TYPE}")));
        }
    }
    if let Some((n, _)) = m.array("tokenizer.ggml.scores", &[6, 12], "floats")? {
        if n != n_tokens {
            return Err(field("tokenizer.ggml.scores", format!("has {n} entries but {TOKENS} has {n_tokens}")));
        }
    }
    m.array("tokenizer.ggml.merges", &[8], "strings")?;
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"] {
        m.typed(key, |v| matches!(v, Value::Str(_)), "a string")?;
    }
    for key in ["tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"] {
        m.typed(key, |v| matches!(v, Value::Bool(_)), "a boolean")?;
    }
    let mut ids: Vec<&String> = m.0.keys().filter(|k| k.starts_with("tokenizer.ggml.") && k.ends_with("_token_id")).collect();
    ids.sort();
    for key in ids {
        let id = m.int(key)?.unwrap_or_default();
        if !(0..i128::from(n_tokens)).contains(&id) {
            return Err(field(key, format!("is {id}, outside the vocabulary of {n_tokens} tokens (ids 0 to {})", n_tokens - 1)));
        }
    }
    // In range of the vocabulary, so they fit in a u32.
    let id = |key: &str| m.int(key).map(|v| v.map(|v| v as u32));
    s.bos = id("tokenizer.ggml.bos_token_id")?;
    s.eos = id("tokenizer.ggml.eos_token_id")?;
    s.unk = id("tokenizer.ggml.unknown_token_id")?;
    s.pad = id("tokenizer.ggml.padding_token_id")?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file written field by field, for damaging in tests.
    #[derive(Clone)]
    struct Build {
        kvs: Vec<(String, Vec<u8>)>,
        tensors: Vec<(String, Vec<u64>, u32)>,
    }

    fn s(b: &mut Vec<u8>, x: &str) {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    }

    impl Build {
        fn set(&mut self, key: &str, value: Vec<u8>) -> &mut Self {
            self.kvs.retain(|(k, _)| k != key);
            self.kvs.push((key.into(), value));
            self
        }
        fn u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.set(key, [4u32.to_le_bytes().as_slice(), &v.to_le_bytes()].concat())
        }
        fn str(&mut self, key: &str, v: &str) -> &mut Self {
            let mut b = 8u32.to_le_bytes().to_vec();
            s(&mut b, v);
            self.set(key, b)
        }
        fn strings(&mut self, key: &str, n: usize) -> &mut Self {
            let mut b = 9u32.to_le_bytes().to_vec();
            b.extend(8u32.to_le_bytes());
            b.extend((n as u64).to_le_bytes());
            for i in 0..n {
                s(&mut b, &format!("t{i}"));
            }
            self.set(key, b)
        }
        fn i32s(&mut self, key: &str, v: &[i32]) -> &mut Self {
            let mut b = 9u32.to_le_bytes().to_vec();
            b.extend(5u32.to_le_bytes());
            b.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| b.extend(x.to_le_bytes()));
            self.set(key, b)
        }
        fn tensor(&mut self, name: &str, dims: &[u64]) -> &mut Self {
            self.tensors.retain(|(n, _, _)| n != name);
            self.tensors.push((name.into(), dims.to_vec(), 0));
            self
        }
        fn drop_tensor(&mut self, name: &str) -> &mut Self {
            self.tensors.retain(|(n, _, _)| n != name);
            self
        }
        /// The file: header, then each F32 tensor's (zero) data, aligned to 32.
        fn bytes(&self) -> Vec<u8> {
            let mut b = b"GGUF".to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend((self.tensors.len() as u64).to_le_bytes());
            b.extend((self.kvs.len() as u64).to_le_bytes());
            for (k, v) in &self.kvs {
                s(&mut b, k);
                b.extend(v);
            }
            let mut offset = 0u64;
            for (name, dims, ty) in &self.tensors {
                s(&mut b, name);
                b.extend((dims.len() as u32).to_le_bytes());
                dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
                b.extend(ty.to_le_bytes());
                b.extend(offset.to_le_bytes());
                offset += (dims.iter().product::<u64>() * 4).next_multiple_of(32);
            }
            b.resize(b.len().next_multiple_of(32) + offset as usize, 0);
            b
        }
    }

    /// A valid two-layer llama: hidden 8, 2 heads of 4, 1 KV head, FFN 16, 10 tokens.
    fn tiny() -> Build {
        let mut b = Build { kvs: vec![], tensors: vec![] };
        b.str("general.architecture", "llama")
            .u32("llama.embedding_length", 8)
            .u32("llama.attention.head_count", 2)
            .u32("llama.attention.head_count_kv", 1)
            .u32("llama.block_count", 2)
            .u32("llama.feed_forward_length", 16)
            .str("tokenizer.ggml.model", "gpt2")
            .strings("tokenizer.ggml.tokens", 10)
            .i32s("tokenizer.ggml.token_type", &[1; 10])
            .u32("tokenizer.ggml.bos_token_id", 1)
            .u32("tokenizer.ggml.eos_token_id", 2)
            .tensor("token_embd.weight", &[8, 10])
            .tensor("output_norm.weight", &[8]);
        for i in 0..2 {
            for (p, d) in [
                ("attn_norm", vec![8]),
                ("attn_q", vec![8, 8]),
                ("attn_k", vec![8, 4]),
                ("attn_v", vec![8, 4]),
                ("attn_output", vec![8, 8]),
                ("ffn_norm", vec![8]),
                ("ffn_gate", vec![8, 16]),
                ("ffn_up", vec![8, 16]),
                ("ffn_down", vec![16, 8]),
            ] {
                b.tensor(&format!("blk.{i}.{p}.weight"), &d);
            }
        }
        b
    }

    fn check_bytes(bytes: &[u8]) -> Result<ModelShape> {
        let dir = std::env::temp_dir().join(format!("kvserve-gguf-types-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let f = dir.join(format!("{}.gguf", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        std::fs::write(&f, bytes).unwrap();
        let r = check_header(&f).map(|(_, shape)| shape);
        std::fs::remove_file(&f).unwrap();
        r
    }

    fn field_err(b: &Build) -> (String, String) {
        match check_bytes(&b.bytes()) {
            Err(GgufError::Field { field, problem }) => (field, problem),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn the_tiny_model_passes_with_its_shape() {
        let s = check_bytes(&tiny().bytes()).unwrap();
        assert_eq!((s.hidden, s.heads, s.kv_heads, s.layers, s.head_dim, s.ffn, s.vocab), (8, 2, 1, 2, 4, 16, 10));
        assert_eq!((s.bos, s.eos, s.unk), (Some(1), Some(2), None));
    }

    #[test]
    fn bad_hyperparameters_name_their_key() {
        type Damage = Box<dyn Fn(&mut Build)>;
        let cases: Vec<(Damage, &str, &str)> = vec![
            (Box::new(|b| { b.u32("llama.attention.head_count", 0); }), "llama.attention.head_count", "is 0; it must be between 1 and 1024"),
            (Box::new(|b| { b.u32("llama.attention.head_count", 1 << 30); }), "llama.attention.head_count", "is 1073741824;"),
            (Box::new(|b| { b.u32("llama.attention.head_count_kv", 3); }), "llama.attention.head_count_kv", "is 3, which does not divide llama.attention.head_count 2"),
            (Box::new(|b| { b.u32("llama.attention.head_count", 3); }), "llama.attention.head_count", "is 3, which does not divide llama.embedding_length 8"),
            (Box::new(|b| { b.u32("llama.attention.head_count_kv", 0); }), "llama.attention.head_count_kv", "is 0;"),
            (Box::new(|b| { b.u32("llama.embedding_length", 0); }), "llama.embedding_length", "is 0;"),
            (Box::new(|b| { b.u32("llama.embedding_length", 6); }), "llama.attention.head_count", "odd head dimension 3"),
            (Box::new(|b| { b.u32("llama.feed_forward_length", 0); }), "llama.feed_forward_length", "is 0;"),
            (Box::new(|b| { b.u32("llama.block_count", 3); }), "llama.block_count", "tensors for only 2 layers"),
            (Box::new(|b| { b.u32("llama.block_count", 1); }), "llama.block_count", "tensors for layer 1"),
            (Box::new(|b| { b.str("llama.block_count", "two"); }), "llama.block_count", "is a string; it must be an integer"),
            (Box::new(|b| { b.str("general.architecture", "mamba"); }), "general.architecture", "is 'mamba'"),
            (Box::new(|b| b.kvs.retain(|(k, _)| k != "llama.feed_forward_length")), "llama.feed_forward_length", "is missing"),
        ];
        for (damage, key, text) in cases {
            let mut b = tiny();
            damage(&mut b);
            let (f, p) = field_err(&b);
            assert_eq!(f, key, "{p}");
            assert!(p.contains(text), "{key}: {p}");
        }
    }

    #[test]
    fn tensors_missing_or_misshapen_are_named() {
        let (f, p) = field_err(tiny().drop_tensor("blk.1.attn_k.weight"));
        assert_eq!((f.as_str(), p.as_str()), ("tensor 'blk.1.attn_k.weight'", "is missing"));
        let (f, p) = field_err(tiny().tensor("blk.0.attn_v.weight", &[8, 8]));
        assert_eq!(f, "tensor 'blk.0.attn_v.weight'");
        assert!(p.starts_with("has shape [8, 8];") && p.ends_with("needs [8, 4] (GGUF order)"), "{p}");
        let (f, p) = field_err(tiny().tensor("token_embd.weight", &[8, 0]));
        assert_eq!((f.as_str(), p.as_str()), ("tensor 'token_embd.weight'", "has a zero dimension (shape [8, 0])"));
        let (f, _) = field_err(tiny().tensor("token_embd.weight", &[12, 10]));
        assert_eq!(f, "tensor 'token_embd.weight'");
    }

    #[test]
    fn the_vocabulary_must_agree_with_the_embedding() {
        let (f, p) = field_err(tiny().strings("tokenizer.ggml.tokens", 11));
        assert_eq!(f, "tokenizer.ggml.tokens");
        assert_eq!(p, "has 11 entries but tensor 'token_embd.weight' has 10 rows (one per token)");
        let (f, p) = field_err(tiny().i32s("tokenizer.ggml.token_type", &[1; 12]));
        assert_eq!((f.as_str(), p.as_str()), ("tokenizer.ggml.token_type", "has 12 entries but tokenizer.ggml.tokens has 10"));
        let (f, p) = field_err(tiny().i32s("tokenizer.ggml.token_type", &[1, 1, 9, 1, 1, 1, 1, 1, 1, 1]));
        assert_eq!((f.as_str(), p.as_str()), ("tokenizer.ggml.token_type", "entry 2 is 9; token types are 0 to 6"));
        let (f, p) = field_err(tiny().u32("tokenizer.ggml.eos_token_id", 10));
        assert_eq!((f.as_str(), p.as_str()), ("tokenizer.ggml.eos_token_id", "is 10, outside the vocabulary of 10 tokens (ids 0 to 9)"));
        let (f, _) = field_err(tiny().i32s("tokenizer.ggml.merges", &[1]));
        assert_eq!(f, "tokenizer.ggml.merges");
    }

    #[test]
    fn data_past_the_end_and_absurd_counts_are_refused() {
        let bytes = tiny().bytes();
        match check_bytes(&bytes[..bytes.len() - 1]) {
            Err(GgufError::Field { field, problem }) => {
                assert!(field.starts_with("tensor '") && problem.contains("past the end of the file"), "{field} {problem}")
            }
            other => panic!("{other:?}"),
        }
        // The tensor count (bytes 8..16) claiming far more than the file holds.
        let mut b = bytes.clone();
        b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(check_bytes(&b), Err(GgufError::Format(m)) if m.contains("claims 1099511627776 tensors")));
        // An array length (the tokens) far past the end of the file.
        let mut t = tiny();
        let mut v = 9u32.to_le_bytes().to_vec();
        v.extend(8u32.to_le_bytes());
        v.extend((1u64 << 62).to_le_bytes());
        t.set("tokenizer.ggml.tokens", v);
        assert!(matches!(check_bytes(&t.bytes()), Err(GgufError::Field { field, .. }) if field == "tokenizer.ggml.tokens"));
        // Cut inside the tensor infos (the counts still fit in what is left).
        let r = check_bytes(&bytes[..1000]);
        assert!(matches!(&r, Err(GgufError::Format(m)) if m.starts_with("the header is truncated")), "{r:?} {}", bytes.len());
        assert!(matches!(check_bytes(&bytes[..60]), Err(GgufError::Format(m)) if m.contains("metadata entries, more than the file's 60 bytes")));
    }

    #[test]
    fn every_message_is_one_line() {
        let e = GgufError::Field { field: "llama.block_count".into(), problem: "is 0; it must be between 1 and 4096".into() };
        assert_eq!(e.to_string(), "llama.block_count is 0; it must be between 1 and 4096");
    }
}
