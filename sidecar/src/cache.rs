//! The Redis cache of read-model rows.
//!
//! Every write — from the projector, from a reader filling a miss, from a repair — goes through
//! one script that compares revisions: a revision at or below the cached one never overwrites
//! it, so an older row can never replace a newer one whatever the interleaving. A deleted row
//! leaves a short-lived tombstone (with the deleting revision) so that a slow reader cannot
//! bring it back; "no such row" is cached with revision 0, which any real row replaces.
//!
//! Entries are hashes: `r` revision, `k` kind (`v` row, `t` tombstone, `n` not found), `d` the
//! row as JSON (rows only).
//!
//! Beside the entries, the hash `{prefix}!synced` holds per projection the revision up to which
//! the cache has seen every change (set in the same pipeline as a batch's writes, after them).
//! A leader that takes over, or finds the hash gone (Redis lost its data), compares it with the
//! projection's revision and writes what the cache missed: the rows of a batch that committed
//! just before its leader died, or everything after a restart of Redis without persistence.

use std::path::Path;
use std::time::Duration;

use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// KEYS[1] key; ARGV[1] revision; ARGV[2] kind; ARGV[3] document; ARGV[4] time to live (ms);
/// ARGV[5] `1` when the row was just read from the read model, which may then replace an entry
/// of the same revision (its shape may have changed since: `ALTER TABLE` on the read model).
pub const WRITE_SCRIPT: &str = r"
local current = redis.call('HGET', KEYS[1], 'r')
if current then
  local cur, new = tonumber(current), tonumber(ARGV[1])
  if cur > new or (cur == new and ARGV[5] ~= '1') then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'k', ARGV[2], 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// KEYS[1] the synced hash; ARGV[1] projection; ARGV[2] revision; ARGV[3] `1` to set a mark
/// that is missing. Only ever raises a mark; only a resync (which has written everything) may
/// set a missing one — a batch's writes after Redis lost its data must not claim the rest.
pub const SYNCED_SCRIPT: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  if ARGV[3] ~= '1' then
    return 0
  end
elseif tonumber(current) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// What a cache entry says about a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The row, as JSON.
    Row(String),
    /// Deleted at this revision.
    Deleted,
    /// Looked up and not found (a negative cache entry, revision 0).
    Missing,
}

impl Entry {
    fn kind(&self) -> &'static str {
        match self {
            Entry::Row(_) => "v",
            Entry::Deleted => "t",
            Entry::Missing => "n",
        }
    }

    fn document(&self) -> &str {
        match self {
            Entry::Row(doc) => doc,
            _ => "",
        }
    }
}

/// One write of a row's state at a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub projection: String,
    pub key: String,
    pub rev: i64,
    pub entry: Entry,
}

/// How a synced mark moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marking {
    /// Raise an existing mark.
    Raise,
    /// Raise it, or set it when missing.
    Establish,
}

/// A cached entry as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub rev: i64,
    pub entry: Entry,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("Redis is unreachable: {0}")]
    Unreachable(String),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot read the Redis CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("a Redis CA file is set but the Redis URL is not rediss:// (TLS)")]
    CaWithoutTls,
    #[error(
        "the Redis prefix {prefix:?} holds the cache of another database ({owner}), not of this one ({ours}): \
         give each database its own --redis-prefix (or its own Redis); if that database is gone for good, \
         delete the key {prefix}!database"
    )]
    Foreign {
        prefix: String,
        owner: String,
        ours: String,
    },
}

impl CacheError {
    /// Whether the prefix belongs to another database (a misconfiguration, not an outage).
    pub fn is_foreign(&self) -> bool {
        matches!(self, CacheError::Foreign { .. })
    }
}

/// Time to live of entries of each kind.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    pub row: Duration,
    pub tombstone: Duration,
    pub missing: Duration,
}

pub struct Cache {
    client: redis::Client,
    /// Which database this cache is of (`system identifier/database oid/name`), once known: the
    /// prefix is claimed for it in Redis (`{prefix}!database`), so that two databases can never
    /// read each other's entries or marks.
    identity: std::sync::Mutex<Option<String>>,
    manager: Mutex<Option<ConnectionManager>>,
    last_attempt: Mutex<Option<Instant>>,
    script: redis::Script,
    synced_script: redis::Script,
    prefix: String,
    ttls: Ttls,
}

/// `{prefix}:{projection}:{key}`.
pub fn cache_key(prefix: &str, projection: &str, key: &str) -> String {
    format!("{prefix}:{projection}:{key}")
}

/// The read-model key of a cache key of `projection`, `None` for other keys.
pub fn read_model_key<'k>(prefix: &str, projection: &str, cache_key: &'k str) -> Option<&'k str> {
    cache_key
        .strip_prefix(prefix)?
        .strip_prefix(':')?
        .strip_prefix(projection)?
        .strip_prefix(':')
}

/// `ttl` shortened by up to 10% at random, so entries written together do not expire together.
fn jittered(ttl: Duration) -> u64 {
    let millis = ttl.as_millis().max(1) as u64;
    let jitter = rand::rng().random_range(0..=millis / 10);
    (millis - jitter).max(1)
}

/// How long to wait between attempts to connect while Redis is unreachable.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

impl Cache {
    pub fn new(url: &str, prefix: &str, ttls: Ttls) -> Result<Self, CacheError> {
        Self::with_roots(url, None, prefix, ttls)
    }

    /// Like [`Cache::new`]; a `rediss://` URL's server certificate is verified against the CA
    /// certificates in `ca_file` (PEM) instead of the roots built in (webpki-roots).
    pub fn with_roots(
        url: &str,
        ca_file: Option<&Path>,
        prefix: &str,
        ttls: Ttls,
    ) -> Result<Self, CacheError> {
        let client = match ca_file {
            None => redis::Client::open(url)?,
            Some(path) => {
                if !url.starts_with("rediss://") {
                    return Err(CacheError::CaWithoutTls);
                }
                let root_cert = std::fs::read(path).map_err(|err| CacheError::CaFile {
                    path: path.display().to_string(),
                    reason: err.to_string(),
                })?;
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )?
            }
        };
        Ok(Self {
            client,
            identity: std::sync::Mutex::new(None),
            manager: Mutex::new(None),
            last_attempt: Mutex::new(None),
            script: redis::Script::new(WRITE_SCRIPT),
            synced_script: redis::Script::new(SYNCED_SCRIPT),
            prefix: prefix.to_owned(),
            ttls,
        })
    }

    /// `host:port` of the server, for logs (never the password).
    pub fn describe(&self) -> String {
        self.client.get_connection_info().addr().to_string()
    }

    pub fn key(&self, projection: &str, key: &str) -> String {
        cache_key(&self.prefix, projection, key)
    }

    /// The hash of synced revisions.
    fn synced_key(&self) -> String {
        format!("{}!synced", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn ttls(&self) -> Ttls {
        self.ttls
    }

    /// A connection; connects (at most once a second) when there is none. Every command has a
    /// deadline: a dead Redis answers with an error, never a hang.
    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        let mut manager = self.manager.lock().await;
        if let Some(manager) = manager.as_ref() {
            return Ok(manager.clone());
        }
        {
            let mut last = self.last_attempt.lock().await;
            if last.is_some_and(|at| at.elapsed() < RECONNECT_EVERY) {
                return Err(CacheError::Unreachable("not reconnecting yet".into()));
            }
            *last = Some(Instant::now());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let created = tokio::time::timeout(
            Duration::from_secs(3),
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| CacheError::Unreachable("connecting timed out".into()))?
        .map_err(|err| CacheError::Unreachable(err.to_string()))?;
        self.claim(&mut created.clone()).await?;
        *manager = Some(created.clone());
        Ok(created)
    }

    fn claim_key(&self) -> String {
        format!("{}!database", self.prefix)
    }

    /// Claims the prefix for this cache's database, or finds it claimed for it already; refuses
    /// a prefix claimed for another. Nothing is claimed until the database is known.
    async fn claim(&self, connection: &mut ConnectionManager) -> Result<(), CacheError> {
        let Some(ours) = self.identity.lock().ok().and_then(|id| id.clone()) else {
            return Ok(());
        };
        let key = self.claim_key();
        for _ in 0..2 {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&ours)
                .arg("NX")
                .query_async(connection)
                .await?;
            if set.is_some() {
                return Ok(());
            }
            let owner: Option<String> = redis::cmd("GET").arg(&key).query_async(connection).await?;
            match owner {
                Some(owner) if owner == ours => return Ok(()),
                Some(owner) => {
                    return Err(CacheError::Foreign {
                        prefix: self.prefix.clone(),
                        owner,
                        ours,
                    })
                }
                // gone between the two: try again
                None => continue,
            }
        }
        Ok(())
    }

    /// Says which database this cache is of and claims the prefix for it (at start).
    pub async fn claim_for(&self, identity: String) -> Result<(), CacheError> {
        if let Ok(mut known) = self.identity.lock() {
            *known = Some(identity);
        }
        self.assert_claim().await
    }

    /// Claims the prefix again (the status poller, every few seconds: a Redis that lost its data
    /// lost the claim too); a prefix found claimed for another database drops the connection, so
    /// that nothing more is read or written under it.
    pub async fn assert_claim(&self) -> Result<(), CacheError> {
        let mut connection = self.connection().await?;
        let claimed = self.claim(&mut connection).await;
        if let Err(CacheError::Foreign { .. }) = &claimed {
            *self.manager.lock().await = None;
        }
        claimed
    }

    /// True when Redis answers PING.
    pub async fn ping(&self) -> bool {
        let Ok(mut connection) = self.connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .is_ok()
    }

    fn ttl(&self, entry: &Entry) -> u64 {
        match entry {
            Entry::Row(_) => jittered(self.ttls.row),
            Entry::Deleted => jittered(self.ttls.tombstone),
            Entry::Missing => jittered(self.ttls.missing),
        }
    }

    /// Writes all of `writes` through the script in one pipeline, then raises the synced mark
    /// of each `(projection, revision)` in `synced` that exists (Redis runs a connection's
    /// commands in order, so a mark only moves after the writes before it). Returns how many
    /// writes took effect (the others were older than what the cache holds).
    pub async fn write_all(&self, writes: &[Write], synced: &[(String, i64)]) -> Result<usize, CacheError> {
        self.write_marked(writes, synced, Marking::Raise, false).await
    }

    /// Writes rows just read from the read model (repairs and resyncs): like
    /// [`Cache::write_all`], except that an entry of the same revision is replaced too.
    pub async fn rewrite_all(&self, writes: &[Write]) -> Result<usize, CacheError> {
        self.write_marked(writes, &[], Marking::Raise, true).await
    }

    /// Sets the synced mark of `projection` to `rev`, also when it is missing: for a resync
    /// that has written every row changed after the old mark.
    pub async fn establish_synced(&self, projection: &str, rev: i64) -> Result<(), CacheError> {
        self.write_marked(&[], &[(projection.to_owned(), rev)], Marking::Establish, false)
            .await
            .map(|_| ())
    }

    async fn write_marked(
        &self,
        writes: &[Write],
        synced: &[(String, i64)],
        marking: Marking,
        from_read_model: bool,
    ) -> Result<usize, CacheError> {
        if writes.is_empty() && synced.is_empty() {
            return Ok(0);
        }
        let mut connection = self.connection().await?;
        let synced_key = self.synced_key();
        let pipeline = |load: bool| {
            let mut pipe = redis::pipe();
            if load {
                pipe.cmd("SCRIPT").arg("LOAD").arg(WRITE_SCRIPT).ignore();
                pipe.cmd("SCRIPT").arg("LOAD").arg(SYNCED_SCRIPT).ignore();
            }
            for write in writes {
                pipe.cmd("EVALSHA")
                    .arg(self.script.get_hash())
                    .arg(1)
                    .arg(self.key(&write.projection, &write.key))
                    .arg(write.rev)
                    .arg(write.entry.kind())
                    .arg(write.entry.document())
                    .arg(self.ttl(&write.entry))
                    .arg(if from_read_model { "1" } else { "0" });
            }
            for (projection, rev) in synced {
                pipe.cmd("EVALSHA")
                    .arg(self.synced_script.get_hash())
                    .arg(1)
                    .arg(&synced_key)
                    .arg(projection)
                    .arg(*rev)
                    .arg(if marking == Marking::Establish { "1" } else { "0" })
                    .ignore();
            }
            pipe
        };
        let applied: Result<Vec<i64>, redis::RedisError> = pipeline(false).query_async(&mut connection).await;
        let applied = match applied {
            // a restarted Redis has forgotten the scripts: load them and write again (writes are
            // idempotent: the revision check makes a repeated one a no-op)
            Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                pipeline(true).query_async(&mut connection).await?
            }
            other => other?,
        };
        Ok(applied.iter().filter(|a| **a == 1).count())
    }

    /// The revision up to which the cache has every change of `projection`; `None` when it has
    /// no mark (never synced, or Redis lost its data).
    pub async fn synced(&self, projection: &str) -> Result<Option<i64>, CacheError> {
        let mut connection = self.connection().await?;
        Ok(redis::cmd("HGET")
            .arg(self.synced_key())
            .arg(projection)
            .query_async(&mut connection)
            .await?)
    }

    /// Writes one entry (a reader filling a miss); true if it took effect.
    pub async fn write(&self, write: Write) -> Result<bool, CacheError> {
        Ok(self.write_all(std::slice::from_ref(&write), &[]).await? == 1)
    }

    /// The cached entry of a row, if any.
    pub async fn get(&self, projection: &str, key: &str) -> Result<Option<Cached>, CacheError> {
        let mut connection = self.connection().await?;
        let (rev, kind, doc): (Option<i64>, Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.key(projection, key))
            .arg("r")
            .arg("k")
            .arg("d")
            .query_async(&mut connection)
            .await?;
        Ok(match (rev, kind.as_deref()) {
            (Some(rev), Some("v")) => Some(Cached {
                rev,
                entry: Entry::Row(doc.unwrap_or_default()),
            }),
            (Some(rev), Some("t")) => Some(Cached {
                rev,
                entry: Entry::Deleted,
            }),
            (Some(rev), Some("n")) => Some(Cached {
                rev,
                entry: Entry::Missing,
            }),
            _ => None,
        })
    }

    /// Every cached read-model key of `projection` (for a full refresh).
    pub async fn keys_of(&self, projection: &str) -> Result<Vec<String>, CacheError> {
        let mut connection = self.connection().await?;
        let pattern = format!("{}*", escape_glob(&self.key(projection, "")));
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await?;
            keys.extend(
                batch
                    .iter()
                    .filter_map(|k| read_model_key(&self.prefix, projection, k))
                    .map(str::to_owned),
            );
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }
}

/// Escapes Redis glob characters.
fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let key = cache_key("cqrs", "order_summary", "order:1");
        assert_eq!(key, "cqrs:order_summary:order:1");
        assert_eq!(read_model_key("cqrs", "order_summary", &key), Some("order:1"));
        assert_eq!(read_model_key("cqrs", "order", &key), None);
        assert_eq!(read_model_key("other", "order_summary", &key), None);
    }

    #[test]
    fn ttl_jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let ms = jittered(Duration::from_secs(100));
            assert!((90_000..=100_000).contains(&ms), "{ms}");
        }
        assert_eq!(jittered(Duration::ZERO), 1);
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
