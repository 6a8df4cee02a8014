//! The crate's one HTTP client (hyper's, over rustls for `https://`): the
//! proxy's upstream requests, `kvserve claude`'s questions to a server, and
//! `kvserve check`. Trusted roots are the system's (`SSL_CERT_FILE` or
//! `SSL_CERT_DIR` replace them, as in OpenSSL).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("'{url}' is not a valid URL: {why}")]
    Url { url: String, why: String },
    #[error("'{0}': only http:// and https:// URLs are supported")]
    Scheme(String),
    #[error("{url} is unreachable: {why}")]
    Unreachable { url: String, why: String },
    #[error("{url} did not answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("the answer from {url} was cut off: {why}")]
    Body { url: String, why: String },
}

/// A client for `http://` and `https://` URLs, HTTP/1.1, connections kept
/// alive; `connect_timeout` bounds each connection attempt.
pub fn client(connect_timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

/// rustls with the ring provider (aws-lc-rs, which adds post-quantum key
/// exchange and rustls now prefers, needs a C toolchain build of minutes on
/// every new machine) and the system's roots. A machine with no
/// roots at all gets an empty store: `https://` then fails naming the
/// certificate, and `http://` works.
#[allow(deprecated)]
fn tls_config() -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::debug!("no trusted root certificates found ({:?}); https:// upstreams will fail", found.errors);
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// `base` (a server's URL, a trailing `/` dropped) joined with `path`, checked.
pub fn url(base: &str, path: &str) -> Result<hyper::Uri, ClientError> {
    let full = format!("{}{path}", base.trim_end_matches('/'));
    let uri: hyper::Uri = full.parse().map_err(|e: hyper::http::uri::InvalidUri| ClientError::Url { url: full.clone(), why: e.to_string() })?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(uri),
        _ => Err(ClientError::Scheme(full)),
    }
}

/// A request's error with its causes ("connection refused" is at the end of
/// the chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        why = format!("{why}: {s}");
        src = s.source();
    }
    why
}

/// Send one request; the response headers within `timeout`.
pub async fn send(
    client: &HttpClient,
    method: Method,
    uri: hyper::Uri,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<Response<Incoming>, ClientError> {
    let url = uri.to_string();
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).map_err(|e| ClientError::Url { url: url.clone(), why: e.to_string() })?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(ClientError::Unreachable { url, why: chain(&e) }),
        Err(_) => Err(ClientError::Timeout { url, after: timeout }),
    }
}

/// A whole answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Send one request and read the whole answer (chunked or not) within `timeout`.
pub async fn fetch(
    client: &HttpClient,
    method: Method,
    uri: hyper::Uri,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let url = uri.to_string();
    let work = async {
        let resp = send(client, method, uri, headers, body, timeout).await?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = resp.into_body().collect().await.map_err(|e| ClientError::Body { url: url.clone(), why: chain(&e) })?.to_bytes();
        Ok(Reply { status, headers, body })
    };
    tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| Err(ClientError::Timeout { url: url.clone(), after: timeout }))
}

/// [`fetch`] from code that is not async: on a runtime of its own.
pub fn fetch_blocking(method: Method, url_: &str, headers: &[(&str, &str)], body: impl Into<Bytes>, timeout: Duration) -> Result<Reply, ClientError> {
    let uri = url(url_, "")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| ClientError::Unreachable {
        url: url_.to_string(),
        why: format!("cannot start an I/O runtime: {e}"),
    })?;
    let body = body.into();
    rt.block_on(async { fetch(&client(timeout), method, uri, headers, body, timeout).await })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(url("http://127.0.0.1:8080/", "/v1/models").unwrap().to_string(), "http://127.0.0.1:8080/v1/models");
        assert_eq!(url("https://example.org", "/v1/models").unwrap().scheme_str(), Some("https"));
        assert!(matches!(url("ftp://h", "/x"), Err(ClientError::Scheme(_))));
        let bare = url("127.0.0.1:8080", "/x").unwrap_err().to_string();
        assert!(bare.contains("'127.0.0.1:8080/x'"), "a bare host:port is refused, named: {bare}");
        assert!(matches!(url("http://a b", "/x"), Err(ClientError::Url { .. })));
    }

    #[test]
    fn a_refused_connection_names_the_cause() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = fetch_blocking(Method::GET, &format!("http://127.0.0.1:{port}/x"), &[], Bytes::new(), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
        assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
    }

    #[test]
    fn a_chunked_answer_is_read_whole() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).unwrap();
            // `}` inside the JSON and after it: the old client cut at the last `}`.
            let parts = ["{\"data\": [{\"id\": \"m\"}]", ", \"x\": \"}\"}", "\n"];
            let mut out = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n".to_string();
            for p in parts {
                out += &format!("{:x}\r\n{p}\r\n", p.len());
            }
            out += "0\r\n\r\n";
            s.write_all(out.as_bytes()).unwrap();
        });
        let r = fetch_blocking(Method::GET, &format!("http://{addr}/v1/models"), &[], Bytes::new(), Duration::from_secs(10)).unwrap();
        server.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v, serde_json::json!({"data": [{"id": "m"}], "x": "}"}));
    }
}
