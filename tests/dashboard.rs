//! The live dashboard (`GET /`) in a real browser: the server runs the real
//! model with an API key; a few requests are made (one of them warm, one
//! refused); headless Chromium (Debian's, driven by playwright-core from
//! `make browser`) opens the page, is refused with a wrong key, gives the
//! right one, and the DOM after the page's script ran must show those
//! requests with the prompt / read / computed numbers the API answered with,
//! and never a request body or the key. A screenshot goes to
//! `target/dashboard.png`.

mod common;

use common::{request_raw, Server};
use serde_json::{json, Value};

const KEY: &str = "dash-key-8421";
/// Written into every prompt: must never reach the dashboard.
const SECRET: &str = "PURPLE-ELEPHANT-4242";

fn authed(addr: &str, method: &str, path: &str, body: &Value) -> common::Reply {
    let text = if body.is_null() { String::new() } else { body.to_string() };
    request_raw(addr, method, path, &[("x-api-key", KEY), ("content-type", "application/json")], text.as_bytes())
}

/// prompt = input + cache creation + cache read, and the read part.
fn usage(reply: &Value) -> (u64, u64) {
    let u = &reply["usage"];
    let read = u["cache_read_input_tokens"].as_u64().unwrap();
    (u["input_tokens"].as_u64().unwrap() + u["cache_creation_input_tokens"].as_u64().unwrap() + read, read)
}

#[test]
fn the_dashboard_shows_real_requests_in_a_real_browser() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let node_script = root.join("tests/browser/dashboard.mjs");
    assert!(
        root.join("tools/browser/node_modules/playwright-core").is_dir() && std::path::Path::new("/usr/bin/chromium").exists(),
        "Chromium and playwright-core are missing: run `make browser`"
    );
    let traces = std::env::temp_dir().join(format!("kvserve-dash-traces-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&traces);
    let model = common::smollm2_dir();
    let snapshots = traces.join("snapshots");
    let s = Server::start(&["--model", model.to_str().unwrap(), "--api-key", KEY, "--trace-dir", traces.join("t").to_str().unwrap(), "--cache-dir", snapshots.to_str().unwrap()]);

    // The page itself is open (it holds no data); its data is not.
    let page = request_raw(&s.addr, "GET", "/", &[], b"");
    assert_eq!(page.status, 200);
    assert!(page.headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("text/html")));
    assert!(page.headers.iter().any(|(k, v)| k == "content-security-policy" && v.contains("default-src 'none'") && v.contains("connect-src 'self'")));
    let addresses = page.body.replace("\"http://www.w3.org/2000/svg\"", "");
    assert!(!addresses.contains("http://") && !addresses.contains("https://"), "the page names no address but the SVG namespace");
    let refused = request_raw(&s.addr, "GET", "/v1/requests/recent", &[], b"");
    assert_eq!(refused.status, 401, "{}", refused.body);

    // A cold request, the same conversation's next turn (warm), an OpenAI
    // request, and one refused for its max_tokens.
    let system = format!("You are a helpful assistant for a team that writes Rust. The code word is {SECRET}. Answer briefly and precisely. ").repeat(6);
    let turn1 = json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "system": system,
        "messages": [{"role": "user", "content": "What is a borrow checker?"}]});
    let a = authed(&s.addr, "POST", "/v1/messages", &turn1);
    assert_eq!(a.status, 200, "{}", a.body);
    let a = a.json();
    let answer = a["content"][0]["text"].as_str().unwrap().to_string();
    let turn2 = json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "system": system,
        "messages": [{"role": "user", "content": "What is a borrow checker?"}, {"role": "assistant", "content": answer},
                     {"role": "user", "content": "And a lifetime?"}]});
    let b = authed(&s.addr, "POST", "/v1/messages", &turn2);
    assert_eq!(b.status, 200, "{}", b.body);
    let b = b.json();
    let (pa, ra) = usage(&a);
    let (pb, rb) = usage(&b);
    assert_eq!(ra, 0, "{a}");
    assert!(rb * 2 >= pb, "turn 2 is warm: {rb} of {pb} read");
    let c = authed(&s.addr, "POST", "/v1/chat/completions", &json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 4,
        "messages": [{"role": "user", "content": format!("Say {SECRET} back.")}]}));
    assert_eq!(c.status, 200, "{}", c.body);
    let c = c.json();
    let pc = c["usage"]["prompt_tokens"].as_u64().unwrap();
    let rc = c["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
    let bad = authed(&s.addr, "POST", "/v1/messages", &json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 0,
        "messages": [{"role": "user", "content": SECRET}]}));
    assert_eq!(bad.status, 400, "{}", bad.body);

    // The JSON the page polls: the same numbers, no bodies, no key. The
    // snapshots reach the disk while the server is idle.
    let t0 = std::time::Instant::now();
    let recent = loop {
        let r = authed(&s.addr, "GET", "/v1/requests/recent", &Value::Null);
        let c = &r.json()["cache"];
        if c["disk_busy"] == false && c["on_disk"].as_u64() >= Some(1) || t0.elapsed().as_secs() > 20 {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(recent.status, 200, "{}", recent.body);
    assert!(!recent.body.contains(SECRET) && !recent.body.contains(KEY), "{}", recent.body);
    let d = recent.json();
    let reqs = d["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 4, "{d}");
    assert_eq!((reqs[0]["prompt_tokens"].as_u64(), reqs[0]["cache_read_tokens"].as_u64()), (Some(pa), Some(0)));
    assert_eq!((reqs[1]["prompt_tokens"].as_u64(), reqs[1]["cache_read_tokens"].as_u64()), (Some(pb), Some(rb)));
    assert_eq!(reqs[1]["computed_tokens"].as_u64(), Some(pb - rb));
    assert_eq!((reqs[2]["api"].as_str(), reqs[2]["prompt_tokens"].as_u64()), (Some("openai"), Some(pc)));
    assert_eq!((reqs[3]["status"].as_u64(), reqs[3]["reason"].as_str()), (Some(400), Some("invalid_request_error (max_tokens)")));
    let t = &d["totals"];
    assert_eq!((t["requests"].as_u64(), t["answered"].as_u64(), t["failed"].as_u64()), (Some(4), Some(3), Some(1)));
    assert_eq!(t["prompt_tokens"].as_u64(), Some(pa + pb + pc));
    assert_eq!(t["cache_read_tokens"].as_u64(), Some(rb + rc));
    assert_eq!(d["server"]["model"], "SmolLM2-135M-Instruct");
    let entries = d["cache"]["entries"].as_u64().unwrap();
    assert!(entries >= 1, "{d}");
    assert_eq!(d["cache"]["on_disk"].as_u64(), Some(entries), "every snapshot was written: {d}");
    let files = std::fs::read_dir(&snapshots).unwrap().flatten().filter(|e| e.path().is_dir() || e.path().extension().is_some()).count();
    assert!(files >= 1, "no snapshot files in {}", snapshots.display());
    assert!(d["cache"]["bytes"].as_u64().unwrap() > 0 && d["cache"]["budget_bytes"].as_u64().unwrap() > 0, "{d}");

    // The browser.
    let shot = root.join("target/dashboard.png");
    let out = std::process::Command::new("node")
        .arg(&node_script)
        .args([&format!("http://{}/", s.addr), KEY, shot.to_str().unwrap(), "4"])
        .output()
        .expect("run node");
    assert!(out.status.success(), "the browser run failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let dom: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(dom["keyform_first"], true, "the page asked for the key");
    assert_eq!(dom["wrong_key_message"], "That key was refused.");
    assert_eq!(dom["keyform_visible"], false);
    assert_eq!(dom["external_requests"], json!([]), "the page reached beyond the server");
    let rows = dom["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{dom}");
    // Newest first: the refused one, the OpenAI one, the warm turn, the cold one.
    let n = |x: u64| kvserve::engine::request::grouped(x as usize);
    let cells = |i: usize| -> Vec<String> { rows[i]["cells"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect() };
    let (warm, cold, openai, refused) = (cells(2), cells(3), cells(1), cells(0));
    assert_eq!(warm[1..5], ["anthropic".to_string(), n(pb), n(rb), n(pb - rb)], "{dom}");
    assert_eq!(rows[2]["read_class"], "warm");
    assert_eq!(rows[2]["data"]["prompt"], pb.to_string());
    assert_eq!(rows[2]["data"]["read"], rb.to_string());
    let finish = match b["stop_reason"].as_str() {
        Some("max_tokens") => "length",
        Some("end_turn") => "eos",
        other => panic!("stop_reason {other:?}"),
    };
    assert_eq!(warm[7], finish);
    assert!(warm[5].ends_with(" s") && warm[5] != "- s", "{warm:?}");
    assert_eq!(cold[1..5], ["anthropic".to_string(), n(pa), "0".to_string(), n(pa)], "{dom}");
    assert_eq!(rows[3]["read_class"], "cold");
    assert_eq!(openai[1..3], ["openai".to_string(), n(pc)]);
    assert_eq!(refused[1], "anthropic");
    assert_eq!(refused[7], "400 invalid_request_error (max_tokens)");
    let text = &dom["text"];
    assert_eq!(text["model"], "SmolLM2-135M-Instruct");
    assert_eq!(text["requests"], "4");
    assert_eq!(text["requests-sub"], "3 answered, 1 failed");
    let rate = 100.0 * (rb + rc) as f64 / (pa + pb + pc) as f64;
    assert_eq!(text["hitrate"], format!("{rate:.1}%"));
    assert_eq!(text["hitrate-sub"], format!("{} of {} prompt tokens read from the cache", n(rb + rc), n(pa + pb + pc)));
    assert!(text["backend"].as_str().unwrap().starts_with("MLX on the"), "{text}");
    assert_eq!(text["queue"], "0 waiting");
    assert_eq!(text["entries"], format!("{entries} snapshot{}", if entries == 1 { "" } else { "s" }));
    assert!(text["entries-sub"].as_str().unwrap().starts_with(&format!("{entries} on disk;")), "{text}");
    let points = dom["chart_points"].as_array().unwrap();
    assert_eq!(points.len(), 3, "one point per answered request: {dom}");
    assert_eq!(points.iter().filter(|p| *p == "warm").count(), 1 + usize::from(rc * 2 >= pc));
    let html = dom["html"].as_str().unwrap();
    assert!(!html.contains(SECRET) && !html.contains(KEY), "a body or the key reached the page");
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    eprintln!("dashboard rows: {}\ncards: {text}\nscreenshot: {}", serde_json::to_string(&dom["rows"]).unwrap(), shot.display());

    // The records the page showed are the trace file's records.
    s.stop();
    let records = kvserve::server::trace::read_all(&traces.join("t")).unwrap();
    assert_eq!(records.len(), 4);
    for (r, shown) in records.iter().zip(reqs) {
        for k in ["time", "prompt_tokens", "cache_read_tokens", "status", "ttft_s"] {
            assert_eq!(r[k], shown[k], "{k}: trace {r} vs dashboard {shown}");
        }
    }
    let _ = std::fs::remove_dir_all(&traces);
}
