//! Where the cache lives: one Redis server (the default) or a Redis Cluster.
//!
//! Every command the cache sends names one key, so every script call touches one hash slot; the
//! cluster client (the `redis` crate's `cluster-async`) routes each to its slot's master and
//! follows MOVED and ASK (a reshard in progress) and failovers (it re-reads the slot map when a
//! node stops answering). A cluster pipeline may only hold one slot, so a batch's writes go out
//! as concurrent single commands instead: the client keeps one multiplexed connection per node,
//! which puts the commands that arrive together on the wire together — a pipeline per node.
//!
//! What the client cannot know is whether a node lost acknowledged writes: a master killed
//! before its replica copied the last writes (replication is asynchronous), or restarted empty.
//! [`Connection::masters`] fingerprints the masters (node id and the server's run id, which a
//! restart changes), and the cache resyncs when a new one appears (see `Cache::lost_writes`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, RedisError, RedisResult, Value};

use super::CacheError;

/// How to reach the cache (one per process: the size difference of the variants costs nothing).
#[allow(clippy::large_enum_variant)]
pub(super) enum Target {
    Single(redis::Client),
    Cluster {
        client: ClusterClient,
        /// `host:port` of the seed nodes, for logs
        seeds: Vec<String>,
    },
}

/// A master of the cluster: where it listens, its node id, and its run id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Master {
    pub(super) id: String,
    pub(super) run_id: String,
}

impl Target {
    /// One Redis at `url`, its server verified against `root_cert` (PEM) when given.
    pub(super) fn single(url: &str, root_cert: Option<Vec<u8>>) -> Result<Self, CacheError> {
        let client = match root_cert {
            None => redis::Client::open(url)?,
            Some(root_cert) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?,
        };
        Ok(Target::Single(client))
    }

    /// A Redis Cluster known by its seed nodes' URLs (every node is found from them).
    pub(super) fn cluster(seed_urls: &[String], root_cert: Option<Vec<u8>>) -> Result<Self, CacheError> {
        let mut builder = ClusterClientBuilder::new(seed_urls.iter().map(String::as_str))
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(2))
            // a failover takes the cluster's node timeout and an election: retry across it, but
            // give up within the deadline of one flush (the rows are then repaired)
            .retries(4)
            .min_retry_wait(100)
            .max_retry_wait(1_000)
            .overall_response_timeout(Some(Duration::from_secs(5)));
        if let Some(root_cert) = root_cert {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            });
        }
        let seeds = seed_urls.iter().filter_map(|url| addr_of(url)).collect();
        Ok(Target::Cluster {
            client: builder.build()?,
            seeds,
        })
    }

    /// `host:port` of the server or the seeds, for logs (never the password).
    pub(super) fn describe(&self) -> String {
        match self {
            Target::Single(client) => client.get_connection_info().addr().to_string(),
            Target::Cluster { seeds, .. } => format!("cluster {}", seeds.join(",")),
        }
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster { .. })
    }

    /// Connects; every command then has a deadline: a dead Redis answers with an error, never a
    /// hang.
    pub(super) async fn connect(&self) -> Result<Connection, CacheError> {
        let connecting = async {
            match self {
                Target::Single(client) => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(Duration::from_secs(1)))
                        .set_response_timeout(Some(Duration::from_secs(2)))
                        .set_number_of_retries(1)
                        .set_max_delay(Duration::from_millis(500));
                    ConnectionManager::new_with_config(client.clone(), config)
                        .await
                        .map(Connection::Single)
                }
                Target::Cluster { client, .. } => client
                    .get_async_connection()
                    .await
                    .map(|connection| Connection::Cluster(connection, Arc::default())),
            }
        };
        tokio::time::timeout(Duration::from_secs(3), connecting)
            .await
            .map_err(|_| CacheError::Unreachable("connecting timed out".into()))?
            .map_err(|err| CacheError::Unreachable(err.to_string()))
    }
}

/// `host:port` of a URL.
fn addr_of(url: &str) -> Option<String> {
    redis::IntoConnectionInfo::into_connection_info(url)
        .ok()
        .map(|info| info.addr().to_string())
}

/// A connection to the cache.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    /// With a flag raised once the connection failed in a way that a new one may mend: the
    /// cluster client was seen stuck after a failover (every command timing out while the
    /// cluster was healthy again), so a failed one is replaced rather than trusted to recover.
    Cluster(ClusterConnection, Arc<ClusterState>),
}

/// What the connections to one cluster share.
#[derive(Default)]
pub(super) struct ClusterState {
    broken: AtomicBool,
    /// which master serves which slots, as last read (`CLUSTER SLOTS`); dropped whenever a
    /// pipeline finds it wrong
    owners: std::sync::Mutex<Option<Arc<SlotOwners>>>,
}

/// `(first slot, last slot, host, port)` of every range, by first slot.
type SlotOwners = Vec<(u16, u16, String, u16)>;

/// How many hash slots a Redis Cluster has.
const SLOTS: u16 = 16_384;

/// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag (the text between the
/// first `{` and the next `}`, when not empty), modulo 16384 — as Redis Cluster defines it.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

/// The node serving `slot`.
fn owner_of(owners: &SlotOwners, slot: u16) -> Option<(&str, u16)> {
    let i = owners
        .partition_point(|(first, _, _, _)| *first <= slot)
        .checked_sub(1)?;
    let (_, last, host, port) = &owners[i];
    (slot <= *last).then_some((host.as_str(), *port))
}

/// Whether `err` says the connection (not the command) failed.
fn connection_failed(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_cluster_error()
        || err.is_unrecoverable_error()
}

impl Connection {
    /// Whether this connection should be replaced (see [`Connection::Cluster`]); a single
    /// server's connection manager reconnects by itself.
    pub(super) fn is_broken(&self) -> bool {
        match self {
            Connection::Single(_) => false,
            Connection::Cluster(_, state) => state.broken.load(Ordering::Relaxed),
        }
    }

    fn note<T>(&self, answer: &RedisResult<T>) {
        if let (Connection::Cluster(_, state), Err(err)) = (self, answer) {
            if connection_failed(err) {
                state.broken.store(true, Ordering::Relaxed);
            }
        }
    }

    pub(super) async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        let answer = match self {
            Connection::Single(connection) => cmd.query_async(connection).await,
            Connection::Cluster(connection, _) => cmd.query_async(connection).await,
        };
        self.note(&answer);
        answer
    }

    async fn route(&mut self, cmd: Cmd, routing: SingleNodeRoutingInfo) -> RedisResult<Value> {
        let Connection::Cluster(connection, _) = self else {
            return self.query(&cmd).await;
        };
        let answer = connection
            .route_command(cmd, RoutingInfo::SingleNode(routing))
            .await;
        self.note(&answer);
        answer
    }

    /// Runs `commands` (each names one key, given beside it), returning each one's answer in
    /// order: one pipeline on a single server; on a cluster, one pipeline per master, sent to
    /// the masters at once (see [`Connection::per_node`]).
    pub(super) async fn each(&mut self, commands: &[(String, Cmd)]) -> Vec<RedisResult<i64>> {
        match self {
            Connection::Single(connection) => {
                let mut pipe = redis::pipe();
                for (_, command) in commands {
                    pipe.add_command(command.clone());
                }
                match pipe.query_async::<Vec<i64>>(connection).await {
                    Ok(answers) => answers.into_iter().map(Ok).collect(),
                    Err(err) => commands.iter().map(|_| Err(err.clone())).collect(),
                }
            }
            Connection::Cluster(..) => {
                let mut answers = self.per_node(commands).await;
                // what a pipeline could not place (a slot moved, a node gone, no slot map) goes
                // again one command at a time, routed by the client, which follows MOVED and ASK
                let again: Vec<usize> = (0..answers.len())
                    .filter(|i| {
                        answers[*i]
                            .as_ref()
                            .is_none_or(|answer| answer.as_ref().is_err_and(misplaced))
                    })
                    .collect();
                if !again.is_empty() {
                    let retried = self.one_by_one(again.iter().map(|i| &commands[*i].1)).await;
                    for (i, answer) in again.into_iter().zip(retried) {
                        answers[i] = Some(answer);
                    }
                }
                answers
                    .into_iter()
                    .map(|answer| {
                        answer.unwrap_or_else(|| Err(RedisError::from((redis::ErrorKind::Io, "no answer"))))
                    })
                    .collect()
            }
        }
    }

    /// Commands sent singly and concurrently, each routed by the cluster client.
    async fn one_by_one<'c>(&mut self, commands: impl Iterator<Item = &'c Cmd>) -> Vec<RedisResult<i64>> {
        let Connection::Cluster(connection, _) = self else {
            return Vec::new();
        };
        let sends = commands.map(|command| {
            let mut connection = connection.clone();
            async move { command.query_async::<i64>(&mut connection).await }
        });
        let answers = futures_util::future::join_all(sends).await;
        for answer in &answers {
            self.note(answer);
        }
        answers
    }

    /// One pipeline per master, by the slot map (read when there is none): the per-command
    /// routing inside the cluster client cost half the write throughput of one server. `None`
    /// for a command no pipeline answered; a wrong slot map shows as MOVED answers, and is
    /// dropped then, to be read again.
    async fn per_node(&mut self, commands: &[(String, Cmd)]) -> Vec<Option<RedisResult<i64>>> {
        let mut answers: Vec<Option<RedisResult<i64>>> = commands.iter().map(|_| None).collect();
        let Some(owners) = self.slot_map().await else {
            return answers;
        };
        let Connection::Cluster(connection, state) = self else {
            return answers;
        };
        let mut by_node: std::collections::HashMap<(&str, u16), Vec<usize>> =
            std::collections::HashMap::new();
        for (i, (key, _)) in commands.iter().enumerate() {
            if let Some(node) = owner_of(&owners, key_slot(key.as_bytes())) {
                by_node.entry(node).or_default().push(i);
            }
        }
        let sends = by_node.into_iter().map(|((host, port), indexes)| {
            let mut connection = connection.clone();
            let mut pipe = redis::pipe();
            for i in &indexes {
                pipe.add_command(commands[*i].1.clone());
            }
            let routing = SingleNodeRoutingInfo::ByAddress {
                host: host.to_owned(),
                port,
            };
            async move {
                let count = indexes.len();
                (indexes, connection.route_pipeline(pipe, 0, count, routing).await)
            }
        });
        let mut map_wrong = false;
        for (indexes, answered) in futures_util::future::join_all(sends).await {
            match answered {
                Ok(values) if values.len() == indexes.len() => {
                    for (i, value) in indexes.into_iter().zip(values) {
                        let answer = match value {
                            Value::Int(n) => Ok(n),
                            Value::ServerError(err) => Err(RedisError::from(err)),
                            other => redis::from_redis_value(other).map_err(RedisError::from),
                        };
                        map_wrong |= answer.as_ref().is_err_and(misplaced);
                        answers[i] = Some(answer);
                    }
                }
                // a node gone, or an answer that does not fit: these go again one by one
                _ => map_wrong = true,
            }
        }
        if map_wrong {
            if let Ok(mut owners) = state.owners.lock() {
                *owners = None;
            }
        }
        answers
    }

    /// The slot map, read from the cluster when there is none.
    async fn slot_map(&mut self) -> Option<Arc<SlotOwners>> {
        let Connection::Cluster(_, state) = self else {
            return None;
        };
        if let Some(owners) = state.owners.lock().ok().and_then(|owners| owners.clone()) {
            return Some(owners);
        }
        let state = Arc::clone(state);
        let mut owners: SlotOwners = self
            .slot_ranges()
            .await
            .ok()?
            .into_iter()
            .map(|(first, last, host, port, _)| (first, last, host, port))
            .collect();
        owners.sort_by_key(|(first, ..)| *first);
        let owners = Arc::new(owners);
        if let Ok(mut kept) = state.owners.lock() {
            *kept = Some(Arc::clone(&owners));
        }
        Some(owners)
    }

    /// Every key matching `pattern`, from every master of a cluster.
    pub(super) async fn scan(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        let nodes = match self {
            Connection::Single(_) => vec![None],
            Connection::Cluster(..) => self
                .slot_owners()
                .await?
                .into_iter()
                .map(|(host, port, _)| Some((host, port)))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        let mut keys = Vec::new();
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
                let (next, batch): (u64, Vec<String>) = match &node {
                    Some((host, port)) => {
                        let routing = SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        };
                        redis::from_redis_value(self.route(scan, routing).await?)?
                    }
                    None => self.query(&scan).await?,
                };
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(keys)
    }

    /// `(host, port, node id)` of the master of every slot range (`CLUSTER SLOTS`).
    async fn slot_owners(&mut self) -> RedisResult<Vec<(String, u16, String)>> {
        Ok(self
            .slot_ranges()
            .await?
            .into_iter()
            .map(|(_, _, host, port, id)| (host, port, id))
            .collect())
    }

    /// Every slot range with its master: `(first, last, host, port, node id)`.
    async fn slot_ranges(&mut self) -> RedisResult<Vec<(u16, u16, String, u16, String)>> {
        let slots: Value = self.query(&redis::cmd("CLUSTER").arg("SLOTS").clone()).await?;
        Ok(slot_ranges(&slots))
    }

    /// The cluster's masters with their run ids; `None` on a single server.
    pub(super) async fn masters(&mut self) -> RedisResult<Option<BTreeSet<Master>>> {
        if matches!(self, Connection::Single(_)) {
            return Ok(None);
        }
        let owners = self.slot_owners().await?;
        let mut masters = BTreeSet::new();
        for (host, port, id) in owners.into_iter().collect::<BTreeSet<_>>() {
            let info = self
                .route(
                    redis::cmd("INFO").arg("server").clone(),
                    SingleNodeRoutingInfo::ByAddress { host, port },
                )
                .await?;
            let info: String = redis::from_redis_value(info)?;
            masters.insert(Master {
                id,
                run_id: run_id(&info).unwrap_or_default().to_owned(),
            });
        }
        Ok(Some(masters))
    }
}

/// Whether a command's error says it went to the wrong node (or none could take it): it is
/// then sent again through the client's routing.
fn misplaced(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        redis::ErrorKind::Server(
            redis::ServerErrorKind::Moved
                | redis::ServerErrorKind::Ask
                | redis::ServerErrorKind::TryAgain
                | redis::ServerErrorKind::ClusterDown
                | redis::ServerErrorKind::MasterDown
        )
    ) || connection_failed(err)
}

/// The ranges of a `CLUSTER SLOTS` answer with their masters: each range is `[start, end,
/// [host, port, id, …], replicas…]`.
fn slot_ranges(slots: &Value) -> Vec<(u16, u16, String, u16, String)> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(range) = range else { return None };
            let first: u16 = redis::from_redis_value_ref(range.first()?).ok()?;
            let last: u16 = redis::from_redis_value_ref(range.get(1)?).ok()?;
            let Some(Value::Array(master)) = range.get(2) else {
                return None;
            };
            let host: String = redis::from_redis_value_ref(master.first()?).ok()?;
            let port: u16 = redis::from_redis_value_ref(master.get(1)?).ok()?;
            let id: String = master
                .get(2)
                .and_then(|id| redis::from_redis_value_ref(id).ok())
                .unwrap_or_default();
            Some((first, last, host, port, id))
        })
        .collect()
}

/// `run_id` from an `INFO server` answer.
fn run_id(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(str::trim)
}

/// Whether `now` has a master that `before` did not (a replica promoted, a master restarted):
/// that master may lack writes its predecessor acknowledged. Masters that left (their slots
/// moved away whole) lose nothing.
pub(super) fn gained_a_master(before: &BTreeSet<Master>, now: &BTreeSet<Master>) -> bool {
    now.iter().any(|master| !before.contains(master))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(id: &str, run: &str) -> Master {
        Master {
            id: id.into(),
            run_id: run.into(),
        }
    }

    #[test]
    fn a_promoted_or_restarted_master_counts_a_moved_slot_does_not() {
        let before: BTreeSet<_> = [master("a", "1"), master("b", "2")].into();
        assert!(!gained_a_master(&before, &before.clone()));
        assert!(gained_a_master(
            &before,
            &[master("a", "1"), master("c", "3")].into()
        ));
        assert!(gained_a_master(
            &before,
            &[master("a", "1"), master("b", "9")].into()
        ));
        assert!(!gained_a_master(&before, &[master("a", "1")].into()));
    }

    #[test]
    fn cluster_slots_answers_are_read() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let slots = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id-a")]),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7003), bulk("id-d")]),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922)]),
        ]);
        assert_eq!(
            slot_ranges(&slots),
            vec![(0, 5460, "127.0.0.1".to_owned(), 7000, "id-a".to_owned())]
        );
        assert_eq!(slot_ranges(&Value::Nil), vec![]);
    }

    #[test]
    fn key_slots_are_redis_clusters() {
        // the examples of the Redis Cluster specification and `CLUSTER KEYSLOT`
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(
            key_slot(b"foo{}{bar}"),
            key_slot(b"foo{}{bar}"),
            "an empty tag hashes the whole key"
        );
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn slots_find_their_masters() {
        let owners: SlotOwners = vec![
            (0, 5460, "a".into(), 1),
            (5461, 10922, "b".into(), 2),
            (10923, 16383, "c".into(), 3),
        ];
        assert_eq!(owner_of(&owners, 0), Some(("a", 1)));
        assert_eq!(owner_of(&owners, 5461), Some(("b", 2)));
        assert_eq!(owner_of(&owners, 16383), Some(("c", 3)));
        let gap: SlotOwners = vec![(100, 200, "a".into(), 1)];
        assert_eq!(owner_of(&gap, 50), None);
        assert_eq!(owner_of(&gap, 201), None);
    }

    #[test]
    fn run_ids_are_found_in_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\ntcp_port:7000\r\n";
        assert_eq!(run_id(info), Some("abc123"));
        assert_eq!(run_id("# Server\r\n"), None);
    }
}
