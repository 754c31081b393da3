//! Writing what the projector changed to the cache: the rows a batch changed, with each
//! projection's synced mark, and resyncing projections whose cache may be behind.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::cache::{Entry, Write};
use crate::leading::Context;
use crate::metrics::label;

/// Writes changed rows to the cache and raises the synced mark of each projection whose cache
/// has nothing else pending (the others are topped up after their repair); rows that could not
/// be written are remembered for repair.
pub async fn write_to_cache(ctx: &Context, writes: Vec<Write>) {
    if writes.is_empty() {
        return;
    }
    let mut highest: HashMap<&str, i64> = HashMap::new();
    for write in &writes {
        let rev = highest.entry(write.projection.as_str()).or_insert(write.rev);
        *rev = (*rev).max(write.rev);
    }
    let synced: Vec<(String, i64)> = match ctx.repairs.lock() {
        Ok(mut repairs) => repairs.marks_to_raise(highest),
        Err(_) => Vec::new(),
    };
    match ctx.cache.write_all(&writes, &synced).await {
        Ok(applied) => {
            ctx.metrics
                .cache_writes
                .with_label_values(&[label::CACHE_APPLIED])
                .inc_by(applied as u64);
            ctx.metrics
                .cache_writes
                .with_label_values(&[label::CACHE_STALE])
                .inc_by((writes.len() - applied) as u64);
        }
        Err(err) => {
            tracing::warn!(error = %err, rows = writes.len(), "cache write failed; the rows will be repaired when Redis answers");
            ctx.metrics
                .cache_writes
                .with_label_values(&[label::CACHE_FAILED])
                .inc_by(writes.len() as u64);
            if let Ok(mut repairs) = ctx.repairs.lock() {
                for write in &writes {
                    repairs.remember(&write.projection, &write.key);
                }
                ctx.metrics
                    .cache_repair_pending
                    .set(repairs.pending_keys() as i64);
            }
        }
    }
}

/// Marks for a resync every projection whose cache may be behind its read model: its synced
/// mark is below the projection's revision (the last leader died between a commit and its cache
/// writes) or missing (a cold or emptied Redis). Unknown when Redis is down: resync then too.
pub async fn resync_behind(ctx: &Context, sql: &Client) -> Result<(), tokio_postgres::Error> {
    let rows = sql
        .query(
            "select s.name, s.revision from cqrs.projection_state s join cqrs.projection p on p.name = s.name
              where p.projection_group = $1 order by s.name",
            &[&ctx.config.projection_group],
        )
        .await?;
    for row in rows {
        let (projection, revision): (String, i64) = (row.get(0), row.get(1));
        let behind = match ctx.cache.synced(&projection).await {
            Ok(Some(mark)) => mark < revision,
            // nothing was ever projected: there is nothing the cache could miss
            Ok(None) if revision == 0 => ctx.cache.establish_synced(&projection, 0).await.is_err(),
            Ok(None) => true,
            Err(_) => true,
        };
        if behind {
            if let Ok(mut repairs) = ctx.repairs.lock() {
                if !repairs.is_pending(&projection) {
                    tracing::info!(%projection, revision, "the cache may be behind the read model; resyncing it");
                    repairs.refresh_all(&projection);
                }
            }
        }
    }
    Ok(())
}

/// Changed rows as returned by project_batch / catch_up, as cache writes.
pub(crate) fn writes_from(rows: &[tokio_postgres::Row]) -> Vec<Write> {
    rows.iter()
        .map(|row| {
            let deleted: bool = row.get(4);
            let doc: Option<String> = row.get(3);
            Write {
                projection: row.get(0),
                key: row.get(1),
                rev: row.get(2),
                entry: match (deleted, doc) {
                    (false, Some(doc)) => Entry::Row(doc),
                    _ => Entry::Deleted,
                },
            }
        })
        .collect()
}
