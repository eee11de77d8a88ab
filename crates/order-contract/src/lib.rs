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
    /// On a command: the topic where the waiting gateway expects the validation result (sync requests only).
    pub const REPLY_TO: &str = "reply-to";
}

/// `event-type` of a command that asks for an order to be created.
pub const ORDER_CREATE: &str = "order.create";

/// `event-type` of the validate job's verdict on a command (on `orders.validated` and `orders.replies`).
pub const ORDER_VALIDATED: &str = "order.validated";

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

/// One business rule an order broke, as the validate job reports it (and `422` shows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleFailure {
    /// Stable rule name, e.g. `positive-quantity` (the README lists them).
    pub rule: String,
    /// JSON pointer into the order of the offending value (`""` for the whole order).
    pub pointer: String,
    pub detail: String,
}

/// The validate job's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Verdict {
    Accepted,
    Rejected { failures: Vec<RuleFailure> },
}

impl Verdict {
    /// The order status this verdict leads to: `accepted` or `rejected`.
    pub fn status(&self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Rejected { .. } => "rejected",
        }
    }
}

/// The event published to `orders.validated` (and, for a sync request, to `orders.replies`), keyed by order id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderValidated {
    /// Derived from the command's event id ([`OrderValidated::event_id_for`]): validating the same command twice
    /// (a redelivery after a crash) yields the same event, which the persist job then recognises as applied.
    pub event_id: Uuid,
    pub command_event_id: Uuid,
    pub order_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub validated_at: OffsetDateTime,
    /// `None` when the total overflows (the order is then rejected).
    pub total_cents: Option<i64>,
    pub order: OrderRequest,
    pub verdict: Verdict,
}

impl OrderValidated {
    /// Namespace of the derived event ids (UUID v5).
    const NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7273_2e76_616c_6964_6174_6564);

    /// The validated event id for the command with `command_event_id`: the same input always gives the same id.
    pub fn event_id_for(command_event_id: Uuid) -> Uuid {
        Uuid::new_v5(&Self::NAMESPACE, command_event_id.as_bytes())
    }

    /// The verdict `verdict` on `command`, validated at `validated_at`.
    pub fn new(command: OrderCommand, verdict: Verdict, validated_at: OffsetDateTime) -> Self {
        Self {
            event_id: Self::event_id_for(command.event_id),
            command_event_id: command.event_id,
            order_id: command.order_id,
            received_at: command.received_at,
            validated_at,
            total_cents: command.total_cents(),
            order: command.order,
            verdict,
        }
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
    decode(ORDER_CREATE, event_type, schema_version, payload)
}

/// Decodes an `order.validated` event from its headers and payload.
pub fn decode_validated(
    event_type: Option<&str>,
    schema_version: Option<&str>,
    payload: &[u8],
) -> Result<OrderValidated, DecodeError> {
    decode(ORDER_VALIDATED, event_type, schema_version, payload)
}

fn decode<T: serde::de::DeserializeOwned>(
    expected: &str,
    event_type: Option<&str>,
    schema_version: Option<&str>,
    payload: &[u8],
) -> Result<T, DecodeError> {
    let event_type = event_type.ok_or(DecodeError::MissingHeader(headers::EVENT_TYPE))?;
    if event_type != expected {
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
    fn validated_events_have_ids_derived_from_the_command() {
        let cmd = OrderCommand::new(sample());
        let now = OffsetDateTime::now_utc();
        let a = OrderValidated::new(cmd.clone(), Verdict::Accepted, now);
        let b = OrderValidated::new(cmd.clone(), Verdict::Accepted, now + time::Duration::seconds(5));
        assert_eq!(a.event_id, b.event_id, "a redelivered command gives the same event");
        assert_ne!(a.event_id, cmd.event_id);
        assert_ne!(a.event_id, OrderValidated::new(OrderCommand::new(sample()), Verdict::Accepted, now).event_id);
        let rejected = Verdict::Rejected {
            failures: vec![RuleFailure { rule: "r".into(), pointer: "/items/0/qty".into(), detail: "d".into() }],
        };
        let ev = OrderValidated::new(cmd, rejected, now);
        let json = serde_json::to_value(&ev).expect("encode");
        assert_eq!(json["verdict"]["status"], "rejected");
        assert_eq!(json["verdict"]["failures"][0]["pointer"], "/items/0/qty");
        let back = decode_validated(Some(ORDER_VALIDATED), Some("1"), &serde_json::to_vec(&ev).expect("encode"));
        assert_eq!(back.expect("decode"), ev);
        assert!(matches!(decode_validated(Some(ORDER_CREATE), Some("1"), b"{}"), Err(DecodeError::EventType(_))));
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
