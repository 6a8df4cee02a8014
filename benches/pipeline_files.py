#!/usr/bin/env python3
"""Snapshot files across the ranks of a split model, by hand (not in the suite:
a 3-rank tensor split is slow here). Starts SmolLM2 split over N ranks on
127.0.0.1 with --cache-dir, asks one question, stops the group, starts it
again and asks the same question: the second run should read the prompt from
the files on every rank (each other rank computes only the answer).
Usage: python3 benches/pipeline_files.py [tensor|pipeline] [ranks] [rank 0's other flags, e.g. --kv-bits 8]
(after cargo build --release)"""
import json, subprocess, time, urllib.request, re, os, shutil, sys
split = sys.argv[1] if len(sys.argv) > 1 else "tensor"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 3
hf = "/tmp/tf-hosts.json"; json.dump([[f"127.0.0.1:{31000+r}"] for r in range(n)], open(hf, "w"))
d = "/tmp/tf-cache"; shutil.rmtree(d, ignore_errors=True)
env = {"KVSERVE_NO_CONFIG": "1", "PATH": "/usr/bin:/bin"}
base = ["target/release/kvserve", "serve", "--model", "models/SmolLM2-135M-Instruct", "--hostfile", hf, "--split", split, "--cache-dir", d, "--no-trace", "--port", "0"]
def group(run):
    fs = [subprocess.Popen(base + ["--rank", str(r)], stdout=subprocess.DEVNULL, stderr=open(f"/tmp/tf-{run}-r{r}.log", "w"), env=env) for r in range(1, n)]
    p = subprocess.Popen(base + ["--rank", "0"] + sys.argv[3:], stdout=subprocess.PIPE, stderr=open(f"/tmp/tf-{run}-r0.log", "w"), env=env, text=True)
    for line in p.stdout:
        m = re.search(r"listening on http://(\S+)", line)
        if m: return p, fs, m.group(1)
def chat(addr, msgs):
    body = {"model": "m", "messages": msgs, "max_tokens": 16, "temperature": 0}
    t = time.time()
    v = json.load(urllib.request.urlopen(urllib.request.Request(f"http://{addr}/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"})))
    return v["choices"][0]["message"]["content"], v["usage"], time.time() - t
system = "".join(f"Rule {i}: answer briefly, name your sources, and keep the user's words when you quote them. " for i in range(40))
msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Which rivers flow into the Black Sea?"}]
for run in ["1", "2"]:
    p, fs, addr = group(run)
    a, u, t = chat(addr, msgs)
    print(f"run {run}: {t:.1f}s cached {u['prompt_tokens_details']['cached_tokens']} of {u['prompt_tokens']}: {a!r}")
    p.terminate(); p.wait()
    for f in fs: f.wait()
    for r in range(1, n):
        last = [l for l in open(f"/tmp/tf-{run}-r{r}.log") if "rank 0 stopped" in l]
        print("  ", last[-1].strip() if last else open(f"/tmp/tf-{run}-r{r}.log").read()[-500:])
for root, dirs, files in os.walk(d):
    for f in files: print(os.path.join(root, f), os.path.getsize(os.path.join(root, f)))
