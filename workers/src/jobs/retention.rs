//! Deletes what is kept only for a while: inbox rows (`processed_events`) and, when configured, old status
//! history. Runs beside `persist`, at start and then every `retention.interval_secs`, deleting in chunks so that
//! no long transaction or lock holds up the job.

use std::time::Duration;

use deadpool_postgres::Pool;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;

const CHUNK: i64 = 5000;

/// (table, timestamp column) pairs the task may prune, with their configured age in days.
fn targets(config: &RetentionConfig) -> [(&'static str, &'static str, u32); 2] {
    [
        ("processed_events", "processed_at", config.processed_events_days),
        ("order_status_history", "at", config.history_days),
    ]
}

pub async fn run(pool: Pool, config: RetentionConfig, deleted: Counter<u64>, stop: CancellationToken) {
    if config.interval_secs == 0 || targets(&config).iter().all(|(_, _, days)| *days == 0) {
        return;
    }
    loop {
        for (table, column, days) in targets(&config) {
            if days == 0 {
                continue;
            }
            match prune(&pool, table, column, days, &stop).await {
                Ok(0) => {}
                Ok(n) => {
                    deleted.add(n, &[KeyValue::new("table", table)]);
                    tracing::info!(table, rows = n, older_than_days = days, "retention: deleted old rows");
                }
                Err(e) => tracing::warn!(table, error = %e, "retention: delete failed; trying again next round"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(config.interval_secs)) => {}
        }
    }
}

/// Deletes rows of `table` older than `days`, `CHUNK` rows per statement; returns how many.
async fn prune(
    pool: &Pool,
    table: &str,
    column: &str,
    days: u32,
    stop: &CancellationToken,
) -> Result<u64, anyhow::Error> {
    let client = pool.get().await?;
    // Table and column names come from the fixed list above, never from input.
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY (ARRAY(
             SELECT ctid FROM {table} WHERE {column} < now() - make_interval(days => $1) LIMIT $2))"
    );
    let days = i32::try_from(days)?;
    let mut total = 0;
    loop {
        let n = client.execute(&sql, &[&days, &CHUNK]).await?;
        total += n;
        if n < CHUNK as u64 || stop.is_cancelled() {
            return Ok(total);
        }
    }
}
