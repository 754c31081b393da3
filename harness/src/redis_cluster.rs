//! A private six-node Redis Cluster (three masters, one replica each) on loopback, without
//! persistence: `redis-server --cluster-enabled yes` × 6 and `redis-cli --cluster create`, as an
//! operator builds one. Nodes can be killed and started again on their ports (with their node
//! ids: each keeps its `nodes.conf`), slots resharded, the whole cluster stopped.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::ChildGuard;

/// How long a node may be unreachable before the cluster fails it over (redis.conf's
/// `cluster-node-timeout`; the default 15 s would make every failover test slow).
pub const NODE_TIMEOUT: Duration = Duration::from_millis(2_000);

pub struct RedisCluster {
    dir: PathBuf,
    ports: Vec<u16>,
    nodes: Vec<Option<ChildGuard>>,
}

/// A port whose cluster bus port (port + 10000) is free too.
fn free_node_port(taken: &[u16]) -> Result<u16> {
    for _ in 0..200 {
        let port = rand::random_range(20_000..30_000);
        if taken.contains(&port) {
            continue;
        }
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return Ok(port);
        }
    }
    bail!("no free port pair (port, port + 10000) for a Redis Cluster node")
}

impl RedisCluster {
    /// Starts six nodes and joins them into a cluster; returns once every node says
    /// `cluster_state:ok`.
    pub fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "pg_cqrs-redis-cluster-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ports = Vec::new();
        for _ in 0..6 {
            ports.push(free_node_port(&ports)?);
        }
        let mut cluster = Self {
            dir,
            nodes: ports.iter().map(|_| None).collect(),
            ports,
        };
        for node in 0..6 {
            cluster.start_node(node)?;
        }
        let addresses: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Starts node `node` on its port, in its own directory (its `nodes.conf` is kept there).
    pub fn start_node(&mut self, node: usize) -> Result<()> {
        let port = self.ports[node];
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("redis-server")
            .args(crate::redis::EPHEMERAL_ON_LOOPBACK)
            .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
            // a replica that has not finished its first sync cannot be promoted: start the sync
            // at once (the default waits 5 s for more replicas)
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--cluster-node-timeout")
            .arg(NODE_TIMEOUT.as_millis().to_string())
            .arg("--dir")
            .arg(&dir)
            .arg("--port")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        self.nodes[node] = Some(ChildGuard::new(format!("redis-cluster-{port}"), child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(node, &["PING"]).ok().as_deref() != Some("PONG") {
            if Instant::now() > deadline {
                bail!("redis cluster node on port {port} not ready");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGKILL node `node` (start it again with [`RedisCluster::start_node`]).
    pub fn kill_node(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].take() {
            child.kill();
        }
    }

    /// Seed nodes as `--redis-cluster-nodes` takes them.
    pub fn seeds(&self) -> String {
        let seeds: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        seeds.join(",")
    }

    /// URLs of every node, for clients.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// Runs one redis-cli command against node `node`.
    pub fn cli(&self, node: usize, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.ports[node].to_string())
            .args(args)
            .output()
            .context("running redis-cli")?;
        if !out.status.success() {
            bail!("redis-cli failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// Runs one redis-cli command for a key, following the cluster's redirections (`-c`) to
    /// the node that holds it.
    pub fn cli_for_key(&self, args: &[&str]) -> Result<String> {
        let node = (0..self.ports.len())
            .find(|node| self.nodes[*node].is_some())
            .context("no node of the cluster runs")?;
        self.cli(node, &[&["-c"], args].concat())
    }

    /// Indexes of the running nodes that are masters.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.ports.len())
            .filter(|node| self.nodes[*node].is_some())
            .filter(|node| {
                self.cli(*node, &["ROLE"])
                    .is_ok_and(|role| role.lines().next() == Some("master"))
            })
            .collect()
    }

    /// The node id of node `node`.
    pub fn node_id(&self, node: usize) -> Result<String> {
        self.cli(node, &["CLUSTER", "MYID"])
    }

    /// Moves `slots` hash slots from master `from` to master `to` (`redis-cli --cluster
    /// reshard`), keys and all, while clients go on.
    pub fn reshard(&self, from: usize, to: usize, slots: u32) -> Result<()> {
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("reshard")
            .arg(format!("127.0.0.1:{}", self.ports[from]))
            .args(["--cluster-from", &self.node_id(from)?])
            .args(["--cluster-to", &self.node_id(to)?])
            .args(["--cluster-slots", &slots.to_string()])
            .args(["--cluster-yes", "--cluster-pipeline", "100"])
            .output()
            .context("running redis-cli --cluster reshard")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster reshard failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Waits until every running node says `cluster_state:ok`, three masters serve the slots and
    /// every replica is in sync with its master (only then can it be promoted).
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = (0..self.ports.len())
                .filter(|node| self.nodes[*node].is_some())
                .all(|node| {
                    self.cli(node, &["CLUSTER", "INFO"])
                        .is_ok_and(|info| info.contains("cluster_state:ok"))
                        && self.cli(node, &["INFO", "replication"]).is_ok_and(|info| {
                            info.contains("role:master") || info.contains("master_link_status:up")
                        })
                });
            if ok && self.masters().len() >= 3 {
                return Ok(());
            }
            if Instant::now() > deadline {
                let states: Vec<String> = (0..self.ports.len())
                    .map(|node| match &self.nodes[node] {
                        None => format!("{}: not running", self.ports[node]),
                        Some(_) => format!(
                            "{}: {}",
                            self.ports[node],
                            self.cli(node, &["CLUSTER", "NODES"]).unwrap_or_default()
                        ),
                    })
                    .collect();
                bail!(
                    "the Redis Cluster is not healthy after {timeout:?}:\n{}",
                    states.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in 0..self.nodes.len() {
            self.kill_node(node);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
