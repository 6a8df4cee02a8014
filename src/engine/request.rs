//! The one canonical chat request both APIs map to, and how it becomes the
//! model's prompt: chat template and token ids.

use serde_json::{json, Value};

use super::sampler::SamplingParams;
pub use super::types::ToolCall;
use super::types::ModelInfo;
use crate::text::template::TemplateInput;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatMessage {
    /// system, user, assistant or tool.
    pub role: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    /// For role tool: the call it answers.
    pub tool_call_id: Option<String>,
    /// For role tool: the tool's name, when known.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// Tool definitions in OpenAI's shape: `{"type":"function","function":{name,description,parameters}}`.
    pub tools: Vec<Value>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub enable_thinking: Option<bool>,
    /// Texts (in prompt order) whose ends are cache breakpoints. For models
    /// whose state can be trimmed they are not needed (the one snapshot each
    /// request leaves serves every token boundary in it); for the others
    /// they become [`Prompt::cache_points`].
    pub cache_marks: Vec<String>,
}

/// The rendered prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub ids: Vec<u32>,
    /// Tokens the answer may use (max_tokens, capped by the context left).
    pub max_tokens: usize,
    /// See [`Job::cache_points`](super::types::Job::cache_points).
    pub cache_points: Vec<usize>,
}

/// Why a request cannot be served; `field` names what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub field: Option<String>,
    pub message: String,
}

impl RequestError {
    pub fn new(field: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        RequestError { field: field.into(), message: message.into() }
    }
}

/// Thousands separators, as error messages show counts ("12,408").
pub fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl ChatRequest {
    /// The messages as the chat template reads them (tool-call arguments as
    /// objects), or, with `arguments_as_text`, as OpenAI's API writes them.
    pub fn messages_json(&self, arguments_as_text: bool) -> Value {
        Value::Array(
            self.messages
                .iter()
                .map(|m| {
                    let mut o = json!({"role": m.role, "content": m.content});
                    if !m.tool_calls.is_empty() {
                        o["tool_calls"] = Value::Array(
                            m.tool_calls
                                .iter()
                                .map(|c| {
                                    let args = match &c.arguments {
                                        Value::String(s) if arguments_as_text => json!(s),
                                        other if arguments_as_text => json!(other.to_string()),
                                        other => other.clone(),
                                    };
                                    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}})
                                })
                                .collect(),
                        );
                    }
                    if let Some(id) = &m.tool_call_id {
                        o["tool_call_id"] = json!(id);
                    }
                    if let Some(n) = &m.name {
                        o["name"] = json!(n);
                    }
                    o
                })
                .collect(),
        )
    }

    /// Render and tokenize for `model`; checks the context length.
    pub fn prompt(&self, model: &ModelInfo) -> Result<Prompt, RequestError> {
        let (text, ids, ends) = self.render(model)?;
        if ids.len() >= model.context {
            return Err(RequestError::new(
                "messages".to_string(),
                format!(
                    "prompt is {} tokens; model context is {} (at least one token must be left to answer)",
                    grouped(ids.len()),
                    grouped(model.context)
                ),
            ));
        }
        let max_tokens = self.max_tokens.min(model.context - ids.len());
        // Only a model whose state cannot be trimmed needs them (a second render of the template).
        let cache_points = if model.exact_cache { self.cache_points(model, &text, &ends) } else { vec![] };
        Ok(Prompt { text, ids, max_tokens, cache_points })
    }

    /// Where in the prompt (in tokens) a later request is likely to resume:
    /// after the leading system messages and the tools (where the template
    /// rendering them alone stops agreeing with the whole prompt), and after
    /// each text marked with cache_control (found in order in the prompt's
    /// text). A position counts the tokens that end at or before the point,
    /// so a token that spans it is left to the rest; positions that would
    /// serve no later prompt (0, or the prompt's own end) are dropped.
    fn cache_points(&self, model: &ModelInfo, text: &str, ends: &[usize]) -> Vec<usize> {
        let mut at_bytes = vec![];
        let leading = self.messages.iter().take_while(|m| m.role == "system").count();
        if let (Some(template), true) = (&model.template, leading > 0 || !self.tools.is_empty()) {
            let head = ChatRequest { messages: self.messages[..leading].to_vec(), ..Default::default() };
            let tools = Value::Array(self.tools.clone());
            let rendered = template.render(&TemplateInput {
                messages: &head.messages_json(false),
                tools: (!self.tools.is_empty()).then_some(&tools),
                add_generation_prompt: false,
                bos_token: model.tokenizer.bos_token.as_deref().unwrap_or(""),
                eos_token: model.tokenizer.eos_token.as_deref().unwrap_or(""),
                enable_thinking: self.enable_thinking,
            });
            if let Ok(r) = rendered {
                let mut common = r.bytes().zip(text.bytes()).take_while(|(a, b)| a == b).count();
                while !text.is_char_boundary(common) {
                    common -= 1;
                }
                at_bytes.push(common);
            }
        }
        let mut cursor = 0;
        for mark in self.cache_marks.iter().filter(|m| !m.is_empty()) {
            if let Some(i) = text[cursor..].find(mark.as_str()) {
                cursor += i + mark.len();
                at_bytes.push(cursor);
            }
        }
        let mut points: Vec<usize> = at_bytes.into_iter().map(|b| ends.partition_point(|&e| e <= b)).filter(|&p| p > 0 && p + 1 < ends.len()).collect();
        points.sort_unstable();
        points.dedup();
        points
    }

    /// The prompt's text, token ids and each token's end offset in the text
    /// (no context check: count_tokens reports long prompts too).
    pub fn render(&self, model: &ModelInfo) -> Result<(String, Vec<u32>, Vec<usize>), RequestError> {
        if self.messages.is_empty() {
            return Err(RequestError::new("messages".to_string(), "messages: at least one message is required"));
        }
        let template = model
            .template
            .as_ref()
            .ok_or_else(|| RequestError::new(None, format!("model '{}' has no chat template", model.name)))?;
        let messages = self.messages_json(false);
        let tools = Value::Array(self.tools.clone());
        let text = template
            .render(&TemplateInput {
                messages: &messages,
                tools: (!self.tools.is_empty()).then_some(&tools),
                add_generation_prompt: true,
                bos_token: model.tokenizer.bos_token.as_deref().unwrap_or(""),
                eos_token: model.tokenizer.eos_token.as_deref().unwrap_or(""),
                enable_thinking: self.enable_thinking,
            })
            .map_err(|e| RequestError::new("messages".to_string(), e.to_string()))?;
        // The template already writes BOS where the model wants it.
        let (ids, ends) = model.tokenizer.encode_with_ends(&text).map_err(|e| RequestError::new(None, e.to_string()))?;
        Ok((text, ids, ends))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_grouped() {
        assert_eq!(grouped(12408), "12,408");
        assert_eq!(grouped(8192), "8,192");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000_000), "1,000,000");
    }
}
