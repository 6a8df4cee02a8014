//! Generation: sampling and the prefill/decode loop.

pub mod generate;
pub(crate) mod policy;
pub mod request;
pub mod sampler;
mod scheduler;
mod sequence;
pub mod types;
pub mod worker;
