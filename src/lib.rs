//! kvserve: a local LLM inference server over MLX that computes a coding
//! agent's long, mostly unchanging prompt once and reuses it turn after turn.
//!
//! `unsafe` is denied everywhere but `src/mlx/` (MLX's C API and the C
//! library), which allows it module by module.
#![deny(unsafe_code)]

pub mod cache;
pub mod check;
pub mod config;
pub mod mlx;
pub mod model;
pub mod text;
pub mod engine;
pub mod kernels;
pub mod launch;
pub mod report;
pub mod pipeline;
pub mod ring;
pub mod server;
