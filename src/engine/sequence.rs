//! One running request: its tokens, its own KV state, and everything that
//! turns its chosen tokens into events (detokenizer, stop strings, sampler
//! and its RNG, first-token time). The scheduler moves it from prefill to
//! decode and finally to a snapshot.

use std::time::Instant;

use super::generate::GenerateOptions;
use super::policy::Held;
use super::sampler::{argmax, fresh_seed, sample, Rng};
use super::types::{Done, Event, FinishReason, Job, PromptUsage};
use crate::cache::kv::LayerKv;
use crate::text::detok::StreamDetokenizer;
use crate::text::stop::StopScanner;
use crate::text::tokenizer::Tokenizer;

pub(super) struct Sequence {
    /// Order of arrival (ties in the scheduler's choices go to the oldest).
    pub id: u64,
    pub job: Job,
    /// When the request reached the engine (time to first token counts from
    /// here, time waiting for a free place included).
    pub start: Instant,
    /// When it last got a prefill chunk (or started).
    pub last_chunk: Instant,
    /// The KV state: `pos()` tokens of `prompt`, then of the answer.
    pub live: Vec<LayerKv>,
    /// Prompt tokens served from the cache.
    pub read: usize,
    pub usage: PromptUsage,
    /// Cache state this request holds until it ends.
    pub held: Held,
    /// Prompt, then each generated token.
    history: Vec<u32>,
    /// The token the next decode step feeds (the prompt's last, then each one chosen).
    next: u32,
    detok: StreamDetokenizer,
    stops: StopScanner,
    rng: Rng,
    /// Seconds from `start` to the end of the prompt (the first decode step).
    prefill_secs: Option<f64>,
    decode_start: Option<Instant>,
    first_text: Option<f64>,
    /// Set when it has ended; the scheduler then keeps its snapshot and says `Done`.
    pub finish: Option<FinishReason>,
    end_token: Option<u32>,
    /// Set when a step failed for it (it ends with this error).
    pub failed: Option<String>,
    /// A waiting request shares the prompt up to here: the prefill stops
    /// there once, so the shared part can be kept as a snapshot.
    pub share_at: Option<usize>,
    /// Test hook: panic at the first text.
    pub panic_at_text: bool,
}

impl Sequence {
    pub fn new(id: u64, job: Job, start: Instant, live: Vec<LayerKv>, read: usize, usage: PromptUsage, held: Held) -> Self {
        let opts: &GenerateOptions = &job.opts;
        let stops = StopScanner::new(&opts.stop);
        let rng = Rng::new(opts.sampling.seed.unwrap_or_else(fresh_seed));
        let history = job.prompt.clone();
        let next = *history.last().expect("prompts are never empty");
        Sequence {
            id,
            job,
            start,
            last_chunk: Instant::now(),
            live,
            read,
            usage,
            held,
            history,
            next,
            detok: StreamDetokenizer::new(),
            stops,
            rng,
            prefill_secs: None,
            decode_start: None,
            first_text: None,
            finish: None,
            end_token: None,
            failed: None,
            share_at: None,
            panic_at_text: false,
        }
    }

    pub fn prompt(&self) -> &[u32] {
        &self.job.prompt
    }

    /// Tokens the KV state holds.
    pub fn pos(&self) -> usize {
        self.live.first().map_or(0, |l| l.offset() as usize)
    }

    /// Prompt tokens still to prefill before decoding starts (all but the
    /// last, which the first decode step computes).
    pub fn to_prefill(&self) -> usize {
        (self.prompt().len() - 1).saturating_sub(self.pos())
    }

    pub fn decoding(&self) -> bool {
        self.finish.is_none() && self.failed.is_none() && self.to_prefill() == 0
    }

    /// The client is gone (its event channel closed).
    pub fn departed(&self) -> bool {
        self.job.events.is_closed()
    }

    /// The token the next decode step feeds; marks the start of decoding.
    pub fn next_input(&mut self) -> u32 {
        if self.decode_start.is_none() {
            self.prefill_secs = Some(self.start.elapsed().as_secs_f64());
            self.decode_start = Some(Instant::now());
        }
        self.next
    }

    fn generated(&self) -> usize {
        self.history.len() - self.prompt().len()
    }

    /// Choose the next token from this row's logits (`vocab` f32 values,
    /// overwritten by sampling) and act on it: end of sequence, text sent,
    /// a stop string, the token limit, or a client gone.
    pub fn accept(&mut self, logits: &mut [f32], tok: &Tokenizer) -> Result<(), String> {
        let opts = &self.job.opts;
        let id = if opts.sampling.is_greedy() { argmax(logits) } else { sample(logits, &self.history, &opts.sampling, &mut self.rng) };
        if opts.eos_ids.contains(&id) {
            self.end(FinishReason::Eos, tok)?;
            self.end_token = Some(id);
            return Ok(());
        }
        self.history.push(id);
        let piece = self.detok.push(tok, id).map_err(|e| e.to_string())?;
        let (text, hit) = self.stops.push(&piece);
        if !text.is_empty() && !self.send_text(text) {
            self.finish = Some(FinishReason::Cancelled);
            return Ok(());
        }
        if hit {
            self.finish = Some(FinishReason::StopString);
        } else if self.generated() >= self.job.opts.max_tokens {
            self.end(FinishReason::Length, tok)?;
        } else {
            self.next = id;
        }
        Ok(())
    }

    fn send_text(&mut self, text: String) -> bool {
        if std::mem::take(&mut self.panic_at_text) {
            panic!("injected fault: a test asked this job to panic");
        }
        self.first_text.get_or_insert_with(|| self.start.elapsed().as_secs_f64());
        self.job.events.send(Event::Text(text)).is_ok()
    }

    /// End on the token limit or an end token: what the detokenizer and the
    /// stop scanner still hold goes out (a stop string may complete in it).
    fn end(&mut self, why: FinishReason, tok: &Tokenizer) -> Result<(), String> {
        let (rest, hit) = self.stops.push(&self.detok.finish(tok).map_err(|e| e.to_string())?);
        let tail = if hit { rest } else { rest + &self.stops.flush() };
        self.finish = Some(if hit { FinishReason::StopString } else { why });
        if !tail.is_empty() {
            self.send_text(tail);
        }
        Ok(())
    }

    /// Every token the KV state holds, in order (prompt, answer, end token).
    pub fn held_tokens(&self) -> Vec<u32> {
        let mut all = self.history.clone();
        all.extend(self.end_token);
        all.truncate(self.pos());
        all
    }

    /// The `Done` event, with the prompt's usage as it turned out (`stored`:
    /// its snapshot was kept).
    pub fn done(&self, stored: bool) -> Done {
        let n = self.usage.prompt;
        let mut usage = self.usage;
        usage.cache_creation = if stored { n - self.read } else { 0 };
        usage.input = n - self.read - usage.cache_creation;
        let prompt_secs = self.prefill_secs.unwrap_or_else(|| self.start.elapsed().as_secs_f64());
        let generation_secs = self.decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
        Done {
            finish: self.finish.unwrap_or(FinishReason::Cancelled),
            usage,
            generated_tokens: self.generated(),
            ttft_secs: self.first_text.unwrap_or(prompt_secs + generation_secs),
            prompt_secs,
            generation_secs,
        }
    }
}
