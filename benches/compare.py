"""Side by side: kvserve and mlx_lm.server (mlx-lm 0.32.2, same MLX wheel)
with the same converted model, the same requests, in one run.

Workloads:
  1  a Claude Code-shaped session: a ~3K-token system prompt after a billing
     line that changes every turn, tool schemas, a mid-conversation system
     message, N turns (kvserve through its Anthropic endpoint, which drops
     the billing line as Claude Code's own server does; mlx-lm through its
     OpenAI endpoint, which sees it);
  2  the same session without the billing line (both caches can hit);
  4  decode: 256 tokens from a short prompt;
  R  kvserve only: turn 1 of a new session after a restart with --cache-dir.
Reports time to first token per turn, cached tokens reported, prefill and
decode tokens/s, and each server's peak resident memory.

Usage: python benches/compare.py --kvserve target/release/kvserve --model DIR
       [--turns 5] [--mlx-turns 2] [--out results/compare.md]
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, path, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on {port} not ready")


def peak_rss_mb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Server:
    def __init__(self, cmd, port, ready_path, env=None):
        self.port = port
        log = open(os.environ.get("COMPARE_LOG", os.devnull), "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        wait_ready(port, ready_path)

    def stop(self):
        peak = peak_rss_mb(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return peak


def stream(port, path, body, headers):
    """POST a streaming request; returns (ttft, total, text, usage)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    t0 = time.time()
    c.request("POST", path, json.dumps(body), {"content-type": "application/json", **headers})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"{path}: {r.status} {r.read()[:300]}")
    ttft, text, usage = None, "", {}
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        piece = ""
        if ev.get("type") == "content_block_delta":
            piece = ev["delta"].get("text", "")
        elif ev.get("type") == "message_delta":
            usage = ev["usage"]
        elif "choices" in ev:
            if ev["choices"]:
                piece = ev["choices"][0]["delta"].get("content") or ""
            if ev.get("usage"):
                usage = ev["usage"]
        if piece and ttft is None:
            ttft = time.time() - t0
        text += piece
    return ttft or (time.time() - t0), time.time() - t0, text, usage


def system_text(approx_tokens):
    topics = ["files", "tests", "git", "shell commands", "the user's code", "errors", "dependencies", "formatting"]
    verbs = ["prefer", "avoid", "check", "explain", "summarize", "verify"]
    lines = ["You are an interactive coding agent that helps with software engineering tasks."]
    i = 0
    while len(lines) * 27 < approx_tokens:
        lines.append(
            f"Rule {i}: when the task involves {topics[i % 8]}, {verbs[i % 6]} the approach that keeps changes small, and say what you did in one line."
        )
        i += 1
    return "\n".join(lines)


TOOLS = [
    {"name": "Read", "description": "Read a file from the local filesystem.",
     "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}},
    {"name": "Bash", "description": "Run a shell command and return its output.",
     "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
]
QUESTIONS = ["Where is the main function?", "Run the tests.", "Why did test 3 fail?", "Fix it.", "Commit the change.", "Push it."]


class Session:
    """One conversation, sent as Anthropic (kvserve) or OpenAI (mlx-lm) requests."""

    def __init__(self, model, system, billing, tag, max_tokens=16, variant=""):
        self.model, self.system, self.billing, self.tag, self.max_tokens = model, system, billing, tag, max_tokens
        # Sessions with another variant share only the system prompt and tools.
        self.variant = variant
        self.turns = []  # (question, answer)

    def billing_line(self, turn):
        return f"x-anthropic-billing-header: cc_version=2.1.328; cc_entrypoint=cli; cch={self.tag}{turn:04x};"

    def env_message(self):
        return "Environment: working directory /work/repo, platform linux, today is 2026-11-26."

    def anthropic(self, q, turn):
        system = [{"type": "text", "text": self.system, "cache_control": {"type": "ephemeral"}}]
        if self.billing:
            system.insert(0, {"type": "text", "text": self.billing_line(turn)})
        msgs = [{"role": "user", "content": f"<system-reminder>git status: clean</system-reminder>\n{(self.turns[0][0] if self.turns else q)}"},
                {"role": "system", "content": self.env_message()}]
        for i, (tq, ta) in enumerate(self.turns):
            if i > 0:
                msgs.append({"role": "user", "content": tq})
            msgs.append({"role": "assistant", "content": ta})
        if self.turns:
            msgs.append({"role": "user", "content": [{"type": "text", "text": q, "cache_control": {"type": "ephemeral"}}]})
        return {"model": self.model, "max_tokens": self.max_tokens, "stream": True, "system": system, "tools": TOOLS, "messages": msgs}

    def openai(self, q, turn):
        a = self.anthropic(q, turn)
        sys_text = "\n".join(b["text"] for b in a["system"])
        msgs = [{"role": "system", "content": sys_text}]
        for m in a["messages"]:
            c = m["content"]
            msgs.append({"role": m["role"], "content": c if isinstance(c, str) else c[0]["text"]})
        tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}} for t in TOOLS]
        return {"model": self.model, "max_tokens": self.max_tokens, "stream": True, "messages": msgs, "tools": tools,
                "stream_options": {"include_usage": True}}


def run_session(port, kind, session, turns):
    rows = []
    for t in range(turns):
        q = session.variant + QUESTIONS[t]
        if kind == "anthropic":
            ttft, total, text, u = stream(port, "/v1/messages", session.anthropic(q, t), {})
            cached = u.get("cache_read_input_tokens", 0)
            prompt = cached + u.get("cache_creation_input_tokens", 0) + u.get("input_tokens", 0)
        else:
            ttft, total, text, u = stream(port, "/v1/chat/completions", session.openai(q, t), {})
            prompt = u.get("prompt_tokens", 0)
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        session.turns.append((q, text))
        rows.append({"turn": t + 1, "ttft": ttft, "total": total, "prompt": prompt, "cached": cached})
        print(f"  {kind} turn {t + 1}: ttft {ttft:.2f}s, prompt {prompt}, cached {cached}", flush=True)
    return rows


def decode(port, kind, model):
    msgs = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    body = {"model": model, "max_tokens": 256, "stream": True, "messages": msgs}
    if kind == "openai":
        body["stream_options"] = {"include_usage": True}
        body["temperature"] = 0.0
        ttft, total, text, u = stream(port, "/v1/chat/completions", body, {})
        n = u.get("completion_tokens", 0)
    else:
        ttft, total, text, u = stream(port, "/v1/messages", body, {})
        n = u.get("output_tokens", 0)
    return {"ttft": ttft, "total": total, "tokens": n, "tps": (n - 1) / max(total - ttft, 1e-9)}


def concurrent(port, kind, model, system, clients, turns):
    """Workload 5: `clients` sessions of workload 1 at once; per-turn TTFTs and wall time."""
    import threading
    out = [None] * clients

    def one(i):
        out[i] = run_session(port, kind, Session(model, system, True, f"c{i}", variant=f"Client {i}: "), turns)

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall": time.time() - t0, "sessions": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvserve", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--system-tokens", type=int, default=3000)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--mlx-turns", type=int, default=2, help="turns of workload 1 for mlx-lm (each is cold there)")
    ap.add_argument("--out", default="results/compare.md")
    ap.add_argument("--skip-mlx", action="store_true")
    ap.add_argument("--mlx-results", help="reuse mlx_lm.server numbers from an earlier run's JSON (same machine and settings)")
    ap.add_argument("--clients", type=int, default=4, help="workload 5: concurrent sessions")
    ap.add_argument("--mlx-w5", action="store_true", help="also run workload 5 on mlx_lm.server (every turn is cold there: hours on a CPU)")
    args = ap.parse_args()
    model_name = os.path.basename(os.path.normpath(args.model))
    system = system_text(args.system_tokens)
    results = {}
    cache_dir = tempfile.mkdtemp(prefix="kvserve-bench-")

    def kv_server():
        port = free_port()
        cmd = [args.kvserve, "serve", "--model", args.model, "--port", str(port), "--cache-dir", cache_dir]
        return Server(cmd, port, "/health")

    print("kvserve", flush=True)
    s = kv_server()
    results["kv_w1"] = run_session(s.port, "anthropic", Session(model_name, system, True, "a1"), args.turns)
    results["kv_w2"] = run_session(s.port, "anthropic", Session(model_name, system, False, "b2", variant="In the other repo: "), args.turns)
    results["kv_w4"] = decode(s.port, "openai", model_name)
    results["kv_w5"] = concurrent(s.port, "anthropic", model_name, system, args.clients, args.turns)
    results["kv_peak"] = s.stop()
    s = kv_server()
    results["kv_restart"] = run_session(s.port, "anthropic", Session(model_name, system, True, "c3", variant="After a restart: "), 1)
    s.stop()

    if args.mlx_results:
        with open(args.mlx_results) as f:
            earlier = json.load(f)
        results.update({k: v for k, v in earlier.items() if k.startswith("mlx_")})
    elif not args.skip_mlx:
        print("mlx_lm.server", flush=True)
        port = free_port()
        py = os.path.join(os.path.dirname(sys.executable), "mlx_lm.server")
        s = Server([py, "--model", args.model, "--port", str(port), "--host", "127.0.0.1"], port, "/v1/models")
        results["mlx_w1"] = run_session(s.port, "openai", Session(args.model, system, True, "a1"), args.mlx_turns)
        results["mlx_w2"] = run_session(s.port, "openai", Session(args.model, system, False, "b2", variant="In the other repo: "), args.turns)
        results["mlx_w4"] = decode(s.port, "openai", args.model)
        if args.mlx_w5:
            results["mlx_w5"] = concurrent(s.port, "openai", args.model, system, args.clients, args.turns)
        results["mlx_peak"] = s.stop()

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out.replace(".md", ".json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"# kvserve vs mlx_lm.server, {time.strftime('%Y-%m-%d')}, model {model_name}", ""]
    for w, title in (("w1", "Workload 1: Claude Code-shaped session, billing line changes every turn"),
                     ("w2", "Workload 2: the same session without the billing line")):
        lines += [f"## {title}", "", "| turn | prompt tokens | kvserve TTFT (s) | kvserve cached | mlx-lm TTFT (s) | mlx-lm cached | ratio |", "|---|---|---|---|---|---|---|"]
        kv = results[f"kv_{w}"]
        ml = results.get(f"mlx_{w}", [])
        for i, r in enumerate(kv):
            m = ml[i] if i < len(ml) else None
            ratio = f"{m['ttft'] / r['ttft']:.1f}x" if m else "-"
            mt = f"{m['ttft']:.2f}" if m else "not run"
            mc = str(m["cached"]) if m else "-"
            lines.append(f"| {r['turn']} | {r['prompt']} | {r['ttft']:.2f} | {r['cached']} | {mt} | {mc} | {ratio} |")
        lines.append("")
    r = results["kv_restart"][0]
    lines += ["## After a restart (kvserve --cache-dir): a new session's turn 1", "",
              f"TTFT {r['ttft']:.2f}s, prompt {r['prompt']} tokens, {r['cached']} read from disk.", ""]
    kv4, ml4 = results["kv_w4"], results.get("mlx_w4")
    lines += ["## Workload 4: decode 256 tokens", "", "| server | tokens | decode tok/s |", "|---|---|---|",
              f"| kvserve | {kv4['tokens']} | {kv4['tps']:.2f} |"]
    if ml4:
        lines.append(f"| mlx_lm.server | {ml4['tokens']} | {ml4['tps']:.2f} |")
    lines += ["", f"## Workload 5: {args.clients} concurrent clients, each workload 1", "",
              "| turn | kvserve TTFT median / max (s) | mlx_lm.server TTFT median / max (s) |", "|---|---|---|"]
    def med_max(w5, t):
        xs = sorted(sess[t]["ttft"] for sess in w5["sessions"] if sess and len(sess) > t)
        return f"{xs[len(xs) // 2]:.2f} / {xs[-1]:.2f}" if xs else "not run"
    for t in range(args.turns):
        m5 = results.get("mlx_w5")
        lines.append(f"| {t + 1} | {med_max(results['kv_w5'], t)} | {med_max(m5, t) if m5 else 'not run'} |")
    lines.append(f"\nkvserve wall time for all {args.clients} sessions: {results['kv_w5']['wall']:.1f}s")
    lines += ["", "## Peak resident memory", "", f"kvserve {results['kv_peak']:.0f} MB" + (f", mlx_lm.server {results['mlx_peak']:.0f} MB" if "mlx_peak" in results else ""), ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
