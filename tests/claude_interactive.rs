//! Real Claude Code, interactive, in tmux, through `kvserve claude` (the
//! per-user snapshot folder is the default): onboarding is settled by a
//! prepared scratch HOME; a prompt is typed and its answer read from the
//! pane; the server is then SIGKILLed (as the OOM killer would) and
//! `kvserve claude` starts it again; a second prompt is typed, answered, and
//! according to the traces its prompt was read from the snapshot the first
//! server wrote to disk. Every wait has a deadline.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(["-L", &self.socket]).args(args).output().expect("tmux (make test installs it)");
        String::from_utf8_lossy(&out.stdout).to_string()
    }
    /// The pane's text (Claude Code puts a no-break space after its `❯`).
    fn pane(&self) -> String {
        self.run(&["capture-pane", "-p", "-J", "-S", "-200", "-t", "kv"]).replace('\u{a0}', " ")
    }
    /// Type `text` and submit it: Enter again while it still sits in the
    /// input box (an Enter right after fast typing can be taken as pasted).
    fn keys(&self, text: &str) {
        self.run(&["send-keys", "-t", "kv", "-l", text]);
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(800));
            self.run(&["send-keys", "-t", "kv", "Enter"]);
            std::thread::sleep(Duration::from_millis(800));
            if !in_input_box(&self.pane(), text) {
                return;
            }
        }
        panic!("could not submit {text:?}; the pane:\n{}", self.pane());
    }
    /// Wait until `ok(pane)`; panics with the pane after `secs`.
    fn wait(&self, what: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let p = self.pane();
            if ok(&p) {
                return p;
            }
            assert!(t0.elapsed().as_secs() < secs, "waited {secs} s for {what}; the pane:\n{p}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// `text` is still typed into the input box (between its two rules), not sent.
fn in_input_box(pane: &str, text: &str) -> bool {
    let lines: Vec<&str> = pane.lines().collect();
    let rules: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.starts_with("────")).map(|(i, _)| i).collect();
    match rules[..] {
        [.., a, b] => lines[a..b].iter().any(|l| l.contains(text)),
        _ => false,
    }
}

/// The conversation after the submitted prompt `prompt`, up to the input box.
fn answer_after(pane: &str, prompt: &str) -> Option<String> {
    let lines: Vec<&str> = pane.lines().collect();
    let end = lines.iter().rposition(|l| l.starts_with("────")).unwrap_or(lines.len());
    let end = lines[..end].iter().rposition(|l| l.starts_with("────")).unwrap_or(end);
    let start = lines[..end].iter().rposition(|l| l.trim_start().starts_with(&format!("❯ {prompt}")))? + 1;
    Some(lines[start..end].iter().map(|l| l.trim_end()).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n"))
}

/// Claude Code has answered: a reply line (`● ...`) after the prompt and no turn running.
fn answered(pane: &str, prompt: &str) -> bool {
    answer_after(pane, prompt).is_some_and(|a| a.lines().any(|l| l.trim_start().starts_with('●'))) && !pane.contains("esc to interrupt")
}

fn server_addr(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| l.strip_prefix("kvserve listening on http://").map(|a| a.trim().to_string()))
}

fn traces(home: &Path) -> Vec<serde_json::Value> {
    kvserve::server::trace::read_all(&home.join(".local/share/kvserve/traces")).unwrap_or_default()
}

#[test]
fn an_interactive_session_survives_a_killed_server_and_reads_its_prefix_from_disk() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let claude = root.join("tools/claude-code/node_modules/.bin/claude");
    assert!(claude.exists(), "run `make claude-code`");
    let base = std::env::temp_dir().join(format!("kvserve-interactive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (home, work, xdg) = (base.join("home"), base.join("work"), base.join("xdg"));
    for d in [&home, &work, &xdg] {
        std::fs::create_dir_all(d).unwrap();
    }
    // Onboarding, theme and the folder's trust dialog already settled.
    let settings = serde_json::json!({
        "hasCompletedOnboarding": true, "theme": "dark", "numStartups": 5,
        "projects": {work.to_str().unwrap(): {"hasTrustDialogAccepted": true, "hasCompletedProjectOnboarding": true, "allowedTools": []}}
    });
    std::fs::write(home.join(".claude.json"), settings.to_string()).unwrap();
    let log = base.join("kvserve-claude.log");
    let cmd = format!(
        "cd {work} && HOME={home} XDG_CACHE_HOME={xdg} KVSERVE_CLAUDE={claude} KVSERVE_LOG=info CLAUDE_CODE_MAX_OUTPUT_TOKENS=40 \
         {exe} claude --model {model} --context 32768 2>{log}; sleep 600",
        work = work.display(),
        home = home.display(),
        xdg = xdg.display(),
        claude = claude.display(),
        exe = env!("CARGO_BIN_EXE_kvserve"),
        model = common::smollm2_dir().display(),
        log = log.display(),
    );
    let tmux = Tmux { socket: format!("kvserve-test-{}", std::process::id()) };
    tmux.run(&["new-session", "-d", "-s", "kv", "-x", "160", "-y", "50", &cmd]);
    tmux.wait("Claude Code's input box", 90, |p| p.contains("Claude Code v") && p.lines().any(|l| l.starts_with("❯")));

    // Turn 1: Claude Code's whole prompt is computed (cold).
    let q1 = "Say hello in five words.";
    tmux.keys(q1);
    let pane1 = tmux.wait("the first answer", 240, |p| answered(p, q1));
    let a1 = answer_after(&pane1, q1).unwrap_or_default();
    let addr = server_addr(&log).expect("the server's address in the log");
    let health = common::get(&addr, "/health").json();
    let pid = health["pid"].as_u64().unwrap() as u32;
    // Its snapshot reaches the disk while the server is idle.
    let t0 = Instant::now();
    loop {
        let c = &common::get(&addr, "/v1/requests/recent").json()["cache"];
        if c["disk_busy"] == false && c["on_disk"].as_u64() >= Some(1) {
            break;
        }
        assert!(t0.elapsed().as_secs() < 30, "no snapshot written: {c}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The server dies between two turns.
    kvserve::mlx::os::send_signal(pid, libc::SIGKILL);
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("starting it again on port") && common::request_ok(&addr, "/health").is_some_and(|h| h["pid"].as_u64() != Some(pid as u64)) {
            break;
        }
        assert!(t0.elapsed().as_secs() < 60, "the server was not started again:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Turn 2 on the new server: the prefix comes from the first server's file.
    let q2 = "And what day is tomorrow?";
    tmux.keys(q2);
    let pane2 = tmux.wait("the second answer", 240, |p| answered(p, q2));
    let a2 = answer_after(&pane2, q2).unwrap_or_default();
    eprintln!("---- the pane ----\n{pane2}\n------------------");
    eprintln!("answer 1: {a1:?}\nanswer 2: {a2:?}");
    let recs = traces(&home);
    eprintln!("traces:");
    for r in &recs {
        eprintln!(
            "  {} status {} prompt {} read {} computed {} first token {:.2}s {}",
            kvserve::report::utc(r["time"].as_f64().unwrap_or(0.0)),
            r["status"],
            r["prompt_tokens"],
            r["cache_read_tokens"],
            r["computed_tokens"],
            r["ttft_s"].as_f64().unwrap_or(0.0),
            r["error"].as_str().unwrap_or("")
        );
    }
    let gens: Vec<&serde_json::Value> = recs.iter().filter(|r| r.get("prompt_tokens").is_some()).collect();
    let first = gens.iter().find(|r| r["prompt_tokens"].as_u64() > Some(2000)).expect("turn 1's request in the traces");
    assert!(first["cache_read_tokens"].as_u64().unwrap() * 2 < first["prompt_tokens"].as_u64().unwrap(), "turn 1 was cold: {first}");
    let last = gens.last().unwrap();
    let (n, read) = (last["prompt_tokens"].as_u64().unwrap(), last["cache_read_tokens"].as_u64().unwrap());
    assert!(n > first["prompt_tokens"].as_u64().unwrap(), "turn 2 extends turn 1: {last}");
    assert!(read * 100 >= n * 90, "turn 2 read {read} of {n} tokens from the cache (the first server's snapshot on disk)");
    tmux.keys("/exit");
    let _ = std::fs::remove_dir_all(&base);
}
