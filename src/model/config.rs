//! `config.json` of an MLX-format model: the fields the supported
//! architectures read, and the `quantization` block (global and per layer).

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// Architectures kvserve runs (the `model_type` of `config.json`).
pub const SUPPORTED: &[&str] = &["llama", "qwen2", "qwen3", "qwen3_moe"];

/// Quantization of one layer: MLX affine, `bits` per value, one scale and
/// bias per `group_size` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub group_size: i32,
    pub bits: i32,
}

/// The `quantization` block: a global spec plus per-layer overrides
/// (`"model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8}`, or `false`).
#[derive(Debug, Clone, Default)]
pub struct Quantization {
    pub global: Option<QuantSpec>,
    pub per_layer: HashMap<String, Option<QuantSpec>>,
}

impl Quantization {
    fn parse(v: Option<&Value>) -> Result<Self, String> {
        let Some(Value::Object(map)) = v else { return Ok(Self::default()) };
        let spec = |m: &serde_json::Map<String, Value>, what: &str| -> Result<QuantSpec, String> {
            let get = |k: &str| m.get(k).and_then(Value::as_i64).map(|x| x as i32);
            if let Some(mode) = m.get("mode").and_then(Value::as_str) {
                if mode != "affine" {
                    return Err(format!("{what}: quantization mode '{mode}' is not supported (only affine)"));
                }
            }
            let spec = QuantSpec { group_size: get("group_size").unwrap_or(64), bits: get("bits").unwrap_or(4) };
            if ![2, 3, 4, 5, 6, 8].contains(&spec.bits) || ![32, 64, 128].contains(&spec.group_size) {
                return Err(format!(
                    "{what}: bits {} / group_size {} not supported (bits 2-8, group size 32, 64 or 128)",
                    spec.bits, spec.group_size
                ));
            }
            Ok(spec)
        };
        let mut q = Quantization { global: Some(spec(map, "quantization")?), per_layer: HashMap::new() };
        for (k, v) in map {
            match v {
                Value::Object(m) => {
                    q.per_layer.insert(k.clone(), Some(spec(m, &format!("quantization.{k}"))?));
                }
                Value::Bool(false) => {
                    q.per_layer.insert(k.clone(), None);
                }
                _ => {}
            }
        }
        Ok(q)
    }

    /// The spec for the layer at `path` (e.g. `model.layers.3.self_attn.q_proj`).
    pub fn for_layer(&self, path: &str) -> Option<QuantSpec> {
        match self.per_layer.get(path) {
            Some(s) => *s,
            None => self.global,
        }
    }
}

/// Llama 3 rotary scaling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear(f32),
    Llama3(Llama3Rope),
}

#[derive(Debug, Deserialize)]
struct Raw {
    model_type: String,
    hidden_size: i32,
    num_hidden_layers: i32,
    intermediate_size: Option<i32>,
    num_attention_heads: i32,
    num_key_value_heads: Option<i32>,
    head_dim: Option<i32>,
    vocab_size: i32,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    #[serde(default)]
    rope_traditional: bool,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<i32>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
    // qwen3_moe
    num_experts: Option<i32>,
    num_experts_per_tok: Option<i32>,
    moe_intermediate_size: Option<i32>,
    decoder_sparse_step: Option<i32>,
    #[serde(default)]
    mlp_only_layers: Vec<i32>,
    #[serde(default)]
    norm_topk_prob: bool,
}

/// Mixture-of-experts layout (qwen3_moe).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: i32,
    pub experts_per_token: i32,
    pub intermediate_size: i32,
    pub sparse_step: i32,
    pub mlp_only_layers: Vec<i32>,
    pub norm_topk_prob: bool,
}

impl MoeConfig {
    /// Whether decoder layer `i` uses experts rather than a dense MLP.
    pub fn is_sparse(&self, i: i32) -> bool {
        !self.mlp_only_layers.contains(&i) && self.num_experts > 0 && (i + 1) % self.sparse_step.max(1) == 0
    }
}

/// Everything kvserve needs from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: i32,
    pub num_layers: i32,
    pub intermediate_size: i32,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub vocab_size: i32,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_traditional: bool,
    pub rope_scaling: RopeScaling,
    /// The model's context length (max_position_embeddings).
    pub context_length: i32,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (qwen2 always; llama when attention_bias).
    pub qkv_bias: bool,
    /// Bias on the output projection (llama attention_bias).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMS norms on queries and keys per head (qwen3).
    pub qk_norm: bool,
    pub moe: Option<MoeConfig>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub quantization: Quantization,
}

/// Token ids given as a number or a list of numbers.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Parse `config.json` text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::Config { file: file.to_string(), message: msg };
        let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let raw: Raw = serde_json::from_value(value.clone()).map_err(|e| bad(e.to_string()))?;
        if !SUPPORTED.contains(&raw.model_type.as_str()) {
            return Err(bad(format!(
                "unknown architecture '{}' (supported: {})",
                raw.model_type,
                SUPPORTED.join(", ")
            )));
        }
        let quantization = Quantization::parse(value.get("quantization")).map_err(bad)?;
        let positive = |name: &str, v: i32| {
            if v > 0 {
                Ok(v)
            } else {
                Err(bad(format!("{name} must be positive, got {v}")))
            }
        };
        let num_heads = positive("num_attention_heads", raw.num_attention_heads)?;
        let num_kv_heads = positive("num_key_value_heads", raw.num_key_value_heads.unwrap_or(num_heads))?;
        if num_heads % num_kv_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let hidden_size = positive("hidden_size", raw.hidden_size)?;
        // qwen2 ignores head_dim (mlx-lm derives it from hidden_size).
        let head_dim = match raw.head_dim {
            Some(d) if raw.model_type != "qwen2" => positive("head_dim", d)?,
            _ => hidden_size / num_heads,
        };
        let rope_theta = raw.rope_theta.unwrap_or(10000.0);
        let rope_scaling = match &raw.rope_scaling {
            None | Some(Value::Null) => RopeScaling::None,
            Some(Value::Object(m)) => {
                let kind = m.get("rope_type").or_else(|| m.get("type")).and_then(Value::as_str).unwrap_or("");
                let f = |k: &str, d: f32| m.get(k).and_then(Value::as_f64).map(|x| x as f32).unwrap_or(d);
                match kind {
                    "linear" => RopeScaling::Linear(f("factor", 1.0)),
                    "llama3" => RopeScaling::Llama3(Llama3Rope {
                        factor: f("factor", 1.0),
                        low_freq_factor: f("low_freq_factor", 1.0),
                        high_freq_factor: f("high_freq_factor", 4.0),
                        original_max_position_embeddings: f("original_max_position_embeddings", 8192.0),
                    }),
                    "default" => RopeScaling::None,
                    other => return Err(bad(format!("rope_scaling type '{other}' is not supported (linear, llama3)"))),
                }
            }
            Some(other) => return Err(bad(format!("rope_scaling must be an object, got {other}"))),
        };
        let is_qwen2 = raw.model_type == "qwen2";
        let raw_is_qwen3 = raw.model_type.starts_with("qwen3");
        let moe = (raw.model_type == "qwen3_moe").then(|| MoeConfig {
            num_experts: raw.num_experts.unwrap_or(0),
            experts_per_token: raw.num_experts_per_tok.unwrap_or(0),
            intermediate_size: raw.moe_intermediate_size.unwrap_or(0),
            sparse_step: raw.decoder_sparse_step.unwrap_or(1),
            mlp_only_layers: raw.mlp_only_layers.clone(),
            norm_topk_prob: raw.norm_topk_prob,
        });
        if let Some(m) = &moe {
            if m.num_experts <= 0 || m.experts_per_token <= 0 || m.experts_per_token > m.num_experts {
                return Err(bad(format!(
                    "qwen3_moe needs 0 < num_experts_per_tok ({}) <= num_experts ({})",
                    m.experts_per_token, m.num_experts
                )));
            }
        }
        Ok(ModelConfig {
            qk_norm: raw.model_type.starts_with("qwen3"),
            model_type: raw.model_type,
            hidden_size,
            num_layers: positive("num_hidden_layers", raw.num_hidden_layers)?,
            intermediate_size: raw.intermediate_size.unwrap_or(0),
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: positive("vocab_size", raw.vocab_size)?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_traditional: raw.rope_traditional,
            rope_scaling,
            context_length: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(!raw_is_qwen3),
            qkv_bias: is_qwen2 || raw.attention_bias,
            o_bias: !is_qwen2 && raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            moe,
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            quantization,
        })
    }
}
