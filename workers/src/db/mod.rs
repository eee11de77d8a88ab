//! PostgreSQL access: the versioned schema migrations (the pool comes from `service_core::db`).

pub mod migrate;
