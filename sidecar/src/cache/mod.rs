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

use std::collections::BTreeSet;

use rand::Rng;
use tokio::sync::Mutex;
use tokio::time::Instant;

use topology::{Connection, Master, Target};

mod topology;

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
    #[error("--redis-cluster-nodes names no node: give comma-separated host:port seeds")]
    NoSeeds,
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
    target: Target,
    /// Which database this cache is of (`system identifier/database oid/name`), once known: the
    /// prefix is claimed for it in Redis (`{prefix}!database`), so that two databases can never
    /// read each other's entries or marks.
    identity: std::sync::Mutex<Option<String>>,
    connection: Mutex<Option<Connection>>,
    last_attempt: Mutex<Option<Instant>>,
    /// A cluster's masters when last looked at (see [`Cache::lost_writes`]).
    masters: Mutex<Option<BTreeSet<Master>>>,
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

/// The seed nodes of a cluster as URLs: a bare `host:port` takes the scheme (`redis`/`rediss`),
/// the credentials and the `#insecure` mark of `url`; a seed given as a URL is used as it is.
pub fn cluster_seed_urls(url: &str, seeds: &str) -> Result<Vec<String>, CacheError> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let authority = rest.split(['/', '#', '?']).next().unwrap_or_default();
    let credentials = authority.rsplit_once('@').map(|(userinfo, _)| userinfo);
    let fragment = rest.split_once('#').map(|(_, fragment)| fragment);
    let urls: Vec<String> = seeds
        .split(',')
        .map(str::trim)
        .filter(|seed| !seed.is_empty())
        .map(|seed| {
            if seed.contains("://") {
                return seed.to_owned();
            }
            let mut url = format!("{scheme}://");
            if let Some(credentials) = credentials {
                url.push_str(credentials);
                url.push('@');
            }
            url.push_str(seed);
            url.push('/');
            if let Some(fragment) = fragment {
                url.push('#');
                url.push_str(fragment);
            }
            url
        })
        .collect();
    if urls.is_empty() {
        return Err(CacheError::NoSeeds);
    }
    Ok(urls)
}

fn read_root_cert(url_is_tls: bool, ca_file: Option<&Path>) -> Result<Option<Vec<u8>>, CacheError> {
    let Some(path) = ca_file else {
        return Ok(None);
    };
    if !url_is_tls {
        return Err(CacheError::CaWithoutTls);
    }
    std::fs::read(path).map(Some).map_err(|err| CacheError::CaFile {
        path: path.display().to_string(),
        reason: err.to_string(),
    })
}

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
        let root_cert = read_root_cert(url.starts_with("rediss://"), ca_file)?;
        Ok(Self::on(Target::single(url, root_cert)?, prefix, ttls))
    }

    /// A cache on the Redis Cluster reached through `seed_urls` (see [`cluster_seed_urls`]),
    /// TLS servers verified as in [`Cache::with_roots`].
    pub fn cluster(
        seed_urls: &[String],
        ca_file: Option<&Path>,
        prefix: &str,
        ttls: Ttls,
    ) -> Result<Self, CacheError> {
        let tls = seed_urls.iter().all(|url| url.starts_with("rediss://"));
        let root_cert = read_root_cert(tls, ca_file)?;
        Ok(Self::on(Target::cluster(seed_urls, root_cert)?, prefix, ttls))
    }

    fn on(target: Target, prefix: &str, ttls: Ttls) -> Self {
        Self {
            target,
            identity: std::sync::Mutex::new(None),
            connection: Mutex::new(None),
            last_attempt: Mutex::new(None),
            masters: Mutex::new(None),
            script: redis::Script::new(WRITE_SCRIPT),
            synced_script: redis::Script::new(SYNCED_SCRIPT),
            prefix: prefix.to_owned(),
            ttls,
        }
    }

    /// `host:port` of the server (or the cluster's seeds), for logs (never the password).
    pub fn describe(&self) -> String {
        self.target.describe()
    }

    /// Whether the cache is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.target.is_cluster()
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

    /// A connection; connects (at most once a second) when there is none.
    async fn connection(&self) -> Result<Connection, CacheError> {
        let mut connection = self.connection.lock().await;
        if let Some(connection) = connection.as_ref().filter(|c| !c.is_broken()) {
            return Ok(connection.clone());
        }
        {
            let mut last = self.last_attempt.lock().await;
            if last.is_some_and(|at| at.elapsed() < RECONNECT_EVERY) {
                return Err(CacheError::Unreachable("not reconnecting yet".into()));
            }
            *last = Some(Instant::now());
        }
        let mut created = self.target.connect().await?;
        self.claim(&mut created).await?;
        *connection = Some(created.clone());
        Ok(created)
    }

    fn claim_key(&self) -> String {
        format!("{}!database", self.prefix)
    }

    /// Claims the prefix for this cache's database, or finds it claimed for it already; refuses
    /// a prefix claimed for another. Nothing is claimed until the database is known.
    async fn claim(&self, connection: &mut Connection) -> Result<(), CacheError> {
        let Some(ours) = self.identity.lock().ok().and_then(|id| id.clone()) else {
            return Ok(());
        };
        let key = self.claim_key();
        for _ in 0..2 {
            let set: Option<String> = connection
                .query(redis::cmd("SET").arg(&key).arg(&ours).arg("NX"))
                .await?;
            if set.is_some() {
                return Ok(());
            }
            let owner: Option<String> = connection.query(redis::cmd("GET").arg(&key)).await?;
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
            *self.connection.lock().await = None;
        }
        claimed
    }

    /// True when Redis answers PING.
    pub async fn ping(&self) -> bool {
        let Ok(mut connection) = self.connection().await else {
            return false;
        };
        connection.query::<String>(&redis::cmd("PING")).await.is_ok()
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
        let entry_writes: Vec<(String, redis::Cmd)> = writes
            .iter()
            .map(|write| {
                let key = self.key(&write.projection, &write.key);
                let command = redis::cmd("EVALSHA")
                    .arg(self.script.get_hash())
                    .arg(1)
                    .arg(&key)
                    .arg(write.rev)
                    .arg(write.entry.kind())
                    .arg(write.entry.document())
                    .arg(self.ttl(&write.entry))
                    .arg(if from_read_model { "1" } else { "0" })
                    .clone();
                (key, command)
            })
            .collect();
        let marks: Vec<(String, redis::Cmd)> = synced
            .iter()
            .map(|(projection, rev)| {
                let command = redis::cmd("EVALSHA")
                    .arg(self.synced_script.get_hash())
                    .arg(1)
                    .arg(&synced_key)
                    .arg(projection)
                    .arg(*rev)
                    .arg(if marking == Marking::Establish { "1" } else { "0" })
                    .clone();
                (synced_key.clone(), command)
            })
            .collect();
        if self.target.is_cluster() {
            // the entries live on many nodes and the marks on one: a mark may only move once
            // every write before it was acknowledged, so the marks wait for the writes
            let applied = self.run(&mut connection, entry_writes).await?;
            self.run(&mut connection, marks).await?;
            Ok(applied)
        } else {
            // one server runs a connection's commands in order: the marks go in the same
            // pipeline, after the writes
            let count = entry_writes.len();
            let mut all = entry_writes;
            all.extend(marks);
            let applied = self.run_answers(&mut connection, all).await?;
            Ok(applied[..count].iter().filter(|a| **a == 1).count())
        }
    }

    /// Runs script calls, returning how many took effect (answered 1).
    async fn run(
        &self,
        connection: &mut Connection,
        commands: Vec<(String, redis::Cmd)>,
    ) -> Result<usize, CacheError> {
        let answers = self.run_answers(connection, commands).await?;
        Ok(answers.iter().filter(|a| **a == 1).count())
    }

    /// Runs script calls; a server that has forgotten the scripts (restarted, or a node that
    /// never ran them: a new master, a slot's new owner) gets them loaded and the calls that
    /// failed for it run again — writes are idempotent: the revision check makes a repeated one a
    /// no-op.
    async fn run_answers(
        &self,
        connection: &mut Connection,
        commands: Vec<(String, redis::Cmd)>,
    ) -> Result<Vec<i64>, CacheError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let no_script = |err: &redis::RedisError| {
            err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        };
        let mut answers = connection.each(&commands).await;
        if answers.iter().any(|answer| answer.as_ref().is_err_and(no_script)) {
            // routed to every node of a cluster by the client
            for script in [WRITE_SCRIPT, SYNCED_SCRIPT] {
                connection
                    .query::<redis::Value>(redis::cmd("SCRIPT").arg("LOAD").arg(script))
                    .await?;
            }
            let again: Vec<usize> = (0..answers.len())
                .filter(|i| answers[*i].as_ref().is_err_and(no_script))
                .collect();
            let retried = connection
                .each(&again.iter().map(|i| commands[*i].clone()).collect::<Vec<_>>())
                .await;
            for (i, answer) in again.into_iter().zip(retried) {
                answers[i] = answer;
            }
        }
        answers
            .into_iter()
            .map(|answer| answer.map_err(CacheError::from))
            .collect()
    }

    /// The revision up to which the cache has every change of `projection`; `None` when it has
    /// no mark (never synced, or Redis lost its data).
    pub async fn synced(&self, projection: &str) -> Result<Option<i64>, CacheError> {
        let mut connection = self.connection().await?;
        Ok(connection
            .query(redis::cmd("HGET").arg(self.synced_key()).arg(projection))
            .await?)
    }

    /// Writes one entry (a reader filling a miss); true if it took effect.
    pub async fn write(&self, write: Write) -> Result<bool, CacheError> {
        Ok(self.write_all(std::slice::from_ref(&write), &[]).await? == 1)
    }

    /// The cached entry of a row, if any.
    pub async fn get(&self, projection: &str, key: &str) -> Result<Option<Cached>, CacheError> {
        let mut connection = self.connection().await?;
        let (rev, kind, doc): (Option<i64>, Option<String>, Option<String>) = connection
            .query(
                redis::cmd("HMGET")
                    .arg(self.key(projection, key))
                    .arg("r")
                    .arg("k")
                    .arg("d"),
            )
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
        let keys = connection.scan(&pattern).await?;
        Ok(keys
            .iter()
            .filter_map(|k| read_model_key(&self.prefix, projection, k))
            .map(str::to_owned)
            .collect())
    }

    /// Whether a master of the cluster may have lost acknowledged writes since the last look: a
    /// replica was promoted (replication is asynchronous: its master's last writes may not have
    /// reached it) or a master restarted (empty, without persistence). The synced marks are then
    /// dropped, so that every projection's cache is resynced from the start (see the status
    /// poller); the first look, and a single server, say nothing (a single server that restarts
    /// empty loses its marks with everything else).
    pub async fn lost_writes(&self) -> Result<bool, CacheError> {
        if !self.target.is_cluster() {
            return Ok(false);
        }
        let mut connection = self.connection().await?;
        let Some(now) = connection.masters().await? else {
            return Ok(false);
        };
        let mut seen = self.masters.lock().await;
        let lost = seen
            .as_ref()
            .is_some_and(|before| topology::gained_a_master(before, &now));
        if lost {
            connection
                .query::<i64>(redis::cmd("DEL").arg(self.synced_key()))
                .await?;
        }
        *seen = Some(now);
        Ok(lost)
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
    fn cluster_seeds_take_the_scheme_and_credentials_of_the_url() {
        let urls = cluster_seed_urls(
            "rediss://app:s3cret@ignored:6379/#insecure",
            "10.0.0.1:7000, 10.0.0.2:7001",
        )
        .expect("seeds");
        assert_eq!(
            urls,
            vec![
                "rediss://app:s3cret@10.0.0.1:7000/#insecure",
                "rediss://app:s3cret@10.0.0.2:7001/#insecure"
            ]
        );
        let urls = cluster_seed_urls("redis://127.0.0.1:6379/", "a:1,redis://:pw@b:2/").expect("seeds");
        assert_eq!(urls, vec!["redis://a:1/", "redis://:pw@b:2/"]);
        assert!(matches!(
            cluster_seed_urls("redis://x/", " , "),
            Err(CacheError::NoSeeds)
        ));
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
