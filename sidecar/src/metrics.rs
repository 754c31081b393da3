//! Prometheus metrics. Names are constants so that dashboards, alert rules and tests refer to
//! the same strings.

use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::leader::LeaseExpiry;

pub const LEADER: &str = "cqrs_leader";
pub const LEADER_PRESENT: &str = "cqrs_leader_present";
pub const SINK_DELIVERED_TOTAL: &str = "cqrs_sink_delivered_total";
pub const SINK_DUPLICATES_TOTAL: &str = "cqrs_sink_duplicates_total";
pub const SINK_FAILURES_TOTAL: &str = "cqrs_sink_failures_total";
pub const SINK_HALTED: &str = "cqrs_sink_halted";
pub const SINK_ATTACHED: &str = "cqrs_sink_attached";
pub const SINK_YIELDING: &str = "cqrs_sink_yielding";
pub const LOG_PARTITIONS_AHEAD_SECONDS: &str = "cqrs_log_partitions_ahead_seconds";
pub const LOG_HORIZON_SECONDS: &str = "cqrs_log_horizon_seconds";
pub const LOG_MAINTENANCE_TOTAL: &str = "cqrs_log_maintenance_total";
pub const LOG_MAINTENANCE_FAILURES_TOTAL: &str = "cqrs_log_maintenance_failures_total";
pub const SINK_EVENTS_BEHIND: &str = "cqrs_sink_events_behind";
pub const SINK_LAG_SECONDS: &str = "cqrs_sink_lag_seconds";
pub const PROJECTION_LAG_SECONDS: &str = "cqrs_projection_lag_seconds";
pub const PROJECTION_EVENTS_BEHIND: &str = "cqrs_projection_events_behind";
pub const PROJECTION_HALTED: &str = "cqrs_projection_halted";
pub const COMMAND_ERRORS_TOTAL: &str = "cqrs_command_errors_total";
pub const EVENTS_PROJECTED_TOTAL: &str = "cqrs_events_projected_total";
pub const DUPLICATE_EVENTS_TOTAL: &str = "cqrs_duplicate_events_total";
pub const PARKED_EVENTS: &str = "cqrs_parked_events";
pub const DEAD_LETTERS: &str = "cqrs_dead_letters";
pub const COMMANDS_TOTAL: &str = "cqrs_commands_total";
/// `cqrs_appends_total{command_type, outcome}` and `cqrs_append_duration_seconds{command_type}`:
/// the database's own counts (append_stats.rs)
pub const APPENDS_TOTAL: &str = "cqrs_appends_total";
pub const APPEND_DURATION_SECONDS: &str = "cqrs_append_duration_seconds";
pub const BATCH_FLUSH_DURATION_SECONDS: &str = "cqrs_batch_flush_duration_seconds";
pub const BATCH_EVENTS: &str = "cqrs_batch_events";
pub const BATCH_TARGET_EVENTS: &str = "cqrs_batch_target_events";
pub const BATCH_FAILURES_TOTAL: &str = "cqrs_batch_failures_total";
pub const EVENT_DELAY_SECONDS: &str = "cqrs_event_delay_seconds";
pub const SLOT_RETAINED_BYTES: &str = "cqrs_slot_retained_bytes";
pub const SLOT_RECREATED_TOTAL: &str = "cqrs_slot_recreated_total";
pub const SLOT_WAL_STATUS: &str = "cqrs_slot_wal_status";
pub const SLOT_SAFE_WAL_SIZE_BYTES: &str = "cqrs_slot_safe_wal_size_bytes";
pub const SLOT_INACTIVE_SECONDS: &str = "cqrs_slot_inactive_seconds";
pub const SLOT_INVALIDATED: &str = "cqrs_slot_invalidated";

/// The values of `pg_replication_slots.wal_status`, each a label value of [`SLOT_WAL_STATUS`].
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];
pub const CACHE_WRITES_TOTAL: &str = "cqrs_cache_writes_total";
pub const CACHE_REPAIR_PENDING_KEYS: &str = "cqrs_cache_repair_pending_keys";
pub const CACHE_HIT_RATIO: &str = "cqrs_cache_hit_ratio";
pub const READ_REQUESTS_TOTAL: &str = "cqrs_read_requests_total";
pub const READ_DURATION_SECONDS: &str = "cqrs_read_duration_seconds";
pub const READ_BACKEND_QUERIES_TOTAL: &str = "cqrs_read_backend_queries_total";
pub const READ_DENIED_TOTAL: &str = "cqrs_read_denied_total";
pub const READ_SHED_TOTAL: &str = "cqrs_read_shed_total";
pub const READ_CONNECTIONS: &str = "cqrs_read_connections";
pub const READ_CONNECTIONS_REFUSED_TOTAL: &str = "cqrs_read_connections_refused_total";
pub const READ_PLAINTEXT_CREDENTIALS: &str = "cqrs_read_plaintext_credentials";
pub const READ_POOL_EXHAUSTED: &str = "cqrs_read_pool_exhausted";
pub const READ_REPLICA_LAG_SECONDS: &str = "cqrs_read_replica_lag_seconds";
pub const READ_REPLICA_QUERIES_TOTAL: &str = "cqrs_read_replica_queries_total";

/// Label values, as constants: the code that counts and the tests that read the counts use these.
pub mod label {
    /// `cqrs_cache_writes_total{result}`
    pub const CACHE_APPLIED: &str = "applied";
    pub const CACHE_STALE: &str = "stale";
    pub const CACHE_FAILED: &str = "failed";
    pub const CACHE_FILL: &str = "fill";
    pub const CACHE_FILL_STALE: &str = "fill_stale";
    /// `cqrs_command_errors_total{kind}`
    pub const ERROR_HALT: &str = "halt";
    pub const ERROR_DEAD_LETTER: &str = "dead_letter";
    /// `cqrs_read_requests_total{outcome}`
    pub const READ_OK: &str = "ok";
    pub const READ_NOT_MODIFIED: &str = "not_modified";
    pub const READ_NOT_FOUND: &str = "not_found";
    pub const READ_UNKNOWN_PROJECTION: &str = "unknown_projection";
    pub const READ_BAD_REQUEST: &str = "bad_request";
    pub const READ_UNAUTHORIZED: &str = "unauthorized";
    pub const READ_UNAVAILABLE: &str = "unavailable";
    pub const READ_HALTED: &str = "halted";
    pub const READ_TIMEOUT: &str = "timeout";
    pub const READ_TOO_MANY_WAITS: &str = "too_many_waits";
    /// `cqrs_read_requests_total{source}` of a request answered before any read
    pub const SOURCE_NONE: &str = "none";
    /// `cqrs_read_denied_total{reason}`, besides the credentials' (`read::auth::Denial::LABELS`):
    /// a projection not exposed or not the caller's, and a row another subject owns
    pub const DENIED_PROJECTION: &str = "projection_not_allowed";
    pub const DENIED_ROW: &str = "row_not_owned";
}

/// Every metric of the sidecar.
pub struct Metrics {
    registry: Registry,
    /// set from `lease` when the metrics are read ([`Metrics::set_leading`])
    leader: IntGauge,
    /// the lease this sidecar leads by, while it leads
    lease: Mutex<Option<LeaseExpiry>>,
    pub leader_present: IntGauge,
    pub sink_delivered: IntCounterVec,
    pub sink_duplicates: IntCounterVec,
    pub sink_failures: IntCounterVec,
    pub sink_halted: IntGaugeVec,
    pub sink_attached: IntGaugeVec,
    pub sink_yielding: IntGaugeVec,
    pub log_partitions_ahead_seconds: Gauge,
    pub log_horizon_seconds: Gauge,
    pub log_maintenance: IntCounterVec,
    pub log_maintenance_failures: IntCounter,
    pub sink_events_behind: IntGaugeVec,
    pub sink_lag_seconds: GaugeVec,
    pub projection_lag_seconds: GaugeVec,
    pub projection_events_behind: IntGaugeVec,
    pub projection_halted: IntGaugeVec,
    pub command_errors: IntCounterVec,
    pub events_projected: IntCounter,
    pub duplicate_events: IntCounterVec,
    pub parked_events: IntGaugeVec,
    pub dead_letters: IntGaugeVec,
    pub flush_duration: Histogram,
    pub batch_events: Histogram,
    pub batch_target: IntGauge,
    pub batch_failures: IntCounter,
    pub event_delay: Histogram,
    pub slot_retained_bytes: IntGauge,
    pub slot_recreated: IntCounter,
    pub slot_wal_status: IntGaugeVec,
    pub slot_safe_wal_size: IntGauge,
    pub slot_inactive_seconds: Gauge,
    pub slot_invalidated: IntGaugeVec,
    pub cache_writes: IntCounterVec,
    pub cache_repair_pending: IntGauge,
    pub cache_hit_ratio: Gauge,
    pub read_requests: IntCounterVec,
    pub read_duration: HistogramVec,
    pub read_backend_queries: IntCounter,
    pub read_denied: IntCounterVec,
    pub read_shed: IntCounter,
    pub read_connections: IntGauge,
    pub read_connections_refused: IntCounter,
    pub read_plaintext_credentials: IntGauge,
    pub read_pool_exhausted: IntGauge,
    pub read_replica_lag_seconds: GaugeVec,
    pub read_replica_queries: IntCounterVec,
    /// committed commands by type, as the slot delivers them (both editions): see
    /// [`Metrics::count_commands`]
    commands: IntCounterVec,
    /// command types with a label of their own in `cqrs_commands_total` (for the process's
    /// life, as the counter's series are)
    command_type_labels: std::sync::Mutex<std::collections::HashSet<String>>,
    /// what `cqrs.append` answered and how long it took, as the database counts them
    pub append_stats: std::sync::Arc<crate::append_stats::AppendStats>,
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    // names are unique constants, so registration only fails on a programming error
    if let Err(err) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %err, "registering a metric");
    }
    metric
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Command types counted apart in `cqrs_commands_total`; the rest as [`OTHER_COMMAND_TYPES`].
const MAX_COMMAND_TYPE_LABELS: usize = 256;
const OTHER_COMMAND_TYPES: &str = "(other)";

/// The constant label of the leadership gauges: which projection group's leadership they show
/// (each group has a leader of its own, so alerts count leaders per group).
pub const PROJECTION_GROUP_LABEL: &str = "projection_group";

impl Metrics {
    /// The metrics of a sidecar of the default projection group.
    pub fn new() -> Result<Self, prometheus::Error> {
        Self::for_group(cqrs_projection::name::group::DEFAULT)
    }

    /// The metrics of a sidecar of projection group `group`.
    pub fn for_group(group: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let r = &registry;
        let of_group =
            |name: &str, help: &str| Opts::new(name, help).const_label(PROJECTION_GROUP_LABEL, group);
        Ok(Self {
            leader: register(r, IntGauge::with_opts(of_group(LEADER, "1 while this sidecar leads its projection group (streams and projects) by a lease that has certainly not run out, 0 while it stands by."))?),
            lease: Mutex::new(None),
            leader_present: register(r, IntGauge::with_opts(of_group(LEADER_PRESENT, "1 while some sidecar holds a live lease of this sidecar's projection group (from cqrs.leader(group)), 0 while none leads it."))?),
            sink_delivered: register(r, IntCounterVec::new(Opts::new(SINK_DELIVERED_TOTAL, "Events an outbox sink's broker acknowledged (and their delivery was recorded)."), &["sink"])?),
            sink_duplicates: register(r, IntCounterVec::new(Opts::new(SINK_DUPLICATES_TOTAL, "Events sent again that the broker dropped as duplicates (same message id)."), &["sink"])?),
            sink_failures: register(r, IntCounterVec::new(Opts::new(SINK_FAILURES_TOTAL, "Deliveries to an outbox sink that failed and were tried again."), &["sink"])?),
            sink_halted: register(r, IntGaugeVec::new(Opts::new(SINK_HALTED, "1 while an outbox sink is halted on an event its broker refuses (cqrs.resume_sink)."), &["sink"])?),
            sink_attached: register(r, IntGaugeVec::new(Opts::new(SINK_ATTACHED, "1 while an outbox sink delivers as the projections go, 0 while it catches up from the log (or is not led here)."), &["sink"])?),
            sink_yielding: register(r, IntGaugeVec::new(Opts::new(SINK_YIELDING, "1 while an outbox sink that is behind waits for its group's projections to catch up on the slot (--sink-yield)."), &["sink"])?),
            log_partitions_ahead_seconds: register(r, Gauge::new(LOG_PARTITIONS_AHEAD_SECONDS, "Seconds until the newest partition of cqrs.command_log ends: appends of ids past it are refused (cqrs.maintain() makes more).")?),
            log_horizon_seconds: register(r, Gauge::new(LOG_HORIZON_SECONDS, "Age of the oldest command-id time cqrs.command_log keeps (the idempotency horizon); 0 while it keeps everything.")?),
            log_maintenance: register(r, IntCounterVec::new(Opts::new(LOG_MAINTENANCE_TOTAL, "Partitions of cqrs.command_log handled by cqrs.maintain(), by what was done (created, dropped, archived, kept)."), &["action"])?),
            log_maintenance_failures: register(r, IntCounter::new(LOG_MAINTENANCE_FAILURES_TOTAL, "Calls of cqrs.maintain() that failed.")?),
            sink_events_behind: register(r, IntGaugeVec::new(Opts::new(SINK_EVENTS_BEHIND, "Commands after an outbox sink's checkpoint (cqrs.sink_status())."), &["sink"])?),
            sink_lag_seconds: register(r, GaugeVec::new(Opts::new(SINK_LAG_SECONDS, "Age of the oldest command an outbox sink has not delivered (0 when caught up)."), &["sink"])?),
            projection_lag_seconds: register(r, GaugeVec::new(Opts::new(PROJECTION_LAG_SECONDS, "Age of the oldest command a projection has not applied yet (0 when caught up)."), &["projection"])?),
            projection_events_behind: register(r, IntGaugeVec::new(Opts::new(PROJECTION_EVENTS_BEHIND, "Commands in the log a projection has not applied yet."), &["projection"])?),
            projection_halted: register(r, IntGaugeVec::new(Opts::new(PROJECTION_HALTED, "1 while a projection is halted by a failing handler."), &["projection"])?),
            command_errors: register(r, IntCounterVec::new(Opts::new(COMMAND_ERRORS_TOTAL, "Commands a projection could not apply (dead-lettered, or halting it)."), &["projection", "kind"])?),
            events_projected: register(r, IntCounter::new(EVENTS_PROJECTED_TOTAL, "Command-log events sent to cqrs.project_batch and committed.")?),
            duplicate_events: register(r, IntCounterVec::new(Opts::new(DUPLICATE_EVENTS_TOTAL, "Events a projection skipped because it had applied them already."), &["projection"])?),
            parked_events: register(r, IntGaugeVec::new(Opts::new(PARKED_EVENTS, "Events waiting for a gap in their stream to fill."), &["projection"])?),
            dead_letters: register(r, IntGaugeVec::new(Opts::new(DEAD_LETTERS, "Events in cqrs.dead_letter."), &["projection"])?),
            flush_duration: register(r, Histogram::with_opts(HistogramOpts::new(BATCH_FLUSH_DURATION_SECONDS, "Time to project a batch (until it committed; its cache write overlaps the next batch).").buckets(LATENCY_BUCKETS.to_vec()))?),
            batch_events: register(r, Histogram::with_opts(HistogramOpts::new(BATCH_EVENTS, "Events per flushed batch.").buckets(vec![1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0]))?),
            batch_target: register(r, IntGauge::new(BATCH_TARGET_EVENTS, "The size batches currently aim for (adaptive).")?),
            batch_failures: register(r, IntCounter::new(BATCH_FAILURES_TOTAL, "Flushes that failed and were retried.")?),
            event_delay: register(r, Histogram::with_opts(HistogramOpts::new(EVENT_DELAY_SECONDS, "Time from a command's commit to its batch being projected and cached.").buckets(LATENCY_BUCKETS.to_vec()))?),
            slot_retained_bytes: register(r, IntGauge::new(SLOT_RETAINED_BYTES, "WAL the replication slot keeps (current LSN minus the slot's restart LSN).")?),
            slot_recreated: register(r, IntCounter::new(SLOT_RECREATED_TOTAL, "Times the replication slot was found missing or lost and recreated.")?),
            slot_wal_status: register(r, IntGaugeVec::new(Opts::new(SLOT_WAL_STATUS, "1 for the slot's pg_replication_slots.wal_status (reserved, extended, unreserved, lost), 0 for the others."), &["status"])?),
            slot_safe_wal_size: register(r, IntGauge::new(SLOT_SAFE_WAL_SIZE_BYTES, "WAL that can still be written before the slot is in danger of being lost (pg_replication_slots.safe_wal_size; -1 without max_slot_wal_keep_size).")?),
            slot_inactive_seconds: register(r, Gauge::new(SLOT_INACTIVE_SECONDS, "How long the slot has had no walsender (pg_replication_slots.inactive_since, PostgreSQL 17+; 0 while streaming or before 17).")?),
            slot_invalidated: register(r, IntGaugeVec::new(Opts::new(SLOT_INVALIDATED, "1 with the reason when PostgreSQL invalidated the slot (pg_replication_slots.invalidation_reason, PostgreSQL 17+)."), &["reason"])?),
            cache_writes: register(r, IntCounterVec::new(Opts::new(CACHE_WRITES_TOTAL, "Cache writes by result: applied, stale (an equal or newer revision was cached), failed."), &["result"])?),
            cache_repair_pending: register(r, IntGauge::new(CACHE_REPAIR_PENDING_KEYS, "Cache keys waiting to be repaired after Redis was unreachable.")?),
            cache_hit_ratio: register(r, Gauge::new(CACHE_HIT_RATIO, "Share of reads answered from the cache.")?),
            read_requests: register(r, IntCounterVec::new(Opts::new(READ_REQUESTS_TOTAL, "Read API requests by outcome and source."), &["outcome", "source"])?),
            read_duration: register(r, HistogramVec::new(HistogramOpts::new(READ_DURATION_SECONDS, "Read API latency.").buckets(LATENCY_BUCKETS.to_vec()), &["source"])?),
            read_backend_queries: register(r, IntCounter::new(READ_BACKEND_QUERIES_TOTAL, "PostgreSQL queries made by the read API (after singleflight).")?),
            read_denied: register(r, IntCounterVec::new(Opts::new(READ_DENIED_TOTAL, "Read API requests refused, by reason (credentials, a projection not exposed or not the caller's, a row another subject owns)."), &["reason"])?),
            read_shed: register(r, IntCounter::new(READ_SHED_TOTAL, "Read API requests answered 503 at once because the API was at capacity.")?),
            read_connections: register(r, IntGauge::new(READ_CONNECTIONS, "Connections to the read API open now (at most --read-max-connections).")?),
            read_connections_refused: register(r, IntCounter::new(READ_CONNECTIONS_REFUSED_TOTAL, "Connections to the read API refused at accept (a 503 without parsing, or a close over TLS) because --read-max-connections were open.")?),
            read_pool_exhausted: register(r, IntGauge::new(READ_POOL_EXHAUSTED, "1 while every cache miss has been refused for want of a read pool connection for a second or more (the sidecar is then not ready).")?),
            read_plaintext_credentials: register(r, IntGauge::new(READ_PLAINTEXT_CREDENTIALS, "1 when the read API takes credentials over plain HTTP on a non-loopback address (no --read-tls-cert).")?),
            read_replica_lag_seconds: register(r, GaugeVec::new(Opts::new(READ_REPLICA_LAG_SECONDS, "How far a read replica is behind the primary (the age of the newest primary WAL position it has replayed; -1 while it cannot be asked or is a minute or more behind)."), &["replica"])?),
            read_replica_queries: register(r, IntCounterVec::new(Opts::new(READ_REPLICA_QUERIES_TOTAL, "Cache misses answered by a read replica (the others by the primary: cqrs_read_backend_queries_total counts both)."), &["replica"])?),
            commands: register(r, IntCounterVec::new(Opts::new(COMMANDS_TOTAL, "Committed commands by type, as the replication slot delivered them to this sidecar (counted once per batch that committed; at most 256 types, the rest as (other))."), &[crate::append_stats::COMMAND_TYPE_LABEL])?),
            command_type_labels: Default::default(),
            append_stats: {
                let stats = std::sync::Arc::new(crate::append_stats::AppendStats::new()?);
                registry.register(Box::new(crate::append_stats::Registered(std::sync::Arc::clone(&stats))))?;
                stats
            },
            registry,
        })
    }

    /// The metrics in Prometheus text format.
    /// Counts `count` committed commands of `command_type` in `cqrs_commands_total`: under its
    /// own label among the first [`MAX_COMMAND_TYPE_LABELS`] types seen, else under
    /// [`OTHER_COMMAND_TYPES`] (a label per type without bound would grow the metrics without
    /// bound).
    pub fn count_commands(&self, command_type: &str, count: u64) {
        let own = self.command_type_labels.lock().is_ok_and(|mut seen| {
            seen.contains(command_type)
                || (seen.len() < MAX_COMMAND_TYPE_LABELS && seen.insert(command_type.to_owned()))
        });
        let label = if own { command_type } else { OTHER_COMMAND_TYPES };
        self.commands.with_label_values(&[label]).inc_by(count);
    }

    /// Whether this sidecar leads, by which lease: `cqrs_leader` says 1 while it does and that
    /// lease has not run out (worked out in [`Metrics::render`]). A leader that stalled (a stopped
    /// process, starved cores) past its lease's time to live learns that another took the lease
    /// over only when its next renewal answers; the gauge says 0 from the moment the lease may
    /// have changed hands.
    pub fn set_leading(&self, lease: Option<LeaseExpiry>) {
        *self.lease.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = lease;
    }

    pub fn render(&self) -> String {
        let leads = self
            .lease
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_some_and(|lease| !lease.passed());
        self.leader.set(i64::from(leads));
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %err, "encoding metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn leadership_is_shown_per_projection_group() {
        let metrics = Metrics::for_group("users").expect("the metrics");
        metrics.set_leading(Some(LeaseExpiry::until(Instant::now() + Duration::from_secs(60))));
        let text = metrics.render();
        assert!(
            text.contains("cqrs_leader{projection_group=\"users\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cqrs_leader_present{projection_group=\"users\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn a_leader_whose_lease_runs_out_is_shown_leading_no_longer() {
        let metrics = Metrics::new().expect("the metrics");
        let leads = |metrics: &Metrics| {
            let text = metrics.render();
            if text.contains("cqrs_leader{projection_group=\"default\"} 1") {
                true
            } else {
                assert!(
                    text.contains("cqrs_leader{projection_group=\"default\"} 0"),
                    "{text}"
                );
                false
            }
        };
        // a lease that ran out before it was reported
        metrics.set_leading(Some(LeaseExpiry::until(Instant::now())));
        assert!(!leads(&metrics));
        // one that runs out while it leads: 0 from that moment, with nobody saying so
        let lease = LeaseExpiry::until(Instant::now() + Duration::from_millis(200));
        metrics.set_leading(Some(lease.clone()));
        assert!(leads(&metrics));
        std::thread::sleep(Duration::from_millis(250));
        assert!(!leads(&metrics));
        // a renewal (the lease's monitor holds the same expiry) shows it leading again
        lease.renewed(Instant::now());
        assert!(leads(&metrics));
        metrics.set_leading(None);
        assert!(!leads(&metrics));
    }

    #[test]
    fn command_types_past_the_cap_share_one_label() {
        let metrics = Metrics::new().expect("the metrics");
        for n in 0..MAX_COMMAND_TYPE_LABELS + 10 {
            metrics.count_commands(&format!("T{n}"), 2);
        }
        // a type already labelled keeps its label past the cap
        metrics.count_commands("T0", 1);
        let text = metrics.render();
        let labelled = text
            .lines()
            .filter(|l| l.starts_with("cqrs_commands_total{command_type=\"T"))
            .count();
        assert_eq!(labelled, MAX_COMMAND_TYPE_LABELS, "{text}");
        assert!(
            text.contains("cqrs_commands_total{command_type=\"(other)\"} 20"),
            "{text}"
        );
        assert!(
            text.contains("cqrs_commands_total{command_type=\"T0\"} 3"),
            "{text}"
        );
    }
}
