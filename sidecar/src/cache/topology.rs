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
                    .map(|connection| Connection::Cluster(connection, Arc::new(AtomicBool::new(false)))),
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
    Cluster(ClusterConnection, Arc<AtomicBool>),
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
            Connection::Cluster(_, broken) => broken.load(Ordering::Relaxed),
        }
    }

    fn note<T>(&self, answer: &RedisResult<T>) {
        if let (Connection::Cluster(_, broken), Err(err)) = (self, answer) {
            if connection_failed(err) {
                broken.store(true, Ordering::Relaxed);
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

    /// Runs `commands` (each of one key), returning each one's answer in order: one pipeline on
    /// a single server; concurrently, each to its slot's node, on a cluster.
    pub(super) async fn each(&mut self, commands: &[Cmd]) -> Vec<RedisResult<i64>> {
        match self {
            Connection::Single(connection) => {
                let mut pipe = redis::pipe();
                for command in commands {
                    pipe.add_command(command.clone());
                }
                match pipe.query_async::<Vec<i64>>(connection).await {
                    Ok(answers) => answers.into_iter().map(Ok).collect(),
                    Err(err) => commands.iter().map(|_| Err(err.clone())).collect(),
                }
            }
            Connection::Cluster(connection, _) => {
                let sends = commands.iter().map(|command| {
                    let mut connection = connection.clone();
                    async move { command.query_async::<i64>(&mut connection).await }
                });
                let answers = futures_util::future::join_all(sends).await;
                for answer in &answers {
                    self.note(answer);
                }
                answers
            }
        }
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
        let slots: Value = self.query(&redis::cmd("CLUSTER").arg("SLOTS").clone()).await?;
        Ok(slot_owners(&slots))
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

/// The masters in a `CLUSTER SLOTS` answer: each range is `[start, end, [host, port, id, …],
/// replicas…]`.
fn slot_owners(slots: &Value) -> Vec<(String, u16, String)> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(range) = range else { return None };
            let Some(Value::Array(master)) = range.get(2) else {
                return None;
            };
            let host: String = redis::from_redis_value_ref(master.first()?).ok()?;
            let port: u16 = redis::from_redis_value_ref(master.get(1)?).ok()?;
            let id: String = master
                .get(2)
                .and_then(|id| redis::from_redis_value_ref(id).ok())
                .unwrap_or_default();
            Some((host, port, id))
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
            slot_owners(&slots),
            vec![("127.0.0.1".to_owned(), 7000, "id-a".to_owned())]
        );
        assert_eq!(slot_owners(&Value::Nil), vec![]);
    }

    #[test]
    fn run_ids_are_found_in_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\ntcp_port:7000\r\n";
        assert_eq!(run_id(info), Some("abc123"));
        assert_eq!(run_id("# Server\r\n"), None);
    }
}
