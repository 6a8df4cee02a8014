//! `kvserve claude`: start the server (or use one already running), then run
//! Claude Code against it with the environment it needs, restart the server
//! if it exits meanwhile, and stop it when Claude Code exits.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn context_from_each_servers_model_list() {
        let kv = json!({"data": [{"id": "m", "context_length": 8192}, {"id": "alias", "context_length": 8192}]});
        assert_eq!(context_in(&kv, Some("m")), Some(8192));
        let vllm = json!({"data": [{"id": "a", "max_model_len": 4096}, {"id": "b", "max_model_len": 32768}]});
        assert_eq!(context_in(&vllm, Some("b")), Some(32768));
        assert_eq!(context_in(&vllm, Some("missing")), Some(4096), "else the first entry");
        let lms = json!({"data": [{"id": "q", "max_context_length": 131072}]});
        assert_eq!(context_in(&lms, None), Some(131072));
        let llama = json!({"data": [{"id": "x.gguf", "meta": {"n_ctx_train": 8192}}]});
        assert_eq!(context_in(&llama, Some("x.gguf")), Some(8192));
        assert_eq!(context_in(&json!({"data": [{"id": "mlx"}]}), None), None);
        assert_eq!(context_in(&json!({"error": "no"}), None), None);
    }

    #[test]
    fn claude_is_told_the_window() {
        let env = claude_env("http://127.0.0.1:9", "m", "t", 32768);
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("ANTHROPIC_MODEL").as_deref(), Some("m"));
        if std::env::var_os("CLAUDE_CODE_MAX_CONTEXT_TOKENS").is_none() {
            assert_eq!(get("CLAUDE_CODE_MAX_CONTEXT_TOKENS").as_deref(), Some("32768"));
            assert_eq!(get("CLAUDE_CODE_AUTO_COMPACT_WINDOW"), None, "under 100K Claude Code would read it as 100K");
            assert_eq!(get("CLAUDE_CODE_MAX_OUTPUT_TOKENS").as_deref(), Some("4096"));
        }
        let big = claude_env("u", "m", "t", 131_072);
        if std::env::var_os("CLAUDE_CODE_AUTO_COMPACT_WINDOW").is_none() {
            assert!(big.contains(&("CLAUDE_CODE_AUTO_COMPACT_WINDOW", "131072".to_string())));
        }
        let small = claude_env("u", "m", "t", 1000);
        let out = small.iter().find(|(n, _)| *n == "CLAUDE_CODE_MAX_OUTPUT_TOKENS").map(|(_, v)| v.as_str());
        if std::env::var_os("CLAUDE_CODE_MAX_OUTPUT_TOKENS").is_none() {
            assert_eq!(out, Some("500"), "never more than half the window");
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LaunchError(pub String);

/// Set for the server `kvserve claude` starts: it reads no config file (its
/// flags come from `kvserve claude`, whose own `[claude]` section applies), so
/// a `[serve]` API key, say, cannot lock Claude Code out.
pub const NO_CONFIG: &str = "KVSERVE_NO_CONFIG";

/// Set for the server `kvserve claude` starts: the launcher's pid. The
/// server stops (as on SIGTERM, snapshots written) when that process is gone,
/// even if it was killed without a chance to stop it (a closed terminal's
/// SIGHUP, SIGKILL).
pub const PARENT: &str = "KVSERVE_PARENT_PID";

/// In a server started by `kvserve claude`: watch the launcher and stop
/// this process (SIGTERM to itself) once it is gone.
pub fn stop_with_launcher() {
    let Some(parent) = std::env::var(PARENT).ok().and_then(|p| p.parse::<u32>().ok()) else { return };
    let _ = std::thread::Builder::new().name("launcher-watch".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        if std::os::unix::process::parent_id() != parent {
            tracing::warn!("the kvserve claude that started this server (pid {parent}) is gone; stopping");
            crate::mlx::send_signal(std::process::id(), libc::SIGTERM);
            return;
        }
    });
}

/// Where the project's own `make claude-code` installs Claude Code.
pub const LOCAL_CLAUDE: &str = "tools/claude-code/node_modules/.bin/claude";

/// The `claude` executable: `$KVSERVE_CLAUDE`, then PATH, then the
/// project's own npm install (looked up from the current folder and from
/// this executable's folder upwards).
pub fn find_claude() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KVSERVE_CLAUDE").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("claude");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf))];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let p = dir.join(LOCAL_CLAUDE);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// A server started for the session, watched: if it exits while Claude Code
/// runs (MLX failed, it was killed), it is started again on the same port,
/// so Claude Code's next retry reaches it. Stopped (snapshots flushed) on drop.
pub struct StartedServer {
    child: Arc<Mutex<Child>>,
    stopping: Arc<AtomicBool>,
    monitor: Option<std::thread::JoinHandle<()>>,
    pub url: String,
    pub model: String,
}

impl Drop for StartedServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        {
            let mut child = self.child.lock();
            crate::mlx::send_signal(child.id(), libc::SIGTERM);
            let _ = child.wait();
        }
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
    }
}

/// The watcher gives up at this many exits within [`RESTART_WINDOW`] (a
/// server that cannot start would otherwise be retried forever).
const MAX_FAILURES: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Start `kvserve serve --port PORT ARGS` in its own process group (a Ctrl-C
/// meant for Claude Code does not reach it) and wait until it listens;
/// returns it with its URL and model.
fn spawn_server(port: u16, serve_args: &[String]) -> Result<(Child, String, String), LaunchError> {
    let exe = std::env::current_exe().map_err(|e| LaunchError(format!("cannot find the kvserve executable: {e}")))?;
    let mut cmd = Command::new(exe);
    // Claude Code is given its own token; a key in the environment would lock it out.
    cmd.arg("serve")
        .args(["--port", &port.to_string()])
        .args(serve_args)
        .env(NO_CONFIG, "1")
        .env(PARENT, std::process::id().to_string())
        .env_remove("KVSERVE_API_KEY")
        .stdout(Stdio::piped());
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|e| LaunchError(format!("cannot start the server: {e}")))?;
    let Some(out) = child.stdout.take() else {
        return Err(LaunchError("the server's output could not be read".into()));
    };
    let mut lines = BufReader::new(out).lines();
    let (mut url, mut model, mut cache) = (None, None, false);
    // Up to the prompt-cache line (where snapshots persist), echoed.
    while url.is_none() || model.is_none() || !cache {
        let Some(Ok(line)) = lines.next() else {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(LaunchError(format!("the server stopped before it was ready ({status}); see the messages above")));
        };
        if let Some(u) = line.strip_prefix("kvserve listening on ") {
            url = Some(u.trim().to_string());
        } else if let Some(m) = line.strip_prefix("model: ") {
            model = Some(m.split(" (").next().unwrap_or(m).trim().to_string());
        } else if line.starts_with("prompt cache: ") {
            cache = true;
        }
        eprintln!("{line}");
    }
    // Keep draining the server's stdout so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((child, url.unwrap_or_default(), model.unwrap_or_default()))
}

/// Start the server on a free port and watch it (see [`StartedServer`]).
pub fn start_server(serve_args: &[String]) -> Result<StartedServer, LaunchError> {
    let (child, url, model) = spawn_server(0, serve_args)?;
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .ok_or_else(|| LaunchError(format!("the server printed an address without a port: {url}")))?;
    let child = Arc::new(Mutex::new(child));
    let stopping = Arc::new(AtomicBool::new(false));
    let (c, s, args) = (child.clone(), stopping.clone(), serve_args.to_vec());
    let monitor = std::thread::Builder::new()
        .name("server-watch".into())
        .spawn(move || watch(c, s, port, args))
        .map_err(|e| LaunchError(format!("cannot watch the server: {e}")))?;
    Ok(StartedServer { child, stopping, monitor: Some(monitor), url, model })
}

/// Restart the server on `port` whenever it exits, until `stopping`.
fn watch(child: Arc<Mutex<Child>>, stopping: Arc<AtomicBool>, port: u16, args: Vec<String>) {
    let mut failures: Vec<Instant> = vec![];
    while !stopping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        let mut guard = child.lock();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let status = match guard.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("kvserve claude: cannot watch the server any more: {e}");
                return;
            }
        };
        failures.retain(|t| t.elapsed() < RESTART_WINDOW);
        failures.push(Instant::now());
        if failures.len() >= MAX_FAILURES {
            eprintln!(
                "kvserve claude: the server exited ({status}) {MAX_FAILURES} times within {} s; not restarting it again. \
                 Claude Code's requests will fail until you restart kvserve claude; see the server's messages above for why it stopped",
                RESTART_WINDOW.as_secs()
            );
            return;
        }
        eprintln!("kvserve claude: the server exited ({status}); starting it again on port {port} (it reads its snapshots back from disk)");
        match spawn_server(port, &args) {
            Ok((c, _, _)) => *guard = c,
            Err(e) => eprintln!("kvserve claude: {e}"),
        }
    }
}

/// Seconds a question to a server (its model list) may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(120);

/// A server's `GET /v1/models` list as JSON (`url`: `http://` or `https://`).
fn models_list(url: &str) -> Result<serde_json::Value, LaunchError> {
    use crate::server::client;
    let target = client::url(url.trim_end_matches('/').trim_end_matches("/v1"), "/v1/models").map_err(|e| LaunchError(e.to_string()))?;
    let reply = client::fetch_blocking(hyper::Method::GET, &target.to_string(), &[], bytes::Bytes::new(), ASK_TIMEOUT)
        .map_err(|e| LaunchError(e.to_string()))?;
    if reply.status != 200 {
        return Err(LaunchError(format!("{url} answered GET /v1/models with status {}: {}", reply.status, reply.text().chars().take(300).collect::<String>())));
    }
    serde_json::from_slice(&reply.body).map_err(|e| LaunchError(format!("{url} answered GET /v1/models with something that is not JSON: {e}")))
}

/// The model an already running server serves (GET /v1/models).
pub fn served_model(url: &str) -> Result<String, LaunchError> {
    let v = models_list(url)?;
    v["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| LaunchError(format!("{url} serves no model")))
}

/// The context window a model list reports for `model` (else its first
/// entry), under the names servers use: kvserve's `context_length`, vLLM's
/// `max_model_len`, LM Studio's `max_context_length`, llama.cpp's
/// `meta.n_ctx_train`.
pub fn context_in(list: &serde_json::Value, model: Option<&str>) -> Option<usize> {
    let data = list["data"].as_array()?;
    let entry = model.and_then(|m| data.iter().find(|e| e["id"] == m)).or(data.first())?;
    [&entry["context_length"], &entry["max_model_len"], &entry["max_context_length"], &entry["meta"]["n_ctx_train"]]
        .into_iter()
        .find_map(|v| v.as_u64())
        .filter(|&n| n > 0)
        .map(|n| n as usize)
}

/// The context window the server at `url` reports for `model`, if it does.
pub fn served_context(url: &str, model: Option<&str>) -> Result<Option<usize>, LaunchError> {
    Ok(context_in(&models_list(url)?, model))
}

/// The smallest `CLAUDE_CODE_AUTO_COMPACT_WINDOW` Claude Code takes as given.
pub const AUTO_COMPACT_MIN: usize = 100_000;

/// What Claude Code is told, in order: the server, the model for every
/// role, and the model's real window (so its auto-compaction fires before
/// the context overflows, and it does not assume 1M tokens for a name it
/// does not know). Variables the user already set are left as they are.
pub fn claude_env(url: &str, model: &str, token: &str, context: usize) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("ANTHROPIC_BASE_URL", url.to_string()),
        ("ANTHROPIC_AUTH_TOKEN", token.to_string()),
        ("ANTHROPIC_MODEL", model.to_string()),
        ("ANTHROPIC_DEFAULT_OPUS_MODEL", model.to_string()),
        ("ANTHROPIC_DEFAULT_SONNET_MODEL", model.to_string()),
        ("ANTHROPIC_DEFAULT_HAIKU_MODEL", model.to_string()),
        ("ANTHROPIC_SMALL_FAST_MODEL", model.to_string()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_string()),
        // Long prompts on a CPU take minutes the first time.
        ("API_TIMEOUT_MS", "3600000".to_string()),
    ];
    let mut own = vec![
        ("CLAUDE_CODE_MAX_CONTEXT_TOKENS", context),
        // An eighth of the window for the answer (Claude Code keeps that much free).
        ("CLAUDE_CODE_MAX_OUTPUT_TOKENS", (context / 8).clamp(1024, 32_000).min(context / 2)),
    ];
    // Claude Code 2.1.328 reads an auto-compact window under 100K as 100K (and
    // warns); below that it compacts within the model window set above.
    if context >= AUTO_COMPACT_MIN {
        own.push(("CLAUDE_CODE_AUTO_COMPACT_WINDOW", context));
    }
    for (k, v) in own {
        if std::env::var_os(k).is_none() {
            env.push((k, v.to_string()));
        }
    }
    env
}

/// Run Claude Code against `url` serving `model` with a `context`-token
/// window; returns its exit code.
pub fn run_claude(claude: &Path, url: &str, model: &str, token: &str, context: usize, args: &[String]) -> Result<i32, LaunchError> {
    let mut cmd = Command::new(claude);
    let env = claude_env(url, model, token, context);
    eprintln!(
        "environment for Claude Code: {}",
        env.iter().map(|(k, v)| if *k == "ANTHROPIC_AUTH_TOKEN" { format!("{k}=...") } else { format!("{k}={v}") }).collect::<Vec<_>>().join(" ")
    );
    cmd.args(args).envs(env).env_remove("ANTHROPIC_API_KEY");
    let mut child = cmd.spawn().map_err(|e| LaunchError(format!("cannot run {}: {e}", claude.display())))?;
    // Ctrl-C goes to Claude Code (same terminal); this process waits it out.
    crate::mlx::ignore_interrupt();
    let status = child.wait().map_err(|e| LaunchError(e.to_string()))?;
    Ok(status.code().unwrap_or(130))
}
