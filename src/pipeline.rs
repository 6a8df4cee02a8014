//! Serving one model split by layers over the ranks of an MLX ring
//! (`kvserve serve --hostfile`): pipeline parallelism.
//!
//! Rank 0 runs the server, the scheduler and the prompt index, and holds
//! the embedding, the first layers and the head. Every other rank holds a
//! contiguous range of the later layers and follows rank 0's steps. The
//! KV state of those layers lives on the ranks that hold them: rank 0's
//! caches end with one entry standing for all of it
//! ([`crate::cache::kv::remote`]), so a snapshot is every rank's share
//! under one id, and lookup, eviction and trimming stay rank 0's decisions.
//!
//! Everything travels over MLX's own send/recv between ring neighbours. A
//! message from rank `r` to `r + 1` is a length (`[1]` int32), the words
//! (`[n]` uint32: the cache operations queued since the last message, then
//! at most one [`FORWARD`] or [`STOP`]), and for [`FORWARD`] the hidden
//! states `[rows, tokens, hidden]`. Each rank applies the operations to its
//! share, runs its layers and passes the message on; the last rank sends
//! the hidden states (the last position only, when that is all the head
//! needs) back to rank 0, its ring neighbour, which computes the logits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};
use parking_lot::Mutex;

use crate::cache::kv::{new_cache, remote, LayerKv, PackedKv};
use crate::mlx::distributed::Group;
use crate::mlx::MlxError;
use crate::model::Transformer;

/// `[FORWARD, rows, tokens, last_only, id...]`: run `rows` rows of `tokens`
/// tokens each through this rank's layers, row `i` extending state `id[i]`.
pub const FORWARD: u32 = 6;
/// `[STOP]`: rank 0 is shutting down; followers exit.
pub const STOP: u32 = 7;
/// `[FORWARD_TOKENS, rows, tokens, last_only, id..., token...]` (split by
/// heads): every rank embeds the same tokens and runs its share of every
/// layer; the all_sums inside the layers join the shares.
pub const FORWARD_TOKENS: u32 = 8;

/// How a model is split over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Pipeline parallelism: each rank holds a contiguous range of layers.
    Layers,
    /// Tensor parallelism: each rank holds a share of every layer's
    /// attention heads and MLP columns.
    Heads,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Layers => "pipeline",
            Split::Heads => "tensor",
        }
    }
}

/// The exit status of every rank when the group has lost a rank
/// (EX_UNAVAILABLE), so that a supervisor restarts the whole group.
pub const EXIT_RANK_LOST: i32 = 69;

static BROKEN: AtomicBool = AtomicBool::new(false);
static WHY: Mutex<String> = Mutex::new(String::new());
/// Set while rank 0 is inside a step the other ranks take part in.
static IN_STEP: AtomicBool = AtomicBool::new(false);
/// When the step under way was handed to the other ranks (ms since start).
static STEP_SINCE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

fn enter_step() {
    STEP_SINCE_MS.store(now_ms(), Ordering::SeqCst);
    IN_STEP.store(true, Ordering::SeqCst);
}

/// Watch rank 0's steps: one the other ranks have not answered within
/// `timeout` means a rank is gone without closing its links (a machine
/// powered off, a process stopped), which MLX's ring waits on for ever.
/// Then the group is marked broken (new requests get 503) and, after the
/// same grace as a lost link, the process exits with [`EXIT_RANK_LOST`]
/// (the requests under way lose their connections: the engine thread is
/// stuck in MLX and cannot answer them).
pub fn watch_steps(timeout: std::time::Duration) {
    let _ = now_ms();
    std::thread::Builder::new()
        .name("step-watch".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(250).min(timeout));
            let since = STEP_SINCE_MS.load(Ordering::SeqCst);
            if IN_STEP.load(Ordering::SeqCst) && now_ms().saturating_sub(since) > timeout.as_millis() as u64 {
                let why = format!(
                    "the other ranks did not answer a step within {:.0} s (--step-timeout): a rank is gone without closing its links; every rank exits (status {EXIT_RANK_LOST}) for a supervisor to restart the group",
                    timeout.as_secs_f64()
                );
                set_broken(why.clone());
                tracing::error!("{why}");
                eprintln!("kvserve: {why}");
                std::thread::sleep(std::time::Duration::from_millis(1500));
                crate::mlx::exit(EXIT_RANK_LOST);
            }
        })
        .expect("start the step watch thread");
}

fn set_broken(why: String) {
    if !BROKEN.swap(true, Ordering::SeqCst) {
        *WHY.lock() = why;
    }
}

/// Rank 0 abandoned a step (a panic): if the other ranks were in it, they
/// are now out of step with rank 0, and the group is broken.
pub fn abandon_step() {
    if IN_STEP.swap(false, Ordering::SeqCst) {
        set_broken(format!("rank 0 abandoned a step the other ranks were computing with it, so they are out of step; every rank exits (status {EXIT_RANK_LOST}) for a supervisor to restart the group"));
    }
}

/// Whether the group lost a rank (no step can be computed any more).
pub fn broken() -> bool {
    BROKEN.load(Ordering::SeqCst)
}

/// What was lost, once [`broken`].
pub fn why_broken() -> String {
    WHY.lock().clone()
}

fn mlx_err(message: String) -> MlxError {
    MlxError { message, location: std::panic::Location::caller() }
}

/// Rank 0's link to the rest of the pipeline (held by its [`Transformer`]).
pub struct Stage {
    split: Split,
    group: std::sync::Arc<Group>,
    hidden: i32,
    dtype: Dtype,
    /// The layers each rank holds, for messages.
    ranges: Vec<std::ops::Range<i32>>,
    /// Bytes sent to rank 1 and received from the last rank, by kind of step.
    pub traffic: std::sync::Arc<Mutex<Traffic>>,
}

/// Bytes rank 0 sent down the pipeline and got back, as measured.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    /// Decode steps (one token per row): rows, bytes out, bytes back.
    pub decode_rows: u64,
    pub decode_out: u64,
    pub decode_back: u64,
    /// Prompt chunks: tokens, bytes out, bytes back.
    pub prefill_tokens: u64,
    pub prefill_out: u64,
    pub prefill_back: u64,
    /// Messages of cache operations alone: bytes.
    pub ops_out: u64,
}

impl std::fmt::Display for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = |b: u64, n: u64| if n == 0 { 0.0 } else { b as f64 / n as f64 };
        write!(
            f,
            "decode: {} rows, {} bytes out and {} back ({:.0} + {:.0} per row); prompt: {} tokens, {} bytes out and {} back; cache operations alone: {} bytes",
            self.decode_rows,
            self.decode_out,
            self.decode_back,
            per(self.decode_out, self.decode_rows),
            per(self.decode_back, self.decode_rows),
            self.prefill_tokens,
            self.prefill_out,
            self.prefill_back,
            self.ops_out
        )
    }
}

impl Stage {
    pub fn new(split: Split, group: std::sync::Arc<Group>, hidden: i32, dtype: Dtype, ranges: Vec<std::ops::Range<i32>>) -> Stage {
        Stage { split, group, hidden, dtype, ranges, traffic: Default::default() }
    }

    pub fn split(&self) -> Split {
        self.split
    }

    /// Rank `rank`'s share of the snapshot files (see [`share_name`]).
    pub fn share_name(&self, rank: usize) -> (String, String) {
        share_name(self.split, rank, self.group.size(), &self.ranges[rank])
    }

    /// The link to the other ranks failed: the group is broken for good.
    pub fn lost(&self, e: MlxError) -> MlxError {
        lost_group(self.split, &self.ranges, e)
    }

    fn send_words(&self, words: &[u32]) -> Result<(), MlxError> {
        self.traffic.lock().ops_out += 4 * (1 + words.len() as u64);
        send_message(&self.group, 1, words, None).map_err(|e| self.lost(e))
    }

    /// `h` (`[rows, tokens, hidden]`, through rank 0's layers) through every
    /// other rank's layers, row `i` extending `tails[i]` (the remote entry
    /// of its cache): the last rank's hidden states, of the last position
    /// only when `last_only`.
    pub fn forward(&self, h: Array, tails: &mut [&mut LayerKv], last_only: bool) -> Result<Array, MlxError> {
        if broken() {
            return Err(mlx_err(why_broken()));
        }
        let s = h.shape().to_vec();
        let (rows, tokens) = (s[0], s[1]);
        let ids: Vec<u32> = tails.iter().map(|t| t.remote_id().ok_or_else(|| mlx_err("a cache without the other ranks' entry reached the pipeline".into()))).collect::<Result<_, _>>()?;
        // The receivers read the activation dtype's bytes.
        let h = if h.dtype() == self.dtype { h } else { h.as_dtype(self.dtype)? };
        let mut words = remote::take_queued();
        words.extend([FORWARD, rows as u32, tokens as u32, u32::from(last_only)]);
        words.extend(ids);
        enter_step();
        send_message(&self.group, 1, &words, Some(&h)).map_err(|e| self.lost(e))?;
        let back = self.group.recv(&[rows, if last_only { 1 } else { tokens }, self.hidden], self.dtype, self.group.size() - 1).map_err(|e| self.lost(e))?;
        back.eval().map_err(|e| self.lost(e.into()))?;
        IN_STEP.store(false, Ordering::SeqCst);
        for t in tails.iter_mut() {
            t.advance_remote(tokens);
        }
        let (out, got) = (4 * (1 + words.len() as u64) + h.nbytes() as u64, back.nbytes() as u64);
        let mut t = self.traffic.lock();
        if tokens == 1 {
            t.decode_rows += rows as u64;
            t.decode_out += out;
            t.decode_back += got;
        } else {
            t.prefill_tokens += (rows * tokens) as u64;
            t.prefill_out += out;
            t.prefill_back += got;
        }
        Ok(back)
    }

    /// Split by heads: tell the other ranks to compute `tokens` (`rows` rows
    /// of `len` each, row `i` extending `tails[i]`) alongside this one. The
    /// all_sums in the layers then join every rank's share.
    pub fn announce(&self, tokens: &[u32], rows: i32, len: i32, tails: &mut [&mut LayerKv], last_only: bool) -> Result<(), MlxError> {
        if broken() {
            return Err(mlx_err(why_broken()));
        }
        let ids: Vec<u32> = tails.iter().map(|t| t.remote_id().ok_or_else(|| mlx_err("a cache without the other ranks' entry reached the group".into()))).collect::<Result<_, _>>()?;
        let mut words = remote::take_queued();
        words.extend([FORWARD_TOKENS, rows as u32, len as u32, u32::from(last_only)]);
        words.extend(ids);
        words.extend_from_slice(tokens);
        enter_step();
        send_message(&self.group, 1, &words, None).map_err(|e| self.lost(e))?;
        for t in tails.iter_mut() {
            t.advance_remote(len);
        }
        let out = 4 * (1 + words.len() as u64);
        let mut t = self.traffic.lock();
        if len == 1 {
            t.decode_rows += rows as u64;
            t.decode_out += out;
        } else {
            t.prefill_tokens += (rows * len) as u64;
            t.prefill_out += out;
        }
        Ok(())
    }

    /// Split by heads: rank 0's share of the step announced is computed
    /// (the other ranks' all_sums met).
    pub fn step_done(&self) {
        IN_STEP.store(false, Ordering::SeqCst);
    }

    /// Send the cache operations queued since the last step (snapshots
    /// dropped while idle free their shares on the other ranks now).
    pub fn flush(&self) -> Result<(), MlxError> {
        if broken() || !remote::has_queued() {
            return Ok(());
        }
        self.send_words(&remote::take_queued())
    }

    /// Tell the other ranks to exit (rank 0 is shutting down).
    pub fn stop(&self) -> Result<(), MlxError> {
        if broken() {
            return Ok(());
        }
        // Said on stderr whatever the log level: what crossed the links.
        eprintln!("kvserve: pipeline traffic with rank 1 and rank {}: {}", self.group.size() - 1, *self.traffic.lock());
        if self.split == Split::Heads {
            eprintln!("kvserve: all_sum of partial sums: {} bytes from this rank", crate::model::layers::ALL_SUM_BYTES.load(Ordering::Relaxed));
        }
        let mut words = remote::take_queued();
        words.push(STOP);
        self.send_words(&words)
    }
}

/// Rank 0 lost its link to the other ranks (`ranges`: the layers each
/// holds): the group is broken for good.
fn lost_group(split: Split, ranges: &[std::ops::Range<i32>], e: MlxError) -> MlxError {
    let e = link_error(&e.message);
    let n = ranges.len();
    let others = match split {
        Split::Layers => {
            let later: Vec<String> = (1..n).map(|r| format!("rank {r} (layers {}..{})", ranges[r].start, ranges[r].end)).collect();
            format!("the model's later layers are on other ranks ({})", later.join(", "))
        }
        Split::Heads => format!("the model's other heads are on ranks 1 to {}", n - 1),
    };
    let why = format!(
        "{others}, and a step with them failed: {e}; no step can be computed without them, so every rank exits (status {EXIT_RANK_LOST}) for a supervisor to restart the group"
    );
    set_broken(why.clone());
    IN_STEP.store(false, Ordering::SeqCst);
    mlx_err(why)
}

/// What a rank answers to [`remote::LOAD`].
mod share {
    pub const READ: i32 = 0;
    pub const MISSING: i32 = 1;
    pub const UNREADABLE: i32 = 2;
    pub const NO_FOLDER: i32 = 3;
}

/// Rank 0 of a pipeline with snapshot files: send `words` (ending in
/// [`remote::LOAD`]) and gather every rank's answer; an error names the
/// ranks that could not read their share.
fn load_shares(group: &Group, split: Split, ranges: &[std::ops::Range<i32>], traffic: &Mutex<Traffic>, words: Vec<u32>) -> Result<(), String> {
    if broken() {
        return Err(why_broken());
    }
    let lost = |e: MlxError| lost_group(split, ranges, e).message;
    enter_step();
    traffic.lock().ops_out += 4 * (1 + words.len() as u64);
    send_message(group, 1, &words, None).map_err(lost)?;
    let all = group.all_gather(&Array::from_slice(&[share::READ], &[1])).map_err(lost)?;
    all.eval().map_err(|e| lost(e.into()))?;
    IN_STEP.store(false, Ordering::SeqCst);
    let failed: Vec<String> = all
        .as_slice::<i32>()
        .iter()
        .enumerate()
        .filter(|(_, s)| **s != share::READ)
        .map(|(r, s)| match *s {
            share::MISSING => format!("rank {r} has no share of it (deleted, or never written there)"),
            share::UNREADABLE => format!("rank {r} could not read its share (its log says why)"),
            _ => format!("rank {r} keeps no snapshot files (its folder could not be opened)"),
        })
        .collect();
    match failed.is_empty() {
        true => Ok(()),
        false => Err(failed.join("; ")),
    }
}

/// Where rank `rank` of `n` keeps its share of the snapshot files
/// (`--cache-dir`): the subfolder `rank-R-of-N` of the model's folder, and
/// what its fingerprint adds to the model's: the split and the layers held.
/// So a split model's files never mix with one process's, nor with
/// another split's.
pub fn share_name(split: Split, rank: usize, n: usize, range: &std::ops::Range<i32>) -> (String, String) {
    (format!("rank-{rank}-of-{n}"), format!("; split by {}, rank {rank} of {n}, layers {}..{}", split.name(), range.start, range.end))
}

/// A rank but 0's store for its shares of the snapshots (`--cache-dir`,
/// see [`share_name`]), bounded like rank 0's, on its own.
pub fn share_store(
    root: &std::path::Path,
    disk: &crate::engine::worker::CacheDisk,
    m: &crate::model::source::LoadedModel,
    rank: usize,
    n: usize,
    split: Split,
    range: &std::ops::Range<i32>,
) -> Option<crate::cache::store::Store> {
    let share = share_name(split, rank, n, range);
    let (dir, fp) = crate::engine::policy::snapshot_folder(root, disk, &m.path, m.tokenizer.chat_template.as_deref(), Some(&share));
    match crate::cache::store::Store::open(&dir, fp) {
        Ok(store) => {
            if let (true, Some(folder)) = (disk.per_model, dir.parent()) {
                crate::cache::disk::write_model_file(folder, &m.path, &store.fingerprint);
            }
            if let Some(b) = disk.bound_bytes.or_else(|| disk.per_model.then(|| crate::cache::disk::default_budget(root))) {
                store.bound_disk(&dir, b);
            }
            eprintln!("rank {rank} of {n}: snapshot shares in {}", dir.display());
            Some(store)
        }
        Err(e) => {
            tracing::warn!("rank {rank}: snapshot shares kept in memory only: {e}");
            eprintln!("kvserve: rank {rank}: snapshot shares kept in memory only: {e}");
            None
        }
    }
}

/// MLX's own words for a failed link (`[ring] connection to a peer was
/// lost`), without the locations its error text carries.
pub fn link_error(message: &str) -> String {
    match message.find("[ring]") {
        Some(i) => {
            let rest = &message[i..];
            let end = [rest.find('"'), rest.find(" at /")].into_iter().flatten().min().unwrap_or(rest.len());
            rest[..end].trim().to_string()
        }
        None => message.to_string(),
    }
}

/// One message to `dst`: the length, the words, then `h` if any.
fn send_message(group: &Group, dst: usize, words: &[u32], h: Option<&Array>) -> Result<(), MlxError> {
    let len = Array::from_slice(&[words.len() as i32], &[1]);
    group.send(&len, dst)?.eval()?;
    group.send(&Array::from_slice(words, &[words.len() as i32]), dst)?.eval()?;
    if let Some(h) = h {
        group.send(h, dst)?.eval()?;
    }
    Ok(())
}

/// How `spec` (an MLX model folder) is split over `ranks` ranks: `asked`
/// (by heads only for a dense model whose attention and key-value heads
/// divide by `ranks`), else by layers. Also its layer count.
pub fn plan(spec: &str, ranks: usize, asked: Option<Split>) -> Result<(i32, Split), String> {
    let path = crate::model::source::resolve(spec).map_err(|e| e.to_string())?;
    if ranks < 2 {
        return Err("the hostfile lists one rank: serve the model without --hostfile".into());
    }
    if path.is_file() {
        // A GGUF file: each rank reads only its layers' tensors.
        if asked == Some(Split::Heads) {
            return Err("--split tensor: a GGUF file is split by layers only (--split pipeline): split by heads, every rank would convert the whole file".into());
        }
        let (_, shape) = crate::model::gguf_types::check_header(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if (shape.layers as usize) < ranks {
            return Err(format!("{} layers cannot be split over {ranks} ranks", shape.layers));
        }
        return Ok((shape.layers, Split::Layers));
    }
    let c = crate::model::load_config(&path).map_err(|e| e.to_string())?;
    let n = ranks as i32;
    let divides = c.num_heads % n == 0 && c.num_kv_heads % n == 0;
    let plain = matches!(c.model_type.as_str(), "llama" | "qwen2" | "qwen3" | "qwen3_moe" | "glm4_moe" | "gpt_oss") && !c.attn_output_gate;
    let split = match asked {
        Some(Split::Heads) if !divides => {
            return Err(format!("--split tensor: {} attention heads and {} key-value heads do not divide over {ranks} ranks; use --split pipeline", c.num_heads, c.num_kv_heads))
        }
        Some(Split::Heads) if !plain => return Err(format!("--split tensor: {} models are split by layers only (use --split pipeline)", c.model_type)),
        Some(s) => s,
        // By layers fits every architecture and sends one hidden state per
        // token per link; by heads sends two all_sums per layer, and on this
        // loopback was 8x slower per step (benches/pipeline_steps.py).
        None => Split::Layers,
    };
    if split == Split::Layers && (c.num_layers as usize) < ranks {
        return Err(format!("{} layers cannot be split over {ranks} ranks", c.num_layers));
    }
    Ok((c.num_layers, split))
}

/// Load rank `rank`'s share of `spec` split `split` over the group's ranks:
/// the model and the layers it holds.
pub fn load_share(spec: &str, group: &std::sync::Arc<Group>, layers: i32, split: Split) -> Result<(crate::model::source::LoadedModel, std::ops::Range<i32>), String> {
    let (rank, n) = (group.rank(), group.size());
    match split {
        Split::Layers => {
            let range = crate::ring::pipeline_range(layers, rank, n);
            let m = crate::model::source::load_layers(spec, Some(range.clone())).map_err(|e| format!("rank {rank}: {e}"))?;
            Ok((m, range))
        }
        Split::Heads => {
            let shard = crate::model::layers::Shard { rank: rank as i32, ranks: n as i32, group: group.clone() };
            let m = crate::model::source::load_shard(spec, shard).map_err(|e| format!("rank {rank}: {e}"))?;
            Ok((m, 0..layers))
        }
    }
}

/// Rank 0's part of a group the ranks joined (`group`): load its share of
/// `spec` of `total` layers split `split` (as [`plan`] settled before the
/// ranks joined), check every rank loaded the same
/// model the same way, and lead the others: every cache made from now on
/// ends with the other ranks' entry.
pub fn lead(spec: &str, group: std::sync::Arc<Group>, (total, split): (i32, Split), persist: bool) -> Result<crate::model::source::LoadedModel, String> {
    let n = group.size();
    let (mut m, range) = load_share(spec, &group, total, split)?;
    let ranges = handshake(&group, &m.model, split, &range, persist)?;
    let c = &m.model.config;
    // f16 keys and values the other ranks hold per token (linear layers hold less).
    let kv_token = 2 * c.num_kv_heads as usize * c.head_dim as usize * 2;
    let far = match split {
        Split::Layers => (total - range.end) as usize * kv_token,
        Split::Heads => (n - 1) * total as usize * kv_token,
    };
    match split {
        Split::Layers => tracing::info!(
            "rank 0 of {n} (split by layers): layers {}..{} of {total} here; {}",
            range.start,
            range.end,
            (1..n).map(|r| format!("rank {r}: {}..{}", ranges[r].start, ranges[r].end)).collect::<Vec<_>>().join(", ")
        ),
        Split::Heads => tracing::info!("rank 0 of {n} (split by heads): {} of {} attention heads of every layer here", c.num_heads, c.num_heads * n as i32),
    }
    remote::enable(far);
    let (hidden, dtype) = (c.hidden_size, m.model.activation_dtype());
    let stage = Stage::new(split, group.clone(), hidden, dtype, ranges.clone());
    if persist {
        // Snapshot files: the other ranks read their shares when rank 0 reads its file.
        let traffic = stage.traffic.clone();
        remote::set_loader(Box::new(move |words| load_shares(&group, split, &ranges, &traffic, words)));
    }
    m.model.set_stage(stage);
    Ok(m)
}

/// Check that every rank loaded the same model and that their layer ranges
/// follow each other from 0 to the last layer; every rank gets the same
/// answer (an all_gather of each rank's numbers). `persist`: this rank
/// keeps snapshot files (`--cache-dir`); all must, or none.
pub fn handshake(group: &Group, model: &Transformer, split: Split, range: &std::ops::Range<i32>, persist: bool) -> Result<Vec<std::ops::Range<i32>>, String> {
    let c = &model.config;
    let code = match split {
        Split::Layers => 0,
        Split::Heads => 1,
    };
    const ROW: usize = 7;
    let mine = [c.num_layers, c.hidden_size, c.vocab_size, range.start, range.end, code, i32::from(persist)];
    let gone = |e: MlxError| {
        format!("rank {}: another rank left before every rank had loaded its layers (its own log says why): {}", group.rank(), link_error(&e.message))
    };
    let all = group.all_gather(&Array::from_slice(&mine, &[1, ROW as i32])).map_err(gone)?;
    all.eval().map_err(|e| gone(e.into()))?;
    let v: Vec<i32> = all.as_slice::<i32>().to_vec();
    let n = group.size();
    let mut ranges = vec![];
    for r in 0..n {
        let row = &v[r * ROW..(r + 1) * ROW];
        if row[5] != code {
            return Err(format!("rank {r} splits the model {}, rank {} {}: start every rank with the same --split", if row[5] == 1 { "by heads" } else { "by layers" }, group.rank(), if code == 1 { "by heads" } else { "by layers" }));
        }
        if row[6] != mine[6] {
            let says = |p: i32| if p == 1 { "keeps snapshot files (--cache-dir)" } else { "keeps snapshots in memory only (no --cache-dir, or its folder could not be opened: its log says why)" };
            return Err(format!("rank {r} {}, rank {} {}: start every rank with --cache-dir, or none", says(row[6]), group.rank(), says(mine[6])));
        }
        if row[..3] != mine[..3] {
            return Err(format!(
                "rank {r} loaded a model with {} layers, hidden size {} and {} tokens; rank {} has {}, {} and {}: every rank must serve the same model",
                row[0], row[1], row[2], group.rank(), mine[0], mine[1], mine[2]
            ));
        }
        let want = if r == 0 || split == Split::Heads { 0 } else { ranges.last().map_or(0, |p: &std::ops::Range<i32>| p.end) };
        if row[3] != want {
            return Err(format!("rank {r} holds layers {}..{}, but the previous rank's end at {want}", row[3], row[4]));
        }
        ranges.push(row[3]..row[4]);
    }
    if split == Split::Heads {
        return Ok(ranges);
    }
    if ranges.last().map(|r| r.end) != Some(c.num_layers) {
        return Err(format!("the ranks hold layers up to {:?}, not all {}", ranges.last().map(|r| r.end), c.num_layers));
    }
    Ok(ranges)
}

/// `h` (one row per id) through this rank's layers, row `i` extending the
/// state `ids[i]` holds (a fresh one for an id not seen yet).
fn run_states(model: &Transformer, states: &mut HashMap<u32, Vec<LayerKv>>, ids: &[u32], h: Array) -> Result<Array, MlxError> {
    for id in ids {
        states.entry(*id).or_insert_with(|| new_cache(model.num_layers()));
    }
    if let [id] = ids {
        return model.run_blocks(h, states.get_mut(id).expect("inserted above"));
    }
    let mut taken: Vec<(u32, Vec<LayerKv>)> = ids.iter().map(|id| (*id, states.remove(id).expect("inserted above"))).collect();
    let r = {
        let mut caches: Vec<&mut [LayerKv]> = taken.iter_mut().map(|(_, c)| c.as_mut_slice()).collect();
        model.run_rows(h, &mut caches)
    };
    states.extend(taken);
    r
}

/// What a follower did, for its log.
#[derive(Debug, Default)]
pub struct Followed {
    pub steps: u64,
    pub tokens: u64,
    /// Snapshots kept quantized here (rank 0's `--kv-bits`).
    pub packed: u64,
    /// Time spent waiting for rank 0's next message, and from its arrival
    /// to this rank's part of it done (the step's layers, passing it on).
    pub waiting: std::time::Duration,
    pub working: std::time::Duration,
}

/// A follower's loop (every rank but 0): apply rank 0's cache operations
/// to this rank's share, run its layers on the hidden states the previous
/// rank sends, pass them on, until [`STOP`]. An error is a lost link (or a
/// protocol out of step): the caller exits with [`EXIT_RANK_LOST`].
/// With `shares` (`--cache-dir`), this rank writes, reads and deletes its
/// share of every snapshot file when rank 0 does.
pub fn follow(group: &Group, model: &Transformer, shares: Option<&crate::cache::store::Store>) -> Result<Followed, String> {
    let (rank, n) = (group.rank(), group.size());
    let hidden = model.config.hidden_size;
    let dtype = model.activation_dtype();
    let layers = model.num_layers();
    let mut states: HashMap<u32, Vec<LayerKv>> = HashMap::new();
    // Snapshots kept quantized (rank 0's --kv-bits): each layer packed, or
    // as it was where it cannot be (empty, a recurrent state, a head
    // dimension MLX does not quantize).
    let mut packed: HashMap<u32, Vec<Result<PackedKv, LayerKv>>> = HashMap::new();
    let mut done = Followed::default();
    let lost_to = |peer: usize| move |e: MlxError| format!("rank {rank} of {n} lost its link to rank {peer}: {}", link_error(&e.message));
    let lost = lost_to(rank - 1);
    loop {
        let t0 = std::time::Instant::now();
        let len = group.recv(&[1], Dtype::Int32, rank - 1).map_err(lost)?;
        len.eval().map_err(|e| lost(e.into()))?;
        let t1 = std::time::Instant::now();
        done.waiting += t1 - t0;
        let len = len.as_slice::<i32>()[0];
        let words = group.recv(&[len], Dtype::Uint32, rank - 1).map_err(lost)?;
        words.eval().map_err(|e| lost(e.into()))?;
        let words: Vec<u32> = words.as_slice::<u32>().to_vec();
        let mut i = 0;
        let mut passed_on = false;
        let arg = |i: usize| words.get(i).copied().ok_or_else(|| format!("rank {rank}: a message from rank 0 ended early (protocol out of step)"));
        while i < words.len() {
            match words[i] {
                remote::CLONE | remote::COMPACT => {
                    let (from, to) = (arg(i + 1)?, arg(i + 2)?);
                    let copy = match states.get(&from) {
                        Some(s) if words[i] == remote::COMPACT => s.iter().map(LayerKv::compact).collect(),
                        Some(s) => s.clone(),
                        None => new_cache(layers),
                    };
                    states.insert(to, copy);
                    i += 3;
                }
                remote::TRIM => {
                    let (id, len) = (arg(i + 1)?, arg(i + 2)?);
                    if let Some(s) = states.get_mut(&id) {
                        for l in s.iter_mut() {
                            // Rank 0's own layers refuse the same trim first.
                            let _ = l.trim_to(len as i32);
                        }
                    }
                    i += 3;
                }
                remote::FREE => {
                    let id = arg(i + 1)?;
                    states.remove(&id);
                    packed.remove(&id);
                    i += 2;
                }
                remote::PACK => {
                    let (from, to, bits) = (arg(i + 1)?, arg(i + 2)?, arg(i + 3)? as i32);
                    let fail = |e: MlxError| format!("rank {rank}: {e}");
                    if let Some(s) = states.get(&from) {
                        let kept: Vec<Result<PackedKv, LayerKv>> = s.iter().map(|l| Ok(PackedKv::pack(l, bits)?.ok_or_else(|| l.snapshot()))).collect::<Result<_, MlxError>>().map_err(fail)?;
                        mlx_rs::transforms::eval(kept.iter().flatten().flat_map(PackedKv::arrays)).map_err(|e| fail(e.into()))?;
                        packed.insert(to, kept);
                        done.packed += 1;
                    }
                    i += 4;
                }
                remote::UNPACK => {
                    let (from, to) = (arg(i + 1)?, arg(i + 2)?);
                    let state = match packed.get(&from) {
                        Some(p) => p.iter().map(|l| l.as_ref().map_or_else(|l| Ok(l.snapshot()), PackedKv::unpack)).collect::<Result<Vec<_>, _>>().map_err(|e| format!("rank {rank}: {e}"))?,
                        None => new_cache(layers),
                    };
                    states.insert(to, state);
                    i += 3;
                }
                remote::RESERVE => {
                    let (id, tokens) = (arg(i + 1)?, arg(i + 2)?);
                    let s = states.entry(id).or_insert_with(|| new_cache(layers));
                    model.reserve(s, tokens as i32).map_err(|e| format!("rank {rank}: {e}"))?;
                    i += 3;
                }
                remote::SAVE => {
                    let (id, len) = (arg(i + 1)?, arg(i + 2)? as usize);
                    let tokens = words.get(i + 3..i + 3 + len).ok_or_else(|| format!("rank {rank}: a message from rank 0 ended early (protocol out of step)"))?;
                    if let Some(store) = shares {
                        match states.get(&id) {
                            Some(s) => {
                                if let Err(e) = store.save(tokens, s) {
                                    tracing::warn!("rank {rank}: share of a snapshot not written: {e}");
                                }
                            }
                            None => tracing::warn!("rank {rank}: rank 0 saved a snapshot this rank holds no share of"),
                        }
                    }
                    i += 3 + len;
                }
                remote::UNLINK => {
                    let key = [arg(i + 1)?, arg(i + 2)?, arg(i + 3)?];
                    if let Some(store) = shares {
                        // A write of it still queued would bring it back.
                        store.flush();
                        let _ = std::fs::remove_file(store.path_for_key(key));
                    }
                    i += 4;
                }
                remote::LOAD => {
                    let (id, tokens) = (arg(i + 1)?, arg(i + 2)? as usize);
                    let key = [arg(i + 3)?, arg(i + 4)?, arg(i + 5)?];
                    // Passed on first: every rank reads at once, then all answer.
                    if rank + 1 < n {
                        send_message(group, rank + 1, &words, None).map_err(lost_to(rank + 1))?;
                    }
                    let status = match shares {
                        None => share::NO_FOLDER,
                        Some(store) => {
                            // Shares still queued for writing are on disk first.
                            store.flush();
                            let path = store.path_for_key(key);
                            match crate::cache::store::load(&path, layers, tokens, &store.fingerprint) {
                                Ok(l) => {
                                    crate::cache::disk::touch(&path);
                                    states.insert(id, l);
                                    share::READ
                                }
                                Err(_) if !path.exists() => share::MISSING,
                                Err(e) => {
                                    tracing::warn!("rank {rank}: {e}");
                                    eprintln!("kvserve: rank {rank}: cannot read a share of a snapshot: {e}");
                                    share::UNREADABLE
                                }
                            }
                        }
                    };
                    let gone = |e: MlxError| format!("rank {rank} of {n} lost its link to the group: {}", link_error(&e.message));
                    let all = group.all_gather(&Array::from_slice(&[status], &[1])).map_err(gone)?;
                    all.eval().map_err(|e| gone(e.into()))?;
                    passed_on = true;
                    i = words.len();
                }
                FORWARD => {
                    let (rows, tokens, last_only) = (arg(i + 1)? as i32, arg(i + 2)? as i32, arg(i + 3)? == 1);
                    let ids: Vec<u32> = (0..rows as usize).map(|r| arg(i + 4 + r)).collect::<Result<_, _>>()?;
                    let h = group.recv(&[rows, tokens, hidden], dtype, rank - 1).map_err(lost)?;
                    let h = run_states(model, &mut states, &ids, h).map_err(|e| format!("rank {rank}: {e}"))?;
                    let h = if h.dtype() == dtype { h } else { h.as_dtype(dtype).map_err(|e| format!("rank {rank}: {e}"))? };
                    if rank + 1 < n {
                        send_message(group, rank + 1, &words, Some(&h)).map_err(lost_to(rank + 1))?;
                    } else {
                        // The head needs only the last position's state then.
                        let h = if last_only && tokens > 1 { h.index((.., (tokens - 1)..tokens, ..)) } else { h };
                        group.send(&h, 0).and_then(|s| Ok(s.eval()?)).map_err(lost_to(0))?;
                    }
                    done.steps += 1;
                    done.tokens += (rows * tokens) as u64;
                    passed_on = true;
                    // A step is always a message's last words.
                    i = words.len();
                }
                FORWARD_TOKENS => {
                    let (rows, tokens, _last_only) = (arg(i + 1)? as i32, arg(i + 2)? as i32, arg(i + 3)? == 1);
                    let ids: Vec<u32> = (0..rows as usize).map(|r| arg(i + 4 + r)).collect::<Result<_, _>>()?;
                    let start = i + 4 + rows as usize;
                    let toks = words.get(start..start + (rows * tokens) as usize).ok_or_else(|| format!("rank {rank}: a step from rank 0 ended early (protocol out of step)"))?.to_vec();
                    // Passed on first: every rank computes at once, the all_sums joining them.
                    if rank + 1 < n {
                        send_message(group, rank + 1, &words, None).map_err(lost_to(rank + 1))?;
                    }
                    let step = |states: &mut HashMap<u32, Vec<LayerKv>>| -> Result<(), MlxError> {
                        let h = model.embed_tokens(&Array::from_slice(&toks, &[rows, tokens]))?;
                        Ok(run_states(model, states, &ids, h)?.eval()?)
                    };
                    step(&mut states).map_err(|e| format!("rank {rank} of {n} lost its link to the group: {}", link_error(&e.message)))?;
                    done.steps += 1;
                    done.tokens += (rows * tokens) as u64;
                    passed_on = true;
                    i = words.len();
                }
                STOP => {
                    if rank + 1 < n {
                        send_message(group, rank + 1, &words, None).map_err(lost_to(rank + 1))?;
                    }
                    if let Some(store) = shares {
                        store.flush();
                    }
                    return Ok(done);
                }
                other => return Err(format!("rank {rank}: unknown word {other} from rank 0 (protocol out of step)")),
            }
        }
        // Operations only (no step): passed on too.
        if rank + 1 < n && !passed_on {
            send_message(group, rank + 1, &words, None).map_err(lost_to(rank + 1))?;
        }
        done.working += t1.elapsed();
    }
}
