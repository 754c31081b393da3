//! Comparing the Redis cache with the read models: every cached row equals its read-model row
//! and revision, every read-model row is cached, and the cache is marked synced up to the
//! projection's revision.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio_postgres::Client;

/// Cached entry: revision, kind, document.
type Entry = (i64, String, String);

/// A Redis URL, or the nodes of a Redis Cluster as `host:port,host:port,…` after `cluster:`
/// (see [`cluster_target`]).
fn connection(redis_url: &str) -> Result<Box<dyn redis::ConnectionLike>> {
    match redis_url.strip_prefix("cluster:") {
        None => Ok(Box::new(
            redis::Client::open(redis_url)?
                .get_connection()
                .context("connecting to Redis")?,
        )),
        Some(nodes) => {
            let urls: Vec<String> = nodes.split(',').map(|n| format!("redis://{n}/")).collect();
            Ok(Box::new(
                redis::cluster::ClusterClient::new(urls)?
                    .get_connection()
                    .context("connecting to the Redis Cluster")?,
            ))
        }
    }
}

/// What [`check`] takes for a Redis Cluster with these seed nodes (`host:port,…`).
pub fn cluster_target(seeds: &str) -> String {
    format!("cluster:{seeds}")
}

fn cached(redis_url: &str, prefix: &str, projection: &str) -> Result<HashMap<String, Entry>> {
    let mut connection = connection(redis_url)?;
    let connection = connection.as_mut();
    let pattern = format!("{prefix}:{projection}:*");
    // on a cluster the client asks every master and joins the answers
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(connection)?;
    let mut entries = HashMap::new();
    for key in keys {
        let (rev, kind, doc): (Option<i64>, Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("r")
            .arg("k")
            .arg("d")
            .query(connection)?;
        let read_model_key = key[pattern.len() - 1..].to_owned();
        entries.insert(
            read_model_key,
            (
                rev.unwrap_or(-1),
                kind.unwrap_or_default(),
                doc.unwrap_or_default(),
            ),
        );
    }
    Ok(entries)
}

/// Checks every projection's cache against its read model; the first difference is the error.
/// `redis_url` is a Redis URL or a [`cluster_target`].
pub async fn check(pg: &Client, redis_url: &str, prefix: &str) -> Result<()> {
    let projections = pg
        .query(
            "select p.name, format('select %I::text, %I, row_to_json(t)::text from %s t', p.key_column, p.rev_column, p.target), s.revision
               from cqrs.projection p join cqrs.projection_state s using (name) order by p.name",
            &[],
        )
        .await?;
    for projection in projections {
        let (name, query, revision): (String, String, i64) =
            (projection.get(0), projection.get(1), projection.get(2));
        let rows = pg.query(query.as_str(), &[]).await?;
        let mut cache = cached(redis_url, prefix, &name)?;
        for row in rows {
            let (key, rev, doc): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
            let Some((cached_rev, kind, cached_doc)) = cache.remove(&key) else {
                bail!("{name}/{key} (rev {rev}) is not cached");
            };
            if kind != "v" || cached_rev != rev {
                bail!("{name}/{key}: cached {kind} at rev {cached_rev}, the read model has rev {rev}");
            }
            let (a, b): (Value, Value) = (serde_json::from_str(&doc)?, serde_json::from_str(&cached_doc)?);
            if a != b {
                bail!("{name}/{key} rev {rev}: cached {cached_doc} but the read model has {doc}");
            }
        }
        let synced: Option<i64> = redis::cmd("HGET")
            .arg(format!("{prefix}!synced"))
            .arg(&name)
            .query(connection(redis_url)?.as_mut())?;
        if synced != Some(revision) {
            bail!("{name}: the cache is marked synced up to {synced:?}, the projection is at revision {revision}");
        }
        // what is left in the cache must not claim a row that is not there
        for (key, (rev, kind, _)) in cache {
            if kind == "v" {
                bail!("{name}/{key}: cached as a row (rev {rev}) but there is no such row");
            }
        }
    }
    Ok(())
}
