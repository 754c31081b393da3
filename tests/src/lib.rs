//! Shared helpers for the end-to-end tests: connections, the example order workload and its
//! independent fold, cache checks, and waiting for conditions.

pub mod cache_check;
pub use cqrs_harness::edition;
pub mod lag;
pub mod orders;
pub mod regress;
pub mod rig;
pub mod sinks;
pub mod traffic;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_postgres::Client;

pub use cqrs_harness::{connect, repo_root};

/// The seed of a test's random faults: `$CQRS_FAULT_SEED`, else a random one; printed, so that a
/// failing run can be repeated.
pub fn fault_seed() -> u64 {
    let seed = std::env::var("CQRS_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("CQRS_FAULT_SEED={seed}");
    seed
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

/// The catalog of schema cqrs as `object | what | value` lines (tests/sql/catalog.sql); without
/// `bodies`, functions are compared by signature and attributes only (what the editions share).
pub async fn catalog(client: &Client, bodies: bool) -> Result<std::collections::BTreeSet<String>> {
    let query = std::fs::read_to_string(repo_root().join("tests/sql/catalog.sql"))?;
    let rows = client.query(query.as_str(), &[]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
            )
        })
        .filter(|(object, what, _)| bodies || !(object.starts_with("function ") && what == "definition"))
        .map(|(object, what, value)| format!("{object} | {what} | {value}"))
        .collect())
}

/// Every line in one catalog and not the other, named by side.
pub fn catalog_differences(
    left: (&str, &std::collections::BTreeSet<String>),
    right: (&str, &std::collections::BTreeSet<String>),
) -> Vec<String> {
    let mut out: Vec<String> = left
        .1
        .difference(right.1)
        .map(|line| format!("only {}: {line}", left.0))
        .chain(
            right
                .1
                .difference(left.1)
                .map(|line| format!("only {}: {line}", right.0)),
        )
        .collect();
    out.sort_by(|a, b| {
        a.split_once(": ")
            .map(|x| x.1)
            .cmp(&b.split_once(": ").map(|x| x.1))
    });
    out
}

/// Where the sidecar's slot is confirmed to, as a WAL byte position.
pub async fn slot_confirmed(client: &Client) -> Result<i64> {
    let row = client
        .query_one(
            "select pg_catalog.pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint from pg_catalog.pg_replication_slots where slot_name = 'cqrs_sidecar'",
            &[],
        )
        .await?;
    Ok(row.get(0))
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
