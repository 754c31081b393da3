//! Cache-aside reads of read-model rows (step 6 of a read request, see [`super`]).
//!
//! A read looks in Redis first. A miss is read from PostgreSQL (`cqrs.read_many`, which also
//! canonicalises the key) and filled into Redis through the same version-guarded script the
//! projector uses, so a slow reader can never replace a newer row with an older one. Concurrent
//! misses of one key share one PostgreSQL query (singleflight): the query runs in its own task,
//! so a client that goes away does not cancel it for the others. A row that does not exist is
//! cached as "not found" for a short time, at the projection's revision of the moment: the
//! projector's next write of that key has a higher revision and replaces it at once.
//!
//! Every backend call has a deadline. Redis unreachable → PostgreSQL answers (and says so);
//! PostgreSQL unreachable → what Redis holds is served; neither → unavailable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::error::SqlState;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::watch;

use super::replicas::{Need, Replicas};

/// `cqrs.read.server` of a backend query the primary answered (a replica's is its name).
const PRIMARY: &str = "primary";
use crate::cache::{Cache, Entry, Write};
use crate::health::Health;
use crate::metrics::{label, Metrics};
use crate::postgres::{ConnectionPurpose, Database};

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Postgres,
    /// PostgreSQL, because Redis did not answer.
    PostgresCacheDown,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Postgres => "postgres",
            Source::PostgresCacheDown => "postgres_cache_down",
        }
    }
}

/// A read's answer: the row (`None`: no such row) at a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub doc: Option<String>,
    pub rev: i64,
    pub source: Source,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("there is no projection named {0:?}")]
    UnknownProjection(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
}

/// The read pool could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the read API's PostgreSQL pool: {0}")]
pub struct PoolError(String);

#[derive(Debug, Clone, Copy)]
pub struct ReadSettings {
    pub redis_timeout: Duration,
    pub postgres_timeout: Duration,
    /// How long a miss waits for a pooled connection (the misses' own limit).
    pub postgres_queue_timeout: Duration,
    pub pool_size: usize,
    /// How far behind the primary a replica may be to answer a miss that waits for nothing.
    pub replica_max_staleness: Duration,
}

type Flight = watch::Receiver<Option<Result<Found, ReadError>>>;

pub struct Reader {
    cache: Arc<Cache>,
    pool: Pool,
    replicas: std::sync::OnceLock<Arc<Replicas>>,
    metrics: Arc<Metrics>,
    /// told whether cache misses find a connection (readiness)
    health: Arc<Health>,
    settings: ReadSettings,
    flights: Mutex<HashMap<(String, String), Flight>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// SQLSTATEs that mean the key (not the system) is wrong: it cannot be cast to the key column.
fn is_bad_key(code: &str) -> bool {
    code.starts_with("22")
}

/// What a failed query means for the caller. No database message reaches the caller or the log:
/// it can hold a value of a row or a command; the SQLSTATE says what an operator needs.
fn pg_error(err: &tokio_postgres::Error, projection: &str, key: &str) -> ReadError {
    match err.as_db_error() {
        Some(db) if *db.code() == SqlState::UNDEFINED_OBJECT => {
            ReadError::UnknownProjection(projection.to_owned())
        }
        Some(db) if is_bad_key(db.code().code()) => ReadError::BadRequest(format!(
            "{key:?} is not a key of {projection} (SQLSTATE {})",
            db.code().code()
        )),
        Some(db) => {
            tracing::warn!(
                projection,
                sqlstate = db.code().code(),
                "reading a read model failed"
            );
            ReadError::Unavailable(format!(
                "PostgreSQL could not read {projection} (SQLSTATE {})",
                db.code().code()
            ))
        }
        None => {
            tracing::warn!(projection, error = %err, "reading a read model failed");
            ReadError::Unavailable("PostgreSQL could not be reached".into())
        }
    }
}

impl Reader {
    pub fn new(
        pg: Database,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        settings: ReadSettings,
    ) -> Result<Arc<Self>, PoolError> {
        let manager = Manager::from_config(
            pg.config_for(ConnectionPurpose::Read),
            pg.connector(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(settings.postgres_queue_timeout))
            .create_timeout(Some(settings.postgres_timeout))
            .recycle_timeout(Some(settings.postgres_timeout))
            .build()
            .map_err(|err| PoolError(err.to_string()))?;
        Ok(Arc::new(Self {
            cache,
            pool,
            replicas: std::sync::OnceLock::new(),
            metrics,
            health,
            settings,
            flights: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }))
    }

    /// Reads misses from `replicas` where they qualify (see [`Replicas`]); set once, at start.
    pub fn use_replicas(&self, replicas: Arc<Replicas>) {
        if !replicas.is_empty() && self.replicas.set(replicas).is_err() {
            tracing::warn!("the read replicas were set twice; the first ones stay");
        }
    }

    fn count_lookup(&self, hit: bool) {
        let (hits, misses) = if hit {
            (
                self.hits.fetch_add(1, Ordering::Relaxed) + 1,
                self.misses.load(Ordering::Relaxed),
            )
        } else {
            (
                self.hits.load(Ordering::Relaxed),
                self.misses.fetch_add(1, Ordering::Relaxed) + 1,
            )
        };
        self.metrics
            .cache_hit_ratio
            .set(hits as f64 / (hits + misses).max(1) as f64);
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, ReadError> {
        match self.pool.get().await {
            Ok(client) => {
                self.health.read_pool_served();
                self.metrics.read_pool_exhausted.set(0);
                Ok(client)
            }
            Err(err) => {
                tracing::debug!(error = %err, "no read pool connection");
                self.health.read_pool_refused();
                self.metrics
                    .read_pool_exhausted
                    .set(i64::from(self.health.read_pool_exhausted()));
                Err(ReadError::Unavailable(
                    "PostgreSQL could not be reached in time".into(),
                ))
            }
        }
    }

    /// The cached entry, `Err(())` when Redis did not answer in time.
    async fn cached(&self, projection: &str, key: &str) -> Result<Option<Found>, ()> {
        match tokio::time::timeout(self.settings.redis_timeout, self.cache.get(projection, key)).await {
            Ok(Ok(Some(cached))) => Ok(Some(Found {
                doc: match cached.entry {
                    Entry::Row(doc) => Some(doc),
                    Entry::Deleted | Entry::Missing => None,
                },
                rev: cached.rev,
                source: Source::Cache,
            })),
            Ok(Ok(None)) => Ok(None),
            _ => Err(()),
        }
    }

    /// A row, from the cache or else PostgreSQL (one query per key however many ask at once).
    pub async fn get(self: &Arc<Self>, projection: &str, key: &str) -> Result<Found, ReadError> {
        let cache_down = match self.cached(projection, key).await {
            Ok(Some(found)) => {
                self.count_lookup(true);
                return Ok(found);
            }
            Ok(None) => false,
            Err(()) => true,
        };
        // an unknown projection is found out by the query (SQLSTATE 42704)
        self.count_lookup(false);
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            let id = (projection.to_owned(), key.to_owned());
            match flights.get(&id) {
                Some(flight) => flight.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(id.clone(), rx.clone());
                    let reader = Arc::clone(self);
                    // in the span of the request that started it (its backend query's parent)
                    tokio::spawn(tracing::Instrument::in_current_span(async move {
                        let result = reader.load(&id.0, &id.1, cache_down).await;
                        tx.send_replace(Some(result));
                        reader
                            .flights
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                    }));
                    rx
                }
            }
        };
        self.await_flight(flight).await
    }

    async fn await_flight(&self, mut flight: Flight) -> Result<Found, ReadError> {
        // the load has its own deadlines; this one only guards against a lost task
        let deadline = self.settings.postgres_timeout * 2 + self.settings.redis_timeout;
        match tokio::time::timeout(deadline, flight.wait_for(Option::is_some)).await {
            Ok(Ok(result)) => result
                .clone()
                .unwrap_or_else(|| Err(ReadError::Unavailable("no answer".into()))),
            _ => Err(ReadError::Unavailable("PostgreSQL did not answer in time".into())),
        }
    }

    /// Reads one row from PostgreSQL (or a replica fresh enough) and fills the cache with it.
    async fn load(&self, projection: &str, key: &str, cache_down: bool) -> Result<Found, ReadError> {
        let need = Need::Staleness(self.settings.replica_max_staleness);
        let fetched = self.fetch_from(projection, key, need).await?;
        if cache_down {
            return Ok(Found {
                doc: fetched.doc,
                rev: fetched.rev,
                source: Source::PostgresCacheDown,
            });
        }
        Ok(self.filled(projection, fetched).await)
    }

    /// Fills the cache with `fetched` and answers it — unless the cache holds a newer entry (the
    /// projector wrote meanwhile, or a replica was behind it): that one is the answer then, so
    /// that no read returns a row older than the cache entry it would replace.
    async fn filled(&self, projection: &str, fetched: Fetched) -> Found {
        if !self.fill(projection, &fetched).await {
            if let Ok(Some(newer)) = self.cached(projection, &fetched.key).await {
                if newer.rev > fetched.rev {
                    return newer;
                }
            }
        }
        Found {
            doc: fetched.doc,
            rev: fetched.rev,
            source: Source::Postgres,
        }
    }

    /// One row as the primary has it now.
    pub async fn fetch(&self, projection: &str, key: &str) -> Result<Fetched, ReadError> {
        tokio::time::timeout(self.settings.postgres_timeout, async {
            let client = self.client().await?;
            self.fetch_on(&client, projection, key).await
        })
        .await
        .map_err(|_| ReadError::Unavailable("PostgreSQL did not answer in time".into()))?
    }

    /// One row from a replica that satisfies `need`, else the primary; in a `cqrs.read_backend`
    /// span naming the server that answered, while traces are exported.
    async fn fetch_from(&self, projection: &str, key: &str, need: Need) -> Result<Fetched, ReadError> {
        use tracing::Instrument;
        if !crate::traces::enabled() {
            return self.fetch_from_any(projection, key, need).await;
        }
        let span = tracing::info_span!(
            crate::traces::READ_BACKEND,
            otel.kind = "client",
            db.system.name = "postgresql",
            cqrs.read.server = tracing::field::Empty,
        );
        self.fetch_from_any(projection, key, need).instrument(span).await
    }

    /// One row from a replica that satisfies `need`, else (none does, or it fails) the primary.
    async fn fetch_from_any(&self, projection: &str, key: &str, need: Need) -> Result<Fetched, ReadError> {
        if let Some(chosen) = self.replicas.get().and_then(|r| r.choose(need)) {
            let from_replica = tokio::time::timeout(self.settings.postgres_timeout, async {
                let client = chosen.pool.get().await.map_err(|err| {
                    tracing::debug!(replica = chosen.name, error = %err, "no connection to the replica");
                    ReadError::Unavailable("the replica could not be reached".into())
                })?;
                self.fetch_on(&client, projection, key).await
            })
            .await;
            match from_replica {
                Ok(Ok(fetched)) => {
                    self.metrics
                        .read_replica_queries
                        .with_label_values(&[chosen.name])
                        .inc();
                    if crate::traces::enabled() {
                        tracing::Span::current().record("cqrs.read.server", chosen.name);
                    }
                    return Ok(fetched);
                }
                // the key or the projection is wrong wherever it is asked
                Ok(Err(err @ (ReadError::BadRequest(_) | ReadError::UnknownProjection(_)))) => {
                    return Err(err)
                }
                _ => tracing::debug!(
                    replica = chosen.name,
                    "a replica failed a read; the primary answers"
                ),
            }
        }
        if crate::traces::enabled() {
            tracing::Span::current().record("cqrs.read.server", PRIMARY);
        }
        self.fetch(projection, key).await
    }

    /// One row, read on `client`.
    async fn fetch_on(
        &self,
        client: &tokio_postgres::Client,
        projection: &str,
        key: &str,
    ) -> Result<Fetched, ReadError> {
        self.metrics.read_backend_queries.inc();
        let keys = [key];
        let row = client
            .query_opt(
                "select key, rev, doc::text from cqrs.read_many($1, $2)",
                &[&projection, &&keys[..]],
            )
            .await
            .map_err(|err| pg_error(&err, projection, key))?;
        let row = row.ok_or_else(|| ReadError::Unavailable("cqrs.read_many returned nothing".into()))?;
        Ok(Fetched {
            key: row.get(0),
            rev: row.get(1),
            doc: row.get(2),
        })
    }

    /// Fills the cache with a fetched row (or its absence); never replaces a newer entry. False
    /// when the cache kept what it had (or did not answer).
    pub async fn fill(&self, projection: &str, fetched: &Fetched) -> bool {
        let write = Write {
            projection: projection.to_owned(),
            key: fetched.key.clone(),
            rev: fetched.rev,
            entry: match &fetched.doc {
                Some(doc) => Entry::Row(doc.clone()),
                None => Entry::Missing,
            },
        };
        match tokio::time::timeout(self.settings.redis_timeout, self.cache.write(write)).await {
            Ok(Ok(applied)) => {
                let result = if applied {
                    label::CACHE_FILL
                } else {
                    label::CACHE_FILL_STALE
                };
                self.metrics.cache_writes.with_label_values(&[result]).inc();
                applied
            }
            _ => {
                self.metrics
                    .cache_writes
                    .with_label_values(&[label::CACHE_FAILED])
                    .inc();
                false
            }
        }
    }

    /// A row as of the primary's WAL position `position` or later (read-your-writes: the cache
    /// may not have it yet), from a replica that has replayed that far or the primary, filled
    /// into the cache.
    pub async fn get_fresh(&self, projection: &str, key: &str, position: u64) -> Result<Found, ReadError> {
        let fetched = self.fetch_from(projection, key, Need::Position(position)).await?;
        Ok(self.filled(projection, fetched).await)
    }

    /// How far behind the log `projection` is, in seconds (`cqrs.progress()`), for a
    /// read-your-writes timeout; `None` when PostgreSQL does not say in time.
    pub async fn seconds_behind(&self, projection: &str) -> Option<f64> {
        tokio::time::timeout(self.settings.postgres_timeout, async {
            let client = self.client().await.ok()?;
            client
                .query_opt(
                    "select coalesce(s.seconds_behind, 0)::float8 from cqrs.progress() s where s.projection = $1",
                    &[&projection],
                )
                .await
                .ok()
                .flatten()
                .map(|row| row.get::<_, f64>(0))
        })
        .await
        .ok()
        .flatten()
    }
}

/// A row as read from PostgreSQL: canonical key, revision, document (`None`: no such row, at
/// the projection's current revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub key: String,
    pub rev: i64,
    pub doc: Option<String>,
}
