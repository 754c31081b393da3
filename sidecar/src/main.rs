use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use cqrs_sidecar::cache::{Cache, Ttls};
use cqrs_sidecar::config::Config;
use cqrs_sidecar::http::{self, AppState, Health, Role};
use cqrs_sidecar::metrics::Metrics;
use cqrs_sidecar::read_api::ReadState;
use cqrs_sidecar::reads::{ReadSettings, Reader};
use cqrs_sidecar::repair::{run::repairer, Repairs};
use cqrs_sidecar::stream::{self, Ending};
use cqrs_sidecar::{leader, postgres, status};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Exit code for a configuration that must be fixed before a restart can help.
const MISCONFIGURED: u8 = 2;
/// How long PostgreSQL may take to accept connections at start (e.g. started together).
const CONNECT_AT_START_FOR: Duration = Duration::from_secs(30);

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
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
    let pg = match postgres::Database::parse(config.database_url.expose()) {
        Ok(pg) => pg,
        Err(err) => {
            tracing::error!(error = %err, "invalid --database-url");
            return ExitCode::from(MISCONFIGURED);
        }
    };
    let metrics = match Metrics::new() {
        Ok(metrics) => Arc::new(metrics),
        Err(err) => {
            tracing::error!(error = %err, "cannot set up metrics");
            return ExitCode::FAILURE;
        }
    };
    let ttls = Ttls {
        row: config.cache_ttl,
        tombstone: config.tombstone_ttl,
        missing: config.negative_ttl,
    };
    let cache = match Cache::with_roots(
        config.redis_url.expose(),
        config.redis_ca_file.as_deref(),
        &config.redis_prefix,
        ttls,
    ) {
        Ok(cache) => Arc::new(cache),
        Err(err) => {
            tracing::error!(error = %err, "invalid --redis-url or --redis-ca-file");
            return ExitCode::from(MISCONFIGURED);
        }
    };
    let health = Arc::new(Health::default());
    let repairs = Arc::new(Mutex::new(Repairs::new(config.max_repair_keys)));
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(signals(shutdown_tx));

    let state = AppState {
        health: Arc::clone(&health),
        metrics: Arc::clone(&metrics),
    };
    let reader = match Reader::new(
        pg.clone(),
        Arc::clone(&cache),
        Arc::clone(&metrics),
        ReadSettings {
            redis_timeout: config.read_redis_timeout,
            postgres_timeout: config.read_pg_timeout,
            pool_size: config.read_pool_size,
        },
    ) {
        Ok(reader) => reader,
        Err(err) => {
            tracing::error!(error = %err, "cannot set up the read API");
            return ExitCode::FAILURE;
        }
    };
    let app = http::router(state.clone())
        .with_state(state)
        .merge(http::read_router(ReadState {
            reader,
            metrics: Arc::clone(&metrics),
        }));
    let server = tokio::spawn(http::serve(config.http_addr, app, shutdown.clone()));

    // start-up checks: one clear message per misconfiguration
    let target = pg.describe();
    let started = tokio::time::Instant::now();
    let client = loop {
        match pg.connect(Duration::from_secs(5)).await {
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
                return exit_code(&err);
            }
        }
    };
    let installed = match postgres::check(&client, pg.dbname()).await {
        Ok(installed) => installed,
        Err(err) => {
            tracing::error!(error = %err, database = %target, "start-up check failed");
            return exit_code(&err);
        }
    };
    drop(client);
    health
        .pg_reachable
        .store(true, std::sync::atomic::Ordering::Relaxed);
    if !cache.ping().await {
        tracing::warn!(redis = %cache.describe(), "Redis is unreachable; projecting goes on and the cache is repaired when Redis answers");
    }
    tracing::info!(
        database = %target,
        slot = %config.slot,
        pg_cqrs = %installed.version,
        edition = %installed.edition,
        "start-up checks passed"
    );

    tokio::spawn(status::poller(
        status::Watch {
            pg: pg.clone(),
            slot: config.slot.clone(),
            every: config.status_interval,
            metrics: Arc::clone(&metrics),
            repairs: Arc::clone(&repairs),
            cache: Arc::clone(&cache),
            health: Arc::clone(&health),
        },
        shutdown.clone(),
    ));
    tokio::spawn(repairer(
        pg.clone(),
        Arc::clone(&cache),
        Arc::clone(&repairs),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));

    let ctx = stream::Context {
        config: Arc::clone(&config),
        pg: pg.clone(),
        cache,
        repairs,
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
    };
    let mut standby_shutdown = shutdown.clone();
    let mut pause = Duration::from_millis(100);
    let holder = leader::holder();
    loop {
        health.set_role(Role::Standby);
        metrics.leader.set(0);
        let Some(leadership) = leader::acquire(&pg, &holder, &mut standby_shutdown, &health).await else {
            break;
        };
        tracing::info!(slot = %config.slot, "acquired leadership");
        match stream::lead(&ctx, &leadership, shutdown.clone()).await {
            Ending::Shutdown => {
                leadership.release().await;
                break;
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
                    _ = standby_shutdown.wait_for(|stop| *stop) => break,
                }
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        pause = Duration::from_millis(100);
    }
    health.set_role(Role::Starting);
    metrics.leader.set(0);
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(Err(err))) => tracing::warn!(error = %err, "the HTTP server failed"),
        Err(_) => tracing::warn!("the HTTP server did not stop in time"),
        _ => {}
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let config = Config::parse();
    init_logging(&config);
    // rustls is linked with two crypto providers (ring, which pgwire-replication asks for, and
    // aws-lc-rs through tokio-rustls' defaults); the redis client takes the process default,
    // which must then be chosen: ring, as for every other connection
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}
