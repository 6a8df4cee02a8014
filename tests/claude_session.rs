//! A Claude Code-shaped session against the real server and the real
//! SmolLM2: a ~3K-token system prompt after a billing line that changes
//! every turn, tool schemas, a mid-conversation system message, 5 turns.
//! From turn 2 on the prompt is served from the cache except the new
//! tokens; after a restart with --cache-dir, a new session's first turn
//! reads the shared prefix from disk. (The texts are generated here, not
//! copied from Claude Code.)

mod common;

use std::time::Instant;

use common::{post, Server};
use serde_json::{json, Value};

fn system_prompt() -> (String, String) {
    let topics = ["files", "tests", "git", "shell commands", "the user's code", "errors", "dependencies", "formatting"];
    let verbs = ["prefer", "avoid", "check", "explain", "summarize", "verify"];
    let mut a = String::from("You are an interactive coding agent that helps with software engineering tasks.\n");
    for i in 0..110 {
        a += &format!(
            "Rule {i}: when the task involves {}, {} the approach that keeps changes small, and say what you did in one line.\n",
            topics[i % topics.len()],
            verbs[i % verbs.len()]
        );
    }
    let b = "# Tone\nBe concise. Use the tools to read before you write. Never invent file contents.\n".repeat(12);
    (a, b)
}

fn tools() -> Value {
    json!([
        {"name": "Read", "description": "Read a file from the local filesystem.", "input_schema": {"type": "object",
            "properties": {"file_path": {"type": "string"}, "offset": {"type": "integer"}, "limit": {"type": "integer"}}, "required": ["file_path"]}},
        {"name": "Bash", "description": "Run a shell command and return its output.", "input_schema": {"type": "object",
            "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}}, "required": ["command"]}},
        {"name": "Edit", "description": "Replace text in a file.", "input_schema": {"type": "object",
            "properties": {"file_path": {"type": "string"}, "old_string": {"type": "string"}, "new_string": {"type": "string"}},
            "required": ["file_path", "old_string", "new_string"]}},
    ])
}

fn request(session: &str, turn: usize, history: &[Value]) -> Value {
    let (a, b) = system_prompt();
    let billing = format!("x-anthropic-billing-header: cc_version=2.1.328; cc_entrypoint=cli; cch={session}{turn:04x};");
    json!({
        "model": "SmolLM2-135M-Instruct",
        "max_tokens": 12,
        "stream": true,
        "system": [
            {"type": "text", "text": billing},
            {"type": "text", "text": a, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": b, "cache_control": {"type": "ephemeral"}},
        ],
        "tools": tools(),
        "messages": history,
        "metadata": {"user_id": "test"},
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": []},
    })
}

fn first_messages(question: &str) -> Vec<Value> {
    vec![
        json!({"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nThis is a reminder: the git status is clean.\n</system-reminder>"},
            {"type": "text", "text": question, "cache_control": {"type": "ephemeral"}},
        ]}),
        json!({"role": "system", "content": "Environment: working directory /work/repo, platform linux, today is 2026-11-26."}),
    ]
}

struct Turn {
    usage: Value,
    text: String,
    ttft: f64,
}

/// One streamed turn: checks the event order and returns the usage and answer.
fn turn(addr: &str, body: &Value) -> Turn {
    let t0 = Instant::now();
    let r = post(addr, "/v1/messages?beta=true", body);
    let ttft = t0.elapsed().as_secs_f64();
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.events();
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).filter(|e| *e != "ping").collect();
    assert_eq!(names.first(), Some(&"message_start"), "{names:?}");
    assert_eq!(&names[names.len() - 2..], &["message_delta", "message_stop"], "{names:?}");
    let start: Value = serde_json::from_str(&events[0].1).unwrap();
    let delta: Value = serde_json::from_str(&events.iter().find(|e| e.0 == "message_delta").unwrap().1).unwrap();
    let mut text = String::new();
    for (name, data) in &events {
        if name == "content_block_delta" {
            let d: Value = serde_json::from_str(data).unwrap();
            text += d["delta"]["text"].as_str().unwrap_or("");
        }
    }
    let u = &delta["usage"];
    assert_eq!(start["message"]["usage"]["cache_read_input_tokens"], u["cache_read_input_tokens"]);
    Turn { usage: u.clone(), text, ttft }
}

fn total(u: &Value) -> u64 {
    ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"].iter().map(|k| u[k].as_u64().unwrap()).sum()
}

fn count(addr: &str, body: &Value) -> u64 {
    let r = post(addr, "/v1/messages/count_tokens", body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["input_tokens"].as_u64().unwrap()
}

#[test]
fn claude_code_shaped_session_reads_from_cache_and_survives_restart() {
    let dir = std::env::temp_dir().join(format!("kvserve-session-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = common::smollm2_dir();
    let args = ["--model", model.to_str().unwrap(), "--cache-dir", dir.to_str().unwrap()];
    let server = Server::start(&args);
    let addr = server.addr.clone();
    assert!(server.stdout.iter().any(|l| l.contains("ANTHROPIC_BASE_URL=http://")), "{:?}", server.stdout);

    let questions = ["Where is the main function?", "Run the tests.", "Why did test 3 fail?", "Fix it.", "Commit the change."];
    let mut history = first_messages(questions[0]);
    for (i, q) in questions.iter().enumerate() {
        if i > 0 {
            history.push(json!({"role": "user", "content": [{"type": "text", "text": q, "cache_control": {"type": "ephemeral"}}]}));
        }
        let body = request("a1b2", i, &history);
        let prompt = count(&addr, &body);
        // The billing line never reaches the prompt: another one counts the same.
        assert_eq!(count(&addr, &request("ffff", i + 7, &history)), prompt);
        let t = turn(&addr, &body);
        let read = t.usage["cache_read_input_tokens"].as_u64().unwrap();
        eprintln!("turn {}: prompt {prompt} tokens, usage {}, time to first token {:.2}s", i + 1, t.usage, t.ttft);
        assert_eq!(total(&t.usage), prompt, "usage adds up to the prompt");
        if i == 0 {
            assert!(prompt > 2500, "the system prompt is about 3K tokens ({prompt})");
            assert_eq!(read, 0);
            assert!(t.usage["cache_creation_input_tokens"].as_u64().unwrap() >= prompt - 1);
        } else {
            assert!(read * 100 >= prompt * 95, "turn {}: only {read} of {prompt} tokens read from the cache", i + 1);
        }
        history.push(json!({"role": "assistant", "content": [{"type": "text", "text": t.text}]}));
    }
    let stats = common::get(&addr, "/v1/cache/stats").json();
    assert!(stats["hits"].as_u64().unwrap() >= 4 && stats["bytes"].as_u64().unwrap() > 0, "{stats}");
    // Each turn took over its predecessor's snapshot (which it continues but
    // for the previous answer's re-tokenized start): one snapshot is left.
    assert_eq!(stats["entries"].as_u64(), Some(1), "{stats}");
    server.stop();
    let files = std::fs::read_dir(&dir).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "safetensors")).count();
    assert!(files >= 1, "snapshots were written to {}", dir.display());

    // A restart: a new session's first turn with the same system prompt and tools.
    let server = Server::start(&args);
    let body = request("c3d4", 0, &first_messages("List the files in src."));
    let prompt = count(&server.addr, &body);
    let t = turn(&server.addr, &body);
    let read = t.usage["cache_read_input_tokens"].as_u64().unwrap();
    eprintln!("after restart: prompt {prompt} tokens, usage {}, time to first token {:.2}s", t.usage, t.ttft);
    assert_eq!(total(&t.usage), prompt);
    assert!(read * 100 >= prompt * 90, "after restart only {read} of {prompt} tokens came from disk");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
