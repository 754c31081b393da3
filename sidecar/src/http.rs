//! The two HTTP servers. The admin server (`--admin-addr`, loopback by default): `/metrics`
//! (Prometheus text), `/healthz` (the process is up), `/readyz` (leading and streaming, or
//! standing by with PostgreSQL reachable and some sidecar leading). The read API (`--http-addr`):
//! `/v1/projections/{name}/{key}` and nothing else, behind load shedding, over TLS when given a
//! certificate (reloaded when its files change).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use axum_server::tls_rustls::RustlsConfig;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::read_admission::{self, Admission};
use crate::read_api::{self, ReadState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Starting = 0,
    Standby = 1,
    Leader = 2,
}

/// What `/readyz` answers from.
#[derive(Debug, Default)]
pub struct Health {
    role: AtomicU8,
    /// The leader's replication stream is up and batches go through.
    pub streaming: AtomicBool,
    /// The last attempt to reach PostgreSQL worked.
    pub pg_reachable: AtomicBool,
    /// The last status poll found a live projector lease (some sidecar leads).
    pub leader_live: AtomicBool,
}

impl Health {
    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            2 => Role::Leader,
            1 => Role::Standby,
            _ => Role::Starting,
        }
    }

    /// Ready, and why (or why not).
    pub fn readiness(&self) -> (bool, &'static str) {
        match self.role() {
            Role::Leader if self.streaming.load(Ordering::Relaxed) => (true, "leader, streaming"),
            Role::Leader => (false, "leader, not streaming (connecting or retrying)"),
            Role::Standby if !self.pg_reachable.load(Ordering::Relaxed) => {
                (false, "standby, PostgreSQL unreachable")
            }
            // a standby asks for the lease every 200 ms and would have taken a free one: no live
            // leader for a whole status poll means no sidecar can lead
            Role::Standby if !self.leader_live.load(Ordering::Relaxed) => {
                (false, "standby, and no sidecar leads")
            }
            Role::Standby => (true, "standby"),
            Role::Starting => (false, "starting"),
        }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (ready, why) = state.health.readiness();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{why}\n"))
}

/// The admin server's routes.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The read API: `GET /v1/projections/{name}/{key}`, behind `admission`.
pub fn read_router(state: ReadState, admission: Arc<Admission>) -> Router {
    Router::new()
        .route("/v1/projections/{name}/{key}", get(read_api::read))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            admission,
            read_admission::admit,
        ))
}

/// The certificate and key of the read API's TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Serves `app` on `addr` until `shutdown` turns true; over TLS with `tls`.
pub async fn serve(
    what: &'static str,
    addr: SocketAddr,
    app: Router,
    tls: Option<TlsFiles>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let Some(files) = tls else {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "{what} listening (HTTP)");
        return axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await;
    };
    let config = RustlsConfig::from_pem_file(&files.cert, &files.key).await?;
    tokio::spawn(reload_on_change(config.clone(), files, shutdown.clone()));
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
        stopper.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    tracing::info!(%addr, "{what} listening (HTTPS)");
    axum_server::bind_rustls(addr, config)
        .handle(handle)
        .serve(app.into_make_service())
        .await
}

/// Reloads the certificate and key when either file changes (checked every 2 s): a renewed
/// certificate is served without a restart. A pair that does not load is logged and the old one
/// kept.
async fn reload_on_change(config: RustlsConfig, files: TlsFiles, mut shutdown: watch::Receiver<bool>) {
    let stamp = |files: &TlsFiles| {
        [&files.cert, &files.key].map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
    };
    let mut seen = stamp(&files);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let now = stamp(&files);
        if now == seen {
            continue;
        }
        match config.reload_from_pem_file(&files.cert, &files.key).await {
            Ok(()) => {
                tracing::info!(cert = %files.cert.display(), "reloaded the read API's TLS certificate");
                seen = now;
            }
            Err(err) => {
                tracing::warn!(error = %err, "the read API's new certificate does not load; keeping the old one")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_role_and_connections() {
        let health = Health::default();
        assert!(!health.readiness().0);
        health.set_role(Role::Standby);
        assert!(!health.readiness().0);
        health.pg_reachable.store(true, Ordering::Relaxed);
        assert_eq!(health.readiness(), (false, "standby, and no sidecar leads"));
        health.leader_live.store(true, Ordering::Relaxed);
        assert!(health.readiness().0);
        health.set_role(Role::Leader);
        assert!(!health.readiness().0);
        health.streaming.store(true, Ordering::Relaxed);
        assert_eq!(health.readiness(), (true, "leader, streaming"));
    }
}
