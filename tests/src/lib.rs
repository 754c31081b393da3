//! Shared helpers for the end-to-end tests: connections to harness clusters.

use anyhow::{Context, Result};
use tokio_postgres::{Client, NoTls};

/// Connects to `url` and drives the connection on the current tokio runtime.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        // the connection ends when the client is dropped or the server goes away
        let _ = connection.await;
    });
    Ok(client)
}

/// The repository root (for pgrx-tests/, sql/ …).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
