//! One generation as the HTTP side sees it: the engine's events, with the
//! text split into answer, thinking and tool calls.

use std::collections::VecDeque;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::types::{Done, Event, PromptUsage};
use crate::text::tools::{Piece, ToolStream};

#[derive(Debug, Clone)]
pub enum Out {
    /// The prompt's cache lookup is done (usage as planned).
    Started(PromptUsage),
    Piece(Piece),
    /// The end; `cut` when a tool call was cut off (reported as max_tokens).
    Done { done: Done, cut: bool },
    Error(String),
}

/// A parsed call's arguments (JSON text) in the pieces both APIs stream
/// them in: about 64 bytes each, cut at character boundaries.
pub fn argument_fragments(s: &str) -> Vec<&str> {
    crate::text::char_chunks(s, 64)
}

pub struct Generation {
    events: UnboundedReceiver<Event>,
    tools: ToolStream,
    pending: VecDeque<Out>,
    finished: bool,
}

impl Generation {
    pub fn new(events: UnboundedReceiver<Event>, tools: ToolStream) -> Self {
        Generation { events, tools, pending: VecDeque::new(), finished: false }
    }

    /// The next output event; `None` after the last. Cancel-safe (only the
    /// channel receive awaits).
    pub async fn next(&mut self) -> Option<Out> {
        loop {
            if let Some(o) = self.pending.pop_front() {
                return Some(o);
            }
            if self.finished {
                return None;
            }
            match self.events.recv().await {
                None => {
                    self.finished = true;
                    return Some(Out::Error("the inference engine stopped during the request".into()));
                }
                Some(Event::Started(u)) => return Some(Out::Started(u)),
                Some(Event::Text(t)) => {
                    let pieces = self.tools.push(&t);
                    self.pending.extend(pieces.into_iter().map(Out::Piece));
                }
                Some(Event::Done(done)) => {
                    let (pieces, cut) = self.tools.finish();
                    self.pending.extend(pieces.into_iter().map(Out::Piece));
                    self.pending.push_back(Out::Done { done, cut });
                    self.finished = true;
                }
                Some(Event::Error(e)) => {
                    self.finished = true;
                    return Some(Out::Error(e));
                }
            }
        }
    }

    /// Every event to the end (non-streaming responses).
    pub async fn collect(mut self) -> Vec<Out> {
        let mut v = vec![];
        while let Some(o) = self.next().await {
            v.push(o);
        }
        v
    }
}
