//! The config file: `$XDG_CONFIG_HOME/kvserve/config.toml` (or `--config
//! FILE`) holds the flags' keys per command; the command line overrides it;
//! an unknown key is an error naming it; `kvserve check` says which file it
//! read.

mod common;

use common::{get, post, Server};
use serde_json::json;
use std::path::Path;

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kvserve-config-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("kvserve")).unwrap();
    d
}

fn kvserve(xdg: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve")).env("XDG_CONFIG_HOME", xdg).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_config_file_sets_flags_the_command_line_overrides() {
    let xdg = dir("ok");
    let model = common::smollm2_dir();
    let cfg = format!(
        "[serve]\nmodel = {:?}\nalias = [\"from-config\"]\nstrict_model = true\nmax-body = \"1K\"\n\n[claude]\ncontext = 32768\n",
        model.to_str().unwrap()
    );
    std::fs::write(xdg.join("kvserve/config.toml"), cfg).unwrap();
    // No --model on the command line: it comes from the file. --max-body from the command line wins over the file's 1K.
    let s = Server::start_env(&["--max-body", "200K"], None, &[("XDG_CONFIG_HOME", &xdg)]);
    let ids: Vec<String> = get(&s.addr, "/v1/models").json()["data"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["SmolLM2-135M-Instruct", "from-config"]);
    let body = json!({"model": "from-config", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi ".repeat(400)}]});
    assert_eq!(post(&s.addr, "/v1/messages", &body).status, 200, "the alias from the file, and a body over 1K: the command line's limit won");
    let other = post(&s.addr, "/v1/messages", &json!({"model": "gpt-9", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}));
    assert_eq!(other.status, 404, "strict_model from the file: {}", other.body);
    drop(s);

    // The environment and conflicting flags win too: KVSERVE_API_KEY over the file's api-key,
    // and --proxy on the command line leaves out the file's model (no conflict error).
    std::fs::write(xdg.join("kvserve/config.toml"), format!("[serve]\nmodel = {:?}\napi-key = \"from-file\"\n", model.to_str().unwrap())).unwrap();
    let env_key = std::path::PathBuf::from("from-env");
    let s = Server::start_env(&[], None, &[("XDG_CONFIG_HOME", &xdg), ("KVSERVE_API_KEY", &env_key)]);
    let with = |k: &str| common::request_raw(&s.addr, "GET", "/v1/models", &[("x-api-key", k)], b"").status;
    assert_eq!((with("from-env"), with("from-file")), (200, 401));
    drop(s);
    let p = Server::start_env(&["--proxy", "http://127.0.0.1:9"], None, &[("XDG_CONFIG_HOME", &xdg)]);
    assert!(p.stdout.iter().any(|l| l.contains("proxy to http://127.0.0.1:9")), "{:?}", p.stdout);
    drop(p);
    std::fs::write(xdg.join("kvserve/config.toml"), format!("[serve]\nmodel = {:?}\nalias = [\"from-config\"]\n", model.to_str().unwrap())).unwrap();

    // `kvserve check` says which file it read (its first line, before the model is loaded).
    let (_, out) = kvserve(&xdg, &["check", "--model", "/nonexistent/model"]);
    assert!(out.contains(&format!("[pass] config file read: {}", xdg.join("kvserve/config.toml").display())), "{out}");
    let empty = dir("none");
    let (_, out) = kvserve(&empty, &["check", "--model", "/nonexistent/model"]);
    assert!(out.contains("[info] no config file read"), "{out}");

    // `kvserve claude` takes its [claude] section (the window); the server it starts reads no
    // config file, so the [serve] API key does not lock Claude Code out.
    std::fs::write(
        xdg.join("kvserve/config.toml"),
        format!("[serve]\napi-key = \"locked\"\n\n[claude]\nmodel = {:?}\ncontext = 16384\nno-cache-dir = true\n", model.to_str().unwrap()),
    )
    .unwrap();
    let fake = xdg.join("claude");
    std::fs::write(
        &fake,
        "#!/usr/bin/env python3\nimport json, os, urllib.request\nurl = os.environ['ANTHROPIC_BASE_URL']\n\
         body = json.dumps({'model': 'm', 'max_tokens': 2, 'messages': [{'role': 'user', 'content': 'Hi'}]}).encode()\n\
         req = urllib.request.Request(url + '/v1/messages', data=body, headers={'content-type': 'application/json', 'authorization': 'Bearer ' + os.environ['ANTHROPIC_AUTH_TOKEN']})\n\
         print('answer', json.load(urllib.request.urlopen(req, timeout=60))['type'])\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .env("XDG_CONFIG_HOME", &xdg)
        .env("KVSERVE_CLAUDE", &fake)
        .args(["claude", "--", "-p", "hi"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("answer message"), "{stdout}\n{stderr}");
    assert!(stderr.contains("CLAUDE_CODE_MAX_CONTEXT_TOKENS=16384") && stderr.contains("prompt cache: ") && !stderr.contains("persisted in"), "{stderr}");

    // Mistakes name the key, the section or the file.
    std::fs::write(xdg.join("kvserve/config.toml"), "[serve]\nprot = 9000\n").unwrap();
    let (ok, out) = kvserve(&xdg, &["serve", "--model", model.to_str().unwrap(), "--port", "0"]);
    assert!(!ok && out.contains("[serve] has an unknown key 'prot'") && out.contains("takes: model, proxy"), "{out}");
    std::fs::write(xdg.join("kvserve/config.toml"), "[sever]\nport = 1\n").unwrap();
    let (ok, out) = kvserve(&xdg, &["report", "--json"]);
    assert!(!ok && out.contains("unknown section [sever]"), "{out}");
    let (ok, out) = kvserve(&empty, &["--config", "/nonexistent/kvserve.toml", "serve", "--model", "m"]);
    assert!(!ok && out.contains("--config /nonexistent/kvserve.toml: no such file"), "{out}");
    let _ = std::fs::remove_dir_all(&xdg);
    let _ = std::fs::remove_dir_all(&empty);
}
