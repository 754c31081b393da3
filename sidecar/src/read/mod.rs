//! The read API: `GET /v1/projections/{name}/{key}[?after=stream:seq&timeout_ms=n]`, a
//! read-model row as JSON. A request's way, each step in the file named for it:
//!
//! 1. [`shedding`] — a slot among `--read-max-concurrency` within a short deadline, or 503 at once;
//! 2. [`http`] — the request's shape (400), then
//! 3. [`auth`] — its credentials: an API key ([`auth::keys`]) or a JWT ([`auth::jwt`]) makes a
//!    [`auth::Caller`] (401 otherwise);
//! 4. [`access`] — the projection exposed and listed for that caller (404 otherwise, as if it did
//!    not exist), and its row rule; every refusal is counted and logged by [`denials`];
//! 5. [`waits`] — with `after`, until that command is applied to the projection (holding no
//!    pooled connection);
//! 6. [`cache_aside`] — the row from Redis, or from PostgreSQL (`cqrs.read_many`, one query per
//!    key however many ask) filling Redis through the revision-guarded script;
//! 7. [`access::owns`] — a row another subject owns answers like no row.
//!
//! [`setup`] builds it from the settings.

pub mod access;
pub mod auth;
pub mod cache_aside;
pub mod denials;
pub mod http;
pub mod replicas;
pub mod shedding;
pub mod waits;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::postgres::Database;
use access::Exposure;
use auth::{AuthSetupError, Authenticator, Methods};
use cache_aside::Reader;
use denials::Denials;
use shedding::Shedding;
use waits::{WaitSettings, Waits};

/// What every read request works with.
#[derive(Clone)]
pub struct ReadState {
    pub reader: Arc<Reader>,
    pub waits: Arc<Waits>,
    pub metrics: Arc<Metrics>,
    /// refusals, counted and logged (rate-limited)
    pub denials: Arc<Denials>,
    pub exposure: Arc<Exposure>,
    /// `None`: `--read-auth none`, everyone may read what is exposed.
    pub auth: Option<Arc<Authenticator>>,
}

/// Why the read API cannot be set up from the settings (the sidecar exits with code 2).
#[derive(Debug, thiserror::Error)]
pub enum ReadSetupError {
    #[error("--expose: {0}")]
    Exposure(String),
    #[error("--expose names projections but --read-auth is not set: choose keys, jwt, keys,jwt, or none (anyone may read)")]
    NoAuthMethod,
    #[error("row rules in --expose (name:column=claim) need --read-auth jwt: without a token there is no claim to compare")]
    RulesWithoutJwt,
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
}

/// The exposed projections and how callers authenticate (`None`: `--read-auth none`), from the
/// settings, with the warnings an operator should see at start.
pub fn access_from(config: &Config) -> Result<(Exposure, Option<Arc<Authenticator>>), ReadSetupError> {
    let exposure = Exposure::parse(&config.expose).map_err(ReadSetupError::Exposure)?;
    let auth = match Methods::parse(config.read_auth.as_deref())? {
        Methods::Unset if exposure.is_empty() => None,
        Methods::Unset => return Err(ReadSetupError::NoAuthMethod),
        Methods::Open => {
            if exposure.has_ownership_rules() {
                return Err(ReadSetupError::RulesWithoutJwt);
            }
            tracing::warn!("the read API serves its exposed projections to anyone (--read-auth none)");
            None
        }
        Methods::Some { keys, jwt } => {
            if exposure.has_ownership_rules() && !jwt {
                return Err(ReadSetupError::RulesWithoutJwt);
            }
            let auth = Authenticator::from_config(config, keys, jwt)?;
            if jwt && (config.jwt_issuer.is_none() || config.jwt_audience.is_none()) {
                tracing::warn!(
                    issuer_checked = config.jwt_issuer.is_some(),
                    audience_checked = config.jwt_audience.is_some(),
                    "JWTs are accepted without a required issuer or audience (--jwt-issuer, --jwt-audience): \
                     a token your identity provider signed for another application may read here"
                );
            }
            Some(Arc::new(auth))
        }
    };
    if exposure.is_empty() {
        tracing::info!("the read API serves nothing: no projection is exposed (--expose)");
    } else {
        tracing::info!(exposed = %exposure.names().join(","), "the read API serves these projections");
    }
    Ok((exposure, auth))
}

/// Whether credentials of this read API cross the network in clear: authentication is on, there
/// is no TLS, and the address is not loopback only. Said at start and in /metrics.
pub fn credentials_in_clear(config: &Config, auth_on: bool) -> bool {
    auth_on && config.read_tls_cert.is_none() && !is_loopback(config.http_addr)
}

fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// The read API's router and what runs beside it (the API-key reloader, the waits' watcher).
pub fn setup(
    config: &Config,
    pg: &Database,
    reader: Arc<Reader>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<Router, ReadSetupError> {
    let (exposure, auth) = access_from(config)?;
    let in_clear = credentials_in_clear(config, auth.is_some());
    metrics.read_plaintext_credentials.set(i64::from(in_clear));
    if in_clear {
        tracing::warn!(
            addr = %config.http_addr,
            "the read API takes credentials over plain HTTP on a non-loopback address: anyone on the path can \
             read API keys and tokens (set --read-tls-cert and --read-tls-key, or put TLS in front)"
        );
    }
    if let Some(auth) = &auth {
        tokio::spawn(auth::keys::reload_on_change(Arc::clone(auth), shutdown.clone()));
    }
    let waits = Waits::new(WaitSettings {
        poll: config.read_wait_poll,
        max: config.read_max_waits,
        max_per_caller: config.read_max_waits_per_caller,
    });
    tokio::spawn(waits::watch(Arc::clone(&waits), pg.clone(), shutdown));
    Ok(http::router(
        ReadState {
            reader,
            waits,
            denials: Arc::new(Denials::new(Arc::clone(&metrics))),
            metrics: Arc::clone(&metrics),
            exposure: Arc::new(exposure),
            auth,
        },
        Arc::new(Shedding::new(
            config.read_max_concurrency,
            config.read_queue_timeout,
            metrics,
        )),
    ))
}

/// Warns about exposed projections the database does not have (a misspelt `--expose` serves
/// nothing and says nothing otherwise).
pub async fn warn_unknown_exposed(client: &tokio_postgres::Client, exposure: &Exposure) {
    let names = exposure.named();
    if names.is_empty() {
        return;
    }
    match client
        .query(
            "select e.name from unnest($1::text[]) e(name) where not exists (select from cqrs.projection p where p.name = e.name)",
            &[&names],
        )
        .await
    {
        Ok(rows) => {
            for row in rows {
                let name: String = row.get(0);
                tracing::warn!(projection = %name, "--expose names a projection that does not exist (yet): it serves nothing");
            }
        }
        Err(err) => tracing::debug!(error = %err, "could not check the exposed projections"),
    }
}
