//! The business rules of the validate job. Each failure names its rule and the JSON pointer of the offending
//! value, so that a `422` can show the client exactly what to fix. The README lists the rules.

use order_contract::{MAX_TEXT, OrderCommand, RuleFailure, Verdict};

use crate::config::RulesConfig;

/// Rule names, stable: clients and dashboards may match on them.
pub mod rule {
    pub const SHAPE: &str = "shape";
    pub const CUSTOMER_ID: &str = "customer-id";
    pub const KNOWN_CURRENCY: &str = "known-currency";
    pub const ITEM_COUNT: &str = "item-count";
    pub const POSITIVE_QUANTITY: &str = "positive-quantity";
    pub const PRICE: &str = "non-negative-price";
    pub const TOTAL: &str = "total-limit";
}

/// Applies every rule to `cmd` and returns the verdict with all failures (not only the first).
pub fn validate(cmd: &OrderCommand, limits: &RulesConfig) -> Verdict {
    let order = &cmd.order;
    let mut failures = Vec::new();
    let mut fail = |rule: &str, pointer: String, detail: String| {
        failures.push(RuleFailure { rule: rule.to_owned(), pointer, detail });
    };
    // The gateway refuses these already; a command from another producer gets the same checks.
    for v in order.violations() {
        fail(rule::SHAPE, v.pointer, v.detail);
    }
    if !customer_id_ok(&order.customer_id) {
        fail(
            rule::CUSTOMER_ID,
            "/customer_id".into(),
            format!("expected 1 to 64 of A-Z a-z 0-9 . _ : @ - starting with a letter or digit (max {MAX_TEXT})"),
        );
    }
    if !limits.currencies.iter().any(|c| c == &order.currency) {
        fail(rule::KNOWN_CURRENCY, "/currency".into(), format!("{:?} is not an accepted currency", order.currency));
    }
    if order.items.len() > limits.max_items {
        fail(rule::ITEM_COUNT, "/items".into(), format!("at most {} lines per order", limits.max_items));
    }
    for (i, item) in order.items.iter().enumerate() {
        if item.qty <= 0 {
            fail(rule::POSITIVE_QUANTITY, format!("/items/{i}/qty"), "quantity must be at least 1".into());
        }
        if item.unit_price_cents < 0 {
            fail(rule::PRICE, format!("/items/{i}/unit_price_cents"), "price must not be negative".into());
        }
    }
    match cmd.total_cents() {
        Some(t) if t <= limits.max_total_cents => {}
        Some(t) => fail(rule::TOTAL, String::new(), format!("total {t} exceeds {} cents", limits.max_total_cents)),
        None => fail(rule::TOTAL, String::new(), "total overflows".into()),
    }
    if failures.is_empty() { Verdict::Accepted } else { Verdict::Rejected { failures } }
}

/// 1 to 64 characters of `[A-Za-z0-9._:@-]`, the first alphanumeric (Keycloak user ids, UUIDs, emails-like ids).
fn customer_id_ok(id: &str) -> bool {
    let mut bytes = id.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && id.len() <= 64
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

#[cfg(test)]
mod tests {
    use order_contract::{OrderItem, OrderRequest};

    use super::*;

    fn cmd(customer: &str, currency: &str, items: Vec<(i32, i64)>) -> OrderCommand {
        OrderCommand::new(OrderRequest {
            customer_id: customer.into(),
            currency: currency.into(),
            items: items
                .into_iter()
                .enumerate()
                .map(|(i, (qty, price))| OrderItem { sku: format!("SKU-{i}"), qty, unit_price_cents: price })
                .collect(),
        })
    }

    fn failed(v: &Verdict) -> Vec<(String, String)> {
        match v {
            Verdict::Accepted => vec![],
            Verdict::Rejected { failures } => failures.iter().map(|f| (f.rule.clone(), f.pointer.clone())).collect(),
        }
    }

    #[test]
    fn a_plain_order_is_accepted() {
        assert_eq!(
            validate(&cmd("cust-1", "EUR", vec![(2, 1250), (1, 0)]), &RulesConfig::default()),
            Verdict::Accepted
        );
    }

    #[test]
    fn every_failure_is_reported_with_its_pointer() {
        let v = validate(&cmd("-bad id", "XXX", vec![(0, 5), (2, -1)]), &RulesConfig::default());
        assert_eq!(
            failed(&v),
            [
                (rule::CUSTOMER_ID.into(), "/customer_id".into()),
                (rule::KNOWN_CURRENCY.into(), "/currency".into()),
                (rule::POSITIVE_QUANTITY.into(), "/items/0/qty".into()),
                (rule::PRICE.into(), "/items/1/unit_price_cents".into()),
            ]
        );
    }

    #[test]
    fn limits_come_from_configuration() {
        let limits = RulesConfig { max_items: 2, max_total_cents: 1000, ..RulesConfig::default() };
        let v = validate(&cmd("c", "EUR", vec![(1, 400), (1, 400), (1, 400)]), &limits);
        assert_eq!(failed(&v), [(rule::ITEM_COUNT.into(), "/items".into()), (rule::TOTAL.into(), String::new())]);
        assert_eq!(validate(&cmd("c", "EUR", vec![(1, 500), (1, 500)]), &limits), Verdict::Accepted);
        let v = validate(&cmd("c", "EUR", vec![(2, i64::MAX)]), &limits);
        assert_eq!(failed(&v), [(rule::TOTAL.into(), String::new())]);
    }

    #[test]
    fn customer_ids() {
        for ok in ["a", "user@example.com", "1f0c3f5e-7a1b-4c1d-9e2f-3a4b5c6d7e8f", "tenant:42_x.y"] {
            assert!(customer_id_ok(ok), "{ok}");
        }
        for bad in ["", "-a", " a", "a b", "a/b", &"a".repeat(65), "é"] {
            assert!(!customer_id_ok(bad), "{bad}");
        }
    }
}
