//! Versioned schema migrations, embedded in the binary and applied in order, each in its own transaction.
//!
//! Applied versions are recorded in `schema_migrations`. A session advisory lock serialises concurrent starts
//! (several worker replicas starting at once apply each migration exactly once). A migration that was applied
//! but whose file changed is refused: history is never rewritten silently.

use deadpool_postgres::Pool;

/// The migrations of this build, in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "orders", include_str!("../../migrations/0001_orders.sql")),
    (2, "validation", include_str!("../../migrations/0002_validation.sql")),
    (3, "idempotency", include_str!("../../migrations/0003_idempotency.sql")),
];

/// An arbitrary constant naming our advisory lock.
const LOCK_KEY: i64 = 0x6f72_6465_7273; // "orders"

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("getting a connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("migration {version} ({name}) was applied with other contents; refusing to continue")]
    Changed { version: i32, name: String },
}

/// Applies the pending migrations; returns how many were applied now.
pub async fn run(pool: &Pool) -> Result<usize, MigrateError> {
    let mut client = pool.get().await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 checksum text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]).await?;
    let result = apply_pending(&mut client).await;
    // Unlock even when a migration failed; the session ends with the connection anyway.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]).await;
    result
}

async fn apply_pending(client: &mut deadpool_postgres::Client) -> Result<usize, MigrateError> {
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS {
        let checksum = checksum(sql);
        let row = client.query_opt("SELECT checksum FROM schema_migrations WHERE version = $1", &[version]).await?;
        match row {
            Some(r) if r.get::<_, String>(0) == checksum => continue,
            Some(_) => return Err(MigrateError::Changed { version: *version, name: (*name).to_owned() }),
            None => {}
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[version, name, &checksum],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "migration applied");
        applied += 1;
    }
    Ok(applied)
}

/// FNV-1a over the file: enough to notice an edited migration, no cryptography needed.
fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_strictly_increasing() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn checksum_changes_with_content() {
        assert_ne!(checksum("a"), checksum("b"));
        assert_eq!(checksum("a"), checksum("a"));
    }
}
