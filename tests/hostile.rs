//! Hostile traffic against real servers on loopback: requests to made-up
//! paths must not grow `/metrics`; a proxied stream must survive any cut of
//! the upstream's bytes and say when the upstream misbehaves; slow,
//! oversized, never-reading and flooding clients get bounded answers.
//! Each test prints a row of the table the issue asks for (run with
//! `--nocapture` to see them): what was sent, what came back, the server's
//! memory before and after.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{FakeUpstream, Pieces, Server};
use serde_json::{json, Value};

fn row(sent: &str, back: &str, rss: (u64, u64)) {
    eprintln!("| {sent} | {back} | {:.0} MB -> {:.0} MB |", rss.0 as f64 / 1024.0, rss.1 as f64 / 1024.0);
}

fn smollm2() -> String {
    common::smollm2_dir().to_string_lossy().into_owned()
}

/// Write `head` on a new connection and read what comes back until the
/// server closes it or `wait` passes.
fn raw(addr: &str, bytes: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = vec![];
    let mut buf = [0u8; 65536];
    let t0 = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (out, true),
            Err(_) => return (out, false),
        }
        if t0.elapsed() > wait {
            return (out, false);
        }
    }
}

fn status_of(reply: &[u8]) -> u16 {
    String::from_utf8_lossy(reply).split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// The sum of one metric's samples whose labels contain `labels`.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[test]
fn made_up_paths_do_not_grow_the_metrics() {
    let server = Server::start(&["--model", &smollm2(), "--api-key", "sekret"]);
    let before_rss = common::rss_kib(server.child.id());
    // One of each first (404, 401, 200), so the series exist.
    common::request_raw(&server.addr, "GET", "/warm-up", &[("x-api-key", "sekret")], b"");
    common::get(&server.addr, "/warm-up");
    common::request_raw(&server.addr, "GET", "/v1/models", &[("x-api-key", "sekret")], b"");
    common::get(&server.addr, "/metrics");
    let before = common::get(&server.addr, "/metrics").body;
    // 3000 made-up paths, pipelined on a few connections; without the key
    // (401) and with it (404), GET and POST.
    let n = 3000;
    let per_conn = 500;
    let mut answered = 0;
    for c in 0..n / per_conn {
        let mut req = Vec::new();
        for i in 0..per_conn {
            let k = c * per_conn + i;
            let key = if k % 2 == 0 { "x-api-key: sekret\r\n" } else { "" };
            let method = if k % 3 == 0 { "POST" } else { "GET" };
            let last = if i + 1 == per_conn { "connection: close\r\n" } else { "" };
            req.extend_from_slice(format!("{method} /random/{k:x}/{} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n{key}{last}\r\n", k * 7919).as_bytes());
        }
        let (reply, closed) = raw(&server.addr, &req, Duration::from_secs(60));
        assert!(closed, "the server answered every pipelined request and closed");
        let text = String::from_utf8_lossy(&reply);
        answered += text.matches("HTTP/1.1 404").count() + text.matches("HTTP/1.1 401").count();
    }
    assert_eq!(answered, n);
    let after = common::get(&server.addr, "/metrics").body;
    let after_rss = common::rss_kib(server.child.id());
    // Counts grew, labels did not: the same lines, a few digits longer.
    assert_eq!(before.lines().count(), after.lines().count(), "no new series:\n{after}");
    assert!(after.len() < before.len() + 200, "metrics grew from {} to {} bytes", before.len(), after.len());
    assert!(!after.contains("/random/"), "a made-up path became a label");
    assert_eq!(metric(&after, "kvserve_requests_total", "route=\"other\"") - metric(&before, "kvserve_requests_total", "route=\"other\""), n as f64);
    let unauthorized = |m: &str| metric(m, "kvserve_requests_total", "status=\"401\"");
    assert_eq!(unauthorized(&after) - unauthorized(&before), (n / 2) as f64, "requests without the key are counted, under 401");
    assert_eq!(metric(&after, "kvserve_requests_total", "route=\"/v1/models\""), 1.0);
    row(
        &format!("{n} requests to made-up paths (half without the key)"),
        &format!("404/401 each; /metrics {} -> {} bytes", before.len(), after.len()),
        (before_rss, after_rss),
    );
}

/// What the scripted upstream sends for each scenario the request names.
fn upstream_script(body: &str) -> Pieces {
    let ms = |n| Duration::from_millis(n);
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n".to_vec();
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).to_string()
    };
    let hi = format!("data: {}\n\n", chunk(json!({"role": "assistant", "content": "Hi"}), Value::Null));
    let mut pieces: Pieces = vec![(ms(0), head)];
    if body.contains("\"stream\":false") {
        let c = json!({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).to_string();
        return vec![(ms(0), format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{c}", c.len()).into_bytes())];
    }
    if body.contains("scenario:split") {
        // CRLF line ends, a keep-alive comment, a multi-line data field, and
        // the bytes cut inside characters.
        let first = chunk(json!({"role": "assistant", "content": "東京は日本の首都です。"}), Value::Null);
        let stream = format!(
            ": keep-alive\r\n\r\ndata: {first}\r\n\r\ndata: {{\"choices\": [{{\"index\": 0,\r\ndata: \"delta\": {{\"content\": \"🗼\"}}, \"finish_reason\": null}}]}}\r\n\r\ndata: {}\r\n\r\ndata: {}\r\n\r\ndata: [DONE]\r\n\r\n",
            chunk(json!({}), json!("stop")),
            json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}),
        );
        let bytes = stream.into_bytes();
        // Cut after the first byte of 東, inside 京 and inside 🗼.
        let first_mb = bytes.iter().position(|&b| b >= 0x80).unwrap();
        let tower = bytes.windows(4).position(|w| w == "🗼".as_bytes()).unwrap();
        let cuts = [first_mb + 1, first_mb + 4, tower + 2, bytes.len()];
        let mut prev = 0;
        for c in cuts {
            pieces.push((ms(40), bytes[prev..c].to_vec()));
            prev = c;
        }
    } else if body.contains("scenario:badjson") {
        pieces.push((ms(0), hi.into_bytes()));
        pieces.push((ms(40), b"data: {\"choices\": oops}\n\n".to_vec()));
        pieces.push((ms(40), b"data: [DONE]\n\n".to_vec()));
    } else if body.contains("scenario:cut") {
        pieces.push((ms(0), hi.into_bytes()));
        pieces.push((ms(40), b"data: {\"choices\": [{\"delta\":".to_vec()));
    } else if body.contains("scenario:unfinished") {
        pieces.push((ms(0), hi.into_bytes()));
    }
    pieces
}

fn through_proxy(proxy: &str, scenario: &str) -> Vec<(String, Value)> {
    let body = json!({"model": "m", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": format!("scenario:{scenario}")}]});
    let reply = common::post(proxy, "/v1/messages", &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.events().into_iter().map(|(e, d)| (e, serde_json::from_str(&d).unwrap_or(Value::Null))).collect()
}

fn text_of(events: &[(String, Value)]) -> String {
    events.iter().filter(|(e, _)| e == "content_block_delta").filter_map(|(_, d)| d["delta"]["text"].as_str()).collect()
}

fn error_of(events: &[(String, Value)]) -> Option<String> {
    events.iter().find(|(e, _)| e == "error").map(|(_, d)| d["error"]["message"].as_str().unwrap_or("").to_string())
}

#[test]
fn the_proxy_keeps_characters_that_the_upstream_split() {
    let upstream = FakeUpstream::start(upstream_script);
    let proxy = Server::start(&["--proxy", &format!("http://{}", upstream.addr)]);
    let ev = through_proxy(&proxy.addr, "split");
    assert_eq!(text_of(&ev), "東京は日本の首都です。🗼");
    assert_eq!(error_of(&ev), None);
    assert_eq!(ev.last().map(|(e, _)| e.as_str()), Some("message_stop"));
    let delta = ev.iter().find(|(e, _)| e == "message_delta").unwrap();
    assert_eq!(delta.1["usage"]["output_tokens"], 3);
    row("proxied stream: characters cut across 4 writes, CRLF, comment, 2-line data", "text intact, 1 message_stop", (0, 0));
}

#[test]
fn the_proxy_says_when_the_upstream_misbehaves() {
    let upstream = FakeUpstream::start(upstream_script);
    let proxy = Server::start(&["--proxy", &format!("http://{}", upstream.addr)]);
    for (scenario, says) in [("badjson", "not JSON"), ("cut", "mid-answer"), ("unfinished", "before the answer finished")] {
        let ev = through_proxy(&proxy.addr, scenario);
        assert_eq!(text_of(&ev), "Hi", "{scenario}: what came before arrived");
        let err = error_of(&ev).unwrap_or_else(|| panic!("{scenario}: no error event in {ev:?}"));
        assert!(err.contains(says), "{scenario}: {err}");
        if scenario == "badjson" {
            assert!(err.contains("oops"), "the bad event is named: {err}");
        }
        assert!(!ev.iter().any(|(e, _)| e == "message_stop"), "{scenario}: an error is not a finished message");
        row(&format!("proxied stream, upstream {scenario}"), &format!("error event: {err}"), (0, 0));
    }
}

#[test]
fn slow_clients_do_not_hold_the_server() {
    let server = Server::start(&["--model", &smollm2(), "--header-timeout", "2"]);
    let pid = server.child.id();
    let before = common::rss_kib(pid);
    // Half a request head each, then silence.
    let n = 300;
    let mut slow: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(&server.addr).unwrap();
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-").unwrap();
            s
        })
        .collect();
    let t0 = Instant::now();
    let r = common::post(&server.addr, "/v1/chat/completions", &json!({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}));
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(took < Duration::from_secs(20), "a normal request waited {took:?} behind slow clients");
    let during = common::rss_kib(pid);
    // Past the header timeout every slow connection is closed by the server.
    std::thread::sleep(Duration::from_secs(3));
    let mut closed = 0;
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![];
        match s.read_to_end(&mut buf) {
            Ok(_) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(_) => {}
        }
    }
    assert_eq!(closed, n, "connections still open past --header-timeout");
    let after = common::rss_kib(pid);
    assert!(during < before + 200 * 1024, "{n} slow connections took {} MB", (during - before) / 1024);
    row(
        &format!("{n} connections with half a header, then a normal request"),
        &format!("normal request 200 in {:.2} s; all {n} closed after --header-timeout 2", took.as_secs_f64()),
        (before, after),
    );
}

#[test]
fn oversized_and_malformed_requests_are_refused_early() {
    let server = Server::start(&["--model", &smollm2(), "--max-body", "64K"]);
    let pid = server.child.id();
    let before = common::rss_kib(pid);
    // A declared 10 GB body: refused from the head, without waiting for the body.
    let t0 = Instant::now();
    let (r, closed) = raw(
        &server.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10000000000\r\n\r\n{\"mod",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&r), 413, "{}", String::from_utf8_lossy(&r));
    assert!(closed, "the connection is closed, the rest unread");
    assert!(String::from_utf8_lossy(&r).contains("65536 bytes"), "the limit is named");
    row("POST with content-length 10 GB, 5 bytes sent", &format!("413 in {:.2} s, connection closed", t0.elapsed().as_secs_f64()), (before, common::rss_kib(pid)));
    // A chunked body with no length that passes the limit, and never ends.
    let mut req = b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        req.extend_from_slice(format!("1000\r\n{}\r\n", "x".repeat(4096)).as_bytes());
    }
    let (r, closed) = raw(&server.addr, &req, Duration::from_secs(10));
    assert_eq!(status_of(&r), 413, "{}", String::from_utf8_lossy(&r));
    assert!(closed);
    assert!(String::from_utf8_lossy(&r).contains("\"type\":\"request_too_large\""), "Anthropic's error shape: {}", String::from_utf8_lossy(&r));
    row("chunked POST, 80 KB of chunks, no end (limit 64K)", "413 (Anthropic shape), connection closed", (before, common::rss_kib(pid)));
    // Too many headers.
    let mut req = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..200 {
        req.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let (r, _) = raw(&server.addr, &req, Duration::from_secs(10));
    assert_eq!(status_of(&r), 431, "{}", String::from_utf8_lossy(&r));
    row("GET with 200 headers", "431", (before, common::rss_kib(pid)));
    // A long URL that hyper takes (up to 64K): 404, the path shortened in the message.
    let long = format!("/{}", "a".repeat(20_000));
    let r = common::get(&server.addr, &long);
    assert_eq!(r.status, 404);
    assert!(r.body.len() < 1000, "the 404 echoes {} bytes", r.body.len());
    assert!(r.body.contains("20001 bytes"), "{}", r.body);
    // One that does not fit it.
    let huge = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(1 << 20));
    let (r, closed) = raw(&server.addr, huge.as_bytes(), Duration::from_secs(10));
    let s = status_of(&r);
    assert!(s == 414 || s == 431, "a 1 MB URL: {}", String::from_utf8_lossy(&r));
    assert!(closed);
    let after = common::rss_kib(pid);
    row("GET with a 20 KB URL; with a 1 MB URL", &format!("404 with a {}-byte message; {s}", r.len()), (before, after));
    // Still serving.
    assert_eq!(common::get(&server.addr, "/health").status, 200);
}

/// A tiny random model with SmolLM2's tokenizer: it talks noise, long and fast.
fn noisy_model() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kvserve-hostile-noise-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixtures().join("tiny/qwen3_moe_vocab49152").join(f), dir.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(common::smollm2_dir().join(f), dir.join(f)).unwrap();
    }
    dir
}

#[test]
fn a_client_that_never_reads_is_cut_after_the_stall_timeout() {
    let model = noisy_model();
    let server = Server::start(&["--model", model.to_str().unwrap(), "--stall-timeout", "3", "--context", "40000"]);
    let pid = server.child.id();
    // The model's speed, from a request read in full.
    let t0 = Instant::now();
    let r = common::post(&server.addr, "/v1/chat/completions", &json!({"model": "m", "max_tokens": 400, "temperature": 1.0, "messages": [{"role": "user", "content": "Talk."}]}));
    let made = r.json()["usage"]["completion_tokens"].as_u64().unwrap();
    let speed = made as f64 / t0.elapsed().as_secs_f64();
    let before = common::rss_kib(pid);
    // A small receive buffer, so the kernel's buffers fill after a few KB.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&server.addr.parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    let mut s: TcpStream = sock.into();
    let max_tokens = 30_000;
    let body = json!({"model": "m", "max_tokens": max_tokens, "stream": true, "temperature": 1.0, "messages": [{"role": "user", "content": "Talk."}]}).to_string();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    // Never read. The engine stops once the connection is cut.
    let t0 = Instant::now();
    let mut peak = before;
    let recent = loop {
        std::thread::sleep(Duration::from_millis(500));
        peak = peak.max(common::rss_kib(pid));
        let r = common::get(&server.addr, "/v1/requests/recent").json();
        let req = r["requests"].as_array().and_then(|a| a.iter().find(|q| q["stream"] == true).cloned());
        if r["running"] == 0 && req.is_some() {
            break req.unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "the stalled stream was not cut: {r}");
    };
    let took = t0.elapsed();
    let why = recent["error"].as_str().unwrap_or("").to_string();
    assert!(why.contains("stopped reading"), "{recent}");
    // All of max_tokens would take this long at the speed measured above.
    let full = max_tokens as f64 / speed;
    assert!(took.as_secs_f64() < full / 2.0, "cut after {took:?}; the whole answer takes {full:.0} s at {speed:.0} tokens/s");
    drop(s);
    let after = common::rss_kib(pid);
    assert!(peak < before + 300 * 1024, "a stalled stream took {} MB", (peak - before) / 1024);
    row(
        &format!("streamed request (max_tokens {max_tokens}), client never reads, --stall-timeout 3"),
        &format!("cut after {:.1} s (all of it: {full:.0} s at {speed:.0} tok/s): {why}", took.as_secs_f64()),
        (before, after),
    );
}

#[test]
fn a_flood_beyond_the_queue_is_told_to_retry() {
    let server = Server::start(&["--model", &smollm2(), "--parallel", "1", "--queue", "2"]);
    let pid = server.child.id();
    let before = common::rss_kib(pid);
    let addr = server.addr.clone();
    let n = 40;
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let (path, body) = if i % 2 == 0 {
                    ("/v1/chat/completions", json!({"model": "m", "max_tokens": 24, "messages": [{"role": "user", "content": format!("Count to {i}.")}]}))
                } else {
                    ("/v1/messages", json!({"model": "m", "max_tokens": 24, "messages": [{"role": "user", "content": format!("Count to {i}.")}]}))
                };
                let r = common::post(&addr, path, &body);
                let retry = r.headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.clone());
                (path, r.status, retry)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.1 == 200).count();
    let busy: Vec<_> = results.iter().filter(|r| r.1 != 200).collect();
    assert!(ok >= 1 && !busy.is_empty(), "{results:?}");
    for (path, status, retry) in &busy {
        let want = if *path == "/v1/messages" { 529 } else { 429 };
        assert_eq!(*status, want, "{path}: {results:?}");
        assert_eq!(retry.as_deref(), Some("2"), "Retry-After on {status}");
    }
    let after = common::rss_kib(pid);
    assert!(after < before + 300 * 1024, "memory grew by {} MB", (after - before) / 1024);
    // The server is still up and answers.
    assert_eq!(common::get(&server.addr, "/health").status, 200);
    row(
        &format!("{n} requests at once, --parallel 1 --queue 2"),
        &format!("{ok} answered 200, {} refused 429/529 with Retry-After: 2", busy.len()),
        (before, after),
    );
}

#[test]
fn listening_beyond_loopback_without_a_key_warns_loudly() {
    let log = std::env::temp_dir().join(format!("kvserve-hostile-open-{}.log", std::process::id()));
    let server = Server::start_logging(&["--model", &smollm2(), "--host", "0.0.0.0"], Some(&log));
    server.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("WARNING: listening on 0.0.0.0") && text.contains("--api-key"), "{text}");
    let server = Server::start_logging(&["--model", &smollm2(), "--host", "0.0.0.0", "--api-key", "k"], Some(&log));
    server.stop();
    assert!(!std::fs::read_to_string(&log).unwrap().contains("WARNING"), "no warning with a key");
    let proxy = Server::start_logging(&["--proxy", "http://127.0.0.1:9", "--host", "0.0.0.0"], Some(&log));
    proxy.stop();
    assert!(std::fs::read_to_string(&log).unwrap().contains("WARNING: listening on 0.0.0.0"), "the proxy warns too");
    row("serve --host 0.0.0.0 without --api-key", "WARNING on stderr at start (none with a key)", (0, 0));
}

#[test]
fn the_proxy_requires_the_key_it_is_given() {
    let upstream = FakeUpstream::start(upstream_script);
    let proxy = Server::start(&["--proxy", &format!("http://{}", upstream.addr), "--api-key", "k"]);
    let body = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "scenario:split"}]});
    let r = common::post(&proxy.addr, "/v1/messages", &body);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = common::request_raw(&proxy.addr, "POST", "/v1/messages", &[("x-api-key", "k"), ("content-type", "application/json")], body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["content"][0]["text"], "Hi");
}
