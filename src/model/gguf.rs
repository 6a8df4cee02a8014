//! GGUF models: F32, F16, BF16, Q4_0, Q4_1 and Q8_0 tensors through MLX's
//! GGUF loader (it maps the quantized ones to its affine quantization, group
//! size 32); files with Q5_0, Q5_1, Q2_K-Q6_K or IQ4_NL tensors are read and
//! converted by kvserve (gguf_quants). Turns one into what an MLX-format directory holds: a config,
//! Hugging Face-named weights, a tokenizer.json and a tokenizer_config.json.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use mlx_rs::io::GgufFile as Gguf;
use mlx_rs::{Array, Dtype};
use serde_json::{json, Map, Value};

use super::config::{ModelConfig, QuantSpec};
use super::gguf_quants;
use super::gguf_types::{type_name, Header, ModelShape, TensorInfo, Value as MetaValue};
use super::ModelError;
use crate::mlx::{MlxError, QuantizedMatrix};

/// A GGUF file turned into MLX-format pieces.
pub struct Converted {
    /// config.json, with a `quantization` block for quantized tensors.
    pub config: Value,
    /// Weights under Hugging Face names; quantized ones as weight/scales/biases.
    pub weights: HashMap<String, Array>,
    /// tokenizer.json (Hugging Face `tokenizers` format).
    pub tokenizer: Value,
    /// tokenizer_config.json (special tokens, chat template).
    pub tokenizer_config: Value,
}

fn err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Load { file: path.display().to_string(), message: message.into() }
}

/// The metadata, as kvserve's own header reader kept it.
struct Meta<'a> {
    m: &'a HashMap<String, MetaValue>,
    path: &'a Path,
}

impl Meta<'_> {
    fn string(&self, key: &str) -> Result<Option<String>, ModelError> {
        Ok(match self.m.get(key) {
            Some(MetaValue::Str(s)) => Some(s.clone()),
            _ => None,
        })
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ModelError> {
        Ok(match self.m.get(key) {
            Some(MetaValue::Array { item: 8, strings, .. }) => Some(strings.clone()),
            _ => None,
        })
    }
    fn number(&self, key: &str) -> Result<Option<f64>, ModelError> {
        Ok(match self.m.get(key) {
            Some(MetaValue::Int(v)) => Some(*v as f64),
            Some(MetaValue::Float(v)) => Some(*v),
            _ => None,
        })
    }
    fn ints(&self, key: &str) -> Result<Option<Vec<i32>>, ModelError> {
        Ok(match self.m.get(key) {
            Some(MetaValue::Array { ints, len, .. }) if ints.len() as u64 == *len => {
                Some(ints.iter().map(|&v| v.clamp(i32::MIN as i64, i32::MAX as i64) as i32).collect())
            }
            Some(MetaValue::Array { .. }) => return Err(err(self.path, format!("metadata {key} is not an array of integers"))),
            _ => None,
        })
    }
    fn flag(&self, key: &str) -> Result<bool, ModelError> {
        Ok(matches!(self.m.get(key), Some(MetaValue::Bool(true))))
    }
}

/// Every tensor of a file MLX's loader cannot convert exactly, read and
/// converted by kvserve: dense types as float32, quantized ones as MLX
/// affine triples under `{base}.weight` (packed), `{base}.scales` and
/// `{base}.biases`, as MLX's loader names them. Also returns, per GGUF type,
/// (tensors, largest error, largest error over its group's range).
fn read_tensors(path: &Path, h: &Header, keep: &dyn Fn(&str) -> bool) -> Result<(HashMap<String, Array>, BTreeMap<u32, (usize, f32, f32)>), ModelError> {
    let f = std::fs::File::open(path).map_err(|e| err(path, e.to_string()))?;
    let mut out = HashMap::new();
    let mut stats: BTreeMap<u32, (usize, f32, f32)> = BTreeMap::new();
    // Tensors are read and converted on every core, a batch at a time (so
    // at most a batch of raw and converted copies is held); MLX arrays are
    // made here, on this thread.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    let wanted: Vec<&TensorInfo> = h.tensors.iter().filter(|t| keep(&t.name)).collect();
    for batch in wanted.chunks(threads) {
        let done: Vec<Result<(Decoded, &TensorInfo), ModelError>> = std::thread::scope(|s| {
            let f = &f;
            let jobs: Vec<_> = batch.iter().map(|&t| s.spawn(move || decode_tensor(path, f, h, t).map(|d| (d, t)))).collect();
            jobs.into_iter().map(|j| j.join().unwrap_or_else(|_| Err(err(path, "a tensor conversion thread panicked")))).collect()
        });
        for r in done {
            let (d, t) = r?;
            let entry = stats.entry(t.ty).or_default();
            entry.0 += 1;
            match d {
                Decoded::Dense(values, shape) => {
                    out.insert(t.name.clone(), Array::from_slice(&values, &shape));
                }
                Decoded::Affine(a, rows, cols) => {
                    entry.1 = entry.1.max(a.max_error);
                    entry.2 = entry.2.max(a.max_rel_error);
                    let base = t.name.strip_suffix(".weight").unwrap_or(&t.name).to_string();
                    // Within i32: rows * cols is at most i32::MAX (decode_tensor).
                    let words = (cols * a.bits as usize / 32) as i32;
                    out.insert(format!("{base}.weight"), Array::from_slice(&a.packed, &[rows as i32, words]));
                    out.insert(format!("{base}.scales"), Array::from_slice(&a.scales, &[rows as i32, (cols / 32) as i32]));
                    out.insert(format!("{base}.biases"), Array::from_slice(&a.biases, &[rows as i32, (cols / 32) as i32]));
                }
            }
        }
    }
    Ok((out, stats))
}

/// One tensor, read and converted: dense values with their MLX shape, or
/// the affine triple with (rows, cols).
enum Decoded {
    Dense(Vec<f32>, Vec<i32>),
    Affine(gguf_quants::Affine, usize, usize),
}

fn decode_tensor(path: &Path, f: &std::fs::File, h: &Header, t: &TensorInfo) -> Result<Decoded, ModelError> {
    use std::os::unix::fs::FileExt;
    let (per, bytes) = gguf_quants::block_layout(t.ty).ok_or_else(|| err(path, format!("tensor '{}' has an unloadable type", t.name)))?;
    // The header check bounds each dimension and the byte size; arrays
    // built here also need the element count within i32 (mlx-rs shapes).
    let n = t.dims.iter().try_fold(1u64, |n, d| n.checked_mul(*d)).filter(|n| *n <= i32::MAX as u64).ok_or_else(|| {
        err(path, format!("tensor '{}' has shape {:?}: more than {} elements, which kvserve's GGUF reader cannot hold in one array", t.name, t.dims, i32::MAX))
    })? as usize;
    let mut raw = vec![0u8; n / per * bytes];
    f.read_exact_at(&mut raw, h.data_start + t.offset).map_err(|e| err(path, format!("tensor '{}': {e}", t.name)))?;
    let shape: Vec<i32> = t.dims.iter().rev().map(|&d| d as i32).collect();
    if gguf_quants::mapping(t.ty).is_none() {
        return Ok(Decoded::Dense(gguf_quants::dequantize(t.ty, &raw, n), shape));
    }
    if shape.len() != 2 {
        return Err(err(path, format!("tensor '{}' is quantized ({}) with {} dimensions; kvserve loads 2-D quantized tensors", t.name, type_name(t.ty), shape.len())));
    }
    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
    Ok(Decoded::Affine(gguf_quants::to_affine(t.ty, &raw, rows, cols), rows, cols))
}

/// Hugging Face name of a GGUF tensor (without its .weight/.bias/.scales suffix).
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undo llama.cpp's permutation of Q/K rows for its rotary layout. Its
/// converter did `reshape(heads, 2, d/2, cols).swapaxes(1, 2)`; the inverse
/// reads the rows as (heads, d/2, 2) and swaps back. `Err` names a shape
/// that cannot be split into `heads` heads of an even size.
fn unpermute_rows(a: &Array, heads: i32) -> Result<Array, String> {
    let &[out, cols] = a.shape() else { return Err(format!("has shape {:?}, not a matrix", a.shape())) };
    if heads <= 0 || out % heads != 0 || (out / heads) % 2 != 0 {
        return Err(format!("has {out} rows, which do not split into {heads} heads of an even size"));
    }
    let d = out / heads;
    let a = a.reshape(&[heads, d / 2, 2, cols]).and_then(|a| a.swap_axes(1, 2)).and_then(|a| a.reshape(&[out, cols]));
    a.map_err(|e| e.to_string())
}

/// Store a quantized matrix under `hf` and record its spec.
fn insert_quantized(weights: &mut HashMap<String, Array>, specs: &mut HashMap<String, QuantSpec>, hf: &str, q: QuantizedMatrix) {
    specs.insert(hf.to_string(), QuantSpec { group_size: q.group_size, bits: q.bits });
    weights.insert(format!("{hf}.weight"), q.packed);
    weights.insert(format!("{hf}.scales"), q.scales);
    weights.insert(format!("{hf}.biases"), q.biases);
}

/// Pre-tokenizer for a GGUF `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        _ => return None,
    })
}

/// Open a GGUF file and convert it. `requant` re-quantizes every matrix
/// (otherwise quantized tensors keep the file's own blocks).
pub fn convert(path: &Path, requant: Option<QuantSpec>) -> Result<Converted, ModelError> {
    convert_layers(path, requant, None)
}

/// The decoder layer a GGUF tensor belongs to (`blk.N.`), if any.
fn layer_of(name: &str) -> Option<i32> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// [`convert`], reading only the tensors of the decoder layers in `range`
/// (and those outside any layer: the embedding, the final norm, the head):
/// one rank's share of a model split by layers. The rest of the file is
/// never read.
pub fn convert_layers(path: &Path, requant: Option<QuantSpec>, range: Option<std::ops::Range<i32>>) -> Result<Converted, ModelError> {
    if !path.is_file() {
        return Err(err(path, "file not found"));
    }
    // Everything MLX's loader trusts, and every count used below, is checked
    // here first (gguf_types), so a damaged file is an error naming the field.
    let (header, shape) = super::gguf_types::check_header(path).map_err(|e| err(path, e.to_string()))?;
    let meta = Meta { m: &header.meta, path };
    let ModelShape { arch, hidden, heads, kv_heads, layers, head_dim, ffn, vocab, .. } = shape.clone();
    let key = |k: &str| format!("{arch}.{k}");

    // MLX's loader reads the types it converts exactly (memory-mapped);
    // a file with any other type is read and converted here.
    let keep = |name: &str| match (&range, layer_of(name)) {
        (Some(r), Some(l)) => r.contains(&l),
        _ => true,
    };
    // (MLX's loader reads every tensor, so a share is read here.)
    let arrays = if range.is_none() && header.tensors.iter().all(|t| gguf_quants::MLX_NATIVE.contains(&t.ty)) {
        let g = Gguf::load(path).map_err(|e| err(path, format!("cannot load GGUF: {e}")))?;
        g.arrays().map_err(|e| err(path, format!("cannot read tensors: {e}")))?
    } else {
        let (arrays, stats) = read_tensors(path, &header, &keep)?;
        for (ty, (n, error, rel)) in stats {
            let how = match gguf_quants::mapping(ty) {
                None => "dense, float32".to_string(),
                Some(gguf_quants::Mapping::Exact { bits }) => format!("MLX affine {bits}-bit, groups of 32, exact"),
                Some(gguf_quants::Mapping::Requantized) => format!(
                    "requantized to MLX affine 8-bit, groups of 32: largest error {error:.3e}, at most {:.3}% of a group's range",
                    100.0 * rel
                ),
            };
            eprintln!("{}: {n} {} tensor{} -> {how}", path.display(), type_name(ty), if n == 1 { "" } else { "s" });
        }
        arrays
    };
    let mut weights = HashMap::new();
    let mut quant_layers: HashMap<String, QuantSpec> = HashMap::new();
    // Group GGUF tensors by base name.
    let mut bases = arrays
        .keys()
        .filter_map(|k| k.strip_suffix(".weight").or_else(|| k.strip_suffix(".bias")).map(str::to_string))
        .collect::<Vec<String>>();
    bases.sort();
    bases.dedup();
    for base in bases {
        let hf = hf_name(&base).ok_or_else(|| err(path, format!("tensor '{base}' has no known Hugging Face name")))?;
        let permute = arch == "llama" && (base.ends_with("attn_q") || base.ends_with("attn_k"));
        let n_heads = if base.ends_with("attn_q") { heads } else { kv_heads };
        let fix = |a: &Array| -> Result<Array, ModelError> {
            if permute {
                unpermute_rows(a, n_heads).map_err(|e| err(path, format!("tensor '{base}' {e}")))
            } else {
                Ok(a.clone())
            }
        };
        let w = arrays.get(&format!("{base}.weight")).ok_or_else(|| err(path, format!("tensor '{base}.weight' is missing")))?;
        if let Some(scales) = arrays.get(&format!("{base}.scales")) {
            let biases = arrays
                .get(&format!("{base}.biases"))
                .ok_or_else(|| err(path, format!("{base} has scales but no biases")))?;
            // MLX's GGUF loader maps Q4_0/Q4_1/Q8_0 to affine groups of 32:
            // per row, `bits` 32-bit words of packed values per group.
            let bits = match (w.shape(), scales.shape()) {
                (&[_, words], &[_, groups]) if groups > 0 && words % groups == 0 => words / groups,
                (ws, ss) => return Err(err(path, format!("tensor '{base}' has packed shape {ws:?} and scales {ss:?}, which do not make groups of 32"))),
            };
            if ![2, 3, 4, 5, 6, 8].contains(&bits) {
                return Err(err(path, format!("tensor '{base}' unpacks to {bits} bits per value (MLX supports 2-6 and 8)")));
            }
            let spec = QuantSpec { group_size: 32, bits };
            let q = QuantizedMatrix {
                packed: fix(w)?,
                scales: fix(&scales.as_dtype(Dtype::Float32).map_err(MlxError::from)?)?,
                biases: fix(&biases.as_dtype(Dtype::Float32).map_err(MlxError::from)?)?,
                group_size: spec.group_size,
                bits: spec.bits,
            };
            let q = match requant {
                Some(r) if r != spec => QuantizedMatrix::quantize(&q.dequantize()?, r.group_size, r.bits)?,
                _ => q,
            };
            insert_quantized(&mut weights, &mut quant_layers, &hf, q);
        } else {
            let dense = fix(&w.as_dtype(Dtype::Float32).map_err(MlxError::from)?)?;
            match requant {
                Some(r) if dense.ndim() == 2 && !hf.contains("norm") => {
                    let q = QuantizedMatrix::quantize(&dense, r.group_size, r.bits)?;
                    insert_quantized(&mut weights, &mut quant_layers, &hf, q);
                }
                _ => {
                    weights.insert(format!("{hf}.weight"), dense);
                }
            }
        }
        if let Some(b) = arrays.get(&format!("{base}.bias")) {
            let column = fix(&b.reshape(&[-1, 1]).map_err(MlxError::from)?)?;
            weights.insert(format!("{hf}.bias"), column.reshape(&[-1]).map_err(MlxError::from)?);
        }
    }
    let tied = !weights.contains_key("lm_head.weight");

    // The most common spec is the global one; others are per-layer overrides.
    let mut counts: HashMap<QuantSpec, usize> = HashMap::new();
    for s in quant_layers.values() {
        *counts.entry(*s).or_default() += 1;
    }
    let quantization = counts.iter().max_by_key(|(s, n)| (**n, s.bits)).map(|(global, _)| {
        let mut q = Map::new();
        q.insert("group_size".into(), json!(global.group_size));
        q.insert("bits".into(), json!(global.bits));
        q.insert("mode".into(), json!("affine"));
        let mut names: Vec<&String> = quant_layers.keys().collect();
        names.sort();
        for name in names {
            let s = quant_layers[name];
            if s != *global {
                q.insert(name.clone(), json!({"group_size": s.group_size, "bits": s.bits}));
            }
        }
        Value::Object(q)
    });

    let (bos, eos) = (shape.bos, shape.eos);
    let mut config = json!({
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": meta.number(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        "rope_theta": meta.number(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": shape.context_length.unwrap_or(4096),
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
    });
    if let Some(q) = quantization {
        config["quantization"] = q.clone();
        config["quantization_config"] = q;
    }

    let (tokenizer, tokenizer_config) = tokenizer_files(&meta, path, &shape)?;
    Ok(Converted { config, weights, tokenizer, tokenizer_config })
}

/// Build tokenizer.json and tokenizer_config.json from the GGUF vocabulary.
fn tokenizer_files(meta: &Meta, path: &Path, shape: &ModelShape) -> Result<(Value, Value), ModelError> {
    let model = meta.string("tokenizer.ggml.model")?.unwrap_or_default();
    if model != "gpt2" {
        return Err(err(path, format!("tokenizer model '{model}' is not supported (gpt2 byte-level BPE)")));
    }
    let pre_name = meta.string("tokenizer.ggml.pre")?.unwrap_or_else(|| "default".into());
    let pre = pre_tokenizer(&pre_name)
        .ok_or_else(|| err(path, format!("tokenizer pre-tokenizer '{pre_name}' is not supported (default, smollm, qwen2, llama-bpe)")))?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?.ok_or_else(|| err(path, "metadata lacks tokenizer.ggml.tokens"))?;
    let merges = meta.strings("tokenizer.ggml.merges")?.unwrap_or_default();
    let types = meta.ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    let vocab: Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Control (3) and user-defined (4) tokens are added tokens; control ones are special.
    if types.len() > tokens.len() {
        return Err(err(path, format!("tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}", types.len(), tokens.len())));
    }
    let added: Vec<Value> = types
        .iter()
        .zip(&tokens)
        .enumerate()
        .filter(|(_, (t, _))| **t == 3 || **t == 4)
        .map(|(i, (t, content))| {
            json!({"id": i, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": *t == 4, "special": *t == 3})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let tok = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).map(|s| json!(s)).unwrap_or(Value::Null);
    let add_bos = meta.flag("tokenizer.ggml.add_bos_token")?;
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok(shape.bos),
        "eos_token": tok(shape.eos),
        "unk_token": tok(shape.unk),
        "pad_token": tok(shape.pad),
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": false,
        "chat_template": meta.string("tokenizer.chat_template")?,
        "model_max_length": meta.number("llama.context_length")?.map(|x| x as i64),
    });
    Ok((tokenizer, config))
}

/// Write a converted model as an MLX-format directory that mlx-lm can load.
pub fn write_dir(c: &Converted, out: &Path) -> Result<(), ModelError> {
    let io = |e: std::io::Error| err(out, e.to_string());
    std::fs::create_dir_all(out).map_err(io)?;
    let write_json = |name: &str, v: &Value| {
        std::fs::write(out.join(name), serde_json::to_string_pretty(v).unwrap()).map_err(|e| err(&out.join(name), e.to_string()))
    };
    write_json("config.json", &c.config)?;
    write_json("tokenizer.json", &c.tokenizer)?;
    write_json("tokenizer_config.json", &c.tokenizer_config)?;
    let mut gen = json!({});
    if let Some(e) = c.config.get("eos_token_id") {
        gen["eos_token_id"] = e.clone();
    }
    if let Some(b) = c.config.get("bos_token_id") {
        gen["bos_token_id"] = b.clone();
    }
    write_json("generation_config.json", &gen)?;
    let file = out.join("model.safetensors");
    let tmp = out.join(".partial.model.safetensors");
    let meta: HashMap<String, String> = [("format".to_string(), "mlx".to_string())].into();
    Array::save_safetensors(c.weights.iter().map(|(k, v)| (k.as_str(), v)), &meta, &tmp)
        .map_err(|e| err(&file, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, &file).map_err(|e| err(&file, e.to_string()))?;
    let index = json!({"metadata": {"total_size": c.weights.values().map(Array::nbytes).sum::<usize>()},
                       "weight_map": c.weights.keys().map(|k| (k.clone(), json!("model.safetensors"))).collect::<Map<_, _>>()});
    write_json("model.safetensors.index.json", &index)?;
    Ok(())
}

/// Load a GGUF model for running: its config and weights, built in memory.
pub fn parse_config(c: &Converted, path: &Path) -> Result<ModelConfig, ModelError> {
    ModelConfig::parse(&c.config.to_string(), &path.display().to_string())
}
