//! Link decisions for kvserve's executables (binary, tests, benches):
//! - rpath to the vendored libmlx, so nothing needs LD_LIBRARY_PATH;
//! - with a CUDA wheel (MLX_BACKEND=cuda), no OpenBLAS: MLX's GPU kernels do
//!   the work, and GPU machines need not have it;
//! - on Linux, OpenBLAS as a direct dependency of the executable, so the global
//!   symbol lookup resolves libmlx's `cblas_sgemm` to OpenBLAS before the
//!   netlib reference BLAS the wheel bundles (about 40x faster GEMM here).
//!
//! mlx-sys's own link args do not reach the final executable, so they live here.
use std::env;

fn main() {
    let lib_dir = env::var("DEP_MLX_LIB_DIR").expect("mlx-sys exports DEP_MLX_LIB_DIR");
    let backend = env::var("DEP_MLX_BACKEND").unwrap_or_else(|_| "cpu".into());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    // Then mlx/lib beside the executable's folder (bin/kvserve next to a
    // site-packages-style mlx/lib/libmlx.so): how a prebuilt binary is run
    // against a wheel's library elsewhere (scripts/gpu_check.sh).
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../mlx/lib");
    println!("cargo:rustc-env=KVSERVE_MLX_BACKEND={backend}");
    let cuda = backend.starts_with("cuda");
    if cuda {
        // libmlx.so needs the driver's libcuda.so.1, which a build machine
        // without an NVIDIA driver lacks; the loader finds it where it runs.
        println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
    }
    println!("cargo:rerun-if-env-changed=KVSERVE_NO_OPENBLAS");
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap();
    if target_os == "linux" && !cuda && env::var_os("KVSERVE_NO_OPENBLAS").is_none() {
        // --no-as-needed keeps the DT_NEEDED entry although no Rust code calls it.
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed");
        println!("cargo:rustc-link-arg=-lopenblas");
        println!("cargo:rustc-link-arg=-Wl,--pop-state");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
