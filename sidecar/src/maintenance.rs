//! The command log's upkeep: `cqrs.maintain()` (partitions made ahead, those older than
//! `cqrs.retention.keep` removed; sql/core/retention.sql) every `--maintain-interval`, and the
//! log's bounds as metrics every status round. Every sidecar runs it (the function takes a lock,
//! so at once they wait for each other, and a second call finds nothing to do): partitions must
//! be made ahead whether or not this group leads.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::metrics::Metrics;

/// What cqrs.maintain() says it did with a partition: the label values of
/// `cqrs_log_maintenance_total` (anything else is counted as "other").
const ACTIONS: [&str; 5] = ["keyed", "created", "dropped", "archived", "kept"];
const OTHER_ACTION: &str = "other";

/// After a failed call, the next try comes this much later (not a whole interval: running out
/// of partitions refuses appends).
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// When `cqrs.maintain()` is next due, and whether the database has it.
pub(crate) struct Upkeep {
    every: Duration,
    next: Option<Instant>,
    /// false once the database showed it has no retention (a release before 0.3.0)
    supported: bool,
}

impl Upkeep {
    /// Upkeep every `every`; never when it is zero (the bounds are still shown).
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            next: None,
            supported: true,
        }
    }

    /// Runs `cqrs.maintain()` when it is due, then shows the log's bounds (after it: a new log
    /// has none until its first append or maintain()).
    pub(crate) async fn tick(&mut self, pg: &Client, metrics: &Metrics) {
        if !self.supported {
            return;
        }
        let due = self.next.is_none_or(|next| Instant::now() >= next);
        if !self.every.is_zero() && due {
            match maintain(pg, metrics).await {
                Ok(()) => self.next = Some(Instant::now() + self.every),
                Err(err) => {
                    if self.unsupported(&err) {
                        return;
                    }
                    metrics.log_maintenance_failures.inc();
                    tracing::warn!(error = %err, retry_in_s = RETRY_AFTER.as_secs(), "cqrs.maintain() failed");
                    self.next = Some(Instant::now() + RETRY_AFTER.min(self.every));
                }
            }
        }
        if let Err(err) = bounds(pg, metrics).await {
            if self.unsupported(&err) {
                return;
            }
            tracing::warn!(error = %err, "reading cqrs.retention failed");
        }
    }

    /// Whether `err` says the database has no retention (decided on the SQLSTATE).
    fn unsupported(&mut self, err: &tokio_postgres::Error) -> bool {
        let missing = matches!(
            err.code(),
            Some(code) if *code == SqlState::UNDEFINED_TABLE || *code == SqlState::UNDEFINED_FUNCTION
        );
        if missing {
            self.supported = false;
            tracing::info!("this pg_cqrs has no command-log retention (before 0.3.0): nothing to maintain");
        }
        missing
    }
}

/// How far ahead the log's partitions go, and how old its horizon is.
async fn bounds(pg: &Client, metrics: &Metrics) -> Result<(), tokio_postgres::Error> {
    let row = pg
        .query_one(
            // no partitions yet (log_to -infinity, until the first append or cqrs.maintain()):
            // none ahead
            "select case when r.log_to = '-infinity' then 0
                         else pg_catalog.date_part('epoch', r.log_to - pg_catalog.now())::float8 end,
                    case when r.log_from = '-infinity' then 0
                         else pg_catalog.date_part('epoch', pg_catalog.now() - r.log_from)::float8 end
               from cqrs.retention r",
            &[],
        )
        .await?;
    metrics.log_partitions_ahead_seconds.set(row.get(0));
    metrics.log_horizon_seconds.set(row.get(1));
    Ok(())
}

/// One `cqrs.maintain()`: each partition it handled is counted and logged (names and counts, no
/// command values).
async fn maintain(pg: &Client, metrics: &Metrics) -> Result<(), tokio_postgres::Error> {
    let rows = pg
        .query(
            "select m.partition, m.action, m.commands, m.reason from cqrs.maintain() m",
            &[],
        )
        .await?;
    for row in rows {
        let partition: String = row.get(0);
        let action: String = row.get(1);
        let commands: Option<i64> = row.get(2);
        let reason: Option<String> = row.get(3);
        let label = ACTIONS
            .iter()
            .find(|a| **a == action)
            .copied()
            .unwrap_or(OTHER_ACTION);
        metrics.log_maintenance.with_label_values(&[label]).inc();
        match reason {
            Some(reason) => tracing::info!(%partition, %action, %reason, "command log retention waits"),
            None => {
                tracing::info!(%partition, %action, commands = commands.unwrap_or(0), "command log partition")
            }
        }
    }
    Ok(())
}
