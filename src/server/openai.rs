//! OpenAI Chat Completions: the request mapped to the canonical one, and the
//! response as `chat.completion.chunk` events or one `chat.completion`.

use serde_json::{json, Value};

use super::error::ApiError;
use super::fields::{body_object, item, Fields};
use super::finish::Finish;
use super::stream::Out;
use crate::engine::request::{ChatMessage, ChatRequest, ToolCall};
use crate::engine::sampler::SamplingParams;
use crate::engine::types::PromptUsage;
use crate::text::tools::Piece;

pub struct Parsed {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub request: ChatRequest,
}

/// The largest `max_tokens` accepted (the context limit caps it further).
pub const MAX_TOKENS_LIMIT: i64 = 1_000_000;

/// `content` as a string or an array of text parts.
fn content_text(f: &Fields) -> Result<String, ApiError> {
    match f.get("content") {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let path = f.at("content");
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                let pf = item(p, &path, i)?;
                let kind = pf.req_str("type")?;
                if kind != "text" {
                    return Err(ApiError::invalid(pf.at("type"), format!("{}: '{kind}' parts are not supported (text only)", pf.at("type"))));
                }
                out.push_str(pf.req_str("text")?);
            }
            Ok(out)
        }
        Some(v) => Err(ApiError::invalid(
            f.at("content"),
            format!("{}: expected a string or an array of content parts, got {}", f.at("content"), super::fields::type_name(v)),
        )),
    }
}

pub fn parse(body: &Value) -> Result<Parsed, ApiError> {
    let f = Fields::new(body_object(body)?, "");
    let model = f.req_str("model")?.to_string();
    let list = f.array("messages")?.ok_or_else(|| ApiError::invalid("messages", "messages: field required"))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "messages: at least one message is required"));
    }
    let mut messages = vec![];
    for (i, m) in list.iter().enumerate() {
        let mf = item(m, "messages", i)?;
        let role = match mf.req_str("role")? {
            "developer" => "system",
            r @ ("system" | "user" | "assistant" | "tool") => r,
            other => {
                return Err(ApiError::invalid(
                    mf.at("role"),
                    format!("{}: '{other}' is not one of system, developer, user, assistant, tool", mf.at("role")),
                ))
            }
        };
        let mut msg = ChatMessage { role: role.into(), content: content_text(&mf)?, ..Default::default() };
        for (j, c) in mf.array("tool_calls")?.into_iter().flatten().enumerate() {
            let cf = item(c, &mf.at("tool_calls"), j)?;
            let func = cf.object("function")?.ok_or_else(|| ApiError::invalid(cf.at("function"), format!("{}: field required", cf.at("function"))))?;
            let ff = Fields::new(func, cf.at("function"));
            let args = match ff.get("arguments") {
                None => json!({}),
                Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
                Some(o @ Value::Object(_)) => o.clone(),
                Some(v) => return Err(ApiError::invalid(ff.at("arguments"), format!("{}: expected a JSON string, got {}", ff.at("arguments"), super::fields::type_name(v)))),
            };
            msg.tool_calls.push(ToolCall { id: cf.str("id")?.unwrap_or("").to_string(), name: ff.req_str("name")?.to_string(), arguments: args });
        }
        if role == "tool" {
            msg.tool_call_id = Some(mf.req_str("tool_call_id")?.to_string());
        }
        msg.name = mf.str("name")?.map(str::to_string);
        messages.push(msg);
    }
    let mut tools = vec![];
    for (i, t) in f.array("tools")?.into_iter().flatten().enumerate() {
        let tf = item(t, "tools", i)?;
        let func = tf.object("function")?.ok_or_else(|| ApiError::invalid(tf.at("function"), format!("{}: field required", tf.at("function"))))?;
        Fields::new(func, tf.at("function")).req_str("name")?;
        tools.push(json!({"type": "function", "function": func}));
    }
    if f.get("tool_choice").and_then(Value::as_str) == Some("none") {
        tools.clear();
    }
    // One choice per request: `n` may only be 1.
    f.int_in("n", 1, 1)?;
    let max_tokens = match f.int_in("max_completion_tokens", 1, MAX_TOKENS_LIMIT)? {
        Some(n) => Some(n),
        None => f.int_in("max_tokens", 1, MAX_TOKENS_LIMIT)?,
    };
    let sampling = SamplingParams {
        temperature: f.f64_in("temperature", 0.0, 2.0)?.unwrap_or(0.0) as f32,
        top_p: f.f64_in("top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32,
        top_k: f.int_in("top_k", 0, 1_000_000)?.unwrap_or(0) as usize,
        min_p: f.f64_in("min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32,
        repetition_penalty: f.f64_in("repetition_penalty", 0.01, 10.0)?.unwrap_or(1.0) as f32,
        seed: f.int_in("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
        ..Default::default()
    };
    let stop = f.stop_strings("stop")?;
    let include_usage = f
        .object("stream_options")?
        .map(|o| Fields::new(o, "stream_options").bool("include_usage"))
        .transpose()?
        .flatten()
        .unwrap_or(false);
    let enable_thinking = f.object("chat_template_kwargs")?.and_then(|k| k.get("enable_thinking")).and_then(Value::as_bool);
    let request = ChatRequest {
        messages,
        tools,
        max_tokens: max_tokens.unwrap_or(MAX_TOKENS_LIMIT) as usize,
        sampling,
        stop,
        enable_thinking,
        cache_marks: vec![],
    };
    Ok(Parsed { model, stream: f.bool("stream")?.unwrap_or(false), include_usage, request })
}

pub fn usage_json(u: &PromptUsage, completion: usize) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "completion_tokens": completion,
        "total_tokens": u.prompt + completion,
        "prompt_tokens_details": {"cached_tokens": u.cache_read},
    })
}

/// Turns the engine's output into `chat.completion.chunk` SSE lines.
pub struct Chunks {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    calls: usize,
    usage: PromptUsage,
}

fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

impl Chunks {
    pub fn new(id: String, model: String, created: u64, include_usage: bool) -> Self {
        Chunks { id, model, created, include_usage, calls: 0, usage: PromptUsage::default() }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        data(&c)
    }

    pub fn on(&mut self, o: &Out) -> String {
        match o {
            Out::Started(u) => {
                self.usage = *u;
                self.chunk(json!({"role": "assistant", "content": ""}), None)
            }
            Out::Piece(Piece::Text(t)) => self.chunk(json!({"content": t}), None),
            Out::Piece(Piece::Thinking(t)) => self.chunk(json!({"reasoning_content": t}), None),
            Out::Piece(Piece::Call(c)) => {
                let index = self.calls;
                self.calls += 1;
                let mut s = self.chunk(
                    json!({"tool_calls": [{"index": index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}]}),
                    None,
                );
                let args = c.arguments.to_string();
                for frag in super::stream::argument_fragments(&args) {
                    s += &self.chunk(json!({"tool_calls": [{"index": index, "function": {"arguments": frag}}]}), None);
                }
                s
            }
            Out::Done { done, cut } => {
                let mut s = self.chunk(json!({}), Some(Finish::new(done.finish, self.calls, *cut).openai()));
                if self.include_usage {
                    s += &data(&json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                        "system_fingerprint": null, "choices": [], "usage": usage_json(&done.usage, done.generated_tokens),
                    }));
                }
                s + "data: [DONE]\n\n"
            }
            Out::Error(e) => {
                data(&json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}})) + "data: [DONE]\n\n"
            }
        }
    }
}

/// The whole `chat.completion` from every output event.
pub fn completion_json(id: &str, model: &str, created: u64, outs: &[Out]) -> Result<Value, String> {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = vec![];
    for o in outs {
        match o {
            Out::Piece(Piece::Text(t)) => text.push_str(t),
            Out::Piece(Piece::Thinking(t)) => reasoning.push_str(t),
            Out::Piece(Piece::Call(c)) => calls.push(json!({
                "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments.to_string()},
            })),
            Out::Error(e) => return Err(e.clone()),
            Out::Started(_) => {}
            Out::Done { done, cut } => {
                let mut message = json!({"role": "assistant", "content": text, "refusal": null});
                if !reasoning.is_empty() {
                    message["reasoning_content"] = json!(reasoning);
                }
                let n = calls.len();
                if n > 0 {
                    message["tool_calls"] = Value::Array(std::mem::take(&mut calls));
                }
                return Ok(json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": null,
                    "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": Finish::new(done.finish, n, *cut).openai()}],
                    "usage": usage_json(&done.usage, done.generated_tokens),
                }));
            }
        }
    }
    Err("generation ended without a result".into())
}
