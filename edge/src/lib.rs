//! The edge's library: the parts that are pure logic and that benchmarks and tests use directly.
//! The binary (`main.rs`) wires them into Pingora.

pub mod access_log;
pub mod client;
pub mod limiter;
pub mod limits;
pub mod openssl_alloc;
pub mod policy;
pub mod upstream;
pub mod wire;
