//! Proxy mode against a real OpenAI-compatible upstream (kvserve itself in
//! plain mode on another port), with the official anthropic SDK as client
//! (tests/reference/proxy_check.py): text, tool results, usage, upstream
//! errors, an upstream that is down, OpenAI passthrough.

mod common;

use common::Server;

#[test]
fn proxy_translates_to_a_real_upstream() {
    let model = common::smollm2_dir();
    // Strict, so that an unknown name gets the upstream's 404 through the proxy.
    let upstream = Server::start(&["--model", model.to_str().unwrap(), "--strict-model"]);
    let proxy = Server::start(&["--proxy", &format!("http://{}", upstream.addr)]);
    // A port nobody listens on.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = Server::start(&["--proxy", &format!("http://127.0.0.1:{dead_port}"), "--upstream-timeout", "5"]);
    common::run_reference_script(
        "proxy_check.py",
        &[format!("http://{}", proxy.addr), format!("http://{}", dead.addr), "SmolLM2-135M-Instruct".into()],
        "all proxy checks passed",
    );
}
