//! A request that panics inside the engine (through the test-only hook)
//! gets a 500 in its API's envelope, the cache entries it held are dropped,
//! and the same server answers the next request as before. In process, so
//! the hook can be reached; over real HTTP on 127.0.0.1 with the real model.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

use super::trace::TraceConfig;
use super::{ServerConfig, State};
use crate::engine::worker::{Engine, EngineConfig};

/// One HTTP/1.1 exchange (connection closed after): status and body.
fn exchange(addr: &str, method: &str, path: &str, body: &Value) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let b = body.to_string();
    let head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", b.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(b.as_bytes()).unwrap();
    let mut raw = vec![];
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn a_panicking_request_gets_a_500_and_the_engine_goes_on() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    assert!(model.join("config.json").exists(), "run `make model` first");
    let engine = Engine::start(EngineConfig {
        model: model.to_string_lossy().into_owned(),
        cache_bytes: 1 << 30,
        cache_dir: None,
        cache_disk: Default::default(),
        queue: 8,
        prefill_chunk: 512,
        parallel: 4,
        kv_bits: None,
        context_override: None,
        pipeline: None,
    })
    .unwrap();
    let name = engine.info.name.clone();
    let trace = TraceConfig { dir: None, bodies: false, max_file_bytes: 1 << 20, redact: vec![] };
    let state = State::new(engine, ServerConfig { api_key: None, max_body_bytes: 1 << 20, trace, aliases: vec![], strict_model: false, limits: Default::default() });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = rt.block_on(super::bind("127.0.0.1:0".parse().unwrap())).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(super::serve(listener, state.clone(), async {
        let _ = stop_rx.await;
    }));

    let chat = json!({"model": name, "max_tokens": 8, "messages": [
        {"role": "system", "content": "You are a helpful assistant who answers briefly."},
        {"role": "user", "content": "Name a colour."}]});
    let (status, body) = exchange(&addr, "POST", "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{body}");
    let first = json_of(&body)["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!first.is_empty());
    let stats = |addr: &str| json_of(&exchange(addr, "GET", "/v1/cache/stats", &json!({})).1);
    assert_eq!(stats(&addr)["entries"], 1, "the first request's snapshot is kept");

    // The same request again finds that snapshot (shared, pinned while in
    // use), and panics after its first token.
    state.engine.inject_panic_in_next_job();
    let (status, body) = exchange(&addr, "POST", "/v1/chat/completions", &chat);
    assert_eq!(status, 500, "{body}");
    let e = json_of(&body);
    assert_eq!(e["error"]["type"], "server_error", "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("internal error") && message.contains("injected fault"), "{message}");
    assert_eq!(stats(&addr)["entries"], 0, "the entry the failed request held is dropped");

    // The engine serves the next request, with the same answer.
    let (status, body) = exchange(&addr, "POST", "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{body}");
    let again = json_of(&body);
    assert_eq!(again["choices"][0]["message"]["content"].as_str().unwrap(), first);
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{again}");

    // Anthropic, streamed: the failure is an error event in its envelope.
    let msg = json!({"model": name, "max_tokens": 8, "stream": true, "messages": [{"role": "user", "content": "Name a fruit."}]});
    state.engine.inject_panic_in_next_job();
    let (status, body) = exchange(&addr, "POST", "/v1/messages", &msg);
    assert_eq!(status, 200, "a stream has begun before the failure: {body}");
    assert!(body.contains("event: error") && body.contains("\"api_error\"") && body.contains("injected fault"), "{body}");
    let (status, body) = exchange(&addr, "POST", "/v1/messages", &json!({"model": name, "max_tokens": 8, "messages": [{"role": "user", "content": "Name a fruit."}]}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["type"], "message");
    // Not streamed: a 500 in Anthropic's envelope.
    state.engine.inject_panic_in_next_job();
    let (status, body) = exchange(&addr, "POST", "/v1/messages", &json!({"model": name, "max_tokens": 8, "messages": [{"role": "user", "content": "Name a tree."}]}));
    assert_eq!(status, 500, "{body}");
    let e = json_of(&body);
    assert_eq!((e["type"].as_str(), e["error"]["type"].as_str()), (Some("error"), Some("api_error")), "{e}");

    let (status, body) = exchange(&addr, "GET", "/health", &json!({}));
    assert_eq!(status, 200, "{body}");
    assert!(state.engine.is_alive());
    let _ = stop_tx.send(());
    rt.block_on(server).unwrap();
    // The shutdown message is counted in and out like any other (it was
    // taken off without being counted in, and the depth wrapped).
    assert_eq!(state.engine.queue_depth(), 0);
}
