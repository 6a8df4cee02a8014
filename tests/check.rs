//! `kvserve check` on the real SmolLM2: every point passes here (Claude
//! Code is installed by `make test`), each printed with its result.

mod common;

#[test]
fn check_passes_every_point() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .args(["check", "--model", common::smollm2_dir().to_str().unwrap()])
        .env("KVSERVE_CLAUDE", std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/claude-code/node_modules/.bin/claude"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    // The backend line names the wheel linked and the device MLX computes on,
    // by name; on a GPU build BLAS is not used (an [info] line, not a pass).
    let linked = kvserve::mlx::LINKED_BACKEND;
    let on_gpu = linked != "cpu";
    assert_eq!(text.matches("[pass]").count(), if on_gpu { 8 } else { 9 }, "{text}");
    let wheel = match linked {
        "cpu" => "mlx-cpu",
        "cuda13" => "mlx-cuda-13",
        "cuda12" => "mlx-cuda-12",
        _ => "mlx-metal",
    };
    let prefix = format!("[pass] MLX backend {linked} ({wheel} wheel), computing on {}: ", if on_gpu { "gpu" } else { "cpu" });
    let backend = text.lines().find(|l| l.starts_with("[pass] MLX backend ")).unwrap_or_else(|| panic!("no backend line: {text}"));
    let device = backend.strip_prefix(prefix.as_str()).unwrap_or_else(|| panic!("{backend}"));
    assert!(!device.trim().is_empty() && device != "unnamed device", "{backend}");
    let blas = if on_gpu { "[info] BLAS: not used" } else { "BLAS is the fast one" };
    for point in ["loads and computes", blas, "the model loads", "renders a conversation with tools", "a generation produces text", "is a cache hit", "answers the Anthropic and OpenAI APIs", "Claude Code is installed"] {
        assert!(text.contains(point), "missing {point:?}: {text}");
    }
    // A model that does not exist: a failure with the fix, exit code 1.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve")).args(["check", "--model", "/nonexistent/model"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("[FAIL] the model does not load") && text.contains("fix:"), "{text}");
}
