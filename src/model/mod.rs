//! Models: configuration, weight loading, one file per architecture over
//! shared layers.

pub mod config;
pub mod gated_delta;
pub mod glm4_moe;
pub mod gguf;
pub mod gguf_quants;
pub mod gguf_types;
pub mod gpt_oss;
pub mod layers;
pub mod llama;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_5;
pub mod qwen3_moe;
pub mod source;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mlx_rs::{Array, Device, DeviceType};

use crate::mlx::MlxError;
pub use config::ModelConfig;
pub use layers::Transformer;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{file}: {message}")]
    Config { file: String, message: String },
    #[error("{file}: {message}")]
    Load { file: String, message: String },
    #[error("weights lack tensor '{0}'")]
    MissingTensor(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Mlx(#[from] MlxError),
}

/// Whether MLX computes on the CPU here (then prefill uses dequantize + BLAS).
pub fn on_cpu() -> bool {
    Device::try_default()
        .and_then(|d| d.get_type())
        .map(|t| matches!(t, DeviceType::Cpu))
        .unwrap_or(true)
}

/// The safetensors files of an MLX-format directory: those the index names,
/// else every `*.safetensors`.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| ModelError::Load { file: index.display().to_string(), message: e.to_string() })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Load {
            file: index.display().to_string(),
            message: format!("not valid JSON: {e}"),
        })?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Load {
            file: index.display().to_string(),
            message: "no weight_map object".into(),
        })?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Load { file: dir.display().to_string(), message: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Load { file: dir.display().to_string(), message: "no *.safetensors files".into() });
    }
    Ok(files)
}

/// Load every tensor of an MLX-format directory.
///
/// The weights are read into memory here (not at the first request); models
/// over [`PROGRESS_BYTES`] report each file on stderr as it is read.
pub fn load_safetensors_dir(dir: &Path) -> Result<HashMap<String, Array>, ModelError> {
    load_safetensors_where(dir, &|_| true)
}

/// [`load_safetensors_dir`] keeping only the tensors `keep` accepts; the
/// others are never read (MLX reads a tensor when it is evaluated).
pub fn load_safetensors_where(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<HashMap<String, Array>, ModelError> {
    let files = weight_files(dir)?;
    let mut sizes = Vec::with_capacity(files.len());
    for file in &files {
        let meta = std::fs::metadata(file)
            .map_err(|_| ModelError::Load { file: file.display().to_string(), message: "file not found".into() })?;
        sizes.push(meta.len());
        // MLX's reader trusts the header; a damaged one is named here first.
        source::check_safetensors(file)?;
    }
    let total: u64 = sizes.iter().sum();
    let gb = |b: u64| b as f64 / 1e9;
    let mut done = 0;
    let mut all = HashMap::new();
    for (i, (file, size)) in files.iter().zip(&sizes).enumerate() {
        let bad = |e: &dyn std::fmt::Display| ModelError::Load {
            file: file.display().to_string(),
            message: format!("cannot read safetensors ({e}); the file may be truncated or corrupt"),
        };
        let mut part = Array::load_safetensors(file).map_err(|e| bad(&e))?;
        part.retain(|k, _| keep(k));
        let arrays: Vec<&Array> = part.values().collect();
        mlx_rs::transforms::eval(arrays).map_err(|e| bad(&e))?;
        done += size;
        if total > PROGRESS_BYTES {
            eprintln!("loading weights: file {}/{}, {:.2}/{:.2} GB", i + 1, files.len(), gb(done), gb(total));
        }
        all.extend(part);
    }
    Ok(all)
}

/// Models larger than this show loading progress.
pub const PROGRESS_BYTES: u64 = 256 << 20;

/// Read and validate `config.json` in `dir`.
pub fn load_config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ModelError::Config { file: path.display().to_string(), message: e.to_string() })?;
    ModelConfig::parse(&text, &path.display().to_string())
}

/// Build the architecture `cfg` names from `weights`; every tensor must be used.
pub fn build(cfg: &ModelConfig, weights: HashMap<String, Array>) -> Result<Transformer, ModelError> {
    build_with(cfg, weights, on_cpu())
}

/// [`build`], choosing whether quantized layers run large batches through
/// dequantize + GEMM (`dense_prefill`, the CPU fast path) or MLX's quantized kernel.
pub fn build_with(cfg: &ModelConfig, weights: HashMap<String, Array>, dense_prefill: bool) -> Result<Transformer, ModelError> {
    build_layers(cfg, weights, dense_prefill, None)
}

/// The decoder layer a tensor name belongs to (`...layers.N....`), if any.
pub fn layer_of(name: &str) -> Option<i32> {
    let (_, rest) = name.split_once("layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// Whether a tensor named `name` is loaded for the decoder layers in `range`
/// (all of them when `None`; tensors of no layer always).
pub fn in_layers(name: &str, range: &Option<std::ops::Range<i32>>) -> bool {
    match (range, layer_of(name)) {
        (Some(r), Some(i)) => r.contains(&i),
        _ => true,
    }
}

/// [`build_with`] for the decoder layers in `range` only (one rank of a
/// pipeline): other layers' tensors are dropped unread; the embedding, final
/// norm and head are built on every rank.
pub fn build_layers(cfg: &ModelConfig, weights: HashMap<String, Array>, dense_prefill: bool, range: Option<std::ops::Range<i32>>) -> Result<Transformer, ModelError> {
    build_part(cfg, weights, dense_prefill, range, None)
}

/// One rank's share of every layer's heads and MLP columns (tensor
/// parallelism); its config gives this rank's head counts.
pub fn build_shard(cfg: &ModelConfig, weights: HashMap<String, Array>, dense_prefill: bool, shard: layers::Shard) -> Result<Transformer, ModelError> {
    let n = shard.ranks;
    if cfg.num_heads % n != 0 || cfg.num_kv_heads % n != 0 {
        return Err(ModelError::Invalid(format!(
            "{} attention heads and {} key-value heads do not divide over {n} ranks: split by layers (--split pipeline) instead",
            cfg.num_heads, cfg.num_kv_heads
        )));
    }
    let mut local = cfg.clone();
    local.num_heads /= n;
    local.num_kv_heads /= n;
    build_part(&local, weights, dense_prefill, None, Some(shard))
}

fn build_part(cfg: &ModelConfig, mut weights: HashMap<String, Array>, dense_prefill: bool, range: Option<std::ops::Range<i32>>, shard: Option<layers::Shard>) -> Result<Transformer, ModelError> {
    weights.retain(|k, _| in_layers(k, &range));
    let mut w = layers::Weights::new(weights, cfg.quantization.clone(), dense_prefill);
    w.layers = range;
    w.shard = shard;
    let model = match cfg.model_type.as_str() {
        "llama" => llama::build(cfg, &mut w)?,
        "qwen2" => qwen2::build(cfg, &mut w)?,
        "qwen3" => qwen3::build(cfg, &mut w)?,
        "qwen3_moe" => qwen3_moe::build(cfg, &mut w)?,
        "glm4_moe" => glm4_moe::build(cfg, &mut w)?,
        "gpt_oss" => gpt_oss::build(cfg, &mut w)?,
        "qwen3_5" | "qwen3_5_moe" => qwen3_5::build(cfg, &mut w)?,
        other => return Err(ModelError::Invalid(format!("unknown architecture '{other}'"))),
    };
    let mut left: Vec<&String> = w.names().collect();
    if !left.is_empty() {
        left.sort();
        return Err(ModelError::Invalid(format!(
            "{} tensors not used by the {} model, e.g. '{}'",
            left.len(),
            cfg.model_type,
            left[0]
        )));
    }
    Ok(model)
}
