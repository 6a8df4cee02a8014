//! The prompt cache: per-layer KV state (kv), the radix index of snapshots
//! with its byte budget (prefix), and snapshots on disk (store).

pub mod kv;
pub mod prefix;
pub mod store;
