//! The key set the verifier trusts, loaded from a JWKS file or URL and reloaded periodically, so that an
//! identity provider's key rotation reaches every replica without a restart.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use tokio_util::sync::CancellationToken;

/// Where the keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    Url(String),
}

/// Why a key set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading JWKS file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("fetching JWKS from {0}: {1}")]
    Fetch(String, reqwest::Error),
    #[error("JWKS from {0} is not a valid key set: {1}")]
    Parse(String, serde_json::Error),
    #[error("JWKS from {0} holds no keys")]
    Empty(String),
}

/// The current key set, shared by all requests.
#[derive(Clone)]
pub struct KeyStore {
    source: KeySource,
    keys: Arc<RwLock<Option<Arc<JwkSet>>>>,
    http: reqwest::Client,
}

impl KeyStore {
    pub fn new(source: KeySource) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { source, keys: Arc::new(RwLock::new(None)), http }
    }

    /// A store holding `set`.
    #[cfg(test)]
    pub fn fixed(set: JwkSet) -> Self {
        let store = Self::new(KeySource::File(PathBuf::new()));
        store.replace(set);
        store
    }

    /// The keys now, if any load has succeeded.
    pub fn current(&self) -> Option<Arc<JwkSet>> {
        self.keys.read().ok().and_then(|k| k.clone())
    }

    fn replace(&self, set: JwkSet) {
        if let Ok(mut k) = self.keys.write() {
            *k = Some(Arc::new(set));
        }
    }

    /// Loads the key set once and installs it; on failure the previous set stays.
    pub async fn reload(&self) -> Result<usize, KeyError> {
        let (origin, bytes) = match &self.source {
            KeySource::File(path) => {
                let bytes = tokio::fs::read(path).await.map_err(|e| KeyError::Read(path.clone(), e))?;
                (path.display().to_string(), bytes)
            }
            KeySource::Url(url) => {
                let fetch = async { self.http.get(url).send().await?.error_for_status()?.bytes().await };
                let bytes = fetch.await.map_err(|e| KeyError::Fetch(url.clone(), e))?;
                (url.clone(), bytes.to_vec())
            }
        };
        let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| KeyError::Parse(origin.clone(), e))?;
        if set.keys.is_empty() {
            return Err(KeyError::Empty(origin));
        }
        let n = set.keys.len();
        self.replace(set);
        Ok(n)
    }

    /// Reloads every `every` until `stop`; `on_result` learns whether keys are loaded (readiness).
    pub async fn refresh_loop(self, every: Duration, stop: CancellationToken, on_result: impl Fn(bool)) {
        loop {
            match self.reload().await {
                Ok(n) => {
                    tracing::debug!(keys = n, "JWKS loaded");
                    on_result(true);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS reload failed; keeping the previous keys");
                    on_result(self.current().is_some());
                }
            }
            // Until the first load succeeds, retry quickly: the service is not ready before that.
            let wait = if self.current().is_some() { every } else { Duration::from_secs(1) };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
