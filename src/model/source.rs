//! Where a model comes from: an MLX-format directory, a GGUF file, or a
//! Hugging Face repo id found in the local Hugging Face cache or LM Studio's
//! models folder. Loaded with its tokenizer, chat template and stop ids.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use mlx_rs::Array;
use serde_json::Value;

use super::{gguf, ModelConfig, ModelError, Transformer};
use crate::text::template::ChatTemplate;
use crate::text::tokenizer::Tokenizer;

pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Token ids that end generation (config, generation_config, tokenizer).
    pub eos_ids: Vec<u32>,
    /// What was loaded (a directory or a file).
    pub path: PathBuf,
    /// The name clients use for it.
    pub name: String,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// Find `spec` on disk: a path, or `org/name` in the local caches.
pub fn resolve(spec: &str) -> Result<PathBuf, ModelError> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let mut looked = vec![format!("{spec} (as a path)")];
    if spec.split('/').count() == 2 && !spec.starts_with('/') && !spec.starts_with('.') {
        let hub = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| home().map(|h| h.join(".cache/huggingface/hub")));
        if let Some(hub) = hub {
            let repo = hub.join(format!("models--{}", spec.replace('/', "--")));
            let snapshots = repo.join("snapshots");
            let main_ref = std::fs::read_to_string(repo.join("refs/main")).ok();
            if let Some(r) = main_ref {
                let dir = snapshots.join(r.trim());
                if dir.join("config.json").exists() {
                    return Ok(dir);
                }
            }
            if let Ok(entries) = std::fs::read_dir(&snapshots) {
                for e in entries.flatten() {
                    if e.path().join("config.json").exists() {
                        return Ok(e.path());
                    }
                }
            }
            looked.push(snapshots.display().to_string());
        }
        if let Some(h) = home() {
            for base in [h.join(".lmstudio/models"), h.join(".cache/lm-studio/models")] {
                let dir = base.join(spec);
                if dir.join("config.json").exists() {
                    return Ok(dir);
                }
                looked.push(dir.display().to_string());
            }
        }
    }
    Err(ModelError::Load { file: spec.to_string(), message: format!("model not found; looked in: {}", looked.join(", ")) })
}

/// Load the model `spec` names, with its tokenizer and template.
pub fn load(spec: &str) -> Result<LoadedModel, ModelError> {
    load_layers(spec, None)
}

/// [`load`] with only the decoder layers in `range` (one rank of a
/// pipeline; the others' weights are not read from an MLX directory).
pub fn load_layers(spec: &str, range: Option<std::ops::Range<i32>>) -> Result<LoadedModel, ModelError> {
    load_part(spec, range, None)
}

/// [`load`] with only this rank's share of every layer's heads and MLP
/// columns (tensor parallelism). Each layer's tensors are read whole, then
/// cut to the share; the rest is freed.
pub fn load_shard(spec: &str, shard: super::layers::Shard) -> Result<LoadedModel, ModelError> {
    load_part(spec, None, Some(shard))
}

fn load_part(spec: &str, range: Option<std::ops::Range<i32>>, shard: Option<super::layers::Shard>) -> Result<LoadedModel, ModelError> {
    let path = resolve(spec)?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| spec.to_string());
    let tok_err = |e: crate::text::tokenizer::TokenizerError| ModelError::Invalid(e.to_string());
    let (model, tokenizer, mut eos_ids) = if path.is_file() {
        if path.extension().is_none_or(|x| x != "gguf") {
            return Err(ModelError::Load { file: path.display().to_string(), message: "not a .gguf file or a model directory".into() });
        }
        // A rank of a model split by layers reads only its layers' tensors.
        let c = gguf::convert_layers(&path, None, range.clone().filter(|_| shard.is_none()))?;
        let cfg = gguf::parse_config(&c, &path)?;
        let tj = serde_json::to_vec(&c.tokenizer).expect("json");
        let tokenizer = Tokenizer::from_json(&tj, &c.tokenizer_config, None, &path.display().to_string()).map_err(tok_err)?;
        let eos = cfg.eos_token_ids.clone();
        let model = match shard.clone() {
            Some(sh) => super::build_shard(&cfg, c.weights, super::on_cpu(), sh),
            None => super::build_layers(&cfg, c.weights, super::on_cpu(), range.clone()),
        }
        .map_err(|e| name_missing(e, &cfg, &|_| path.clone(), "the GGUF metadata"))?;
        (model, tokenizer, eos)
    } else {
        let cfg = super::load_config(&path)?;
        let weights = super::load_safetensors_where(&path, &|k| super::in_layers(k, &range))?;
        let files = super::weight_files(&path)?;
        check_shapes(&cfg, &weights, &path.join("config.json"))?;
        let model = match shard.clone() {
            Some(sh) => super::build_shard(&cfg, weights, super::on_cpu(), sh),
            None => super::build_layers(&cfg, weights, super::on_cpu(), range.clone()),
        }
        .map_err(|e| name_missing(e, &cfg, &|t| holder(&path, &files, t), "config.json"))?;
        let tokenizer = Tokenizer::load(&path).map_err(tok_err)?;
        let mut eos = cfg.eos_token_ids.clone();
        if let Ok(text) = std::fs::read_to_string(path.join("generation_config.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                eos.extend(super::config::token_ids(v.get("eos_token_id")));
            }
        }
        (model, tokenizer, eos)
    };
    eos_ids.extend(tokenizer.eos_ids.iter().copied());
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let template = match &tokenizer.chat_template {
        Some(src) => Some(ChatTemplate::new(src).map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?),
        None => None,
    };
    Ok(LoadedModel { model, tokenizer, template, eos_ids, path, name })
}

/// Bytes per element of the safetensors dtypes MLX loads.
fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" | "C64" => 8,
        _ => return None,
    })
}

/// The largest header accepted (the `safetensors` format's own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Check a safetensors file's header before MLX reads it: a length inside the
/// file, a JSON object, and for every tensor a known dtype, a shape MLX can
/// hold, and data offsets inside the file that match dtype x shape. Errors
/// name the file and the tensor.
pub fn check_safetensors(file: &Path) -> Result<(), ModelError> {
    let bad = |m: String| ModelError::Load { file: file.display().to_string(), message: m };
    let corrupt = "the file may be truncated or corrupt";
    let mut f = std::fs::File::open(file).map_err(|e| bad(e.to_string()))?;
    let len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut n = [0u8; 8];
    if len < 8 || f.read_exact(&mut n).is_err() {
        return Err(bad(format!("is {len} bytes, too short for a safetensors header; {corrupt}")));
    }
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n > len - 8 {
        return Err(bad(format!("safetensors header length {n} runs past the end of the file ({len} bytes); {corrupt}")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(format!("cannot read the safetensors header ({e}); {corrupt}")))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("safetensors header is not a JSON object ({e}); {corrupt}")))?;
    let data_len = len - 8 - n;
    for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let tensor = |m: String| bad(format!("tensor '{name}' {m}"));
        let dtype = info.get("dtype").and_then(Value::as_str).ok_or_else(|| tensor("has no dtype".into()))?;
        let size = dtype_bytes(dtype).ok_or_else(|| tensor(format!("has dtype '{dtype}', which MLX does not load")))?;
        let shape = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| tensor("has no shape (a list of sizes)".into()))?;
        if shape.iter().any(|d| *d > i32::MAX as u64) {
            return Err(tensor(format!("has shape {shape:?}, a dimension beyond MLX's limit of {}", i32::MAX)));
        }
        let want = shape.iter().try_fold(size, |n, d| n.checked_mul(*d));
        let offsets = info.get("data_offsets").and_then(Value::as_array).map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>());
        let (begin, end) = match offsets.as_deref() {
            Some([Some(b), Some(e)]) => (*b, *e),
            _ => return Err(tensor("has no data_offsets [begin, end]".into())),
        };
        if begin > end || end > data_len {
            return Err(tensor(format!("has data_offsets [{begin}, {end}] outside the {data_len} bytes of data; {corrupt}")));
        }
        if want != Some(end - begin) {
            return Err(tensor(format!(
                "has data_offsets [{begin}, {end}] ({} bytes) but dtype {dtype} and shape {shape:?} need {}; {corrupt}",
                end - begin,
                want.map_or("more than 2^64".into(), |w| w.to_string())
            )));
        }
    }
    Ok(())
}

/// The weights agree with config.json: the embedding has `vocab_size` rows,
/// and each layer's attention projections and norms the sizes its head counts
/// and `hidden_size` give. Tensors that are absent are left to `build`.
fn check_shapes(cfg: &ModelConfig, w: &HashMap<String, Array>, config: &Path) -> Result<(), ModelError> {
    let bad = |m: String| ModelError::Config { file: config.display().to_string(), message: m };
    let rows = |name: &str| w.get(name).and_then(|a| a.shape().first().copied());
    let expect = |name: &str, want: i32, why: String| match rows(name) {
        Some(got) if got != want => Err(bad(format!("{why} gives {name} {want} rows, but the weights have {got}"))),
        _ => Ok(()),
    };
    expect("model.embed_tokens.weight", cfg.vocab_size, format!("vocab_size {}", cfg.vocab_size))?;
    // Bounded in ModelConfig::parse, so the products fit in an i32.
    let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let heads = format!("num_attention_heads {} x head_dim {}", cfg.num_heads, cfg.head_dim);
        let kv_heads = format!("num_key_value_heads {} x head_dim {}", cfg.num_kv_heads, cfg.head_dim);
        expect(&format!("{p}.self_attn.q_proj.weight"), q, heads)?;
        expect(&format!("{p}.self_attn.k_proj.weight"), kv, kv_heads.clone())?;
        expect(&format!("{p}.self_attn.v_proj.weight"), kv, kv_heads)?;
        expect(&format!("{p}.self_attn.o_proj.weight"), cfg.hidden_size, format!("hidden_size {}", cfg.hidden_size))?;
        expect(&format!("{p}.input_layernorm.weight"), cfg.hidden_size, format!("hidden_size {}", cfg.hidden_size))?;
    }
    Ok(())
}

/// The file that should hold tensor `t`: the one the index maps it to, else
/// the only weights file, else the directory.
fn holder(dir: &Path, files: &[PathBuf], t: &str) -> PathBuf {
    let index: Option<Value> = std::fs::read(dir.join("model.safetensors.index.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    match (index.as_ref().and_then(|v| v.get("weight_map")?.get(t)?.as_str()), files) {
        (Some(f), _) => dir.join(f),
        (None, [one]) => one.clone(),
        (None, _) => dir.to_path_buf(),
    }
}

/// A tensor `build` looked for and did not find, named with the file that
/// should hold it (`file` of the tensor's name) and what asked for it (`by`).
fn name_missing(e: ModelError, cfg: &ModelConfig, file: &dyn Fn(&str) -> PathBuf, by: &str) -> ModelError {
    match e {
        ModelError::MissingTensor(t) => ModelError::Load {
            file: file(&t).display().to_string(),
            message: format!("tensor '{t}' is missing; a {} model of {} layers (from {by}) needs it", cfg.model_type, cfg.num_layers),
        },
        e => e,
    }
}
