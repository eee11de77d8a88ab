//! End-to-end tests through the real binaries live in `tests/`; this crate has no code of its own.
