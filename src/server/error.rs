//! Errors in each API's own envelope. OpenAI:
//! `{"error":{"message","type","param","code"}}`; Anthropic:
//! `{"type":"error","error":{"type","message"}}`.

use serde_json::{json, Value};

use crate::engine::request::RequestError;
use crate::engine::worker::SubmitError;

/// Which API a request came through (errors and streams take its shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
    /// kvserve's own routes (cache control, health): OpenAI's envelope.
    Own,
}

impl Api {
    pub fn label(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
            Api::Own => "kvserve",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidRequest,
    Authentication,
    NotFound,
    TooLarge,
    /// The queue is full.
    Overloaded,
    /// The engine has stopped.
    Unavailable,
    Internal,
    /// Proxy mode: the upstream failed or is unreachable.
    BadGateway,
    /// Proxy mode: the upstream did not answer in time.
    GatewayTimeout,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub kind: Kind,
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { kind: Kind::InvalidRequest, message: message.into(), param: Some(param.into()) }
    }
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into(), param: None }
    }

    /// The HTTP status for `api`.
    pub fn status(&self, api: Api) -> u16 {
        match self.kind {
            Kind::InvalidRequest => 400,
            Kind::Authentication => 401,
            Kind::NotFound => 404,
            Kind::TooLarge => 413,
            Kind::Overloaded if api == Api::Anthropic => 529,
            Kind::Overloaded => 429,
            Kind::Unavailable => 503,
            Kind::Internal => 500,
            Kind::BadGateway => 502,
            Kind::GatewayTimeout => 504,
        }
    }

    /// The error body for `api`.
    pub fn body(&self, api: Api) -> Value {
        match api {
            Api::Anthropic => {
                let t = match self.kind {
                    Kind::InvalidRequest => "invalid_request_error",
                    Kind::Authentication => "authentication_error",
                    Kind::NotFound => "not_found_error",
                    Kind::TooLarge => "request_too_large",
                    Kind::Overloaded => "overloaded_error",
                    Kind::Unavailable | Kind::Internal | Kind::BadGateway | Kind::GatewayTimeout => "api_error",
                };
                json!({"type": "error", "error": {"type": t, "message": self.message}})
            }
            Api::OpenAi | Api::Own => {
                let (t, code) = match self.kind {
                    Kind::InvalidRequest => ("invalid_request_error", Value::Null),
                    Kind::Authentication => ("invalid_request_error", json!("invalid_api_key")),
                    Kind::NotFound => ("invalid_request_error", json!("model_not_found")),
                    Kind::TooLarge => ("invalid_request_error", json!("request_too_large")),
                    Kind::Overloaded => ("rate_limit_error", json!("rate_limit_exceeded")),
                    Kind::Unavailable => ("server_error", json!("engine_unavailable")),
                    Kind::Internal => ("server_error", Value::Null),
                    Kind::BadGateway => ("server_error", json!("upstream_error")),
                    Kind::GatewayTimeout => ("server_error", json!("upstream_timeout")),
                };
                json!({"error": {"message": self.message, "type": t, "param": self.param, "code": code}})
            }
        }
    }
}

impl ApiError {
    /// What a report groups this failure by: the error's type in `api`'s
    /// envelope, and the field at fault where there is one.
    pub fn reason(&self, api: Api) -> String {
        let body = self.body(api);
        let t = body["error"]["type"].as_str().unwrap_or("error");
        match &self.param {
            Some(p) => format!("{t} ({p})"),
            None => t.to_string(),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        ApiError { kind: Kind::InvalidRequest, message: e.message, param: e.field }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Full(n) => ApiError::new(Kind::Overloaded, format!("server is busy: {n} requests are already waiting; retry shortly")),
            SubmitError::Dead if crate::pipeline::broken() => ApiError::new(Kind::Unavailable, crate::pipeline::why_broken()),
            SubmitError::Dead => ApiError::new(Kind::Unavailable, "the inference engine has stopped; see the server log"),
            e @ SubmitError::Busy(..) => ApiError::new(Kind::Unavailable, e.to_string()),
        }
    }
}
