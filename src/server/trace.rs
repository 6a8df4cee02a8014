//! Request traces: one JSON line per request in `--trace-dir`, written by a
//! background thread into files that rotate by size. Bodies only with
//! `--trace-bodies`; the API key never reaches a file. A directory that
//! cannot be written is a warning, never a reason to stop serving.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// Where trace files go (`None`: tracing off).
    pub dir: Option<PathBuf>,
    /// Also record request and response bodies.
    pub bodies: bool,
    /// A file is closed and a new one started past this size.
    pub max_file_bytes: u64,
    /// Strings never written (the API key).
    pub redact: Vec<String>,
}

/// The default trace folder: `$XDG_DATA_HOME/kvserve/traces`, else
/// `~/.local/share/kvserve/traces`.
pub fn default_dir() -> Option<PathBuf> {
    crate::config::xdg_dir("XDG_DATA_HOME", ".local/share").map(|d| d.join("kvserve/traces"))
}

pub struct Tracer {
    tx: parking_lot::Mutex<Option<mpsc::Sender<String>>>,
    writer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    bodies: bool,
    redact: Vec<String>,
}

pub fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

struct Writer {
    dir: PathBuf,
    max: u64,
    file: Option<(std::fs::File, u64)>,
    warned: bool,
}

impl Writer {
    fn warn(&mut self, what: String) {
        if !self.warned {
            tracing::warn!("traces: {what}; serving goes on without them");
            self.warned = true;
        }
    }

    fn open(&mut self) -> Option<&mut (std::fs::File, u64)> {
        if self.file.as_ref().is_some_and(|(_, n)| *n >= self.max) {
            self.file = None;
        }
        if self.file.is_none() {
            if let Err(e) = std::fs::create_dir_all(&self.dir) {
                self.warn(format!("cannot create {}: {e}", self.dir.display()));
                return None;
            }
            let name = format!("trace-{:.6}.jsonl", now_secs());
            let path = self.dir.join(name);
            match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
                Ok(f) => self.file = Some((f, 0)),
                Err(e) => {
                    self.warn(format!("cannot write {}: {e}", path.display()));
                    return None;
                }
            }
        }
        self.file.as_mut()
    }

    fn write(&mut self, line: &str) {
        let Some((f, n)) = self.open() else { return };
        match f.write_all(line.as_bytes()).and_then(|_| f.write_all(b"\n")) {
            Ok(()) => *n += line.len() as u64 + 1,
            Err(e) => {
                self.file = None;
                self.warn(format!("write failed: {e}"));
            }
        }
    }
}

impl Tracer {
    pub fn off() -> Self {
        Tracer { tx: parking_lot::Mutex::new(None), writer: parking_lot::Mutex::new(None), bodies: false, redact: vec![] }
    }

    pub fn start(cfg: &TraceConfig) -> Self {
        let Some(dir) = cfg.dir.clone() else { return Self::off() };
        let (tx, rx) = mpsc::channel::<String>();
        let max = cfg.max_file_bytes.max(4096);
        let spawned = std::thread::Builder::new().name("traces".into()).spawn(move || {
            let mut w = Writer { dir, max, file: None, warned: false };
            for line in rx {
                w.write(&line);
            }
        });
        let handle = match spawned {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("traces: cannot start the writer: {e}");
                return Self::off();
            }
        };
        Tracer {
            tx: parking_lot::Mutex::new(Some(tx)),
            writer: parking_lot::Mutex::new(Some(handle)),
            bodies: cfg.bodies,
            redact: cfg.redact.iter().filter(|k| !k.is_empty()).cloned().collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.lock().is_some()
    }

    /// Stop taking records and wait until every one is written.
    pub fn close(&self) {
        drop(self.tx.lock().take());
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }

    pub fn bodies(&self) -> bool {
        self.bodies
    }

    /// `v` with every secret replaced inside its strings (keys and values).
    pub fn redact_value(&self, v: &mut Value) {
        fn walk(v: &mut Value, keys: &[String]) {
            match v {
                Value::String(s) => {
                    for k in keys {
                        if s.contains(k.as_str()) {
                            *s = s.replace(k.as_str(), "[redacted]");
                        }
                    }
                }
                Value::Array(a) => a.iter_mut().for_each(|x| walk(x, keys)),
                Value::Object(o) => {
                    let old = std::mem::take(o);
                    for (mut k, mut x) in old {
                        for key in keys {
                            k = k.replace(key.as_str(), "[redacted]");
                        }
                        walk(&mut x, keys);
                        o.insert(k, x);
                    }
                }
                _ => {}
            }
        }
        walk(v, &self.redact);
    }

    /// Write one record (a JSON object) with secrets removed, with the time
    /// added unless it has one.
    pub fn record(&self, mut v: Value) {
        let guard = self.tx.lock();
        let Some(tx) = guard.as_ref() else { return };
        if v.get("time").is_none() {
            v["time"] = serde_json::json!(now_secs());
        }
        self.redact_value(&mut v);
        let _ = tx.send(v.to_string());
    }
}

/// Every record in the trace files of `dir`, oldest file first.
pub fn read_all(dir: &Path) -> std::io::Result<Vec<Value>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut out = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        // A line cut by a crash or a full disk is skipped.
        out.extend(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_replaces_secrets_inside_strings_and_keeps_numbers() {
        let dir = std::env::temp_dir().join(format!("kvserve-redact-{}", std::process::id()));
        let t = Tracer::start(&TraceConfig { dir: Some(dir.clone()), bodies: false, max_file_bytes: 1 << 20, redact: vec!["1".into(), "k\"ey".into()] });
        let mut v = serde_json::json!({"status": 200, "prompt_tokens": 1111, "error": "bad key k\"ey 1", "nested": [{"a1": "x1y"}]});
        t.redact_value(&mut v);
        assert_eq!(v, serde_json::json!({"status": 200, "prompt_tokens": 1111, "error": "bad key [redacted] [redacted]", "nested": [{"a[redacted]": "x[redacted]y"}]}));
        t.close();
        let _ = std::fs::remove_dir_all(dir);
    }
}
