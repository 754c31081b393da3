//! Test, benchmark and demo harness for pg_cqrs: private PostgreSQL clusters and Redis servers
//! on free ports, and child processes that never outlive the harness.

pub mod certificates;
pub mod edition;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod sidecar;

pub use certificates::Certificates;
pub use edition::Edition;
pub use postgres::{free_port, ClusterOptions, Durability, PgCluster};
pub use process::ChildGuard;
pub use redis::RedisServer;
pub use sidecar::{http_get, Sidecar};
