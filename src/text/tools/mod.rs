//! Tool calls in model output, parsed by the format the chat template
//! implies: Hermes/Qwen JSON (`<tool_call>{...}</tool_call>`), Qwen3-Coder
//! XML (`<tool_call><function=NAME><parameter=P>...`), Llama 3 JSON (the
//! whole answer is `{"name": ..., "parameters": ...}`). Also splits Qwen3
//! `<think>` reasoning from the answer. Streaming: text before a call streams
//! as it comes; output that looks like a call but does not parse is returned
//! as text, never dropped.

pub mod hermes;
pub mod qwen3_coder;

use serde_json::Value;

use crate::engine::types::ToolCall;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Qwen3Coder,
    Llama3,
}

impl ToolFormat {
    /// The format a chat template implies (mlx-lm picks it the same way: by markers).
    pub fn for_template(template: &str) -> Option<ToolFormat> {
        if template.contains("<function=") || template.contains("<parameter=") {
            Some(ToolFormat::Qwen3Coder)
        } else if template.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if template.contains("<|python_tag|>") || template.contains("\"parameters\"") {
            Some(ToolFormat::Llama3)
        } else {
            None
        }
    }
}

/// A parsed piece of output.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Thinking(String),
    Call(ToolCall),
}

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Nothing seen yet (a `<think>` or a Llama 3 call may open the answer).
    Start,
    Text,
    Thinking,
    Call,
    /// Llama 3: the whole answer is a JSON call; held until the end.
    WholeJson,
}

/// Splits streamed model output into text, thinking and tool calls.
pub struct ToolStream {
    format: Option<ToolFormat>,
    tools: Vec<Value>,
    mode: Mode,
    buf: String,
    calls: usize,
    id_prefix: String,
    /// The last piece was a call: whitespace is held, and dropped before another call.
    after_call: bool,
    /// The model may open its answer with `<think>` (its template knows the
    /// tag): leading whitespace is held until the answer shows whether it does.
    may_think: bool,
}

/// The longest suffix of `s` that is a proper prefix of `marker` (bytes).
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl ToolStream {
    /// `format`: how calls look (none: all output is text); `tools`: their
    /// definitions (parameter types guide XML values); `thinking_open`: the
    /// prompt already opened `<think>`; `may_think`: the answer may open with
    /// `<think>` (else leading whitespace streams at once, as any text).
    pub fn new(format: Option<ToolFormat>, tools: &[Value], thinking_open: bool, may_think: bool, id_prefix: &str) -> Self {
        ToolStream {
            format: if tools.is_empty() { None } else { format },
            tools: tools.to_vec(),
            mode: if thinking_open { Mode::Thinking } else { Mode::Start },
            buf: String::new(),
            calls: 0,
            id_prefix: id_prefix.to_string(),
            after_call: false,
            may_think,
        }
    }

    fn parse_call(&mut self, inner: &str) -> Option<ToolCall> {
        let (name, arguments) = match self.format? {
            ToolFormat::Hermes | ToolFormat::Llama3 => hermes::parse(inner)?,
            ToolFormat::Qwen3Coder => qwen3_coder::parse(inner, &self.tools).or_else(|| hermes::parse(inner))?,
        };
        self.calls += 1;
        Some(ToolCall { id: format!("{}_{}", self.id_prefix, self.calls), name, arguments })
    }

    /// Feed generated text; returns what can be released now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = vec![];
        loop {
            match self.mode {
                Mode::Start => {
                    let t = self.buf.trim_start();
                    let llama3 = self.format == Some(ToolFormat::Llama3);
                    // Leading whitespace is held only while `<think>` or a
                    // Llama 3 call could still follow it.
                    if t.is_empty() {
                        if self.may_think || llama3 {
                            return out;
                        }
                        self.mode = Mode::Text;
                        continue;
                    }
                    if self.may_think && t.starts_with(THINK_OPEN) {
                        let skip = self.buf.len() - t.len() + THINK_OPEN.len();
                        self.buf.drain(..skip);
                        self.mode = Mode::Thinking;
                    } else if (self.may_think && THINK_OPEN.starts_with(t)) || (llama3 && PYTHON_TAG.starts_with(t)) {
                        return out;
                    } else if llama3 && (t.starts_with('{') || t.starts_with(PYTHON_TAG)) {
                        self.mode = Mode::WholeJson;
                    } else {
                        self.mode = Mode::Text;
                    }
                }
                Mode::Thinking => {
                    if let Some(i) = self.buf.find(THINK_CLOSE) {
                        let thought: String = self.buf.drain(..i + THINK_CLOSE.len()).collect();
                        let thought = &thought[..i];
                        if !thought.is_empty() {
                            out.push(Piece::Thinking(thought.to_string()));
                        }
                        // The answer starts after the blank line that follows.
                        let rest = self.buf.trim_start_matches('\n').len();
                        self.buf.drain(..self.buf.len() - rest);
                        self.mode = Mode::Text;
                    } else {
                        let keep = partial_suffix(&self.buf, THINK_CLOSE);
                        let ready: String = self.buf.drain(..self.buf.len() - keep).collect();
                        if !ready.is_empty() {
                            out.push(Piece::Thinking(ready));
                        }
                        return out;
                    }
                }
                Mode::Text => {
                    let open = match self.format {
                        Some(ToolFormat::Hermes | ToolFormat::Qwen3Coder) => Some(CALL_OPEN),
                        _ => None,
                    };
                    match open.and_then(|m| self.buf.find(m)) {
                        Some(i) => {
                            let before: String = self.buf.drain(..i).collect();
                            if !before.is_empty() && (!self.after_call || !before.trim().is_empty()) {
                                out.push(Piece::Text(before));
                            }
                            self.mode = Mode::Call;
                        }
                        None => {
                            let keep = open.map_or(0, |m| partial_suffix(&self.buf, m));
                            if self.after_call && self.buf[..self.buf.len() - keep].trim().is_empty() {
                                return out;
                            }
                            self.after_call = false;
                            let ready: String = self.buf.drain(..self.buf.len() - keep).collect();
                            if !ready.is_empty() {
                                out.push(Piece::Text(ready));
                            }
                            return out;
                        }
                    }
                }
                Mode::Call => {
                    let Some(i) = self.buf.find(CALL_CLOSE) else { return out };
                    let raw: String = self.buf.drain(..i + CALL_CLOSE.len()).collect();
                    let inner = &raw[CALL_OPEN.len()..i];
                    match self.parse_call(inner) {
                        Some(call) => {
                            out.push(Piece::Call(call));
                            self.after_call = true;
                        }
                        None => {
                            out.push(Piece::Text(raw));
                            self.after_call = false;
                        }
                    }
                    self.mode = Mode::Text;
                }
                Mode::WholeJson => return out,
            }
        }
    }

    /// The end of generation: whatever is held. `.1` is true when a tool
    /// call was still open (cut off): it is returned as text.
    pub fn finish(&mut self) -> (Vec<Piece>, bool) {
        let rest = std::mem::take(&mut self.buf);
        let mut out = vec![];
        let mut cut = false;
        match self.mode {
            Mode::Thinking if !rest.is_empty() => out.push(Piece::Thinking(rest)),
            Mode::Call => {
                cut = true;
                out.push(Piece::Text(rest));
            }
            Mode::WholeJson => {
                let body = rest.trim().trim_start_matches(PYTHON_TAG);
                match self.parse_call(body) {
                    Some(call) => out.push(Piece::Call(call)),
                    None => {
                        cut = serde_json::from_str::<Value>(body.trim()).is_err() && body.trim_start().starts_with('{');
                        out.push(Piece::Text(rest));
                    }
                }
            }
            _ if !rest.is_empty() && (!self.after_call || !rest.trim().is_empty()) => out.push(Piece::Text(rest)),
            _ => {}
        }
        (out, cut)
    }

    /// Calls parsed so far.
    pub fn calls(&self) -> usize {
        self.calls
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Vec<Value> {
        vec![json!({"type": "function", "function": {"name": "read_file", "parameters": {"type": "object",
            "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}, "code": {"type": "string"}}}}})]
    }

    /// Feed `text` in pieces of `step` bytes (at char boundaries) and collect.
    fn run(format: ToolFormat, text: &str, step: usize) -> (Vec<Piece>, bool) {
        let mut s = ToolStream::new(Some(format), &tools(), false, true, "call");
        let mut out = vec![];
        for piece in crate::text::char_chunks(text, step) {
            out.extend(s.push(piece));
        }
        let (rest, cut) = s.finish();
        out.extend(rest);
        // Merge adjacent text/thinking pieces so results compare across step sizes.
        let mut merged: Vec<Piece> = vec![];
        for p in out {
            match (merged.last_mut(), p) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (Some(Piece::Thinking(a)), Piece::Thinking(b)) => a.push_str(&b),
                (_, p) => merged.push(p),
            }
        }
        (merged, cut)
    }

    fn call(n: usize, name: &str, args: Value) -> Piece {
        Piece::Call(ToolCall { id: format!("call_{n}"), name: name.into(), arguments: args })
    }

    #[test]
    fn hermes_calls_with_text_before_at_any_split() {
        let out = "Let me look.\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"/a.rs\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": \"{\\\"path\\\": \\\"/b\\\"}\"}\n</tool_call>";
        for step in [1, 3, 7, 1000] {
            let (p, cut) = run(ToolFormat::Hermes, out, step);
            assert_eq!(
                p,
                vec![
                    Piece::Text("Let me look.\n".into()),
                    call(1, "read_file", json!({"path": "/a.rs"})),
                    call(2, "read_file", json!({"path": "/b"})),
                ],
                "step {step}"
            );
            assert!(!cut);
        }
    }

    #[test]
    fn broken_and_truncated_calls_come_back_as_text() {
        let bad = "x <tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": }\n</tool_call> y";
        let (p, cut) = run(ToolFormat::Hermes, bad, 4);
        assert_eq!(p, vec![Piece::Text(bad.into())]);
        assert!(!cut);
        let cutoff = "ok <tool_call>\n{\"name\": \"read_file\", \"argu";
        let (p, cut) = run(ToolFormat::Hermes, cutoff, 5);
        assert_eq!(p, vec![Piece::Text(cutoff.into())]);
        assert!(cut, "a call cut off by max tokens is reported");
        // A lone "<" at the end is released at finish.
        let (p, _) = run(ToolFormat::Hermes, "a < b <tool", 2);
        assert_eq!(p, vec![Piece::Text("a < b <tool".into())]);
    }

    #[test]
    fn qwen3_coder_xml_uses_parameter_types() {
        let out = "<tool_call>\n<function=read_file>\n<parameter=path>\n/src/main.rs\n</parameter>\n<parameter=limit>\n10\n</parameter>\n<parameter=code>\n42\n</parameter>\n</function>\n</tool_call>";
        for step in [1, 6, 1000] {
            let (p, cut) = run(ToolFormat::Qwen3Coder, out, step);
            assert_eq!(p, vec![call(1, "read_file", json!({"path": "/src/main.rs", "limit": 10, "code": "42"}))], "step {step}");
            assert!(!cut);
        }
        let truncated = "<tool_call>\n<function=read_file>\n<parameter=path>\n/src";
        let (p, cut) = run(ToolFormat::Qwen3Coder, truncated, 3);
        assert_eq!(p, vec![Piece::Text(truncated.into())]);
        assert!(cut);
        let broken = "<tool_call>\n<function=read_file>\n<parameter=path>/x</function>\n</tool_call>";
        let (p, _) = run(ToolFormat::Qwen3Coder, broken, 3);
        assert_eq!(p, vec![Piece::Text(broken.into())]);
    }

    #[test]
    fn llama3_json_is_the_whole_answer() {
        let out = "{\"name\": \"read_file\", \"parameters\": {\"path\": \"/x\"}}";
        let (p, cut) = run(ToolFormat::Llama3, out, 4);
        assert_eq!(p, vec![call(1, "read_file", json!({"path": "/x"}))]);
        assert!(!cut);
        let (p, _) = run(ToolFormat::Llama3, "<|python_tag|>{\"name\": \"read_file\", \"parameters\": {}}", 4);
        assert_eq!(p, vec![call(1, "read_file", json!({}))]);
        let (p, cut) = run(ToolFormat::Llama3, "{\"name\": \"read_f", 4);
        assert_eq!(p, vec![Piece::Text("{\"name\": \"read_f".into())]);
        assert!(cut);
        let (p, _) = run(ToolFormat::Llama3, "Plain answer {not json}", 4);
        assert_eq!(p, vec![Piece::Text("Plain answer {not json}".into())]);
    }

    #[test]
    fn thinking_is_split_from_the_answer() {
        let (p, _) = run(ToolFormat::Hermes, "<think>\nadd 2 and 2\n</think>\n\nIt is 4.", 3);
        assert_eq!(p, vec![Piece::Thinking("\nadd 2 and 2\n".into()), Piece::Text("It is 4.".into())]);
        let mut s = ToolStream::new(None, &[], true, true, "c");
        let mut out = s.push("plan</think>\n\nanswer");
        out.extend(s.finish().0);
        assert_eq!(out, vec![Piece::Thinking("plan".into()), Piece::Text("answer".into())]);
    }

    #[test]
    fn leading_whitespace_streams_unless_a_tag_could_follow() {
        // A model that cannot think: every whitespace piece goes out as it comes.
        let mut s = ToolStream::new(Some(ToolFormat::Hermes), &tools(), false, false, "c");
        for ws in [" ", "\n", "  ", "\t"] {
            assert_eq!(s.push(ws), vec![Piece::Text(ws.into())], "{ws:?}");
        }
        assert_eq!(s.push("<think>x"), vec![Piece::Text("<think>x".into())], "not a tag it knows");
        // One that may: held until the answer shows.
        let mut s = ToolStream::new(None, &[], false, true, "c");
        assert_eq!(s.push("\n"), vec![]);
        assert_eq!(s.push("<think>a</think>\n\nb"), vec![Piece::Thinking("a".into()), Piece::Text("b".into())]);
        let mut s = ToolStream::new(None, &[], false, true, "c");
        assert_eq!(s.push(" "), vec![]);
        assert_eq!(s.push("hi"), vec![Piece::Text(" hi".into())]);
    }

    #[test]
    fn formats_follow_the_template() {
        assert_eq!(ToolFormat::for_template("<tool_call>\n<function=x>"), Some(ToolFormat::Qwen3Coder));
        assert_eq!(ToolFormat::for_template("{{- '<tool_call>' }}"), Some(ToolFormat::Hermes));
        assert_eq!(ToolFormat::for_template("<|python_tag|>"), Some(ToolFormat::Llama3));
        assert_eq!(ToolFormat::for_template("{{ messages }}"), None);
    }
}
