//! The real Claude Code (npm @anthropic-ai/claude-code, `make claude-code`)
//! in headless mode through `kvserve claude` against the real SmolLM2: it
//! exits 0 and prints the model's text; its second turn (`--continue`, a new
//! server process reading snapshots from --cache-dir) is served mostly from
//! the cache. Claude Code's prompt is longer than SmolLM2's 8K context as
//! soon as tools render, so the server runs with a 32K context override.

mod common;

use std::process::Command;

/// (prompt tokens, tokens read from cache) of each request in the server log.
fn requests(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("prompt ")? + 7..];
            let (n, rest) = rest.split_once(" tokens (")?;
            let (read, _) = rest.split_once(" from cache")?;
            Some((n.parse().ok()?, read.parse().ok()?))
        })
        .collect()
}

fn claude(home: &std::path::Path, cache: &std::path::Path, args: &[&str]) -> (String, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .current_dir(home)
        .env("HOME", home)
        .env("KVSERVE_CLAUDE", root.join("tools/claude-code/node_modules/.bin/claude"))
        .env("KVSERVE_LOG", "info")
        .env_remove("XDG_DATA_HOME")
        .args(["claude", "--model", common::smollm2_dir().to_str().unwrap(), "--context", "32768", "--cache-dir"])
        .arg(cache)
        .arg("--")
        .args(args)
        .output()
        .expect("run kvserve claude (make claude-code)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "claude failed ({}): {stdout}\n{stderr}", out.status);
    (stdout, stderr)
}

#[test]
fn claude_code_runs_and_its_second_turn_reads_the_cache() {
    let home = std::env::temp_dir().join(format!("kvserve-cc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let cache = home.join("kv");
    let t0 = std::time::Instant::now();
    let (out1, log1) = claude(&home, &cache, &["-p", "Say hello in five words."]);
    let turn1 = t0.elapsed().as_secs_f64();
    assert!(!out1.trim().is_empty(), "no text printed: {log1}");
    // Claude Code is told the served window, so it no longer assumes 1M tokens for an unknown name.
    assert!(log1.contains("CLAUDE_CODE_MAX_CONTEXT_TOKENS=32768") && log1.contains("CLAUDE_CODE_MAX_OUTPUT_TOKENS=4096"), "{log1}");
    // (Its one-line `[claude-code:unrecognized_model]` catalog signal still prints: that is
    // about the name, not the window, and only Claude Code's own settings can map a name.)
    assert!(!log1.contains("doesn't recognize the model") && !log1.contains("context window of 1m"), "the unknown-model notice is back: {log1}");
    let r1 = requests(&log1);
    assert!(r1.iter().any(|&(n, _)| n > 2000), "turn 1 requests: {r1:?}\n{log1}");
    let t1 = std::time::Instant::now();
    let (out2, log2) = claude(&home, &cache, &["-p", "--continue", "And what day is tomorrow?"]);
    let turn2 = t1.elapsed().as_secs_f64();
    assert!(!out2.trim().is_empty(), "no text printed: {log2}");
    let r2 = requests(&log2);
    let &(n, read) = r2.iter().max_by_key(|r| r.0).expect("turn 2 made a request");
    eprintln!("turn 1: {turn1:.1}s {r1:?}; turn 2: {turn2:.1}s {r2:?}; answers {out1:?} {out2:?}");
    assert!(read * 100 >= n * 90, "turn 2 read {read} of {n} prompt tokens from the cache");

    // The traces (the server's default folder under this HOME) say the same,
    // and `kvserve report` prints those numbers.
    let traces = home.join(".local/share/kvserve/traces");
    let records = kvserve::server::trace::read_all(&traces).expect("traces were written");
    let gens: Vec<&serde_json::Value> = records.iter().filter(|r| r.get("prompt_tokens").is_some()).collect();
    let last = gens.iter().max_by(|a, b| a["time"].as_f64().unwrap().total_cmp(&b["time"].as_f64().unwrap())).unwrap();
    let (tn, tr) = (last["prompt_tokens"].as_u64().unwrap(), last["cache_read_tokens"].as_u64().unwrap());
    assert!(tr * 100 >= tn * 90, "trace of turn 2: {last}");
    let rep = Command::new(env!("CARGO_BIN_EXE_kvserve")).env("HOME", &home).args(["report", "--detail"]).output().unwrap();
    let text = String::from_utf8_lossy(&rep.stdout);
    eprintln!("{text}");
    assert!(rep.status.success() && text.contains(&format!("read {tr} computed {}", tn - tr)), "{text}");
    // The chart of the same session, kept under target/ to look at.
    let shown = records.iter().filter(|r| kvserve::report::answered(r) && r["ttft_s"].is_number() && r.get("prompt_tokens").is_some()).count();
    for ext in ["svg", "png"] {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/claude-code-report.{ext}"));
        let rep = Command::new(env!("CARGO_BIN_EXE_kvserve")).env("HOME", &home).args(["report", "--plot"]).arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&rep.stderr);
        assert!(rep.status.success() && err.contains(&format!("({shown} requests)")), "{err}");
        assert!(std::fs::metadata(&file).unwrap().len() > 10_000, "{} is nearly empty", file.display());
    }
    let _ = std::fs::remove_dir_all(&home);
}
