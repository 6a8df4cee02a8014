//! Text: tokenizer, chat template, streaming detokenizer.

pub mod detok;
pub mod template;
pub mod tokenizer;
pub mod tools;
