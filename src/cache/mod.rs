//! KV state of a running sequence (and, later, the prefix store over it).

pub mod kv;
