//! `kvserve check`: the health check a new user runs first. Each point is
//! printed with pass or fail and, when it fails, the fix.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::engine::generate::GenerateOptions;
use crate::engine::request::{ChatMessage, ChatRequest};
use crate::engine::types::{Event, Job, PromptUsage};
use crate::engine::worker::{Engine, EngineConfig};
use crate::server::{self, trace::TraceConfig, ServerConfig, State};

struct Report {
    failed: usize,
}

impl Report {
    fn pass(&self, what: &str) {
        println!("[pass] {what}");
    }
    fn fail(&mut self, what: &str, fix: &str) {
        self.failed += 1;
        println!("[FAIL] {what}\n       fix: {fix}");
    }
    fn warn(&self, what: &str, fix: &str) {
        println!("[warn] {what}\n       fix: {fix}");
    }
}

/// One job through the engine: the text and the usage it reported.
fn generate(engine: &Engine, prompt: Vec<u32>) -> Result<(String, PromptUsage), String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = GenerateOptions { max_tokens: 8, eos_ids: engine.info.eos_ids.clone(), ..Default::default() };
    engine.submit(Job { prompt, opts, events: tx, cache_points: vec![] }).map_err(|e| e.to_string())?;
    let (mut text, mut usage) = (String::new(), PromptUsage::default());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Started(u) => usage = u,
            Event::Text(t) => text += &t,
            Event::Done(d) => {
                usage = d.usage;
                break;
            }
            Event::Error(e) => return Err(e),
        }
    }
    Ok((text, usage))
}

fn http_post(addr: &str, path: &str, body: &Value) -> Result<u16, String> {
    use crate::server::client;
    let headers = [("content-type", "application/json")];
    client::fetch_blocking(hyper::Method::POST, &format!("http://{addr}{path}"), &headers, body.to_string(), std::time::Duration::from_secs(120))
        .map(|r| r.status)
        .map_err(|e| e.to_string())
}

/// Run every check for `model`; true when none failed. `config` is the
/// config file the command line read, if any.
pub fn run(model: &str, config: Option<&std::path::Path>) -> bool {
    let mut r = Report { failed: 0 };
    match config {
        Some(f) => r.pass(&format!("config file read: {}", f.display())),
        None if std::env::var_os(crate::launch::NO_CONFIG).is_some() => println!("[info] no config file read ({} is set)", crate::launch::NO_CONFIG),
        None => println!(
            "[info] no config file read ({} does not exist; flags only)",
            crate::config::default_path().map(|p| p.display().to_string()).unwrap_or_else(|| "~/.config/kvserve/config.toml".into())
        ),
    }
    // MLX computes.
    let ok = (|| -> Result<f32, crate::mlx::MlxError> {
        let a = crate::mlx::Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let c = a.matmul(&a)?;
        c.eval()?;
        Ok(c.as_slice::<f32>()[3])
    })();
    match ok {
        Ok(22.0) => r.pass(&format!("MLX {} loads and computes", crate::mlx::version().unwrap_or_default())),
        other => r.fail(&format!("MLX computes a 2x2 matmul wrong or not at all ({other:?})"), "rebuild with `make build`; see PLATFORM notes in README"),
    }
    // Where it computes: the wheel linked and the device MLX chose.
    match crate::mlx::default_device() {
        Ok(d) => {
            let wheel = match crate::mlx::LINKED_BACKEND {
                "cpu" => "mlx-cpu",
                "cuda13" => "mlx-cuda-13",
                "cuda12" => "mlx-cuda-12",
                _ => "mlx-metal",
            };
            let line = format!("MLX backend {} ({wheel} wheel), computing on {}", crate::mlx::LINKED_BACKEND, d.describe());
            if crate::mlx::LINKED_BACKEND.starts_with("cuda") && d.kind != "gpu" {
                r.fail(&format!("{line}: the CUDA build found no GPU"), "check `nvidia-smi` (driver 580+ for CUDA 13, 525+ for CUDA 12)");
            } else {
                r.pass(&line);
            }
        }
        Err(e) => r.fail(&format!("MLX cannot describe its default device: {e}"), "rebuild with `make build`"),
    }
    if !crate::model::on_cpu() {
        println!("[info] BLAS: not used (prompts are computed by MLX's GPU kernels)");
    } else {
    match crate::mlx::blas_provider() {
        Some(p) if p.to_string_lossy().contains("openblas") || p.to_string_lossy().contains("Accelerate") => {
            r.pass(&format!("BLAS is the fast one ({})", p.display()))
        }
        other => r.fail(
            &format!("cblas_sgemm comes from {other:?}, not OpenBLAS: prompts will be about 30x slower"),
            "install libopenblas-dev (`make setup`) and rebuild (`make build`)",
        ),
    }
    }
    let cfg = EngineConfig {
        model: model.to_string(),
        cache_bytes: 1 << 30,
        cache_dir: None,
        cache_disk: Default::default(),
        queue: 4,
        prefill_chunk: 512,
        parallel: 4,
        kv_bits: None,
        context_override: None,
        pipeline: None,
    };
    let engine = match Engine::start(cfg) {
        Ok(e) => {
            r.pass(&format!("the model loads: {} ({} tokens of context)", e.info.name, e.info.context));
            e
        }
        Err(e) => {
            r.fail(&format!("the model does not load: {e}"), "check the path, or run `make model` for the default one");
            return false;
        }
    };
    let req = ChatRequest {
        messages: vec![ChatMessage { role: "user".into(), content: "Say hello.".into(), ..Default::default() }],
        tools: vec![json!({"type": "function", "function": {"name": "read_file", "description": "Read a file.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}})],
        max_tokens: 8,
        ..Default::default()
    };
    let prompt = match req.prompt(&engine.info) {
        Ok(p) => {
            r.pass(&format!("the chat template renders a conversation with tools ({} tokens)", p.ids.len()));
            p
        }
        Err(e) => {
            r.fail(&format!("the chat template fails: {e}"), "use a model directory with a tokenizer_config.json chat_template or chat_template.jinja");
            return false;
        }
    };
    match generate(&engine, prompt.ids.clone()) {
        Ok((text, _)) if !text.trim().is_empty() => r.pass(&format!("a generation produces text: {:?}", text.trim())),
        Ok(_) => r.fail("a generation produced no text", "try another model; this one ends at once"),
        Err(e) => r.fail(&format!("generation failed: {e}"), "see the error; run `make test` to check the build"),
    }
    match generate(&engine, prompt.ids.clone()) {
        Ok((_, u)) if u.cache_read > 0 => r.pass(&format!("a repeated prompt is a cache hit ({} of {} tokens read)", u.cache_read, u.prompt)),
        Ok((_, u)) => r.fail(&format!("a repeated prompt was not a cache hit ({u:?})"), "check --cache-bytes (it may be too small for one snapshot)"),
        Err(e) => r.fail(&format!("second generation failed: {e}"), "see the error"),
    }
    // Both APIs over HTTP.
    let name = engine.info.name.clone();
    let http = (|| -> Result<(u16, u16), String> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(|e| e.to_string())?;
        let state: Arc<State> = State::new(
            engine,
            ServerConfig {
                api_key: None,
                max_body_bytes: 1 << 20,
                trace: TraceConfig { dir: None, bodies: false, max_file_bytes: 0, redact: vec![] },
                aliases: vec![],
                strict_model: false,
                limits: Default::default(),
            },
        );
        let listener = rt.block_on(server::bind("127.0.0.1:0".parse().expect("valid address"))).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?.to_string();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = rt.spawn(server::serve(listener, state, async {
            let _ = stop_rx.await;
        }));
        let msg = json!({"model": name, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]});
        let a = http_post(&addr, "/v1/messages", &msg)?;
        let o = http_post(&addr, "/v1/chat/completions", &msg)?;
        let _ = stop_tx.send(());
        let _ = rt.block_on(handle);
        Ok((a, o))
    })();
    match http {
        Ok((200, 200)) => r.pass("the HTTP server answers the Anthropic and OpenAI APIs"),
        Ok((a, o)) => r.fail(&format!("the HTTP server answered {a} (Anthropic) and {o} (OpenAI)"), "run `make test` and read the failing server test"),
        Err(e) => r.fail(&format!("the HTTP server could not be reached: {e}"), "check that a local port can be opened"),
    }
    match crate::launch::find_claude() {
        Some(p) => r.pass(&format!("Claude Code is installed ({})", p.display())),
        None => r.warn("Claude Code is not installed (only needed for `kvserve claude`)", "`make claude-code`, or `npm install -g @anthropic-ai/claude-code`"),
    }
    println!("{}", if r.failed == 0 { "all checks passed".to_string() } else { format!("{} checks failed", r.failed) });
    r.failed == 0
}
