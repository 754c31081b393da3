//! Cache keys to repair: rows written while Redis was unreachable, and projections to resync
//! whole (after a rebuild, when too many keys were missed to remember them one by one, when a
//! new leader finds the cache behind, or when Redis lost its data).

use std::collections::{BTreeMap, BTreeSet};

/// Why a repair could not be done now (it is tried again).
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("reading the read model: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

/// What a repair pass has to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RepairWork {
    /// projection → keys
    pub keys: BTreeMap<String, BTreeSet<String>>,
    /// projections to resync: every cached key checked, every row the cache may miss written
    pub full: BTreeSet<String>,
}

impl RepairWork {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.full.is_empty()
    }
}

/// Pending repairs, bounded: past `capacity` remembered keys a projection is refreshed whole.
#[derive(Debug)]
pub struct Repairs {
    work: RepairWork,
    remembered: usize,
    capacity: usize,
    /// projections of the work taken and not yet finished
    in_flight: BTreeSet<String>,
}

impl Repairs {
    pub fn new(capacity: usize) -> Self {
        Self {
            work: RepairWork::default(),
            remembered: 0,
            capacity,
            in_flight: BTreeSet::new(),
        }
    }

    /// Remembers that `key` of `projection` may be stale in the cache.
    pub fn remember(&mut self, projection: &str, key: &str) {
        if self.work.full.contains(projection) {
            return;
        }
        if self.remembered >= self.capacity {
            self.refresh_all(projection);
            return;
        }
        if self
            .work
            .keys
            .entry(projection.to_owned())
            .or_default()
            .insert(key.to_owned())
        {
            self.remembered += 1;
        }
    }

    /// Marks every cached key of `projection` for checking.
    pub fn refresh_all(&mut self, projection: &str) {
        if let Some(keys) = self.work.keys.remove(projection) {
            self.remembered -= keys.len();
        }
        self.work.full.insert(projection.to_owned());
    }

    pub fn pending_keys(&self) -> usize {
        self.remembered
    }

    pub fn is_empty(&self) -> bool {
        self.work.is_empty()
    }

    /// Whether the cache of `projection` may be missing something (work waiting or under way):
    /// while it may, its synced mark must not move.
    pub fn is_pending(&self, projection: &str) -> bool {
        self.work.full.contains(projection)
            || self.work.keys.contains_key(projection)
            || self.in_flight.contains(projection)
    }

    /// Takes the pending work; give back what could not be done with [`Repairs::restore`] and
    /// then call [`Repairs::finish`].
    pub fn take(&mut self) -> RepairWork {
        self.remembered = 0;
        let work = std::mem::take(&mut self.work);
        self.in_flight = work.full.iter().chain(work.keys.keys()).cloned().collect();
        work
    }

    /// The work taken is done (what was left of it restored).
    pub fn finish(&mut self) {
        self.in_flight.clear();
    }

    pub fn restore(&mut self, work: RepairWork) {
        for projection in work.full {
            self.refresh_all(&projection);
        }
        for (projection, keys) in work.keys {
            for key in keys {
                self.remember(&projection, &key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_falling_back_to_a_full_refresh() {
        let mut repairs = Repairs::new(3);
        repairs.remember("a", "1");
        repairs.remember("a", "1");
        repairs.remember("a", "2");
        repairs.remember("b", "1");
        assert_eq!(repairs.pending_keys(), 3);
        repairs.remember("b", "2");
        let work = repairs.take();
        assert_eq!(work.full, BTreeSet::from(["b".to_owned()]));
        assert_eq!(
            work.keys.keys().cloned().collect::<Vec<_>>(),
            vec!["a".to_owned()]
        );
        assert!(repairs.is_empty());
        repairs.restore(work);
        repairs.finish();
        assert_eq!(repairs.pending_keys(), 2);
        repairs.remember("b", "3");
        assert_eq!(
            repairs.pending_keys(),
            2,
            "a projection refreshed whole needs no keys"
        );
    }

    #[test]
    fn work_under_way_is_pending_until_finished() {
        let mut repairs = Repairs::new(10);
        repairs.remember("a", "1");
        repairs.refresh_all("b");
        assert!(repairs.is_pending("a") && repairs.is_pending("b") && !repairs.is_pending("c"));
        let work = repairs.take();
        assert!(
            repairs.is_pending("a") && repairs.is_pending("b"),
            "taken, not done"
        );
        repairs.restore(RepairWork {
            keys: work.keys,
            full: BTreeSet::new(),
        });
        repairs.finish();
        assert!(repairs.is_pending("a"), "given back");
        assert!(!repairs.is_pending("b"), "done");
    }
}

/// Repairs the cache: rewrites remembered keys (and every cached key of projections marked for a
/// full refresh) from the read models, through the same version-guarded script as every write.
pub mod run {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures_util::{pin_mut, TryStreamExt};
    use tokio::sync::watch;
    use tokio_postgres::Client;

    use super::{RepairError, RepairWork, Repairs};
    use crate::cache::{Cache, Entry, Write};
    use crate::metrics::Metrics;
    use crate::postgres::{ConnectionPurpose, Database};

    /// Rows written to the cache per pipeline.
    const CHUNK: usize = 500;

    fn write_of(projection: &str, row: &tokio_postgres::Row) -> Write {
        Write {
            projection: projection.to_owned(),
            key: row.get(0),
            rev: row.get(1),
            entry: match row.get::<_, Option<String>>(2) {
                Some(doc) => Entry::Row(doc),
                None => Entry::Deleted,
            },
        }
    }

    /// Rewrites `keys` of `projection` from the read model.
    async fn rewrite(
        pg: &Client,
        cache: &Cache,
        projection: &str,
        keys: &[String],
    ) -> Result<(), RepairError> {
        for chunk in keys.chunks(CHUNK) {
            let rows = pg
                .query(
                    "select key, rev, doc::text from cqrs.read_many($1, $2)",
                    &[&projection, &chunk],
                )
                .await?;
            let writes: Vec<Write> = rows.iter().map(|row| write_of(projection, row)).collect();
            cache.rewrite_all(&writes).await?;
        }
        Ok(())
    }

    /// Resyncs `projection`: rewrites every cached key (stale rows, rows deleted meanwhile),
    /// then writes every row changed after the cache's synced mark, then raises the mark to the
    /// revision read before all that. `None` when the projection is gone.
    async fn resync(pg: &Client, cache: &Cache, projection: &str) -> Result<Option<usize>, RepairError> {
        let Some(row) = pg
            .query_opt(
                "select revision from cqrs.projection_state where name = $1",
                &[&projection],
            )
            .await?
        else {
            return Ok(None);
        };
        let revision: i64 = row.get(0);
        let cached = cache.keys_of(projection).await?;
        rewrite(pg, cache, projection, &cached).await?;
        let mark = cache.synced(projection).await?.unwrap_or(-1);
        let mut written = cached.len();
        if mark < revision {
            // streamed, not collected: a read model can be larger than this process should hold
            let rows = pg
                .query_raw(
                    "select key, rev, doc::text from cqrs.changed_since($1, $2)",
                    [&projection as &(dyn tokio_postgres::types::ToSql + Sync), &mark],
                )
                .await?;
            pin_mut!(rows);
            let mut writes = Vec::with_capacity(CHUNK);
            while let Some(row) = rows.try_next().await? {
                writes.push(write_of(projection, &row));
                if writes.len() == CHUNK {
                    cache.rewrite_all(&writes).await?;
                    written += writes.len();
                    writes.clear();
                }
            }
            written += writes.len();
            cache.rewrite_all(&writes).await?;
        }
        cache.establish_synced(projection, revision).await?;
        Ok(Some(written))
    }

    /// One pass over `work`; what could not be done is returned.
    async fn pass(pg: &Client, cache: &Cache, mut work: RepairWork) -> Result<(), RepairWork> {
        while let Some(projection) = work.full.first().cloned() {
            match resync(pg, cache, &projection).await {
                Ok(written) => {
                    tracing::info!(%projection, rows = written.unwrap_or(0), "resynced the projection's cache");
                }
                Err(err) => {
                    tracing::warn!(error = %err, %projection, "resyncing the cache failed; will retry");
                    return Err(work);
                }
            }
            work.full.remove(&projection);
            work.keys.remove(&projection);
        }
        while let Some((projection, keys)) = work.keys.pop_first() {
            let list: Vec<String> = keys.iter().cloned().collect();
            if let Err(err) = rewrite(pg, cache, &projection, &list).await {
                tracing::warn!(error = %err, %projection, "repairing cached rows failed; will retry");
                work.keys.insert(projection, keys);
                return Err(work);
            }
            tracing::info!(%projection, keys = list.len(), "repaired cached rows written while Redis was unreachable");
        }
        Ok(())
    }

    /// Repairs whenever there is work and Redis answers, until `shutdown`.
    pub async fn repairer(
        db: Database,
        cache: Arc<Cache>,
        repairs: Arc<Mutex<Repairs>>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut pg: Option<Client> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let work = match repairs.lock() {
                Ok(mut repairs) if !repairs.is_empty() => repairs.take(),
                _ => continue,
            };
            let outcome = if !cache.ping().await {
                Err(work)
            } else {
                if pg.as_ref().is_none_or(|c| c.is_closed()) {
                    pg = db
                        .connect_for(ConnectionPurpose::Repair, Duration::from_secs(5))
                        .await
                        .ok();
                }
                match pg.as_ref() {
                    Some(client) => pass(client, &cache, work).await,
                    None => Err(work),
                }
            };
            if let Ok(mut repairs) = repairs.lock() {
                if let Err(left) = outcome {
                    repairs.restore(left);
                }
                repairs.finish();
                metrics.cache_repair_pending.set(repairs.pending_keys() as i64);
            }
        }
    }
}
