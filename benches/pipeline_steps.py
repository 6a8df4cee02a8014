#!/usr/bin/env python3
"""Decode step time of `kvserve serve` split over 1, 2 and 3 ranks on
127.0.0.1 (MLX's ring backend), by layers and by heads.

Usage: python3 benches/pipeline_steps.py [MODEL] [--tokens N]
(KVSERVE=path picks the binary; default target/release/kvserve.)

Each configuration: the ranks are started, one warm-up request, then one
streamed request of N tokens (greedy); the time per decode step is the time
between the first and the last streamed token over the tokens between them.
The ranks share this machine's cores (and its GPU, if any), so this
measures the protocol's cost on loopback, not what separate machines would
do. Each configuration's greedy answer is compared with one process's.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVSERVE = os.environ.get("KVSERVE") or os.path.join(ROOT, "target", "release", "kvserve")


def start(model, ranks, split, base_port):
    env = dict(os.environ, KVSERVE_NO_CONFIG="1", KVSERVE_LOG="warn")
    env.pop("MLX_RANK", None)
    procs, logs = [], []
    args = ["serve", "--model", model, "--no-trace"]
    if ranks > 1:
        hosts = os.path.join(tempfile.gettempdir(), f"kvserve-steps-{os.getpid()}-{ranks}-{split}.json")
        with open(hosts, "w") as f:
            json.dump([[f"127.0.0.1:{base_port + r}"] for r in range(ranks)], f)
        for r in range(1, ranks):
            log = open(os.path.join(tempfile.gettempdir(), f"kvserve-steps-rank{r}.log"), "w")
            procs.append(subprocess.Popen([KVSERVE] + args + ["--hostfile", hosts, "--rank", str(r), "--split", split], env=env, stdout=subprocess.DEVNULL, stderr=log))
            logs.append(log)
        args += ["--hostfile", hosts, "--rank", "0", "--split", split]
    lead = subprocess.Popen([KVSERVE] + args + ["--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    addr = None
    for line in lead.stdout:
        if line.startswith("kvserve listening on http://"):
            addr = line.strip().split("http://")[1]
            break
    if addr is None:
        raise SystemExit(f"rank 0 did not start: {lead.stderr.read()}")
    return lead, procs, addr


def stream(addr, prompt, tokens):
    body = json.dumps({"model": "m", "stream": True, "max_tokens": tokens, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", data=body, headers={"content-type": "application/json"})
    t0 = time.time()
    times, text = [], []
    with urllib.request.urlopen(req) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices") and d["choices"][0].get("delta", {}).get("content"):
                times.append(time.time())
                text.append(d["choices"][0]["delta"]["content"])
    return t0, times, "".join(text)


def main():
    model = next((a for a in sys.argv[1:] if not a.startswith("--") and not a.isdigit()), os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
    tokens = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else 128
    prompt = "Write a long story about a lighthouse keeper and a storm."
    rows = []
    alone = None
    for i, (ranks, split) in enumerate([(1, "-"), (2, "pipeline"), (3, "pipeline"), (3, "tensor")]):
        try:
            lead, procs, addr = start(model, ranks, split, 23500 + 10 * i + (os.getpid() % 150) * 50)  # below Linux's ephemeral ports (32768)
        except (Exception, SystemExit) as e:
            # Said, and the next configuration tried (a rank that did not start says why in its log).
            print(f"{ranks} rank(s) {split:8}: did not start: {str(e)[-1500:]}", flush=True)
            for r in range(1, ranks):
                log = os.path.join(tempfile.gettempdir(), f"kvserve-steps-rank{r}.log")
                print(f"    rank {r}: {open(log).read()[-800:] if os.path.exists(log) else '(no log)'}", flush=True)
            subprocess.run(["pkill", "-f", "kvserve-steps-"], check=False)
            continue
        try:
            stream(addr, "Say hello.", 8)
            t0, times, text = stream(addr, prompt, tokens)
            step = (times[-1] - times[0]) / max(len(times) - 1, 1)
            alone = text if alone is None else alone
            same = text == alone
            rows.append((ranks, split, len(times), times[0] - t0, step, same))
            print(f"{ranks} rank(s) {split:8}: first token {times[0] - t0:.2f} s, {len(times)} streamed pieces, {step * 1e3:.1f} ms per decode step ({1 / step:.1f} tok/s); answer {'equals' if same else 'DIFFERS from'} one process's", flush=True)
            if not same:
                print(f"    one process: {alone[:200]!r}\n    this:        {text[:200]!r}", flush=True)
        except Exception as e:
            print(f"{ranks} rank(s) {split:8}: failed: {e}", flush=True)
        finally:
            lead.terminate()
            try:
                lead.wait(timeout=60)
            except subprocess.TimeoutExpired:
                lead.kill()
            err = lead.stderr.read()
            for line in err.splitlines():
                if "pipeline traffic" in line or "all_sum of partial sums" in line or "error" in line.lower():
                    print("   ", line.split("kvserve: ")[-1][:600])
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(json.dumps([{"ranks": r, "split": s, "pieces": n, "first_token_s": round(f, 3), "step_ms": round(t * 1e3, 2), "same_answer": same} for r, s, n, f, t, same in rows]))


if __name__ == "__main__":
    main()
