//! A stand-in identity provider over real HTTP: an OIDC discovery document and a JWKS whose keys a test can
//! rotate, counting the JWKS fetches (to see the gateway refresh on an unknown `kid`, and not more often).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use devkit::SigningKey;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Serves `{issuer}/.well-known/openid-configuration` and `{issuer}/certs` until dropped.
pub struct Idp {
    /// `http://127.0.0.1:{port}/realms/test`
    pub issuer: String,
    jwks: Arc<Mutex<serde_json::Value>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Idp {
    /// Starts on a free loopback port, publishing `keys`.
    pub async fn start(keys: &[&SigningKey]) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let issuer = format!("http://{}/realms/test", listener.local_addr()?);
        let jwks = Arc::new(Mutex::new(devkit::jwks(keys)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let discovery = serde_json::json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/certs"),
            "token_endpoint": format!("{issuer}/token"),
            "id_token_signing_alg_values_supported": ["RS256"],
        })
        .to_string();
        let state = (jwks.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (state, discovery) = (state.clone(), discovery.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let body = match req.uri().path() {
                            "/realms/test/.well-known/openid-configuration" => Some(discovery.clone()),
                            "/realms/test/certs" => {
                                state.1.fetch_add(1, Ordering::SeqCst);
                                state.0.lock().ok().map(|j| j.to_string())
                            }
                            _ => None,
                        };
                        async move {
                            let mut resp =
                                hyper::Response::new(Full::new(Bytes::from(body.clone().unwrap_or_default())));
                            match body {
                                Some(_) => {
                                    resp.headers_mut().insert(
                                        "content-type",
                                        hyper::header::HeaderValue::from_static("application/json"),
                                    );
                                }
                                None => *resp.status_mut() = hyper::StatusCode::NOT_FOUND,
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ =
                        auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Ok(Self { issuer, jwks, fetches, task })
    }

    /// Publishes `keys` instead (a key rotation).
    pub fn rotate(&self, keys: &[&SigningKey]) {
        if let Ok(mut j) = self.jwks.lock() {
            *j = devkit::jwks(keys);
        }
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
