//! Polls `cqrs.progress()` and the replication slot for metrics; a projection whose generation
//! moved (rebuilt, resumed, dead letters retried — rows changed outside the stream) or whose
//! table was altered (the rows' JSON may look different at the same revision) gets its cache
//! resynced. The leader also notices a Redis that lost its data (the synced mark is
//! gone) and resyncs the cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::cache::Cache;
use crate::health::{Health, Role};
use crate::maintenance::Upkeep;
use crate::metrics::{label, Metrics, WAL_STATUSES};
use crate::postgres::{ConnectionPurpose, Database};
use crate::repair::Repairs;

#[derive(Default)]
struct Seen {
    /// generation and the target table's catalog row version
    shape: HashMap<String, (i64, String)>,
    dead_lettered: HashMap<String, i64>,
    duplicates: HashMap<String, i64>,
    halted: HashMap<String, bool>,
    /// the slot's invalidation reason at the last poll
    invalidation: Option<String>,
}

/// A counter's increase since the last poll (nothing on the first).
fn delta(seen: &mut HashMap<String, i64>, projection: &str, now: i64) -> u64 {
    let before = seen.insert(projection.to_owned(), now);
    before.map(|b| (now - b).max(0) as u64).unwrap_or(0)
}

/// What the poller works with.
pub struct Watch {
    pub pg: Database,
    pub slot: String,
    /// this sidecar's projection group: it repairs the caches of that group's projections only
    /// (their leader writes them; the other groups' leaders repair theirs)
    pub group: String,
    pub every: Duration,
    /// how often cqrs.maintain() runs (maintenance.rs)
    pub maintain_every: Duration,
    pub metrics: Arc<Metrics>,
    pub repairs: Arc<Mutex<Repairs>>,
    pub cache: Arc<Cache>,
    pub health: Arc<Health>,
}

// Long but flat: one metric family after another from one round of queries.
async fn poll(pg: &Client, watch: &Watch, seen: &mut Seen) -> Result<(), tokio_postgres::Error> {
    let (metrics, repairs, slot) = (&watch.metrics, &watch.repairs, &watch.slot);
    let leading = watch.health.role() == Role::Leader;
    let rows = pg
        .query(
            // cqrs.progress(), not cqrs.status(): status compares every stream, and a poll every
            // few seconds of that, with many streams, showed up as projection-lag spikes
            "select s.projection, s.halted, s.seconds_behind, s.events_behind, s.parked, s.dead_letters, s.generation,
                    s.dead_lettered, s.duplicates, s.revision, c.xmin::text, p.projection_group = $1
               from cqrs.progress() s
               join cqrs.projection p on p.name = s.projection
               join pg_catalog.pg_class c on c.oid = p.target",
            &[&watch.group],
        )
        .await?;
    // every sidecar looks, so that one that takes the lead later knows the masters of before
    {
        match watch.cache.lost_writes().await {
            Ok(true) => tracing::warn!(
                redis = %watch.cache.describe(),
                "a Redis Cluster master was replaced or restarted and may have lost writes; resyncing every projection's cache"
            ),
            Ok(false) => {}
            Err(err) => tracing::debug!(error = %err, "could not read the Redis Cluster's masters"),
        }
    }
    let mut halted_now = Vec::new();
    for row in rows {
        let projection: String = row.get(0);
        let halted: bool = row.get(1);
        if halted {
            halted_now.push(projection.clone());
        }
        let labels = [projection.as_str()];
        metrics
            .projection_halted
            .with_label_values(&labels)
            .set(i64::from(halted));
        metrics
            .projection_lag_seconds
            .with_label_values(&labels)
            .set(row.get::<_, f64>(2));
        metrics
            .projection_events_behind
            .with_label_values(&labels)
            .set(row.get(3));
        metrics.parked_events.with_label_values(&labels).set(row.get(4));
        metrics.dead_letters.with_label_values(&labels).set(row.get(5));
        let revision: i64 = row.get(9);
        let leading = leading && row.get::<_, bool>(11);
        if leading && revision > 0 {
            // a mark that vanished means Redis restarted empty (or was flushed)
            if let Ok(None) = watch.cache.synced(&projection).await {
                if let Ok(mut repairs) = repairs.lock() {
                    if !repairs.is_pending(&projection) {
                        tracing::warn!(%projection, "the cache has no synced mark (Redis restarted or was flushed, or a cluster master was replaced); resyncing it");
                        repairs.refresh_all(&projection);
                    }
                }
            }
        }
        let shape: (i64, String) = (row.get(6), row.get(10));
        if let Some(before) = seen.shape.insert(projection.clone(), shape.clone()) {
            if leading && before != shape {
                tracing::info!(%projection, "rows changed outside the stream (rebuild, resume, retry) or the table was altered; resyncing its cache");
                if let Ok(mut repairs) = repairs.lock() {
                    repairs.refresh_all(&projection);
                }
            }
        }
        let dead = delta(&mut seen.dead_lettered, &projection, row.get(7));
        metrics
            .command_errors
            .with_label_values(&[projection.as_str(), label::ERROR_DEAD_LETTER])
            .inc_by(dead);
        if halted && !seen.halted.get(&projection).copied().unwrap_or(false) {
            metrics
                .command_errors
                .with_label_values(&[projection.as_str(), label::ERROR_HALT])
                .inc();
        }
        seen.halted.insert(projection.clone(), halted);
        let duplicates = delta(&mut seen.duplicates, &projection, row.get(8));
        metrics
            .duplicate_events
            .with_label_values(&labels)
            .inc_by(duplicates);
    }
    watch.health.set_halted(halted_now);
    sinks(pg, metrics).await?;
    metrics.append_stats.poll(pg).await?;
    if let Err(err) = watch.cache.assert_claim().await {
        if err.is_foreign() {
            tracing::error!(error = %err, "the cache is another database's: it is neither read nor written");
        }
    }
    metrics
        .read_pool_exhausted
        .set(i64::from(watch.health.read_pool_exhausted()));
    slot_state(pg, metrics, slot, seen).await?;
    let live: Option<bool> = pg
        .query_one("select live from cqrs.leader($1)", &[&watch.group])
        .await?
        .get(0);
    let live = live.unwrap_or(false);
    metrics.leader_present.set(i64::from(live));
    watch
        .health
        .leader_live
        .store(live, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Each outbox sink's lag and halt, from `cqrs.sink_status()` (every sidecar shows every sink).
async fn sinks(pg: &Client, metrics: &Metrics) -> Result<(), tokio_postgres::Error> {
    let rows = pg
        .query(
            "select sink, events_behind, seconds_behind, halted from cqrs.sink_status()",
            &[],
        )
        .await?;
    for row in rows {
        let sink: String = row.get(0);
        let labels = [sink.as_str()];
        metrics
            .sink_events_behind
            .with_label_values(&labels)
            .set(row.get(1));
        metrics
            .sink_lag_seconds
            .with_label_values(&labels)
            .set(row.get::<_, f64>(2));
        metrics
            .sink_halted
            .with_label_values(&labels)
            .set(i64::from(row.get::<_, bool>(3)));
    }
    Ok(())
}

/// The slot's state as `pg_replication_slots` shows it. Columns that only some majors have
/// (`inactive_since` and `invalidation_reason`, PostgreSQL 17+) are read through the row's JSON,
/// so one query serves every major.
async fn slot_state(
    pg: &Client,
    metrics: &Metrics,
    slot: &str,
    seen: &mut Seen,
) -> Result<(), tokio_postgres::Error> {
    let row = pg
        .query_opt(
            "select pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn)::bigint,
                    s.wal_status, s.safe_wal_size,
                    extract(epoch from pg_catalog.now() - (pg_catalog.to_jsonb(s) ->> 'inactive_since')::timestamptz)::float8,
                    pg_catalog.to_jsonb(s) ->> 'invalidation_reason'
               from pg_catalog.pg_replication_slots s where s.slot_name = $1",
            &[&slot],
        )
        .await?;
    let retained: Option<i64> = row.as_ref().and_then(|r| r.get(0));
    let wal_status: Option<String> = row.as_ref().and_then(|r| r.get(1));
    let safe: Option<i64> = row.as_ref().and_then(|r| r.get(2));
    let inactive: Option<f64> = row.as_ref().and_then(|r| r.get(3));
    let invalidated: Option<String> = row.as_ref().and_then(|r| r.get(4));
    metrics.slot_retained_bytes.set(retained.unwrap_or(0));
    for status in WAL_STATUSES {
        metrics
            .slot_wal_status
            .with_label_values(&[status])
            .set(i64::from(wal_status.as_deref() == Some(status)));
    }
    metrics.slot_safe_wal_size.set(safe.unwrap_or(-1));
    metrics
        .slot_inactive_seconds
        .set(inactive.unwrap_or(0.0).max(0.0));
    // a reason seen before and gone now (the slot was recreated) goes back to 0
    if let Some(previous) = seen.invalidation.take() {
        if invalidated.as_deref() != Some(previous.as_str()) {
            metrics.slot_invalidated.with_label_values(&[&previous]).set(0);
        }
    }
    if let Some(reason) = invalidated {
        metrics.slot_invalidated.with_label_values(&[&reason]).set(1);
        seen.invalidation = Some(reason);
    }
    Ok(())
}

pub async fn poller(watch: Watch, mut shutdown: watch::Receiver<bool>) {
    let mut pg: Option<Client> = None;
    let mut seen = Seen::default();
    let mut upkeep = Upkeep::new(watch.maintain_every);
    loop {
        if pg.as_ref().is_none_or(|c| c.is_closed()) {
            pg = watch
                .pg
                .connect_for(ConnectionPurpose::Status, Duration::from_secs(5))
                .await
                .ok();
        }
        if let Some(client) = pg.as_ref() {
            if let Err(err) = poll(client, &watch, &mut seen).await {
                tracing::warn!(error = %err, "polling cqrs.progress() failed");
            }
            upkeep.tick(client, &watch.metrics).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(watch.every) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn deltas_start_at_the_first_observation() {
        let mut seen = std::collections::HashMap::new();
        assert_eq!(super::delta(&mut seen, "p", 10), 0);
        assert_eq!(super::delta(&mut seen, "p", 13), 3);
        assert_eq!(
            super::delta(&mut seen, "p", 1),
            0,
            "a reset (rebuild) is not negative"
        );
    }
}
