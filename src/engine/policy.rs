//! The prompt cache's policy: which snapshot serves a prompt (and whether it
//! is taken over or copied), what is kept when a request ends, and when
//! snapshots go to disk. The index itself is [`PrefixCache`]; the files are
//! [`Store`]'s.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::cache::kv::{new_cache, remote, LayerKv, PackedKv};
use crate::mlx::MlxError;
use crate::cache::prefix::{CacheStats, Cached, EntryId, PrefixCache};
use crate::cache::disk;
use crate::cache::store::{self, Store};
use crate::engine::worker::CacheDisk;

/// A request takes over (rather than copies) a snapshot whose prompt it
/// continues but for at most this many final tokens (the boundary before
/// the answer re-tokenizes), and whose answer part it does not share is at
/// most [`TAKE_OVER_TAIL`] tokens long; see [`CachePolicy::lookup`].
pub const TAKE_OVER_SLACK: usize = 8;
pub const TAKE_OVER_TAIL: usize = 4096;

/// A snapshot's state in memory: as computed (f16), or packed (`--kv-bits`).
pub(super) enum Kept {
    Full(Vec<LayerKv>),
    Packed(Vec<Option<PackedKv>>),
}

impl Kept {
    fn nbytes(&self) -> usize {
        match self {
            Kept::Full(l) => l.iter().map(LayerKv::nbytes).sum(),
            Kept::Packed(p) => p.iter().flatten().map(PackedKv::nbytes).sum(),
        }
    }

    /// As layers to compute on or to save (packed ones unpacked, lazily;
    /// full ones as references, copied on write).
    fn layers(&self) -> Result<Vec<LayerKv>, MlxError> {
        match self {
            Kept::Full(l) => Ok(l.iter().map(LayerKv::snapshot).collect()),
            Kept::Packed(p) => p.iter().map(|l| l.as_ref().map_or(Ok(LayerKv::new()), PackedKv::unpack)).collect(),
        }
    }

    fn into_layers(self) -> Result<Vec<LayerKv>, MlxError> {
        match self {
            Kept::Full(l) => Ok(l),
            packed => packed.layers(),
        }
    }
}

/// A KV snapshot in the prefix cache: in memory, on disk, or both.
#[derive(Clone)]
pub(super) struct Snapshot {
    layers: Option<Rc<Kept>>,
    file: Option<PathBuf>,
    /// How many of its tokens were the request's prompt (the rest is the
    /// answer); 0 when unknown (read from disk).
    prompt_len: usize,
}

impl Cached for Snapshot {
    fn bytes(&self) -> usize {
        self.layers.as_ref().map_or(0, |k| k.nbytes())
    }
    fn demote(&self) -> Option<Self> {
        self.file.as_ref().map(|f| Snapshot { layers: None, file: Some(f.clone()), prompt_len: self.prompt_len })
    }
}

/// The weight, config and tokenizer files a model's KV state depends on.
fn model_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".safetensors") || name == "config.json" || name == "tokenizer.json" || name == "tokenizer_config.json"
        })
        .collect();
    files.sort();
    files
}

/// Read the snapshot file `path` of `layers` layers and `tokens` tokens. On
/// rank 0 of a pipeline the file holds this rank's layers, and the last
/// entry stands for the other ranks' shares, which they read at once from
/// their own folders: a share missing or damaged anywhere fails the whole.
fn load_snapshot(store: &Store, path: &Path, layers: usize, tokens: usize) -> Result<Vec<LayerKv>, String> {
    if !remote::enabled() {
        return store::load(path, layers, tokens, &store.fingerprint).map_err(|e| e.to_string());
    }
    if crate::pipeline::broken() {
        return Err(crate::pipeline::why_broken());
    }
    let mut here = store::load(path, layers - 1, tokens, &store.fingerprint).map_err(|e| e.to_string())?;
    let key = store::key_of(path).ok_or_else(|| format!("{}: not a snapshot file's name", path.display()))?;
    let far = remote::load(key, tokens as i32).map_err(|e| format!("{}: {e}", path.display()))?;
    here.push(far);
    Ok(here)
}

/// Where the snapshot files of the model at `model_path` (rendered with
/// `template`) go under `root`, and their fingerprint. A rank of a split
/// model keeps its `share` of them (a subfolder's name, and what its
/// fingerprint adds: the split, the rank and the layers it holds) apart.
pub fn snapshot_folder(root: &Path, disk: &CacheDisk, model_path: &Path, template: Option<&str>, share: Option<&(String, String)>) -> (PathBuf, String) {
    let fp = store::fingerprint(&model_files(model_path), template);
    let dir = if disk.per_model { root.join(&fp[..disk::KEY_LEN.min(fp.len())]) } else { root.to_path_buf() };
    match share {
        Some((folder, what)) => (dir.join(folder), format!("{fp}{what}")),
        None => (dir, fp),
    }
}

/// What [`CachePolicy::lookup`] found.
pub(super) struct Lookup {
    /// The KV state to compute the rest of the prompt on.
    pub live: Vec<LayerKv>,
    /// Prompt tokens it already holds.
    pub read: usize,
    /// What the request holds until it ends (dropped if it fails).
    pub held: Held,
}

/// Cache state a running request holds.
#[derive(Default)]
pub(super) struct Held {
    /// A shared entry in use: pinned (never evicted) until the request ends.
    pub pinned: Option<EntryId>,
    /// The file of an entry taken out of the index, deleted once a newer snapshot is on disk.
    pub taken_file: Option<PathBuf>,
}

pub(super) struct CachePolicy {
    pub cache: PrefixCache<Snapshot>,
    pub store: Option<Store>,
    stats: Arc<Mutex<CacheStats>>,
    layers: usize,
    /// Keep snapshots quantized to this many bits (`--kv-bits`).
    kv_bits: Option<i32>,
    /// Entries kept in memory and not yet written to disk (newest last).
    unsaved: Vec<EntryId>,
    /// Files of entries taken out of the index, each with the entry that
    /// replaces it (if one was kept): deleted once that one is on disk (or,
    /// without one, once any newer snapshot is).
    obsolete: Vec<(Option<EntryId>, PathBuf)>,
}

impl CachePolicy {
    /// An empty cache of `budget` bytes; with `dir`, snapshots of the model
    /// at `model_path` persist there and those already there are indexed
    /// (rank 0 of a split model: its `share` of them, in a folder of its
    /// own, see [`snapshot_folder`]).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        budget: usize,
        dir: Option<&Path>,
        disk: &CacheDisk,
        model_path: &Path,
        template: Option<&str>,
        share: Option<(String, String)>,
        layers: usize,
        kv_bits: Option<i32>,
        exact: bool,
        stats: Arc<Mutex<CacheStats>>,
    ) -> Self {
        let mut cache = if exact { PrefixCache::exact(budget) } else { PrefixCache::new(budget) };
        let store = dir.and_then(|root| {
            let (dir, fp) = snapshot_folder(root, disk, model_path, template, share.as_ref());
            let store = Store::open(&dir, fp).map_err(|e| tracing::warn!("prompt cache kept in memory only: {e}")).ok()?;
            if disk.per_model {
                // The model's folder (a rank's share is in a subfolder of it): `kvserve cache ls|rm` find it.
                let folder = if share.is_some() { dir.parent().unwrap_or(&dir) } else { dir.as_path() };
                disk::write_model_file(folder, model_path, &store.fingerprint);
            }
            // The per-user folder is bounded by default; a folder given by
            // name only when --cache-disk-bytes says so.
            let bound = disk.bound_bytes.or_else(|| disk.per_model.then(|| disk::default_budget(root)));
            // A rank's share is bounded on its own (the other ranks' folders may be on other machines).
            let root = if share.is_some() { dir.as_path() } else { root };
            match bound {
                Some(b) => {
                    tracing::info!("prompt cache on disk: {} (at most {:.1} GB under {})", dir.display(), b as f64 / 1e9, root.display());
                    store.bound_disk(root, b);
                }
                None => tracing::info!("prompt cache on disk: {}", dir.display()),
            }
            Some(store)
        });
        if let Some(s) = &store {
            let (found, warnings) = store::scan(&s.dir, &s.fingerprint);
            for w in warnings {
                tracing::warn!("{w}");
            }
            let n = found.len();
            for f in found {
                s.mark_written(&f.path);
                cache.insert(&f.tokens, Snapshot { layers: None, file: Some(f.path), prompt_len: 0 });
            }
            // Files made redundant by longer ones stay on disk but are not indexed.
            cache.take_removed();
            tracing::info!("prompt cache: {n} snapshots found in {}", s.dir.display());
        }
        let p = CachePolicy { cache, store, stats, layers, kv_bits, unsaved: vec![], obsolete: vec![] };
        p.publish();
        p
    }

    /// Make the numbers `/v1/cache/stats` and metrics read current.
    pub fn publish(&self) {
        // Snapshots whose file is complete on disk (not merely queued, failed, or deleted by the bound).
        let on_disk = match &self.store {
            Some(store) => self.cache.entries().iter().filter(|e| self.cache.value(e.0).and_then(|s| s.file.as_ref()).is_some_and(|f| store.is_written(f))).count(),
            None => 0,
        };
        *self.stats.lock() = CacheStats { on_disk, disk_busy: self.disk_busy(), ..self.cache.stats() };
    }

    pub fn budget(&self) -> usize {
        self.cache.budget()
    }

    /// Snapshots serve only whole (the model has recurrent state).
    pub fn exact(&self) -> bool {
        self.cache.is_exact()
    }

    /// The folder snapshots persist in, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.store.as_ref().map(|s| s.dir.as_path())
    }

    /// Has snapshots not yet written to disk.
    pub fn has_unsaved(&self) -> bool {
        !self.unsaved.is_empty()
    }

    /// Has snapshots to write, or writes still under way (the published
    /// numbers are refreshed until they are done).
    pub fn disk_busy(&self) -> bool {
        self.has_unsaved() || self.store.as_ref().is_some_and(|s| s.pending() > 0)
    }

    pub fn clear(&mut self) -> usize {
        let n = self.cache.clear();
        self.forget_removed();
        self.publish();
        n
    }

    /// After a failure: the entries a failed request held are dropped (a
    /// pinned one may be what broke it); the index is checked and cleared if
    /// broken.
    pub fn drop_held(&mut self, held: Held) {
        if let Some(id) = held.pinned {
            self.cache.release(id);
            self.cache.remove(id);
        }
        if let Some(f) = held.taken_file {
            store::delete(&f);
        }
        if let Err(e) = self.cache.check() {
            tracing::error!("the prompt cache's index is inconsistent after the failure ({e}); clearing it");
            self.cache.clear();
        }
        self.forget_removed();
        self.publish();
    }

    /// A request ended: unpin what it used; the file of a snapshot it took
    /// over goes once `replaced_by` (its own snapshot, if kept) is on disk.
    pub fn release(&mut self, held: Held, replaced_by: Option<EntryId>) {
        self.obsolete.extend(held.taken_file.map(|f| (replaced_by, f)));
        if let Some(id) = held.pinned {
            self.cache.release(id);
            self.forget_removed();
        }
    }

    /// Delete the files of snapshots the cache dropped.
    fn forget_removed(&mut self) {
        for s in self.cache.take_removed() {
            if let Some(f) = s.file {
                store::delete(&f);
            }
        }
    }

    /// Store a snapshot of `live` (holding `tokens`, the first `prompt_len`
    /// of them a prompt), on disk too when a cache folder is set; its entry
    /// if it was kept. With `--kv-bits` it is kept packed, unless a layer
    /// cannot be (a head dimension that is not a multiple of 32): then as is.
    pub fn keep(&mut self, tokens: &[u32], prompt_len: usize, live: &[LayerKv]) -> Option<EntryId> {
        // An entry for exactly these tokens holds this state already (and
        // perhaps its file): keep that one.
        if self.cache.holds(tokens) {
            return None;
        }
        let full = || {
            mlx_rs::transforms::eval(live.iter().flat_map(LayerKv::arrays))
                .map_err(MlxError::from)
                .map(|()| Kept::Full(live.iter().map(LayerKv::snapshot).collect()))
        };
        let kept = match self.kv_bits {
            None => full(),
            Some(bits) => match live.iter().map(|l| PackedKv::pack(l, bits)).collect::<Result<Vec<_>, _>>() {
                // Every layer that holds tokens packed.
                Ok(p) if p.iter().zip(live).all(|(p, l)| p.is_some() || l.offset() == 0) => {
                    mlx_rs::transforms::eval(p.iter().flatten().flat_map(PackedKv::arrays)).map_err(MlxError::from).map(|()| Kept::Packed(p))
                }
                Ok(_) => full(),
                Err(e) => Err(e),
            },
        };
        let kept = match kept {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("snapshot not kept: {e}");
                return None;
            }
        };
        if kept.nbytes() > self.cache.budget() {
            return None;
        }
        let id = self.cache.insert(tokens, Snapshot { layers: Some(Rc::new(kept)), file: None, prompt_len });
        self.forget_removed();
        if let (Some(id), Some(_)) = (id, &self.store) {
            self.unsaved.push(id);
        }
        self.publish();
        id
    }

    /// Write the newest snapshot not yet on disk (called when idle); then
    /// delete the files it supersedes. False when there was nothing to write.
    pub fn persist_one(&mut self) -> bool {
        let Some(store) = &self.store else { return false };
        while let Some(id) = self.unsaved.pop() {
            let (Some(tokens), Some(snap)) = (self.cache.tokens_of(id), self.cache.value(id).cloned()) else { continue };
            let Some(kept) = &snap.layers else { continue };
            // As kept (a copy would be one more for the other ranks of a
            // pipeline too), or unpacked.
            let saved = match &**kept {
                Kept::Full(layers) => store.save(&tokens, layers),
                packed => match packed.layers() {
                    Ok(layers) => store.save(&tokens, &layers),
                    Err(e) => {
                        tracing::warn!("snapshot not written to disk: {e}");
                        return true;
                    }
                },
            };
            match saved {
                Ok(path) => {
                    self.obsolete.retain(|(by, old)| {
                        let gone = by.is_none_or(|by| by == id);
                        if gone && *old != path {
                            store::delete(old);
                        }
                        !gone
                    });
                    self.cache.replace(id, Snapshot { layers: snap.layers.clone(), file: Some(path), prompt_len: snap.prompt_len });
                    self.forget_removed();
                    self.publish();
                }
                Err(e) => tracing::warn!("snapshot not written to disk: {e}"),
            }
            return true;
        }
        false
    }

    /// Write everything still unsaved (at shutdown).
    pub fn flush(&mut self) {
        while self.persist_one() {}
        if let Some(store) = &self.store {
            store.flush();
        }
    }

    /// The deepest usable snapshot for `prompt` as a live cache (see [`Lookup`]) and how many
    /// tokens it serves. A snapshot the prompt extends, or whose prompt it
    /// extends (the next turn of its conversation), is taken out of the index (this
    /// request's own snapshot will replace it), so the live state owns its
    /// buffers and MLX writes them in place; one that must be trimmed by
    /// more stays (it is another conversation's) and is copied on write.
    /// A snapshot that cannot be read from disk is dropped.
    pub fn lookup(&mut self, prompt: &[u32]) -> Lookup {
        let out = self.lookup_inner(prompt);
        self.publish();
        out
    }

    fn lookup_inner(&mut self, prompt: &[u32]) -> Lookup {
        loop {
            let Some(hit) = self.cache.fetch_nearest(prompt, prompt.len() - 1) else {
                return Lookup { live: new_cache(self.layers), read: 0, held: Held::default() };
            };
            let layers = match (&hit.value.layers, &hit.value.file, &self.store) {
                (Some(l), _, _) => l.clone(),
                (None, Some(f), Some(store)) => match load_snapshot(store, f, self.layers, hit.entry_len) {
                    Ok(l) => {
                        // Read: the last to go when the disk bound deletes.
                        disk::touch(f);
                        let l = Rc::new(Kept::Full(l));
                        // Kept in memory when it stays in the index: trimmed
                        // for this request, or (exact) served whole and kept.
                        if hit.usable < hit.entry_len || self.cache.is_exact() {
                            self.cache.replace(hit.id, Snapshot { layers: Some(l.clone()), file: Some(f.clone()), prompt_len: hit.value.prompt_len });
                        }
                        l
                    }
                    // The other ranks are gone: the file is not at fault (kept,
                    // for the group's restart); the request fails on its first step.
                    Err(_) if crate::pipeline::broken() => {
                        self.cache.release(hit.id);
                        return Lookup { live: new_cache(self.layers), read: 0, held: Held::default() };
                    }
                    Err(e) => {
                        tracing::warn!("ignoring a cached snapshot: {e}");
                        self.cache.release(hit.id);
                        self.cache.remove(hit.id);
                        self.forget_removed();
                        continue;
                    }
                },
                _ => {
                    self.cache.release(hit.id);
                    self.cache.remove(hit.id);
                    continue;
                }
            };
            let file = hit.value.file.clone();
            // The next turn of the snapshot's conversation is taken over too:
            // it continues the snapshot's prompt and differs only in the
            // answer (the template re-renders it, and its first tokens
            // re-tokenize differently). Keeping the old one would cost a full
            // copy of the cache on the first write and one more snapshot in
            // memory every turn, for an answer that costs little to
            // recompute if that exact request ever comes again. Another
            // conversation sharing only a prefix is copied.
            // An exact cache (states that cannot be trimmed) keeps every
            // snapshot where it is: the shorter ones a conversation left
            // are what its next turns and other conversations resume from.
            let p = hit.value.prompt_len;
            let owned = !self.cache.is_exact()
                && (hit.usable == hit.entry_len
                    || (p > 0 && hit.usable + TAKE_OVER_SLACK >= p && hit.entry_len.saturating_sub(hit.usable) <= TAKE_OVER_TAIL));
            let (id, usable) = (hit.id, hit.usable);
            drop(hit);
            let mut held = Held { pinned: Some(id), taken_file: None };
            if owned {
                // Out of the index; its file stays until this request's snapshot is written.
                self.cache.remove(id);
                self.cache.take_removed();
                held = Held { pinned: None, taken_file: file };
            }
            let layers = match Rc::try_unwrap(layers) {
                Ok(kept) => kept.into_layers(),
                Err(shared) => shared.layers(),
            };
            // Only the tokens the index matched are this prompt's; the rest is another conversation's.
            let live = layers.map_err(|e| e.to_string()).and_then(|mut live| {
                for l in &mut live {
                    let _ = l.trim_to(usable as i32);
                }
                match live.iter().all(|l| l.offset() as usize == usable) {
                    true => Ok(live),
                    false => Err("it holds fewer tokens than indexed".to_string()),
                }
            });
            return match live {
                Ok(live) => Lookup { live, read: usable, held },
                Err(why) => {
                    // A packed snapshot MLX could not unpack, or one that
                    // does not hold what the index says: a miss.
                    tracing::warn!("ignoring a cached snapshot: {why}");
                    if let Some(id) = held.pinned {
                        self.cache.release(id);
                    }
                    Lookup { live: new_cache(self.layers), read: 0, held: Held { pinned: None, taken_file: held.taken_file } }
                }
            };
        }
    }
}
