//! Tool use through Claude Code, end to end, in proxy mode: real Claude Code
//! (headless) runs through `kvserve claude --proxy` against a small scripted
//! OpenAI-compatible upstream (SmolLM2 never emits tool calls). The
//! upstream's first answer is a `tool_calls` for Claude Code's Bash tool
//! running `ls`; once it sees the tool result it answers with text quoting
//! it. Claude Code must run the tool and print that answer, and the `ls`
//! output must reach the upstream in a `tool` message.

use std::process::{Command, Stdio};

/// The scripted upstream: prints its port, appends every chat request's
/// messages to LOG (one JSON line each).
const UPSTREAM: &str = r#"#!/usr/bin/env python3
import json, sys, http.server, socketserver
LOG = sys.argv[1]

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def send_json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path.startswith("/v1/models"):
            entry = {"id": "scripted", "object": "model"}
            if len(sys.argv) < 3:
                entry["max_model_len"] = 65536
            return self.send_json(200, {"object": "list", "data": [entry]})
        self.send_json(404, {"error": {"message": "no route"}})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["content-length"])))
        msgs = req.get("messages", [])
        with open(LOG, "a") as f:
            f.write(json.dumps({"messages": msgs, "tools": [t["function"]["name"] for t in req.get("tools", [])]}) + "\n")
        tool_results = [m for m in msgs if m.get("role") == "tool"]
        has_bash = any(t["function"]["name"] == "Bash" for t in req.get("tools", []))
        if has_bash and not tool_results:
            call = {"index": 0, "id": "call_ls_1", "type": "function",
                    "function": {"name": "Bash", "arguments": json.dumps({"command": "ls", "description": "List the files"})}}
            deltas = [{"role": "assistant", "tool_calls": [call]}]
            finish = "tool_calls"
        else:
            seen = " ".join(str(m.get("content")) for m in tool_results)
            text = "The listing shows: " + (" ".join(w for w in seen.split() if "." in w) or "nothing")
            deltas = [{"role": "assistant", "content": text}]
            finish = "stop"
        if not req.get("stream"):
            msg = {"role": "assistant", "content": deltas[0].get("content")}
            if "tool_calls" in deltas[0]:
                msg["tool_calls"] = [{k: v for k, v in deltas[0]["tool_calls"][0].items() if k != "index"}]
            return self.send_json(200, {"id": "c", "object": "chat.completion", "model": "scripted",
                "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        def chunk(obj):
            self.wfile.write(("data: " + json.dumps(obj) + "\n\n").encode())
        base = {"id": "c", "object": "chat.completion.chunk", "model": "scripted"}
        for d in deltas:
            chunk({**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]})
        chunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        chunk({**base, "choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

s = S(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

#[test]
fn claude_code_runs_a_tool_through_the_proxy_and_the_result_reaches_the_upstream() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let claude = root.join("tools/claude-code/node_modules/.bin/claude");
    assert!(claude.exists(), "run `make claude-code`");
    let base = std::env::temp_dir().join(format!("kvserve-tools-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (home, work) = (base.join("home"), base.join("work"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    for f in ["alpha-notes.txt", "beta-plan.md", "gamma.rs"] {
        std::fs::write(work.join(f), "x").unwrap();
    }
    let script = base.join("upstream.py");
    std::fs::write(&script, UPSTREAM).unwrap();
    let log = base.join("upstream.jsonl");
    let mut upstream = Command::new("python3").arg(&script).arg(&log).stdout(Stdio::piped()).spawn().unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(upstream.stdout.take().unwrap()), &mut port).unwrap();
    let url = format!("http://127.0.0.1:{}", port.trim());

    let out = Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .current_dir(&work)
        .env("HOME", &home)
        .env("KVSERVE_CLAUDE", &claude)
        .env("KVSERVE_LOG", "info")
        .args(["claude", "--proxy", &url, "--model", "scripted", "--"])
        .args(["-p", "List the files in this folder.", "--allowedTools", "Bash"])
        .output()
        .unwrap();
    let _ = upstream.kill();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("claude printed: {stdout}");
    assert!(out.status.success(), "kvserve claude failed ({}): {stdout}\n{stderr}", out.status);
    // The window came from the upstream's /v1/models (vLLM's max_model_len).
    assert!(stderr.contains("CLAUDE_CODE_MAX_CONTEXT_TOKENS=65536"), "{stderr}");
    // Claude Code ran `ls` and printed the upstream's answer quoting its output.
    for f in ["alpha-notes.txt", "beta-plan.md", "gamma.rs"] {
        assert!(stdout.contains(f), "Claude Code's final answer lacks {f}: {stdout}\n{stderr}");
    }
    // The tool result reached the upstream as a `tool` message answering the call.
    let requests: Vec<serde_json::Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let tool_msgs: Vec<&serde_json::Value> = requests.iter().flat_map(|r| r["messages"].as_array().unwrap()).filter(|m| m["role"] == "tool").collect();
    assert!(!tool_msgs.is_empty(), "no tool message reached the upstream: {requests:?}");
    let m = tool_msgs[0];
    assert_eq!(m["tool_call_id"], "call_ls_1", "{m}");
    let content = m["content"].to_string();
    assert!(content.contains("alpha-notes.txt") && content.contains("gamma.rs"), "{m}");
    assert!(requests.iter().any(|r| r["tools"].as_array().unwrap().iter().any(|t| t == "Bash")), "Claude Code's tools reached the upstream");
    eprintln!("upstream saw {} requests; the tool message: {m}", requests.len());

    // An upstream that does not report its window: kvserve claude asks for --context.
    let mut quiet = Command::new("python3").arg(&script).arg(&log).arg("no-context").stdout(Stdio::piped()).spawn().unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(quiet.stdout.take().unwrap()), &mut port).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .current_dir(&work)
        .env("HOME", &home)
        .env("KVSERVE_CLAUDE", &claude)
        .args(["claude", "--proxy", &format!("http://127.0.0.1:{}", port.trim()), "--model", "scripted", "--", "-p", "hi"])
        .output()
        .unwrap();
    let _ = quiet.kill();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("does not report the model's context window; give --context N"), "{stderr}");
    let _ = std::fs::remove_dir_all(&base);
}
