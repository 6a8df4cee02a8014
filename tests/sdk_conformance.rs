//! The official Python SDKs (openai, anthropic; installed by `make venv`)
//! against the real server and the real SmolLM2: streaming and not, with
//! and without tools, count_tokens, errors (tests/reference/sdk_conformance.py).

mod common;

#[test]
fn official_sdks_parse_every_response() {
    let dir = common::smollm2_dir();
    let server = common::Server::start(&["--model", dir.to_str().unwrap()]);
    let stdout = common::run_reference_script(
        "sdk_conformance.py",
        &[format!("http://{}", server.addr), "SmolLM2-135M-Instruct".into()],
        "all SDK checks passed",
    );
    assert!(stdout.matches("ok: ").count() >= 20, "{stdout}");
}
