//! The model's tokenizer (Hugging Face `tokenizer.json` through the
//! `tokenizers` crate) with the special tokens and chat template from
//! `tokenizer_config.json` (or `chat_template.jinja`).

use std::path::Path;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{file}: {message}")]
    Load { file: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Token ids that end generation (from the tokenizer's eos token).
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
    pub add_bos: bool,
}

/// A special token given as a string or as `{"content": ...}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    pub fn from_json(tokenizer_json: &[u8], config: &Value, template_file: Option<String>, file: &str) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| TokenizerError::Load { file: file.to_string(), message: e.to_string() })?;
        let bos_token = token_str(config.get("bos_token"));
        let eos_token = token_str(config.get("eos_token"));
        let eos_ids = eos_token.as_deref().and_then(|t| inner.token_to_id(t)).into_iter().collect();
        let chat_template = template_file.or_else(|| match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        });
        let add_bos = config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        Ok(Tokenizer { inner, bos_token, eos_token, eos_ids, chat_template, add_bos })
    }

    /// Load from a model directory.
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        let tj = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tj).map_err(|e| TokenizerError::Load { file: tj.display().to_string(), message: e.to_string() })?;
        let tc = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&tc) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| TokenizerError::Load { file: tc.display().to_string(), message: format!("not valid JSON: {e}") })?,
            Err(_) => Value::Null,
        };
        let template = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        Self::from_json(&bytes, &config, template, &tj.display().to_string())
    }

    /// Token ids of `text`; special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.encode_with_ends(text)?.0)
    }

    /// Token ids of `text` and, for each, the byte offset in `text` where it ends.
    pub fn encode_with_ends(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>), TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Tokenize(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        let mut ends: Vec<usize> = enc.get_offsets().iter().map(|o| o.1).collect();
        if self.add_bos {
            if let Some(bos) = self.bos_token.as_deref().and_then(|t| self.inner.token_to_id(t)) {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                    ends.insert(0, 0);
                }
            }
        }
        Ok((ids, ends))
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Tokenize(e.to_string()))
    }
}
