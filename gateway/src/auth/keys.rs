//! The key set the verifier trusts, loaded from a JWKS file, a JWKS URL, or the URL named by the issuer's OIDC
//! discovery document, and reloaded periodically and at once when a token names an unknown key, so that an
//! identity provider's key rotation reaches every replica without a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Where the keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    Url(String),
    /// `{issuer}/.well-known/openid-configuration` names the JWKS (`jwks_uri`).
    Discovery {
        issuer: String,
    },
}

/// Why a key set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading JWKS file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("fetching {0}: {1}")]
    Fetch(String, reqwest::Error),
    #[error("JWKS from {0} is not a valid key set: {1}")]
    Parse(String, serde_json::Error),
    #[error("JWKS from {0} holds no keys")]
    Empty(String),
    #[error("OIDC discovery document {0} is not valid: {1}")]
    Discovery(String, String),
}

/// What a reload was for (logs).
#[derive(Debug, Clone, Copy)]
enum Why {
    Periodic,
    UnknownKey,
}

/// The current key set, shared by all requests.
#[derive(Clone)]
pub struct KeyStore {
    inner: Arc<Inner>,
}

struct Inner {
    source: KeySource,
    /// The set and its generation, replaced together.
    keys: RwLock<Option<(u64, Arc<JwkSet>)>>,
    /// `jwks_uri` learnt from discovery; forgotten when fetching it fails, so that the next load rediscovers.
    discovered: RwLock<Option<String>>,
    http: reqwest::Client,
    /// Serialises loads (one fetch at a time, however many requests miss a key); holds when the last began.
    last_load: tokio::sync::Mutex<Option<Instant>>,
    /// Successful loads so far: a request that waited for another's load retries with its keys.
    generation: AtomicU64,
    /// Least time between two loads caused by unknown keys (forged `kid`s must not hammer the provider).
    min_interval: Duration,
}

/// The part of an OIDC discovery document the gateway needs.
#[derive(Deserialize)]
struct ProviderMetadata {
    issuer: String,
    jwks_uri: String,
}

impl KeyStore {
    /// A store that loads from `source`, and on an unknown key at most once per `min_interval`.
    pub fn new(source: KeySource, min_interval: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            inner: Arc::new(Inner {
                source,
                keys: RwLock::new(None),
                discovered: RwLock::new(None),
                http,
                last_load: tokio::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
                min_interval,
            }),
        }
    }

    /// A store holding `set`.
    #[cfg(test)]
    pub fn fixed(set: JwkSet) -> Self {
        let store = Self::new(KeySource::File(PathBuf::new()), Duration::from_secs(3600));
        store.install(set);
        store
    }

    /// How many loads succeeded so far: changes whenever the key set is replaced.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The keys now and their generation, if any load has succeeded.
    pub fn current(&self) -> Option<(u64, Arc<JwkSet>)> {
        self.inner.keys.read().ok().and_then(|k| k.clone())
    }

    pub(crate) fn install(&self, set: JwkSet) {
        let mut k = self.inner.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        *k = Some((generation, Arc::new(set)));
    }

    /// Loads the key set once and installs it; on failure the previous set stays.
    pub async fn reload(&self) -> Result<usize, KeyError> {
        let mut last = self.inner.last_load.lock().await;
        *last = Some(Instant::now());
        self.load(Why::Periodic).await
    }

    /// After a token named a key that the set of generation `seen` lacks: reloads at once unless a load began less
    /// than `min_interval` ago. Returns whether the keys may have changed since (then verifying again is worth it).
    pub async fn refresh_for_unknown_key(&self, seen: u64) -> bool {
        if self.inner.generation.load(Ordering::Acquire) != seen {
            return true; // replaced since the caller looked
        }
        let mut last = self.inner.last_load.lock().await;
        if self.inner.generation.load(Ordering::Acquire) != seen {
            return true; // another request's load finished while this one waited
        }
        if last.is_some_and(|t| t.elapsed() < self.inner.min_interval) {
            return false;
        }
        *last = Some(Instant::now());
        match self.load(Why::UnknownKey).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "JWKS reload for an unknown key failed; keeping the previous keys");
                false
            }
        }
    }

    async fn load(&self, why: Why) -> Result<usize, KeyError> {
        let (origin, bytes) = match &self.inner.source {
            KeySource::File(path) => {
                let bytes = tokio::fs::read(path).await.map_err(|e| KeyError::Read(path.clone(), e))?;
                (path.display().to_string(), bytes)
            }
            KeySource::Url(url) => (url.clone(), self.fetch(url).await?),
            KeySource::Discovery { issuer } => {
                let known = self.inner.discovered.read().ok().and_then(|d| d.clone());
                let url = match known {
                    Some(url) => url,
                    None => self.discover(issuer).await?,
                };
                match self.fetch(&url).await {
                    Ok(bytes) => (url, bytes),
                    Err(e) => {
                        if let Ok(mut d) = self.inner.discovered.write() {
                            *d = None;
                        }
                        return Err(e);
                    }
                }
            }
        };
        let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| KeyError::Parse(origin.clone(), e))?;
        if set.keys.is_empty() {
            return Err(KeyError::Empty(origin));
        }
        let n = set.keys.len();
        self.install(set);
        match why {
            Why::Periodic => tracing::debug!(keys = n, from = %origin, "JWKS loaded"),
            Why::UnknownKey => {
                tracing::info!(keys = n, from = %origin, "JWKS reloaded for a token with an unknown key")
            }
        }
        Ok(n)
    }

    async fn fetch(&self, url: &str) -> Result<Vec<u8>, KeyError> {
        let fetch = async { self.inner.http.get(url).send().await?.error_for_status()?.bytes().await };
        Ok(fetch.await.map_err(|e| KeyError::Fetch(url.to_owned(), e))?.to_vec())
    }

    /// Reads the issuer's discovery document (OpenID Connect Discovery 1.0, section 4) and returns its `jwks_uri`.
    async fn discover(&self, issuer: &str) -> Result<String, KeyError> {
        let url = discovery_url(issuer);
        let bytes = self.fetch(&url).await?;
        let meta: ProviderMetadata =
            serde_json::from_slice(&bytes).map_err(|e| KeyError::Discovery(url.clone(), e.to_string()))?;
        // Section 4.3: the document's issuer must be exactly the one it was fetched for.
        if meta.issuer != issuer {
            return Err(KeyError::Discovery(url, format!("it names issuer {:?}, expected {issuer:?}", meta.issuer)));
        }
        // Keys over plain HTTP only from an issuer that is itself plain HTTP (local development): an https issuer
        // pointing at an http JWKS would let anyone on the path inject signing keys.
        let plain_ok = issuer.starts_with("http://") && meta.jwks_uri.starts_with("http://");
        if !(meta.jwks_uri.starts_with("https://") || plain_ok) {
            return Err(KeyError::Discovery(
                url,
                format!("jwks_uri {:?} must be an https URL (as the issuer is)", meta.jwks_uri),
            ));
        }
        tracing::info!(issuer, jwks_uri = %meta.jwks_uri, "OIDC discovery done");
        if let Ok(mut d) = self.inner.discovered.write() {
            *d = Some(meta.jwks_uri.clone());
        }
        Ok(meta.jwks_uri)
    }

    /// Reloads every `every` until `stop`; `on_result` learns whether keys are loaded (readiness).
    pub async fn refresh_loop(self, every: Duration, stop: CancellationToken, on_result: impl Fn(bool)) {
        loop {
            match self.reload().await {
                Ok(_) => on_result(true),
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

/// `{issuer}/.well-known/openid-configuration` (one slash between them, as the specification says).
pub fn discovery_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_discovery_document_sits_under_the_issuer() {
        assert_eq!(
            discovery_url("https://kc.example/realms/orders"),
            "https://kc.example/realms/orders/.well-known/openid-configuration"
        );
        assert_eq!(discovery_url("https://idp.example/"), "https://idp.example/.well-known/openid-configuration");
    }
}
