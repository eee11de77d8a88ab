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
    /// Like `ReadWriteBounded`, connecting (3 s) and waiting for a pooled connection (5 s) are bounded too.
    ReadOnly,
    /// Writes allowed, with a 5 s statement timeout: for request paths, which must not hang on a stuck database.
    ReadWriteBounded,
}

/// A pool of at most `config.pool_size` connections to `config.url`. Connections are made on first use, so a
/// database that is down does not stop the service from starting.
pub fn pool(config: &DatabaseConfig, access: Access) -> Result<Pool, DbError> {
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(DbError::Url)?;
    match access {
        Access::ReadWrite => {}
        Access::ReadOnly => {
            pg.options("-c default_transaction_read_only=on -c statement_timeout=5000");
        }
        Access::ReadWriteBounded => {
            pg.options("-c statement_timeout=5000 -c idle_in_transaction_session_timeout=10000");
        }
    }
    // Request paths must not wait on a database that does not answer: bounded connect, pool wait and create.
    let request_path = access != Access::ReadWrite;
    if request_path {
        pg.connect_timeout(std::time::Duration::from_secs(3));
    }
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let mut builder = Pool::builder(manager).max_size(config.pool_size);
    if request_path {
        builder = builder
            .runtime(deadpool_postgres::Runtime::Tokio1)
            // A burst queues behind the pool's few connections: the wait is bounded, not tight (a 2 s bound failed
            // 50 concurrent claims on a loaded CI machine).
            .wait_timeout(Some(std::time::Duration::from_secs(5)))
            .create_timeout(Some(std::time::Duration::from_secs(5)));
    }
    Ok(builder.build()?)
}

/// Traces of PostgreSQL statements: one CLIENT span per statement (semantic conventions for databases), named
/// after its summary, for example `INSERT orders`.
pub mod trace {
    use std::sync::OnceLock;

    use opentelemetry::metrics::Histogram;

    use crate::telemetry::{self, Context, KeyValue, SpanKind, TraceContextExt as _};

    /// Where a unit of work's statements put their spans.
    pub struct Scope<'a> {
        pub tracer: &'a opentelemetry::global::BoxedTracer,
        /// The span the statements are children of.
        pub parent: &'a Context,
        /// The database name (`db.namespace`).
        pub namespace: &'a str,
    }

    impl Scope<'_> {
        /// Runs `statement` (which may prepare, then execute) inside a CLIENT span named `summary`
        /// (`OPERATION collection`, e.g. `SELECT orders`), with `query` the statement's text with placeholders
        /// (never the values), and records its duration.
        pub async fn run<T>(
            &self,
            summary: &'static str,
            query: &'static str,
            statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
        ) -> Result<T, tokio_postgres::Error> {
            let cx = telemetry::start(self.tracer, summary, SpanKind::Client, self.parent, || {
                let mut v = statement_attributes(summary);
                v.push(KeyValue::new("db.namespace", self.namespace.to_owned()));
                v.push(KeyValue::new("db.query.summary", summary));
                v.push(KeyValue::new("db.query.text", query));
                v
            });
            let started = std::time::Instant::now();
            let result = statement.await;
            // `error.type`: the SQLSTATE of a statement the server refused, `connection` when it never answered.
            let error_type = result
                .as_ref()
                .err()
                .map(|e| e.code().map_or_else(|| "connection".to_owned(), |c| c.code().to_owned()));
            record(summary, started.elapsed().as_secs_f64(), error_type.as_deref());
            match (&result, &error_type) {
                (Err(e), Some(kind)) => {
                    if e.code().is_some() && cx.span().is_recording() {
                        cx.span().set_attribute(KeyValue::new("db.response.status_code", kind.clone()));
                    }
                    telemetry::end(&cx, Some((kind, e)));
                }
                _ => telemetry::end(&cx, None),
            }
            result
        }
    }

    /// `db.system.name`, `db.operation.name` and `db.collection.name` of a statement's `summary`.
    fn statement_attributes(summary: &'static str) -> Vec<KeyValue> {
        let (operation, collection) = summary.split_once(' ').map_or((summary, None), |(o, c)| (o, Some(c)));
        let mut v = vec![KeyValue::new("db.system.name", "postgresql"), KeyValue::new("db.operation.name", operation)];
        if let Some(collection) = collection {
            v.push(KeyValue::new("db.collection.name", collection));
        }
        v
    }

    /// `db.client.operation.duration{db.operation.name, db.collection.name, error.type}` (seconds): statements
    /// by type and table, for the database dashboard.
    fn record(summary: &'static str, seconds: f64, error_type: Option<&str>) {
        static DURATION: OnceLock<Histogram<f64>> = OnceLock::new();
        let histogram = DURATION.get_or_init(|| {
            opentelemetry::global::meter("postgresql")
                .f64_histogram("db.client.operation.duration")
                .with_unit("s")
                .with_description("Duration of database statements")
                .with_boundaries(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                .build()
        });
        let mut attrs = statement_attributes(summary);
        if let Some(kind) = error_type {
            attrs.push(KeyValue::new("error.type", kind.to_owned()));
        }
        histogram.record(seconds, &attrs);
    }

    /// The database name of a connection URL, the spans' `db.namespace`.
    pub fn namespace(url: &str) -> String {
        url.parse::<tokio_postgres::Config>().ok().and_then(|c| c.get_dbname().map(str::to_owned)).unwrap_or_default()
    }
}
