//! Layers shared by every architecture: linear (dense or quantized),
//! embedding, RMS norm, rotary embedding, attention, gated MLP, and the
//! decoder stack they make. Weight names follow Hugging Face / mlx-lm.

use std::collections::HashMap;

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::{self, indexing::{Ellipsis, IndexOp}};
use mlx_rs::{Array, Dtype};

use super::config::{ModelConfig, QuantSpec, RopeScaling};
use super::ModelError;
use crate::cache::kv::LayerKv;
use crate::kernels::{self, QuantMatrix, Scales};
use crate::mlx::{MlxError, QuantizedMatrix};

type Result<T> = std::result::Result<T, ModelError>;

/// On the CPU, MLX's 4-bit kernel does about 2.3 GFLOPS whatever the batch,
/// while dequantize + BLAS GEMM reaches about 100: from this many rows on,
/// quantized layers go through the dense path.
pub const CPU_DEQUANT_MIN_ROWS: i32 = 4;

/// The weights of one model, taken out by name as layers are built.
pub struct Weights {
    map: HashMap<String, Array>,
    /// Compute dtype for floating-point tensors: float32 on the CPU (MLX's
    /// CPU kernels and kvserve's own run in f32); `None` on a GPU, where each
    /// tensor keeps the dtype it was stored in (bf16/f16 for most models), as
    /// mlx-lm does, so activations stay in what MLX's GPU kernels want.
    pub dtype: Option<Dtype>,
    pub quant: super::config::Quantization,
    pub cpu_dense_prefill: bool,
    /// The decoder layers to build (all but for one rank of a pipeline).
    pub layers: Option<std::ops::Range<i32>>,
    /// Tensor parallelism: this rank's share `(rank, ranks)` of every
    /// attention head and MLP column, and the group whose all_sum joins the
    /// shares after each block's attention and MLP.
    pub shard: Option<Shard>,
}

/// One rank's share of a model split by heads and MLP columns (tensor
/// parallelism, as mlx-lm's sharded models): q/k/v and gate/up keep their
/// share of the output rows, o_proj and down_proj the same share of their
/// input columns, and the ranks' partial outputs are summed.
#[derive(Clone)]
pub struct Shard {
    pub rank: i32,
    pub ranks: i32,
    pub group: std::sync::Arc<crate::mlx::distributed::Group>,
}

/// Which part of a weight matrix a rank keeps.
#[derive(Clone, Copy)]
pub(crate) enum Part {
    /// Its share of the output rows.
    Rows,
    /// Its share of the input columns.
    Cols,
}

impl Weights {
    pub fn new(map: HashMap<String, Array>, quant: super::config::Quantization, cpu_dense_prefill: bool) -> Self {
        let dtype = if super::on_cpu() { Some(Dtype::Float32) } else { None };
        Weights { map, dtype, quant, cpu_dense_prefill, layers: None, shard: None }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Array> {
        self.map.remove(name)
    }

    pub fn insert(&mut self, name: String, a: Array) {
        self.map.insert(name, a);
    }

    /// A tensor without taking it.
    pub fn peek(&self, name: &str) -> Option<&Array> {
        self.map.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// Take a tensor; floating-point tensors are cast to the compute dtype.
    pub fn take(&mut self, name: &str) -> Result<Array> {
        let a = self.map.remove(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let float = matches!(a.dtype(), Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32 | Dtype::Float64);
        if let Some(dtype) = self.dtype.filter(|d| float && a.dtype() != *d) {
            Ok(a.as_dtype(dtype).map_err(MlxError::from)?)
        } else {
            Ok(a)
        }
    }

    fn take_raw(&mut self, name: &str) -> Result<Array> {
        self.map.remove(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// Quantized triple at `prefix` if `prefix.scales` exists.
    pub fn quantized(&mut self, prefix: &str) -> Result<Option<QuantizedMatrix>> {
        if !self.contains(&format!("{prefix}.scales")) {
            return Ok(None);
        }
        let QuantSpec { group_size, bits } = self.quant.for_layer(prefix).ok_or_else(|| {
            ModelError::Invalid(format!("{prefix} has scales but config.json has no quantization for it"))
        })?;
        let packed = self.take_raw(&format!("{prefix}.weight"))?;
        if packed.dtype() != Dtype::Uint32 {
            return Err(ModelError::Invalid(format!("{prefix}.weight: quantized weights must be uint32, got {:?}", packed.dtype())));
        }
        let scales = self.take(&format!("{prefix}.scales"))?;
        let biases = self.take(&format!("{prefix}.biases"))?;
        Ok(Some(QuantizedMatrix { packed, scales, biases, group_size, bits }))
    }

    pub fn linear(&mut self, prefix: &str, bias: bool) -> Result<Linear> {
        let weight = match self.quantized(prefix)? {
            Some(q) => LinearWeight::Quantized(q),
            None => LinearWeight::Dense(self.take(&format!("{prefix}.weight"))?),
        };
        let bias = if bias { Some(self.take(&format!("{prefix}.bias"))?) } else { None };
        Ok(Linear { weight, bias, dense_prefill: self.cpu_dense_prefill })
    }

    /// [`linear`](Self::linear), keeping only this rank's `part` when the
    /// model is sharded ([`Shard`]).
    fn linear_part(&mut self, prefix: &str, bias: bool, part: Part) -> Result<Linear> {
        let l = self.linear(prefix, bias)?;
        let (weight, bias) = self.cut_to_share(prefix, l.weight, l.bias, part)?;
        Ok(Linear { weight, bias, ..l })
    }

    /// A weight `[.., out, in]` (dense, or MLX's packed values, scales and
    /// biases) and its bias `[.., out]`, cut to this rank's `part` when the
    /// model is sharded ([`Shard`]): a contiguous copy of its share of the
    /// output rows, or of the input columns (for quantized weights a column
    /// share must start and end on a quantization group). The leading axes
    /// (a mixture's experts) are kept whole. Unchanged when not sharded.
    pub(crate) fn cut_to_share(&self, prefix: &str, weight: LinearWeight, bias: Option<Array>, part: Part) -> Result<(LinearWeight, Option<Array>)> {
        let Some(sh) = self.shard.clone() else { return Ok((weight, bias)) };
        let bad = |what: String| ModelError::Invalid(format!("{prefix}: cannot be split over {} ranks by heads: {what}", sh.ranks));
        let share = |len: i32, unit: &str| -> Result<std::ops::Range<i32>> {
            if len % sh.ranks != 0 {
                return Err(bad(format!("{len} does not divide into {} shares of whole {unit}", sh.ranks)));
            }
            let per = len / sh.ranks;
            Ok(sh.rank * per..(sh.rank + 1) * per)
        };
        // Rows: the second-to-last axis; columns (and a bias's rows): the last.
        let cut = |a: &Array, r: std::ops::Range<i32>, last: bool| -> std::result::Result<Array, MlxError> {
            let piece = if last { a.index((Ellipsis, r)) } else { a.index((Ellipsis, r, ..)) };
            let c = piece.contiguous()?;
            c.eval()?;
            Ok(c)
        };
        // (A file's tensor of too few dimensions is an error, never an index out of bounds.)
        let dim = |a: &Array, from_end: usize| -> Result<i32> {
            a.ndim().checked_sub(from_end).map(|i| a.shape()[i]).ok_or_else(|| bad(format!("a tensor of {} dimensions where {from_end} at least belong", a.ndim())))
        };
        let weight = match (&weight, part) {
            (LinearWeight::Dense(w), Part::Rows) => LinearWeight::Dense(cut(w, share(dim(w, 2)?, "rows")?, false)?),
            (LinearWeight::Dense(w), Part::Cols) => LinearWeight::Dense(cut(w, share(dim(w, 1)?, "columns")?, true)?),
            (LinearWeight::Quantized(q), Part::Rows) => {
                let r = share(dim(&q.packed, 2)?, "rows")?;
                LinearWeight::Quantized(QuantizedMatrix { packed: cut(&q.packed, r.clone(), false)?, scales: cut(&q.scales, r.clone(), false)?, biases: cut(&q.biases, r, false)?, ..q.clone() })
            }
            (LinearWeight::Quantized(q), Part::Cols) => {
                // Columns in groups: each rank's share is whole groups (and whole u32 words).
                let groups = share(dim(&q.scales, 1)?, &format!("groups of {}", q.group_size))?;
                if (q.group_size * q.bits) % 32 != 0 {
                    return Err(bad(format!("a group of {} {}-bit values is not whole 32-bit words", q.group_size, q.bits)));
                }
                let per_group = q.group_size * q.bits / 32;
                let words = groups.start * per_group..groups.end * per_group;
                LinearWeight::Quantized(QuantizedMatrix { packed: cut(&q.packed, words, true)?, scales: cut(&q.scales, groups.clone(), true)?, biases: cut(&q.biases, groups, true)?, ..q.clone() })
            }
        };
        let bias = match (bias, part) {
            (Some(b), Part::Rows) => Some(cut(&b, share(dim(&b, 1)?, "rows")?, true)?),
            // The ranks' outputs are summed: the bias is added once, by rank 0.
            (Some(b), Part::Cols) => (sh.rank == 0).then_some(b),
            (None, _) => None,
        };
        Ok((weight, bias))
    }

    /// This rank's share of a per-head vector (`[heads]`) when sharded.
    fn heads_share(&self, prefix: &str, a: Array) -> Result<Array> {
        let Some(sh) = &self.shard else { return Ok(a) };
        let Some(&n) = a.shape().last() else { return Err(ModelError::Invalid(format!("{prefix}: a scalar where one value per head belongs"))) };
        if n % sh.ranks != 0 {
            return Err(ModelError::Invalid(format!("{prefix}: {n} heads do not divide over {} ranks", sh.ranks)));
        }
        let per = n / sh.ranks;
        let c = a.index((Ellipsis, sh.rank * per..(sh.rank + 1) * per)).contiguous().map_err(MlxError::from)?;
        c.eval().map_err(MlxError::from)?;
        Ok(c)
    }

    pub fn embedding(&mut self, prefix: &str) -> Result<Embedding> {
        Ok(match self.quantized(prefix)? {
            Some(q) => Embedding::Quantized(q),
            None => Embedding::Dense(self.take(&format!("{prefix}.weight"))?),
        })
    }

    pub fn rms_norm(&mut self, prefix: &str, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.take(&format!("{prefix}.weight"))?, eps })
    }
}

pub enum LinearWeight {
    Dense(Array),
    Quantized(QuantizedMatrix),
}

/// `y = x W^T + b`.
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Array>,
    dense_prefill: bool,
}

fn rows(x: &Array) -> i32 {
    let s = x.shape();
    s[..s.len() - 1].iter().product()
}

/// Scales or biases as the kernels read them, in place.
fn kernel_scales(a: &Array) -> Option<Scales<'_>> {
    Some(match a.dtype() {
        Dtype::Float32 => Scales::F32(a.try_as_slice::<f32>().ok()?),
        Dtype::Float16 => Scales::F16(bytemuck::cast_slice(a.try_as_slice::<half::f16>().ok()?)),
        Dtype::Bfloat16 => Scales::Bf16(bytemuck::cast_slice(a.try_as_slice::<half::bf16>().ok()?)),
        _ => return None,
    })
}

/// A quantized matrix as the kernels read it, in place (`None` for a bit
/// width or dtype they do not take).
fn quant_matrix(q: &QuantizedMatrix) -> Option<QuantMatrix<'_>> {
    if !matches!(q.bits, 4 | 8) {
        return None;
    }
    let (out, cols) = q.shape();
    Some(QuantMatrix {
        packed: q.packed.try_as_slice::<u32>().ok()?,
        scales: kernel_scales(&q.scales)?,
        biases: kernel_scales(&q.biases)?,
        rows: out as usize,
        cols: cols as usize,
        group_size: q.group_size as usize,
        bits: q.bits as u32,
    })
}

/// `x W^T (+ b)` for `m` f32 rows held in memory (`x`: `[m, cols]`), by
/// kvserve's kernels, [`kernels::MAX_M`] rows at a time (each row's sums are
/// the same whatever the other rows); `None` when they do not apply (a
/// dense weight, another bit width).
fn linear_host(l: &Linear, x: &[f32], m: usize) -> Option<Vec<f32>> {
    let LinearWeight::Quantized(q) = &l.weight else { return None };
    let w = quant_matrix(q)?;
    if m == 0 || x.len() != m * w.cols {
        return None;
    }
    let mut y = vec![0f32; m * w.rows];
    for (xt, yt) in x.chunks(kernels::MAX_M * w.cols).zip(y.chunks_mut(kernels::MAX_M * w.rows)) {
        kernels::qmv(&w, xt, xt.len() / w.cols, yt).ok()?;
    }
    if let Some(b) = &l.bias {
        let b = b.try_as_slice::<f32>().ok().filter(|b| b.len() == w.rows)?;
        for row in y.chunks_exact_mut(w.rows) {
            row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
    }
    Some(y)
}

/// An f16 KV buffer's bits, read in place.
fn f16_bits(a: &Array) -> std::result::Result<&[u16], MlxError> {
    Ok(bytemuck::cast_slice(a.try_as_slice::<half::f16>().map_err(|e| host_error(format!("KV buffer: {e}")))?))
}

/// `kv`'s keys and values as kvserve's attention kernels read them: its
/// f16 buffers `[1, kv_heads, capacity, dim]` in place, `offset` tokens
/// valid; `None` for an empty cache.
fn kv_views(kv: &LayerKv, kvh: usize, d: usize) -> std::result::Result<Option<(kernels::attn::KvBuffer<'_>, kernels::attn::KvBuffer<'_>)>, MlxError> {
    let Some((kb, vb)) = kv.buffers() else { return Ok(None) };
    let s = kb.shape();
    if s.len() != 4 || s[0] != 1 || s[1] as usize != kvh || s[3] as usize != d || vb.shape() != s {
        return Err(host_error(format!("a KV buffer of shape {s:?} for {kvh} heads of {d}")));
    }
    let keys = kernels::attn::KvBuffer { data: f16_bits(kb)?, heads: kvh, capacity: s[2] as usize, len: kv.offset() as usize, dim: d };
    Ok(Some((keys, kernels::attn::KvBuffer { data: f16_bits(vb)?, ..keys })))
}

/// An error for a CPU decode step that cannot go on (after the checks made
/// at load time, a broken invariant).
#[track_caller]
fn host_error(message: String) -> MlxError {
    MlxError { message, location: std::panic::Location::caller() }
}

/// `x W^T` on the CPU by kvserve's own quantized kernels (reading MLX's
/// arrays in place), [`kernels::MAX_M`] rows of f32 `x` at a time; `None`
/// when they do not apply (another dtype or bit width), so MLX's kernel runs.
/// `x` is evaluated here: the step's graph is cut at each such product.
pub fn cpu_quantized_matmul(q: &QuantizedMatrix, x: &Array) -> std::result::Result<Option<Array>, MlxError> {
    cpu_product(q, x, |w, xs, _, y| {
        let cols = w.cols;
        xs.chunks(kernels::MAX_M * cols).zip(y.chunks_mut(kernels::MAX_M * w.rows)).all(|(xt, yt)| kernels::qmv(w, xt, xt.len() / cols, yt).is_ok())
    })
}

/// `x W^T` on the CPU by `product` over `x`'s f32 rows read in place
/// (`x` evaluated here, so the step's graph is cut at the product): the
/// checks, the reading and the output's shape that the kernel paths share.
/// `None` when it does not apply (another dtype or bit width, or `product`
/// refused): the caller takes MLX's path.
fn cpu_product(
    q: &QuantizedMatrix,
    x: &Array,
    product: impl FnOnce(&QuantMatrix, &[f32], usize, &mut [f32]) -> bool,
) -> std::result::Result<Option<Array>, MlxError> {
    let m = rows(x) as usize;
    if x.dtype() != Dtype::Float32 || m == 0 || !matches!(q.bits, 4 | 8) {
        return Ok(None);
    }
    let (out, cols) = q.shape();
    if x.shape().last() != Some(&cols) {
        return Ok(None);
    }
    x.eval()?;
    let x = if x.try_as_slice::<f32>().is_ok() { x.clone() } else { x.contiguous()? };
    let (Ok(xs), Some(w)) = (x.try_as_slice::<f32>(), quant_matrix(q)) else {
        return Ok(None);
    };
    let mut y = vec![0f32; m * out as usize];
    if !product(&w, xs, m, &mut y) {
        return Ok(None);
    }
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    Ok(Some(crate::mlx::array_from_vec(y, &shape)?))
}

/// Up to this many rows, a CPU product runs on kvserve's kernels in tiles of
/// [`kernels::MAX_M`] rows rather than dequantize + BLAS: dequantizing every
/// matrix costs more than a few tiles. `cargo bench --bench decode_profile`,
/// 16 new tokens on a cached prefix: 254-281 ms against 557-604 (3.3K
/// cached tokens), 568-651 against 874-1200 (12K); at 64 rows the two
/// paths measured alike, so prompts' 512-token chunks stay on BLAS.
pub const CPU_KERNEL_MAX_ROWS: i32 = 32;

/// `x W^T` for a quantized `W`: on the CPU, few rows through kvserve's
/// kernels and many through dequantize + BLAS; elsewhere MLX's kernel.
fn quantized_forward(q: &QuantizedMatrix, x: &Array, on_cpu: bool) -> std::result::Result<Array, MlxError> {
    if on_cpu && cpu_kernels_enabled() && rows(x) <= CPU_KERNEL_MAX_ROWS {
        if let Some(y) = cpu_quantized_matmul(q, x)? {
            return Ok(y);
        }
    }
    if on_cpu && rows(x) >= CPU_DEQUANT_MIN_ROWS {
        if cpu_kernels_enabled() {
            if let Some(y) = cpu_quantized_gemm(q, x)? {
                return Ok(y);
            }
        }
        return Ok(x.matmul(dense_host(q)?.t())?);
    }
    q.matmul(x)
}

/// `x W^T` for many rows on the CPU: W dequantized a panel at a time into a
/// buffer that stays in cache, each panel through the process's BLAS
/// ([`kernels::qgemm`]); the same values as dequantizing W whole for MLX's
/// BLAS product. `None` when it does not apply (no CBLAS loaded, another
/// dtype or bit width): the caller takes that path.
fn cpu_quantized_gemm(q: &QuantizedMatrix, x: &Array) -> std::result::Result<Option<Array>, MlxError> {
    if !crate::mlx::os::has_sgemm() {
        return Ok(None);
    }
    cpu_product(q, x, |w, xs, m, y| kernels::qgemm::qgemm(w, xs, m, y, &crate::mlx::os::sgemm_nt).is_ok())
}

/// The dense matrix `q` stands for, for a BLAS product: dequantized by
/// kvserve's kernel into memory MLX then reads in place (MLX's CPU
/// `dequantize` is several times slower); MLX's own where the kernel does
/// not apply. The same values either way (`q * scale + bias` in f32).
fn dense_host(q: &QuantizedMatrix) -> std::result::Result<Array, MlxError> {
    if cpu_kernels_enabled() {
        if let Some(w) = quant_matrix(q) {
            let mut out = vec![0f32; w.rows * w.cols];
            if kernels::dequantize(&w, &mut out).is_ok() {
                return crate::mlx::array_from_vec(out, &[w.rows as i32, w.cols as i32]);
            }
        }
    }
    q.dequantize()
}

/// The CPU kernels are on unless `KVSERVE_KERNELS=mlx` (MLX's own, to compare).
pub(crate) fn cpu_kernels_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVSERVE_KERNELS").map_or(true, |v| v != "mlx"))
}

impl Linear {
    pub fn forward(&self, x: &Array) -> std::result::Result<Array, MlxError> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.matmul(w.t())?,
            LinearWeight::Quantized(q) => quantized_forward(q, x, self.dense_prefill)?,
        };
        Ok(match &self.bias {
            Some(b) => ops::add(&y, b)?,
            None => y,
        })
    }
}

pub enum Embedding {
    Dense(Array),
    Quantized(QuantizedMatrix),
}

impl Embedding {
    pub fn forward(&self, ids: &Array) -> std::result::Result<Array, MlxError> {
        Ok(match self {
            Embedding::Dense(w) => w.take_axis(ids, 0)?,
            Embedding::Quantized(q) => {
                let rows = QuantizedMatrix {
                    packed: q.packed.take_axis(ids, 0)?,
                    scales: q.scales.take_axis(ids, 0)?,
                    biases: q.biases.take_axis(ids, 0)?,
                    group_size: q.group_size,
                    bits: q.bits,
                };
                rows.dequantize()?
            }
        })
    }

    /// The tied output head: `x E^T` (`on_cpu`: as [`Linear`] does on the CPU).
    pub fn as_linear(&self, x: &Array, on_cpu: bool) -> std::result::Result<Array, MlxError> {
        Ok(match self {
            Embedding::Dense(w) => x.matmul(w.t())?,
            Embedding::Quantized(q) => quantized_forward(q, x, on_cpu)?,
        })
    }
}

pub struct RmsNorm {
    pub weight: Array,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &Array) -> std::result::Result<Array, MlxError> {
        Ok(fast::rms_norm(x, Some(&self.weight), self.eps)?)
    }
}

/// Rotary position embedding over the first `dims` of each head.
pub struct Rope {
    dims: i32,
    traditional: bool,
    base: f32,
    scale: f32,
    /// Per-frequency periods (Llama 3 scaling) used instead of `base`.
    freqs: Option<Array>,
    /// `1 / period` of each rotated pair, as MLX's rope computes it (f32).
    inv_freq: Vec<f32>,
    /// YaRN's scale on the rotated part of queries and keys (1: none).
    mscale: f32,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dims = cfg.rope_dims;
        let (scale, freqs) = match cfg.rope_scaling {
            RopeScaling::None => (1.0, None),
            RopeScaling::Linear(f) => (1.0 / f, None),
            RopeScaling::Llama3(s) => {
                let old = s.original_max_position_embeddings as f64;
                let low_wavelen = old / s.low_freq_factor as f64;
                let high_wavelen = old / s.high_freq_factor as f64;
                let factor = s.factor as f64;
                let freqs: Vec<f32> = (0..dims / 2)
                    .map(|i| {
                        let f = (cfg.rope_theta as f64).powf(2.0 * i as f64 / dims as f64);
                        let wavelen = 2.0 * std::f64::consts::PI * f;
                        let f = if wavelen > low_wavelen { f * factor } else { f };
                        if wavelen > high_wavelen && wavelen < low_wavelen {
                            let smooth = (old / wavelen - s.low_freq_factor as f64)
                                / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                            (f / ((1.0 - smooth) / factor + smooth)) as f32
                        } else {
                            f as f32
                        }
                    })
                    .collect();
                (1.0, Some(freqs))
            }
            RopeScaling::Yarn(y) => {
                // mlx-lm's YarnRoPE, in f64 then rounded as its f32 arrays are.
                let (d, base) = (dims as f64, cfg.rope_theta as f64);
                let corr = |rot: f64| d * (y.original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
                let low = corr(y.beta_fast as f64).floor().max(0.0);
                let high = corr(y.beta_slow as f64).ceil().min(d - 1.0);
                let high = if high == low { high + 0.001 } else { high };
                let freqs: Vec<f32> = (0..dims / 2)
                    .map(|i| {
                        let extra = (base as f32).powf((2 * i) as f32 / dims as f32);
                        let inter = y.factor * extra;
                        let ramp = (((i as f64 - low) / (high - low)) as f32).clamp(0.0, 1.0);
                        let mask = 1.0 - ramp;
                        (inter * extra) / (inter * mask + extra * (1.0 - mask))
                    })
                    .collect();
                (1.0, Some(freqs))
            }
        };
        let yarn_mscale = |scale: f32, m: f32| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
        let mscale = match cfg.rope_scaling {
            RopeScaling::Yarn(y) => yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim),
            _ => 1.0,
        };
        let half = (dims / 2).max(1);
        // MLX: `exp(-i * (log(base) / half))`, or the reciprocal of the given periods.
        let inv_freq: Vec<f32> = match &freqs {
            Some(f) => f.iter().map(|p| 1.0 / p).collect(),
            None => (0..half).map(|i| (-(i as f32) * (cfg.rope_theta.ln() / half as f32)).exp()).collect(),
        };
        let freqs = freqs.map(|f| Array::from_slice(&f, &[dims / 2]));
        Rope { dims, traditional: cfg.rope_traditional, base: cfg.rope_theta, scale, freqs, inv_freq, mscale }
    }

    /// Rotate `heads` rows of `d` values at position `pos` in place, as
    /// [`forward`](Self::forward) does (MLX's CPU rope: f32 angles `pos *
    /// scale * inv_freq`, then `x1 cos - x2 sin`, `x1 sin + x2 cos`).
    fn apply_host(&self, x: &mut [f32], d: usize, pos: i32) {
        let dims = (self.dims as usize).min(d);
        let half = dims / 2;
        let p = pos as f32 * self.scale;
        let (cos, sin): (Vec<f32>, Vec<f32>) = self.inv_freq[..half].iter().map(|f| (p * f).cos()).zip(self.inv_freq[..half].iter().map(|f| (p * f).sin())).unzip();
        for row in x.chunks_exact_mut(d) {
            for i in 0..half {
                let (a, b) = if self.traditional { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (x1, x2) = (row[a], row[b]);
                row[a] = x1 * cos[i] - x2 * sin[i];
                row[b] = x1 * sin[i] + x2 * cos[i];
            }
        }
    }

    pub fn forward(&self, x: &Array, offset: i32) -> std::result::Result<Array, MlxError> {
        let base = if self.freqs.is_some() { None } else { Some(self.base) };
        let scaled;
        let x = if self.mscale != 1.0 {
            let d = x.shape()[x.ndim() - 1];
            let m = Array::from_f32(self.mscale).as_dtype(x.dtype())?;
            scaled = if self.dims >= d {
                ops::multiply(x, &m)?
            } else {
                let head = ops::multiply(x.index((.., .., .., ..self.dims)), &m)?;
                ops::concatenate(&[head, x.index((.., .., .., self.dims..))], -1)?
            };
            &scaled
        } else {
            x
        };
        Ok(fast::rope(x, self.dims, self.traditional, base, self.scale, offset, self.freqs.as_ref())?)
    }
}

pub struct Attention {
    /// Learned per-head logits that join every softmax (gpt_oss), `[heads]`.
    sinks: Option<Array>,
    /// Attend only to the last `window` positions (gpt_oss's sliding layers).
    window: Option<i32>,
    /// qwen3_5: `q_proj` gives each head's queries then a gate of the same
    /// size; the output is scaled by `sigmoid(gate)` before `o_proj`.
    output_gate: bool,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    rope: Rope,
    n_heads: i32,
    n_kv_heads: i32,
    head_dim: i32,
    scale: f32,
    /// On the CPU, chunks of queries use [`chunk_attention`] instead of
    /// MLX's fused kernel (whose CPU version is a fallback made of ops,
    /// slow in its softmax).
    cpu_chunk_attention: bool,
    /// On the CPU, a single decode row runs in [`decode_host`](Self::decode_host):
    /// every projection is 4/8-bit quantized and every tensor it reads f32.
    host_decode: bool,
}

/// Every token `kv` holds (its write evaluated here), widened to f32
/// `[1, kv_heads, offset, head_dim]` by kvserve's kernel into memory MLX
/// reads in place: the values [`LayerKv::update_and_fetch`] returns, without
/// MLX's cast of the buffer's slice (a strided copy on one thread, about
/// 0.15 s of each prompt chunk at 12K cached tokens for SmolLM2).
fn cache_f32(kv: &LayerKv) -> std::result::Result<(Array, Array), MlxError> {
    mlx_rs::transforms::eval(kv.arrays())?;
    let (kb, vb) = kv.buffers().ok_or_else(|| host_error("an empty cache after a write".into()))?;
    let s = kb.shape().to_vec();
    if s.len() != 4 || s[0] != 1 || vb.shape() != s.as_slice() {
        return Err(host_error(format!("a KV buffer of shape {s:?}")));
    }
    let (heads, cap, dim, len) = (s[1] as usize, s[2] as usize, s[3] as usize, kv.offset() as usize);
    let widen = |buf: &Array| -> std::result::Result<Array, MlxError> {
        let bits = f16_bits(buf)?;
        let mut out = vec![0f32; heads * len * dim];
        for (h, o) in out.chunks_exact_mut(len * dim).enumerate() {
            kernels::widen_f16(&bits[h * cap * dim..h * cap * dim + len * dim], o).map_err(|e| host_error(e.to_string()))?;
        }
        crate::mlx::array_from_vec(out, &[1, heads as i32, len as i32, dim as i32])
    };
    Ok((widen(kb)?, widen(vb)?))
}

/// Causal attention for `l > 1` queries at position `offset`, on the CPU
/// (`q`: `[b, heads, l, d]`; `k`, `v`: `[b, kv_heads, offset + l, d]`, f32).
///
/// MLX's CPU fallback for its fused kernel spends most of a long prompt's
/// prefill in the softmax: MLX's CPU `exp` runs about 70M elements/s here,
/// single-threaded, over `heads x l x (offset + l)` scores per layer and
/// chunk (0.43 s of 0.50 s for a 512-token chunk after 6,000 tokens). Here the
/// two GEMMs stay MLX's (BLAS), with the query heads that share a KV head as
/// rows of one GEMM, and the masked softmax runs in Rust over the score
/// matrix in place: one pass, on every core, masked keys never exponentiated.
fn chunk_attention(q: &Array, k: &Array, v: &Array, scale: f32, offset: i32) -> std::result::Result<Array, MlxError> {
    let (b, h, l, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (kvh, t) = (k.shape()[1], k.shape()[2]);
    let rep = h / kvh;
    let q = ops::multiply(q, Array::from_f32(scale))?.reshape(&[b, kvh, rep * l, d])?;
    let (scores, ()) = crate::mlx::matmul_in_place(&q, &k.swap_axes(-1, -2)?, |data| causal_softmax(data, t as usize, l as usize, offset as usize))?;
    Ok(scores.matmul(v)?.reshape(&[b, h, l, d])?)
}

/// Softmax over rows of `t` scores, row `r` being query `r % l` of a chunk
/// at `offset`: it sees keys `0..=offset + r % l`; later keys get 0.
fn causal_softmax(data: &mut [f32], t: usize, l: usize, offset: usize) {
    let rows = data.len() / t;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows.max(1)).min(16);
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (part, block) in data.chunks_mut(per * t).enumerate() {
            scope.spawn(move || {
                for (i, row) in block.chunks_exact_mut(t).enumerate() {
                    let query = (part * per + i) % l;
                    softmax_row(row, offset + query + 1);
                }
            });
        }
    });
}

fn softmax_row(row: &mut [f32], visible: usize) {
    let (live, hidden) = row.split_at_mut(visible.min(row.len()));
    hidden.fill(0.0);
    let mut m = f32::NEG_INFINITY;
    for &x in live.iter() {
        m = if x > m { x } else { m };
    }
    let inv = 1.0 / kernels::exp_shifted_sum(live, m);
    for x in live.iter_mut() {
        *x *= inv;
    }
}

impl Attention {
    /// `cfg` gives this rank's heads when the model is sharded.
    pub fn load(w: &mut Weights, p: &str, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        // One sink per head: a rank keeps its heads' (a window masks
        // positions, the same for every head).
        let sinks = match cfg.sinks {
            true => {
                let all = w.take(&format!("{p}.sinks"))?;
                Some(w.heads_share(&format!("{p}.sinks"), all)?)
            }
            false => None,
        };
        let window = cfg.windows.get(layer).copied().flatten();
        if w.shard.is_some() && cfg.attn_output_gate {
            return Err(ModelError::Invalid(format!("{p}: attention with an output gate is not split by heads yet (use --split pipeline)")));
        }
        // kvserve's own attention (CPU chunks, host decode) has no sinks,
        // windows or YaRN scale: those layers go through MLX's attention.
        let plain = sinks.is_none() && window.is_none() && !matches!(cfg.rope_scaling, super::config::RopeScaling::Yarn(_));
        let norm = |w: &mut Weights, name: &str| -> Result<Option<RmsNorm>> {
            if cfg.qk_norm {
                Ok(Some(w.rms_norm(&format!("{p}.{name}"), cfg.rms_norm_eps)?))
            } else {
                Ok(None)
            }
        };
        Ok(Attention {
            sinks,
            window,
            output_gate: cfg.attn_output_gate,
            q_proj: w.linear_part(&format!("{p}.q_proj"), cfg.qkv_bias, Part::Rows)?,
            k_proj: w.linear_part(&format!("{p}.k_proj"), cfg.qkv_bias, Part::Rows)?,
            v_proj: w.linear_part(&format!("{p}.v_proj"), cfg.qkv_bias, Part::Rows)?,
            o_proj: w.linear_part(&format!("{p}.o_proj"), cfg.o_bias, Part::Cols)?,
            q_norm: norm(w, "q_norm")?,
            k_norm: norm(w, "k_norm")?,
            rope: Rope::new(cfg),
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            scale: (cfg.head_dim as f32).powf(-0.5),
            cpu_chunk_attention: w.cpu_dense_prefill && plain,
            host_decode: false,
        }
        .with_host_decode())
    }

    fn with_host_decode(mut self) -> Self {
        let quantized = |l: &Linear| {
            matches!(&l.weight, LinearWeight::Quantized(q) if quant_matrix(q).is_some())
                && l.bias.as_ref().is_none_or(|b| b.dtype() == Dtype::Float32)
        };
        let norm = |n: &Option<RmsNorm>| n.as_ref().is_none_or(|n| n.weight.try_as_slice::<f32>().is_ok());
        self.host_decode = self.cpu_chunk_attention
            && !self.output_gate
            && [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj].into_iter().all(quantized)
            && norm(&self.q_norm)
            && norm(&self.k_norm)
            && self.head_dim > 0
            && self.head_dim as usize <= kernels::attn::MAX_DIM;
        self
    }

    /// Decode rows (`x`: the normed hidden states, `[rows, hidden]`, row
    /// `i` the next token of the sequence whose cache is `kvs[i]`) entirely
    /// in memory: projections of all rows at once by kvserve's kernels,
    /// then the norms and rotary embedding here (each row at its own
    /// position), attention of every row over its own f16 cache in one
    /// [`kernels::attn::decode_attention_rows`] (the caches as MLX holds
    /// them, read in place), and each row's key and value appended to its
    /// cache (an MLX write, left lazy: the caller evaluates every layer's at
    /// once).
    /// Returns the output projection, `[rows, hidden]`.
    fn decode_host(&self, x: &[f32], kvs: &mut [&mut LayerKv]) -> std::result::Result<Vec<f32>, MlxError> {
        let (h, kvh, d, rows) = (self.n_heads as usize, self.n_kv_heads as usize, self.head_dim as usize, kvs.len());
        let proj = |l: &Linear, x: &[f32], what: &str| {
            linear_host(l, x, rows).ok_or_else(|| host_error(format!("the CPU decode step cannot run {what}")))
        };
        let (mut q, mut k, v) = (proj(&self.q_proj, x, "q_proj")?, proj(&self.k_proj, x, "k_proj")?, proj(&self.v_proj, x, "v_proj")?);
        if q.len() != rows * h * d || k.len() != rows * kvh * d || v.len() != rows * kvh * d {
            return Err(host_error(format!("projections of {}, {}, {} values for {rows} rows of {h}/{kvh} heads of {d}", q.len(), k.len(), v.len())));
        }
        for (t, norm) in [(&mut q, &self.q_norm), (&mut k, &self.k_norm)] {
            if let Some(n) = norm {
                let w = n.weight.try_as_slice::<f32>().map_err(|e| host_error(format!("q/k norm weight: {e}")))?;
                for row in t.chunks_exact_mut(d) {
                    let normed = rms_norm_host(row, w, n.eps);
                    row.copy_from_slice(&normed);
                }
            }
        }
        // Each row at its own position: rotary embedding, then its key and
        // value as the cache stores them.
        let f16 = |x: &[f32]| -> Vec<half::f16> { x.iter().map(|&v| half::f16::from_f32(v)).collect() };
        let mut new_kv = Vec::with_capacity(rows);
        for (i, kv) in kvs.iter().enumerate() {
            let pos = kv.offset();
            self.rope.apply_host(&mut q[i * h * d..(i + 1) * h * d], d, pos);
            self.rope.apply_host(&mut k[i * kvh * d..(i + 1) * kvh * d], d, pos);
            new_kv.push((f16(&k[i * kvh * d..(i + 1) * kvh * d]), f16(&v[i * kvh * d..(i + 1) * kvh * d])));
        }
        let mut out = vec![0f32; rows * h * d];
        {
            // Every row's cache as MLX holds it, read in place.
            let empty = kernels::attn::KvBuffer { data: &[], heads: kvh, capacity: 0, len: 0, dim: d };
            let mut bufs = Vec::with_capacity(rows);
            for kv in kvs.iter() {
                bufs.push(kv_views(kv, kvh, d)?.unwrap_or((empty, empty)));
            }
            let mut attn_rows: Vec<kernels::attn::Row> = bufs
                .iter()
                .zip(&new_kv)
                .zip(q.chunks_exact(h * d).zip(out.chunks_exact_mut(h * d)))
                .map(|((&(keys, values), (k16, v16)), (q, out))| {
                    kernels::attn::Row { q, keys, values, new_k: bytemuck::cast_slice(k16), new_v: bytemuck::cast_slice(v16), out }
                })
                .collect();
            kernels::attn::decode_attention_rows(h, self.scale, &mut attn_rows).map_err(|e| host_error(e.to_string()))?;
        }
        let shape = [1, kvh as i32, 1, d as i32];
        for (kv, (k16, v16)) in kvs.iter_mut().zip(&new_kv) {
            kv.append(Array::from_slice(k16, &shape), Array::from_slice(v16, &shape))?;
        }
        proj(&self.o_proj, &out, "o_proj")
    }

    /// Attention for one decode row per sequence (`x`: `[rows, 1, hidden]`,
    /// row `i` at the end of `kvs[i]`) through MLX's ops: the projections
    /// batched, the rotary embedding, cache write and attention per row.
    fn forward_rows(&self, x: &Array, kvs: &mut [&mut LayerKv]) -> std::result::Result<Array, MlxError> {
        if let [kv] = kvs {
            return self.forward(x, kv);
        }
        let b = x.shape()[0];
        let (q, k, v, gate) = self.project(x)?;
        let mut outs = Vec::with_capacity(kvs.len());
        for (i, kv) in kvs.iter_mut().enumerate() {
            let i = i as i32;
            let row = |t: &Array| t.index((i..i + 1, .., .., ..));
            let offset = kv.offset();
            let q = self.rope.forward(&row(&q), offset)?;
            let k = self.rope.forward(&row(&k), offset)?;
            let (k, v) = kv.update_and_fetch(k, row(&v))?;
            let (k, v) = self.windowed(k, v)?;
            outs.push(fast::scaled_dot_product_attention(&q, &k, &v, self.scale, None, self.sinks.as_ref())?);
        }
        let o = ops::concatenate(&outs, 0)?;
        let o = o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, 1, self.n_heads * self.head_dim])?;
        self.output(o, gate)
    }

    /// A single query's keys and values: the last `window` of them on a
    /// sliding layer (the cache keeps every position, so snapshots stay exact).
    fn windowed(&self, k: Array, v: Array) -> std::result::Result<(Array, Array), MlxError> {
        match self.window {
            Some(w) if k.shape()[2] > w => {
                let start = k.shape()[2] - w;
                Ok((k.index((.., .., start.., ..)), v.index((.., .., start.., ..))))
            }
            _ => Ok((k, v)),
        }
    }

    /// Queries, keys and values of `x` (`[b, l, hidden]`), each
    /// `[b, heads, l, head_dim]` with its norm applied (no rotary embedding
    /// yet), and the output gate `[b, l, heads * head_dim]` if the layer has one.
    fn project(&self, x: &Array) -> std::result::Result<(Array, Array, Array, Option<Array>), MlxError> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let heads = |t: Array, n: i32, norm: &Option<RmsNorm>| -> std::result::Result<Array, MlxError> {
            let mut t = t.reshape(&[b, l, n, self.head_dim])?;
            if let Some(norm) = norm {
                t = norm.forward(&t)?;
            }
            Ok(t.transpose_axes(&[0, 2, 1, 3])?)
        };
        let (q, gate) = if self.output_gate {
            let both = self.q_proj.forward(x)?.reshape(&[b, l, self.n_heads, 2 * self.head_dim])?;
            let q = both.index((.., .., .., ..self.head_dim));
            let gate = both.index((.., .., .., self.head_dim..)).reshape(&[b, l, self.n_heads * self.head_dim])?;
            (q, Some(gate))
        } else {
            (self.q_proj.forward(x)?, None)
        };
        Ok((
            heads(q, self.n_heads, &self.q_norm)?,
            heads(self.k_proj.forward(x)?, self.n_kv_heads, &self.k_norm)?,
            heads(self.v_proj.forward(x)?, self.n_kv_heads, &None)?,
            gate,
        ))
    }

    /// `o_proj` of the attention output `o` (`[b, l, heads * head_dim]`), gated if the layer is.
    fn output(&self, o: Array, gate: Option<Array>) -> std::result::Result<Array, MlxError> {
        match gate {
            Some(g) => self.o_proj.forward(&ops::multiply(&o, ops::sigmoid(&g)?)?),
            None => self.o_proj.forward(&o),
        }
    }

    /// A prompt chunk's attention (`q`: `[1, heads, l, d]` after the rotary
    /// embedding, the chunk's keys and values already in `kv`) by
    /// [`kernels::attn::prefill::chunk_attention`], fused and over the f16
    /// cache in place; `None` where that kernel does not run on this CPU.
    /// Returns `[1, l, heads * d]`.
    fn fused_chunk(&self, q: &Array, kv: &LayerKv, l: i32, offset: i32) -> std::result::Result<Option<Array>, MlxError> {
        let (h, kvh, d) = (self.n_heads as usize, self.n_kv_heads as usize, self.head_dim as usize);
        if !kernels::attn::prefill::supports(h, kvh, d) {
            return Ok(None);
        }
        let q = q.contiguous()?;
        mlx_rs::transforms::eval(kv.arrays().chain([&q]))?;
        let (keys, values) = kv_views(kv, kvh, d)?.ok_or_else(|| host_error("an empty cache after a write".into()))?;
        let qd = q.try_as_slice::<f32>().map_err(|e| host_error(format!("chunk queries: {e}")))?;
        let mut out = vec![0f32; h * l as usize * d];
        let ran = kernels::attn::prefill::chunk_attention(qd, h, l as usize, offset as usize, &keys, &values, self.scale, &mut out)
            .map_err(|e| host_error(e.to_string()))?;
        Ok(if ran { Some(crate::mlx::array_from_vec(out, &[1, l, (h * d) as i32])?) } else { None })
    }

    pub fn forward(&self, x: &Array, kv: &mut LayerKv) -> std::result::Result<Array, MlxError> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let (q, k, v, gate) = self.project(x)?;
        let offset = kv.offset();
        let q = self.rope.forward(&q, offset)?;
        let k = self.rope.forward(&k, offset)?;
        let host_chunk = l > 1 && self.cpu_chunk_attention && q.dtype() == Dtype::Float32;
        let (k, v) = if host_chunk && cpu_kernels_enabled() {
            kv.append(k, v)?;
            if b == 1 {
                if let Some(o) = self.fused_chunk(&q, kv, l, offset)? {
                    return self.output(o, gate);
                }
            }
            cache_f32(kv)?
        } else {
            kv.update_and_fetch(k, v)?
        };
        let o = if host_chunk {
            chunk_attention(&q, &k, &v, self.scale, offset)?
        } else if let (Some(window), true) = (self.window, l > 1) {
            // Query at position offset + i sees keys j with j <= offset + i < j + window.
            let t = k.shape()[2];
            let qpos = ops::add(ops::arange::<_, i32>(0, l, None)?, Array::from_int(offset))?.reshape(&[l, 1])?;
            let kpos = ops::arange::<_, i32>(0, t, None)?.reshape(&[1, t])?;
            let mask = ops::logical_and(ops::ge(&qpos, &kpos)?, ops::lt(&qpos, ops::add(&kpos, Array::from_int(window))?)?)?;
            fast::scaled_dot_product_attention(&q, &k, &v, self.scale, ScaledDotProductAttentionMask::Array(&mask), self.sinks.as_ref())?
        } else {
            let (k, v) = if l == 1 { self.windowed(k, v)? } else { (k, v) };
            let mask = (l > 1).then_some(ScaledDotProductAttentionMask::Causal);
            fast::scaled_dot_product_attention(&q, &k, &v, self.scale, mask, self.sinks.as_ref())?
        };
        let o = o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, self.n_heads * self.head_dim])?;
        self.output(o, gate)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn load(w: &mut Weights, p: &str, bias: bool) -> Result<Self> {
        Ok(Mlp {
            gate_proj: w.linear_part(&format!("{p}.gate_proj"), bias, Part::Rows)?,
            up_proj: w.linear_part(&format!("{p}.up_proj"), bias, Part::Rows)?,
            down_proj: w.linear_part(&format!("{p}.down_proj"), bias, Part::Cols)?,
        })
    }

    pub fn forward(&self, x: &Array) -> std::result::Result<Array, MlxError> {
        let g = mlx_rs::nn::silu(self.gate_proj.forward(x)?)?;
        let h = ops::multiply(&g, self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

/// What follows attention in a block: a dense MLP or a mixture of experts.
pub enum FeedForward {
    Dense(Mlp),
    Moe(Box<super::qwen3_moe::SparseMoe>),
}

impl FeedForward {
    fn forward(&self, x: &Array) -> std::result::Result<Array, MlxError> {
        match self {
            FeedForward::Dense(m) => m.forward(x),
            FeedForward::Moe(m) => m.forward(x),
        }
    }
}

/// What mixes positions in a block: softmax attention over a KV cache, or
/// qwen3_5's linear attention over a recurrent state.
pub enum Mixer {
    Attention(Attention),
    Linear(Box<super::gated_delta::GatedDeltaNet>),
}

pub struct Block {
    input_norm: RmsNorm,
    attn: Mixer,
    post_attn_norm: RmsNorm,
    ff: FeedForward,
    /// Tensor parallelism: attention and MLP give this rank's partial sums,
    /// joined by an all_sum over the group.
    reduce: Option<std::sync::Arc<crate::mlx::distributed::Group>>,
}

/// Bytes of partial sums this process gave to all_sums (tensor parallelism).
pub static ALL_SUM_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Block {
    /// A partial sum joined over the group (tensor parallelism), else `a`.
    fn joined(&self, a: Array) -> std::result::Result<Array, MlxError> {
        match &self.reduce {
            Some(g) => {
                ALL_SUM_BYTES.fetch_add(a.nbytes() as u64, std::sync::atomic::Ordering::Relaxed);
                g.all_sum(&a)
            }
            None => Ok(a),
        }
    }

    pub fn forward(&self, x: &Array, kv: &mut LayerKv) -> std::result::Result<Array, MlxError> {
        if rows(x) == 1 {
            if let Some(y) = self.forward_host(x, &mut [kv])? {
                return Ok(y);
            }
        }
        let n = self.input_norm.forward(x)?;
        let a = match &self.attn {
            Mixer::Attention(a) => a.forward(&n, kv)?,
            Mixer::Linear(l) => l.forward(&n, kv)?,
        };
        let h = ops::add(x, self.joined(a)?)?;
        Ok(ops::add(&h, self.joined(self.ff.forward(&self.post_attn_norm.forward(&h)?)?)?)?)
    }

    /// One decode row per sequence (`x`: `[rows, 1, hidden]`, row `i` the
    /// next token of the sequence whose cache is `kvs[i]`).
    pub fn forward_rows(&self, x: &Array, kvs: &mut [&mut LayerKv]) -> std::result::Result<Array, MlxError> {
        if let Some(y) = self.forward_host(x, kvs)? {
            return Ok(y);
        }
        let n = self.input_norm.forward(x)?;
        let a = match &self.attn {
            Mixer::Attention(a) => a.forward_rows(&n, kvs)?,
            Mixer::Linear(l) => l.forward_rows(&n, kvs)?,
        };
        let h = ops::add(x, self.joined(a)?)?;
        Ok(ops::add(&h, self.joined(self.ff.forward(&self.post_attn_norm.forward(&h)?)?)?)?)
    }

    /// Decode rows (one per cache in `kvs`) with everything but attention
    /// done here, on values the kernels left in memory: each MLX evaluation
    /// costs about 70 us here whatever its size, and this leaves at most one
    /// per layer instead of four. `None` when it does not apply (not one row
    /// per cache, not f32, a mixture of experts, not the CPU).
    fn forward_host(&self, x: &Array, kvs: &mut [&mut LayerKv]) -> std::result::Result<Option<Array>, MlxError> {
        let FeedForward::Dense(mlp) = &self.ff else { return Ok(None) };
        let Mixer::Attention(attn) = &self.attn else { return Ok(None) };
        // Its sums are whole; a shard's need joining between its parts.
        if self.reduce.is_some() {
            return Ok(None);
        }
        let n = kvs.len();
        if !attn.cpu_chunk_attention || !cpu_kernels_enabled() || n == 0 || rows(x) as usize != n || x.shape().len() != 3 || x.dtype() != Dtype::Float32 {
            return Ok(None);
        }
        let shape = x.shape().to_vec();
        let hidden = shape[2] as usize;
        // The norms' weights are read in place (loaded evaluated and contiguous).
        let (Some(xs), Ok(w1), Ok(w2)) =
            (host(x)?, self.input_norm.weight.try_as_slice::<f32>(), self.post_attn_norm.weight.try_as_slice::<f32>())
        else {
            return Ok(None);
        };
        let norm_rows = |x: &[f32], w: &[f32], eps: f32| -> Vec<f32> { x.chunks_exact(hidden).flat_map(|r| rms_norm_host(r, w, eps)).collect() };
        let n1 = norm_rows(&xs, w1, self.input_norm.eps);
        // From here on the caches hold these rows: a step that cannot go on
        // is an error, never a `None` that would run the layer a second time.
        let a = if attn.host_decode {
            attn.decode_host(&n1, kvs)?
        } else {
            host_row(&attn.forward_rows(&Array::from_slice(&n1, &shape), kvs)?)?
        };
        let h: Vec<f32> = xs.iter().zip(&a).map(|(x, a)| x + a).collect();
        let n2 = norm_rows(&h, w2, self.post_attn_norm.eps);
        let (g, u) = (linear_row(&mlp.gate_proj, &n2, n)?, linear_row(&mlp.up_proj, &n2, n)?);
        // silu(g) * u, as MLX writes silu: g * sigmoid(g).
        let gu: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g * (1.0 / (1.0 + (-g).exp())) * u).collect();
        let d = linear_row(&mlp.down_proj, &gu, n)?;
        let y: Vec<f32> = h.iter().zip(&d).map(|(h, d)| h + d).collect();
        Ok(Some(Array::from_slice(&y, &shape)))
    }
}

/// `x W^T (+ b)` for `m` f32 rows held in memory: by kvserve's kernels
/// without leaving memory when the weight is quantized, else through MLX.
fn linear_row(l: &Linear, x: &[f32], m: usize) -> std::result::Result<Vec<f32>, MlxError> {
    match linear_host(l, x, m) {
        Some(y) => Ok(y),
        None => host_row(&l.forward(&Array::from_slice(x, &[m as i32, 1, (x.len() / m.max(1)) as i32]))?),
    }
}

/// [`host`] for a value that must be f32.
fn host_row(a: &Array) -> std::result::Result<Vec<f32>, MlxError> {
    host(a)?.ok_or_else(|| host_error(format!("the CPU decode row got {:?} values, not f32", a.dtype())))
}

/// The evaluated f32 values of `a` (`None` for another dtype).
pub(crate) fn host(a: &Array) -> std::result::Result<Option<Vec<f32>>, MlxError> {
    if a.dtype() != Dtype::Float32 {
        return Ok(None);
    }
    a.eval()?;
    Ok(match a.try_as_slice::<f32>() {
        Ok(s) => Some(s.to_vec()),
        Err(_) => a.contiguous()?.try_as_slice::<f32>().ok().map(<[f32]>::to_vec),
    })
}

/// RMS norm of one row, as MLX's `fast::rms_norm` computes it in f32.
fn rms_norm_host(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    let r = 1.0 / (mean + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

/// A decoder-only transformer: embedding, blocks, final norm, output head.
pub struct Transformer {
    pub config: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` when the head is tied to the embedding.
    lm_head: Option<Linear>,
    /// MLX computes on the CPU (kvserve's CPU paths apply).
    on_cpu: bool,
    /// Set on rank 0 of a pipeline: the later layers are on the other ranks,
    /// reached through this; each cache then ends with their entry.
    stage: Option<crate::pipeline::Stage>,
}

impl Transformer {
    /// Build from weights with Hugging Face names (`model.layers.N...`);
    /// `ff` builds each layer's feed-forward part.
    pub fn load(
        cfg: &ModelConfig,
        w: &mut Weights,
        mut ff: impl FnMut(&mut Weights, i32, &str) -> Result<FeedForward>,
    ) -> Result<Self> {
        let embed = w.embedding("model.embed_tokens")?;
        let mut blocks = Vec::with_capacity(cfg.num_layers as usize);
        let range = w.layers.clone().unwrap_or(0..cfg.num_layers);
        for i in range {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                input_norm: w.rms_norm(&format!("{p}.input_layernorm"), cfg.rms_norm_eps)?,
                attn: match &cfg.linear {
                    Some(lc) if lc.is_linear(i) => {
                        Mixer::Linear(Box::new(super::gated_delta::GatedDeltaNet::load(w, &format!("{p}.linear_attn"), cfg, lc)?))
                    }
                    _ => Mixer::Attention(Attention::load(w, &format!("{p}.self_attn"), cfg, i as usize)?),
                },
                post_attn_norm: w.rms_norm(&format!("{p}.post_attention_layernorm"), cfg.rms_norm_eps)?,
                ff: ff(w, i, &format!("{p}.mlp"))?,
                reduce: w.shard.as_ref().map(|s| s.group.clone()),
            });
            let b = blocks.last().expect("pushed above");
            if w.shard.is_some() && matches!(b.attn, Mixer::Linear(_)) {
                return Err(ModelError::Invalid(format!("{p}: linear attention is not split by heads yet (use --split pipeline)")));
            }
        }
        let norm = w.rms_norm("model.norm", cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(w.linear("lm_head", false)?) };
        Ok(Transformer { config: cfg.clone(), embed, blocks, norm, lm_head, on_cpu: w.cpu_dense_prefill, stage: None })
    }

    /// Run `tokens` (`[1, L]` int32) through the model, extending `cache`
    /// (one entry per layer). Returns logits `[1, L, vocab]`, or `[1, 1, vocab]`
    /// for the last position only when `last_only`.
    pub fn forward(&self, tokens: &Array, cache: &mut [LayerKv], last_only: bool) -> std::result::Result<Array, MlxError> {
        let (local, tail) = cache.split_at_mut(self.blocks.len());
        if let (Some(stage), [far]) = (&self.stage, &mut *tail) {
            if stage.split() == crate::pipeline::Split::Heads {
                let s = tokens.shape().to_vec();
                let ids = tokens.as_dtype(Dtype::Uint32)?;
                ids.eval()?;
                stage.announce(ids.as_slice::<u32>(), s[0], s[1], &mut [far], last_only)?;
                // Any failure now leaves the other ranks mid-step: the group is lost.
                let h = self.embed_tokens(tokens).and_then(|h| self.run_blocks(h, local)).map_err(|e| stage.lost(e))?;
                h.eval().map_err(|e| stage.lost(e.into()))?;
                stage.step_done();
                return self.head(h, last_only);
            }
        }
        let h = self.run_blocks(self.embed_tokens(tokens)?, local)?;
        let h = match (&self.stage, tail) {
            (Some(stage), [far]) => stage.forward(h, &mut [far], last_only)?,
            _ => h,
        };
        self.head(h, last_only)
    }

    /// Make this rank 0 of a pipeline whose other ranks hold the layers
    /// after this model's own ([`crate::pipeline`]).
    pub fn set_stage(&mut self, stage: crate::pipeline::Stage) {
        self.stage = Some(stage);
    }

    pub fn stage(&self) -> Option<&crate::pipeline::Stage> {
        self.stage.as_ref()
    }

    /// The token embeddings of `tokens` (`[1, L]`): `[1, L, hidden]`.
    pub fn embed_tokens(&self, tokens: &Array) -> std::result::Result<Array, MlxError> {
        self.embed.forward(tokens)
    }

    /// The hidden states `h` (`[1, L, hidden]`) through this model's blocks,
    /// extending `cache` (one entry per block held).
    pub fn run_blocks(&self, mut h: Array, cache: &mut [LayerKv]) -> std::result::Result<Array, MlxError> {
        assert_eq!(cache.len(), self.blocks.len(), "one KV state per layer");
        let single = h.shape().iter().take(2).product::<i32>() == 1;
        for (block, kv) in self.blocks.iter().zip(cache.iter_mut()) {
            h = block.forward(&h, kv)?;
        }
        // The CPU decode row leaves each layer's cache write lazy: one
        // evaluation for all of them (each costs ~70 us however small).
        if self.on_cpu && single {
            mlx_rs::transforms::eval(cache.iter().flat_map(LayerKv::arrays))?;
        }
        Ok(h)
    }

    /// The dtype hidden states have between blocks (the norms' weights').
    pub fn activation_dtype(&self) -> Dtype {
        self.norm.weight.dtype()
    }

    /// Final norm and output head: logits `[1, L, vocab]`, or of the last position only.
    pub fn head(&self, mut h: Array, last_only: bool) -> std::result::Result<Array, MlxError> {
        if last_only {
            let l = h.shape()[1];
            h = h.index((.., (l - 1)..l, ..));
        }
        let h = self.norm.forward(&h)?;
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => self.embed.as_linear(&h, self.on_cpu),
        }
    }

    /// One decode step for several sequences: row `i` is `tokens[i]`, the
    /// next token of the sequence whose cache (one entry per layer) is
    /// `caches[i]`; each row sees only its own cache, at its own position.
    /// Returns logits `[rows, vocab]`. One row is [`forward`](Self::forward)'s
    /// own step, so a sequence decoded alone or beside others computes the
    /// same (on the CPU kernels, each row's sums do not depend on the others).
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut [LayerKv]]) -> std::result::Result<Array, MlxError> {
        let b = tokens.len();
        assert_eq!(b, caches.len(), "one cache per row");
        assert!(caches.iter().all(|c| c.len() == self.num_layers()), "one KV state per layer");
        if let [cache] = caches {
            let logits = self.forward(&Array::from_slice(tokens, &[1, 1]), cache, true)?;
            return Ok(logits.reshape(&[1, -1])?);
        }
        let h = self.embed_tokens(&Array::from_slice(tokens, &[b as i32, 1]))?;
        let n = self.blocks.len();
        if let Some(stage) = self.stage.as_ref().filter(|s| s.split() == crate::pipeline::Split::Heads) {
            let mut tails: Vec<&mut LayerKv> = caches.iter_mut().map(|c| &mut c[n]).collect();
            stage.announce(tokens, b as i32, 1, &mut tails, false)?;
            let mut local: Vec<&mut [LayerKv]> = caches.iter_mut().map(|c| &mut c[..n]).collect();
            let h = self.run_rows(h, &mut local).map_err(|e| stage.lost(e))?;
            h.eval().map_err(|e| stage.lost(e.into()))?;
            stage.step_done();
            return Ok(self.head(h, false)?.reshape(&[b as i32, -1])?);
        }
        let mut local: Vec<&mut [LayerKv]> = caches.iter_mut().map(|c| &mut c[..n]).collect();
        let mut h = self.run_rows(h, &mut local)?;
        if let Some(stage) = &self.stage {
            let mut tails: Vec<&mut LayerKv> = caches.iter_mut().map(|c| &mut c[n]).collect();
            h = stage.forward(h, &mut tails, false)?;
        }
        Ok(self.head(h, false)?.reshape(&[b as i32, -1])?)
    }

    /// Rows of one token each (`h`: `[rows, 1, hidden]`) through this
    /// model's blocks, row `i` extending `caches[i]` (one entry per block).
    pub fn run_rows(&self, mut h: Array, caches: &mut [&mut [LayerKv]]) -> std::result::Result<Array, MlxError> {
        for (i, block) in self.blocks.iter().enumerate() {
            let mut kvs: Vec<&mut LayerKv> = caches.iter_mut().map(|c| &mut c[i]).collect();
            h = block.forward_rows(&h, &mut kvs)?;
        }
        if self.on_cpu {
            mlx_rs::transforms::eval(caches.iter().flat_map(|c| c.iter().flat_map(LayerKv::arrays)))?;
        }
        Ok(h)
    }

    /// KV entries a sequence's cache has: one per block held here, and one
    /// for the layers the other ranks of a pipeline hold.
    pub fn num_layers(&self) -> usize {
        self.blocks.len() + usize::from(self.stage.is_some())
    }

    /// Whether some layers keep a recurrent state (linear attention): the
    /// model's state then cannot be trimmed back to an earlier position.
    pub fn has_recurrent_state(&self) -> bool {
        self.blocks.iter().any(|b| matches!(b.attn, Mixer::Linear(_))) || (self.stage.is_some() && self.config.linear.is_some())
    }

    /// Room for `tokens` tokens in every attention layer's buffers (see
    /// [`LayerKv::reserve`]); linear-attention layers keep a fixed-size state.
    pub fn reserve(&self, cache: &mut [LayerKv], tokens: i32) -> std::result::Result<(), MlxError> {
        let cfg = &self.config;
        for (b, kv) in self.blocks.iter().zip(cache.iter_mut()) {
            if matches!(b.attn, Mixer::Attention(_)) {
                kv.reserve(tokens, cfg.num_kv_heads, cfg.head_dim)?;
            }
        }
        if let (Some(_), Some(far)) = (&self.stage, cache.get_mut(self.blocks.len())) {
            far.reserve(tokens, cfg.num_kv_heads, cfg.head_dim)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_its_range() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (ours, std) = (kernels::exp_nonpositive(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert!(kernels::exp_nonpositive(-1000.0) < 1e-37 && kernels::exp_nonpositive(0.0) == 1.0);
    }

    fn max_diff(a: &Array, b: &Array) -> f32 {
        ops::abs(ops::subtract(a, b).unwrap()).unwrap().max(None).unwrap().item_exact::<f32>()
    }

    /// The CPU chunk path gives what MLX's fused causal kernel gives, for a
    /// chunk at the start and one after earlier tokens, with grouped heads.
    #[test]
    fn chunk_attention_matches_the_fused_kernel() {
        mlx_rs::random::seed(7).unwrap();
        for (offset, l) in [(0, 6), (9, 5), (3, 2)] {
            let t = offset + l;
            let q = mlx_rs::random::normal::<f32>(&[1, 6, l, 8], None, None, None).unwrap();
            let k = mlx_rs::random::normal::<f32>(&[1, 2, t, 8], None, None, None).unwrap();
            let v = mlx_rs::random::normal::<f32>(&[1, 2, t, 8], None, None, None).unwrap();
            let ours = chunk_attention(&q, &k, &v, 0.35, offset).unwrap();
            let want = fast::scaled_dot_product_attention(&q, &k, &v, 0.35, Some(ScaledDotProductAttentionMask::Causal), None).unwrap();
            assert_eq!(ours.shape(), want.shape());
            let diff = max_diff(&ours, &want);
            assert!(diff < 1e-5, "offset {offset}, {l} queries: max difference {diff}");
            // Changing a key after the last query's position must not change anything.
            let later = ops::concatenate(&[&k, &ops::ones::<f32>(&[1, 2, 1, 8]).unwrap()], 2).unwrap();
            let later_v = ops::concatenate(&[&v, &ops::ones::<f32>(&[1, 2, 1, 8]).unwrap()], 2).unwrap();
            let q_more = ops::concatenate(&[&q, &ops::zeros::<f32>(&[1, 6, 1, 8]).unwrap()], 2).unwrap();
            let more = chunk_attention(&q_more, &later, &later_v, 0.35, offset).unwrap();
            let head = more.index((.., .., ..l, ..));
            let diff = max_diff(&head, &want);
            assert!(diff < 1e-5, "a later key leaked into earlier queries: {diff}");
        }
    }
}
