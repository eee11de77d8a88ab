//! The contract between the gateway and the workers: what an order looks like on the wire (HTTP body and Kafka
//! message), which headers every message carries, and the default topic names (see `DESIGN.md`, "Topics").
//!
//! Messages are JSON, versioned by the `schema-version` header. A consumer decodes with [`decode_command`], which
//! refuses a version it does not know instead of guessing, so that the caller can dead-letter the message.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Default topic names; every service lets configuration override them.
pub mod topics {
    pub const COMMANDS: &str = "orders.commands";
    pub const VALIDATED: &str = "orders.validated";
    pub const REPLIES: &str = "orders.replies";
    pub const DLQ: &str = "orders.dlq";
}

/// Header names that every message carries.
pub mod headers {
    pub const TRACEPARENT: &str = "traceparent";
    pub const EVENT_TYPE: &str = "event-type";
    pub const SCHEMA_VERSION: &str = "schema-version";
    pub const CORRELATION_ID: &str = "correlation-id";
}

/// `event-type` of a command that asks for an order to be created.
pub const ORDER_CREATE: &str = "order.create";

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// One line of an order, as the client sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderItem {
    pub sku: String,
    pub qty: i32,
    pub unit_price_cents: i64,
}

/// The body of `POST /v1/orders` and `POST /v1/orders/async`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub customer_id: String,
    pub currency: String,
    pub items: Vec<OrderItem>,
}

/// Longest accepted text field (customer id, sku).
pub const MAX_TEXT: usize = 128;
/// Most lines in one order.
pub const MAX_ITEMS: usize = 1000;

/// One way a request breaks the schema, located by a JSON pointer (RFC 6901).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub pointer: String,
    pub detail: String,
}

impl OrderRequest {
    /// Shape rules every order must meet to be stored (the business rules are the validate job's): text fields
    /// non-empty and at most [`MAX_TEXT`] characters, `currency` three upper-case letters (ISO 4217's form),
    /// between 1 and [`MAX_ITEMS`] lines. Empty when the request is well-formed.
    pub fn violations(&self) -> Vec<Violation> {
        let mut v = Vec::new();
        let mut text = |pointer: String, value: &str| {
            if value.trim().is_empty() || value.chars().count() > MAX_TEXT {
                v.push(Violation { pointer, detail: format!("expected 1 to {MAX_TEXT} characters") });
            }
        };
        text("/customer_id".into(), &self.customer_id);
        for (i, item) in self.items.iter().enumerate() {
            text(format!("/items/{i}/sku"), &item.sku);
        }
        if !(self.currency.len() == 3 && self.currency.bytes().all(|b| b.is_ascii_uppercase())) {
            v.push(Violation {
                pointer: "/currency".into(),
                detail: "expected three upper-case letters, e.g. EUR".into(),
            });
        }
        if self.items.is_empty() || self.items.len() > MAX_ITEMS {
            v.push(Violation { pointer: "/items".into(), detail: format!("expected 1 to {MAX_ITEMS} items") });
        }
        v
    }
}

/// The command published to `orders.commands`, keyed by `order_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCommand {
    /// Unique per message: what a consumer records to make a redelivery harmless.
    pub event_id: Uuid,
    pub order_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    pub order: OrderRequest,
}

impl OrderCommand {
    /// A new command for `order`, with fresh time-ordered ids.
    pub fn new(order: OrderRequest) -> Self {
        Self { event_id: Uuid::now_v7(), order_id: Uuid::now_v7(), received_at: OffsetDateTime::now_utc(), order }
    }

    /// The order's total in cents, or `None` if it overflows.
    pub fn total_cents(&self) -> Option<i64> {
        self.order
            .items
            .iter()
            .try_fold(0i64, |acc, i| acc.checked_add(i.unit_price_cents.checked_mul(i64::from(i.qty))?))
    }
}

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("unexpected event type {0:?}")]
    EventType(String),
    #[error("unsupported schema version {0:?} (this build reads {SCHEMA_VERSION})")]
    SchemaVersion(String),
    #[error("malformed payload: {0}")]
    Payload(#[from] serde_json::Error),
}

/// Decodes an `order.create` command from its headers and payload.
pub fn decode_command(
    event_type: Option<&str>,
    schema_version: Option<&str>,
    payload: &[u8],
) -> Result<OrderCommand, DecodeError> {
    let event_type = event_type.ok_or(DecodeError::MissingHeader(headers::EVENT_TYPE))?;
    if event_type != ORDER_CREATE {
        return Err(DecodeError::EventType(event_type.to_owned()));
    }
    let version = schema_version.ok_or(DecodeError::MissingHeader(headers::SCHEMA_VERSION))?;
    if version.parse::<u32>().ok() != Some(SCHEMA_VERSION) {
        return Err(DecodeError::SchemaVersion(version.to_owned()));
    }
    Ok(serde_json::from_slice(payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OrderRequest {
        OrderRequest {
            customer_id: "c-1".into(),
            currency: "EUR".into(),
            items: vec![
                OrderItem { sku: "a".into(), qty: 2, unit_price_cents: 1250 },
                OrderItem { sku: "b".into(), qty: 1, unit_price_cents: 99 },
            ],
        }
    }

    #[test]
    fn round_trips_through_json() {
        let cmd = OrderCommand::new(sample());
        let bytes = serde_json::to_vec(&cmd).expect("encode");
        let back = decode_command(Some(ORDER_CREATE), Some("1"), &bytes).expect("decode");
        assert_eq!(back, cmd);
        assert_eq!(back.total_cents(), Some(2599));
    }

    #[test]
    fn refuses_unknown_versions_and_types() {
        let bytes = serde_json::to_vec(&OrderCommand::new(sample())).expect("encode");
        assert!(matches!(decode_command(Some(ORDER_CREATE), Some("2"), &bytes), Err(DecodeError::SchemaVersion(_))));
        assert!(matches!(decode_command(Some("other"), Some("1"), &bytes), Err(DecodeError::EventType(_))));
        assert!(matches!(decode_command(None, Some("1"), &bytes), Err(DecodeError::MissingHeader(_))));
        assert!(matches!(decode_command(Some(ORDER_CREATE), Some("1"), b"{"), Err(DecodeError::Payload(_))));
    }

    #[test]
    fn total_overflow_is_none() {
        let mut o = sample();
        o.items[0].unit_price_cents = i64::MAX;
        assert_eq!(OrderCommand::new(o).total_cents(), None);
    }

    #[test]
    fn violations_are_located_by_json_pointer() {
        assert!(sample().violations().is_empty());
        let mut o = sample();
        o.currency = "euro".into();
        o.customer_id = " ".into();
        o.items[1].sku = "x".repeat(MAX_TEXT + 1);
        let pointers: Vec<String> = o.violations().into_iter().map(|v| v.pointer).collect();
        assert_eq!(pointers, ["/customer_id", "/items/1/sku", "/currency"]);
        o.items.clear();
        assert!(o.violations().iter().any(|v| v.pointer == "/items"));
    }

    #[test]
    fn unknown_fields_in_a_request_are_refused() {
        let r: Result<OrderRequest, _> =
            serde_json::from_str(r#"{"customer_id":"c","currency":"EUR","items":[],"extra":1}"#);
        assert!(r.is_err());
    }
}
