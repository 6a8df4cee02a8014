//! The prompt cache: per-layer KV state (kv), the radix index of snapshots
//! with its byte budget (prefix), snapshots on disk (store), and the
//! per-user snapshot folder with its disk bound (disk).

pub mod disk;
pub mod kv;
pub mod prefix;
pub mod store;
