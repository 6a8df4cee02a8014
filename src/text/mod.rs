//! Text: tokenizer, chat template, streaming detokenizer.

pub mod detok;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub mod tools;

/// `s` in pieces of about `size` bytes, each cut at a character boundary
/// (a piece is longer only to finish a character).
pub fn char_chunks(s: &str, size: usize) -> Vec<&str> {
    let mut out = vec![];
    let mut start = 0;
    while start < s.len() {
        let mut end = (start + size.max(1)).min(s.len());
        while !s.is_char_boundary(end) {
            end += 1;
        }
        out.push(&s[start..end]);
        start = end;
    }
    out
}
