//! A whole deployment for the sidecar tests: a private PostgreSQL cluster with the extension
//! and the example order projections, a private redis-server, and sidecar processes.

use std::time::Duration;

use anyhow::{Context, Result};
use cqrs_harness::{ClusterOptions, PgCluster, RedisCluster, RedisServer, Sidecar};
use tokio_postgres::Client;

use crate::orders::{assert_read_models_match_the_log, random_log, seed_commands};
use crate::traffic::Traffic;
use crate::{cache_check, caught_up, connect, eventually, repo_root};
use cqrs_harness::edition::{self, Edition};

/// Key prefix the sidecars of a rig write under.
pub const PREFIX: &str = "cqrs";

pub struct Rig {
    pub pg: PgCluster,
    pub redis: RedisServer,
    /// The Redis Cluster the sidecars cache in instead of `redis`, when one is used.
    pub redis_cluster: Option<RedisCluster>,
    pub sidecars: Vec<Sidecar>,
    pub edition: Edition,
    /// Where sidecars connect: the superuser with the extension; with the portable edition the
    /// role a managed service gives a sidecar (REPLICATION and cqrs_projector, nothing more).
    pub sidecar_url: String,
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
        Self::start_with_options(ClusterOptions {
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            ..ClusterOptions::default()
        })
        .await
    }

    /// Like [`Rig::start`], with the cluster's options given.
    pub async fn start_with_options(options: ClusterOptions) -> Result<Self> {
        Self::start_edition(Edition::Extension, options).await
    }

    /// Like [`Rig::start_with_options`], with `edition` installed the way its users install it
    /// (the portable edition by a database owner who is not a superuser, the sidecars connecting
    /// as a role with only REPLICATION and cqrs_projector).
    pub async fn start_edition(edition: Edition, options: ClusterOptions) -> Result<Self> {
        let pg = edition::cluster(edition, options)?;
        connect(&edition::owner_url(&pg, edition))
            .await?
            .batch_execute(&std::fs::read_to_string(
                repo_root().join("sql/examples/orders.sql"),
            )?)
            .await?;
        let sidecar_url = edition::sidecar_url(&pg, edition)?;
        let redis = RedisServer::start()?;
        Ok(Self {
            pg,
            redis,
            redis_cluster: None,
            sidecars: Vec::new(),
            edition,
            sidecar_url,
            settings: Vec::new(),
        })
    }

    /// Replaces the rig's Redis (before any sidecar starts).
    pub fn use_redis(&mut self, redis: RedisServer) {
        self.redis = redis;
    }

    /// Caches in `cluster` instead of the rig's single Redis (before any sidecar starts).
    pub fn use_redis_cluster(&mut self, cluster: RedisCluster) {
        self.set("CQRS_REDIS_CLUSTER_NODES", &cluster.seeds());
        self.redis_cluster = Some(cluster);
    }

    /// Where the cache is, as `cache_check::check` takes it.
    pub fn cache_target(&self) -> String {
        match &self.redis_cluster {
            Some(cluster) => cache_check::cluster_target(&cluster.seeds()),
            None => self.redis.url(),
        }
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
        self.add_sidecar_at(&self.sidecar_url.clone())
    }

    /// Like [`Rig::add_sidecar`], connecting with `database_url`.
    pub fn add_sidecar_at(&mut self, database_url: &str) -> Result<usize> {
        let name = format!("sidecar-{}", self.sidecars.len() + 1);
        let sidecar = Sidecar::start(&name, database_url, &self.redis.url(), &self.settings)?;
        self.sidecars.push(sidecar);
        Ok(self.sidecars.len() - 1)
    }

    /// Starts one more sidecar of projection group `group` (it leads the group if nobody does).
    pub fn add_sidecar_in_group(&mut self, group: &str) -> Result<usize> {
        let name = format!("sidecar-{}-{group}", self.sidecars.len() + 1);
        let mut settings = self.settings.clone();
        settings.push(("CQRS_PROJECTION_GROUP".to_owned(), group.to_owned()));
        let sidecar = Sidecar::start(&name, &self.sidecar_url, &self.redis.url(), &settings)?;
        self.sidecars.push(sidecar);
        Ok(self.sidecars.len() - 1)
    }

    /// Waits until exactly one sidecar of `group` leads and streams; returns its index.
    pub fn wait_for_group_leader(&self, group: &str, timeout: Duration) -> Result<usize> {
        cqrs_harness::sidecar::wait_for_group_leader(&self.sidecars, group, timeout)
    }

    /// Like [`Rig::add_sidecar`], running `binary`, the sidecar of release `version`.
    pub fn add_sidecar_binary(&mut self, binary: &std::path::Path, version: &str) -> Result<usize> {
        let name = format!("sidecar-{}", self.sidecars.len() + 1);
        let sidecar = Sidecar::start_release(
            binary,
            version,
            &name,
            &self.pg.url(),
            &self.redis.url(),
            &self.settings,
        )?;
        self.sidecars.push(sidecar);
        Ok(self.sidecars.len() - 1)
    }

    /// Indexes of the sidecars that say they lead.
    pub fn leaders(&self) -> Vec<usize> {
        cqrs_harness::sidecar::leaders(&self.sidecars)
    }

    /// Waits until exactly one sidecar leads and is streaming (`/readyz` 200); returns it.
    pub fn wait_for_leader(&self, timeout: Duration) -> Result<usize> {
        cqrs_harness::sidecar::wait_for_leader(&self.sidecars, timeout)
    }

    /// Waits until every projection has applied the whole log and the cache equals the read
    /// models; then checks the read models against the independent fold of the log.
    pub async fn assert_consistent(&self, timeout: Duration) -> Result<()> {
        let client = self.client().await?;
        eventually(timeout, "projections caught up", || caught_up(&client))
            .await
            .with_context(|| self.logs())?;
        assert_read_models_match_the_log(&client).await?;
        let redis_url = self.cache_target();
        eventually(timeout, "cache equals the read models", || {
            cache_check::check(&client, &redis_url, PREFIX)
        })
        .await
        .with_context(|| self.logs())?;
        Ok(())
    }

    /// Base URL of a sidecar's HTTP server.
    pub fn http(&self, sidecar: usize) -> String {
        self.sidecars[sidecar].base_url()
    }

    /// Appends the seed commands of 50 users (so every user's stats row exists first), then
    /// starts `clients` writers appending `commands` random order commands over 1,000 orders
    /// at about `rate` per second (`None`: as fast as they can).
    pub async fn start_order_traffic(
        &self,
        rng: &mut rand::rngs::StdRng,
        commands: usize,
        clients: usize,
        rate: Option<f64>,
    ) -> Result<Traffic> {
        let (seeds, log) = (seed_commands(50), random_log(rng, commands, 1_000, 50));
        crate::orders::append_all(&self.client().await?, &seeds, 50).await?;
        Ok(Traffic::start(&self.pg.url(), log, clients, rate))
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
