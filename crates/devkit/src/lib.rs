//! Development credentials standing in for Keycloak: an RSA signing key, the JWKS that publishes it, and bearer
//! tokens shaped like Keycloak's (`realm_access.roles`, `scope`). The local stack writes them into `.stack/`; the
//! tests mint good and bad tokens with them. Never used in production: the gateway only ever reads a JWKS.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use openssl::rsa::Rsa;
use serde::Serialize;

/// The roles a token needs for the order endpoints.
pub const ROLE_WRITE: &str = "orders:write";
pub const ROLE_READ: &str = "orders:read";

/// Why a credential could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevkitError {
    #[error("generating or reading an RSA key: {0}")]
    Key(#[from] openssl::error::ErrorStack),
    #[error("signing a token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// An RSA signing key with its key id.
pub struct SigningKey {
    pub kid: String,
    private_pem: Vec<u8>,
    n: Vec<u8>,
    e: Vec<u8>,
}

impl SigningKey {
    /// A fresh 2048-bit RSA key with a random key id.
    pub fn generate() -> Result<Self, DevkitError> {
        let rsa = Rsa::generate(2048)?;
        let pem = rsa.private_key_to_pem()?;
        Self::from_pem(&format!("dev-{}", uuid::Uuid::new_v4().simple()), &pem)
    }

    /// A key read back from its PKCS#1 or PKCS#8 PEM.
    pub fn from_pem(kid: &str, pem: &[u8]) -> Result<Self, DevkitError> {
        let rsa = Rsa::private_key_from_pem(pem)?;
        Ok(Self {
            kid: kid.to_owned(),
            private_pem: rsa.private_key_to_pem()?,
            n: rsa.n().to_vec(),
            e: rsa.e().to_vec(),
        })
    }

    pub fn private_pem(&self) -> &[u8] {
        &self.private_pem
    }

    /// The public half as a JWK (RFC 7517) for RS256.
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&self.n),
            "e": URL_SAFE_NO_PAD.encode(&self.e),
        })
    }

    /// Signs `claims` with RS256 and this key's `kid`.
    pub fn sign(&self, claims: &Claims) -> Result<String, DevkitError> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&self.private_pem)?)?)
    }

    /// The classic key-confusion forgery: HS256 under this key's `kid`, with the *public* key (its JWK, as
    /// published) as the HMAC secret. A verifier that lets the token pick its algorithm would accept it.
    pub fn forge_hs256_with_public_key(&self, claims: &Claims) -> Result<String, DevkitError> {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        let secret = serde_json::to_vec(&self.jwk())?;
        Ok(jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&secret))?)
    }
}

/// A JWKS document publishing `keys`.
pub fn jwks(keys: &[&SigningKey]) -> serde_json::Value {
    serde_json::json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

/// Keycloak's shape of the realm roles claim.
#[derive(Debug, Clone, Serialize)]
pub struct RealmAccess {
    pub roles: Vec<String>,
}

/// The claims of a dev token.
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    pub nbf: u64,
    pub realm_access: RealmAccess,
    pub scope: String,
}

impl Claims {
    /// Claims for `sub` valid from now for `ttl_secs`, with both order roles.
    pub fn new(issuer: &str, audience: &str, sub: &str, ttl_secs: u64) -> Self {
        let now = now_secs();
        Self {
            iss: issuer.to_owned(),
            aud: audience.to_owned(),
            sub: sub.to_owned(),
            exp: now + ttl_secs,
            iat: now,
            nbf: now,
            realm_access: RealmAccess { roles: vec![ROLE_WRITE.into(), ROLE_READ.into()] },
            scope: "openid".into(),
        }
    }

    /// The same claims, expired `secs_ago` seconds ago.
    pub fn expired(mut self, secs_ago: u64) -> Self {
        let now = now_secs();
        self.iat = now.saturating_sub(secs_ago + 3600);
        self.nbf = self.iat;
        self.exp = now.saturating_sub(secs_ago);
        self
    }
}

/// An unsigned token with `alg: none`, which a verifier must refuse.
pub fn unsigned_token(claims: &Claims) -> Result<String, DevkitError> {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?);
    Ok(format!("{header}.{body}."))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};

    #[test]
    fn a_signed_token_verifies_against_the_published_jwks() {
        let key = SigningKey::generate().expect("key");
        let set: JwkSet = serde_json::from_value(jwks(&[&key])).expect("jwks");
        let jwk = set.find(&key.kid).expect("kid");
        let token = key.sign(&Claims::new("iss", "aud", "alice", 60)).expect("sign");
        let mut v = Validation::new(Algorithm::RS256);
        v.set_audience(&["aud"]);
        v.set_issuer(&["iss"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, &DecodingKey::from_jwk(jwk).expect("dk"), &v)
            .expect("valid");
        assert_eq!(data.claims["sub"], "alice");
        assert_eq!(data.claims["realm_access"]["roles"][0], ROLE_WRITE);
    }

    #[test]
    fn a_key_survives_a_pem_round_trip() {
        let key = SigningKey::generate().expect("key");
        let again = SigningKey::from_pem(&key.kid, key.private_pem()).expect("pem");
        assert_eq!(key.jwk(), again.jwk());
    }
}
