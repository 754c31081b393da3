//! Shared helpers for the end-to-end tests: connections, the example order workload and its
//! independent fold, cache checks, and waiting for conditions.

pub mod cache_check;
pub mod orders;
pub mod rig;
pub mod traffic;

use std::future::Future;
use std::time::{Duration, Instant};

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

/// Retries `check` until it passes or `timeout` passes; the last failure is the error.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(err) if Instant::now() > deadline => {
                return Err(err.context(format!("{what} (gave up after {timeout:?})")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Every projection has applied every command in the log.
pub async fn caught_up(client: &Client) -> Result<()> {
    let row = client
        .query_one("select coalesce(sum(events_behind), 0)::bigint, coalesce(sum(parked), 0)::bigint from cqrs.status()", &[])
        .await?;
    let (behind, parked): (i64, i64) = (row.get(0), row.get(1));
    if behind != 0 || parked != 0 {
        anyhow::bail!("{behind} events behind, {parked} parked");
    }
    Ok(())
}
