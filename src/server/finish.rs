//! Why a generation ended, said in each API's words: Anthropic's
//! `stop_reason`, OpenAI's `finish_reason` and the trace line's `finish`.
//! The engine's reason alone does not decide them: tool calls and a call
//! cut off by the token limit change what a client is told.

use crate::engine::types::FinishReason;

/// The end of one generation. The local engine's end and, in proxy mode,
/// an OpenAI-compatible upstream's (mapped by [`Finish::from_openai`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    reason: FinishReason,
    /// Tool calls came before the end.
    calls: bool,
    /// The token limit cut a tool call off (it was not sent).
    cut: bool,
}

impl Finish {
    pub fn new(reason: FinishReason, calls: usize, cut: bool) -> Self {
        Finish { reason, calls: calls > 0, cut }
    }

    /// An upstream's OpenAI `finish_reason`. `calls`: tool calls seen in a
    /// stream, for upstreams that end one with "stop". OpenAI says "stop"
    /// for a stop string too, so anything but "length" and "tool_calls" is
    /// the end of the turn.
    pub fn from_openai(reason: Option<&str>, calls: usize) -> Self {
        match reason {
            Some("length") => Finish::new(FinishReason::Length, calls, false),
            Some("tool_calls") => Finish::new(FinishReason::Eos, calls.max(1), false),
            _ => Finish::new(FinishReason::Eos, calls, false),
        }
    }

    /// Anthropic's `stop_reason`: a stop string is named even after tool
    /// calls (Anthropic has a word for it).
    pub fn anthropic(self) -> &'static str {
        match self.reason {
            _ if self.cut => "max_tokens",
            FinishReason::Length => "max_tokens",
            FinishReason::StopString => "stop_sequence",
            _ if self.calls => "tool_use",
            _ => "end_turn",
        }
    }

    /// OpenAI's `finish_reason`: a stop string is "stop", so tool calls
    /// come first.
    pub fn openai(self) -> &'static str {
        match self.reason {
            _ if self.cut => "length",
            FinishReason::Length => "length",
            _ if self.calls => "tool_calls",
            _ => "stop",
        }
    }

    /// The trace line's word: the engine's own reason, whatever the client
    /// was told.
    pub fn trace(self) -> &'static str {
        match self.reason {
            FinishReason::Eos => "eos",
            FinishReason::StopString => "stop_sequence",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_api_gets_its_word() {
        use FinishReason::*;
        // (reason, calls, cut) -> (anthropic, openai, trace)
        let cases = [
            (Eos, 0, false, "end_turn", "stop", "eos"),
            (Eos, 2, false, "tool_use", "tool_calls", "eos"),
            (Eos, 0, true, "max_tokens", "length", "eos"),
            (StopString, 0, false, "stop_sequence", "stop", "stop_sequence"),
            (StopString, 1, false, "stop_sequence", "tool_calls", "stop_sequence"),
            (Length, 1, false, "max_tokens", "length", "length"),
            (Cancelled, 0, false, "end_turn", "stop", "cancelled"),
            (Cancelled, 1, false, "tool_use", "tool_calls", "cancelled"),
        ];
        for (reason, calls, cut, a, o, t) in cases {
            let f = Finish::new(reason, calls, cut);
            assert_eq!((f.anthropic(), f.openai(), f.trace()), (a, o, t), "{reason:?} calls={calls} cut={cut}");
        }
    }

    #[test]
    fn upstream_reasons_map_to_anthropic_ones() {
        let stop = |r, calls| Finish::from_openai(r, calls).anthropic();
        assert_eq!(stop(Some("length"), 1), "max_tokens");
        assert_eq!(stop(Some("tool_calls"), 0), "tool_use");
        assert_eq!(stop(Some("stop"), 1), "tool_use", "an upstream that ends tool calls with stop");
        assert_eq!(stop(Some("stop"), 0), "end_turn");
        assert_eq!(stop(Some("content_filter"), 0), "end_turn");
        assert_eq!(stop(None, 0), "end_turn");
    }
}
