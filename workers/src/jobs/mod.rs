//! The jobs a worker process can run, each a Kafka consumer group of its own.

pub mod persist;

use rdkafka::message::{BorrowedMessage, Headers, Message};

/// The value of header `key` in `msg`, if present and UTF-8 (the last one wins when repeated).
pub fn header<'a>(msg: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    msg.headers()?.iter().filter(|h| h.key == key).last()?.value.and_then(|v| std::str::from_utf8(v).ok())
}
