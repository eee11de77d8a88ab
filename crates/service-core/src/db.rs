//! PostgreSQL settings and connection pools, shared by the services that use the database (feature `postgres`).

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

/// `[database]` in a service's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub pool_size: usize,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { url: "postgres://orders@127.0.0.1:55432/orders".into(), pool_size: 4 }
    }
}

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {0}")]
    Url(tokio_postgres::Error),
    #[error("building the connection pool: {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
}

/// Whether the pool's sessions may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// `default_transaction_read_only` and a 5 s statement timeout: for read paths that must never write.
    ReadOnly,
}

/// A pool of at most `config.pool_size` connections to `config.url`. Connections are made on first use, so a
/// database that is down does not stop the service from starting.
pub fn pool(config: &DatabaseConfig, access: Access) -> Result<Pool, DbError> {
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(DbError::Url)?;
    if access == Access::ReadOnly {
        pg.options("-c default_transaction_read_only=on -c statement_timeout=5000");
    }
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Ok(Pool::builder(manager).max_size(config.pool_size).build()?)
}
