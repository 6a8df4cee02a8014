//! `kvserve claude` is the supervisor of the server it starts: a server that
//! dies while Claude Code runs (here: SIGKILL, as the OOM killer would) is
//! started again on the same port, and Claude Code's next request is
//! answered. A stand-in for Claude Code (a Python script given as
//! `KVSERVE_CLAUDE`) does the killing and the checking.

mod common;

use std::process::Command;

/// What every stand-in for Claude Code here starts with: the server's /health, or None.
const HEALTH_PY: &str = r#"#!/usr/bin/env python3
import json, os, signal, sys, time, urllib.request
url = os.environ["ANTHROPIC_BASE_URL"]
def health():
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return json.load(r)
    except Exception:
        return None
"#;

const FAKE_CLAUDE: &str = r#"old = health()["pid"]
os.kill(old, signal.SIGKILL)
deadline = time.time() + 120
new = None
while time.time() < deadline:
    h = health()
    if h and h.get("pid") not in (None, old):
        new = h["pid"]
        break
    time.sleep(0.2)
if new is None:
    print("the server was not restarted")
    sys.exit(3)
body = json.dumps({"model": os.environ["ANTHROPIC_MODEL"], "max_tokens": 4,
                   "messages": [{"role": "user", "content": "Hi"}]}).encode()
req = urllib.request.Request(url + "/v1/messages", data=body, headers={"content-type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    answer = json.load(r)
print(f"restarted {old} -> {new}; answer {answer['type']} {answer['stop_reason']}")
"#;

/// A scratch folder holding `script` as the `claude` executable, and the
/// `kvserve claude` command that runs it against SmolLM2 (snapshots in the
/// folder, not the user's cache).
fn with_fake_claude(name: &str, script: &str) -> (std::path::PathBuf, Command) {
    let dir = std::env::temp_dir().join(format!("kvserve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("claude");
    std::fs::write(&fake, script).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvserve"));
    cmd.env("KVSERVE_CLAUDE", &fake)
        .env("KVSERVE_LOG", "warn")
        .env("XDG_CACHE_HOME", &dir)
        .args(["claude", "--model", common::smollm2_dir().to_str().unwrap(), "--", "-p", "hi"]);
    (dir, cmd)
}

#[test]
fn a_server_killed_during_a_session_is_started_again_on_the_same_port() {
    let (dir, mut cmd) = with_fake_claude("restart", &format!("{HEALTH_PY}{FAKE_CLAUDE}"));
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kvserve claude failed ({}): {stdout}\n{stderr}", out.status);
    let line = stdout.lines().find(|l| l.starts_with("restarted ")).unwrap_or_else(|| panic!("{stdout}\n{stderr}"));
    assert!(line.ends_with("; answer message end_turn") || line.ends_with("; answer message max_tokens"), "{line}");
    assert!(stderr.contains("the server exited (signal: 9") && stderr.contains("starting it again on port"), "{stderr}");
    // Snapshots persist by default, in the per-user folder, one folder per model.
    let folder = dir.join("kvserve/kv");
    assert!(stderr.contains(&format!("persisted in {}/", folder.display())), "{stderr}");
    // Both servers are gone once Claude Code has exited.
    let pids: Vec<&str> = line["restarted ".len()..].split(';').next().unwrap().split(" -> ").collect();
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "server {pid} is still running");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills the server each time it comes back; prints how many kills it took
/// until the server stayed down.
const KILLER_CLAUDE: &str = r#"kills, seen = 0, set()
deadline = time.time() + 60
while time.time() < deadline:
    h = health()
    if h and h["pid"] not in seen:
        seen.add(h["pid"])
        os.kill(h["pid"], signal.SIGKILL)
        kills += 1
        quiet = time.time()
    elif kills and time.time() - quiet > 8:
        break
    time.sleep(0.1)
print(f"kills {kills}; up after: {health() is not None}")
"#;

#[test]
fn a_server_that_keeps_dying_is_given_up_after_three_exits_in_a_minute() {
    let (dir, mut cmd) = with_fake_claude("giveup", &format!("{HEALTH_PY}{KILLER_CLAUDE}"));
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("kills 3; up after: False"), "{stdout}\n{stderr}");
    assert_eq!(stderr.matches("starting it again on port").count(), 2, "{stderr}");
    assert!(stderr.contains("exited (signal: 9 (SIGKILL)) 3 times within 60 s; not restarting it again"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prints the server's pid and its own, then waits to be killed.
const WAITING_CLAUDE: &str = r#"print("server", health()["pid"], "claude", os.getpid(), flush=True)
time.sleep(120)
"#;

/// Running, as opposed to gone or a zombie waiting to be reaped.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

#[test]
fn the_server_stops_when_kvserve_claude_is_killed_without_a_chance_to_stop_it() {
    let (dir, mut cmd) = with_fake_claude("orphan", &format!("{HEALTH_PY}{WAITING_CLAUDE}"));
    let mut launcher = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(launcher.stdout.take().unwrap()), &mut line).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let (server, claude): (u32, u32) = (words[1].parse().unwrap(), words[3].parse().unwrap());
    assert!(running(server), "{line}");
    // As a closed terminal or the OOM killer would: no chance to stop the server.
    let _ = launcher.kill();
    let _ = launcher.wait();
    let t0 = std::time::Instant::now();
    while running(server) && t0.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let gone = !running(server);
    kvserve::mlx::send_signal(claude, libc::SIGKILL);
    assert!(gone, "server {server} still runs 20 s after its launcher was killed");
    eprintln!("server stopped {:.1} s after its launcher was killed", t0.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
}
