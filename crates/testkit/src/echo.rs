//! An upstream that answers every request with what it received (method, path, headers and the body's size as
//! JSON), to test what the edge forwards. It reads the whole body before answering, as an API does.
//! `?delay_ms=N` makes it answer after N milliseconds (a slow request in flight).

use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Serves on `127.0.0.1:{port}` until the returned task is aborted (or the test's runtime ends).
pub async fn start(port: u16) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let delay = req
                        .uri()
                        .query()
                        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
                        .and_then(|v| v.parse::<u64>().ok());
                    if let Some(ms) = delay {
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    }
                    let (parts, body) = req.into_parts();
                    let body_bytes = http_body_util::BodyExt::collect(body).await.map(|b| b.to_bytes().len());
                    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for (k, v) in &parts.headers {
                        headers
                            .entry(k.as_str().to_owned())
                            .or_default()
                            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
                    }
                    let body = serde_json::json!({
                        "method": parts.method.as_str(),
                        "path": parts.uri.path(),
                        "headers": headers,
                        "body_bytes": body_bytes.ok(),
                    });
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                    resp.headers_mut()
                        .insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(resp)
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    }))
}
