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

/// Traces of PostgreSQL statements: one CLIENT span per statement (semantic conventions for databases), named
/// after its summary, for example `INSERT orders`.
pub mod trace {
    use std::sync::OnceLock;

    use opentelemetry::metrics::Histogram;

    use crate::telemetry::{self, Context, KeyValue, SpanKind, TraceContextExt as _};

    /// Starts the span of one statement. `summary` is `OPERATION collection` (`SELECT orders`); `query` is the
    /// statement's text with placeholders (never the values).
    pub fn start(
        tracer: &opentelemetry::global::BoxedTracer,
        parent: &Context,
        namespace: &str,
        summary: &'static str,
        query: &'static str,
    ) -> Context {
        telemetry::start(tracer, summary, SpanKind::Client, parent, || {
            let mut parts = summary.splitn(2, ' ');
            let operation = parts.next().unwrap_or(summary);
            let mut v = vec![
                KeyValue::new("db.system.name", "postgresql"),
                KeyValue::new("db.namespace", namespace.to_owned()),
                KeyValue::new("db.operation.name", operation),
                KeyValue::new("db.query.summary", summary),
                KeyValue::new("db.query.text", query),
            ];
            if let Some(collection) = parts.next() {
                v.push(KeyValue::new("db.collection.name", collection));
            }
            v
        })
    }

    /// Ends the span, with the SQLSTATE of a failed statement (`db.response.status_code`).
    pub fn end<T>(cx: &Context, result: &Result<T, tokio_postgres::Error>) {
        if let Err(e) = result {
            let span = cx.span();
            if span.is_recording() {
                let code = e.code().map(|c| c.code().to_owned());
                if let Some(code) = &code {
                    span.set_attribute(KeyValue::new("db.response.status_code", code.clone()));
                }
                let kind = code.unwrap_or_else(|| "connection".to_owned());
                telemetry::end(cx, Some((&kind, e)));
                return;
            }
        }
        telemetry::end(cx, None);
    }

    /// Where a unit of work's statements put their spans.
    pub struct Scope<'a> {
        pub tracer: &'a opentelemetry::global::BoxedTracer,
        /// The span the statements are children of.
        pub parent: &'a Context,
        /// The database name (`db.namespace`).
        pub namespace: &'a str,
    }

    impl Scope<'_> {
        /// Runs `statement` (which may prepare, then execute) inside the span of `summary` / `query`.
        pub async fn run<T>(
            &self,
            summary: &'static str,
            query: &'static str,
            statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
        ) -> Result<T, tokio_postgres::Error> {
            let cx = start(self.tracer, self.parent, self.namespace, summary, query);
            let started = std::time::Instant::now();
            let result = statement.await;
            record(summary, started.elapsed().as_secs_f64(), &result);
            end(&cx, &result);
            result
        }
    }

    /// `db.client.operation.duration{db.operation.name, db.collection.name, error.type}` (seconds): statements
    /// by type and table, for the database dashboard.
    fn record<T>(summary: &'static str, seconds: f64, result: &Result<T, tokio_postgres::Error>) {
        static DURATION: OnceLock<Histogram<f64>> = OnceLock::new();
        let histogram = DURATION.get_or_init(|| {
            opentelemetry::global::meter("postgresql")
                .f64_histogram("db.client.operation.duration")
                .with_unit("s")
                .with_description("Duration of database statements")
                .with_boundaries(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                .build()
        });
        let mut parts = summary.splitn(2, ' ');
        let mut attrs = vec![
            KeyValue::new("db.system.name", "postgresql"),
            KeyValue::new("db.operation.name", parts.next().unwrap_or(summary)),
        ];
        if let Some(collection) = parts.next() {
            attrs.push(KeyValue::new("db.collection.name", collection));
        }
        if let Err(e) = result {
            let code = e.code().map_or_else(|| "connection".to_owned(), |c| c.code().to_owned());
            attrs.push(KeyValue::new("error.type", code));
        }
        histogram.record(seconds, &attrs);
    }

    /// The database name of a connection URL, the spans' `db.namespace`.
    pub fn namespace(url: &str) -> String {
        url.parse::<tokio_postgres::Config>().ok().and_then(|c| c.get_dbname().map(str::to_owned)).unwrap_or_default()
    }
}
