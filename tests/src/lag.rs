//! A projection's lag as monitoring sees it (`cqrs.progress()`'s seconds_behind), sampled while
//! something is done to the deployment, for the tests that say a fault stays where it is.

use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_postgres::Client;

/// `projection`'s lag every 100 ms for `span`, sorted.
pub async fn samples(client: &Client, projection: &str, span: Duration) -> Result<Vec<f64>> {
    let until = Instant::now() + span;
    let mut samples = Vec::new();
    while Instant::now() < until {
        let row = client
            .query_one(
                "select seconds_behind from cqrs.progress() where projection = $1",
                &[&projection],
            )
            .await?;
        samples.push(row.get::<_, f64>(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// The 99th percentile of sorted samples (0 without any).
pub fn p99(sorted: &[f64]) -> f64 {
    sorted
        .get((sorted.len() * 99 / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

/// How far a lag's p99 may rise over `normal`'s and still count as normal on these shared
/// cores: half again, or 250 ms, whichever is more.
pub fn normal_bound(normal_p99: f64) -> f64 {
    (normal_p99 * 1.5).max(normal_p99 + 0.25)
}
