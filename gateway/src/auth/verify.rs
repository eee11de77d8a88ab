//! Checking one bearer token and turning it into a [`Principal`].

use std::collections::BTreeSet;

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
}

impl Verifier {
    pub fn new(keys: KeyStore, issuer: &str, audience: &str, leeway_secs: u64) -> Self {
        Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway_secs,
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
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
        match self.verify(token) {
            Err(AuthError::UnknownKey) if self.keys.refresh_for_unknown_key().await => self.verify(token),
            other => other,
        }
    }

    /// Checks one compact JWT.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        let keys = self.keys.current().ok_or(AuthError::KeysUnavailable)?;
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
        Ok(self.principal(data.claims))
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
        (key, Verifier::new(KeyStore::fixed(set), ISS, AUD, 5))
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
}
