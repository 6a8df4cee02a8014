//! Per-layer KV state passed into the model's forward pass (the model never
//! owns it). MLX arrays are immutable, so a snapshot is a set of references:
//! later writes build new arrays and leave the snapshot as it was.
//!
//! Keys and values are kept in f16 ([`KV_DTYPE`]) on every backend, as
//! llama.cpp and mlx-lm's half-precision models do: half the memory of f32
//! for the active cache, the snapshots and the snapshot files. Attention
//! reads them back in the compute dtype.

use mlx_rs::ops::indexing::{IndexOp, TryIndexMutOp};
use mlx_rs::ops::{self};
use mlx_rs::{Array, Dtype};

use crate::mlx::MlxError;

/// The dtype keys and values are stored in.
pub const KV_DTYPE: Dtype = Dtype::Float16;

fn stored(a: Array) -> Result<Array, MlxError> {
    Ok(if a.dtype() == KV_DTYPE { a } else { a.as_dtype(KV_DTYPE)? })
}

/// Buffers grow by this many tokens at a time (as mlx-lm's KVCache does).
pub const STEP: i32 = 256;

/// Keys and values of one attention layer, `[B, kv_heads, capacity, head_dim]`
/// buffers of which the first `offset` tokens are valid.
///
/// A linear-attention layer (qwen3_5's gated delta net) keeps no keys and
/// values but a recurrent state of fixed size: the last inputs of its short
/// convolution and the delta rule's state matrix, exact at `offset` and at
/// no other position (it cannot be trimmed; see [`trim_to`](Self::trim_to)).
#[derive(Clone, Default)]
pub struct LayerKv {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
    /// `(conv, state)`: `[B, kernel - 1, conv_dim]` in the compute dtype and
    /// `[B, v_heads, v_dim, k_dim]` in f32, as mlx-lm's ArraysCache holds them.
    recurrent: Option<(Array, Array)>,
    /// Set when these layers live in other processes (the later ranks of a
    /// pipeline, see [`remote`]): this holds only their position, and every
    /// change to them is queued for those ranks.
    remote: Option<remote::RemoteKv>,
}

impl LayerKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens held.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Tokens the buffers can hold before they grow.
    pub fn capacity(&self) -> i32 {
        self.keys.as_ref().map_or(0, |k| k.shape()[2])
    }

    /// Write this step's keys and values after the ones held (rounded to
    /// [`KV_DTYPE`]); return everything held so far, in the dtype `k` came
    /// in. The buffers grow in [`STEP`]s; the write is an MLX slice update,
    /// done in place unless a snapshot still references the buffer (then MLX
    /// copies, and the snapshot keeps its contents).
    pub fn update_and_fetch(&mut self, k: Array, v: Array) -> Result<(Array, Array), MlxError> {
        let dtype = k.dtype();
        self.append(k, v)?;
        let end = self.offset;
        let (keys, values) = (self.keys.as_ref().expect("written above"), self.values.as_ref().expect("written above"));
        let (k, v) = (keys.index((.., .., ..end, ..)), values.index((.., .., ..end, ..)));
        if dtype == KV_DTYPE {
            return Ok((k, v));
        }
        Ok((k.as_dtype(dtype)?, v.as_dtype(dtype)?))
    }

    /// [`update_and_fetch`](Self::update_and_fetch) without the fetch: the
    /// write stays lazy until the buffers are evaluated.
    pub fn append(&mut self, k: Array, v: Array) -> Result<(), MlxError> {
        let (k, v) = (stored(k)?, stored(v)?);
        let n = k.shape()[2];
        let end = self.offset + n;
        if end > self.capacity() {
            let s = k.shape();
            self.grow_to(self.offset + (n + STEP - 1) / STEP * STEP, [s[0], s[1], s[3]])?;
        }
        let (keys, values) = (self.keys.as_mut().expect("grown above"), self.values.as_mut().expect("grown above"));
        keys.try_index_mut((.., .., self.offset..end, ..), &k)?;
        values.try_index_mut((.., .., self.offset..end, ..), &v)?;
        self.offset = end;
        Ok(())
    }

    /// Make room for `tokens` tokens in all (rounded up to [`STEP`]) with
    /// one copy, instead of one per step as they arrive: a long prompt's
    /// chunks then write in place, and the old and new buffers of every
    /// layer never coexist in one chunk's graph. `kv_heads` and `head_dim`
    /// shape buffers not yet made.
    pub fn reserve(&mut self, tokens: i32, kv_heads: i32, head_dim: i32) -> Result<(), MlxError> {
        if let Some(r) = &self.remote {
            r.reserve(tokens);
            return Ok(());
        }
        if tokens <= self.capacity() {
            return Ok(());
        }
        self.grow_to((tokens + STEP - 1) / STEP * STEP, [1, kv_heads, head_dim])?;
        Ok(mlx_rs::transforms::eval(self.arrays())?)
    }

    /// New buffers of `cap` tokens holding the valid ones (lazily): shaped
    /// like the old buffers, or `[batch, heads, cap, dim]` when there are none.
    fn grow_to(&mut self, cap: i32, [batch, heads, dim]: [i32; 3]) -> Result<(), MlxError> {
        let offset = self.offset;
        let grow = |buf: Option<&Array>| -> Result<Array, MlxError> {
            Ok(match buf {
                Some(b) => {
                    let s = b.shape();
                    let zeros = ops::zeros_dtype(&[s[0], s[1], cap - offset, s[3]], KV_DTYPE)?;
                    // Drop the unused tail before growing so the layout stays contiguous.
                    ops::concatenate(&[&b.index((.., .., ..offset, ..)), &zeros], 2)?
                }
                None => ops::zeros_dtype(&[batch, heads, cap, dim], KV_DTYPE)?,
            })
        };
        let (k, v) = (grow(self.keys.as_ref())?, grow(self.values.as_ref())?);
        self.keys = Some(k);
        self.values = Some(v);
        Ok(())
    }

    /// The whole key and value buffers, `[B, kv_heads, capacity, head_dim]`
    /// in [`KV_DTYPE`], of which the first [`offset`](Self::offset) tokens
    /// are valid; `None` when empty.
    pub fn buffers(&self) -> Option<(&Array, &Array)> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.offset > 0 => Some((k, v)),
            _ => None,
        }
    }

    /// Keep only the first `len` tokens (the buffers keep their capacity;
    /// later writes overwrite the rest). A recurrent state holds only its
    /// own position: trimming it to any other but 0 is an error.
    pub fn trim_to(&mut self, len: i32) -> Result<(), MlxError> {
        let len = len.clamp(0, self.offset);
        if let Some(r) = &self.remote {
            r.trim(len);
            self.offset = len;
            return Ok(());
        }
        if len == 0 {
            *self = Self::default();
            return Ok(());
        }
        if self.recurrent.is_some() && len != self.offset {
            return Err(MlxError {
                message: format!("a recurrent state of {} tokens cannot be trimmed to {len}", self.offset),
                location: std::panic::Location::caller(),
            });
        }
        self.offset = len;
        Ok(())
    }

    /// Bytes held by the key and value buffers (capacity, not just offset)
    /// and the recurrent state.
    pub fn nbytes(&self) -> usize {
        if self.remote.is_some() {
            return self.kv_nbytes();
        }
        self.arrays().map(Array::nbytes).sum()
    }

    /// Bytes of the key and value buffers only (they grow with the tokens).
    /// For layers held by other ranks: what their buffers take there, from
    /// the bytes per token [`remote::enable`] was given.
    pub fn kv_nbytes(&self) -> usize {
        if self.remote.is_some() {
            return ((self.offset + STEP - 1) / STEP * STEP) as usize * remote::bytes_per_token();
        }
        self.keys.as_ref().map_or(0, Array::nbytes) + self.values.as_ref().map_or(0, Array::nbytes)
    }

    /// The buffers and states, to evaluate before a snapshot is kept.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter()).chain(self.recurrent.iter().flat_map(|(c, s)| [c, s]))
    }

    /// The recurrent state `(conv, state)`, if this is a linear-attention layer that holds tokens.
    pub fn recurrent(&self) -> Option<(&Array, &Array)> {
        self.recurrent.as_ref().map(|(c, s)| (c, s))
    }

    /// Whether this layer holds a recurrent state (that cannot be trimmed).
    pub fn is_recurrent(&self) -> bool {
        self.recurrent.is_some()
    }

    /// The recurrent state after `added` more tokens.
    pub fn set_recurrent(&mut self, conv: Array, state: Array, added: i32) {
        self.recurrent = Some((conv, state));
        self.offset += added;
    }

    /// A layer holding exactly this recurrent state, at `offset` tokens.
    pub fn from_recurrent(conv: Array, state: Array, offset: i32) -> Self {
        LayerKv { keys: None, values: None, offset, recurrent: Some((conv, state)), remote: None }
    }

    /// Fresh state for the layers the other ranks of a pipeline hold.
    pub fn new_remote() -> Self {
        LayerKv { remote: Some(remote::RemoteKv::new()), ..Default::default() }
    }

    /// The id the other ranks know these layers' state by, when they hold it.
    pub fn remote_id(&self) -> Option<u32> {
        self.remote.as_ref().map(|r| r.id)
    }

    /// The other ranks computed `tokens` more tokens into these layers.
    pub fn advance_remote(&mut self, tokens: i32) {
        debug_assert!(self.remote.is_some());
        self.offset += tokens;
    }

    /// A copy holding only what is valid (the first `offset` tokens of the
    /// buffers, lazily; a recurrent state by reference, as it is never
    /// written in place): what a snapshot taken in the middle of a prompt
    /// keeps, instead of the whole buffers the prompt goes on writing.
    pub fn compact(&self) -> Self {
        if let Some(r) = &self.remote {
            return LayerKv { remote: Some(r.compact()), offset: self.offset, ..Default::default() };
        }
        match (&self.recurrent, self.state()) {
            (Some(_), _) => self.clone(),
            (None, Some((k, v))) => match (k.contiguous(), v.contiguous()) {
                (Ok(k), Ok(v)) => LayerKv { keys: Some(k), values: Some(v), offset: self.offset, recurrent: None, remote: None },
                _ => self.clone(),
            },
            (None, None) => LayerKv::new(),
        }
    }

    /// A snapshot: references to the current buffers, unaffected by later
    /// writes (MLX never updates a buffer in place while another reference to it lives).
    pub fn snapshot(&self) -> Self {
        self.clone()
    }

    /// The valid keys and values, `[B, kv_heads, offset, head_dim]` (for
    /// saving); `None` when empty.
    pub fn state(&self) -> Option<(Array, Array)> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.offset > 0 => {
                Some((k.index((.., .., ..self.offset, ..)), v.index((.., .., ..self.offset, ..))))
            }
            _ => None,
        }
    }

    /// A state holding exactly `keys` and `values` (as [`state`](Self::state) gave them).
    /// Other dtypes are converted to [`KV_DTYPE`] (lazily).
    pub fn from_state(keys: Array, values: Array) -> Result<Self, MlxError> {
        let offset = keys.shape()[2];
        Ok(LayerKv { keys: Some(stored(keys)?), values: Some(stored(values)?), offset, recurrent: None, remote: None })
    }
}

/// A fresh KV state for every layer of a model.
/// A fresh KV state for every layer of a model: `layers` entries, the last
/// of them for the layers other ranks hold when this process leads a
/// pipeline ([`remote::enable`]).
pub fn new_cache(layers: usize) -> Vec<LayerKv> {
    let far = usize::from(remote::enabled() && layers > 0);
    (0..layers - far).map(|_| LayerKv::new()).chain((0..far).map(|_| LayerKv::new_remote())).collect()
}

/// The KV state of layers that other processes hold (the later ranks of a
/// pipeline, `kvserve serve --hostfile`). Rank 0 keeps one [`LayerKv`] per
/// sequence or snapshot for all of them, holding only the position and an
/// id; what is done to it (a copy for a snapshot, a trim, a compact copy, a
/// drop) is queued here as words of the pipeline's protocol and reaches the
/// other ranks, in order, with the next step they compute. So the prefix
/// cache, its policy and the scheduler work on a split model unchanged:
/// every rank holds its layers' share of every snapshot under the same id.
pub mod remote {
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

    use parking_lot::Mutex;

    /// A copy `[CLONE, from, to]`: the state `from` holds, under a new id.
    pub const CLONE: u32 = 1;
    /// `[COMPACT, from, to]`: a copy of only the valid tokens.
    pub const COMPACT: u32 = 2;
    /// `[TRIM, id, len]`: keep the first `len` tokens.
    pub const TRIM: u32 = 3;
    /// `[FREE, id]`: the state is dropped.
    pub const FREE: u32 = 4;
    /// `[RESERVE, id, tokens]`: room for `tokens` tokens.
    pub const RESERVE: u32 = 5;
    /// `[SAVE, id, n, token...]`: write the state's share to this rank's
    /// snapshot folder, named by its `n` tokens as rank 0 names its file.
    pub const SAVE: u32 = 9;
    /// `[UNLINK, key...]`: rank 0 deleted its snapshot file named by `key`
    /// (the 12 bytes of the name, in 3 words); delete this rank's share.
    pub const UNLINK: u32 = 10;
    /// `[LOAD, id, tokens, key...]`: read this rank's share of the snapshot
    /// file `key` into a new state `id`; then every rank says whether it
    /// could (an all_gather), so a share missing anywhere is a miss for all.
    /// Always a message's last words.
    pub const LOAD: u32 = 11;
    /// `[PACK, from, to, bits]`: keep state `from` quantized to `bits` (as
    /// `--kv-bits` keeps snapshots) under `to`.
    pub const PACK: u32 = 12;
    /// `[UNPACK, from, to]`: the packed state `from`, unpacked, under `to`.
    pub const UNPACK: u32 = 13;

    static ENABLED: AtomicBool = AtomicBool::new(false);
    static NEXT_ID: AtomicU32 = AtomicU32::new(1);
    static BYTES_PER_TOKEN: AtomicUsize = AtomicUsize::new(0);
    static QUEUE: Mutex<Vec<u32>> = Mutex::new(Vec::new());
    /// Sends a message ending in [`LOAD`] and waits for every rank's answer
    /// (set by the pipeline's rank 0, which holds the link).
    static LOADER: std::sync::OnceLock<Loader> = std::sync::OnceLock::new();

    /// See [`set_loader`].
    pub type Loader = Box<dyn Fn(Vec<u32>) -> Result<(), String> + Send + Sync>;

    /// How [`load`] reaches the other ranks: `f` sends the words it is given
    /// (queued operations, then [`LOAD`]) and returns once every rank has
    /// answered, an error naming those that could not read their share.
    pub fn set_loader(f: Loader) {
        let _ = LOADER.set(f);
    }

    /// From now on [`super::new_cache`] ends every cache with an entry for
    /// the layers other ranks hold, whose KV takes `bytes_per_token` there.
    pub fn enable(bytes_per_token: usize) {
        BYTES_PER_TOKEN.store(bytes_per_token, Ordering::SeqCst);
        ENABLED.store(true, Ordering::SeqCst);
    }

    pub fn enabled() -> bool {
        ENABLED.load(Ordering::SeqCst)
    }

    pub(super) fn bytes_per_token() -> usize {
        BYTES_PER_TOKEN.load(Ordering::SeqCst)
    }

    /// The words queued since the last call (the other ranks apply them in order).
    pub fn take_queued() -> Vec<u32> {
        std::mem::take(&mut *QUEUE.lock())
    }

    pub fn has_queued() -> bool {
        !QUEUE.lock().is_empty()
    }

    fn queue(words: &[u32]) {
        QUEUE.lock().extend_from_slice(words);
    }

    /// Queue a write of state `id`'s share on every other rank, named by
    /// `tokens` (the same name as rank 0's file for them).
    pub fn save(id: u32, tokens: &[u32]) {
        let mut q = QUEUE.lock();
        q.extend_from_slice(&[SAVE, id, tokens.len() as u32]);
        q.extend_from_slice(tokens);
    }

    /// Queue the deletion of the other ranks' shares of the file `key`.
    pub fn unlink(key: [u32; 3]) {
        queue(&[UNLINK, key[0], key[1], key[2]]);
    }

    /// The other ranks' shares of the snapshot file `key` (of `tokens`
    /// tokens), read back: an entry standing for them, or why a rank could not.
    pub fn load(key: [u32; 3], tokens: i32) -> Result<super::LayerKv, String> {
        let loader = LOADER.get().ok_or("this process leads no other ranks")?;
        let r = RemoteKv::new();
        let mut words = take_queued();
        words.extend([LOAD, r.id, tokens.max(0) as u32, key[0], key[1], key[2]]);
        // On failure `r` is dropped: the ranks that did read their share free it.
        loader(words)?;
        Ok(super::LayerKv { remote: Some(r), offset: tokens, ..Default::default() })
    }

    /// One remote state's id; copies get their own, and dropping it frees it there.
    pub(super) struct RemoteKv {
        pub id: u32,
    }

    impl RemoteKv {
        pub fn new() -> Self {
            RemoteKv { id: NEXT_ID.fetch_add(1, Ordering::SeqCst) }
        }

        fn copy(&self, op: u32) -> Self {
            let to = Self::new();
            queue(&[op, self.id, to.id]);
            to
        }

        pub fn compact(&self) -> Self {
            self.copy(COMPACT)
        }

        pub fn trim(&self, len: i32) {
            queue(&[TRIM, self.id, len.max(0) as u32]);
        }

        pub fn reserve(&self, tokens: i32) {
            queue(&[RESERVE, self.id, tokens.max(0) as u32]);
        }

        /// A copy kept quantized to `bits` there.
        pub fn pack(&self, bits: i32) -> Self {
            let to = Self::new();
            queue(&[PACK, self.id, to.id, bits as u32]);
            to
        }

        /// An unpacked copy of this packed state.
        pub fn unpack(&self) -> Self {
            self.copy(UNPACK)
        }
    }

    impl Clone for RemoteKv {
        fn clone(&self) -> Self {
            self.copy(CLONE)
        }
    }

    impl Drop for RemoteKv {
        fn drop(&mut self) {
            queue(&[FREE, self.id]);
        }
    }
}

/// A layer's keys and values kept quantized (`--kv-bits`): MLX's affine
/// quantization (`q * scale + bias` per group of the head dimension, as
/// mlx-lm's quantized KV cache) of the valid tokens only. A snapshot so
/// kept takes 8.5 bits a value at 8 bits (4.5 at 4) against f16's 16;
/// computing on it means unpacking it to f16 first. On rank 0 of a split
/// model, the entry for the other ranks' layers packs there.
pub struct PackedKv {
    held: Held,
    offset: i32,
}

enum Held {
    Here { keys: [Array; 3], values: [Array; 3], group: i32, bits: i32 },
    /// Packed on the other ranks of a pipeline, with what it takes there.
    Far { r: remote::RemoteKv, nbytes: usize },
}

impl PackedKv {
    /// The group size for a head dimension (MLX quantizes along the last axis).
    fn group_for(head_dim: i32) -> Option<i32> {
        [64, 32].into_iter().find(|g| head_dim % g == 0)
    }

    /// `l`'s valid tokens quantized to `bits` (lazily); `None` when `l` is
    /// empty or its head dimension is not a multiple of 32. The other
    /// ranks' entry packs there (their layers share this model's head
    /// dimension; one they cannot pack they keep as it is).
    pub fn pack(l: &LayerKv, bits: i32) -> Result<Option<Self>, MlxError> {
        if let Some(r) = &l.remote {
            // Their f16 bytes for the valid tokens, at `bits` a value plus a
            // scale and a bias (f16) per group of 64 (of 32 for head
            // dimensions that are not a multiple of 64: a little more).
            let f16 = l.offset.max(0) as usize * remote::bytes_per_token();
            let nbytes = (f16 as f64 * (bits as f64 / 8.0 + 4.0 / 64.0) / 2.0) as usize;
            return Ok((l.offset > 0).then(|| PackedKv { held: Held::Far { r: r.pack(bits), nbytes }, offset: l.offset }));
        }
        let Some((k, v)) = l.state() else { return Ok(None) };
        let Some(group) = Self::group_for(k.shape()[3]) else { return Ok(None) };
        let q = |a: &Array| -> Result<[Array; 3], MlxError> {
            let (p, s, b) = ops::quantize(a, group, bits)?;
            Ok([p, s, b])
        };
        Ok(Some(PackedKv { held: Held::Here { keys: q(&k)?, values: q(&v)?, group, bits }, offset: l.offset }))
    }

    /// Back to an f16 layer state holding exactly the packed tokens (lazily).
    pub fn unpack(&self) -> Result<LayerKv, MlxError> {
        match &self.held {
            Held::Here { keys, values, group, bits } => {
                let d = |[p, s, b]: &[Array; 3]| -> Result<Array, MlxError> { Ok(ops::dequantize(p, s, b, *group, *bits)?) };
                LayerKv::from_state(d(keys)?, d(values)?)
            }
            Held::Far { r, .. } => Ok(LayerKv { remote: Some(r.unpack()), offset: self.offset, ..Default::default() }),
        }
    }

    pub fn offset(&self) -> i32 {
        self.offset
    }

    pub fn nbytes(&self) -> usize {
        match &self.held {
            Held::Here { .. } => self.arrays().map(Array::nbytes).sum(),
            Held::Far { nbytes, .. } => *nbytes,
        }
    }

    /// The packed arrays, to evaluate before the snapshot is kept.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        let here = match &self.held {
            Held::Here { keys, values, .. } => Some(keys.iter().chain(values.iter())),
            Held::Far { .. } => None,
        };
        here.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What rank 0 does to the other ranks' entry reaches them as words, in
    /// order: a snapshot copy, a trim, a compact copy, room reserved, drops.
    /// (The only test here that makes remote entries: the queue is global.)
    #[test]
    fn remote_entries_queue_every_change_for_the_other_ranks() {
        use remote::*;
        let _ = take_queued();
        let mut live = LayerKv::new_remote();
        let a = live.remote_id().unwrap();
        live.advance_remote(40);
        assert_eq!(live.offset(), 40);
        assert!(!has_queued(), "a new entry and a step the followers computed queue nothing");
        let snap = live.snapshot();
        let b = snap.remote_id().unwrap();
        assert_ne!(a, b);
        live.trim_to(30).unwrap();
        assert_eq!((live.offset(), snap.offset()), (30, 40), "the copy keeps its position");
        let part = live.compact();
        let c = part.remote_id().unwrap();
        live.reserve(512, 2, 64).unwrap();
        drop(snap);
        live.trim_to(0).unwrap();
        assert_eq!(live.remote_id(), Some(a), "trimmed to nothing, it is still the other ranks' entry");
        assert_eq!(take_queued(), vec![CLONE, a, b, TRIM, a, 30, COMPACT, a, c, RESERVE, a, 512, FREE, b, TRIM, a, 0]);
        drop(part);
        drop(live);
        assert_eq!(take_queued(), vec![FREE, c, FREE, a]);
        // --kv-bits: a packed copy there, unpacked into a new entry; both freed when dropped.
        let mut live = LayerKv::new_remote();
        let a = live.remote_id().unwrap();
        assert!(PackedKv::pack(&live, 8).unwrap().is_none(), "nothing to pack before the other ranks computed");
        live.advance_remote(300);
        let p = PackedKv::pack(&live, 8).unwrap().expect("packed there");
        assert_eq!(p.offset(), 300);
        assert!(p.arrays().next().is_none(), "nothing held here");
        let back = p.unpack().unwrap();
        assert_eq!(back.offset(), 300);
        let (pid, bid) = (a + 1, back.remote_id().unwrap());
        // Snapshot files: write a share named by these tokens; delete the one named by a key.
        remote::save(bid, &[7, 8, 9]);
        remote::unlink([1, 2, 3]);
        drop(back);
        drop(p);
        assert_eq!(take_queued(), vec![PACK, a, pid, 8, UNPACK, pid, bid, SAVE, bid, 3, 7, 8, 9, UNLINK, 1, 2, 3, FREE, bid, FREE, pid]);
        drop(live);
        assert!(LayerKv::new_remote().state().is_none() && LayerKv::new_remote().arrays().next().is_none());
        let _ = take_queued();
    }
}
