//! Generation: sampling and the prefill/decode loop.

pub mod generate;
pub mod request;
pub mod sampler;
pub mod worker;
