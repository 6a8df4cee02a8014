//! Proxy mode (`kvserve serve --proxy URL`): the same Anthropic front end,
//! with generation forwarded to another OpenAI-compatible server (LM Studio,
//! mlx-lm's server, llama.cpp, vLLM, another kvserve). Anthropic requests
//! become chat completions; the streamed answer comes back as Anthropic
//! events, tool calls with their arguments as they arrive; the upstream's
//! `cached_tokens` is reported as `cache_read_input_tokens`. OpenAI requests
//! pass through unchanged.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::anthropic::{self, error_event, Blocks};
use super::client::{self, ClientError, HttpClient};
use super::error::{Api, ApiError, Kind};
use super::finish::Finish;
use super::sse;
use super::{error_response, json_response, read_json, Body};
use crate::engine::request::ChatRequest;

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The upstream's base URL, e.g. `http://127.0.0.1:1234` (a trailing `/v1` is accepted).
    pub upstream: String,
    /// The model name sent upstream when a request names none that it knows.
    pub model: Option<String>,
    /// Time allowed to connect and get response headers.
    pub connect_timeout: Duration,
    /// Time allowed between two pieces of a streamed answer.
    pub idle_timeout: Duration,
    pub max_body_bytes: usize,
    /// Required from clients as the local server requires it.
    pub api_key: Option<String>,
    pub limits: super::Limits,
}

pub struct ProxyState {
    cfg: ProxyConfig,
    client: HttpClient,
}

impl ProxyState {
    /// The upstream URL is checked here: `http://` or `https://` with a host.
    pub fn new(mut cfg: ProxyConfig) -> Result<Arc<Self>, ClientError> {
        cfg.upstream = cfg.upstream.trim_end_matches('/').trim_end_matches("/v1").to_string();
        client::url(&cfg.upstream, "/v1/models")?;
        let client = client::client(cfg.connect_timeout);
        Ok(Arc::new(ProxyState { cfg, client }))
    }

    /// Send a request upstream; errors name the upstream and what happened.
    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Response<Incoming>, ApiError> {
        let uri = client::url(&self.cfg.upstream, path).map_err(|e| ApiError::new(Kind::Internal, e.to_string()))?;
        let key = std::env::var("KVSERVE_UPSTREAM_KEY").ok().filter(|k| !k.is_empty()).map(|k| format!("Bearer {k}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(k) = &key {
            headers.push(("authorization", k.as_str()));
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        client::send(&self.client, method, uri, &headers, bytes, self.cfg.connect_timeout).await.map_err(|e| match e {
            ClientError::Timeout { after, .. } => upstream_error(504, format!("upstream {} did not answer within {after:?}", self.cfg.upstream)),
            ClientError::Unreachable { why, .. } => upstream_error(502, format!("upstream {} is unreachable: {why}", self.cfg.upstream)),
            e => upstream_error(502, e.to_string()),
        })
    }
}

/// An error carrying the upstream's status.
fn upstream_error(status: u16, message: String) -> ApiError {
    let kind = match status {
        400 | 422 => Kind::InvalidRequest,
        401 | 403 => Kind::Authentication,
        404 => Kind::NotFound,
        413 => Kind::TooLarge,
        429 | 529 => Kind::Overloaded,
        503 => Kind::Unavailable,
        502 => Kind::BadGateway,
        504 => Kind::GatewayTimeout,
        _ => Kind::Internal,
    };
    ApiError { kind, message, param: None }
}

/// The message inside an upstream error body (OpenAI's or Anthropic's shape), or the body.
fn upstream_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().or_else(|| v["message"].as_str()).map(str::to_string))
        .unwrap_or_else(|| text.chars().take(500).collect())
}

/// The chat completions request for a canonical request.
pub fn openai_body(req: &ChatRequest, model: &str, stream: bool) -> Value {
    let messages = req.messages_json(true);
    let mut body = json!({"model": model, "messages": messages, "max_tokens": req.max_tokens, "stream": stream,
        "temperature": req.sampling.temperature, "top_p": req.sampling.top_p});
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if !req.tools.is_empty() {
        body["tools"] = Value::Array(req.tools.clone());
    }
    if !req.stop.is_empty() {
        body["stop"] = json!(req.stop);
    }
    body
}

/// Turns OpenAI stream chunks into Anthropic events: text and tool-use
/// blocks with arguments as they arrive.
pub struct Translate {
    blocks: Blocks,
    usage: Value,
    finish: Option<String>,
}

impl Translate {
    pub fn new(id: String, model: String) -> Self {
        Translate { blocks: Blocks::new(id, model), usage: json!({}), finish: None }
    }

    pub fn start(&self) -> String {
        let mut out = String::new();
        // The upstream's usage comes with its last chunk: zeros until then.
        self.blocks.start(&mut out, anthropic_usage(&Value::Null));
        out
    }

    /// Events for one upstream chunk.
    pub fn chunk(&mut self, c: &Value) -> String {
        let mut out = String::new();
        if c["usage"].is_object() {
            self.usage = c["usage"].clone();
        }
        let Some(choice) = c["choices"].get(0) else { return out };
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            self.blocks.text(&mut out, t);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            // A call's later pieces name only its index.
            let k = call["index"].as_u64().unwrap_or(0);
            if !self.blocks.in_tool(k) {
                let id = call["id"].as_str().map(str::to_string).unwrap_or_else(|| format!("toolu_{}_{k}", self.blocks.id()));
                self.blocks.tool(&mut out, k, &id, call["function"]["name"].as_str().unwrap_or(""));
            }
            if let Some(a) = call["function"]["arguments"].as_str().filter(|a| !a.is_empty()) {
                self.blocks.tool_json(&mut out, a);
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
        out
    }

    /// The closing events.
    pub fn end(&mut self) -> String {
        let mut out = String::new();
        let finish = Finish::from_openai(self.finish.as_deref(), self.blocks.calls());
        self.blocks.end(&mut out, finish, anthropic_usage(&self.usage));
        out
    }
}

/// The non-streaming Anthropic message for an upstream chat.completion.
pub fn message_from_completion(id: &str, model: &str, c: &Value) -> Value {
    let msg = &c["choices"][0]["message"];
    let mut content = vec![];
    if let Some(t) = msg["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": t}));
    }
    for call in msg["tool_calls"].as_array().into_iter().flatten() {
        let args = call["function"]["arguments"].as_str().and_then(|a| serde_json::from_str::<Value>(a).ok()).unwrap_or_else(|| json!({}));
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": args}));
    }
    let stop = Finish::from_openai(c["choices"][0]["finish_reason"].as_str(), 0).anthropic();
    json!({"id": id, "type": "message", "role": "assistant", "model": model, "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": anthropic_usage(&c["usage"])})
}

/// Anthropic usage for OpenAI usage: the upstream's cached tokens as cache reads.
fn anthropic_usage(u: &Value) -> Value {
    let prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
    let cached = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0).min(prompt);
    json!({"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
        "output_tokens": u["completion_tokens"].as_u64().unwrap_or(0)})
}

async fn messages(state: &Arc<ProxyState>, body: Value) -> Result<Response<Body>, ApiError> {
    let p = anthropic::parse(&body, false)?;
    let model = state.cfg.model.clone().unwrap_or_else(|| p.model.clone());
    let up = openai_body(&p.request, &model, p.stream);
    let resp = state.send(Method::POST, "/v1/chat/completions", Some(&up)).await?;
    let status = resp.status().as_u16();
    if status >= 400 {
        let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        return Err(upstream_error(status, format!("upstream answered {status}: {}", upstream_message(&body))));
    }
    let id = format!("msg_proxy_{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    if !p.stream {
        let bytes = tokio::time::timeout(state.cfg.idle_timeout, resp.into_body().collect())
            .await
            .map_err(|_| upstream_error(504, "upstream stopped answering".into()))?
            .map_err(|e| upstream_error(502, format!("upstream answer cut off: {e}")))?
            .to_bytes();
        let c: Value = serde_json::from_slice(&bytes).map_err(|e| upstream_error(502, format!("upstream answer is not JSON: {e}")))?;
        return Ok(json_response(200, &message_from_completion(&id, &p.model, &c)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let idle = state.cfg.idle_timeout;
    let mut tr = Translate::new(id, p.model);
    tokio::spawn(async move {
        let send = |s: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(Frame::data(Bytes::from(s)))).await.is_ok() }
        };
        if !send(tr.start()).await {
            return;
        }
        let mut body = resp.into_body();
        let mut reader = sse::Reader::new();
        // OpenAI streams end with `data: [DONE]`; a finish_reason is enough
        // from servers that leave it out.
        let mut done = false;
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Ok(Some(Ok(f))) => f,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    let _ = send(error_event(&format!("upstream stream failed: {e}"))).await;
                    return;
                }
                Err(_) => {
                    let _ = send(error_event(&format!("upstream sent nothing for {idle:?}"))).await;
                    return;
                }
            };
            let Ok(data) = frame.into_data() else { continue };
            for ev in reader.push(&data) {
                let payload = ev.data.trim();
                if payload == "[DONE]" {
                    done = true;
                    continue;
                }
                if ev.event == "error" {
                    let _ = send(error_event(&format!("upstream sent an error: {}", upstream_message(payload.as_bytes())))).await;
                    return;
                }
                let c = match serde_json::from_str::<Value>(payload) {
                    Ok(c) => c,
                    Err(e) => {
                        let shown: String = payload.chars().take(200).collect();
                        let _ = send(error_event(&format!("upstream sent an event that is not JSON ({e}): {shown}"))).await;
                        return;
                    }
                };
                if c["error"].is_object() {
                    let _ = send(error_event(&format!("upstream sent an error: {}", upstream_message(payload.as_bytes())))).await;
                    return;
                }
                let out = tr.chunk(&c);
                done |= tr.finish.is_some();
                if !out.is_empty() && !send(out).await {
                    return; // the client left; dropping the upstream body cancels it
                }
            }
        }
        if let Err(e) = reader.finish() {
            let _ = send(error_event(&format!("upstream closed the connection mid-answer: {e}"))).await;
            return;
        }
        if !done {
            let _ = send(error_event("upstream closed the connection before the answer finished")).await;
            return;
        }
        let _ = send(tr.end()).await;
    });
    Ok(Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))))
        .expect("static response parts are valid"))
}

/// Forward a request as it is and stream the upstream's answer back as it is.
async fn passthrough(state: &Arc<ProxyState>, method: Method, path: &str, body: Option<Value>) -> Result<Response<Body>, ApiError> {
    let resp = state.send(method, path, body.as_ref()).await?;
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_string();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let idle = state.cfg.idle_timeout;
    tokio::spawn(async move {
        let mut body = resp.into_body();
        // An upstream that fails or stalls mid-answer ends the body (the client sees it cut).
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(idle, body.frame()).await {
            if let Ok(data) = frame.into_data() {
                if tx.send(Ok(Frame::data(data))).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Response::builder()
        .status(status)
        .header("content-type", ct)
        .body(BodyExt::boxed(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))))
        .expect("static response parts are valid"))
}

async fn handle(state: Arc<ProxyState>, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let api = if path.starts_with("/v1/messages") { Api::Anthropic } else { Api::OpenAi };
    let resp = if path != "/health" && !super::authorized(state.cfg.api_key.as_deref(), &req) {
        Err(super::unauthorized())
    } else {
        route(&state, &method, &path, req).await
    };
    Ok(resp.unwrap_or_else(|e| error_response(api, &e)))
}

async fn route(state: &Arc<ProxyState>, method: &Method, path: &str, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let limit = state.cfg.max_body_bytes;
    match (method, path) {
        (&Method::POST, "/v1/messages") => messages(state, read_json(req, limit).await?).await,
        (&Method::POST, "/v1/messages/count_tokens") => {
            // No tokenizer here: an estimate (4 characters a token), said in the answer.
            let b = read_json(req, limit).await?;
            Ok(json_response(200, &json!({"input_tokens": b.to_string().len() / 4, "estimated": true})))
        }
        (&Method::POST, "/v1/chat/completions") => {
            passthrough(state, Method::POST, "/v1/chat/completions", Some(read_json(req, limit).await?)).await
        }
        (&Method::GET, "/v1/models") => passthrough(state, Method::GET, "/v1/models", None).await,
        (&Method::GET, "/health") => Ok(json_response(200, &json!({"status": "ok", "proxy": state.cfg.upstream}))),
        _ => Err(super::no_route(method, path)),
    }
}

/// Serve the proxy until `shutdown` completes.
pub async fn serve(listener: TcpListener, state: Arc<ProxyState>, shutdown: impl std::future::Future<Output = ()>) {
    let limits = state.cfg.limits.clone();
    super::accept_loop(listener, state, &limits, shutdown, handle).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(s: &str) -> Vec<Value> {
        s.split("\n\n").filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")).and_then(|d| serde_json::from_str(d).ok())).collect()
    }

    #[test]
    fn openai_chunks_become_anthropic_events_with_incremental_arguments() {
        let mut t = Translate::new("msg_1".into(), "m".into());
        let chunks = [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "Let me check."}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 80}}}),
        ];
        let mut all = t.start();
        for c in &chunks {
            all += &t.chunk(c);
        }
        all += &t.end();
        let ev = events(&all);
        let types: Vec<&str> = ev.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "message_start", "content_block_start", "content_block_delta", "content_block_stop", "content_block_start",
                "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"
            ]
        );
        assert_eq!(ev[4]["content_block"], json!({"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}));
        let args: String = ev[5..7].iter().map(|e| e["delta"]["partial_json"].as_str().unwrap()).collect();
        assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"city": "Paris"}));
        assert_eq!(ev[8]["delta"]["stop_reason"], "tool_use");
        assert_eq!(ev[8]["usage"], json!({"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 80, "output_tokens": 9}));
    }

    /// One writer for both: the same answer from the engine and from an
    /// upstream gives the same bytes.
    #[test]
    fn the_proxy_writes_the_engines_events() {
        use crate::engine::generate::FinishReason;
        use crate::engine::types::ToolCall;
        use crate::engine::types::{Done, PromptUsage};
        use crate::server::stream::Out;
        use crate::text::tools::Piece;

        let usage = PromptUsage { prompt: 100, cache_read: 80, cache_creation: 0, input: 20 };
        let done = Done { finish: FinishReason::Eos, usage, generated_tokens: 9, ttft_secs: 0.0, prompt_secs: 0.0, generation_secs: 0.0 };
        let call = ToolCall { id: "call_a".into(), name: "get_weather".into(), arguments: json!({"city": "Paris"}) };
        let mut engine = anthropic::Events::new("msg_1".into(), "m".into());
        let local: String = [
            Out::Started(PromptUsage::default()),
            Out::Piece(Piece::Text("Let me check.".into())),
            Out::Piece(Piece::Call(call)),
            Out::Done { done, cut: false },
        ]
        .iter()
        .map(|o| engine.on(o))
        .collect();

        let mut t = Translate::new("msg_1".into(), "m".into());
        let mut proxied = t.start();
        for c in [
            json!({"choices": [{"index": 0, "delta": {"content": "Let me check."}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 80}}}),
        ] {
            proxied += &t.chunk(&c);
        }
        proxied += &t.end();
        assert_eq!(proxied, local);
        assert!(local.contains(r#""stop_reason":"tool_use""#), "{local}");
    }

    #[test]
    fn a_completion_becomes_a_message() {
        let c = json!({"choices": [{"message": {"role": "assistant", "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3}});
        let m = message_from_completion("msg", "model", &c);
        assert_eq!(m["content"], json!([{"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}}]));
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(m["usage"]["input_tokens"], 10);
    }

    #[test]
    fn upstream_errors_keep_their_status_and_message() {
        let e = upstream_error(404, format!("upstream answered 404: {}", upstream_message(br#"{"error": {"message": "no such model"}}"#)));
        assert_eq!(e.status(Api::Anthropic), 404);
        assert!(e.message.contains("no such model"));
        assert_eq!(upstream_error(503, "x".into()).status(Api::Anthropic), 503);
        assert_eq!(upstream_error(500, "x".into()).body(Api::Anthropic)["error"]["type"], "api_error");
        assert_eq!(upstream_error(502, "x".into()).status(Api::Anthropic), 502);
        assert_eq!(upstream_error(504, "x".into()).status(Api::OpenAi), 504);
    }
}
