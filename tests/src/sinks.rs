//! Waiting on an outbox sink's state in `cqrs.sink_status()`, for the NATS and Kafka suites.

use std::time::Duration;

use anyhow::{ensure, Result};
use tokio_postgres::Client;

use crate::eventually;

/// Waits until sink `name` has delivered everything up to the end of the log.
pub async fn delivered(client: &Client, name: &str, timeout: Duration) -> Result<()> {
    eventually(timeout, "the sink delivered the whole log", || async {
        let row = client
            .query_one(
                "select events_behind, halted from cqrs.sink_status() where sink = $1",
                &[&name],
            )
            .await?;
        let (behind, halted): (i64, bool) = (row.get(0), row.get(1));
        ensure!(!halted, "sink {name} is halted");
        ensure!(behind == 0, "{behind} behind");
        Ok(())
    })
    .await
}

/// Waits until sink `name` is halted on the event at `position`.
pub async fn halted_at(client: &Client, name: &str, position: i64, timeout: Duration) -> Result<()> {
    eventually(timeout, "the sink halted on the event", || async {
        let row = client
            .query_one(
                "select halted, last_error_position from cqrs.sink_status() where sink = $1",
                &[&name],
            )
            .await?;
        let (halted, at): (bool, Option<i64>) = (row.get(0), row.get(1));
        ensure!(
            halted && at == Some(position),
            "halted {halted} at {at:?} (the event is at {position})"
        );
        Ok(())
    })
    .await
}
