//! Bearer-token authentication: JWTs checked against the identity provider's published keys (JWKS).
//!
//! - [`keys`] loads and refreshes the key set (file or URL);
//! - [`verify`] checks one token: algorithm allow-list, key id, signature, `iss`, `aud`, `exp`, `nbf`, and
//!   extracts the roles (Keycloak's `realm_access.roles`, `resource_access.<audience>.roles`, or `scope`).

pub mod keys;
pub mod verify;

pub use keys::KeyStore;
pub use verify::{AuthError, Verifier};
