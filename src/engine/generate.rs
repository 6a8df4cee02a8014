//! The generation loop: prefill the prompt in chunks, then decode one token at
//! a time. For greedy decoding the next step's graph is built and queued
//! (async eval) while the current token is read back, as mlx-lm does.

use std::time::Instant;

use mlx_rs::ops::indexing::{argmax_axis, IndexOp};
use mlx_rs::transforms::async_eval;
use mlx_rs::Array;

use super::sampler::{fresh_seed, sample, Rng, SamplingParams};
use crate::cache::kv::LayerKv;
use crate::mlx::{self, MlxError};
use crate::model::Transformer;
use crate::text::detok::StreamDetokenizer;
use crate::text::stop::StopScanner;
use crate::text::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Mlx(#[from] MlxError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

impl From<mlx_rs::error::Exception> for GenerateError {
    #[track_caller]
    fn from(e: mlx_rs::error::Exception) -> Self {
        GenerateError::Mlx(e.into())
    }
}

pub use super::types::FinishReason;

/// The most tokens in one prefill chunk by default.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub eos_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { sampling: SamplingParams::default(), max_tokens: 256, stop: vec![], eos_ids: vec![] }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_secs: f64,
    pub generation_secs: f64,
    pub peak_memory: usize,
    pub finish: FinishReason,
    /// The generated token ids (the end-of-sequence token excluded).
    pub tokens: Vec<u32>,
    /// The end-of-sequence token that stopped generation, if one did.
    pub end_token: Option<u32>,
}

impl GenerationStats {
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }
    pub fn generation_tps(&self) -> f64 {
        self.generated_tokens as f64 / self.generation_secs.max(1e-9)
    }
}

fn ids_array(ids: &[u32]) -> Array {
    Array::from_slice(ids, &[1, ids.len() as i32])
}

/// Run `tokens` through the model in chunks; return the last position's logits `[vocab]`.
pub fn prefill(model: &Transformer, cache: &mut [LayerKv], tokens: &[u32], chunk: usize) -> Result<Array, MlxError> {
    assert!(!tokens.is_empty(), "prefill needs at least one token");
    let chunk = chunk.max(1);
    let mut last = None;
    for part in tokens.chunks(chunk) {
        let logits = model.forward(&ids_array(part), cache, true)?;
        let l = logits.index((0, 0, ..));
        l.eval()?;
        last = Some(l);
    }
    Ok(last.expect("at least one chunk"))
}

/// Generate from `prompt` (token ids), continuing `cache` (which must already
/// hold `prompt[..cache_len]`; pass an empty cache to start fresh). Each piece
/// of final text goes to `on_text`; it returns false to stop (cancel).
pub fn generate(
    model: &Transformer,
    tok: &Tokenizer,
    cache: &mut [LayerKv],
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationStats, GenerateError> {
    mlx::reset_peak_memory()?;
    let start = Instant::now();
    // The last prompt token is always computed: its logits choose the first token.
    let held = cache.first().map_or(0, |c| c.offset() as usize);
    let reuse = held.min(prompt.len().saturating_sub(1));
    if reuse < held {
        for kv in cache.iter_mut() {
            kv.trim_to(reuse as i32)?;
        }
    }
    let logits = prefill(model, cache, &prompt[reuse..], PREFILL_CHUNK)?;
    let prompt_secs = start.elapsed().as_secs_f64();

    let gen_start = Instant::now();
    let mut rng = Rng::new(opts.sampling.seed.unwrap_or_else(fresh_seed));
    // Prompt then generated tokens (the sampler's repetition window reads it).
    let mut history: Vec<u32> = prompt.to_vec();
    let mut detok = StreamDetokenizer::new();
    let mut stops = StopScanner::new(&opts.stop);
    let greedy = opts.sampling.is_greedy();
    let choose = |logits: &Array, history: &[u32], rng: &mut Rng| -> Result<u32, GenerateError> {
        logits.eval()?;
        let mut v = logits.as_type::<f32>()?.as_slice::<f32>().to_vec();
        Ok(sample(&mut v, history, &opts.sampling, rng))
    };
    // Greedy: the chosen token stays an MLX array so the next step can be queued before it is read.
    let mut pending: Option<Array> = None;
    let mut next_id = if greedy {
        let y = argmax_axis(&logits, -1, None)?;
        async_eval([&y])?;
        pending = Some(y);
        0
    } else {
        choose(&logits, &history, &mut rng)?
    };
    let mut finish = FinishReason::Length;
    let mut end_token = None;
    let generated = |history: &Vec<u32>| history.len() - prompt.len();
    while generated(&history) < opts.max_tokens {
        let mut queued = None;
        if let Some(y) = pending.take() {
            if generated(&history) + 1 < opts.max_tokens {
                let l = model.forward(&y.reshape(&[1, 1])?, cache, true)?.index((0, 0, ..));
                let ny = argmax_axis(&l, -1, None)?;
                async_eval([&ny])?;
                queued = Some(ny);
            }
            y.eval()?;
            next_id = y.item_exact::<u32>();
        }
        if opts.eos_ids.contains(&next_id) {
            finish = FinishReason::Eos;
            end_token = Some(next_id);
            break;
        }
        history.push(next_id);
        let piece = detok.push(tok, next_id)?;
        let (text, hit) = stops.push(&piece);
        if !text.is_empty() && !on_text(&text) {
            finish = FinishReason::Cancelled;
            break;
        }
        if hit {
            finish = FinishReason::StopString;
            break;
        }
        if generated(&history) >= opts.max_tokens {
            break;
        }
        if greedy {
            pending = queued;
        } else {
            let l = model.forward(&ids_array(&[next_id]), cache, true)?.index((0, 0, ..));
            next_id = choose(&l, &history, &mut rng)?;
        }
    }
    if matches!(finish, FinishReason::Length | FinishReason::Eos) {
        let (rest, hit) = stops.push(&detok.finish(tok)?);
        let tail = if hit { rest } else { rest + &stops.flush() };
        if !tail.is_empty() {
            on_text(&tail);
        }
        if hit {
            finish = FinishReason::StopString;
        }
    }
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generated(&history),
        prompt_secs,
        generation_secs: gen_start.elapsed().as_secs_f64(),
        peak_memory: mlx::peak_memory()?,
        finish,
        tokens: history.split_off(prompt.len()),
        end_token,
    })
}
