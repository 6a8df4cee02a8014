//! A Claude Code-shaped session on a hybrid model (qwen3_5: gated delta-net
//! layers whose recurrent state cannot be trimmed back) through the real
//! server: a tiny random qwen3_5 built by mlx-lm's classes with SmolLM2's
//! vocabulary, served with SmolLM2's tokenizer and template. Five turns with
//! a ~1.5K-token system prompt, tools and cache_control breakpoints; from
//! turn 2 on at least 90% of each prompt is read from exact snapshots, and
//! every answer equals the one a server without a prompt cache gives. After
//! a restart with --cache-dir, a new session reads its system prompt from
//! the snapshot files.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{post, Server};
use serde_json::{json, Value};

/// The tiny hybrid's weights beside SmolLM2's tokenizer files.
fn model_dir() -> PathBuf {
    let src = common::fixtures().join("tiny/qwen3_5_vocab49152");
    let dir = std::env::temp_dir().join(format!("kvserve-hybrid-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "model.safetensors.index.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
    }
    let smol = common::smollm2_dir();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(smol.join(f), dir.join(f)).unwrap();
    }
    dir
}

fn system_prompt() -> (String, String) {
    let topics = ["files", "tests", "git", "shell commands", "the user's code", "errors"];
    let mut a = String::from("You are an interactive coding agent that helps with software engineering tasks.\n");
    for i in 0..50 {
        a += &format!("Rule {i}: when the task involves {}, keep changes small and say what you did in one line.\n", topics[i % topics.len()]);
    }
    let b = "# Tone\nBe concise. Use the tools to read before you write.\n".repeat(6);
    (a, b)
}

fn request(session: &str, turn: usize, history: &[Value]) -> Value {
    let (a, b) = system_prompt();
    json!({
        "model": "tiny-qwen3_5",
        "max_tokens": 12,
        "temperature": 0,
        "stream": true,
        "system": [
            {"type": "text", "text": format!("x-anthropic-billing-header: cc_version=2.1.328; cc_entrypoint=cli; cch={session}{turn:04x};")},
            {"type": "text", "text": a, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": b, "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [
            {"name": "Read", "description": "Read a file.", "input_schema": {"type": "object",
                "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}},
            {"name": "Bash", "description": "Run a shell command.", "input_schema": {"type": "object",
                "properties": {"command": {"type": "string"}}, "required": ["command"]}},
        ],
        "messages": history,
    })
}

/// One streamed turn: (usage, answer text, seconds).
fn turn(addr: &str, body: &Value) -> (Value, String, f64) {
    let t0 = Instant::now();
    let r = post(addr, "/v1/messages", body);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.events();
    let delta: Value = serde_json::from_str(&events.iter().find(|e| e.0 == "message_delta").expect("a message_delta").1).unwrap();
    let mut text = String::new();
    for (name, data) in &events {
        if name == "content_block_delta" {
            let d: Value = serde_json::from_str(data).unwrap();
            text += d["delta"]["text"].as_str().unwrap_or("");
        }
    }
    (delta["usage"].clone(), text, secs)
}

fn n(u: &Value, k: &str) -> u64 {
    u[k].as_u64().unwrap_or_else(|| panic!("usage lacks {k}: {u}"))
}

fn snapshot_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "safetensors")).count())
}

#[test]
fn hybrid_session_reads_exact_snapshots_and_answers_as_without_the_cache() {
    let model = model_dir();
    let cache_dir = std::env::temp_dir().join(format!("kvserve-hybrid-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache_dir);
    let args = ["--model", model.to_str().unwrap(), "--cache-dir", cache_dir.to_str().unwrap()];
    let cached = Server::start(&args);
    let plain = Server::start(&["--model", model.to_str().unwrap(), "--cache-bytes", "0"]);

    let questions = ["Where is the main function?", "Run the tests.", "Why did test 3 fail?", "Fix it.", "Commit the change."];
    let mut history: Vec<Value> = vec![];
    eprintln!("| turn | prompt tokens | read from cache | computed | time |");
    for (i, q) in questions.iter().enumerate() {
        history.push(json!({"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nThe git status is clean.\n</system-reminder>"},
            {"type": "text", "text": q, "cache_control": {"type": "ephemeral"}},
        ]}));
        let body = request("a1b2", i, &history);
        let (usage, text, secs) = turn(&cached.addr, &body);
        let prompt = n(&usage, "input_tokens") + n(&usage, "cache_creation_input_tokens") + n(&usage, "cache_read_input_tokens");
        let read = n(&usage, "cache_read_input_tokens");
        eprintln!("| {} | {prompt} | {read} | {} | {secs:.2} s |", i + 1, prompt - read);
        let (plain_usage, plain_text, _) = turn(&plain.addr, &body);
        assert_eq!(n(&plain_usage, "cache_read_input_tokens"), 0, "the server without a cache read from one: {plain_usage}");
        assert_eq!(text, plain_text, "turn {}: the answer from snapshots differs from the one computed whole", i + 1);
        assert!(!text.is_empty(), "turn {}: no answer", i + 1);
        if i == 0 {
            assert!(prompt > 1000, "the system prompt is about 1.5K tokens ({prompt})");
            assert_eq!(read, 0);
        } else {
            assert!(read * 100 >= prompt * 90, "turn {}: only {read} of {prompt} tokens read from the cache", i + 1);
        }
        history.push(json!({"role": "assistant", "content": [{"type": "text", "text": text}]}));
    }
    // Two new conversations at once with a system prompt not seen yet: the
    // scheduler runs them side by side (a shared prefix is kept only at an
    // exact position); both answer as computed whole.
    let fresh = |q: &str| {
        let mut body = request("e5f6", 0, &[json!({"role": "user", "content": [{"type": "text", "text": q, "cache_control": {"type": "ephemeral"}}]})]);
        body["system"][2]["text"] = json!("# Style\nAnswer in full sentences and cite the file you read.\n".repeat(8));
        body
    };
    let bodies = [fresh("What does main.rs do?"), fresh("Which tests are slow?")];
    let answers: Vec<(Value, String, f64)> = std::thread::scope(|sc| {
        let handles: Vec<_> = bodies.iter().map(|b| sc.spawn(|| turn(&cached.addr, b))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (b, (usage, text, _)) in bodies.iter().zip(&answers) {
        eprintln!("concurrent: usage {usage}");
        assert_eq!(text, &turn(&plain.addr, b).1, "an answer computed beside another differs from the one computed alone");
    }
    let stats = common::get(&cached.addr, "/v1/cache/stats").json();
    eprintln!("cache after 5 turns: {stats}");
    // Snapshots at the breakpoints and prompt ends are kept beside each other
    // (none is redundant because a longer one covers it).
    assert!(stats["entries"].as_u64().unwrap() >= 5, "{stats}");
    cached.stop();
    plain.stop();
    assert!(snapshot_files(&cache_dir) >= 5, "snapshots were written to {}", cache_dir.display());

    // A restart: a new session's first turn reads the shared system prompt from disk.
    let server = Server::start(&args);
    let first = vec![json!({"role": "user", "content": [{"type": "text", "text": "List the files in src.", "cache_control": {"type": "ephemeral"}}]})];
    let (usage, _, secs) = turn(&server.addr, &request("c3d4", 0, &first));
    let prompt = n(&usage, "input_tokens") + n(&usage, "cache_creation_input_tokens") + n(&usage, "cache_read_input_tokens");
    let read = n(&usage, "cache_read_input_tokens");
    eprintln!("after restart: {read} of {prompt} tokens read from disk, {secs:.2} s");
    assert!(read * 100 >= prompt * 90, "after restart only {read} of {prompt} tokens came from disk");
    server.stop();
    let _ = std::fs::remove_dir_all(&cache_dir);
    let _ = std::fs::remove_dir_all(&model);
}
