//! The HTTP server (hyper 1 + tokio): OpenAI Chat Completions, Anthropic
//! Messages, count_tokens, models, health, metrics and cache control. Every
//! request is validated before a 200 is sent; generation runs on the engine
//! thread and streams back through a per-request channel.

pub mod anthropic;
pub mod client;
pub mod error;
pub mod fields;
pub mod finish;
pub mod metrics;
pub mod openai;
pub mod proxy;
pub mod recent;
pub mod sse;
pub mod stream;
pub mod trace;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::engine::generate::GenerateOptions;
use crate::engine::request::{ChatRequest, RequestError};
use crate::engine::types::{Done, Job, ModelInfo};
use crate::engine::worker::Engine;
use crate::text::tools::{ToolFormat, ToolStream};
use error::{Api, ApiError, Kind};
use finish::Finish;
use metrics::Metrics;
use stream::{Generation, Out};
use trace::{TraceConfig, Tracer};

pub type Body = BoxBody<Bytes, Infallible>;

/// Seconds between keep-alive events while a prompt is being computed.
const PING_SECS: u64 = 3;

/// What one client may hold of the server: time to send its headers, time a
/// stream may wait on a client that stopped reading, connections at once.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A connection that has not sent a whole request head in this time is closed.
    pub header_timeout: Duration,
    /// A streamed answer whose client has read nothing for this long is cut
    /// (the generation stops; what the engine made meanwhile is bounded by it).
    pub stall_timeout: Duration,
    /// Open connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { header_timeout: Duration::from_secs(30), stall_timeout: Duration::from_secs(120), max_connections: 1024 }
    }
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Required as `Authorization: Bearer` or `x-api-key` when set.
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    pub trace: TraceConfig,
    /// More names this server answers to and lists in `/v1/models`.
    pub aliases: Vec<String>,
    /// Refuse (404) model names that are neither the model's nor an alias;
    /// otherwise any name is answered by the served model.
    pub strict_model: bool,
    pub limits: Limits,
}

pub struct State {
    pub engine: Engine,
    pub metrics: Metrics,
    pub cfg: ServerConfig,
    tool_format: Option<ToolFormat>,
    next_id: AtomicU64,
    tracer: Tracer,
    /// The last requests, for the dashboard.
    recent: recent::Recent,
    /// Where MLX computes, and kvserve's own CPU kernels where they serve.
    backend: String,
    /// The model's template knows `<think>`: an answer may open with it.
    may_think: bool,
    started: f64,
}

impl State {
    pub fn new(engine: Engine, cfg: ServerConfig) -> Arc<State> {
        let tool_format = engine.info.template.as_ref().and_then(|_| engine.info.tokenizer.chat_template.as_deref()).and_then(ToolFormat::for_template);
        let tracer = Tracer::start(&cfg.trace);
        let backend = if crate::model::on_cpu() {
            use crate::kernels::qmv::{selected_isa, Isa};
            let isa = match selected_isa() {
                Isa::Avx512 => "AVX-512",
                Isa::Avx2 => "AVX2+FMA",
                Isa::Neon => "NEON",
                Isa::Scalar => "portable",
            };
            format!("MLX on the CPU, kvserve {isa} kernels for decode")
        } else {
            "MLX on the GPU".to_string()
        };
        let may_think = engine.info.tokenizer.chat_template.as_deref().is_some_and(|t| t.contains("<think>"));
        Arc::new(State {
            may_think,
            engine,
            metrics: Metrics::new(),
            cfg,
            tool_format,
            next_id: AtomicU64::new(1),
            tracer,
            recent: recent::Recent::default(),
            backend,
            started: trace::now_secs(),
        })
    }

    /// One request's record: kept for the dashboard (bodies dropped) and
    /// written to the traces when they are on; the API key redacted in both.
    fn record(&self, mut v: Value) {
        v["time"] = json!(trace::now_secs());
        // The bodies (with --trace-bodies) go to the file only: out before the copy.
        let bodies: Vec<(&str, Value)> =
            recent::BODIES.into_iter().filter_map(|k| v.as_object_mut().and_then(|o| o.remove(k)).map(|b| (k, b))).collect();
        let mut lite = v.clone();
        self.tracer.redact_value(&mut lite);
        self.recent.push(lite);
        for (k, b) in bodies {
            v[k] = b;
        }
        self.tracer.record(v);
    }

    fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        format!("{prefix}{t:x}{n:06x}")
    }

    /// Names this server answers to with `--strict-model`: the model's
    /// name, its path, the path's last component, and the aliases.
    fn serves(&self, model: &str) -> bool {
        let info = &self.engine.info;
        let path = info.path.to_string_lossy();
        model == info.name
            || model == path
            || info.path.file_name().is_some_and(|f| f.to_string_lossy() == model)
            || self.cfg.aliases.iter().any(|a| a == model)
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .expect("static response parts are valid")
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

fn error_response(api: Api, e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.status(api), &e.body(api));
    let h = r.headers_mut();
    match e.kind {
        // When the queue has room again is not known; a short wait is the hint.
        Kind::Overloaded => {
            h.insert("retry-after", hyper::header::HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        // The body was not read: the connection cannot carry another request.
        Kind::TooLarge => {
            h.insert("connection", hyper::header::HeaderValue::from_static("close"));
        }
        _ => {}
    }
    r
}

/// Bytes of answer the kernel may hold for one connection (it doubles this
/// for its own bookkeeping); at tokens' pace (KB/s) it never slows a reader.
const SEND_BUFFER: usize = 128 << 10;

/// Seconds a client told 429/529 (the queue is full) should wait.
const RETRY_AFTER_SECS: &str = "2";

/// The 404 for a path no route takes; a long path is shortened in the message.
fn no_route(method: &Method, path: &str) -> ApiError {
    let shown: String = path.chars().take(200).collect();
    let more = if shown.len() < path.len() { format!("... ({} bytes)", path.len()) } else { String::new() };
    ApiError::new(Kind::NotFound, format!("no route for {method} {shown}{more}"))
}

fn unauthorized() -> ApiError {
    ApiError::new(Kind::Authentication, "invalid API key: send it as `Authorization: Bearer KEY` or `x-api-key: KEY`")
}

/// Equal in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

fn authorized(key: Option<&str>, req: &Request<Incoming>) -> bool {
    let Some(key) = key else { return true };
    let h = req.headers();
    let bearer = h.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let x = h.get("x-api-key").and_then(|v| v.to_str().ok());
    [bearer, x].into_iter().flatten().any(|t| constant_time_eq(t.as_bytes(), key.as_bytes()))
}

/// The body as JSON, within the size limit.
async fn read_json(req: Request<Incoming>, limit: usize) -> Result<Value, ApiError> {
    let too_large = || ApiError::new(Kind::TooLarge, format!("request body is over the limit of {limit} bytes"));
    // A declared length over the limit is refused before a byte of it is read.
    let declared = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => return Err(ApiError::invalid("body", format!("cannot read the request body: {e}"))),
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| ApiError::invalid("body", format!("request body is not valid UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid("body", "request body is empty; expected a JSON object"));
    }
    serde_json::from_str(text).map_err(|e| ApiError::invalid("body", format!("request body is not valid JSON: {e}")))
}

/// Serve until `shutdown` completes; then let the engine finish its queue
/// and write its snapshot files.
pub async fn serve(listener: TcpListener, state: Arc<State>, shutdown: impl std::future::Future<Output = ()>) {
    let limits = state.cfg.limits.clone();
    accept_loop(listener, state.clone(), &limits, shutdown, handle).await;
    let s = state.clone();
    let _ = tokio::task::spawn_blocking(move || {
        s.engine.shutdown();
        s.tracer.close();
    })
    .await;
}

/// Accept connections until `shutdown` completes, each served over HTTP/1.1
/// by `handler` (the local server's or the proxy's), within `limits`.
async fn accept_loop<S, F, Fut>(
    listener: TcpListener,
    state: Arc<S>,
    limits: &Limits,
    shutdown: impl std::future::Future<Output = ()>,
    handler: F,
) where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    tokio::pin!(shutdown);
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        // A fixed send buffer (Linux otherwise grows it to 4 MB): what a
        // client that stops reading leaves queued in the kernel stays small,
        // and --stall-timeout starts counting soon after it stops.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(stream, limits.max_connections));
            continue;
        };
        let state = state.clone();
        let (header_timeout, stall_timeout) = (limits.header_timeout, limits.stall_timeout);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handler(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(Stalls::new(stream, stall_timeout)), service)
                .await;
            drop(permit);
        });
    }
}

/// A connection whose writes fail once the client has taken nothing for
/// `stall`: hyper then drops the connection and the answer's body, which
/// stops its generation. What waits meanwhile is bounded by the socket's
/// buffers and the answer's channel.
struct Stalls {
    inner: tokio::net::TcpStream,
    stall: Duration,
    since: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Stalls {
    fn new(inner: tokio::net::TcpStream, stall: Duration) -> Self {
        Stalls { inner, stall, since: None }
    }

    /// A write's outcome: ready resets the clock; pending starts it, and
    /// past `stall` it is an error.
    fn watch<T>(&mut self, cx: &mut std::task::Context<'_>, r: std::task::Poll<std::io::Result<T>>) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        match r {
            Poll::Ready(r) => {
                self.since = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let stall = self.stall;
                let timer = self.since.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the client read nothing for {stall:?} (--stall-timeout)"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl tokio::io::AsyncRead for Stalls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Stalls {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection over `--max-connections`: a 503 naming the limit, then closed.
async fn refuse_connection(mut stream: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let body = json!({"error": {"message": format!("too many open connections (--max-connections {max}); retry shortly"), "type": "overloaded_error"}}).to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: {RETRY_AFTER_SECS}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Bind `addr` (port 0: any free port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let api = match path.as_str() {
        "/v1/messages" | "/v1/messages/count_tokens" => Api::Anthropic,
        "/v1/chat/completions" => Api::OpenAi,
        _ => Api::Own,
    };
    // The dashboard page holds no data: it asks for the key, then sends it.
    let open = matches!(path.as_str(), "/health" | "/metrics" | "/");
    let resp = if !open && !authorized(state.cfg.api_key.as_deref(), &req) {
        Err(unauthorized())
    } else {
        route(&state, &method, &path, req).await
    };
    let resp = resp.unwrap_or_else(|e| {
        if api != Api::Own {
            state.record(json!({"api": api.label(), "route": path, "status": e.status(api), "reason": e.reason(api), "error": e.message}));
        }
        error_response(api, &e)
    });
    state.metrics.request(api.label(), metrics::route_label(&path), resp.status().as_u16());
    Ok(resp)
}

/// What a trace line says about one generation, filled in as it runs; it
/// also counts the finished generation in the metrics.
pub struct Trace {
    api: Api,
    route: &'static str,
    model: String,
    stream: bool,
    messages: usize,
    tools: usize,
    t0: Instant,
    started: Option<f64>,
    first: Option<f64>,
    calls: usize,
    /// The request body, kept only with `--trace-bodies` (the response text then too).
    request: Option<Value>,
    response: String,
    done: Option<(Done, Finish)>,
    error: Option<String>,
    /// What a report groups a failure by.
    reason: Option<&'static str>,
}

impl Trace {
    fn new(state: &State, api: Api, route: &'static str, model: &str, stream: bool, req: &ChatRequest, body: &Value) -> Self {
        Trace {
            api,
            route,
            model: model.to_string(),
            stream,
            messages: req.messages.len(),
            tools: req.tools.len(),
            t0: Instant::now(),
            started: None,
            first: None,
            calls: 0,
            request: state.tracer.bodies().then(|| body.clone()),
            response: String::new(),
            done: None,
            error: None,
            reason: None,
        }
    }

    /// One output of the generation.
    fn on(&mut self, o: &Out, metrics: &Metrics) {
        let t = self.t0.elapsed().as_secs_f64();
        match o {
            Out::Started(_) => self.started = Some(t),
            Out::Piece(p) => {
                self.first.get_or_insert(t);
                if let crate::text::tools::Piece::Call(_) = p {
                    self.calls += 1;
                }
                if self.request.is_some() {
                    match p {
                        crate::text::tools::Piece::Text(x) | crate::text::tools::Piece::Thinking(x) => self.response.push_str(x),
                        crate::text::tools::Piece::Call(c) => self.response += &format!("[tool call {} {}]", c.name, c.arguments),
                    }
                }
            }
            Out::Done { done, cut } => {
                metrics.finished(&done.usage, done);
                self.done = Some((done.clone(), Finish::new(done.finish, self.calls, *cut)));
            }
            Out::Error(e) => {
                self.error = Some(e.clone());
                self.reason = Some("generation_failed");
            }
        }
    }

    /// The generation ended before it was done (the client left, say).
    fn cut(&mut self, why: &str) {
        if self.error.is_none() {
            self.error = Some(why.to_string());
            self.reason = Some("client_disconnected");
        }
    }

    fn finish(self, state: &State) {
        let mut v = json!({
            "api": self.api.label(), "route": self.route, "model": self.model, "stream": self.stream, "status": 200,
            "messages": self.messages, "tools": self.tools,
            "queue_wait_s": self.started, "ttft_s": self.first, "total_s": self.t0.elapsed().as_secs_f64(),
            "tool_calls": self.calls, "error": self.error,
        });
        if let Some(r) = self.reason {
            v["reason"] = json!(r);
        }
        if let Some((d, finish)) = &self.done {
            v["prompt_tokens"] = json!(d.usage.prompt);
            v["cache_read_tokens"] = json!(d.usage.cache_read);
            v["cache_creation_tokens"] = json!(d.usage.cache_creation);
            v["computed_tokens"] = json!(d.usage.prompt - d.usage.cache_read);
            v["generated_tokens"] = json!(d.generated_tokens);
            v["tokens_per_s"] = json!(if d.generation_secs > 0.0 { d.generated_tokens as f64 / d.generation_secs } else { 0.0 });
            v["finish"] = json!(finish.trace());
        }
        if let Some(r) = self.request {
            v["request_body"] = r;
            v["response_text"] = json!(self.response);
        }
        state.record(v);
    }
}

async fn route(state: &Arc<State>, method: &Method, path: &str, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    match (method, path) {
        (&Method::POST, "/v1/messages") => messages(state, read_json(req, state.cfg.max_body_bytes).await?).await,
        (&Method::POST, "/v1/messages/count_tokens") => count_tokens(state, read_json(req, state.cfg.max_body_bytes).await?).await,
        (&Method::POST, "/v1/chat/completions") => chat(state, read_json(req, state.cfg.max_body_bytes).await?).await,
        (&Method::GET, "/v1/models") => Ok(json_response(200, &models(state))),
        (&Method::GET, "/health") => Ok(health(state)),
        (&Method::GET, "/metrics") => {
            let text = state.metrics.render(state.engine.queue_depth(), &state.engine.load, &state.engine.cache_stats());
            Ok(full(200, "application/openmetrics-text; version=1.0.0; charset=utf-8", text))
        }
        (&Method::GET, "/") => Ok(dashboard()),
        (&Method::GET, "/v1/requests/recent") => Ok(json_response(200, &recent_view(state))),
        (&Method::GET, "/v1/cache/stats") => Ok(json_response(200, &json!(state.engine.cache_stats()))),
        (&Method::DELETE, "/v1/cache") => {
            let removed = state.engine.clear_cache().await?;
            Ok(json_response(200, &json!({"removed": removed, "stats": state.engine.cache_stats()})))
        }
        _ => Err(no_route(method, path)),
    }
}

/// The live dashboard: one page compiled in, no network beyond this server.
fn dashboard() -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "text/html; charset=utf-8")
        .header("cache-control", "no-store")
        .header(
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        )
        .body(Full::new(Bytes::from_static(include_bytes!("dashboard.html"))).boxed())
        .expect("static response parts are valid")
}

/// Requests the dashboard shows at most.
const DASHBOARD_REQUESTS: usize = 100;

/// What the dashboard polls: the server, the cache, the queue, totals since
/// start and the last requests (no bodies).
fn recent_view(state: &State) -> Value {
    let (totals, requests) = state.recent.view(DASHBOARD_REQUESTS);
    let info = &state.engine.info;
    json!({
        "server": {
            "model": info.name, "context": info.context, "backend": state.backend,
            "version": env!("CARGO_PKG_VERSION"), "started": state.started, "now": trace::now_secs(),
        },
        "queue_depth": state.engine.queue_depth(),
        "running": state.engine.load.running.load(Ordering::SeqCst),
        "cache": state.engine.cache_stats(),
        "totals": totals,
        "requests": requests,
    })
}

/// The served model, then each `--alias`, in both APIs' list shapes.
fn models(state: &State) -> Value {
    let name = &state.engine.info.name;
    let names: Vec<&String> = std::iter::once(name).chain(state.cfg.aliases.iter().filter(|a| *a != name)).collect();
    let data: Vec<Value> = names
        .iter()
        .map(|n| {
            json!({
                "id": n, "object": "model", "type": "model", "display_name": n,
                "created": 0, "created_at": "1970-01-01T00:00:00Z", "owned_by": "kvserve",
                "context_length": state.engine.info.context,
            })
        })
        .collect();
    json!({"object": "list", "data": data, "has_more": false, "first_id": name, "last_id": names.last().unwrap_or(&name)})
}

fn health(state: &State) -> Response<Body> {
    if state.engine.is_alive() {
        json_response(200, &json!({"status": "ok", "model": state.engine.info.name, "queue_depth": state.engine.queue_depth(), "running": state.engine.load.running.load(std::sync::atomic::Ordering::SeqCst), "pid": std::process::id()}))
    } else {
        json_response(503, &json!({"status": "error", "message": "the inference engine has stopped"}))
    }
}

/// The name a request's model is answered under: the served model's, for
/// any name (Claude Code sends `claude-*` names for side calls), unless
/// `--strict-model` is on and the name is neither the model's nor an alias.
fn check_model(state: &State, model: &str) -> Result<String, ApiError> {
    if !state.cfg.strict_model || state.serves(model) {
        return Ok(state.engine.info.name.clone());
    }
    let mut names = vec![format!("'{}'", state.engine.info.name)];
    names.extend(state.cfg.aliases.iter().map(|a| format!("'{a}'")));
    Err(ApiError {
        kind: Kind::NotFound,
        message: format!("model '{model}' is not served here; this server serves {} (--strict-model is on)", names.join(", ")),
        param: Some("model".into()),
    })
}

/// `f` over the request and the model, on the blocking pool: rendering the
/// template and tokenizing a 50K-token prompt takes long enough to stall
/// one of the two workers that serve every connection.
async fn off_the_runtime<T: Send + 'static>(
    state: &State,
    request: &ChatRequest,
    f: fn(&ChatRequest, &ModelInfo) -> Result<T, RequestError>,
) -> Result<T, ApiError> {
    let (info, request) = (state.engine.info.clone(), request.clone());
    match tokio::task::spawn_blocking(move || f(&request, &info)).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(ApiError::new(Kind::Internal, format!("internal error while preparing the prompt: {e}"))),
    }
}

/// Validate, tokenize and queue a request; the generation's events follow.
async fn start(state: &State, request: &ChatRequest, id: &str) -> Result<Generation, ApiError> {
    let info = &state.engine.info;
    let prompt = off_the_runtime(state, request, ChatRequest::prompt).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = GenerateOptions {
        sampling: request.sampling.clone(),
        max_tokens: prompt.max_tokens,
        stop: request.stop.clone(),
        eos_ids: info.eos_ids.clone(),
        ..Default::default()
    };
    let thinking_open = prompt.text.trim_end().ends_with("<think>");
    state.engine.submit(Job { prompt: prompt.ids, opts, events: tx, cache_points: prompt.cache_points })?;
    let tools = ToolStream::new(state.tool_format, &request.tools, thinking_open, state.may_think, id);
    Ok(Generation::new(rx, tools))
}

/// Stream a generation as SSE: `render` turns each output into text;
/// keep-alives go out while nothing else does (`ping` once `started`).
fn sse_response<F>(state: &Arc<State>, mut gen: Generation, anthropic: bool, mut trace: Trace, mut render: F) -> Response<Body>
where
    F: FnMut(&Out) -> String + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let state = state.clone();
    tokio::spawn(async move {
        let mut started = false;
        loop {
            let o = match tokio::time::timeout(Duration::from_secs(PING_SECS), gen.next()).await {
                Ok(Some(o)) => o,
                Ok(None) => break,
                Err(_) => {
                    let ka = if anthropic && started { anthropic::sse("ping", &json!({"type": "ping"})) } else { ": keep-alive\n\n".into() };
                    if tx.send(Ok(Frame::data(Bytes::from(ka)))).await.is_err() {
                        trace.cut("the client disconnected");
                        break;
                    }
                    continue;
                }
            };
            started |= matches!(o, Out::Started(_));
            trace.on(&o, &state.metrics);
            if tx.send(Ok(Frame::data(Bytes::from(render(&o))))).await.is_err() {
                // The client left, or read nothing for --stall-timeout (its
                // connection was closed): dropping `gen` stops the engine within a token.
                trace.cut("the client disconnected or stopped reading");
                break;
            }
        }
        trace.finish(&state);
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))))
        .expect("static response parts are valid")
}

/// A request the engine failed: 503 when the engine can compute no more
/// (a pipeline lost a rank; the process is exiting for a restart), else 500.
fn failed(state: &State, e: String) -> ApiError {
    ApiError::new(if state.engine.is_alive() { Kind::Internal } else { Kind::Unavailable }, e)
}

fn record_done(state: &State, outs: &[Out], mut trace: Trace) {
    for o in outs {
        trace.on(o, &state.metrics);
    }
    trace.finish(&state);
}

async fn messages(state: &Arc<State>, body: Value) -> Result<Response<Body>, ApiError> {
    let p = anthropic::parse(&body, false)?;
    let served = check_model(state, &p.model)?;
    let id = state.id("msg_");
    let trace = Trace::new(state, Api::Anthropic, "/v1/messages", &p.model, p.stream, &p.request, &body);
    let gen = start(state, &p.request, &format!("toolu_{}", id.trim_start_matches("msg_"))).await?;
    if p.stream {
        let mut events = anthropic::Events::new(id, served);
        return Ok(sse_response(state, gen, true, trace, move |o| events.on(o)));
    }
    let outs = gen.collect().await;
    record_done(state, &outs, trace);
    anthropic::message_json(&id, &served, &outs)
        .map(|m| json_response(200, &m))
        .map_err(|e| failed(state, e))
}

async fn count_tokens(state: &Arc<State>, body: Value) -> Result<Response<Body>, ApiError> {
    let p = anthropic::parse(&body, true)?;
    check_model(state, &p.model)?;
    let (_, ids, _) = off_the_runtime(state, &p.request, ChatRequest::render).await?;
    Ok(json_response(200, &json!({"input_tokens": ids.len()})))
}

async fn chat(state: &Arc<State>, body: Value) -> Result<Response<Body>, ApiError> {
    let p = openai::parse(&body)?;
    let served = check_model(state, &p.model)?;
    let id = state.id("chatcmpl-");
    let created = now_secs();
    let trace = Trace::new(state, Api::OpenAi, "/v1/chat/completions", &p.model, p.stream, &p.request, &body);
    let gen = start(state, &p.request, &format!("call_{}", id.trim_start_matches("chatcmpl-"))).await?;
    if p.stream {
        let mut chunks = openai::Chunks::new(id, served, created, p.include_usage);
        return Ok(sse_response(state, gen, false, trace, move |o| chunks.on(o)));
    }
    let outs = gen.collect().await;
    record_done(state, &outs, trace);
    openai::completion_json(&id, &served, created, &outs)
        .map(|m| json_response(200, &m))
        .map_err(|e| failed(state, e))
}
