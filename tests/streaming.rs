//! Text streams as it is decoded: a model that answers only whitespace
//! (tests/reference/whitespace_model.py: every token is " " or "\n") gives
//! one delta per generated token on both APIs, not one at the end.

mod common;

use common::Server;
use serde_json::{json, Value};

#[test]
fn whitespace_streams_one_delta_per_token() {
    let model = common::fixtures().join("whitespace");
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let n = 24;
    let messages = json!([{"role": "user", "content": "Say nothing."}]);

    let r = common::post(
        &server.addr,
        "/v1/chat/completions",
        &json!({"model": "m", "max_tokens": n, "stream": true, "temperature": 0, "stream_options": {"include_usage": true}, "messages": messages}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let chunks: Vec<Value> = r.events().into_iter().filter(|(_, d)| d != "[DONE]").map(|(_, d)| serde_json::from_str(&d).unwrap()).collect();
    let deltas: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).filter(|t| !t.is_empty()).collect();
    let usage = chunks.iter().find(|c| c["usage"].is_object()).map(|c| c["usage"].clone()).unwrap();
    assert_eq!(usage["completion_tokens"], n, "{usage}");
    assert!(deltas.iter().all(|d| d.chars().all(char::is_whitespace)), "{deltas:?}");
    assert_eq!(deltas.len(), n, "one delta per token: {deltas:?}");

    let r = common::post(&server.addr, "/v1/messages", &json!({"model": "m", "max_tokens": n, "stream": true, "temperature": 0, "messages": messages}));
    assert_eq!(r.status, 200, "{}", r.body);
    let events: Vec<Value> = r.events().into_iter().map(|(_, d)| serde_json::from_str(&d).unwrap()).collect();
    let deltas: Vec<&str> = events.iter().filter(|e| e["type"] == "content_block_delta").filter_map(|e| e["delta"]["text"].as_str()).collect();
    assert_eq!(deltas.len(), n, "{deltas:?}");
    let end = events.iter().find(|e| e["type"] == "message_delta").unwrap();
    assert_eq!(end["usage"]["output_tokens"], n);
    assert_eq!(end["delta"]["stop_reason"], "max_tokens");
}
