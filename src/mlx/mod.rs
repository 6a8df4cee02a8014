//! kvserve's safe layer over MLX: mlx-rs for arrays and ops, plus what it
//! leaves out (MLX's version, which library serves BLAS, quantized weights as
//! one value). Raw FFI lives only in [`ffi`], and the C library's calls in
//! [`os`]: the crate denies `unsafe` everywhere else.

#[allow(unsafe_code)]
pub mod distributed;
#[allow(unsafe_code)]
mod ffi;
#[allow(unsafe_code)]
pub mod os;

use std::fmt;
use std::panic::Location;
use std::path::PathBuf;

pub use os::{ignore_interrupt, send_signal};
pub use mlx_rs::{Array, Dtype};

/// An MLX failure: MLX's own message and where kvserve made the call.
#[derive(Debug, Clone, thiserror::Error)]
pub struct MlxError {
    /// MLX's message, unchanged (e.g. the shapes of a failed matmul).
    pub message: String,
    /// The kvserve call site that issued the failing operation.
    pub location: &'static Location<'static>,
}

impl fmt::Display for MlxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MLX: {} (at {}:{})", self.message, self.location.file(), self.location.line())
    }
}

impl From<mlx_rs::error::Exception> for MlxError {
    #[track_caller]
    fn from(e: mlx_rs::error::Exception) -> Self {
        MlxError { message: e.what().to_string(), location: e.location() }
    }
}

pub type Result<T> = std::result::Result<T, MlxError>;

/// The MLX library version the process is running (e.g. "0.32.2").
pub fn version() -> Result<String> {
    ffi::mlx_version()
}

/// The MLX wheel this executable was linked against: `cpu`, `cuda13`,
/// `cuda12` or `metal` (`MLX_BACKEND` at build time).
pub const LINKED_BACKEND: &str = env!("KVSERVE_MLX_BACKEND");

/// End the process with `code`. On a CUDA build it ends without running
/// static destructors: MLX's CUDA objects are destroyed after the CUDA
/// driver has shut down at exit, and that throws ("Destroy(handle_) failed:
/// driver shutting down"), turning every exit into an abort (seen on an
/// H100 with mlx-cuda-13 0.32.2). Everything kvserve writes is flushed or
/// closed before this is called; stdout and stderr are flushed here.
pub fn exit(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if LINKED_BACKEND.starts_with("cuda") {
        os::exit_immediately(code)
    }
    std::process::exit(code)
}

/// Where MLX computes in this process: the default device and what MLX says
/// of it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// `"cpu"` or `"gpu"`.
    pub kind: String,
    /// MLX's keys for the device (`device_name`, `architecture`, memory sizes...).
    pub details: Vec<(String, String)>,
}

impl DeviceInfo {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.details.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// One line: "gpu: NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB)".
    pub fn describe(&self) -> String {
        let mut extra = Vec::new();
        if let Some(a) = self.get("architecture").filter(|a| !a.is_empty()) {
            extra.push(a.to_string());
        }
        let mem = ["total_memory", "memory_size"].iter().find_map(|k| self.get(k)?.parse::<u64>().ok());
        if let Some(m) = mem {
            extra.push(format!("{:.1} GiB", m as f64 / (1u64 << 30) as f64));
        }
        let name = self.get("device_name").filter(|n| !n.is_empty()).unwrap_or("unnamed device");
        if extra.is_empty() {
            format!("{}: {name}", self.kind)
        } else {
            format!("{}: {name} ({})", self.kind, extra.join(", "))
        }
    }
}

/// The default device MLX computes on (the GPU when the linked backend has
/// one and finds it), with MLX's description of it.
pub fn default_device() -> Result<DeviceInfo> {
    let (kind, details) = ffi::default_device_info()?;
    Ok(DeviceInfo { kind, details })
}

/// The shared object that serves `cblas_sgemm` for MLX in this process
/// (OpenBLAS when kvserve's link order took effect, else the wheel's
/// reference BLAS).
pub fn blas_provider() -> Option<PathBuf> {
    os::symbol_provider("cblas_sgemm")
}

/// `a @ b`, evaluated, then `f` over the product's float32 data in place
/// (row-major), e.g. a softmax written in Rust over attention scores. The
/// product is made here and seen by no other array, so changing it in
/// place is sound.
#[track_caller]
pub fn matmul_in_place<R>(a: &Array, b: &Array, f: impl FnOnce(&mut [f32]) -> R) -> Result<(Array, R)> {
    let product = a.matmul(b)?;
    // SAFETY: `product` is the fresh result of the matmul above; no other
    // array holds its buffer.
    #[allow(unsafe_code)]
    let r = unsafe { ffi::with_f32_data_mut(&product, f)? };
    Ok((product, r))
}

/// An f32 array of `shape` over `data`, not copied (MLX frees it with the array).
#[track_caller]
pub fn array_from_vec(data: Vec<f32>, shape: &[i32]) -> Result<Array> {
    ffi::array_from_vec(data, shape)
}

/// Bytes MLX holds in live arrays.
pub fn active_memory() -> Result<usize> {
    Ok(mlx_rs::memory::active_memory()?)
}

/// Highest [`active_memory`] since start or the last [`reset_peak_memory`].
pub fn peak_memory() -> Result<usize> {
    Ok(mlx_rs::memory::peak_memory()?)
}

pub fn reset_peak_memory() -> Result<()> {
    Ok(mlx_rs::memory::reset_peak_memory()?)
}

/// Bytes MLX keeps in its buffer cache (freed buffers kept for reuse).
pub fn cache_memory() -> Result<usize> {
    Ok(mlx_rs::memory::cache_memory()?)
}

/// Bound MLX's buffer cache to `bytes` (MLX sets no bound of its own on the
/// CPU: every freed buffer, such as a long prompt's attention scores, stays
/// allocated for reuse). Returns the previous limit.
pub fn set_cache_limit(bytes: usize) -> Result<usize> {
    Ok(mlx_rs::memory::set_cache_limit(bytes)?)
}

/// A weight matrix `[out, in]` in MLX's affine quantization: every
/// `group_size` consecutive values of a row share one scale and one bias,
/// each value stored in `bits` bits packed into u32 words.
#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    /// Packed values, `[out, in * bits / 32]` u32.
    pub packed: Array,
    /// One scale per group, `[out, in / group_size]`.
    pub scales: Array,
    /// One bias per group, `[out, in / group_size]`.
    pub biases: Array,
    pub group_size: i32,
    pub bits: i32,
}

impl QuantizedMatrix {
    /// Quantize a dense `[out, in]` matrix.
    #[track_caller]
    pub fn quantize(w: &Array, group_size: i32, bits: i32) -> Result<Self> {
        let (packed, scales, biases) = mlx_rs::ops::quantize(w, group_size, bits)?;
        Ok(Self { packed, scales, biases, group_size, bits })
    }

    /// `x @ W^T` with MLX's quantized kernel (the decode path).
    #[track_caller]
    pub fn matmul(&self, x: &Array) -> Result<Array> {
        Ok(mlx_rs::ops::quantized_matmul(
            x,
            &self.packed,
            &self.scales,
            &self.biases,
            true,
            self.group_size,
            self.bits,
        )?)
    }

    /// The dense `[out, in]` matrix these values stand for.
    #[track_caller]
    pub fn dequantize(&self) -> Result<Array> {
        Ok(mlx_rs::ops::dequantize(&self.packed, &self.scales, &self.biases, self.group_size, self.bits)?)
    }

    /// Rows and columns of the dense matrix.
    pub fn shape(&self) -> (i32, i32) {
        let s = self.packed.shape();
        (s[0], s[1] * 32 / self.bits)
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceInfo;

    fn info(kind: &str, pairs: &[(&str, &str)]) -> DeviceInfo {
        DeviceInfo { kind: kind.into(), details: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn describe_names_device_architecture_and_memory() {
        let gpu = info("gpu", &[("device_name", "NVIDIA H100 80GB HBM3"), ("architecture", "sm_90"), ("total_memory", "85520809984")]);
        assert_eq!(gpu.describe(), "gpu: NVIDIA H100 80GB HBM3 (sm_90, 79.6 GiB)");
        assert_eq!(gpu.get("architecture"), Some("sm_90"));
        // Metal's key for memory, and an empty architecture left out.
        let metal = info("gpu", &[("device_name", "Apple M2"), ("architecture", ""), ("memory_size", "17179869184")]);
        assert_eq!(metal.describe(), "gpu: Apple M2 (16.0 GiB)");
        assert_eq!(info("cpu", &[]).describe(), "cpu: unnamed device");
    }

    #[test]
    fn the_default_device_here_is_the_linked_backends() {
        let d = super::default_device().unwrap();
        // The CPU wheel has no GPU; a CUDA or Metal build computes on its GPU.
        let want = if super::LINKED_BACKEND == "cpu" { "cpu" } else { "gpu" };
        assert_eq!(d.kind, want, "{d:?}");
        assert!(!d.describe().is_empty());
    }
}
