//! Generation: sampling and the prefill/decode loop.

pub mod generate;
pub mod sampler;
