//! The per-user snapshot folder (`--cache-dir auto`, `kvserve claude`'s
//! default) and its disk bound: each model's snapshots go to a folder named
//! by its fingerprint under `$XDG_CACHE_HOME/kvserve/kv`; past
//! `--cache-disk-bytes` the least recently used files are deleted; a
//! restarted server reads what is left; `kvserve cache ls|rm|clear` show and
//! prune it.

mod common;

use common::{post, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn snapshot_files(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = vec![];
    for d in std::fs::read_dir(root).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        for f in std::fs::read_dir(&d).unwrap().flatten().map(|e| e.path()) {
            if f.extension().is_some_and(|e| e == "safetensors") {
                out.push((f.clone(), std::fs::metadata(&f).unwrap().len()));
            }
        }
    }
    out
}

fn ask(addr: &str, topic: &str) -> Value {
    let text = format!("Here are my notes about {topic}. ").repeat(12) + &format!("Tell me one fact about {topic}.");
    let r = post(addr, "/v1/messages", &json!({"model": "any-name", "max_tokens": 3, "messages": [{"role": "user", "content": text}]}));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn kvserve(xdg: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve")).env("XDG_CACHE_HOME", xdg).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvserve {args:?}: {text}");
    text
}

/// Wait until the server has written every snapshot (it writes while idle).
fn written(s: &Server) {
    let t0 = std::time::Instant::now();
    loop {
        let c = &common::get(&s.addr, "/v1/requests/recent").json()["cache"];
        if c["disk_busy"] == false && c["on_disk"].as_u64() >= Some(1) {
            return;
        }
        assert!(t0.elapsed().as_secs() < 30, "the snapshots were not written: {c}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn the_per_user_folder_is_bounded_and_read_back_after_a_restart() {
    let xdg = std::env::temp_dir().join(format!("kvserve-xdg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&xdg);
    let root = xdg.join("kvserve/kv");
    let model = common::smollm2_dir();
    // About 2.8 MB a snapshot of these prompts: room for two.
    let bound = 6_000_000u64;
    let args = ["--model", model.to_str().unwrap(), "--cache-dir", "auto", "--cache-disk-bytes", "6000000"];
    let s = Server::start_env(&args, None, &[("XDG_CACHE_HOME", &xdg)]);
    let line = s.stdout.iter().find(|l| l.starts_with("prompt cache:")).unwrap().clone();
    let folder = line.split("persisted in ").nth(1).unwrap_or_else(|| panic!("{line}")).trim().to_string();
    let key = Path::new(&folder).file_name().unwrap().to_string_lossy().to_string();
    assert!(folder.starts_with(root.to_str().unwrap()) && key.len() == 16 && key.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
    assert!(Path::new(&folder).join("model.json").exists());

    let topics = ["rivers", "castles", "comets", "gardens"];
    let mut sizes = vec![];
    for t in topics {
        let r = ask(&s.addr, t);
        // At most the chat template's shared header comes from the cache.
        assert!(r["usage"]["cache_read_input_tokens"].as_u64().unwrap() < 40, "{t}: {r}");
        written(&s);
        sizes.push(snapshot_files(&root).iter().map(|f| f.1).sum::<u64>());
    }
    let files = snapshot_files(&root);
    let total: u64 = files.iter().map(|f| f.1).sum();
    eprintln!("bytes on disk after each request: {sizes:?}; files left: {}", files.len());
    assert!(total <= bound, "{total} bytes on disk, bound {bound}");
    assert!(files.len() >= 1 && files.len() < topics.len(), "the oldest were deleted: {files:?}");
    // Without the bound all four would be there.
    assert!(sizes[0] * 4 > bound, "the test's prompts are too small to exceed the bound: {sizes:?}");
    s.stop();

    // A new server reads the newest back from disk; the oldest was deleted.
    let s = Server::start_env(&args, None, &[("XDG_CACHE_HOME", &xdg)]);
    let last = ask(&s.addr, "gardens");
    assert!(last["usage"]["cache_read_input_tokens"].as_u64().unwrap() > 100, "read from disk after the restart: {last}");
    let first = ask(&s.addr, "rivers");
    assert!(first["usage"]["cache_read_input_tokens"].as_u64().unwrap() < 40, "rivers was deleted to stay within the bound: {first}");
    written(&s);
    s.stop();
    assert!(snapshot_files(&root).iter().map(|f| f.1).sum::<u64>() <= bound);

    // kvserve cache ls | rm | clear.
    let ls = kvserve(&xdg, &["cache", "ls"]);
    let n = snapshot_files(&root).len();
    assert!(ls.contains(&format!("{key}  {n} snapshots")) && ls.contains(model.to_str().unwrap()), "{ls}");
    let rm = kvserve(&xdg, &["cache", "rm", &key[..6]]);
    assert!(rm.contains(&format!("removed {folder} ({n} snapshots")), "{rm}");
    assert!(!Path::new(&folder).exists());
    assert!(kvserve(&xdg, &["cache", "ls"]).contains("(no snapshots)"));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve")).env("XDG_CACHE_HOME", &xdg).args(["cache", "rm", "nothing-like-it"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("no model folder"), "{bad:?}");
    assert!(kvserve(&xdg, &["cache", "clear"]).contains("removed 0 snapshots"));
    let _ = std::fs::remove_dir_all(&xdg);
}
