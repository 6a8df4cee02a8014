//! Builds mlx-c (MLX's C API) from the sources `make vendor` unpacked, plus
//! kvserve's platform shims, against the MLX library from the official wheel,
//! and generates the Rust bindings with bindgen.
//!
//! Exported to dependents (links = "mlx"): DEP_MLX_LIB_DIR (the directory
//! holding libmlx, for the executable's rpath), DEP_MLX_INCLUDE and
//! DEP_MLX_BACKEND (cpu, cuda13, cuda12 or metal: the wheel linked).

use std::collections::HashMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::exit;

fn fail(msg: &str) -> ! {
    // One clear line; cargo shows a build script's stderr on failure.
    eprintln!("mlx-sys: {msg}");
    println!("cargo:warning=mlx-sys: {msg}");
    exit(1)
}

fn read_pins(path: &Path) -> HashMap<String, String> {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let vendor = env::var_os("KVSERVE_VENDOR_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../vendor"));
    let vendor = vendor.canonicalize().unwrap_or(vendor);
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap();
    println!("cargo:rerun-if-env-changed=KVSERVE_VENDOR_DIR");
    println!("cargo:rerun-if-env-changed=MLX_BACKEND");

    let pins_path = vendor.join("pins.env");
    println!("cargo:rerun-if-changed={}", pins_path.display());
    let pins = read_pins(&pins_path);
    let backend = env::var("MLX_BACKEND").unwrap_or_default();
    // (the wheel libmlx comes from, the wheel the headers come from, the backend)
    let (key, header_key, backend) = match (target_os.as_str(), backend.as_str()) {
        ("linux", "" | "cpu") => ("LINUX_CPU", "LINUX_CPU", "cpu"),
        // mlx-c compiles against the CPU wheel's MLX headers (same version).
        ("linux", "cuda" | "cuda13") => ("LINUX_CUDA13", "LINUX_CPU", "cuda13"),
        ("linux", "cuda12") => ("LINUX_CUDA12", "LINUX_CPU", "cuda12"),
        ("macos", "" | "metal") => ("MACOS", "MACOS", "metal"),
        (os, b) => fail(&format!(
            "no pinned MLX wheel for target OS '{os}' with MLX_BACKEND='{b}' (Linux: cpu, cuda (= cuda13) or cuda12; macOS: metal)"
        )),
    };
    let pin = |k: &str| {
        pins.get(k)
            .cloned()
            .unwrap_or_else(|| fail(&format!("{} lacks {k}", pins_path.display())))
    };
    let wheel_root = |k: &str| vendor.join("mlx").join(format!("{}-{}", pin(&format!("MLX_{k}_WHEEL")), pin("MLX_VERSION"))).join("mlx");
    let mlx_root = wheel_root(key);
    let mlx_include = wheel_root(header_key).join("include");
    let mlx_lib = mlx_root.join("lib");
    if !mlx_lib.is_dir() {
        let hint = if backend == "cpu" || backend == "metal" { String::new() } else { format!("MLX_BACKEND={backend} ") };
        fail(&format!("MLX library not found at {}: run `{hint}make vendor`", mlx_lib.display()));
    }
    let mlxc = vendor.join("mlx-c");
    for (what, path) in [("MLX wheel", &mlx_include), ("mlx-c sources", &mlxc.join("mlx/c"))] {
        if !path.is_dir() {
            fail(&format!("{what} not found at {}: run `make vendor`", path.display()));
        }
    }
    // The .complete markers change whenever make vendor unpacks again.
    println!("cargo:rerun-if-changed={}", mlxc.join(".complete").display());
    println!("cargo:rerun-if-changed={}", mlx_root.join("../.complete").display());
    println!("cargo:rerun-if-changed={}", mlx_include.join("../../.complete").display());

    let shim = manifest.join("shim");
    let mut sources: Vec<PathBuf> = fs::read_dir(mlxc.join("mlx/c"))
        .unwrap_or_else(|e| fail(&format!("cannot list {}: {e}", mlxc.display())))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    sources.push(shim.join("half.cpp"));
    sources.sort();
    // cc prints rerun-if-env-changed lines, which turns off cargo's default of
    // rerunning on any package change: name every input explicitly.
    println!("cargo:rerun-if-changed={}", mlxc.join("mlx").display());
    println!("cargo:rerun-if-changed={}", shim.display());
    println!("cargo:rerun-if-changed=build.rs");

    let mut cpp = cc::Build::new();
    cpp.cpp(true)
        .std("c++20")
        .include(&mlxc)
        .include(&mlx_include)
        .files(&sources)
        .warnings(false)
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag("-include")
        .flag(shim.join("format_compat.h").to_str().unwrap());
    if env::var("PROFILE").as_deref() == Ok("debug") {
        // Debug builds of the wrapper layer gain nothing and compile slower.
        cpp.opt_level(1);
    }
    cpp.compile("mlxc");

    if target_os != "macos" {
        cc::Build::new()
            .file(shim.join("mach_time.c"))
            .compile("kvserve_mach_time");
    }

    println!("cargo:rustc-link-search=native={}", mlx_lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    println!("cargo:lib_dir={}", mlx_lib.display());
    println!("cargo:include={}", mlx_include.display());
    println!("cargo:backend={backend}");

    let bindings = bindgen::Builder::default()
        .header(shim.join("bindings.h").to_string_lossy())
        .clang_arg(format!("-I{}", mlxc.display()))
        .allowlist_function("mlx_.*|_mlx_.*")
        .allowlist_type("mlx_.*")
        .allowlist_var("MLX_.*|mlx_.*")
        .blocklist_type("float16_t|bfloat16_t")
        .blocklist_function("malloc|realloc")
        .generate_comments(false)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen failed (is libclang installed? run `make setup`): {e}")));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    bindings
        .write_to_file(out.join("bindings.rs"))
        .unwrap_or_else(|e| fail(&format!("cannot write bindings: {e}")));
}
