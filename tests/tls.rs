//! `https://` through the crate's one HTTP client: a local TLS server with a
//! certificate made here (rcgen), signed by a CA made here, in front of a
//! scripted upstream. The proxy and `kvserve claude`'s model lookup reach it
//! when the CA is trusted (`SSL_CERT_FILE`), and refuse it, naming the
//! certificate, when it is not.

mod common;

use std::sync::Arc;

use common::{FakeUpstream, Pieces, Server};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

/// A CA (PEM) and a certificate for localhost and 127.0.0.1 signed by it.
fn certificates() -> (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "kvserve test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap().signed_by(&key, &*ca).unwrap();
    (ca.pem(), vec![leaf.der().clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
}

/// A TLS server on loopback passing each connection's bytes to `backend`.
#[allow(deprecated)] // ring, as the client uses
fn tls_front(backend: String, certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> String {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else { continue };
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else { return };
                    let Ok(mut b) = tokio::net::TcpStream::connect(backend).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut b).await;
                });
            }
        });
    });
    format!("https://localhost:{port}")
}

fn script(body: &str) -> Pieces {
    let now = std::time::Duration::ZERO;
    if body.is_empty() {
        let list = json!({"object": "list", "data": [{"id": "tls-model", "object": "model", "context_length": 4096}]}).to_string();
        return vec![(now, format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{list}", list.len()).into_bytes())];
    }
    let chunk = json!({"choices": [{"index": 0, "delta": {"content": "über TLS"}, "finish_reason": "stop"}]});
    let stream = format!("data: {chunk}\n\ndata: [DONE]\n\n");
    vec![(now, format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{stream}").into_bytes())]
}

fn ask(proxy: &str) -> common::Reply {
    let body = json!({"model": "m", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    common::post(proxy, "/v1/messages", &body)
}

#[test]
fn https_upstreams_work_when_their_certificate_is_trusted() {
    let upstream = FakeUpstream::start(script);
    let (ca, certs, key) = certificates();
    let url = tls_front(upstream.addr.clone(), certs, key);
    let ca_file = std::env::temp_dir().join(format!("kvserve-tls-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca).unwrap();

    // The proxy, trusting the CA.
    let proxy = Server::start_env(&["--proxy", &url], None, &[("SSL_CERT_FILE", ca_file.as_path())]);
    let r = ask(&proxy.addr);
    assert_eq!(r.status, 200, "{}", r.body);
    let text: String = r
        .events()
        .iter()
        .filter(|(e, _)| e == "content_block_delta")
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok()?["delta"]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "über TLS");

    // Not trusting it: refused, the certificate named.
    let empty = std::env::temp_dir().join(format!("kvserve-tls-none-{}.pem", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    let wary = Server::start_env(&["--proxy", &url], None, &[("SSL_CERT_FILE", empty.as_path())]);
    let r = ask(&wary.addr);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("certificate"), "{}", r.body);

    // `kvserve claude --url https://...`'s questions to the server.
    std::env::set_var("SSL_CERT_FILE", &ca_file);
    assert_eq!(kvserve::launch::served_model(&url).unwrap(), "tls-model");
    assert_eq!(kvserve::launch::served_context(&url, Some("tls-model")).unwrap(), Some(4096));
    std::env::set_var("SSL_CERT_FILE", &empty);
    let e = kvserve::launch::served_model(&url).unwrap_err().to_string();
    assert!(e.contains("certificate"), "{e}");
}
