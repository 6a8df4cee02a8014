//! The server over real HTTP with the real SmolLM2: every bad input answered
//! in the API's own envelope, auth, concurrency, queue limits, disconnects,
//! and the routes around generation.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{get, post, request_raw, Reply, Server};
use serde_json::{json, Value};

const MODEL: &str = "SmolLM2-135M-Instruct";

fn start(extra: &[&str]) -> Server {
    let dir = common::smollm2_dir();
    let mut args = vec!["--model", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn anthropic_ok() -> Value {
    json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
}

fn openai_ok() -> Value {
    json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v[key] = val;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

/// Checks status, envelope and message of an error reply.
fn assert_error(r: &Reply, anthropic: bool, status: u16, kind: &str, needle: &str, case: &str) {
    assert_eq!(r.status, status, "{case}: {}", r.body);
    let v = r.json();
    let message = if anthropic {
        assert_eq!(v["type"], "error", "{case}: {v}");
        assert_eq!(v["error"]["type"], kind, "{case}: {v}");
        v["error"]["message"].as_str().unwrap().to_string()
    } else {
        assert_eq!(v["error"]["type"], kind, "{case}: {v}");
        assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some(), "{case}: {v}");
        v["error"]["message"].as_str().unwrap().to_string()
    };
    assert!(message.contains(needle), "{case}: message {message:?} lacks {needle:?}");
}

#[test]
fn bad_inputs_get_clear_errors_in_each_apis_envelope() {
    let s = start(&["--max-body", "200K", "--strict-model"]);
    let long = "word ".repeat(9000);
    // (case, body, status, anthropic error type, openai error type, message part)
    let cases: Vec<(&str, Value, u16, &str, &str, &str)> = vec![
        ("missing messages", without(anthropic_ok(), "messages"), 400, "invalid_request_error", "invalid_request_error", "messages: field required"),
        ("empty messages", with(anthropic_ok(), "messages", json!([])), 400, "invalid_request_error", "invalid_request_error", "at least one message"),
        ("messages wrong type", with(anthropic_ok(), "messages", json!("hi")), 400, "invalid_request_error", "invalid_request_error", "messages: expected an array, got a string"),
        ("max_tokens wrong type", with(anthropic_ok(), "max_tokens", json!("ten")), 400, "invalid_request_error", "invalid_request_error", "max_tokens: expected an integer, got a string"),
        ("max_tokens zero", with(anthropic_ok(), "max_tokens", json!(0)), 400, "invalid_request_error", "invalid_request_error", "max_tokens: 0 is out of range"),
        ("max_tokens huge", with(anthropic_ok(), "max_tokens", json!(5_000_000)), 400, "invalid_request_error", "invalid_request_error", "between 1 and 1000000"),
        ("temperature out of range", with(anthropic_ok(), "temperature", json!(7)), 400, "invalid_request_error", "invalid_request_error", "temperature: 7 is out of range"),
        ("unknown model", with(anthropic_ok(), "model", json!("gpt-9")), 404, "not_found_error", "invalid_request_error", "model 'gpt-9' is not served here"),
        ("missing model", without(anthropic_ok(), "model"), 400, "invalid_request_error", "invalid_request_error", "model: field required"),
        ("bad role", with(anthropic_ok(), "messages", json!([{"role": "robot", "content": "x"}])), 400, "invalid_request_error", "invalid_request_error", "messages[0].role: 'robot' is not one of"),
        ("content wrong type", with(anthropic_ok(), "messages", json!([{"role": "user", "content": 5}])), 400, "invalid_request_error", "invalid_request_error", "messages[0].content: expected a string or an array"),
        ("prompt over context", with(anthropic_ok(), "messages", json!([{"role": "user", "content": long}])), 400, "invalid_request_error", "invalid_request_error", "model context is 8,192"),
    ];
    for (case, body, status, a_kind, o_kind, needle) in &cases {
        // OpenAI has no required max_tokens; its cases drop that one.
        let r = post(&s.addr, "/v1/messages", body);
        assert_error(&r, true, *status, a_kind, needle, case);
        if *case == "missing model" || !case.starts_with("max_tokens") || *case == "max_tokens zero" || *case == "max_tokens huge" {
            let r = post(&s.addr, "/v1/chat/completions", body);
            if *case == "bad role" {
                assert_error(&r, false, 400, o_kind, "messages[0].role: 'robot' is not one of system, developer", case);
            } else if *case == "content wrong type" {
                assert_error(&r, false, 400, o_kind, "messages[0].content: expected a string or an array of content parts", case);
            } else {
                assert_error(&r, false, *status, o_kind, needle, case);
            }
        }
    }
    // Anthropic needs max_tokens; OpenAI does not.
    let r = post(&s.addr, "/v1/messages", &without(anthropic_ok(), "max_tokens"));
    assert_error(&r, true, 400, "invalid_request_error", "max_tokens: field required", "anthropic without max_tokens");
    assert_eq!(post(&s.addr, "/v1/chat/completions", &without(openai_ok(), "max_tokens")).status, 200);
    // Byte-level problems.
    for (path, anthropic) in [("/v1/messages", true), ("/v1/chat/completions", false)] {
        let ct = [("content-type", "application/json")];
        let r = request_raw(&s.addr, "POST", path, &ct, b"{\"model\": ");
        assert_error(&r, anthropic, 400, "invalid_request_error", "not valid JSON", "malformed JSON");
        let r = request_raw(&s.addr, "POST", path, &ct, b"{\"model\": \"\xff\xfe\"}");
        assert_error(&r, anthropic, 400, "invalid_request_error", "not valid UTF-8", "invalid UTF-8");
        let r = request_raw(&s.addr, "POST", path, &ct, b"");
        assert_error(&r, anthropic, 400, "invalid_request_error", "body is empty", "empty body");
        let big = format!("{{\"model\": \"{}\"}}", "x".repeat(300_000));
        let r = request_raw(&s.addr, "POST", path, &ct, big.as_bytes());
        assert_error(&r, anthropic, 413, if anthropic { "request_too_large" } else { "invalid_request_error" }, "over the limit of 204800 bytes", "body too large");
        let r = post(&s.addr, path, &json!([1, 2]));
        assert_error(&r, anthropic, 400, "invalid_request_error", "expected a JSON object, got an array", "not an object");
    }
    let r = get(&s.addr, "/v1/nothing");
    assert_eq!(r.status, 404, "{}", r.body);
    // Still serving after all of that.
    let r = post(&s.addr, "/v1/messages", &anthropic_ok());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["type"], "message");
}

#[test]
fn routes_around_generation() {
    let s = start(&[]);
    let h = get(&s.addr, "/health");
    assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")));
    let m = get(&s.addr, "/v1/models").json();
    assert_eq!(m["data"][0]["id"], MODEL);
    // count_tokens is exact: it equals the prompt the generation reports.
    let body = json!({"model": MODEL, "max_tokens": 3, "system": "Be brief.", "messages": [{"role": "user", "content": "Name a color."}]});
    let n = post(&s.addr, "/v1/messages/count_tokens?beta=true", &without(body.clone(), "max_tokens")).json()["input_tokens"].as_u64().unwrap();
    let r = post(&s.addr, "/v1/messages?beta=true", &body).json();
    let u = &r["usage"];
    let total: u64 = ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"].iter().map(|k| u[k].as_u64().unwrap()).sum();
    assert_eq!(total, n, "{r}");
    assert!(n > 10);
    // Unknown fields and beta headers are ignored.
    let mut odd = body.clone();
    odd["context_management"] = json!({"edits": []});
    odd["output_config"] = json!({"effort": "low"});
    let r = request_raw(&s.addr, "POST", "/v1/messages", &[("content-type", "application/json"), ("anthropic-beta", "x,y"), ("anthropic-version", "2023-06-01")], odd.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    // The same prompt again is read from the cache, and the stats and metrics say so.
    let again = post(&s.addr, "/v1/messages", &body).json();
    assert_eq!(again["usage"]["cache_read_input_tokens"].as_u64().unwrap(), n - 1, "{again}");
    let stats = get(&s.addr, "/v1/cache/stats").json();
    assert!(stats["hits"].as_u64().unwrap() >= 1 && stats["entries"].as_u64().unwrap() >= 1, "{stats}");
    let metrics = get(&s.addr, "/metrics").body;
    for name in ["kvserve_requests_total", "kvserve_cached_tokens_total", "kvserve_time_to_first_token_seconds_bucket", "kvserve_cache_bytes", "kvserve_queue_depth"] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    let cleared = request_raw(&s.addr, "DELETE", "/v1/cache", &[], b"").json();
    assert!(cleared["removed"].as_u64().unwrap() >= 1, "{cleared}");
    assert_eq!(cleared["stats"]["entries"], 0);
    let cold = post(&s.addr, "/v1/messages", &body).json();
    assert_eq!(cold["usage"]["cache_read_input_tokens"], 0, "{cold}");
}

#[test]
fn any_model_name_is_answered_by_the_served_model_unless_strict() {
    let s = start(&["--alias", "claude-sonnet-4-5", "--alias", "local"]);
    let m = get(&s.addr, "/v1/models").json();
    let ids: Vec<&str> = m["data"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [MODEL, "claude-sonnet-4-5", "local"], "{m}");
    assert_eq!((m["first_id"].as_str(), m["last_id"].as_str()), (Some(MODEL), Some("local")));
    // Claude Code's side-call names, an alias, and nonsense: all answered, under the served name.
    for name in ["claude-haiku-4-5-20251001", "claude-sonnet-4-5", "gpt-9"] {
        let r = post(&s.addr, "/v1/messages", &with(anthropic_ok(), "model", json!(name)));
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        assert_eq!(r.json()["model"], MODEL, "{name}");
        let r = post(&s.addr, "/v1/chat/completions", &with(openai_ok(), "model", json!(name)));
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        assert_eq!(r.json()["model"], MODEL, "{name}");
        let r = post(&s.addr, "/v1/messages/count_tokens", &without(with(anthropic_ok(), "model", json!(name)), "max_tokens"));
        assert_eq!(r.status, 200, "{name}: {}", r.body);
    }
    let streamed = post(&s.addr, "/v1/messages", &with(with(anthropic_ok(), "model", json!("claude-opus-4-1")), "stream", json!(true)));
    let first = streamed.events().into_iter().find(|(e, _)| e == "message_start").unwrap();
    assert_eq!(serde_json::from_str::<Value>(&first.1).unwrap()["message"]["model"], MODEL);
    drop(s);

    // --strict-model: the model's names and the aliases only.
    let s = start(&["--alias", "local", "--strict-model"]);
    assert_eq!(post(&s.addr, "/v1/messages", &with(anthropic_ok(), "model", json!("local"))).status, 200);
    let path = common::smollm2_dir();
    assert_eq!(post(&s.addr, "/v1/messages", &with(anthropic_ok(), "model", json!(path.to_str().unwrap()))).status, 200);
    let r = post(&s.addr, "/v1/messages", &with(anthropic_ok(), "model", json!("claude-haiku-4-5")));
    assert_error(&r, true, 404, "not_found_error", &format!("model 'claude-haiku-4-5' is not served here; this server serves '{MODEL}', 'local'"), "strict");
    let r = post(&s.addr, "/v1/chat/completions", &with(openai_ok(), "model", json!("gpt-9")));
    assert_error(&r, false, 404, "invalid_request_error", "(--strict-model is on)", "strict openai");
}

#[test]
fn api_key_is_required_when_set() {
    let s = start(&["--api-key", "sekret"]);
    let body = openai_ok().to_string();
    let r = request_raw(&s.addr, "POST", "/v1/chat/completions", &[("content-type", "application/json")], body.as_bytes());
    assert_error(&r, false, 401, "invalid_request_error", "invalid API key", "no key");
    let r = request_raw(&s.addr, "POST", "/v1/messages", &[("x-api-key", "wrong")], anthropic_ok().to_string().as_bytes());
    assert_error(&r, true, 401, "authentication_error", "invalid API key", "wrong key");
    let r = request_raw(&s.addr, "POST", "/v1/chat/completions", &[("authorization", "Bearer sekret")], body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request_raw(&s.addr, "POST", "/v1/messages", &[("x-api-key", "sekret")], anthropic_ok().to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(&s.addr, "/health").status, 200, "health needs no key");
}

fn stream_text(addr: &str, question: &str) -> String {
    let body = json!({"model": MODEL, "max_tokens": 8, "stream": true, "messages": [{"role": "user", "content": question}]});
    let r = post(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let mut text = String::new();
    for (_, data) in r.events() {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        text += v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
    }
    text
}

#[test]
fn concurrent_streams_equal_their_solo_runs() {
    let s = start(&[]);
    let questions: Vec<String> = (0..8).map(|i| format!("Give me fact number {i} about the sea.")).collect();
    let solo: Vec<String> = questions.iter().map(|q| stream_text(&s.addr, q)).collect();
    request_raw(&s.addr, "DELETE", "/v1/cache", &[], b"");
    let handles: Vec<_> = questions
        .iter()
        .cloned()
        .map(|q| {
            let addr = s.addr.clone();
            std::thread::spawn(move || stream_text(&addr, &q))
        })
        .collect();
    let together: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(together, solo);
    assert!(solo.iter().all(|t| !t.is_empty()));
}

#[test]
fn a_full_queue_is_refused_and_a_departed_client_frees_the_engine() {
    // One request computed at a time, one more waiting: a third is refused.
    let s = start(&["--parallel", "1", "--queue", "1"]);
    let long = |i: usize| json!({"model": MODEL, "max_tokens": 400, "stream": true, "messages": [{"role": "user", "content": format!("Write a long story number {i}.")}]});
    // Client A streams, reads the first delta, and hangs up.
    let mut a = std::net::TcpStream::connect(&s.addr).unwrap();
    let body = long(0).to_string();
    write!(a, "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("text_delta") {
        let n = a.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    // While A generates, B fills the queue and C is refused with Anthropic's 529.
    let addr = s.addr.clone();
    let b = std::thread::spawn(move || post(&addr, "/v1/messages", &json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})));
    std::thread::sleep(Duration::from_millis(300));
    let c = post(&s.addr, "/v1/messages", &long(2));
    assert_error(&c, true, 529, "overloaded_error", "requests are already waiting", "queue full");
    let c = post(&s.addr, "/v1/chat/completions", &long(3));
    assert_error(&c, false, 429, "rate_limit_error", "requests are already waiting", "queue full (OpenAI)");
    // A leaves: its generation stops and B runs promptly (A alone would need ~400 tokens).
    let t0 = Instant::now();
    drop(a);
    let b = b.join().unwrap();
    assert_eq!(b.status, 200, "{}", b.body);
    let waited = t0.elapsed().as_secs_f64();
    assert!(waited < 15.0, "B waited {waited:.1}s after A left");
    let metrics = get(&s.addr, "/metrics").body;
    let generated: f64 = metrics
        .lines()
        .find(|l| l.starts_with("kvserve_generated_tokens_total"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(generated < 150.0, "A kept generating after it left: {generated} tokens");
}

/// The answer to `messages` (greedy) and how many prompt tokens were read from the cache.
fn answer(addr: &str, messages: Value) -> (String, u64) {
    let r = post(addr, "/v1/messages", &json!({"model": MODEL, "max_tokens": 24, "messages": messages}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    (v["content"][0]["text"].as_str().unwrap_or("").to_string(), v["usage"]["cache_read_input_tokens"].as_u64().unwrap())
}

#[test]
fn answers_from_the_cache_equal_answers_without_it() {
    let s = start(&[]);
    let sys = "You are a careful assistant. ".repeat(20);
    let conv = |q: &str| json!([{"role": "user", "content": format!("{sys}\n{q}")}]);
    let other = |q: &str| json!([{"role": "user", "content": q}]);
    // Each asked first on an empty cache (the reference), then after other
    // requests left snapshots that share some prefix with it.
    let cases = [conv("What is 2+2?"), conv("Name a fruit."), other("Write one line about the sea."), conv("What is 2+2? Explain.")];
    let mut fresh = vec![];
    for c in &cases {
        request_raw(&s.addr, "DELETE", "/v1/cache", &[], b"");
        fresh.push(answer(&s.addr, c.clone()).0);
    }
    request_raw(&s.addr, "DELETE", "/v1/cache", &[], b"");
    let mut read_total = 0;
    for (c, want) in cases.iter().zip(&fresh).rev() {
        let (got, read) = answer(&s.addr, c.clone());
        read_total += read;
        assert_eq!(&got, want, "with {read} tokens from the cache for {c}");
    }
    // The shared system text was served from the cache along the way.
    assert!(read_total > 100, "only {read_total} tokens read from the cache");
    // Asked again: almost all from the cache, same answer.
    for (c, want) in cases.iter().zip(&fresh) {
        assert_eq!(&answer(&s.addr, c.clone()).0, want);
    }
}

/// The answer of a request, whole or streamed, in either API: (text, finish reason).
fn reply_text(addr: &str, anthropic: bool, stream: bool, extra: &Value, question: &str, max_tokens: u64) -> (String, String) {
    let mut body = json!({"model": MODEL, "max_tokens": max_tokens, "stream": stream, "messages": [{"role": "user", "content": question}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let path = if anthropic { "/v1/messages" } else { "/v1/chat/completions" };
    let r = post(addr, path, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    if !stream {
        let v = r.json();
        return if anthropic {
            (v["content"][0]["text"].as_str().unwrap_or("").to_string(), v["stop_reason"].as_str().unwrap().to_string())
        } else {
            let c = &v["choices"][0];
            (c["message"]["content"].as_str().unwrap_or("").to_string(), c["finish_reason"].as_str().unwrap().to_string())
        };
    }
    let (mut text, mut finish) = (String::new(), String::new());
    for (_, data) in r.events() {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        assert_ne!(v["type"], "error", "{v}");
        if anthropic {
            text += v["delta"]["text"].as_str().unwrap_or("");
            if let Some(s) = v["delta"]["stop_reason"].as_str() {
                finish = s.to_string();
            }
        } else {
            text += v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if let Some(s) = v["choices"][0]["finish_reason"].as_str() {
                finish = s.to_string();
            }
        }
    }
    (text, finish)
}

/// The reported crash: a Chinese answer and any stop string stopped the
/// engine for good (the stop scanner sliced inside a character). Now each
/// stop cuts the answer exactly before its first occurrence, in both APIs,
/// streamed and whole, and the server goes on.
#[test]
fn stop_strings_over_a_chinese_answer() {
    let s = start(&[]);
    let ask = "Translate into Chinese: Good morning, how are you today? The weather is nice.";
    let (full, _) = reply_text(&s.addr, false, false, &json!({}), ask, 40);
    assert!(full.chars().filter(|c| *c as u32 >= 0x2E80).count() >= 3, "the answer should be Chinese: {full:?}");
    // A stop string that never occurs (the reported request), then stops
    // taken from the answer: one CJK character, two, and one with ASCII.
    let chars: Vec<char> = full.chars().collect();
    let cjk = chars.iter().position(|c| *c as u32 >= 0x2E80).unwrap();
    let mut stops = vec!["xyz".to_string(), chars[cjk + 1..cjk + 3].iter().collect::<String>()];
    if let Some(i) = (cjk + 2..chars.len()).find(|&i| chars[i] as u32 >= 0x2E80) {
        stops.push(chars[i].to_string());
    }
    stops.push(chars[chars.len() - 3..].iter().collect());
    for stop in &stops {
        let expected = match full.find(stop.as_str()) {
            Some(i) => (full[..i].to_string(), true),
            None => (full.clone(), false),
        };
        for (anthropic, stream) in [(false, false), (false, true), (true, false), (true, true)] {
            let key = if anthropic { "stop_sequences" } else { "stop" };
            let (text, finish) = reply_text(&s.addr, anthropic, stream, &json!({key: [stop]}), ask, 40);
            let case = format!("stop {stop:?}, anthropic {anthropic}, stream {stream}");
            assert_eq!(text, expected.0, "{case}");
            if expected.1 {
                assert_eq!(finish, if anthropic { "stop_sequence" } else { "stop" }, "{case}");
            }
        }
    }
    assert_eq!(get(&s.addr, "/health").status, 200);
    assert_eq!(reply_text(&s.addr, false, false, &json!({}), ask, 40).0, full, "the engine goes on, unchanged");
}

#[test]
fn stop_string_limits_in_both_apis() {
    let s = start(&[]);
    let many: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let long = "x".repeat(257);
    for (anthropic, key) in [(true, "stop_sequences"), (false, "stop")] {
        let path = if anthropic { "/v1/messages" } else { "/v1/chat/completions" };
        let r = post(&s.addr, path, &with(anthropic_ok(), key, json!(many)));
        assert_error(&r, anthropic, 400, "invalid_request_error", &format!("{key}: 17 sequences given; at most 16"), key);
        let r = post(&s.addr, path, &with(anthropic_ok(), key, json!(["ok", long])));
        assert_error(&r, anthropic, 400, "invalid_request_error", &format!("{key}[1]: 257 bytes; at most 256"), key);
        if !anthropic {
            assert_eq!(r.json()["error"]["param"], "stop[1]");
        }
        let r = post(&s.addr, path, &with(anthropic_ok(), key, json!(many[..16])));
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

/// Sampling without a seed draws a fresh one per request (the same request
/// gives different answers); with a seed, the answer repeats.
#[test]
fn sampling_without_a_seed_differs_and_with_one_repeats() {
    let s = start(&[]);
    let ask = "Write one sentence about a dog.";
    let sampled = json!({"temperature": 1.0});
    for anthropic in [false, true] {
        let runs: Vec<String> = (0..3).map(|_| reply_text(&s.addr, anthropic, false, &sampled, ask, 24).0).collect();
        assert!(runs.iter().any(|r| r != &runs[0]), "anthropic {anthropic}: three unseeded samples were identical: {runs:?}");
    }
    let seeded = json!({"temperature": 1.0, "seed": 1234});
    let a = reply_text(&s.addr, false, false, &seeded, ask, 24).0;
    let b = reply_text(&s.addr, false, false, &seeded, ask, 24).0;
    assert_eq!(a, b);
}
