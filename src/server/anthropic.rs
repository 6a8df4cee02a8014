//! Anthropic Messages API: the request mapped to the canonical one, and the
//! response as Anthropic's event sequence (a small state machine over
//! content blocks, which proxy mode writes with too) or one JSON message.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::fields::{body_object, item, Fields};
use super::finish::Finish;
use super::stream::Out;
use crate::engine::request::{ChatMessage, ChatRequest, ToolCall};
use crate::engine::sampler::SamplingParams;
use crate::engine::types::PromptUsage;
use crate::text::tools::Piece;

/// The line Claude Code puts first in `system`; it changes every turn and
/// never reaches the model (it would break the cached prefix at token 0).
const BILLING: &str = "x-anthropic-billing-header:";

/// The largest `max_tokens` accepted (the context limit caps it further).
pub const MAX_TOKENS_LIMIT: i64 = 1_000_000;

pub struct Parsed {
    pub model: String,
    pub stream: bool,
    pub request: ChatRequest,
}

fn has_cache_control(f: &Fields) -> bool {
    f.get("cache_control").is_some()
}

/// Text of a `content` that is a string or an array of blocks of `kind`
/// text (for system and tool results); the texts of blocks with
/// cache_control are pushed to `marks`.
fn text_of(v: &Value, path: &str, marks: &mut Vec<String>, drop_billing: bool) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut parts = vec![];
            for (i, b) in blocks.iter().enumerate() {
                let f = item(b, path, i)?;
                let kind = f.req_str("type")?;
                if kind != "text" {
                    return Err(ApiError::invalid(f.at("type"), format!("{}: '{kind}' blocks are not supported here (text only)", f.at("type"))));
                }
                let text = f.req_str("text")?;
                if drop_billing && text.starts_with(BILLING) {
                    continue;
                }
                if has_cache_control(&f) {
                    marks.push(text.to_string());
                }
                parts.push(text.to_string());
            }
            Ok(parts.join("\n"))
        }
        other => Err(ApiError::invalid(path, format!("{path}: expected a string or an array of content blocks, got {}", super::fields::type_name(other)))),
    }
}

/// Strip Claude Code's billing line from a system prompt given as a string.
fn strip_billing(s: &str) -> String {
    if s.starts_with(BILLING) {
        s.split_once('\n').map(|(_, rest)| rest.to_string()).unwrap_or_default()
    } else {
        s.to_string()
    }
}

/// Map one message's content blocks to canonical messages (tool results
/// become `tool` messages in place).
fn message(v: &Value, i: usize, out: &mut Vec<ChatMessage>, marks: &mut Vec<String>) -> Result<(), ApiError> {
    let f = item(v, "messages", i)?;
    let role = f.req_str("role")?;
    if !matches!(role, "user" | "assistant" | "system") {
        return Err(ApiError::invalid(f.at("role"), format!("{}: '{role}' is not one of user, assistant, system", f.at("role"))));
    }
    let content = f.required("content")?;
    if role == "system" {
        let text = text_of(content, &f.at("content"), marks, true)?;
        out.push(ChatMessage { role: "system".into(), content: strip_billing(&text), ..Default::default() });
        return Ok(());
    }
    let blocks = match content {
        Value::String(s) => {
            out.push(ChatMessage { role: role.into(), content: s.clone(), ..Default::default() });
            return Ok(());
        }
        Value::Array(b) => b,
        other => {
            return Err(ApiError::invalid(
                f.at("content"),
                format!("{}: expected a string or an array of content blocks, got {}", f.at("content"), super::fields::type_name(other)),
            ))
        }
    };
    let mut text = String::new();
    let mut calls = vec![];
    let flush = |text: &mut String, calls: &mut Vec<ToolCall>, out: &mut Vec<ChatMessage>| {
        if !text.is_empty() || !calls.is_empty() {
            out.push(ChatMessage { role: role.into(), content: std::mem::take(text), tool_calls: std::mem::take(calls), ..Default::default() });
        }
    };
    let path = f.at("content");
    for (j, b) in blocks.iter().enumerate() {
        let bf = item(b, &path, j)?;
        let kind = bf.req_str("type")?;
        match kind {
            "text" => {
                let t = bf.req_str("text")?;
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(t);
                if has_cache_control(&bf) {
                    marks.push(t.to_string());
                }
            }
            "tool_use" if role == "assistant" => {
                let input = bf.get("input").cloned().unwrap_or_else(|| json!({}));
                if !input.is_object() {
                    return Err(ApiError::invalid(bf.at("input"), format!("{}: expected an object", bf.at("input"))));
                }
                calls.push(ToolCall { id: bf.req_str("id")?.to_string(), name: bf.req_str("name")?.to_string(), arguments: input });
            }
            "tool_result" if role == "user" => {
                flush(&mut text, &mut calls, out);
                let id = bf.req_str("tool_use_id")?.to_string();
                let mut content = match bf.get("content") {
                    None => String::new(),
                    Some(c) => text_of(c, &bf.at("content"), marks, false)?,
                };
                if bf.bool("is_error")? == Some(true) {
                    content = format!("Error: {content}");
                }
                if has_cache_control(&bf) && !content.is_empty() {
                    marks.push(content.clone());
                }
                out.push(ChatMessage { role: "tool".into(), content, tool_call_id: Some(id), ..Default::default() });
            }
            // Earlier reasoning is not replayed to the model.
            "thinking" | "redacted_thinking" if role == "assistant" => {}
            other => {
                return Err(ApiError::invalid(
                    bf.at("type"),
                    format!("{}: '{other}' blocks are not supported in {role} messages", bf.at("type")),
                ))
            }
        }
    }
    flush(&mut text, &mut calls, out);
    Ok(())
}

/// Parse a Messages request (`count_only`: for count_tokens, where
/// max_tokens is not required).
pub fn parse(body: &Value, count_only: bool) -> Result<Parsed, ApiError> {
    let f = Fields::new(body_object(body)?, "");
    let model = f.req_str("model")?.to_string();
    let max_tokens = if count_only {
        f.int_in("max_tokens", 1, MAX_TOKENS_LIMIT)?.unwrap_or(1)
    } else {
        f.int_in("max_tokens", 1, MAX_TOKENS_LIMIT)?
            .ok_or_else(|| ApiError::invalid("max_tokens", "max_tokens: field required"))?
    };
    let mut marks = vec![];
    let mut messages = vec![];
    if let Some(system) = f.get("system") {
        let text = strip_billing(&text_of(system, "system", &mut marks, true)?);
        if !text.is_empty() {
            messages.push(ChatMessage { role: "system".into(), content: text, ..Default::default() });
        }
    }
    let list = f.array("messages")?.ok_or_else(|| ApiError::invalid("messages", "messages: field required"))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "messages: at least one message is required"));
    }
    for (i, m) in list.iter().enumerate() {
        message(m, i, &mut messages, &mut marks)?;
    }
    let mut tools = vec![];
    for (i, t) in f.array("tools")?.into_iter().flatten().enumerate() {
        let tf = item(t, "tools", i)?;
        let name = tf.req_str("name")?;
        // Server-side tools (web search, ...) have a type and no schema: not ours to run.
        let Some(schema) = tf.object("input_schema")? else { continue };
        let mut function = Map::new();
        function.insert("name".into(), json!(name));
        if let Some(d) = tf.str("description")? {
            function.insert("description".into(), json!(d));
        }
        function.insert("parameters".into(), Value::Object(schema.clone()));
        tools.push(json!({"type": "function", "function": function}));
    }
    if let Some(choice) = f.object("tool_choice")? {
        if choice.get("type").and_then(Value::as_str) == Some("none") {
            tools.clear();
        }
    }
    let enable_thinking = match f.object("thinking")?.and_then(|t| t.get("type")).and_then(Value::as_str) {
        Some("disabled") => Some(false),
        Some("enabled") => Some(true),
        _ => None,
    };
    let sampling = SamplingParams {
        temperature: f.f64_in("temperature", 0.0, 2.0)?.unwrap_or(0.0) as f32,
        top_p: f.f64_in("top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32,
        top_k: f.int_in("top_k", 0, 1_000_000)?.unwrap_or(0) as usize,
        ..Default::default()
    };
    let stop = f.stop_strings("stop_sequences")?;
    let request = ChatRequest {
        messages,
        tools,
        max_tokens: max_tokens as usize,
        sampling,
        stop,
        enable_thinking,
        cache_marks: marks,
    };
    Ok(Parsed { model, stream: f.bool("stream")?.unwrap_or(false), request })
}

pub fn usage_json(u: &PromptUsage, output_tokens: usize) -> Value {
    json!({
        "input_tokens": u.input,
        "cache_creation_input_tokens": u.cache_creation,
        "cache_read_input_tokens": u.cache_read,
        "output_tokens": output_tokens,
    })
}

/// One SSE event.
pub fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// The `error` event that ends a stream which has already begun (its 200 sent).
pub fn error_event(message: &str) -> String {
    sse("error", &json!({"type": "error", "error": {"type": "api_error", "message": message}}))
}

/// Writes Anthropic's stream events, for the local engine ([`Events`]) and
/// proxy mode (`proxy::Translate`) alike: one content block open at a time,
/// numbered in order, closed before the next one opens and before the
/// message ends.
pub struct Blocks {
    id: String,
    model: String,
    index: usize,
    open: Option<Block>,
    /// tool_use blocks opened so far (they decide the stop reason).
    calls: usize,
}

/// The kind of the open block. A tool block has a key (the upstream's
/// tool-call index), so that a call's argument pieces go on in its block.
#[derive(Clone, Copy, PartialEq)]
enum Block {
    Text,
    Thinking,
    Tool(u64),
}

impl Blocks {
    pub fn new(id: String, model: String) -> Self {
        Blocks { id, model, index: 0, open: None, calls: 0 }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// tool_use blocks opened so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// `message_start`, with the usage known before any output.
    pub fn start(&self, out: &mut String, usage: Value) {
        let message = json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": usage,
        });
        out.push_str(&sse("message_start", &json!({"type": "message_start", "message": message})));
    }

    /// Close the open block, if any.
    pub fn close(&mut self, out: &mut String) {
        if self.open.take().is_some() {
            out.push_str(&sse("content_block_stop", &json!({"type": "content_block_stop", "index": self.index})));
            self.index += 1;
        }
    }

    /// Close the open block and open `block`, starting as `content_block`.
    fn open(&mut self, out: &mut String, block: Block, content_block: Value) {
        self.close(out);
        out.push_str(&sse("content_block_start", &json!({"type": "content_block_start", "index": self.index, "content_block": content_block})));
        self.open = Some(block);
    }

    fn delta(&self, out: &mut String, delta: Value) {
        out.push_str(&sse("content_block_delta", &json!({"type": "content_block_delta", "index": self.index, "delta": delta})));
    }

    /// Answer text, in the open text block or a new one.
    pub fn text(&mut self, out: &mut String, t: &str) {
        if self.open != Some(Block::Text) {
            self.open(out, Block::Text, json!({"type": "text", "text": ""}));
        }
        self.delta(out, json!({"type": "text_delta", "text": t}));
    }

    /// Reasoning text, in the open thinking block or a new one.
    pub fn thinking(&mut self, out: &mut String, t: &str) {
        if self.open != Some(Block::Thinking) {
            self.open(out, Block::Thinking, json!({"type": "thinking", "thinking": ""}));
        }
        self.delta(out, json!({"type": "thinking_delta", "thinking": t}));
    }

    /// Whether the open block is the tool call keyed `key`.
    pub fn in_tool(&self, key: u64) -> bool {
        self.open == Some(Block::Tool(key))
    }

    /// Open a tool_use block keyed `key`; its arguments follow as
    /// [`Blocks::tool_json`] pieces.
    pub fn tool(&mut self, out: &mut String, key: u64, id: &str, name: &str) {
        self.calls += 1;
        self.open(out, Block::Tool(key), json!({"type": "tool_use", "id": id, "name": name, "input": {}}));
    }

    /// A piece of the open tool call's arguments (JSON text).
    pub fn tool_json(&mut self, out: &mut String, partial: &str) {
        self.delta(out, json!({"type": "input_json_delta", "partial_json": partial}));
    }

    /// The end: the open block closed, then `message_delta` with the stop
    /// reason and the final usage, and `message_stop`.
    pub fn end(&mut self, out: &mut String, finish: Finish, usage: Value) {
        self.close(out);
        let delta = json!({"stop_reason": finish.anthropic(), "stop_sequence": null});
        out.push_str(&sse("message_delta", &json!({"type": "message_delta", "delta": delta, "usage": usage})));
        out.push_str(&sse("message_stop", &json!({"type": "message_stop"})));
    }
}

/// Turns the engine's output into Anthropic's stream events.
pub struct Events {
    blocks: Blocks,
}

impl Events {
    pub fn new(id: String, model: String) -> Self {
        Events { blocks: Blocks::new(id, model) }
    }

    /// The SSE text for one output event.
    pub fn on(&mut self, o: &Out) -> String {
        let mut out = String::new();
        let b = &mut self.blocks;
        match o {
            Out::Started(u) => b.start(&mut out, usage_json(u, 0)),
            Out::Piece(Piece::Text(t)) => b.text(&mut out, t),
            Out::Piece(Piece::Thinking(t)) => b.thinking(&mut out, t),
            Out::Piece(Piece::Call(c)) => {
                // A parsed call comes whole: its block opens and closes here.
                let key = b.calls() as u64;
                b.tool(&mut out, key, &c.id, &c.name);
                for frag in super::stream::argument_fragments(&c.arguments.to_string()) {
                    b.tool_json(&mut out, frag);
                }
                b.close(&mut out);
            }
            Out::Done { done, cut } => {
                let finish = Finish::new(done.finish, b.calls(), *cut);
                b.end(&mut out, finish, usage_json(&done.usage, done.generated_tokens));
            }
            Out::Error(e) => out.push_str(&error_event(e)),
        }
        out
    }
}

/// The whole (non-streaming) message from every output event.
pub fn message_json(id: &str, model: &str, outs: &[Out]) -> Result<Value, String> {
    let mut content: Vec<Value> = vec![];
    let mut calls = 0;
    for o in outs {
        match o {
            Out::Piece(Piece::Text(t)) => match content.last_mut() {
                Some(b) if b["type"] == "text" => {
                    let s = b["text"].as_str().unwrap_or("").to_string() + t;
                    b["text"] = json!(s);
                }
                _ => content.push(json!({"type": "text", "text": t})),
            },
            Out::Piece(Piece::Thinking(t)) => match content.last_mut() {
                Some(b) if b["type"] == "thinking" => {
                    let s = b["thinking"].as_str().unwrap_or("").to_string() + t;
                    b["thinking"] = json!(s);
                }
                _ => content.push(json!({"type": "thinking", "thinking": t, "signature": ""})),
            },
            Out::Piece(Piece::Call(c)) => {
                calls += 1;
                content.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}));
            }
            Out::Error(e) => return Err(e.clone()),
            Out::Started(_) => {}
            Out::Done { done, cut } => {
                return Ok(json!({
                    "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
                    "stop_reason": Finish::new(done.finish, calls, *cut).anthropic(), "stop_sequence": null,
                    "usage": usage_json(&done.usage, done.generated_tokens),
                }));
            }
        }
    }
    Err("generation ended without a result".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a Claude Code turn (texts made up here).
    fn claude_code_turn(billing: &str) -> Value {
        json!({
            "model": "m", "max_tokens": 32000, "stream": true,
            "system": [
                {"type": "text", "text": billing},
                {"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            ],
            "tools": [{"name": "Read", "description": "Read a file.", "input_schema": {"type": "object", "properties": {"p": {"type": "string"}}}},
                      {"type": "web_search_20250305", "name": "web_search"}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "<system-reminder>git: clean</system-reminder>"}, {"type": "text", "text": "Open a.rs"}]},
                {"role": "system", "content": "Environment: /repo, linux."},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "x"}, {"type": "text", "text": "Reading."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"p": "a.rs"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "fn main() {}"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true, "content": "no such file"},
                    {"type": "text", "text": "Now fix it", "cache_control": {"type": "ephemeral"}}]},
            ],
            "metadata": {"user_id": "u"}, "thinking": {"type": "adaptive"}, "context_management": {}, "output_config": {},
        })
    }

    #[test]
    fn claude_code_turn_maps_in_order_without_the_billing_line() {
        let p = parse(&claude_code_turn("x-anthropic-billing-header: cc_version=2.1.328; cch=abc;"), false).unwrap();
        let m = &p.request.messages;
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        // The mid-conversation system message stays where it was.
        assert_eq!(roles, ["system", "user", "system", "assistant", "tool", "tool", "user"]);
        assert_eq!(m[0].content, "You are a coding agent.\nBe brief.");
        assert!(!m.iter().any(|m| m.content.contains("billing")));
        assert_eq!(m[1].content, "<system-reminder>git: clean</system-reminder>\nOpen a.rs");
        assert_eq!(m[3].content, "Reading.");
        assert_eq!(m[3].tool_calls, vec![ToolCall { id: "toolu_1".into(), name: "Read".into(), arguments: json!({"p": "a.rs"}) }]);
        assert_eq!((m[4].content.as_str(), m[4].tool_call_id.as_deref()), ("fn main() {}", Some("toolu_1")));
        assert_eq!(m[5].content, "Error: no such file");
        assert_eq!(m[6].content, "Now fix it");
        // Only the custom tool reaches the template, in OpenAI's shape.
        assert_eq!(p.request.tools.len(), 1);
        assert_eq!(p.request.tools[0]["function"]["name"], "Read");
        assert_eq!(p.request.cache_marks, ["You are a coding agent.", "Be brief.", "Now fix it"]);
        assert_eq!(p.request.max_tokens, 32000);
        assert!(p.stream);
        // Another billing line gives the same request.
        let q = parse(&claude_code_turn("x-anthropic-billing-header: cc_version=2.1.328; cch=def;"), false).unwrap();
        assert_eq!(q.request.messages, p.request.messages);
    }

    #[test]
    fn billing_line_in_a_string_system_prompt_is_dropped() {
        assert_eq!(strip_billing("x-anthropic-billing-header: a=1;\nYou are helpful."), "You are helpful.");
        assert_eq!(strip_billing("You are helpful."), "You are helpful.");
    }
}
