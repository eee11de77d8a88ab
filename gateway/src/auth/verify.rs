//! Checking one bearer token and turning it into a [`Principal`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use super::keys::KeyStore;

/// Algorithms accepted by default: asymmetric only. `none` cannot be expressed, and HMAC is never accepted, so a
/// public key can never be used as a shared secret.
pub const DEFAULT_ALGORITHMS: &[Algorithm] = &[Algorithm::RS256, Algorithm::PS256, Algorithm::ES256];

/// Why a request is not authenticated or not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("signing keys are not loaded yet")]
    KeysUnavailable,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("missing role {0}")]
    Forbidden(&'static str),
}

impl AuthError {
    /// The `error` parameter of `WWW-Authenticate` (RFC 6750 section 3.1), or `None` when the token was missing.
    pub fn bearer_error(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing | AuthError::KeysUnavailable => None,
            AuthError::Forbidden(_) => Some("insufficient_scope"),
            _ => Some("invalid_token"),
        }
    }
}

/// Who made the request and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub roles: BTreeSet<String>,
}

impl Principal {
    pub fn require(&self, role: &'static str) -> Result<(), AuthError> {
        if self.roles.contains(role) { Ok(()) } else { Err(AuthError::Forbidden(role)) }
    }
}

#[derive(Deserialize)]
struct RoleList {
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
struct Claims {
    /// Required by the validation (`set_required_spec_claims`); bounds how long a verified token is cached.
    exp: u64,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    realm_access: Option<RoleList>,
    #[serde(default)]
    resource_access: Option<std::collections::HashMap<String, RoleList>>,
    #[serde(default)]
    scope: Option<String>,
}

/// Verifies tokens against a [`KeyStore`].
#[derive(Clone)]
pub struct Verifier {
    keys: KeyStore,
    issuer: String,
    audience: String,
    leeway_secs: u64,
    algorithms: Vec<Algorithm>,
    cache: Arc<Mutex<TokenCache>>,
}

/// Tokens already verified, so that a client's repeated token costs a lookup instead of a signature check (an
/// RSA verification is most of the gateway's CPU per request otherwise). An entry holds until the token's `exp`
/// (plus the leeway, as the check itself) and only for the key set it was verified with: a reload that drops a
/// key drops trust in its tokens. Bounded: when full, expired entries go, and if that is not enough, all.
struct TokenCache {
    entries: HashMap<Box<str>, Cached>,
    capacity: usize,
}

struct Cached {
    principal: Principal,
    /// Unix seconds after which the entry is stale.
    until: u64,
    keys_generation: u64,
}

impl TokenCache {
    fn get(&self, token: &str, now: u64, keys_generation: u64) -> Option<Principal> {
        let c = self.entries.get(token)?;
        (now <= c.until && c.keys_generation == keys_generation).then(|| c.principal.clone())
    }

    fn put(&mut self, token: &str, cached: Cached, now: u64) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, c| now <= c.until);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        self.entries.insert(token.into(), cached);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Verifier {
    /// A verifier that remembers up to `cache_capacity` verified tokens (0: none).
    pub fn new(keys: KeyStore, issuer: &str, audience: &str, leeway_secs: u64, cache_capacity: usize) -> Self {
        Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway_secs,
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
            cache: Arc::new(Mutex::new(TokenCache { entries: HashMap::new(), capacity: cache_capacity })),
        }
    }

    /// Checks the value of an `Authorization` header. A token signed by a key the set lacks makes the key store
    /// reload (rate-limited) and is checked once more: that is how a rotated key is picked up at once.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let (now, generation) = (unix_now(), self.keys.generation());
        if let Some(p) = self.cache.lock().ok().and_then(|c| c.get(token, now, generation)) {
            return Ok(p);
        }
        let verified = match self.verify_claims(token) {
            (Err(AuthError::UnknownKey), seen) if self.keys.refresh_for_unknown_key(seen).await => {
                self.verify_claims(token)
            }
            other => other,
        };
        // Cached under the generation of the very set that verified it: a reload in between cannot lend it trust.
        let (principal, exp) = verified.0?;
        let cached = Cached {
            principal: principal.clone(),
            until: exp.saturating_add(self.leeway_secs),
            keys_generation: verified.1,
        };
        if let Ok(mut c) = self.cache.lock() {
            c.put(token, cached, now);
        }
        Ok(principal)
    }

    /// Checks one compact JWT (no cache).
    #[cfg(test)]
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_claims(token).0.map(|(p, _)| p)
    }

    /// Checks one compact JWT: the principal and the token's `exp`, and the generation of the key set used.
    fn verify_claims(&self, token: &str) -> (Result<(Principal, u64), AuthError>, u64) {
        match self.keys.current() {
            Some((generation, keys)) => (self.verify_with(token, &keys), generation),
            None => (Err(AuthError::KeysUnavailable), 0),
        }
    }

    fn verify_with(&self, token: &str, keys: &JwkSet) -> Result<(Principal, u64), AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        let jwk = match &header.kid {
            Some(kid) => keys.find(kid),
            // Without a kid, a set of exactly one key is unambiguous.
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => None,
        }
        .ok_or(AuthError::UnknownKey)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| AuthError::UnknownKey)?;

        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;
        let data = decode::<Claims>(token, &key, &validation).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let exp = data.claims.exp;
        Ok((self.principal(data.claims), exp))
    }

    fn principal(&self, claims: Claims) -> Principal {
        let mut roles = BTreeSet::new();
        if let Some(r) = claims.realm_access {
            roles.extend(r.roles);
        }
        if let Some(mut by_client) = claims.resource_access
            && let Some(r) = by_client.remove(&self.audience)
        {
            roles.extend(r.roles);
        }
        if let Some(scope) = claims.scope {
            roles.extend(scope.split_whitespace().map(str::to_owned));
        }
        Principal { subject: claims.sub, roles }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devkit::{Claims as DevClaims, SigningKey, jwks, unsigned_token};
    use jsonwebtoken::jwk::JwkSet;

    const ISS: &str = "https://idp.test/realms/r";
    const AUD: &str = "orders-api";

    fn setup() -> (SigningKey, Verifier) {
        let key = SigningKey::generate().expect("key");
        let set: JwkSet = serde_json::from_value(jwks(&[&key])).expect("jwks");
        (key, Verifier::new(KeyStore::fixed(set), ISS, AUD, 5, 100))
    }

    #[tokio::test]
    async fn a_valid_token_yields_roles_from_realm_and_scope() {
        let (key, v) = setup();
        let mut claims = DevClaims::new(ISS, AUD, "alice", 60);
        claims.scope = "openid orders:extra".into();
        let p = v.authenticate(Some(&format!("Bearer {}", key.sign(&claims).expect("sign")))).await.expect("ok");
        assert_eq!(p.subject, "alice");
        assert!(p.roles.contains("orders:write") && p.roles.contains("orders:extra"));
        assert!(p.require("orders:write").is_ok());
        assert_eq!(p.require("admin"), Err(AuthError::Forbidden("admin")));
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_for_the_right_reason() {
        let (key, v) = setup();
        let (other, _) = setup();
        assert_eq!(v.authenticate(None).await, Err(AuthError::Missing));
        assert_eq!(v.authenticate(Some("Basic abc")).await, Err(AuthError::Missing));

        let expired = key.sign(&DevClaims::new(ISS, AUD, "a", 60).expired(120)).expect("sign");
        assert!(matches!(v.verify(&expired), Err(AuthError::Invalid(m)) if m.contains("Expired")));

        // Same kid as the trusted key but another key's signature.
        let forged = SigningKey::from_pem(&key.kid, other.private_pem()).expect("pem");
        let t = forged.sign(&DevClaims::new(ISS, AUD, "a", 60)).expect("sign");
        assert!(matches!(v.verify(&t), Err(AuthError::Invalid(m)) if m.contains("Signature")));

        let t = other.sign(&DevClaims::new(ISS, AUD, "a", 60)).expect("sign");
        assert_eq!(v.verify(&t), Err(AuthError::UnknownKey));

        let none = unsigned_token(&DevClaims::new(ISS, AUD, "a", 60)).expect("none");
        assert!(matches!(v.verify(&none), Err(AuthError::Malformed(_))));

        let wrong_aud = key.sign(&DevClaims::new(ISS, "other", "a", 60)).expect("sign");
        assert!(matches!(v.verify(&wrong_aud), Err(AuthError::Invalid(m)) if m.contains("Audience")));
        let wrong_iss = key.sign(&DevClaims::new("https://evil", AUD, "a", 60)).expect("sign");
        assert!(matches!(v.verify(&wrong_iss), Err(AuthError::Invalid(m)) if m.contains("Issuer")));
        assert!(matches!(v.verify("not-a-jwt"), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn expiry_within_the_leeway_is_accepted() {
        let (key, v) = setup();
        let t = key.sign(&DevClaims::new(ISS, AUD, "a", 60).expired(2)).expect("sign");
        assert!(v.verify(&t).is_ok());
    }

    #[tokio::test]
    async fn verified_tokens_are_cached_only_for_the_key_set_that_verified_them() {
        let (key, v) = setup();
        let header = format!("Bearer {}", key.sign(&DevClaims::new(ISS, AUD, "alice", 60)).expect("sign"));
        assert!(v.authenticate(Some(&header)).await.is_ok());
        assert_eq!(v.cache.lock().expect("lock").entries.len(), 1);
        assert_eq!(v.authenticate(Some(&header)).await.map(|p| p.subject), Ok("alice".to_owned()));
        // The provider drops the key: the cached token is not trusted any more.
        let (other, _) = setup();
        v.keys.install(serde_json::from_value(jwks(&[&other])).expect("jwks"));
        assert_eq!(v.authenticate(Some(&header)).await, Err(AuthError::UnknownKey));
    }

    #[test]
    fn the_cache_forgets_expired_tokens_and_stays_bounded() {
        let principal = Principal { subject: "a".into(), roles: BTreeSet::new() };
        let entry = |until| Cached { principal: principal.clone(), until, keys_generation: 1 };
        let mut cache = TokenCache { entries: HashMap::new(), capacity: 3 };
        cache.put("t1", entry(100), 50);
        assert!(cache.get("t1", 100, 1).is_some());
        assert!(cache.get("t1", 101, 1).is_none(), "past exp + leeway");
        assert!(cache.get("t1", 60, 2).is_none(), "another key set");
        cache.put("t2", entry(40), 50);
        cache.put("t3", entry(200), 50);
        cache.put("t4", entry(200), 50); // full: the expired t2 goes
        assert_eq!(cache.entries.len(), 3);
        assert!(cache.entries.contains_key("t4") && !cache.entries.contains_key("t2"));
        cache.put("t5", entry(200), 50); // full of live entries: cleared
        assert_eq!(cache.entries.len(), 1);
        let mut off = TokenCache { entries: HashMap::new(), capacity: 0 };
        off.put("t", entry(200), 50);
        assert!(off.entries.is_empty());
    }
}
