//! Proxy mode against a real OpenAI-compatible upstream (kvserve itself in
//! plain mode on another port), with the official anthropic SDK as client
//! (tests/reference/proxy_check.py): text, tool results, usage, upstream
//! errors, an upstream that is down, OpenAI passthrough.

mod common;

use common::Server;

#[test]
fn proxy_translates_to_a_real_upstream() {
    let model = common::smollm2_dir();
    let upstream = Server::start(&["--model", model.to_str().unwrap()]);
    let proxy = Server::start(&["--proxy", &format!("http://{}", upstream.addr)]);
    // A port nobody listens on.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = Server::start(&["--proxy", &format!("http://127.0.0.1:{dead_port}"), "--upstream-timeout", "5"]);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/reference/proxy_check.py"))
        .arg(format!("http://{}", proxy.addr))
        .arg(format!("http://{}", dead.addr))
        .arg("SmolLM2-135M-Instruct")
        .output()
        .expect("run the proxy checks (make venv)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "proxy checks failed");
    assert!(stdout.contains("all proxy checks passed"));
}
