//! RFC 9457 problem details (`application/problem+json`), the body of every error we answer with.
//! Each kind of error has a stable `type` URI so that clients can branch on it without parsing prose.

use serde::Serialize;

/// The media type of a problem details body.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// Base of the stable `type` URIs of our problems.
pub const TYPE_BASE: &str = "https://errors.orders.example/";

/// One problem details object.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extra members (for example `errors` or `order_id`), flattened into the object.
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    /// A problem of kind `slug` (appended to [`TYPE_BASE`]).
    pub fn new(slug: &str, status: u16, title: &str) -> Self {
        Self {
            kind: format!("{TYPE_BASE}{slug}"),
            title: title.to_owned(),
            status,
            detail: None,
            extensions: serde_json::Map::new(),
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with(mut self, key: &str, value: serde_json::Value) -> Self {
        self.extensions.insert(key.to_owned(), value);
        self
    }

    /// The JSON body.
    pub fn to_body(&self) -> Vec<u8> {
        // Serialising a struct of strings and a JSON map cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_with_type_and_extensions() {
        let p = Problem::new("unauthorized", 401, "Unauthorized")
            .with_detail("token expired")
            .with("order_id", serde_json::json!("abc"));
        let v: serde_json::Value = serde_json::from_slice(&p.to_body()).expect("json");
        assert_eq!(v["type"], "https://errors.orders.example/unauthorized");
        assert_eq!(v["status"], 401);
        assert_eq!(v["detail"], "token expired");
        assert_eq!(v["order_id"], "abc");
    }
}
