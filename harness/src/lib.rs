//! Test, benchmark and demo harness for pg_cqrs: private PostgreSQL clusters and Redis servers
//! on free ports, and child processes that never outlive the harness.

pub mod certificates;
pub mod edition;
pub mod kafka;
pub mod nats;
pub mod otlp;
pub mod outbox_check;
pub mod postgres;
pub mod process;
pub mod read_tokens;
pub mod redis;
pub mod redis_cluster;
pub mod sidecar;

pub use certificates::Certificates;
pub use edition::Edition;
pub use kafka::KafkaBroker;
pub use nats::NatsServer;
pub use postgres::{free_port, ClusterOptions, Durability, PgCluster};
pub use process::ChildGuard;
pub use redis::RedisServer;
pub use redis_cluster::RedisCluster;
pub use sidecar::{http_get, Sidecar};

/// The repository root (scripts/, sql/, target/, pgrx-tests/ …).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A client of `url` (no TLS: the harness's servers are local), its connection driven on the
/// runtime until the client is dropped or the server goes away.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    use anyhow::Context;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
