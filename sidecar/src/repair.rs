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
    /// projections whose synced mark may be below what the cache holds: a batch written while
    /// their repair was under way could not raise it, and no later batch may come to do so
    pub top_up: BTreeSet<String>,
}

impl RepairWork {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.full.is_empty() && self.top_up.is_empty()
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

    /// Of the highest revision each projection's batch wrote, the synced marks that batch may
    /// raise: not those of projections whose cache may be missing something. Those are topped up
    /// once their repair is done instead (a mark left below the revision makes the next leader
    /// resync for nothing, and the cache read as behind while nothing is).
    pub fn marks_to_raise<'a>(
        &mut self,
        highest: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> Vec<(String, i64)> {
        let mut raise = Vec::new();
        for (projection, rev) in highest {
            if self.is_pending(projection) {
                self.work.top_up.insert(projection.to_owned());
            } else {
                raise.push((projection.to_owned(), rev));
            }
        }
        raise
    }

    /// Whether `projection` is to be resynced whole (and was not taken for it yet).
    pub fn awaits_resync(&self, projection: &str) -> bool {
        self.work.full.contains(projection)
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
        self.work.top_up.extend(work.top_up);
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
            ..RepairWork::default()
        });
        repairs.finish();
        assert!(repairs.is_pending("a"), "given back");
        assert!(!repairs.is_pending("b"), "done");
    }

    #[test]
    fn a_mark_a_batch_may_not_raise_is_topped_up_after_the_repair() {
        let mut repairs = Repairs::new(10);
        repairs.refresh_all("a");
        let work = repairs.take();
        assert_eq!(
            repairs.marks_to_raise([("a", 7), ("b", 3)]),
            vec![("b".to_owned(), 3)],
            "a is being resynced: its cache may still miss older rows"
        );
        assert!(!repairs.is_empty(), "a's mark is owed");
        repairs.restore(work);
        repairs.finish();
        let work = repairs.take();
        assert_eq!(work.top_up, BTreeSet::from(["a".to_owned()]));
        assert_eq!(work.full, BTreeSet::from(["a".to_owned()]), "given back");
        repairs.restore(RepairWork {
            top_up: work.top_up,
            ..RepairWork::default()
        });
        repairs.finish();
        assert!(!repairs.is_pending("a"), "a top-up hides no row");
        assert_eq!(repairs.marks_to_raise([("a", 9)]), vec![("a".to_owned(), 9)]);
        assert!(!repairs.awaits_resync("a"));
        assert_eq!(repairs.take().top_up, BTreeSet::from(["a".to_owned()]));
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

    /// The projection's revision; `None` when the projection is gone.
    async fn revision(pg: &Client, projection: &str) -> Result<Option<i64>, RepairError> {
        Ok(pg
            .query_opt(
                "select revision from cqrs.projection_state where name = $1",
                &[&projection],
            )
            .await?
            .map(|row| row.get(0)))
    }

    /// Writes every row of `projection` changed after revision `mark`; returns how many.
    async fn write_changed_since(
        pg: &Client,
        cache: &Cache,
        projection: &str,
        mark: i64,
    ) -> Result<usize, RepairError> {
        // streamed, not collected: a read model can be larger than this process should hold
        let rows = pg
            .query_raw(
                "select key, rev, doc::text from cqrs.changed_since($1, $2)",
                [&projection as &(dyn tokio_postgres::types::ToSql + Sync), &mark],
            )
            .await?;
        pin_mut!(rows);
        let mut written = 0;
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
        Ok(written)
    }

    /// Resyncs `projection`: rewrites every cached key (stale rows, rows deleted meanwhile),
    /// then writes every row changed after the cache's synced mark, then raises the mark to the
    /// revision read before all that. `None` when the projection is gone.
    async fn resync(pg: &Client, cache: &Cache, projection: &str) -> Result<Option<usize>, RepairError> {
        let Some(revision) = revision(pg, projection).await? else {
            return Ok(None);
        };
        let cached = cache.keys_of(projection).await?;
        rewrite(pg, cache, projection, &cached).await?;
        let mark = cache.synced(projection).await?.unwrap_or(-1);
        let mut written = cached.len();
        if mark < revision {
            written += write_changed_since(pg, cache, projection, mark).await?;
        }
        cache.establish_synced(projection, revision).await?;
        Ok(Some(written))
    }

    /// Raises the synced mark of `projection` to its revision, writing first every row changed
    /// after the mark: batches whose rows reached the cache while a repair was under way could
    /// not raise it. A missing mark is left to a resync (only one may set it).
    async fn top_up(pg: &Client, cache: &Cache, projection: &str) -> Result<(), RepairError> {
        let Some(revision) = revision(pg, projection).await? else {
            return Ok(());
        };
        let Some(mark) = cache.synced(projection).await? else {
            return Ok(());
        };
        if mark < revision {
            let rows = write_changed_since(pg, cache, projection, mark).await?;
            cache.write_all(&[], &[(projection.to_owned(), revision)]).await?;
            tracing::debug!(%projection, rows, mark, revision, "raised the synced mark after a repair");
        }
        Ok(())
    }

    /// One pass over `work`; what could not be done is returned. Every projection repaired is
    /// topped up at the end, unless a resync of it was asked for meanwhile.
    async fn pass(
        pg: &Client,
        cache: &Cache,
        repairs: &Mutex<Repairs>,
        mut work: RepairWork,
    ) -> Result<(), RepairWork> {
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
            work.top_up.insert(projection);
        }
        while let Some((projection, keys)) = work.keys.pop_first() {
            let list: Vec<String> = keys.iter().cloned().collect();
            if let Err(err) = rewrite(pg, cache, &projection, &list).await {
                tracing::warn!(error = %err, %projection, "repairing cached rows failed; will retry");
                work.keys.insert(projection, keys);
                return Err(work);
            }
            tracing::info!(%projection, keys = list.len(), "repaired cached rows written while Redis was unreachable");
            work.top_up.insert(projection);
        }
        while let Some(projection) = work.top_up.first().cloned() {
            // a resync asked for since the work was taken: the cache may hold rows a rebuild
            // removed, which the rows changed since the mark do not show; that resync tops up
            let awaits_resync = repairs.lock().map_or(true, |r| r.awaits_resync(&projection));
            if !awaits_resync {
                if let Err(err) = top_up(pg, cache, &projection).await {
                    tracing::warn!(error = %err, %projection, "raising the synced mark failed; will retry");
                    return Err(work);
                }
            }
            work.top_up.remove(&projection);
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
                    Some(client) => pass(client, &cache, &repairs, work).await,
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
