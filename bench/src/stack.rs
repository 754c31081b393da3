//! The whole local deployment the demo, the sidecar benchmark and the load tool run against: a
//! private PostgreSQL with pg_cqrs, the example command types and order projections, a private
//! redis-server, and cqrs-sidecar processes. Everything is stopped when the stack is dropped
//! (sidecars first, gracefully).

use std::time::Duration;

use anyhow::Result;
use cqrs_harness::edition::{self, Edition};
use cqrs_harness::read_tokens;
use cqrs_harness::{ClusterOptions, Durability, PgCluster, RedisServer, Sidecar};
use serde_json::Value;
use tokio_postgres::Client;

use crate::workload::command_types;
use cqrs_harness::connect;

pub struct Stack {
    pub sidecars: Vec<Sidecar>,
    pub redis: RedisServer,
    pub pg: PgCluster,
    pub edition: Edition,
    /// The application's and the DBA's connection: the superuser with the extension, the
    /// database owner (no superuser, as on managed PostgreSQL) with the portable edition.
    pub owner_url: String,
    /// The sidecars' connection (see [`edition::sidecar_url`]).
    sidecar_url: String,
    settings: Vec<(String, String)>,
    /// The HS256 secret the sidecars verify read API tokens with.
    secret: Vec<u8>,
    /// `Bearer <JWT>` of a reader of both example projections.
    authorization: String,
}

impl Stack {
    /// PostgreSQL (fsync on, as in production) with `edition` installed, and Redis; the order
    /// command types registered and, with `projections`, the example order projections created.
    pub async fn start(edition: Edition, projections: bool) -> Result<Self> {
        let (pg, sidecar_url) = tokio::task::spawn_blocking(move || -> Result<_> {
            let pg = edition::cluster(
                edition,
                ClusterOptions {
                    durability: Durability::Fsync,
                    // as the README installs the extension: counting appends (cqrs.stats())
                    settings: match edition {
                        Edition::Extension => vec!["shared_preload_libraries = 'pg_cqrs'".to_owned()],
                        Edition::Portable => Vec::new(),
                    },
                    ..Default::default()
                },
            )?;
            let sidecar_url = edition::sidecar_url(&pg, edition)?;
            Ok((pg, sidecar_url))
        })
        .await??;
        let redis = tokio::task::spawn_blocking(RedisServer::start).await??;
        // the read API as the README secures it: the example projections, a user's stats only
        // to that user, JWTs signed with a secret of this stack
        let (secret_file, secret) =
            read_tokens::write_hs256_secret(pg.data_dir().parent().unwrap_or(pg.data_dir()))?;
        let settings = vec![
            ("CQRS_EXPOSE".to_owned(), READ_EXPOSURE.to_owned()),
            ("CQRS_READ_AUTH".to_owned(), "jwt".to_owned()),
            (
                "CQRS_JWT_HS256_SECRET_FILE".to_owned(),
                secret_file.display().to_string(),
            ),
            ("CQRS_JWT_AUDIENCE".to_owned(), read_tokens::AUDIENCE.to_owned()),
        ];
        let authorization = format!(
            "Bearer {}",
            read_tokens::hs256_token(&secret, "cqrs-bench", &["order_summary", "user_order_stats"])?
        );
        let stack = Self {
            sidecars: Vec::new(),
            redis,
            owner_url: edition::owner_url(&pg, edition),
            pg,
            edition,
            sidecar_url,
            settings,
            secret,
            authorization,
        };
        let client = stack.client().await?;
        register_command_types(&client).await?;
        if projections {
            stack.create_projections().await?;
        }
        Ok(stack)
    }

    pub async fn create_projections(&self) -> Result<()> {
        let examples = std::fs::read_to_string(crate::repo_file("sql/examples/orders.sql"))?;
        self.client().await?.batch_execute(&examples).await?;
        Ok(())
    }

    /// A connection as the owner (see [`Stack::owner_url`]).
    pub async fn client(&self) -> Result<Client> {
        connect(&self.owner_url).await
    }

    /// `Bearer <JWT>` that reads both example projections (order_summary has no row rule; a
    /// user's stats are read by the sidecar for this subject only: see [`Stack::token`]).
    pub fn authorization(&self) -> &str {
        &self.authorization
    }

    /// A JWT for subject `sub` reading `projections`.
    pub fn token(&self, sub: &str, projections: &[&str]) -> Result<String> {
        read_tokens::hs256_token(&self.secret, sub, projections)
    }

    /// An HTTP client for the read API that sends [`Stack::authorization`].
    pub fn read_client(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::Client> {
        Ok(builder
            .default_headers(authorization_header(&self.authorization)?)
            .build()?)
    }

    /// A `CQRS_*` setting for sidecars started from now on.
    pub fn set(&mut self, key: &str, value: &str) {
        self.settings.push((key.to_owned(), value.to_owned()));
    }

    /// Drops a `CQRS_*` setting for sidecars started from now on.
    pub fn unset(&mut self, key: &str) {
        self.settings.retain(|(k, _)| k != key);
    }

    /// Starts a sidecar of the default projection group; returns its index.
    pub fn add_sidecar(&mut self) -> Result<usize> {
        self.add_sidecar_in_group("default")
    }

    /// Starts a sidecar of projection group `group`; returns its index.
    pub fn add_sidecar_in_group(&mut self, group: &str) -> Result<usize> {
        let name = format!("sidecar-{}", self.sidecars.len() + 1);
        let mut settings = self.settings.clone();
        settings.push(("CQRS_PROJECTION_GROUP".to_owned(), group.to_owned()));
        let sidecar = Sidecar::start(&name, &self.sidecar_url, &self.redis.url(), &settings)?;
        self.sidecars.push(sidecar);
        Ok(self.sidecars.len() - 1)
    }

    /// The sidecar that leads the default group and streams, waiting up to `timeout` for one.
    pub fn wait_for_leader(&self, timeout: Duration) -> Result<usize> {
        self.wait_for_group_leader("default", timeout)
    }

    /// The sidecar that leads `group` and streams, waiting up to `timeout` for one.
    pub fn wait_for_group_leader(&self, group: &str, timeout: Duration) -> Result<usize> {
        cqrs_harness::sidecar::wait_for_group_leader(&self.sidecars, group, timeout)
    }

    /// The HTTP base URL of a sidecar.
    pub fn http(&self, sidecar: usize) -> String {
        self.sidecars[sidecar].base_url()
    }

    /// The base URL of a sidecar's /metrics, /healthz and /readyz.
    pub fn admin(&self, sidecar: usize) -> String {
        format!("http://127.0.0.1:{}", self.sidecars[sidecar].admin_port())
    }

    /// Cache entries in Redis.
    pub fn cache_entries(&self) -> u64 {
        self.redis
            .cli(&["DBSIZE"])
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Stops the sidecars with SIGTERM (what an orchestrator does); the rest stops on drop.
    pub fn stop_sidecars(&mut self) {
        for sidecar in &mut self.sidecars {
            if sidecar.is_running() {
                let _ = sidecar.terminate(Duration::from_secs(10));
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop_sidecars();
    }
}

pub async fn register_command_types(client: &Client) -> Result<()> {
    for (name, schema) in command_types() {
        let schema: Value = serde_json::from_str(schema)?;
        client
            .execute("select cqrs.register_command_type($1, $2)", &[&name, &schema])
            .await?;
    }
    Ok(())
}

/// Peak resident memory (VmHWM) and current (VmRSS) of a process, in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// `--edition extension|portable`: which edition of pg_cqrs the stack installs.
pub fn parse_edition(text: &str) -> Result<Edition, String> {
    match text {
        "extension" => Ok(Edition::Extension),
        "portable" => Ok(Edition::Portable),
        _ => Err(format!("expected extension or portable, got {text:?}")),
    }
}

/// What the sidecars of the demo and the benchmarks expose: the README's example.
pub const READ_EXPOSURE: &str = "order_summary,user_order_stats:user_id=sub";

/// Default headers carrying `authorization` (`Bearer …`).
pub fn authorization_header(authorization: &str) -> Result<reqwest::header::HeaderMap> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(authorization)?,
    );
    Ok(headers)
}
