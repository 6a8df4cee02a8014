//! Shared helpers for tests that use generated fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

/// Where `make fixtures` put the generated models (tiny mlx-lm models, the
/// converted SmolLM2). Missing fixtures fail the test: run `make fixtures`.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("KVSERVE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"));
    assert!(dir.is_dir(), "fixtures missing at {}: run `make fixtures`", dir.display());
    dir
}
