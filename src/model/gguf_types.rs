//! Reads a GGUF file's header (metadata skipped, tensor infos read) to check
//! tensor types before MLX loads it: MLX would silently turn types it has no
//! kernel for into float16, and kvserve refuses them instead, by name.

use std::io::{BufReader, Read};
use std::path::Path;

/// Tensor types kvserve loads (F32, F16, BF16 dense; Q4_0, Q4_1, Q8_0 as
/// MLX affine quantization).
const SUPPORTED: [u32; 6] = [0, 1, 2, 3, 8, 30];

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

struct Reader<R> {
    r: R,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| "the header is truncated".to_string())?;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn skip(&mut self, n: u64) -> Result<(), String> {
        let got = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink()).map_err(|e| e.to_string())?;
        if got != n {
            return Err("the header is truncated".into());
        }
        Ok(())
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        if n > 1 << 20 {
            return Err(format!("a header string claims {n} bytes"));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).map_err(|_| "the header is truncated".to_string())?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    /// Skip one metadata value of type `t`.
    fn skip_value(&mut self, t: u32, depth: u32) -> Result<(), String> {
        match t {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => {
                let n = self.u64()?;
                self.skip(n)
            }
            9 if depth < 4 => {
                let item = self.u32()?;
                let n = self.u64()?;
                match item {
                    0 | 1 | 7 => self.skip(n),
                    2 | 3 => self.skip(n.saturating_mul(2)),
                    4..=6 => self.skip(n.saturating_mul(4)),
                    10..=12 => self.skip(n.saturating_mul(8)),
                    _ => (0..n).try_for_each(|_| self.skip_value(item, depth + 1)),
                }
            }
            _ => Err(format!("metadata value type {t} is not valid")),
        }
    }
}

/// The first tensor whose type kvserve does not load, as (tensor, type name);
/// `Err` with a reason when the header cannot be read.
pub fn unsupported_tensor(path: &Path) -> Result<Option<(String, String)>, String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut r = Reader { r: BufReader::new(f) };
    if &r.bytes::<4>()? != b"GGUF" {
        return Err("not a GGUF file (no GGUF magic)".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2, 3)"));
    }
    let tensors = r.u64()?;
    let kvs = r.u64()?;
    for _ in 0..kvs {
        r.string()?;
        let t = r.u32()?;
        r.skip_value(t, 0)?;
    }
    for _ in 0..tensors {
        let name = r.string()?;
        let dims = r.u32()?;
        if dims > 8 {
            return Err(format!("tensor '{name}' claims {dims} dimensions"));
        }
        r.skip(8 * u64::from(dims))?;
        let t = r.u32()?;
        r.u64()?;
        if !SUPPORTED.contains(&t) {
            return Ok(Some((name, type_name(t))));
        }
    }
    Ok(None)
}
