//! Streaming detokenizer: text is released as soon as it is final, and the
//! concatenation of everything released equals decoding all tokens at once
//! (a character split across tokens is held back until complete).

use super::tokenizer::{Tokenizer, TokenizerError};

pub struct StreamDetokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context (keeps leading-space handling right).
    prefix: usize,
    /// Tokens before this have been released.
    read: usize,
}

impl StreamDetokenizer {
    pub fn new() -> Self {
        StreamDetokenizer { ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Add one token; return the text it makes final (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let text = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(text)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end of generation.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or("").to_string())
    }
}

impl Default for StreamDetokenizer {
    fn default() -> Self {
        Self::new()
    }
}
