//! The types the HTTP side and the engine share: what the server knows of the
//! model, a queued request, and what the engine tells it back. Both import
//! them from here (neither from the other's files).

use std::path::PathBuf;

use serde_json::Value;
use tokio::sync::mpsc as tmpsc;

use super::generate::GenerateOptions;
use crate::text::template::ChatTemplate;
use crate::text::tokenizer::Tokenizer;

/// What the HTTP side needs to know about the model (thread-safe parts).
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub eos_ids: Vec<u32>,
    /// The model's context length in tokens.
    pub context: usize,
    /// Bytes of KV state per token (all layers), as measured at start-up.
    pub kv_bytes_per_token: usize,
    /// Where prompt-cache snapshots persist (none: memory only).
    pub snapshot_dir: Option<PathBuf>,
    /// The model keeps recurrent state (cannot be trimmed): requests carry
    /// their cache points (see [`Job::cache_points`]).
    pub exact_cache: bool,
}

/// Where a prompt's tokens came from. `cache_read + cache_creation + input == prompt`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptUsage {
    pub prompt: usize,
    /// Served from a snapshot.
    pub cache_read: usize,
    /// Computed and stored in a snapshot for reuse.
    pub cache_creation: usize,
    /// Computed and not stored.
    pub input: usize,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// One of the stop strings; the string itself is not in the output.
    StopString,
    /// max_tokens reached.
    Length,
    /// The consumer asked to stop (client gone).
    Cancelled,
}

/// What the engine tells a request, in order: `Started`, `Text`*, then `Done` or `Error`.
#[derive(Debug)]
pub enum Event {
    /// The cache lookup is done; computing the rest of the prompt begins.
    Started(PromptUsage),
    Text(String),
    Done(Done),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Done {
    pub finish: FinishReason,
    /// The prompt's usage as it turned out (the snapshot stored or not).
    pub usage: PromptUsage,
    pub generated_tokens: usize,
    /// Seconds from the job starting to the first token.
    pub ttft_secs: f64,
    pub prompt_secs: f64,
    pub generation_secs: f64,
}

/// One generation request, already tokenized.
pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub events: tmpsc::UnboundedSender<Event>,
    /// Prompt positions a later request is likely to resume from (the end
    /// of the system prompt and tools, each cache_control breakpoint): for a
    /// model whose state cannot be trimmed, snapshots are kept there.
    pub cache_points: Vec<usize>,
}

/// A tool call in a conversation (an assistant's request, or one generated).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments object (or, if a client sent unparsable text, that string).
    pub arguments: Value,
}
