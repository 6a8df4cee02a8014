//! Link decisions for kvserve's executables (binary, tests, benches):
//! - rpath to the vendored libmlx, so nothing needs LD_LIBRARY_PATH;
//! - on Linux, OpenBLAS as a direct dependency of the executable, so the global
//!   symbol lookup resolves libmlx's `cblas_sgemm` to OpenBLAS before the
//!   netlib reference BLAS the wheel bundles (about 40x faster GEMM here).
//!
//! mlx-sys's own link args do not reach the final executable, so they live here.
use std::env;

fn main() {
    let lib_dir = env::var("DEP_MLX_LIB_DIR").expect("mlx-sys exports DEP_MLX_LIB_DIR");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rerun-if-env-changed=KVSERVE_NO_OPENBLAS");
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap();
    if target_os == "linux" && env::var_os("KVSERVE_NO_OPENBLAS").is_none() {
        // --no-as-needed keeps the DT_NEEDED entry although no Rust code calls it.
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed");
        println!("cargo:rustc-link-arg=-lopenblas");
        println!("cargo:rustc-link-arg=-Wl,--pop-state");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
