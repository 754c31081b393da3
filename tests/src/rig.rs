//! A whole deployment for the sidecar tests: a private PostgreSQL cluster with the extension
//! and the example order projections, a private redis-server, and sidecar processes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cqrs_harness::{ClusterOptions, PgCluster, RedisServer, Sidecar};
use tokio_postgres::Client;

use crate::orders::assert_read_models_match_the_log;
use crate::{cache_check, caught_up, connect, eventually, repo_root};

/// Key prefix the sidecars of a rig write under.
pub const PREFIX: &str = "cqrs";

pub struct Rig {
    pub pg: PgCluster,
    pub redis: RedisServer,
    pub sidecars: Vec<Sidecar>,
    started: usize,
    /// `CQRS_*` settings every sidecar of this rig gets.
    settings: Vec<(String, String)>,
}

impl Rig {
    /// PostgreSQL with the example projections and Redis; no sidecar yet.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Like [`Rig::start`], with extra `postgresql.conf` lines.
    pub async fn start_with(settings: &[&str]) -> Result<Self> {
        let pg = PgCluster::start(ClusterOptions {
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            ..ClusterOptions::default()
        })?;
        let client = connect(&pg.url()).await?;
        client
            .batch_execute(&std::fs::read_to_string(
                repo_root().join("sql/examples/orders.sql"),
            )?)
            .await?;
        let redis = RedisServer::start()?;
        Ok(Self {
            pg,
            redis,
            sidecars: Vec::new(),
            started: 0,
            settings: Vec::new(),
        })
    }

    /// A setting for the sidecars started from now on.
    pub fn set(&mut self, key: &str, value: &str) {
        self.settings.push((key.to_owned(), value.to_owned()));
    }

    pub async fn client(&self) -> Result<Client> {
        connect(&self.pg.url()).await
    }

    /// Starts one more sidecar (it leads if nobody does, else stands by); returns its index.
    pub fn add_sidecar(&mut self) -> Result<usize> {
        self.started += 1;
        let settings: Vec<(&str, &str)> = self
            .settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let sidecar = Sidecar::start(
            &format!("sidecar-{}", self.started),
            &self.pg.url(),
            &self.redis.url(),
            &settings,
        )?;
        self.sidecars.push(sidecar);
        Ok(self.sidecars.len() - 1)
    }

    /// Indexes of the sidecars that say they lead.
    pub fn leaders(&self) -> Vec<usize> {
        (0..self.sidecars.len())
            .filter(|&i| self.sidecars[i].is_leader())
            .collect()
    }

    /// Waits until exactly one sidecar leads and is streaming (`/readyz` 200); returns it.
    pub fn wait_for_leader(&mut self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders = self.leaders();
            if let [leader] = leaders[..] {
                if self.sidecars[leader].readiness() == Some(200) {
                    return Ok(leader);
                }
            }
            if leaders.len() > 1 {
                bail!("two leaders at once: {leaders:?}");
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self.sidecars.iter().map(|s| s.log()).collect();
                bail!(
                    "no streaming leader after {timeout:?}; logs:\n{}",
                    logs.join("\n----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every projection has applied the whole log and the cache equals the read
    /// models; then checks the read models against the independent fold of the log.
    pub async fn assert_consistent(&self, timeout: Duration) -> Result<()> {
        let client = self.client().await?;
        eventually(timeout, "projections caught up", || caught_up(&client))
            .await
            .with_context(|| self.logs())?;
        assert_read_models_match_the_log(&client).await?;
        let redis_url = self.redis.url();
        eventually(timeout, "cache equals the read models", || {
            cache_check::check(&client, &redis_url, PREFIX)
        })
        .await
        .with_context(|| self.logs())?;
        Ok(())
    }

    /// Base URL of a sidecar's HTTP server.
    pub fn http(&self, sidecar: usize) -> String {
        format!("http://127.0.0.1:{}", self.sidecars[sidecar].http_port())
    }

    /// Every sidecar's log, for failure messages.
    pub fn logs(&self) -> String {
        let logs: Vec<String> = self
            .sidecars
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- sidecar {i}:\n{}", s.log()))
            .collect();
        logs.join("\n")
    }
}
