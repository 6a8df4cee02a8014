//! Faults end to end, with the real binary and the real SmolLM2 on
//! 127.0.0.1: many clients at once (some hanging up mid-stream, some sending
//! malformed bodies) against a small queue, with the server's memory
//! measured; SIGKILL while snapshots are being written, then a restart over
//! damaged, truncated and foreign files; cache folders that are full or
//! read-only (tmpfs mounts: the tests run as root, where chmod does not stop
//! writes). Every wait is a poll with a deadline.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{parse_reply, Reply, Server};
use serde_json::{json, Value};

const MODEL: &str = "SmolLM2-135M-Instruct";
/// The longest silence a reply may have before the test fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// One test at a time: two cores, one model at a time, and memory and
/// timings are measured.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn model_args() -> Vec<String> {
    vec!["--model".into(), common::smollm2_dir().to_str().unwrap().into()]
}

fn start(extra: &[&str], log: Option<&Path>) -> Server {
    let mut args = model_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_logging(&args, log)
}

/// A fresh folder for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("kvserve-fault-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tmpfs mounted at a folder, unmounted when dropped (drop the server first).
struct Tmpfs(PathBuf);

fn mount(args: &[&str], what: &str) {
    let out = std::process::Command::new("mount").args(args).output().unwrap_or_else(|e| panic!("{what}: cannot run mount: {e}"));
    assert!(
        out.status.success(),
        "{what}: `mount {}` failed ({}): {}; this test needs root and permission to mount tmpfs",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        mount(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.to_str().unwrap()], "mounting a tmpfs");
        Tmpfs(dir.to_path_buf())
    }

    /// `mount -o remount,OPTS`: `ro`, `rw`, `size=...`.
    fn remount(&self, opts: &str) {
        mount(&["-o", &format!("remount,{opts}"), self.0.to_str().unwrap()], "remounting a tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn connect(addr: &str) -> TcpStream {
    assert!(addr.starts_with("127.0.0.1:"), "tests talk to 127.0.0.1 only, not {addr}");
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(REPLY_TIMEOUT)).unwrap();
    s
}

fn write_request(s: &mut TcpStream, method: &str, path: &str, body: &[u8]) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // A server may answer (413) and close before reading all of a large body.
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
}

/// One request (Connection: close), the whole reply read; no read waits
/// longer than [`REPLY_TIMEOUT`]. An error if no reply came.
fn try_send(addr: &str, method: &str, path: &str, body: &[u8]) -> Result<Reply, String> {
    let mut s = connect(addr);
    write_request(&mut s, method, path, body);
    let mut raw = vec![];
    let read = s.read_to_end(&mut raw);
    if !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(format!("{method} {path}: no reply ({read:?})"));
    }
    Ok(parse_reply(&raw))
}

fn send(addr: &str, method: &str, path: &str, body: &[u8]) -> Reply {
    try_send(addr, method, path, body).unwrap_or_else(|e| panic!("{e}"))
}

fn post(addr: &str, path: &str, body: &Value) -> Reply {
    send(addr, "POST", path, body.to_string().as_bytes())
}

fn get(addr: &str, path: &str) -> Reply {
    send(addr, "GET", path, b"")
}

/// Send a streamed request, read its status and first event, and hang up.
/// Returns the status, and the whole reply if it was not a 200.
fn hang_up_after_first_event(addr: &str, path: &str, body: &[u8]) -> Result<(u16, Option<Reply>), String> {
    let mut s = connect(addr);
    write_request(&mut s, "POST", path, body);
    let mut raw = vec![];
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    loop {
        if t0.elapsed() > REPLY_TIMEOUT {
            return Err(format!("no first event in {REPLY_TIMEOUT:?}: {}", String::from_utf8_lossy(&raw)));
        }
        let n = s.read(&mut buf).map_err(|e| format!("reading the first event: {e}"))?;
        if n == 0 {
            return Err(format!("the reply ended before its first event: {}", String::from_utf8_lossy(&raw)));
        }
        raw.extend_from_slice(&buf[..n]);
        let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let status: u16 = String::from_utf8_lossy(&raw[..head_end]).split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if status != 200 {
            let _ = s.read_to_end(&mut raw);
            return Ok((status, Some(parse_reply(&raw))));
        }
        // An SSE event ends with a blank line (the chunked framing uses \r\n only).
        if raw[head_end + 4..].windows(2).any(|w| w == b"\n\n") {
            let _ = s.shutdown(Shutdown::Both);
            return Ok((200, None));
        }
    }
}

/// The server process's resident memory, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Poll `f` every 20 ms until it gives a value, failing after `limit`.
fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The engine has finished everything sent before: the queue is empty and a
/// request sent now completes (it runs after everything queued).
fn settle(addr: &str) {
    poll("an empty queue", Duration::from_secs(120), || (get(addr, "/health").json()["queue_depth"] == 0).then_some(()));
    let r = post(addr, "/v1/messages", &json!({"model": MODEL, "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}));
    assert_eq!(r.status, 200, "{}", r.body);
}

fn files_ending(dir: &Path, ending: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().ends_with(ending)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn warnings(log: &Path) -> Vec<String> {
    log_text(log).lines().filter(|l| l.contains("WARN")).map(str::to_string).collect()
}

// --- the two APIs -----------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::OpenAi => "/v1/chat/completions",
            Api::Anthropic => "/v1/messages",
        }
    }

    fn body(self, prompt: &str, max_tokens: u32, stream: bool) -> Value {
        let mut b = json!({"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]});
        if self == Api::OpenAi && stream {
            b["stream_options"] = json!({"include_usage": true});
        }
        b
    }

    /// A complete answer: 200, a stop reason and usage; a stream ends with
    /// its final event.
    fn check_complete(self, stream: bool, r: &Reply) -> Result<(), String> {
        if r.status != 200 {
            return Err(format!("status {}: {}", r.status, r.body));
        }
        let bad = |why: &str| Err(format!("{self:?} stream={stream}: {why}: {}", r.body));
        match (self, stream) {
            (Api::Anthropic, false) => {
                let v = r.json();
                let stop = v["stop_reason"].as_str().unwrap_or("");
                if v["type"] != "message" || !["end_turn", "max_tokens", "stop_sequence"].contains(&stop) {
                    return bad("no stop reason");
                }
                if v["usage"]["output_tokens"].as_u64().unwrap_or(0) == 0 || !v["content"][0]["text"].is_string() {
                    return bad("no usage or text");
                }
            }
            (Api::OpenAi, false) => {
                let v = r.json();
                let finish = v["choices"][0]["finish_reason"].as_str().unwrap_or("");
                if v["object"] != "chat.completion" || !["stop", "length"].contains(&finish) {
                    return bad("no finish reason");
                }
                if v["usage"]["completion_tokens"].as_u64().unwrap_or(0) == 0 || v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) == 0 {
                    return bad("no usage");
                }
            }
            (Api::Anthropic, true) => {
                let ev = r.events();
                if ev.first().map(|e| e.0.as_str()) != Some("message_start") || ev.last().map(|e| e.0.as_str()) != Some("message_stop") {
                    return bad("not message_start .. message_stop");
                }
                let delta = ev.iter().find(|e| e.0 == "message_delta").map(|e| serde_json::from_str::<Value>(&e.1).unwrap());
                let Some(delta) = delta else { return bad("no message_delta") };
                if !delta["delta"]["stop_reason"].is_string() || delta["usage"]["output_tokens"].as_u64().unwrap_or(0) == 0 {
                    return bad("no stop reason or usage");
                }
            }
            (Api::OpenAi, true) => {
                let ev = r.events();
                if ev.last().map(|e| e.1.as_str()) != Some("[DONE]") {
                    return bad("does not end with [DONE]");
                }
                let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(&e.1).unwrap()).collect();
                if !chunks.iter().any(|c| ["stop", "length"].contains(&c["choices"][0]["finish_reason"].as_str().unwrap_or(""))) {
                    return bad("no finish reason");
                }
                if !chunks.iter().any(|c| c["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0) {
                    return bad("no usage");
                }
            }
        }
        Ok(())
    }

    /// An error reply with `status` in this API's envelope and error type.
    fn check_error(self, r: &Reply, status: u16) -> Result<(), String> {
        let v: Value = serde_json::from_str(&r.body).map_err(|e| format!("error body is not JSON ({e}): {}", r.body))?;
        let kind = match (self, status) {
            (Api::Anthropic, 529) => "overloaded_error",
            (Api::OpenAi, 429) => "rate_limit_error",
            (Api::Anthropic, 413) => "request_too_large",
            _ => "invalid_request_error",
        };
        let ok = r.status == status
            && match self {
                Api::Anthropic => v["type"] == "error" && v["error"]["type"] == kind && v["error"]["message"].is_string(),
                Api::OpenAi => {
                    v["error"]["type"] == kind && v["error"]["message"].is_string() && v["error"].get("param").is_some() && v["error"].get("code").is_some()
                }
            };
        if ok {
            Ok(())
        } else {
            Err(format!("{self:?}: expected {status} {kind}, got {}: {}", r.status, r.body))
        }
    }

    fn refused_status(self) -> u16 {
        match self {
            Api::OpenAi => 429,
            Api::Anthropic => 529,
        }
    }
}

// --- 1. load ----------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    Complete { stream: bool },
    Refused,
    HungUp,
    BadRequest,
    TooLarge,
}

const MAX_BODY: usize = 64 << 10;

/// The `i`th malformed body: (bytes, the status it must get).
fn malformed(i: usize) -> (Vec<u8>, u16) {
    match i % 4 {
        0 => (b"{\"model\": \"SmolLM2-135M-Instruct\", \"messages\": [".to_vec(), 400),
        1 => (json!({"model": MODEL, "max_tokens": "ten", "messages": "hello"}).to_string().into_bytes(), 400),
        2 => (vec![], 400),
        _ => (json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "x".repeat(MAX_BODY + 1000)}]}).to_string().into_bytes(), 413),
    }
}

/// Request number `i` (of any client): its kind cycles through whole,
/// streamed, hung-up and malformed requests, alternating the API every
/// cycle; returns what happened, or why it was wrong.
fn one_request(addr: &str, i: usize) -> Result<Outcome, String> {
    let api = if (i / 6) % 2 == 0 { Api::OpenAi } else { Api::Anthropic };
    let prompt = format!("Question {i}: name one color.");
    match i % 6 {
        kind @ 0..=3 => {
            let stream = kind >= 2;
            let reply = post(addr, api.path(), &api.body(&prompt, 8, stream));
            if reply.status == api.refused_status() {
                api.check_error(&reply, reply.status)?;
                return Ok(Outcome::Refused);
            }
            api.check_complete(stream, &reply)?;
            Ok(Outcome::Complete { stream })
        }
        4 => {
            let body = api.body(&prompt, 48, true).to_string();
            match hang_up_after_first_event(addr, api.path(), body.as_bytes())? {
                (200, _) => Ok(Outcome::HungUp),
                (status, Some(reply)) if status == api.refused_status() => {
                    api.check_error(&reply, status)?;
                    Ok(Outcome::Refused)
                }
                (status, reply) => Err(format!("{api:?} hang-up client: {status}: {:?}", reply.map(|r| r.body))),
            }
        }
        _ => {
            let (body, status) = malformed(i / 12);
            let reply = send(addr, "POST", api.path(), &body);
            api.check_error(&reply, status)?;
            Ok(if status == 400 { Outcome::BadRequest } else { Outcome::TooLarge })
        }
    }
}

/// Run `clients` threads of `per_client` requests each, numbered from
/// `first`; every outcome, or why it was wrong.
fn run_clients(addr: &str, clients: usize, per_client: usize, first: usize) -> Vec<Result<Outcome, String>> {
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let addr = addr.to_string();
            std::thread::spawn(move || (0..per_client).map(|r| one_request(&addr, first + c * per_client + r)).collect::<Vec<_>>())
        })
        .collect();
    handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect()
}

#[test]
fn many_clients_with_hang_ups_and_bad_bodies_get_answers_or_clean_refusals() {
    let _serial = serial();
    let t0 = Instant::now();
    let max_body = format!("{}K", MAX_BODY >> 10);
    let s = start(&["--queue", "8", "--max-body", &max_body, "--cache-bytes", "48M"], None);
    let pid = s.child.id();
    let (clients, per_client) = (12, 4);
    // Warm-up: one round of the same load (so first-use growth of the
    // allocator, the prompt cache up to its budget and the HTTP side is not counted).
    let warm = run_clients(&s.addr, clients, 2, 1200);
    let bad: Vec<&String> = warm.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(bad.is_empty(), "warm-up: {bad:#?}");
    settle(&s.addr);
    let rss_before = rss_kib(pid);

    let outcomes = run_clients(&s.addr, clients, per_client, 0);
    settle(&s.addr);
    let rss_after = rss_kib(pid);
    assert_eq!(get(&s.addr, "/health").status, 200);

    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| o.as_ref().is_ok_and(f)).count();
    let streamed = count(&|o| *o == Outcome::Complete { stream: true });
    let whole = count(&|o| *o == Outcome::Complete { stream: false });
    let refused = count(&|o| *o == Outcome::Refused);
    let hung_up = count(&|o| *o == Outcome::HungUp);
    let bad_request = count(&|o| *o == Outcome::BadRequest);
    let too_large = count(&|o| *o == Outcome::TooLarge);
    let growth = (rss_after as f64 - rss_before as f64) / rss_before as f64 * 100.0;
    println!(
        "fault load: {clients} clients x {per_client} requests = {}: 200 complete {} ({streamed} streamed, {whole} whole), \
         429/529 refused {refused}, hung up mid-stream {hung_up}, 400 malformed {bad_request}, 413 oversized {too_large}, wrong {}; \
         server RSS after warm-up {:.1} MiB, after the run {:.1} MiB ({growth:+.1}%); {:.0} s",
        outcomes.len(),
        streamed + whole,
        failures.len(),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        t0.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{} requests went wrong: {failures:#?}", failures.len());
    assert_eq!(outcomes.len(), clients * per_client);
    // Every kind of request was sent and some generation got through.
    assert!(streamed > 0 && whole > 0 && bad_request > 0 && too_large > 0, "too few kinds got through");
    assert!(rss_after as f64 <= rss_before as f64 * 1.10, "server RSS grew {growth:.1}% over the run ({rss_before} -> {rss_after} KiB)");
}

// --- 2. SIGKILL during snapshot writes, restart over damaged files ----------

/// Prompts of clearly different lengths (their snapshots are told apart by
/// token count) that share only the chat template's opening.
fn kill_prompts() -> Vec<String> {
    (0..8).map(|i| format!("Note {i}: {}Summarize the note.", "The harbor was busy with ships and sailors. ".repeat(2 + 3 * i))).collect()
}

/// A greedy answer: its text, prompt tokens in all, and those read from the cache.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    text: String,
    prompt_tokens: u64,
    cache_read: u64,
}

fn answer(addr: &str, prompt: &str) -> Answer {
    let r = post(addr, "/v1/messages", &Api::Anthropic.body(prompt, 8, false));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let u = &v["usage"];
    let n = |k: &str| u[k].as_u64().unwrap_or_else(|| panic!("usage.{k} missing: {v}"));
    Answer {
        text: v["content"][0]["text"].as_str().unwrap().to_string(),
        prompt_tokens: n("input_tokens") + n("cache_creation_input_tokens") + n("cache_read_input_tokens"),
        cache_read: n("cache_read_input_tokens"),
    }
}

/// Answers of a fresh server with no cache folder: the reference.
fn reference(prompts: &[String]) -> Vec<Answer> {
    let s = start(&[], None);
    let out = prompts.iter().map(|p| answer(&s.addr, p)).collect();
    s.stop();
    out
}

/// A safetensors file's header JSON and the offset of its data.
fn safetensors_header(bytes: &[u8]) -> (Value, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), 8 + n)
}

/// The number of token ids a snapshot file holds.
fn snapshot_tokens(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let (h, _) = safetensors_header(&bytes);
    serde_json::from_str::<Vec<u32>>(h["__metadata__"]["tokens"].as_str().unwrap()).unwrap().len()
}

/// Kill the server with SIGKILL; no flush, no goodbye.
fn sigkill(mut s: Server) {
    s.child.kill().unwrap();
    s.child.wait().unwrap();
}

/// Poll `cond` every 0.5 ms (a snapshot write takes a few ms) until it
/// holds or `limit` has passed; whether it held.
fn poll_fast(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    false
}

#[test]
fn sigkill_while_writing_snapshots_then_restart_over_damaged_files() {
    let _serial = serial();
    let t0 = Instant::now();
    let scratch = Scratch::new("kill");
    let dir = scratch.0.join("cache");
    let log = scratch.0.join("restart.log");
    let cache_arg = dir.to_str().unwrap().to_string();
    let prompts = kill_prompts();
    let want = reference(&prompts);

    // Round 1, graceful: prompts 0 and 1 are surely on disk after SIGTERM.
    let s = start(&["--cache-dir", &cache_arg], None);
    for p in &prompts[0..2] {
        answer(&s.addr, p);
    }
    s.stop();
    assert_eq!(files_ending(&dir, ".safetensors").len(), 2, "a clean stop writes every snapshot");

    // Round 2: two at once; SIGKILL the moment the first answer is back.
    let s = start(&["--cache-dir", &cache_arg], None);
    let (tx, rx) = std::sync::mpsc::channel();
    for p in &prompts[2..4] {
        let (addr, p, tx) = (s.addr.clone(), p.clone(), tx.clone());
        std::thread::spawn(move || {
            // The other request dies with the server: no reply at all.
            let r = try_send(&addr, "POST", "/v1/messages", Api::Anthropic.body(&p, 8, false).to_string().as_bytes());
            let _ = tx.send(r.map(|r| r.status));
        });
    }
    let first = rx.recv_timeout(REPLY_TIMEOUT).expect("a first answer");
    sigkill(s);
    assert_eq!(first, Ok(200));

    // Round 3: SIGKILL while the second snapshot file is being written
    // (the first is complete).
    let before = files_ending(&dir, ".safetensors").len();
    let s = start(&["--cache-dir", &cache_arg], None);
    answer(&s.addr, &prompts[4]);
    answer(&s.addr, &prompts[5]);
    let caught = poll_fast(Duration::from_secs(20), || files_ending(&dir, ".safetensors").len() > before && !files_ending(&dir, ".partial").is_empty());
    sigkill(s);
    assert!(caught, "the second snapshot write was not seen in progress");

    // Round 4: SIGKILL while the first snapshot file is being written; its
    // .partial file (unless the write beat the kill) stays for the restart.
    let s = start(&["--cache-dir", &cache_arg], None);
    answer(&s.addr, &prompts[6]);
    answer(&s.addr, &prompts[7]);
    let caught = poll_fast(Duration::from_secs(20), || !files_ending(&dir, ".partial").is_empty());
    sigkill(s);
    assert!(caught, "no snapshot write was seen in progress");

    // What the kills left: complete files (written under a temporary name,
    // then renamed) and perhaps .partial leftovers.
    let survivors = files_ending(&dir, ".safetensors");
    let leftovers = files_ending(&dir, ".partial");
    // Plant damaged files beside them.
    let real = std::fs::read(&survivors[0]).unwrap();
    let (mut header, data_at) = safetensors_header(&real);
    let plant = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    plant("truncated-copy.safetensors", &real[..real.len() / 2]);
    plant("zero-length.safetensors", &[]);
    plant("random-bytes.safetensors", &(0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect::<Vec<_>>());
    header["__metadata__"]["fingerprint"] = json!("0".repeat(64));
    let h = header.to_string().into_bytes();
    let mut foreign = (h.len() as u64).to_le_bytes().to_vec();
    foreign.extend(&h);
    foreign.extend(&real[data_at..]);
    plant("foreign-model.safetensors", &foreign);
    plant("stale-write.partial", &real[..real.len() / 3]);
    let planted = ["truncated-copy.safetensors", "zero-length.safetensors", "random-bytes.safetensors", "foreign-model.safetensors", "stale-write.partial"];

    // Restart over all of it.
    let s = start(&["--cache-dir", &cache_arg], Some(&log));
    assert_eq!(get(&s.addr, "/health").status, 200);
    let warns = warnings(&log);
    for name in planted.iter().map(|n| n.to_string()).chain(leftovers.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned())) {
        assert!(warns.iter().any(|w| w.contains(&name)), "no warning names {name}: {warns:#?}");
    }
    // Only the server's own complete files are in the index.
    let stats = get(&s.addr, "/v1/cache/stats").json();
    assert_eq!(stats["entries"].as_u64(), Some(survivors.len() as u64), "{stats}");
    // Which prompt each surviving snapshot belongs to: it holds the
    // prompt's tokens and at most 9 more (the answer and its end).
    let held: Vec<u64> = survivors.iter().map(|p| snapshot_tokens(p) as u64).collect();
    let on_disk = |a: &Answer| held.iter().filter(|&&t| t >= a.prompt_tokens && t <= a.prompt_tokens + 9).count();
    assert!(want.iter().all(|w| on_disk(w) <= 1), "prompt lengths too close to tell snapshots apart: {held:?}");
    assert_eq!(want.iter().map(on_disk).sum::<usize>(), survivors.len(), "snapshots of no prompt: {held:?}");
    assert!(on_disk(&want[0]) == 1 && on_disk(&want[1]) == 1, "the cleanly stopped round's snapshots are gone");
    // What one prompt shares with another: the chat template's opening.
    let shared = want[1].cache_read;
    assert!(shared > 0 && shared < want[0].prompt_tokens / 2, "shared opening {shared}");
    let mut read_from_disk = 0;
    for (i, (p, w)) in prompts.iter().zip(&want).enumerate() {
        let g = answer(&s.addr, p);
        assert_eq!(g.text, w.text, "prompt {i}: the answer after the restart differs");
        assert_eq!(g.prompt_tokens, w.prompt_tokens, "prompt {i}");
        if on_disk(w) == 1 {
            // The whole prompt but its last token comes from its snapshot on disk.
            assert_eq!(g.cache_read, w.prompt_tokens - 1, "prompt {i} has a snapshot on disk: {g:?}");
            read_from_disk += 1;
        } else {
            assert_eq!(g.cache_read, shared, "prompt {i} has no snapshot on disk: {g:?}");
        }
    }
    assert_eq!(get(&s.addr, "/health").status, 200);
    s.stop();
    println!(
        "fault kill: 3 SIGKILLs (two while a snapshot file was being written), {} snapshots survived of 8 prompts, {} .partial leftovers at restart; 5 planted bad files and the leftovers warned about; \
         {read_from_disk} prompts read from disk after the restart, all 8 answers equal a fresh server's; {:.0} s",
        survivors.len(),
        leftovers.len(),
        t0.elapsed().as_secs_f64()
    );
}

// --- 3. full and read-only cache folders -------------------------------------

/// Prompts whose snapshots are told apart by length (as in the kill test).
fn short_prompts() -> Vec<String> {
    (0..3).map(|i| format!("Item {i}: {}Which is it?", "A list of tools in the shed. ".repeat(2 + 3 * i))).collect()
}

/// Poll until `dir` holds a snapshot of `a`'s prompt (see the kill test).
fn wait_for_snapshot_of(dir: &Path, a: &Answer) -> PathBuf {
    poll("a snapshot of the prompt on disk", Duration::from_secs(30), || {
        files_ending(dir, ".safetensors").into_iter().find(|f| {
            let t = snapshot_tokens(f) as u64;
            t >= a.prompt_tokens && t <= a.prompt_tokens + 9
        })
    })
}

#[test]
fn a_full_cache_folder_only_warns_and_later_writes_work() {
    let _serial = serial();
    let scratch = Scratch::new("full");
    let prompts = short_prompts();
    let want = reference(&prompts);
    let dir = scratch.0.join("tmpfs");
    let log = scratch.0.join("server.log");
    // 256 KiB: room for the start-up check, not for a snapshot (megabytes).
    let fs = Tmpfs::mount(&dir, "256k");
    let s = start(&["--cache-dir", dir.to_str().unwrap()], Some(&log));
    assert_eq!(answer(&s.addr, &prompts[0]).text, want[0].text, "on a full disk");
    let warn = poll("a warning about the full disk", Duration::from_secs(30), || {
        warnings(&log).into_iter().find(|w| w.contains("No space left on device"))
    });
    assert!(warn.contains("snapshot not written"), "{warn}");
    // The failed write left nothing behind (it is removed before the warning).
    assert!(files_ending(&dir, ".partial").is_empty() && files_ending(&dir, ".safetensors").is_empty(), "{:?}", std::fs::read_dir(&dir).unwrap().collect::<Vec<_>>());
    // Still serving, from the cache in memory too.
    let again = answer(&s.addr, &prompts[0]);
    assert_eq!((again.text.as_str(), again.cache_read), (want[0].text.as_str(), want[0].prompt_tokens - 1));
    assert_eq!(answer(&s.addr, &prompts[1]).text, want[1].text, "on a full disk");
    assert_eq!(get(&s.addr, "/health").status, 200);
    // Room again: the next snapshot is written.
    fs.remount("size=64m");
    assert_eq!(answer(&s.addr, &prompts[2]).text, want[2].text);
    wait_for_snapshot_of(&dir, &want[2]);
    // A clean stop waits for every write: none left a partial file.
    s.stop();
    assert!(files_ending(&dir, ".partial").is_empty(), "partial files left: {:?}", files_ending(&dir, ".partial"));
    drop(fs);
}

#[test]
fn a_cache_folder_turning_read_only_only_warns() {
    let _serial = serial();
    let scratch = Scratch::new("ro-later");
    let prompts = short_prompts();
    let want = reference(&prompts);
    let dir = scratch.0.join("tmpfs");
    let log = scratch.0.join("server.log");
    let fs = Tmpfs::mount(&dir, "64m");
    let s = start(&["--cache-dir", dir.to_str().unwrap()], Some(&log));
    assert_eq!(answer(&s.addr, &prompts[0]).text, want[0].text);
    wait_for_snapshot_of(&dir, &want[0]);
    fs.remount("ro");
    assert_eq!(answer(&s.addr, &prompts[1]).text, want[1].text);
    let warn = poll("a warning about the read-only disk", Duration::from_secs(30), || {
        warnings(&log).into_iter().find(|w| w.contains("Read-only file system"))
    });
    assert!(warn.contains("snapshot not written"), "{warn}");
    assert_eq!(get(&s.addr, "/health").status, 200);
    // Writable again: later snapshots are written.
    fs.remount("rw");
    assert_eq!(answer(&s.addr, &prompts[2]).text, want[2].text);
    wait_for_snapshot_of(&dir, &want[2]);
    s.stop();
    assert!(files_ending(&dir, ".partial").is_empty(), "partial files left: {:?}", files_ending(&dir, ".partial"));
    // After a restart the snapshots on disk serve their prompts.
    let s = start(&["--cache-dir", dir.to_str().unwrap()], None);
    for i in [0, 2] {
        let again = answer(&s.addr, &prompts[i]);
        assert_eq!((again.text.as_str(), again.cache_read), (want[i].text.as_str(), want[i].prompt_tokens - 1), "prompt {i}");
    }
    drop(s);
    drop(fs);
}

#[test]
fn a_read_only_cache_folder_at_start_serves_from_memory() {
    let _serial = serial();
    let scratch = Scratch::new("ro-start");
    let prompts = short_prompts();
    let want = reference(&prompts[..2]);
    let dir = scratch.0.join("tmpfs");
    let log = scratch.0.join("server.log");
    let fs = Tmpfs::mount(&dir, "1m");
    fs.remount("ro");
    let s = start(&["--cache-dir", dir.to_str().unwrap()], Some(&log));
    let dir_name = dir.to_string_lossy().into_owned();
    let warns = warnings(&log);
    assert!(warns.iter().any(|w| w.contains(&dir_name) && w.contains("Read-only file system")), "no warning about {dir_name}: {warns:#?}");
    for (p, w) in prompts[..2].iter().zip(&want) {
        assert_eq!(answer(&s.addr, p).text, w.text);
    }
    // The prompt cache still works, from memory.
    assert_eq!(answer(&s.addr, &prompts[0]).cache_read, want[0].prompt_tokens - 1);
    assert_eq!(get(&s.addr, "/health").status, 200);
    drop(s);
    drop(fs);
}
