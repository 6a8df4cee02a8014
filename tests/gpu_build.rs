//! The GPU build's machine-side logic, checked without a GPU: which backend
//! `make` picks from what `nvidia-smi` says (scripts/backend.sh, run against
//! fake `nvidia-smi` programs), and clear refusals of unknown backends by
//! `make vendor` and by the build script's pins.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A folder holding an `nvidia-smi` that prints `out` (for any arguments).
fn fake_smi(out: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvserve-fake-smi-{}-{}", std::process::id(), out.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let smi = dir.join("nvidia-smi");
    std::fs::write(&smi, format!("#!/bin/sh\ncat <<'EOT'\n{out}\nEOT\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn backend_with(path: Option<&Path>) -> String {
    let sys = "/usr/local/bin:/usr/bin:/bin";
    let path = match path {
        Some(p) => format!("{}:{sys}", p.display()),
        None => sys.to_string(),
    };
    let out = Command::new("bash").arg(root().join("scripts/backend.sh")).env("PATH", path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn backend_follows_the_drivers_cuda_version() {
    // The header nvidia-smi prints, and `-L`'s list (the fake prints both for any call).
    let smi = |cuda: &str| format!("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: {cuda}     |");
    assert_eq!(backend_with(Some(&fake_smi(&smi("13.0")))), "cuda13");
    assert_eq!(backend_with(Some(&fake_smi(&smi("12.4 ")))), "cuda12");
    assert_eq!(backend_with(Some(&fake_smi(&smi("11.8  ")))), "cpu", "CUDA 11 has no MLX wheel");
    // nvidia-smi present but no GPU listed (driver without a device).
    assert_eq!(backend_with(Some(&fake_smi("No devices were found"))), "cpu");
    // The CI machines: no nvidia-smi at all.
    if which_smi().is_none() {
        assert_eq!(backend_with(None), "cpu");
    }
}

fn which_smi() -> Option<PathBuf> {
    ["/usr/bin/nvidia-smi", "/usr/local/bin/nvidia-smi", "/bin/nvidia-smi"].iter().map(PathBuf::from).find(|p| p.exists())
}

#[test]
fn unknown_backends_are_refused_by_name() {
    let out = Command::new("bash").arg(root().join("scripts/vendor.sh")).env("MLX_BACKEND", "rocm").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("MLX_BACKEND='rocm'") && err.contains("cuda12"), "{err}");
}

#[test]
fn every_backend_is_pinned_with_a_checksum() {
    let pins = std::fs::read_to_string(root().join("vendor/pins.env")).unwrap();
    for key in ["LINUX_CPU", "LINUX_CUDA13", "LINUX_CUDA12", "MACOS"] {
        for field in ["WHEEL", "FILE", "PLATFORM"] {
            assert!(pins.contains(&format!("MLX_{key}_{field}=")), "pins.env lacks MLX_{key}_{field}");
        }
        let sha = pins.lines().find_map(|l| l.strip_prefix(&format!("MLX_{key}_SHA256="))).unwrap_or_else(|| panic!("no sha256 for {key}"));
        assert!(sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()), "{key}: {sha}");
    }
    // Each runtime requirement pins a version and a sha256 (pip --require-hashes refuses anything else).
    for f in ["vendor/cuda13-runtime.txt", "vendor/cuda12-runtime.txt", "benches/gpu-requirements.txt"] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        let reqs: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
        assert!(!reqs.is_empty(), "{f}");
        for r in reqs {
            assert!(r.contains("==") && r.contains("--hash=sha256:"), "{f}: {r}");
        }
    }
}
