"""kvserve against mlx_lm.server on one machine and one model, short: what
scripts/gpu_check.sh runs on a GPU (it runs on the CPU too).

For each server, started fresh on MODEL:
  cold  a Claude Code-shaped request (a ~--system-tokens system prompt, two
        tools, a reminder, max_tokens 16) that no cache holds: each repetition
        starts its system prompt with a line of its own;
  warm  the next turn of that conversation (the answer, one more question):
        what a prefix cache saves;
  decode  --decode-tokens tokens, greedy, from a short prompt; tokens/s from
        the first to the last streamed piece.
kvserve gets Anthropic requests (what Claude Code sends), mlx-lm the same
conversation as OpenAI requests (the only API it has), as in compare.py.

Usage: python gpu_bench.py --kvserve BIN --model DIR [--mlx-python PY] [--out FILE.md]
Writes FILE.md (the table) and FILE.json (every sample).
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the harness's client, prompts and server runner)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, unit=""):
    return "–" if x is None else f"{x:.2f}{unit}" if x < 100 else f"{x:.0f}{unit}"


def gpu_name():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out or None
    except (OSError, subprocess.SubprocessError):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvserve", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mlx-python", default=sys.executable, help="the Python that has mlx-lm (and the MLX build to compare)")
    ap.add_argument("--system-tokens", type=int, default=12000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--servers", default="kvserve,mlx-lm")
    ap.add_argument("--kvserve-args", default="", help="more flags for kvserve serve, space-separated")
    ap.add_argument("--out", default="results/gpu_bench.md")
    a = ap.parse_args()

    name = os.path.basename(os.path.normpath(a.model))
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu_name(), "cpu": platform.processor() or platform.machine(),
           "model": name, "model_config": json.load(open(os.path.join(a.model, "config.json"))), "servers": {}}
    ver = subprocess.run([a.mlx_python, "-c", "import mlx.core as mx, mlx_lm; print(mx.__version__, mlx_lm.__version__, mx.default_device())"],
                         capture_output=True, text=True)
    res["mlx"] = ver.stdout.strip() or ver.stderr.strip()[-300:]
    print(f"model {name}; mlx, mlx-lm, device: {res['mlx']}; gpu: {res['gpu']}", flush=True)
    # A timeout's SIGTERM still stops the server under test and writes what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for which in a.servers.split(","):
            run_server(a, name, which, res)
    finally:
        print(write(a, res, name), flush=True)


def run_server(a, name, which, res):
    """Starts `which`, runs the conversations and the decode runs, keeping each
    sample in res as it comes (a timeout keeps what was measured)."""
    t0 = time.time()
    if which == "kvserve":
        cmd = [a.kvserve, "serve", "--model", a.model, "--port", "{port}"] + a.kvserve_args.split()
        server = compare.Server("kvserve", name, cmd, "/health")
    else:
        cmd = [a.mlx_python, "-m", "mlx_lm.server", "--model", a.model, "--port", "{port}", "--host", "127.0.0.1"]
        server = compare.Server("mlx-lm", a.model, cmd, "/v1/models")
    d = res["servers"][which] = {"start_s": time.time() - t0, "conversations": [], "decode": [], "peak_mb": None}
    try:
        for r in range(a.reps):
            system = f"Conversation {which}-{r} ({uuid.uuid4().hex[:8]}).\n" + compare.system_text(a.system_tokens)
            s = compare.Session(server.model, system, False, f"{which}{r}", "", max_tokens=16, tools=True, temperature=0.0)
            d["conversations"].append(compare.run_session(server, s, 2, label=f"conversation {r + 1} "))
        for _ in range(a.reps):
            d["decode"] += compare.decode(server, 1, a.decode_tokens)
    finally:
        d["peak_mb"] = server.stop()
        try:  # whatever it left behind (mlx_lm.server can outlive SIGTERM mid-request)
            os.killpg(server.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        write(a, res, name)


def write(a, res, name):
    rows = []
    for which, d in res["servers"].items():
        cold = [c[0] for c in d["conversations"]]
        warm = [c[1] for c in d["conversations"] if len(c) > 1]
        rows.append((which, med([c["ttft"] for c in cold]), med([c["prompt"] for c in cold]), med([w["ttft"] for w in warm]),
                     med([w["cached"] for w in warm]), med([w["prompt"] for w in warm]), med([x["decode_tps"] for x in d["decode"]]),
                     med([x["generated"] for x in d["decode"]]), d["peak_mb"], d["start_s"]))
    lines = [f"# kvserve vs mlx_lm.server: {res['date']}", "",
             f"GPU: {res['gpu'] or 'none found'}. Model: {name}. MLX, mlx-lm and default device as mlx-lm sees them: {res['mlx']}.", "",
             f"Medians of {a.reps}. Cold: a ~{a.system_tokens}-token Claude Code-shaped request no cache holds; warm: its next turn; "
             f"TTFT from sending to the first streamed text. Decode: {a.decode_tokens} tokens, greedy, short prompt.", "",
             "| server | cold TTFT | cold prompt tokens | warm TTFT | warm cached / prompt tokens | decode tok/s | tokens decoded | peak RSS | start-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w, ct, cp, wt, wc, wp, dt, dn, peak, st in rows:
        lines.append(f"| {w} | {fmt(ct, ' s')} | {fmt(cp)} | {fmt(wt, ' s')} | {fmt(wc)} / {fmt(wp)} | {fmt(dt)} | {fmt(dn)} | "
                     f"{fmt(peak, ' MB')} | {fmt(st, ' s')} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    return text


if __name__ == "__main__":
    main()
