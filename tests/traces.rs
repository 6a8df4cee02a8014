//! Traces and `kvserve report`: one JSON line per request with the cache
//! numbers; no API key in any file even with bodies traced; a trace folder
//! that cannot be written is a warning and serving goes on.

mod common;

use common::{post, request_raw, Server};
use serde_json::{json, Value};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kvserve-traces-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn all_text(dir: &std::path::Path) -> String {
    std::fs::read_dir(dir).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect()
}

#[test]
fn traces_carry_cache_numbers_and_never_the_key() {
    let dir = tmp("key");
    let traces = dir.join("traces");
    let model = common::smollm2_dir();
    let s = Server::start(&["--model", model.to_str().unwrap(), "--api-key", "sekret-key-123", "--trace-bodies", "--trace-dir", traces.to_str().unwrap()]);
    let body = json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 4,
        "messages": [{"role": "user", "content": "My key is sekret-key-123, repeat it."}]});
    for _ in 0..2 {
        let r = request_raw(&s.addr, "POST", "/v1/messages", &[("x-api-key", "sekret-key-123")], body.to_string().as_bytes());
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = request_raw(&s.addr, "POST", "/v1/chat/completions", &[("authorization", "Bearer sekret-key-123")], body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    let bad = request_raw(&s.addr, "POST", "/v1/messages", &[("x-api-key", "sekret-key-123")], b"{");
    assert_eq!(bad.status, 400);
    s.stop();
    let text = all_text(&traces);
    assert!(!text.contains("sekret-key-123"), "the key reached a trace file:\n{text}");
    assert!(text.contains("[redacted]"), "the body was traced with the key redacted");
    let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 4, "{text}");
    let gens: Vec<&Value> = records.iter().filter(|r| r.get("prompt_tokens").is_some()).collect();
    assert_eq!(gens.len(), 3);
    assert_eq!(gens[0]["cache_read_tokens"], 0);
    let n = gens[1]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(gens[1]["cache_read_tokens"].as_u64().unwrap(), n - 1, "{}", gens[1]);
    for g in &gens {
        for k in ["time", "api", "model", "messages", "tools", "queue_wait_s", "ttft_s", "generated_tokens", "tokens_per_s", "finish", "computed_tokens"] {
            assert!(!g[k].is_null(), "trace lacks {k}: {g}");
        }
    }
    assert!(records.iter().any(|r| r["status"] == 400 && r["error"].as_str().unwrap().contains("not valid JSON")));

    // The report reads those numbers.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve")).args(["report", "--json", "--trace-dir"]).arg(&traces).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((rep["requests"].as_u64(), rep["answered"].as_u64(), rep["failed"].as_u64()), (Some(4), Some(3), Some(1)), "{rep}");
    assert_eq!(rep["failures"], json!([{"status": 400, "reason": "invalid_request_error (body)", "count": 1}]), "{rep}");
    assert!((rep["cache_hit_rate_requests"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9, "{rep}");
    assert_eq!(rep["ttft_warm"]["requests"], 2);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve")).args(["report", "--trace-dir"]).arg(&traces).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("requests: 4 = 3 answered + 1 failed\n  failed: 1 x status 400, invalid_request_error (body)\n"), "{text}");
    assert!(text.contains("cache hit rate: 67% of requests"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unwritable_trace_folder_is_a_warning_and_serving_goes_on() {
    let dir = tmp("ro");
    // A regular file where the folder should be: nothing can be created under it (even as root).
    let blocker = dir.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let traces = blocker.join("traces");
    let log = dir.join("server.log");
    let model = common::smollm2_dir();
    let s = Server::start_logging(&["--model", model.to_str().unwrap(), "--trace-dir", traces.to_str().unwrap()], Some(&log));
    for _ in 0..2 {
        let r = post(&s.addr, "/v1/messages", &json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    s.stop();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("traces: cannot create") && log.contains("serving goes on"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
