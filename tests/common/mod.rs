//! Shared helpers for tests that use generated fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

/// Where `make fixtures` put the generated models (tiny mlx-lm models, the
/// converted SmolLM2). Missing fixtures fail the test: run `make fixtures`.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("KVSERVE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"));
    assert!(dir.is_dir(), "fixtures missing at {}: run `make fixtures`", dir.display());
    dir
}

/// The real default model (`make model`).
pub fn smollm2_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    assert!(dir.join("config.json").exists(), "run `make model` first");
    dir
}

/// A `kvserve serve` process on a free port; killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
    pub stdout: Vec<String>,
}

impl Server {
    /// Start the server binary with `args` after `serve --port 0`.
    pub fn start(args: &[&str]) -> Server {
        Self::start_logging(args, None)
    }

    /// [`start`](Self::start), with the server's log (stderr) going to `log`.
    pub fn start_logging(args: &[&str], log: Option<&std::path::Path>) -> Server {
        Self::start_env(args, log, &[])
    }

    /// [`start_logging`](Self::start_logging), with these environment variables set.
    pub fn start_env(args: &[&str], log: Option<&std::path::Path>, env: &[(&str, &std::path::Path)]) -> Server {
        use std::io::BufRead;
        let stderr = match log {
            Some(p) => std::process::Stdio::from(std::fs::File::create(p).unwrap()),
            None => std::process::Stdio::inherit(),
        };
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve"));
        // The developer's own config file must not change what tests see
        // (tests/config_file.rs gives its own XDG_CONFIG_HOME).
        if !env.iter().any(|(k, _)| *k == "XDG_CONFIG_HOME") {
            cmd.env("KVSERVE_NO_CONFIG", "1");
        }
        let mut child = cmd
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .args(if args.contains(&"--trace-dir") { &[][..] } else { &["--no-trace"][..] })
            .env("KVSERVE_LOG", "warn")
            .env_remove("KVSERVE_API_KEY")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start kvserve");
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(out).lines();
        let mut stdout = vec![];
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                let status = child.wait().unwrap();
                panic!("kvserve exited before listening ({status}); output: {stdout:?}");
            };
            stdout.push(line.clone());
            if let Some(a) = line.strip_prefix("kvserve listening on http://") {
                break a.trim().to_string();
            }
        };
        // Read the remaining start-up lines (model, cache, Claude Code hint, traces).
        for _ in 0..(3 + usize::from(args.contains(&"--trace-dir"))) {
            if let Some(Ok(line)) = lines.next() {
                stdout.push(line);
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr, stdout }
    }

    /// Stop with SIGTERM (snapshots are flushed) and wait for the exit.
    pub fn stop(mut self) {
        send_sigterm(self.child.id());
        let _ = self.child.wait();
    }
}

fn send_sigterm(pid: u32) {
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// Server-sent events as (event name, data).
    pub fn events(&self) -> Vec<(String, String)> {
        self.body
            .split("\n\n")
            .filter(|b| !b.trim().is_empty() && !b.starts_with(':'))
            .map(|b| {
                let mut ev = String::new();
                let mut data = String::new();
                for line in b.lines() {
                    if let Some(e) = line.strip_prefix("event: ") {
                        ev = e.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = d.to_string();
                    }
                }
                (ev, data)
            })
            .collect()
    }
}

/// Send one HTTP/1.1 request with raw bytes as the body (through the crate's
/// own client); read the whole reply.
pub fn request_raw(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    try_request(addr, method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`request_raw`], or the client's error (nothing listens, the connection was cut).
pub fn try_request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Reply, String> {
    use kvserve::server::client;
    let method = hyper::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let r = client::fetch_blocking(method, &format!("http://{addr}{path}"), headers, body.to_vec(), std::time::Duration::from_secs(900))
        .map_err(|e| e.to_string())?;
    let headers = r.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
    Ok(Reply { status: r.status, headers, body: String::from_utf8(r.body.to_vec()).expect("UTF-8 body") })
}

/// A reply read off a raw socket: the head, then the body (chunks joined).
pub fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        let mut out = vec![];
        let mut rest = &body[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 2 + size + 2..];
        }
        body = out;
    }
    Reply { status, headers, body: String::from_utf8(body).expect("UTF-8 body") }
}

pub fn post(addr: &str, path: &str, body: &serde_json::Value) -> Reply {
    request_raw(addr, "POST", path, &[("content-type", "application/json")], body.to_string().as_bytes())
}

pub fn get(addr: &str, path: &str) -> Reply {
    request_raw(addr, "GET", path, &[], b"")
}

/// Run a script in tests/reference with the project venv's Python; returns
/// its output, after asserting it succeeded and printed `done_line`.
pub fn run_reference_script(script: &str, args: &[String], done_line: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/reference").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script} (make venv): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed");
    assert!(stdout.contains(done_line), "{script} did not finish");
    stdout
}

/// GET `path` as JSON, or `None` while nothing answers there (a server restarting).
pub fn request_ok(addr: &str, path: &str) -> Option<serde_json::Value> {
    use kvserve::server::client;
    let r = client::fetch_blocking(hyper::Method::GET, &format!("http://{addr}{path}"), &[], Vec::new(), std::time::Duration::from_secs(10)).ok()?;
    (r.status == 200).then(|| serde_json::from_slice(&r.body).ok()).flatten()
}

/// An MLX ring hostfile of `ranks` ranks on 127.0.0.1, written to a temp
/// file named after `name`. Each test that joins a ring has its own `slot`
/// (0..16, across the test files), and each test process its own ports, so
/// tests running at once never share a port: a rank that meets another
/// ring's rank joins the wrong ring. The ports stay below 32768, where
/// Linux's outgoing connections take their local ports (a rank once failed
/// to bind 34670, held by another connection: error 98).
pub fn ring_hostfile(name: &str, slot: usize, ranks: usize) -> PathBuf {
    assert!(slot < 16 && ranks <= 5, "slot {slot}, {ranks} ranks: beyond the port ranges");
    let base = 20000 + (std::process::id() % 150) as usize * 80 + slot * 5;
    let list: Vec<Vec<String>> = (0..ranks).map(|r| vec![format!("127.0.0.1:{}", base + r)]).collect();
    let path = std::env::temp_dir().join(format!("kvserve-ring-{name}-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_string(&list).unwrap()).unwrap();
    path
}

/// A scripted OpenAI-compatible upstream on loopback: for each request it
/// calls `script` with the request body and writes the pieces it returns as
/// separate writes (each after its delay), then closes the connection, so a
/// proxy in front of it sees exactly those network frames.
pub struct FakeUpstream {
    pub addr: String,
}

pub type Pieces = Vec<(std::time::Duration, Vec<u8>)>;

impl FakeUpstream {
    pub fn start(script: fn(&str) -> Pieces) -> FakeUpstream {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                std::thread::spawn(move || Self::answer(s, script));
            }
        });
        FakeUpstream { addr }
    }

    fn answer(mut s: std::net::TcpStream, script: fn(&str) -> Pieces) {
        use std::io::{Read, Write};
        s.set_nodelay(true).unwrap();
        let mut raw = vec![];
        let mut buf = [0u8; 65536];
        let body = loop {
            let Ok(n) = s.read(&mut buf) else { return };
            if n == 0 {
                return;
            }
            raw.extend_from_slice(&buf[..n]);
            let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            if raw.len() >= end + 4 + len {
                break String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).to_string();
            }
        };
        for (delay, bytes) in script(&body) {
            std::thread::sleep(delay);
            if s.write_all(&bytes).and_then(|_| s.flush()).is_err() {
                return;
            }
        }
    }
}

/// A process's resident memory in KiB (Linux's /proc).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}
