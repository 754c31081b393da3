//! The HTTP server: `/metrics` (Prometheus text), `/healthz` (the process is up), `/readyz`
//! (leading and streaming, or standing by with PostgreSQL reachable), and the read API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::metrics::Metrics;
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

pub fn router(state: AppState) -> Router<AppState> {
    let _ = &state;
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The read API: `GET /v1/projections/{name}/{key}`.
pub fn read_router(state: ReadState) -> Router {
    Router::new()
        .route("/v1/projections/{name}/{key}", get(read_api::read))
        .with_state(state)
}

/// Serves `app` on `addr` until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "HTTP server listening (/metrics, /healthz, /readyz, /v1/projections/{{name}}/{{key}})");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
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
