use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use cqrs_sidecar::admin::{self, AppState};
use cqrs_sidecar::cache::{cluster_seed_urls, Cache, Ttls};
use cqrs_sidecar::config::{Command, Config};
use cqrs_sidecar::health::{Health, Role};
use cqrs_sidecar::metrics::Metrics;
use cqrs_sidecar::postgres::ConnectionPurpose;
use cqrs_sidecar::read::access::Exposure;
use cqrs_sidecar::read::cache_aside::{ReadSettings, Reader};
use cqrs_sidecar::read::replicas::{self, Replicas};
use cqrs_sidecar::repair::{run::repairer, Repairs};
use cqrs_sidecar::server::{self, ConnectionMetrics, Listening, TlsFiles};
use cqrs_sidecar::stream::{self, Ending};
use cqrs_sidecar::{leader, leading, postgres, read, status, traces};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;

/// Exit code for a configuration that must be fixed before a restart can help.
const MISCONFIGURED: u8 = 2;
/// How long PostgreSQL may take to accept connections at start (e.g. started together).
const CONNECT_AT_START_FOR: Duration = Duration::from_secs(30);
/// Connections to the admin server at once at most (Prometheus, probes and an operator's curl).
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Logs to stderr, and spans to the OTLP endpoint when one is configured (then the exporter is
/// returned, to be flushed at exit). Runs inside the runtime: the exporter is a task on it.
fn init_logging(config: &Config) -> Result<Option<traces::Exporting>, traces::TraceSetupError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = if config.log_format == "json" {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let exporting = traces::start(&traces::TraceSettings {
        endpoint: config.otlp_endpoint.clone(),
        sample_ratio: config.trace_sample_ratio,
    });
    let (exporting, otel) = match exporting {
        Ok(Some((exporting, tracer))) => (
            Ok(Some(exporting)),
            Some(tracing_opentelemetry::layer().with_tracer(tracer)),
        ),
        Ok(None) => (Ok(None), None),
        Err(err) => (Err(err), None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    exporting
}

async fn signals(shutdown: watch::Sender<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot listen for SIGTERM/SIGINT");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the batch in flight and stopping"),
        _ = int.recv() => tracing::info!("SIGINT: finishing the batch in flight and stopping"),
    }
    let _ = shutdown.send(true);
}

/// 2 for what the operator must fix, 1 for what may pass by itself.
fn exit_code(err: &postgres::StartupError) -> ExitCode {
    ExitCode::from(if err.is_misconfiguration() {
        MISCONFIGURED
    } else {
        1
    })
}

async fn run(config: Config) -> ExitCode {
    let config = Arc::new(config);
    let wiring = match Wiring::new(&config) {
        Ok(wiring) => wiring,
        Err(code) => return code,
    };
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(signals(shutdown_tx));
    let servers = match wiring.serve_http(&config, shutdown.clone()) {
        Ok(servers) => servers,
        Err(code) => return code,
    };
    if let Err(code) = wiring.check_start(&config, &shutdown).await {
        return code;
    }
    wiring.spawn_background(&config, &shutdown);
    wiring.lead_or_stand_by(&config, shutdown).await;

    wiring.health.set_role(Role::Starting);
    wiring.metrics.set_leading(None);
    for server in servers {
        match tokio::time::timeout(Duration::from_secs(2), server).await {
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "an HTTP server failed"),
            Err(_) => tracing::warn!("an HTTP server did not stop in time"),
            _ => {}
        }
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// What the sidecar's parts share: the database, the cache, metrics, health, repairs.
struct Wiring {
    pg: postgres::Database,
    /// the read replicas (`--read-replica-urls`)
    replicas: Vec<postgres::Database>,
    metrics: Arc<Metrics>,
    cache: Arc<Cache>,
    health: Arc<Health>,
    repairs: Arc<Mutex<Repairs>>,
}

impl Wiring {
    /// Parses the URLs and sets up metrics and the cache client (no connection yet).
    fn new(config: &Config) -> Result<Self, ExitCode> {
        let password = match &config.database_password_file {
            None => None,
            Some(path) => Some(postgres::read_password_file(path).map_err(|err| {
                tracing::error!(error = %err, "--database-password-file");
                ExitCode::from(MISCONFIGURED)
            })?),
        };
        let pg =
            postgres::Database::parse(config.database_url.expose(), password.clone()).map_err(|err| {
                tracing::error!(error = %err, "invalid --database-url");
                ExitCode::from(MISCONFIGURED)
            })?;
        let replicas = config
            .read_replica_urls
            .iter()
            .map(|url| postgres::Database::parse(url.expose(), password.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| {
                tracing::error!(error = %err, "invalid --read-replica-urls");
                ExitCode::from(MISCONFIGURED)
            })?;
        let metrics = Metrics::for_group(&config.projection_group)
            .map(Arc::new)
            .map_err(|err| {
                tracing::error!(error = %err, "cannot set up metrics");
                ExitCode::FAILURE
            })?;
        let ttls = Ttls {
            row: config.cache_ttl,
            tombstone: config.tombstone_ttl,
            missing: config.negative_ttl,
        };
        let ca_file = config.redis_ca_file.as_deref();
        let cache = match config.redis_cluster_nodes.as_deref() {
            None => Cache::with_roots(config.redis_url.expose(), ca_file, &config.redis_prefix, ttls),
            Some(seeds) => cluster_seed_urls(config.redis_url.expose(), seeds)
                .and_then(|urls| Cache::cluster(&urls, ca_file, &config.redis_prefix, ttls)),
        }
        .map(Arc::new)
        .map_err(|err| {
            tracing::error!(error = %err, "invalid --redis-url, --redis-cluster-nodes or --redis-ca-file");
            ExitCode::from(MISCONFIGURED)
        })?;
        Ok(Self {
            pg,
            replicas,
            metrics,
            cache,
            health: Arc::new(Health::default()),
            repairs: Arc::new(Mutex::new(Repairs::new(config.max_repair_keys))),
        })
    }

    /// The admin server (`/metrics`, `/healthz`, `/readyz`) and the read API, answering from
    /// the start.
    fn serve_http(
        &self,
        config: &Config,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Vec<JoinHandle<std::io::Result<()>>>, ExitCode> {
        let admin = admin::router(AppState {
            health: Arc::clone(&self.health),
            metrics: Arc::clone(&self.metrics),
        });
        let reader = Reader::new(
            self.pg.clone(),
            Arc::clone(&self.cache),
            Arc::clone(&self.metrics),
            Arc::clone(&self.health),
            ReadSettings {
                redis_timeout: config.read_redis_timeout,
                postgres_timeout: config.read_pg_timeout,
                postgres_queue_timeout: config.read_pg_queue_timeout,
                pool_size: config.read_pool_size,
                replica_max_staleness: config.read_replica_max_staleness,
            },
        )
        .map_err(|err| {
            tracing::error!(error = %err, "cannot set up the read API");
            ExitCode::FAILURE
        })?;
        if !self.replicas.is_empty() {
            let replicas = Replicas::new(
                self.replicas.clone(),
                config.read_pool_size,
                config.read_pg_timeout,
            )
            .map_err(|err| {
                tracing::error!(error = %err, "cannot set up the read replicas' pools");
                ExitCode::FAILURE
            })?;
            let names: Vec<String> = self.replicas.iter().map(postgres::Database::describe).collect();
            tracing::info!(replicas = %names.join(","), "cache misses are read from replicas that have replayed far enough");
            tokio::spawn(replicas::monitor(
                Arc::clone(&replicas),
                self.pg.clone(),
                Arc::clone(&self.metrics),
                shutdown.clone(),
            ));
            reader.use_replicas(replicas);
        }
        let reads = read::setup(
            config,
            &self.pg,
            reader,
            Arc::clone(&self.metrics),
            shutdown.clone(),
        )
        .map_err(|err| {
            tracing::error!(error = %err, "the read API's settings are not usable");
            ExitCode::from(MISCONFIGURED)
        })?;
        let tls = config
            .read_tls_cert
            .clone()
            .zip(config.read_tls_key.clone())
            .map(|(cert, key)| TlsFiles { cert, key });
        Ok(vec![
            tokio::spawn(server::serve(
                Listening {
                    what: "admin server (/metrics, /healthz, /readyz)",
                    addr: config.admin_addr,
                    tls: None,
                    max_connections: ADMIN_MAX_CONNECTIONS,
                    metrics: None,
                },
                admin,
                shutdown.clone(),
            )),
            tokio::spawn(server::serve(
                Listening {
                    what: "read API (/v1/projections/{name}/{key})",
                    addr: config.http_addr,
                    tls,
                    max_connections: config.read_max_connections as usize,
                    metrics: Some(ConnectionMetrics {
                        open: self.metrics.read_connections.clone(),
                        refused: self.metrics.read_connections_refused.clone(),
                    }),
                },
                reads,
                shutdown,
            )),
        ])
    }

    /// The start-up checks, one clear message per misconfiguration: PostgreSQL reachable (for
    /// up to [`CONNECT_AT_START_FOR`]), pg_cqrs installed and recent enough, logical decoding
    /// and the rights the sidecar needs; Redis unreachable is only a warning.
    async fn check_start(&self, config: &Config, shutdown: &watch::Receiver<bool>) -> Result<(), ExitCode> {
        let target = self.pg.describe();
        let started = tokio::time::Instant::now();
        let client = loop {
            match self
                .pg
                .connect_for(ConnectionPurpose::Checks, Duration::from_secs(5))
                .await
            {
                Ok(client) => break client,
                Err(err)
                    if !err.is_misconfiguration()
                        && started.elapsed() < CONNECT_AT_START_FOR
                        && !*shutdown.borrow() =>
                {
                    tracing::warn!(error = %err, "PostgreSQL not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => {
                    tracing::error!(error = %err, database = %target, "giving up");
                    return Err(exit_code(&err));
                }
            }
        };
        let installed = postgres::check(&client, self.pg.dbname(), &config.slot)
            .await
            .map_err(|err| {
                tracing::error!(error = %err, database = %target, "start-up check failed");
                exit_code(&err)
            })?;
        warn_empty_group(&client, &config.projection_group).await;
        if let Ok(exposure) = Exposure::parse(&config.expose) {
            read::warn_unknown_exposed(&client, &exposure).await;
        }
        let identity = postgres::database_identity(&client).await.map_err(|err| {
            tracing::error!(error = %err, database = %target, "start-up check failed");
            ExitCode::FAILURE
        })?;
        drop(client);
        self.health
            .pg_reachable
            .store(true, std::sync::atomic::Ordering::Relaxed);
        match self.cache.claim_for(identity).await {
            Ok(()) => {}
            Err(err) if err.is_foreign() => {
                tracing::error!(error = %err, redis = %self.cache.describe(), "the cache is another database's");
                return Err(ExitCode::from(MISCONFIGURED));
            }
            Err(_) => {
                tracing::warn!(redis = %self.cache.describe(), "Redis is unreachable; projecting goes on and the cache is repaired when Redis answers")
            }
        }
        tracing::info!(
            database = %target,
            slot = %config.slot,
            pg_cqrs = %installed.version,
            edition = %installed.edition,
            "start-up checks passed"
        );
        Ok(())
    }

    /// The status poller (metrics, health, the command log's upkeep) and the cache repairer, on
    /// every sidecar.
    fn spawn_background(&self, config: &Config, shutdown: &watch::Receiver<bool>) {
        tokio::spawn(status::poller(
            status::Watch {
                pg: self.pg.clone(),
                slot: config.slot.clone(),
                group: config.projection_group.clone(),
                every: config.status_interval,
                maintain_every: config.maintain_interval,
                metrics: Arc::clone(&self.metrics),
                repairs: Arc::clone(&self.repairs),
                cache: Arc::clone(&self.cache),
                health: Arc::clone(&self.health),
            },
            shutdown.clone(),
        ));
        tokio::spawn(repairer(
            self.pg.clone(),
            Arc::clone(&self.cache),
            Arc::clone(&self.repairs),
            Arc::clone(&self.metrics),
            shutdown.clone(),
        ));
    }

    /// Stands by until this sidecar takes the lease, leads until that ends, and again, until
    /// shutdown.
    async fn lead_or_stand_by(&self, config: &Arc<Config>, shutdown: watch::Receiver<bool>) {
        let ctx = leading::Context {
            config: Arc::clone(config),
            pg: self.pg.clone(),
            cache: Arc::clone(&self.cache),
            repairs: Arc::clone(&self.repairs),
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
        };
        let mut standby_shutdown = shutdown.clone();
        let mut pause = Duration::from_millis(100);
        let candidate = leader::Candidate::new(&config.projection_group);
        loop {
            self.health.set_role(Role::Standby);
            self.metrics.set_leading(None);
            let Some(leadership) =
                leader::acquire(&self.pg, &candidate, &mut standby_shutdown, &self.health).await
            else {
                return;
            };
            tracing::info!(slot = %config.slot, projection_group = %config.projection_group, "acquired leadership");
            match stream::lead(&ctx, &leadership, shutdown.clone()).await {
                Ending::Shutdown => {
                    leadership.release().await;
                    return;
                }
                Ending::LostLeadership => {
                    tracing::error!("lost the projector lease; stopped streaming");
                    drop(leadership);
                }
                Ending::Deposed => {
                    tracing::error!("deposed: a newer leader holds the lease");
                    drop(leadership);
                }
                Ending::Failed(err) => {
                    tracing::error!(error = %err, retry_in = ?pause, "leading failed");
                    leadership.release().await;
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = standby_shutdown.wait_for(|stop| *stop) => return,
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            pause = Duration::from_millis(100);
        }
    }
}

/// A group with no projections is not an error (projections may be moved into it later), but a
/// misspelt --projection-group would otherwise lead an empty group in silence.
async fn warn_empty_group(client: &tokio_postgres::Client, group: &str) {
    let counted = client
        .query_one(
            "select count(*) filter (where projection_group = $1),
                    coalesce(pg_catalog.string_agg(distinct projection_group, ', '), '')
               from cqrs.projection",
            &[&group],
        )
        .await;
    if let Ok(row) = counted {
        let (mine, groups): (i64, String) = (row.get(0), row.get(1));
        if mine == 0 {
            tracing::warn!(
                projection_group = %group,
                groups_with_projections = %groups,
                "no projection is in this sidecar's group yet: it projects nothing until one is moved into it (select cqrs.move_projection(name, group))"
            );
        }
    }
}

fn main() -> ExitCode {
    let mut config = Config::parse();
    if let Some(Command::Probe { url, timeout }) = &config.command {
        return cqrs_sidecar::probe::run(url, *timeout);
    }
    // rustls is linked with two crypto providers (ring, which pgwire-replication asks for, and
    // aws-lc-rs through tokio-rustls' defaults); the redis client takes the process default,
    // which must then be chosen: ring, as for every other connection
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.worker_threads))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let exporting = {
        let _inside = runtime.enter();
        init_logging(&config)
    };
    let exporting = match exporting {
        Ok(exporting) => exporting,
        Err(err) => {
            tracing::error!(error = %err, "--otlp-endpoint or the OTEL_EXPORTER_OTLP_* variables are not usable");
            return ExitCode::from(MISCONFIGURED);
        }
    };
    // from here on the slot is the group's (every use of --slot means the one streamed)
    match config.group_slot() {
        Ok(slot) => config.slot = slot,
        Err(err) => {
            tracing::error!(error = %err, "the replication slot's settings are not usable");
            return ExitCode::from(MISCONFIGURED);
        }
    }
    let code = runtime.block_on(run(config));
    // the last batches' spans: flushed from this thread while the runtime still runs the exporter
    if let Some(exporting) = exporting {
        exporting.shutdown();
    }
    code
}
