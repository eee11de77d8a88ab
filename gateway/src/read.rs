//! Reading an order back (`GET /v1/orders/{id}`) from PostgreSQL, through a pool whose sessions are read-only:
//! the gateway never writes orders, the workers do.

use deadpool_postgres::Pool;
use serde::Serialize;
use service_core::db::trace::Scope;
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

#[derive(Debug, Serialize)]
pub struct Item {
    pub sku: String,
    pub qty: i32,
    pub unit_price_cents: i64,
}

#[derive(Debug, Serialize)]
pub struct Change {
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// For a rejection: the rules the order broke.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// An order as `GET /v1/orders/{id}` shows it.
#[derive(Debug, Serialize)]
pub struct OrderView {
    pub id: Uuid,
    pub customer_id: String,
    pub currency: String,
    /// `None` only for an order rejected because its total overflowed.
    pub total_cents: Option<i64>,
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    pub items: Vec<Item>,
    pub history: Vec<Change>,
}

const ORDER: &str = "SELECT customer_id, trim(currency), total_cents, status, received_at FROM orders WHERE id = $1";
const ITEMS: &str = "SELECT sku, qty, unit_price_cents FROM order_items WHERE order_id = $1 ORDER BY line";
const HISTORY: &str = "SELECT status, at, detail FROM order_status_history WHERE order_id = $1 ORDER BY at, id";

/// The order `id`, or `None` when there is none. Each statement is a span under `traced.parent`.
pub async fn order(pool: &Pool, id: Uuid, traced: &Scope<'_>) -> Result<Option<OrderView>, ReadError> {
    let client = pool.get().await?;
    let Some(row) = traced.run("SELECT orders", ORDER, client.query_opt(ORDER, &[&id])).await? else {
        return Ok(None);
    };
    let items = traced
        .run("SELECT order_items", ITEMS, client.query(ITEMS, &[&id]))
        .await?
        .iter()
        .map(|r| Item { sku: r.get(0), qty: r.get(1), unit_price_cents: r.get(2) })
        .collect();
    let history = traced
        .run("SELECT order_status_history", HISTORY, client.query(HISTORY, &[&id]))
        .await?
        .iter()
        .map(|r| Change { status: r.get(0), at: r.get(1), detail: r.get(2) })
        .collect();
    Ok(Some(OrderView {
        id,
        customer_id: row.get(0),
        currency: row.get(1),
        total_cents: row.get(2),
        status: row.get(3),
        received_at: row.get(4),
        items,
        history,
    }))
}
