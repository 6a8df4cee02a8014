//! The official Python SDKs (openai, anthropic; installed by `make venv`)
//! against the real server and the real SmolLM2: streaming and not, with
//! and without tools, count_tokens, errors (tests/reference/sdk_conformance.py).

mod common;

#[test]
fn official_sdks_parse_every_response() {
    let dir = common::smollm2_dir();
    let server = common::Server::start(&["--model", dir.to_str().unwrap()]);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/reference/sdk_conformance.py"))
        .arg(format!("http://{}", server.addr))
        .arg("SmolLM2-135M-Instruct")
        .output()
        .expect("run the SDK checks (make venv)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK checks failed");
    assert!(stdout.contains("all SDK checks passed"));
    assert!(stdout.matches("ok: ").count() >= 20, "{stdout}");
}
