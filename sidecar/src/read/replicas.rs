//! Read replicas for cache misses (`--read-replica-urls`).
//!
//! A miss may be read from a streaming replica only if the replica has replayed what the read
//! needs: for a read-your-writes read (`?after=`), the primary's WAL position at the moment the
//! awaited command was seen applied (the projection's commit is at or below it); for any other
//! miss, everything the primary had at most `--read-replica-max-staleness` ago. When no replica
//! qualifies (or one fails), the primary answers — a replica only ever takes load off it.
//!
//! One task ([`monitor`]) samples the primary's WAL position and every replica's replay position
//! a few times a second. A replica's staleness is the age of the newest primary sample it has
//! replayed past: exact enough for a bound of a second, and it needs no clock on the replica
//! (`pg_last_xact_replay_timestamp()` says nothing while the primary is idle).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::watch;
use tokio_postgres::types::PgLsn;

use crate::metrics::Metrics;
use crate::postgres::{ConnectionPurpose, Database};

/// How often positions are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Samples of the primary kept (a minute at [`SAMPLE_EVERY`]); a replica further behind than
/// the oldest counts as too stale for any bound.
const SAMPLES_KEPT: usize = 600;

/// What a read needs of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The replica has replayed this primary WAL position.
    Position(u64),
    /// The replica is at most this far behind the primary.
    Staleness(Duration),
}

/// One replica: its pool and where it was at the last look.
struct Replica {
    name: String,
    db: Database,
    pool: Pool,
    /// the replay position at the last look; 0 while it could not be asked
    replayed: AtomicU64,
    /// its staleness at the last look, in microseconds (`u64::MAX`: unknown)
    staleness_micros: AtomicU64,
}

pub struct Replicas {
    replicas: Vec<Replica>,
    /// (when, primary WAL position), oldest first
    primary: Mutex<VecDeque<(Instant, u64)>>,
    next: AtomicU64,
}

/// A replica's pool, for one read.
pub struct Chosen<'r> {
    pub name: &'r str,
    pub pool: &'r Pool,
}

impl Replicas {
    /// Pools for `replicas` (none connect until used), `pool_size` connections each.
    pub fn new(replicas: Vec<Database>, pool_size: usize, timeout: Duration) -> Result<Arc<Self>, String> {
        let replicas = replicas
            .into_iter()
            .map(|db| {
                let manager = Manager::from_config(
                    db.config_for(ConnectionPurpose::Read),
                    db.connector(),
                    ManagerConfig {
                        recycling_method: RecyclingMethod::Fast,
                    },
                );
                let pool = Pool::builder(manager)
                    .max_size(pool_size.max(1))
                    .runtime(deadpool_postgres::Runtime::Tokio1)
                    .wait_timeout(Some(timeout))
                    .create_timeout(Some(timeout))
                    .recycle_timeout(Some(timeout))
                    .build()
                    .map_err(|err| err.to_string())?;
                Ok(Replica {
                    name: db.describe(),
                    db,
                    pool,
                    replayed: AtomicU64::new(0),
                    staleness_micros: AtomicU64::new(u64::MAX),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Arc::new(Self {
            replicas,
            primary: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// A replica that satisfies `need` (taking turns among those that do), if any.
    pub fn choose(&self, need: Need) -> Option<Chosen<'_>> {
        let qualifies = |replica: &Replica| match need {
            Need::Position(position) => replica.replayed.load(Ordering::Relaxed) >= position,
            Need::Staleness(bound) => {
                replica.staleness_micros.load(Ordering::Relaxed) <= bound.as_micros() as u64
            }
        };
        let count = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        (0..count)
            .map(|i| &self.replicas[(start + i) % count])
            .find(|replica| qualifies(replica))
            .map(|replica| Chosen {
                name: &replica.name,
                pool: &replica.pool,
            })
    }

    /// Records a look at the primary.
    fn sampled_primary(&self, position: u64) {
        let mut samples = self.primary.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((Instant::now(), position));
        while samples.len() > SAMPLES_KEPT {
            samples.pop_front();
        }
    }

    /// How far behind a replica that has replayed `replayed` is: the age of the newest primary
    /// sample at or below it; `None` when it is behind every sample kept.
    fn staleness(&self, replayed: u64) -> Option<Duration> {
        let samples = self.primary.lock().unwrap_or_else(|p| p.into_inner());
        samples
            .iter()
            .rev()
            .find(|(_, position)| *position <= replayed)
            .map(|(at, _)| at.elapsed())
    }
}

/// Samples positions and publishes replica lag until `shutdown`.
pub async fn monitor(
    replicas: Arc<Replicas>,
    primary: Database,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut primary_client: Option<tokio_postgres::Client> = None;
    let mut replica_clients: Vec<Option<tokio_postgres::Client>> =
        replicas.replicas.iter().map(|_| None).collect();
    loop {
        if let Some(position) = position(
            &mut primary_client,
            &primary,
            "select pg_catalog.pg_current_wal_lsn()",
        )
        .await
        {
            replicas.sampled_primary(position);
        }
        for (replica, client) in replicas.replicas.iter().zip(replica_clients.iter_mut()) {
            let replayed = position(client, &replica.db, "select pg_catalog.pg_last_wal_replay_lsn()").await;
            let replayed = replayed.unwrap_or(0);
            let staleness = replicas.staleness(replayed).filter(|_| replayed > 0);
            replica.replayed.store(replayed, Ordering::Relaxed);
            replica.staleness_micros.store(
                staleness.map_or(u64::MAX, |s| s.as_micros() as u64),
                Ordering::Relaxed,
            );
            metrics
                .read_replica_lag_seconds
                .with_label_values(&[replica.name.as_str()])
                .set(staleness.map_or(-1.0, |s| s.as_secs_f64()));
        }
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// One WAL position from `query`, (re)connecting as needed; `None` when it cannot be had.
async fn position(client: &mut Option<tokio_postgres::Client>, db: &Database, query: &str) -> Option<u64> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = db
            .connect_for(ConnectionPurpose::Waits, Duration::from_secs(1))
            .await
            .ok();
    }
    let connected = client.as_ref()?;
    match tokio::time::timeout(Duration::from_secs(1), connected.query_one(query, &[])).await {
        Ok(Ok(row)) => row.get::<_, Option<PgLsn>>(0).map(u64::from),
        _ => {
            *client = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas_at(positions: &[u64]) -> Arc<Replicas> {
        let db =
            |port: u16| Database::parse(&format!("postgres://u@127.0.0.1:{port}/d"), None).expect("a URL");
        let replicas = Replicas::new(
            (0..positions.len()).map(|i| db(6000 + i as u16)).collect(),
            1,
            Duration::from_secs(1),
        )
        .expect("pools");
        for (replica, position) in replicas.replicas.iter().zip(positions) {
            replica.replayed.store(*position, Ordering::Relaxed);
            if let Some(staleness) = replicas.staleness(*position) {
                replica
                    .staleness_micros
                    .store(staleness.as_micros() as u64, Ordering::Relaxed);
            }
        }
        replicas
    }

    #[test]
    fn a_replica_serves_only_what_it_has_replayed() {
        let replicas = replicas_at(&[100, 300]);
        for _ in 0..4 {
            let chosen = replicas.choose(Need::Position(200)).expect("one qualifies");
            assert!(chosen.name.ends_with(":6001/d"), "{}", chosen.name);
        }
        assert!(replicas.choose(Need::Position(301)).is_none());
        assert!(replicas.choose(Need::Position(50)).is_some());
    }

    #[test]
    fn staleness_is_the_age_of_the_newest_primary_position_replayed() {
        let replicas = replicas_at(&[]);
        replicas.sampled_primary(100);
        std::thread::sleep(Duration::from_millis(30));
        replicas.sampled_primary(200);
        let old = replicas.staleness(150).expect("past the first sample");
        assert!(old >= Duration::from_millis(30), "{old:?}");
        assert!(replicas.staleness(200).expect("current") < old);
        assert_eq!(replicas.staleness(99), None, "behind every sample kept");
        assert!(
            replicas.choose(Need::Staleness(Duration::from_secs(1))).is_none(),
            "no replica"
        );
    }
}
