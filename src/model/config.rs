//! `config.json` of an MLX-format model: the fields the supported
//! architectures read, and the `quantization` block (global and per layer).

use std::collections::HashMap;

use serde_json::Value;

use super::ModelError;

/// Architectures kvserve runs (the `model_type` of `config.json`).
pub const SUPPORTED: &[&str] = &["llama", "qwen2", "qwen3", "qwen3_moe", "glm4_moe", "gpt_oss", "qwen3_5", "qwen3_5_moe"];

/// Linear attention (qwen3_5's gated delta net) on every layer but each
/// `full_attention_interval`-th.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearAttnConfig {
    pub num_v_heads: i32,
    pub num_k_heads: i32,
    pub head_k_dim: i32,
    pub head_v_dim: i32,
    pub conv_kernel: i32,
    pub full_attention_interval: i32,
}

impl LinearAttnConfig {
    /// Whether decoder layer `i` is a linear-attention layer.
    pub fn is_linear(&self, i: i32) -> bool {
        (i + 1) % self.full_attention_interval != 0
    }
}

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
    Yarn(YarnRope),
}

/// YaRN (mlx-lm's YarnRoPE): per-frequency interpolation between the
/// original and the scaled periods, and an attention scale (`mscale`) on the
/// rotated part of queries and keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnRope {
    pub factor: f32,
    pub original_max_position_embeddings: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    pub mscale: f32,
    pub mscale_all_dim: f32,
}

// Bounds on what config.json may claim: far above any real model, low enough
// that products of them (heads x head_dim, rows x columns) fit in an i32.
const MAX_HEADS: i64 = 1024;
const MAX_HEAD_DIM: i64 = 4096;
const MAX_WIDTH: i64 = 1 << 20;
const MAX_LAYERS: i64 = 4096;
const MAX_VOCAB: i64 = 1 << 24;
const MAX_EXPERTS: i64 = 4096;

/// Typed reads of config.json's fields; each error names the field. A
/// `null` value counts as absent (Hugging Face writes `"head_dim": null`).
struct Fields<'a> {
    obj: &'a serde_json::Map<String, Value>,
    file: &'a str,
}

impl Fields<'_> {
    fn bad(&self, message: String) -> ModelError {
        ModelError::Config { file: self.file.to_string(), message }
    }
    fn get(&self, name: &str) -> Option<&Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }
    /// An integer in `lo..=hi`, if present.
    fn int(&self, name: &str, lo: i64, hi: i64) -> Result<Option<i32>, ModelError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        match v.as_i64() {
            // hi is at most i32::MAX, so the cast is exact.
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x as i32)),
            Some(x) => Err(self.bad(format!("{name} is {x}; it must be between {lo} and {hi}"))),
            None => Err(self.bad(format!("{name} is {v}; it must be an integer"))),
        }
    }
    fn require(&self, name: &str, lo: i64, hi: i64) -> Result<i32, ModelError> {
        self.int(name, lo, hi)?.ok_or_else(|| self.bad(format!("{name} is missing")))
    }
    /// A number for which `ok` holds (`want` says what that means), if present.
    fn float(&self, name: &str, ok: fn(f32) -> bool, want: &str) -> Result<Option<f32>, ModelError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        match v.as_f64().map(|x| x as f32) {
            Some(x) if ok(x) => Ok(Some(x)),
            Some(x) => Err(self.bad(format!("{name} is {x}; it must be {want}"))),
            None => Err(self.bad(format!("{name} is {v}; it must be a number"))),
        }
    }
    fn flag(&self, name: &str) -> Result<Option<bool>, ModelError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(format!("{name} is {v}; it must be true or false"))),
        }
    }
    fn string(&self, name: &str) -> Result<String, ModelError> {
        match self.get(name) {
            None => Err(self.bad(format!("{name} is missing"))),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.bad(format!("{name} is {v}; it must be a string"))),
        }
    }
    fn ints(&self, name: &str) -> Result<Vec<i32>, ModelError> {
        let Some(v) = self.get(name) else { return Ok(vec![]) };
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_i64().and_then(|x| i32::try_from(x).ok())).collect::<Option<Vec<i32>>>())
            .ok_or_else(|| self.bad(format!("{name} is {v}; it must be a list of integers")))
    }
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
    /// Layers before this one keep a dense MLP (glm4_moe's first_k_dense_replace).
    pub first_dense: i32,
    /// How the router turns gate logits into experts and weights.
    pub router: Router,
    /// Width multiple of the always-on shared expert MLP (0: none).
    pub shared_experts: i32,
    /// The shared expert's weight name under `mlp.` (`shared_experts`;
    /// qwen3_5_moe: `shared_expert`, its output scaled by
    /// `sigmoid(shared_expert_gate(x))`).
    pub shared_name: &'static str,
    pub shared_gate: bool,
    /// The experts' gated activation.
    pub activation: ExpertActivation,
    /// Biases on the router and on each expert's projections (gpt_oss).
    pub biases: bool,
    /// Weight names under `mlp.`: the router's and the stacked experts'
    /// (`gate`, `switch_mlp`; gpt_oss: `router`, `experts`).
    pub router_name: &'static str,
    pub experts_name: &'static str,
}

/// The experts' activation of (gate, up).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertActivation {
    /// `silu(gate) * up`.
    Swiglu,
    /// gpt_oss: `(clip(up, -7, 7) + 1) * g * sigmoid(1.702 g)` with `g = min(gate, 7)`.
    SwigluOai,
}

/// A mixture-of-experts router.
#[derive(Debug, Clone, PartialEq)]
pub enum Router {
    /// qwen3_moe: softmax over all experts, the top-k kept.
    Softmax,
    /// gpt_oss: the top-k gate logits, then a softmax over those k.
    TopKSoftmax,
    /// glm4_moe ("noaux_tc"): sigmoid scores plus a learned correction bias
    /// choose the experts, within the `topk_group` best of `n_group` groups;
    /// the weights are the sigmoid scores, times `routed_scaling_factor`.
    SigmoidGrouped { n_group: i32, topk_group: i32, routed_scaling_factor: f32 },
}

impl MoeConfig {
    /// Whether decoder layer `i` uses experts rather than a dense MLP.
    pub fn is_sparse(&self, i: i32) -> bool {
        i >= self.first_dense && !self.mlp_only_layers.contains(&i) && self.num_experts > 0 && (i + 1) % self.sparse_step.max(1) == 0
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
    /// RMS norms on queries and keys per head (qwen3; glm4_moe's use_qk_norm).
    pub qk_norm: bool,
    /// How many of each head's dimensions rotary embedding turns (head_dim,
    /// or head_dim * partial_rotary_factor for glm4_moe).
    pub rope_dims: i32,
    /// Learned per-head attention sinks (gpt_oss).
    pub sinks: bool,
    /// Per layer: the sliding window it attends within, or None (full).
    pub windows: Vec<Option<i32>>,
    /// qwen3_5: gated delta-net layers between the full-attention ones.
    pub linear: Option<LinearAttnConfig>,
    /// qwen3_5: `q_proj` also gives a per-head gate; attention's output is
    /// scaled by its sigmoid before `o_proj`.
    pub attn_output_gate: bool,
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
    /// Parse `config.json` text; `file` names it in errors. Every count is
    /// checked (present, positive, within bounds, heads dividing evenly)
    /// before any arithmetic on it.
    pub fn parse(text: &str, file: &str) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::Config { file: file.to_string(), message: msg };
        let mut value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let top = value.as_object_mut().ok_or_else(|| bad("is not a JSON object".into()))?;
        // Qwen3.5's checkpoints (vision-language ones) nest the language
        // model's fields under text_config; they win over the top level's.
        // As mlx-lm, only text_config's fields are read then; the top level
        // gives the architecture, the quantization and, where text_config
        // has none, the special token ids.
        if let Some(Value::Object(mut text_cfg)) = top.remove("text_config") {
            for k in ["model_type", "quantization", "quantization_config"] {
                match top.remove(k) {
                    Some(v) => {
                        text_cfg.insert(k.to_string(), v);
                    }
                    None => {
                        text_cfg.remove(k);
                    }
                }
            }
            for k in ["eos_token_id", "bos_token_id"] {
                if let (None, Some(v)) = (text_cfg.get(k), top.remove(k)) {
                    text_cfg.insert(k.to_string(), v);
                }
            }
            *top = text_cfg;
        }
        let obj = &*top;
        let f = Fields { obj, file };
        let model_type = f.string("model_type")?;
        if !SUPPORTED.contains(&model_type.as_str()) {
            return Err(bad(format!(
                "unknown architecture '{}' (supported: {})",
                model_type,
                SUPPORTED.join(", ")
            )));
        }
        let quantization = Quantization::parse(obj.get("quantization")).map_err(bad)?;
        let hidden_size = f.require("hidden_size", 1, MAX_WIDTH)?;
        let num_layers = f.require("num_hidden_layers", 1, MAX_LAYERS)?;
        let vocab_size = f.require("vocab_size", 1, MAX_VOCAB)?;
        let num_heads = f.require("num_attention_heads", 1, MAX_HEADS)?;
        let num_kv_heads = f.int("num_key_value_heads", 1, MAX_HEADS)?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(bad(format!(
                "num_key_value_heads {num_kv_heads} does not divide num_attention_heads {num_heads}"
            )));
        }
        let is_glm = model_type == "glm4_moe";
        let is_oss = model_type == "gpt_oss";
        let experts_key = match model_type.as_str() {
            "glm4_moe" => "n_routed_experts",
            "gpt_oss" => "num_local_experts",
            _ => "num_experts",
        };
        let is_qwen35 = model_type.starts_with("qwen3_5");
        let is_moe = model_type == "qwen3_moe" || is_glm || is_oss || model_type == "qwen3_5_moe" || (is_qwen35 && f.int("num_experts", 0, MAX_EXPERTS)?.unwrap_or(0) > 0);
        if is_glm {
            // mlx-lm's glm4_moe has no defaults for these, and Hugging Face's
            // differ from any kvserve could pick (a wrong one builds a wrong model).
            for key in ["tie_word_embeddings", "partial_rotary_factor", "norm_topk_prob", "first_k_dense_replace", "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "use_qk_norm", "attention_bias"] {
                if obj.get(key).is_none_or(Value::is_null) {
                    return Err(bad(format!("{key} is missing; glm4_moe needs it")));
                }
            }
        }
        // A dense model's MLP width; qwen3_moe's experts have their own.
        let intermediate_size = match f.int("intermediate_size", 1, MAX_WIDTH)? {
            Some(n) => n,
            None if is_moe => 0,
            None => return Err(bad("intermediate_size is missing".into())),
        };
        // qwen2 ignores head_dim (mlx-lm derives it from hidden_size).
        let head_dim = match f.int("head_dim", 1, MAX_HEAD_DIM)? {
            Some(d) if model_type != "qwen2" => d,
            _ if hidden_size % num_heads == 0 => hidden_size / num_heads,
            _ => {
                return Err(bad(format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}, so head_dim cannot be derived"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad(format!("head_dim {head_dim} is odd; rotary embeddings need it even")));
        }
        let rope_theta = f.float("rope_theta", |x| x.is_finite() && x > 0.0, "a positive number")?.unwrap_or(10000.0);
        let rms_norm_eps = f.float("rms_norm_eps", |x| x.is_finite() && (0.0..1.0).contains(&x), "between 0 and 1")?;
        let context_length = f.int("max_position_embeddings", 1, i32::MAX.into())?.unwrap_or(4096);
        let rope_traditional = f.flag("rope_traditional")?.unwrap_or(false);
        let attention_bias = f.flag("attention_bias")?.unwrap_or(false);
        // qwen3_5 reads theta, the rotated fraction and the scaling from
        // rope_parameters (mlx-lm's defaults when it is absent; the top
        // level's rope_theta is not read).
        let qwen35_rope = if is_qwen35 {
            match obj.get("rope_parameters") {
                // mlx-lm's defaults for theta and the fraction are read below.
                None | Some(Value::Null) => Some(serde_json::json!({"type": "default"})),
                Some(Value::Object(m)) => {
                    let mut m = m.clone();
                    if m.get("type").is_none_or(Value::is_null) && m.get("rope_type").is_none_or(Value::is_null) {
                        m.insert("type".into(), Value::from("default"));
                    }
                    Some(Value::Object(m))
                }
                Some(other) => return Err(bad(format!("rope_parameters must be an object, got {other}"))),
            }
        } else {
            None
        };
        let rope_theta = match &qwen35_rope {
            Some(p) => match p.get("rope_theta") {
                None | Some(Value::Null) => 100000.0,
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => x as f32,
                    _ => return Err(bad(format!("rope_parameters.rope_theta is {v}; it must be a positive number"))),
                },
            },
            None => rope_theta,
        };
        let scaling_name = if qwen35_rope.is_some() { "rope_parameters" } else { "rope_scaling" };
        let rope_scaling = match qwen35_rope.as_ref().or(obj.get("rope_scaling")) {
            None | Some(Value::Null) => RopeScaling::None,
            Some(Value::Object(m)) => {
                // mlx-lm reads "type" first.
                let kind = m.get("type").filter(|v| !v.is_null()).or_else(|| m.get("rope_type")).and_then(Value::as_str).unwrap_or("");
                // Positive and finite: rotary frequencies are divided by them.
                let num = |k: &str, d: f32| match m.get(k) {
                    None | Some(Value::Null) => Ok(d),
                    Some(v) => match v.as_f64().map(|x| x as f32) {
                        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                        _ => Err(bad(format!("{scaling_name}.{k} is {v}; it must be a positive number"))),
                    },
                };
                match kind {
                    "linear" => RopeScaling::Linear(num("factor", 1.0)?),
                    "llama3" => {
                        let s = Llama3Rope {
                            factor: num("factor", 1.0)?,
                            low_freq_factor: num("low_freq_factor", 1.0)?,
                            high_freq_factor: num("high_freq_factor", 4.0)?,
                            original_max_position_embeddings: num("original_max_position_embeddings", 8192.0)?,
                        };
                        if s.high_freq_factor <= s.low_freq_factor {
                            return Err(bad(format!(
                                "{scaling_name}.high_freq_factor {} must be greater than {scaling_name}.low_freq_factor {}",
                                s.high_freq_factor, s.low_freq_factor
                            )));
                        }
                        RopeScaling::Llama3(s)
                    }
                    "yarn" => {
                        let nonneg = |k: &str, d: f32| match m.get(k) {
                            None | Some(Value::Null) => Ok(d),
                            Some(v) => match v.as_f64().map(|x| x as f32) {
                                Some(x) if x.is_finite() && x >= 0.0 => Ok(x),
                                _ => Err(bad(format!("{scaling_name}.{k} is {v}; it must be a number of 0 or more"))),
                            },
                        };
                        RopeScaling::Yarn(YarnRope {
                            factor: num("factor", 1.0)?,
                            original_max_position_embeddings: num("original_max_position_embeddings", 4096.0)?,
                            beta_fast: num("beta_fast", 32.0)?,
                            beta_slow: num("beta_slow", 1.0)?,
                            mscale: nonneg("mscale", 1.0)?,
                            mscale_all_dim: nonneg("mscale_all_dim", 0.0)?,
                        })
                    }
                    // mlx-lm's mrope (3 sections) is plain RoPE for text.
                    "default" | "mrope" => RopeScaling::None,
                    other => return Err(bad(format!("{scaling_name} type '{other}' is not supported (linear, llama3, yarn)"))),
                }
            }
            Some(other) => return Err(bad(format!("{scaling_name} must be an object, got {other}"))),
        };
        let is_qwen2 = model_type == "qwen2";
        let is_qwen3 = model_type.starts_with("qwen3");
        let moe = if is_moe {
            let router = if is_glm {
                let method = obj.get("topk_method").and_then(Value::as_str).unwrap_or("noaux_tc");
                let scoring = obj.get("scoring_func").and_then(Value::as_str).unwrap_or("sigmoid");
                if method != "noaux_tc" || scoring != "sigmoid" {
                    return Err(bad(format!("glm4_moe with topk_method '{method}' and scoring_func '{scoring}' is not supported (noaux_tc, sigmoid)")));
                }
                let n_group = f.int("n_group", 1, MAX_EXPERTS)?.unwrap_or(1);
                let topk_group = f.int("topk_group", 1, MAX_EXPERTS)?.unwrap_or(n_group);
                if topk_group > n_group {
                    return Err(bad(format!("topk_group {topk_group} is more than n_group {n_group}")));
                }
                let routed_scaling_factor = f.float("routed_scaling_factor", |x| x.is_finite() && x > 0.0, "a positive number")?.unwrap_or(1.0);
                Router::SigmoidGrouped { n_group, topk_group, routed_scaling_factor }
            } else if is_oss {
                Router::TopKSoftmax
            } else {
                Router::Softmax
            };
            Some(MoeConfig {
                router,
                first_dense: f.int("first_k_dense_replace", 0, MAX_LAYERS)?.unwrap_or(0),
                shared_experts: if is_glm {
                    f.int("n_shared_experts", 0, MAX_EXPERTS)?.unwrap_or(0)
                } else if is_qwen35 {
                    1
                } else {
                    0
                },
                shared_name: if is_qwen35 { "shared_expert" } else { "shared_experts" },
                shared_gate: is_qwen35,
                activation: if is_oss { ExpertActivation::SwigluOai } else { ExpertActivation::Swiglu },
                biases: is_oss,
                router_name: if is_oss { "router" } else { "gate" },
                experts_name: if is_oss { "experts" } else { "switch_mlp" },
                num_experts: f.int(experts_key, 0, MAX_EXPERTS)?.unwrap_or(0),
                experts_per_token: f.int("num_experts_per_tok", 0, MAX_EXPERTS)?.unwrap_or(0),
                intermediate_size: f.int(if is_oss { "intermediate_size" } else { "moe_intermediate_size" }, 1, MAX_WIDTH)?.unwrap_or(0),
                // mlx-lm's qwen3_5 puts experts on every layer.
                sparse_step: if is_qwen35 { 1 } else { f.int("decoder_sparse_step", 1, MAX_LAYERS)?.unwrap_or(1) },
                mlp_only_layers: if is_qwen35 { vec![] } else { f.ints("mlp_only_layers")? },
                norm_topk_prob: f.flag("norm_topk_prob")?.unwrap_or(is_qwen35),
            })
        } else {
            None
        };
        if let Some(m) = &moe {
            if m.num_experts <= 0 || m.experts_per_token <= 0 || m.experts_per_token > m.num_experts {
                return Err(bad(format!(
                    "{model_type} needs 0 < num_experts_per_tok ({}) <= {experts_key} ({})",
                    m.experts_per_token, m.num_experts
                )));
            }
            if let Router::SigmoidGrouped { n_group, topk_group, .. } = m.router {
                let per_group = m.num_experts / n_group;
                if m.num_experts % n_group != 0 || per_group < 2 || topk_group * per_group < m.experts_per_token {
                    return Err(bad(format!(
                        "n_group {n_group} must divide the {} experts into groups of 2 or more, and topk_group {topk_group} groups must hold num_experts_per_tok {}",
                        m.num_experts, m.experts_per_token
                    )));
                }
            }
        }
        let rope_dims = if is_glm || is_qwen35 {
            let factor = match &qwen35_rope {
                Some(p) => match p.get("partial_rotary_factor") {
                    None | Some(Value::Null) => 0.25,
                    Some(v) => match v.as_f64() {
                        Some(x) if x > 0.0 && x <= 1.0 => x as f32,
                        _ => return Err(bad(format!("rope_parameters.partial_rotary_factor is {v}; it must be in (0, 1]"))),
                    },
                },
                None => f.float("partial_rotary_factor", |x| x > 0.0 && x <= 1.0, "in (0, 1]")?.unwrap_or(1.0),
            };
            let d = (head_dim as f32 * factor) as i32;
            if d < 2 || d % 2 != 0 {
                return Err(bad(format!("head_dim {head_dim} times partial_rotary_factor {factor} is {d}; rotary embeddings need an even number")));
            }
            d
        } else {
            head_dim
        };
        let windows = if is_oss {
            let window = f.int("sliding_window", 1, i32::MAX.into())?.unwrap_or(128);
            let types: Vec<String> = match obj.get("layer_types") {
                None | Some(Value::Null) => (0..num_layers).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }.to_string()).collect(),
                Some(Value::Array(a)) => a.iter().map(|v| v.as_str().unwrap_or("?").to_string()).collect(),
                Some(v) => return Err(bad(format!("layer_types is {v}; it must be a list of \"sliding_attention\" or \"full_attention\""))),
            };
            if types.len() != num_layers as usize {
                return Err(bad(format!("layer_types lists {} layers; num_hidden_layers is {num_layers}", types.len())));
            }
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "sliding_attention" => Ok(Some(window)),
                    "full_attention" => Ok(None),
                    other => Err(bad(format!("layer_types[{i}] is '{other}'; it must be \"sliding_attention\" or \"full_attention\""))),
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            vec![None; num_layers as usize]
        };
        let linear = if is_qwen35 {
            let l = LinearAttnConfig {
                num_v_heads: f.int("linear_num_value_heads", 1, MAX_HEADS)?.unwrap_or(64),
                num_k_heads: f.int("linear_num_key_heads", 1, MAX_HEADS)?.unwrap_or(16),
                head_k_dim: f.int("linear_key_head_dim", 1, MAX_HEAD_DIM)?.unwrap_or(192),
                head_v_dim: f.int("linear_value_head_dim", 1, MAX_HEAD_DIM)?.unwrap_or(128),
                conv_kernel: f.int("linear_conv_kernel_dim", 2, 64)?.unwrap_or(4),
                full_attention_interval: f.int("full_attention_interval", 1, MAX_LAYERS)?.unwrap_or(4),
            };
            if l.num_v_heads % l.num_k_heads != 0 {
                return Err(bad(format!("linear_num_value_heads {} must be a multiple of linear_num_key_heads {}", l.num_v_heads, l.num_k_heads)));
            }
            Some(l)
        } else {
            None
        };
        Ok(ModelConfig {
            sinks: is_oss,
            windows,
            linear,
            attn_output_gate: is_qwen35,
            qk_norm: is_qwen3 || (is_glm && f.flag("use_qk_norm")?.unwrap_or(false)),
            rope_dims,
            model_type,
            hidden_size,
            num_layers,
            intermediate_size,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_traditional,
            rope_scaling,
            context_length,
            // gpt_oss always has its own head (mlx-lm reads no such key for it).
            tie_word_embeddings: !is_oss && f.flag("tie_word_embeddings")?.unwrap_or(!is_qwen3),
            qkv_bias: is_qwen2 || is_oss || attention_bias,
            o_bias: is_oss || (!is_qwen2 && !is_glm && attention_bias),
            mlp_bias: f.flag("mlp_bias")?.unwrap_or(false),
            moe,
            eos_token_ids: token_ids(obj.get("eos_token_id")),
            bos_token_id: token_ids(obj.get("bos_token_id")).first().copied(),
            quantization,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig, String> {
        ModelConfig::parse(&v.to_string(), "config.json").map_err(|e| e.to_string())
    }

    fn base(model_type: &str) -> Value {
        json!({"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100})
    }

    #[test]
    fn head_dim_comes_from_the_config_except_for_qwen2() {
        let mut v = base("qwen3");
        v["head_dim"] = json!(32);
        assert_eq!(parse(v.clone()).unwrap().head_dim, 32);
        v["model_type"] = json!("qwen2");
        assert_eq!(parse(v).unwrap().head_dim, 16);
        let mut v = base("llama");
        v["head_dim"] = Value::Null;
        assert_eq!(parse(v).unwrap().head_dim, 16);
    }

    #[test]
    fn qwen3_5_reads_text_config_and_rope_parameters() {
        // Hugging Face's layout: the language model's fields under text_config.
        let v = json!({"model_type": "qwen3_5", "tie_word_embeddings": true, "eos_token_id": 7,
            "quantization": {"group_size": 64, "bits": 4},
            "text_config": {"model_type": "qwen3_5_text", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 100,
                "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
                "full_attention_interval": 2, "rope_theta": 5.0,
                "rope_parameters": {"rope_type": "default", "mrope_section": [11, 11, 10], "rope_theta": 10000000.0, "partial_rotary_factor": 0.25}}});
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.model_type, "qwen3_5");
        assert!(!c.tie_word_embeddings, "the top level's tie_word_embeddings is not read (mlx-lm reads text_config only)");
        assert_eq!(c.eos_token_ids, vec![7], "special ids from the top level when text_config has none");
        assert_eq!(c.quantization.global.map(|q| q.bits), Some(4));
        assert_eq!((c.rope_theta, c.rope_dims, c.attn_output_gate, c.qk_norm), (10_000_000.0, 8, true, true), "theta and the rotated fraction from rope_parameters");
        let l = c.linear.unwrap();
        assert!(l.is_linear(0) && !l.is_linear(1) && l.is_linear(2) && !l.is_linear(3));
        // mrope is plain RoPE for text; no rope_parameters: mlx-lm's defaults.
        let mut m = v.clone();
        m["text_config"]["rope_parameters"]["type"] = json!("mrope");
        assert_eq!(parse(m).unwrap().rope_scaling, RopeScaling::None);
        let mut d = v.clone();
        d["text_config"].as_object_mut().unwrap().remove("rope_parameters");
        let c = parse(d).unwrap();
        assert_eq!((c.rope_theta, c.rope_dims), (100_000.0, 8));
        let mut bad = v.clone();
        bad["text_config"]["rope_parameters"]["type"] = json!("longrope");
        assert!(parse(bad).unwrap_err().contains("rope_parameters type 'longrope' is not supported"));
        let mut bad = v;
        bad["text_config"]["linear_num_key_heads"] = json!(3);
        assert!(parse(bad).unwrap_err().contains("linear_num_value_heads 4 must be a multiple of linear_num_key_heads 3"));
    }

    #[test]
    fn glm4_moe_reads_its_router_partial_rotary_and_biases() {
        let mut v = base("glm4_moe");
        for (k, x) in [("head_dim", json!(32)), ("n_routed_experts", json!(8)), ("num_experts_per_tok", json!(2)), ("moe_intermediate_size", json!(64)),
            ("n_group", json!(4)), ("topk_group", json!(2)), ("n_shared_experts", json!(1)), ("routed_scaling_factor", json!(2.5)),
            ("first_k_dense_replace", json!(1)), ("use_qk_norm", json!(true)), ("attention_bias", json!(true)), ("partial_rotary_factor", json!(0.5)),
            ("norm_topk_prob", json!(true)), ("tie_word_embeddings", json!(false))] {
            v[k] = x;
        }
        let c = parse(v.clone()).unwrap();
        let m = c.moe.as_ref().unwrap();
        assert_eq!(m.router, Router::SigmoidGrouped { n_group: 4, topk_group: 2, routed_scaling_factor: 2.5 });
        assert_eq!((m.num_experts, m.shared_experts, m.first_dense), (8, 1, 1));
        assert!(!m.is_sparse(0) && m.is_sparse(1));
        assert_eq!((c.rope_dims, c.head_dim, c.qk_norm, c.qkv_bias, c.o_bias), (16, 32, true, true, false));
        // Groups that cannot hold the experts chosen, another router: named.
        let mut bad = v.clone();
        bad["n_group"] = json!(3);
        assert!(parse(bad).unwrap_err().contains("n_group 3 must divide the 8 experts"));
        let mut bad = v.clone();
        bad["topk_method"] = json!("greedy");
        assert!(parse(bad).unwrap_err().contains("topk_method 'greedy'"));
        let mut bad = v.clone();
        bad["partial_rotary_factor"] = json!(0.03);
        assert!(parse(bad).unwrap_err().contains("partial_rotary_factor"));
        let mut bad = v;
        bad.as_object_mut().unwrap().remove("norm_topk_prob");
        assert_eq!(parse(bad).unwrap_err(), "config.json: norm_topk_prob is missing; glm4_moe needs it");
    }

    #[test]
    fn gpt_oss_reads_windows_sinks_and_yarn() {
        let mut v = base("gpt_oss");
        for (k, x) in [("head_dim", json!(32)), ("num_hidden_layers", json!(4)), ("num_local_experts", json!(8)), ("num_experts_per_tok", json!(2)),
            ("sliding_window", json!(8)), ("tie_word_embeddings", json!(true)),
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096}))] {
            v[k] = x;
        }
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.windows, vec![Some(8), None, Some(8), None]);
        assert!(c.sinks && c.qkv_bias && c.o_bias && !c.tie_word_embeddings);
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.router.clone(), m.activation, m.biases, m.router_name, m.experts_name), (Router::TopKSoftmax, ExpertActivation::SwigluOai, true, "router", "experts"));
        assert!(matches!(c.rope_scaling, RopeScaling::Yarn(y) if y.factor == 32.0 && y.mscale == 1.0 && y.mscale_all_dim == 0.0));
        let mut bad = v.clone();
        bad["layer_types"] = json!(["sliding_attention", "full_attention"]);
        assert_eq!(parse(bad).unwrap_err(), "config.json: layer_types lists 2 layers; num_hidden_layers is 4");
        let mut bad = v;
        bad["layer_types"] = json!(["sliding_attention", "full_attention", "local", "full_attention"]);
        assert!(parse(bad).unwrap_err().contains("layer_types[2] is 'local'"));
    }

    #[test]
    fn only_moe_models_may_leave_out_intermediate_size() {
        let mut v = base("qwen3_moe");
        v.as_object_mut().unwrap().remove("intermediate_size");
        assert_eq!(
            parse(v.clone()).unwrap_err(),
            "config.json: qwen3_moe needs 0 < num_experts_per_tok (0) <= num_experts (0)"
        );
        v["num_experts"] = json!(8);
        v["num_experts_per_tok"] = json!(2);
        assert_eq!(parse(v).unwrap().intermediate_size, 0);
        let mut v = base("llama");
        v.as_object_mut().unwrap().remove("intermediate_size");
        assert_eq!(parse(v).unwrap_err(), "config.json: intermediate_size is missing");
    }

    #[test]
    fn rope_scaling_numbers_are_checked() {
        let mut v = base("llama");
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0});
        assert_eq!(
            parse(v.clone()).unwrap_err(),
            "config.json: rope_scaling.high_freq_factor 4 must be greater than rope_scaling.low_freq_factor 4"
        );
        v["rope_scaling"]["factor"] = json!(-1);
        assert_eq!(parse(v).unwrap_err(), "config.json: rope_scaling.factor is -1; it must be a positive number");
    }

    #[test]
    fn an_expert_count_past_its_bound_is_named() {
        let mut v = base("qwen3_moe");
        v["num_experts"] = json!(1 << 20);
        assert_eq!(parse(v).unwrap_err(), "config.json: num_experts is 1048576; it must be between 0 and 4096");
    }
}
