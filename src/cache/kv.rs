//! Per-layer KV state passed into the model's forward pass (the model never
//! owns it). MLX arrays are immutable, so a snapshot is a set of references:
//! later writes build new arrays and leave the snapshot as it was.

use mlx_rs::ops::{self, indexing::IndexOp};
use mlx_rs::Array;

use crate::mlx::MlxError;

/// Keys and values of one attention layer, `[B, kv_heads, tokens, head_dim]`.
#[derive(Clone, Default)]
pub struct LayerKv {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
}

impl LayerKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens held.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Append this step's keys and values; return everything held so far.
    pub fn update_and_fetch(&mut self, k: Array, v: Array) -> Result<(Array, Array), MlxError> {
        let n = k.shape()[2];
        let (keys, values) = match (&self.keys, &self.values) {
            (Some(pk), Some(pv)) => (ops::concatenate(&[pk, &k], 2)?, ops::concatenate(&[pv, &v], 2)?),
            _ => (k, v),
        };
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        self.offset += n;
        Ok((keys, values))
    }

    /// Keep only the first `len` tokens.
    pub fn trim_to(&mut self, len: i32) -> Result<(), MlxError> {
        let len = len.clamp(0, self.offset);
        if len == 0 {
            *self = Self::default();
            return Ok(());
        }
        if let (Some(k), Some(v)) = (&self.keys, &self.values) {
            self.keys = Some(k.index((.., .., ..len, ..)));
            self.values = Some(v.index((.., .., ..len, ..)));
        }
        self.offset = len;
        Ok(())
    }

    /// Bytes held by keys and values.
    pub fn nbytes(&self) -> usize {
        self.keys.as_ref().map_or(0, Array::nbytes) + self.values.as_ref().map_or(0, Array::nbytes)
    }

    /// A snapshot: references to the current arrays, unaffected by later writes.
    pub fn snapshot(&self) -> Self {
        self.clone()
    }
}

/// A fresh KV state for every layer of a model.
pub fn new_cache(layers: usize) -> Vec<LayerKv> {
    (0..layers).map(|_| LayerKv::new()).collect()
}
