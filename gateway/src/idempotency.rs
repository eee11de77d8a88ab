//! `Idempotency-Key` on `POST` (draft-ietf-httpapi-idempotency-key-header): the first request with a key claims
//! it in PostgreSQL, shared by every replica, and later requests with the same key get the first answer again
//! without publishing anything. A key is scoped to the token's subject; reused with another request it is
//! refused (`422`); while its first request is still running, a second one gets `409`.
//!
//! A claim holds the order and event ids that its request publishes. If the replica dies between publishing and
//! storing the answer, the claim is taken over after its lease with the same ids: the retry republishes the same
//! command, whose copy the jobs' inboxes drop. A publish that is not confirmed ends the lease at once, keeping the
//! ids: it may still have reached the log, and a retry republishes the same command.

use std::time::Duration;

use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Longest key accepted (Stripe's limit; the draft sets none).
pub const MAX_KEY_LEN: usize = 255;

/// Why the key store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("idempotency store: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("idempotency store: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// A stored answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub location: Option<String>,
    pub body: Vec<u8>,
}

/// What a request with a key may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// This request owns the key: publish the command with these ids, then [`Store::complete`] or
    /// [`Store::release`].
    Owned { order_id: Uuid, event_id: Uuid },
    /// A request with this key and the same content was answered: answer the same.
    Replay(Answer),
    /// The key was used for another request.
    Mismatch,
    /// The first request with this key is still running.
    InProgress,
}

/// Which request a key was used for: the route and the exact body.
pub fn fingerprint(path: &str, body: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(path.as_bytes());
    h.update([0u8]);
    h.update(body);
    h.finalize().to_vec()
}

/// Whether `key` is acceptable: 1 to [`MAX_KEY_LEN`] visible ASCII characters (the draft's key is an sf-string;
/// clients commonly send a bare UUID, which is accepted too, with or without the quotes).
pub fn parse_key(raw: &str) -> Option<&str> {
    let key = raw.trim();
    let key = key.strip_prefix('"').and_then(|k| k.strip_suffix('"')).unwrap_or(key);
    let ok = !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    ok.then_some(key)
}

/// A claim this request owns. If the request goes away before it completed or released the claim (the client
/// disconnected and the server dropped the request), dropping the guard releases it in the background: without
/// that, the client's retry would get `409` until the lease ran out. The ids stay, so the retry republishes the
/// same command (see [`Store::release`]).
pub struct ClaimGuard {
    store: std::sync::Arc<Store>,
    principal: String,
    key: String,
    armed: bool,
}

impl ClaimGuard {
    pub fn new(store: std::sync::Arc<Store>, principal: &str, key: &str) -> Self {
        Self { store, principal: principal.to_owned(), key: key.to_owned(), armed: true }
    }

    /// The request completed or released the claim itself.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, principal, key) =
            (self.store.clone(), std::mem::take(&mut self.principal), std::mem::take(&mut self.key));
        runtime.spawn(async move {
            match store.release(&principal, &key).await {
                Ok(()) => tracing::info!(key, "request gone before its answer: idempotency key released"),
                Err(e) => tracing::warn!(error = %e, key, "releasing the key of a request that went away failed"),
            }
        });
    }
}

/// The keys, in PostgreSQL.
pub struct Store {
    pool: Pool,
    ttl: Duration,
    /// How long a claim is held before another request may take it over (longer than any request can run).
    lease: Duration,
}

impl Store {
    pub fn new(pool: Pool, ttl: Duration, lease: Duration) -> Self {
        Self { pool, ttl, lease }
    }

    /// Claims `key` for `principal`'s request with `hash`, or says why not. `fresh` are the ids a new claim gets.
    pub async fn claim(
        &self,
        principal: &str,
        key: &str,
        hash: &[u8],
        fresh: (Uuid, Uuid),
    ) -> Result<Claim, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (lease, ttl) = (self.lease.as_secs_f64(), self.ttl.as_secs_f64());
        let inserted = tx
            .query_opt(
                "INSERT INTO idempotency_keys (principal, key, request_hash, order_id, event_id, locked_until, expires_at)
                 VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), now() + make_interval(secs => $7))
                 ON CONFLICT (principal, key) DO NOTHING RETURNING order_id",
                &[&principal, &key, &hash, &fresh.0, &fresh.1, &lease, &ttl],
            )
            .await?;
        if inserted.is_some() {
            tx.commit().await?;
            return Ok(Claim::Owned { order_id: fresh.0, event_id: fresh.1 });
        }
        // Someone holds the key (a concurrent insert has committed by now: ON CONFLICT waited for it).
        let row = tx
            .query_opt(
                "SELECT request_hash, order_id, event_id, response_status, response_type, response_location,
                        response_body, locked_until > now() AS locked,
                        expires_at <= now() AND (response_status IS NOT NULL OR locked_until <= now()) AS expired
                 FROM idempotency_keys WHERE principal = $1 AND key = $2 FOR UPDATE",
                &[&principal, &key],
            )
            .await?;
        let Some(row) = row else {
            // Purged between the two statements: the next attempt inserts.
            return Ok(Claim::InProgress);
        };
        let claim = if row.get::<_, bool>("expired") {
            tx.execute(
                "UPDATE idempotency_keys SET request_hash = $3, order_id = $4, event_id = $5, response_status = NULL,
                        response_type = NULL, response_location = NULL, response_body = NULL,
                        locked_until = now() + make_interval(secs => $6), created_at = now(),
                        expires_at = now() + make_interval(secs => $7)
                 WHERE principal = $1 AND key = $2",
                &[&principal, &key, &hash, &fresh.0, &fresh.1, &lease, &ttl],
            )
            .await?;
            Claim::Owned { order_id: fresh.0, event_id: fresh.1 }
        } else if row.get::<_, &[u8]>("request_hash") != hash {
            Claim::Mismatch
        } else if let Some(status) = row.get::<_, Option<i16>>("response_status") {
            Claim::Replay(Answer {
                status: u16::try_from(status).unwrap_or(500),
                content_type: row.get::<_, Option<String>>("response_type").unwrap_or_default(),
                location: row.get("response_location"),
                body: row.get::<_, Option<Vec<u8>>>("response_body").unwrap_or_default(),
            })
        } else if row.get::<_, bool>("locked") {
            Claim::InProgress
        } else {
            // The owner died after claiming: take over with its ids (a republish is deduplicated downstream).
            tx.execute(
                "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => $3)
                 WHERE principal = $1 AND key = $2",
                &[&principal, &key, &lease],
            )
            .await?;
            Claim::Owned { order_id: row.get("order_id"), event_id: row.get("event_id") }
        };
        tx.commit().await?;
        Ok(claim)
    }

    /// Records the answer of the request that owns `key`.
    pub async fn complete(&self, principal: &str, key: &str, answer: &Answer) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let status = i16::try_from(answer.status).unwrap_or(500);
        client
            .execute(
                "UPDATE idempotency_keys SET response_status = $3, response_type = $4, response_location = $5,
                        response_body = $6, locked_until = now()
                 WHERE principal = $1 AND key = $2",
                &[&principal, &key, &status, &answer.content_type, &answer.location, &answer.body],
            )
            .await?;
        Ok(())
    }

    /// Ends the claim on `key` now, without an answer: its publish was not confirmed. The command may still have
    /// reached the log (a delivery timeout leaves that open), so the key keeps its ids: a retry takes the claim
    /// over at once and republishes the same command, which the jobs deduplicate.
    pub async fn release(&self, principal: &str, key: &str) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE idempotency_keys SET locked_until = now()
                 WHERE principal = $1 AND key = $2 AND response_status IS NULL",
                &[&principal, &key],
            )
            .await?;
        Ok(())
    }

    /// Deletes up to 10,000 expired keys; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .execute(
                "DELETE FROM idempotency_keys WHERE ctid IN
                   (SELECT ctid FROM idempotency_keys WHERE expires_at <= now() LIMIT 10000)",
                &[],
            )
            .await?)
    }

    /// Purges expired keys every `every` until `stop`.
    pub async fn purge_loop(self: std::sync::Arc<Self>, every: Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.purge_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(deleted = n, "expired idempotency keys purged"),
                Err(e) => tracing::warn!(error = %e, "purging expired idempotency keys failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert_eq!(parse_key("abc-123"), Some("abc-123"));
        assert_eq!(parse_key("\"8e03978e-40d5-43e8-bc93-6894a57f9324\""), Some("8e03978e-40d5-43e8-bc93-6894a57f9324"));
        assert_eq!(parse_key("  k  "), Some("k"));
        assert_eq!(parse_key(""), None);
        assert_eq!(parse_key("\"\""), None);
        assert_eq!(parse_key("caf\u{e9}"), None);
        assert_eq!(parse_key("a\tb"), None);
        assert!(parse_key(&"x".repeat(MAX_KEY_LEN)).is_some());
        assert_eq!(parse_key(&"x".repeat(MAX_KEY_LEN + 1)), None);
    }

    #[test]
    fn the_fingerprint_covers_route_and_body() {
        let a = fingerprint("/v1/orders", b"{}");
        assert_eq!(a, fingerprint("/v1/orders", b"{}"));
        assert_ne!(a, fingerprint("/v1/orders/async", b"{}"));
        assert_ne!(a, fingerprint("/v1/orders", b"{ }"));
        // The separator keeps path and body apart.
        assert_ne!(fingerprint("/a", b"b"), fingerprint("/ab", b""));
    }
}
