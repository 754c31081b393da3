//! Leader election through the projection group's lease (`cqrs.try_lead`), which only
//! `cqrs_projector` may take: leadership is not a lock any session could take and sit on (a session advisory
//! lock was; an idle session holding it left every sidecar standing by forever).
//!
//! Every sidecar asks for the lease on a connection of its own; one holds it and renews it on
//! that connection well within its time to live, the others ask again every
//! [`TRY_EVERY`]. The lease is free as soon as the leader's connection is gone — a leader killed
//! with SIGKILL hands over within a fraction of a second — or once it has not been renewed for
//! [`TTL`] (a leader that hangs). A leader that cannot renew learns it at once and stops
//! streaming: the lease may already be someone else's. Fencing does not rely on this alone:
//! batches carry the lease's token and the checkpoint LSN.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::health::{Health, Role};
use crate::postgres::{ConnectionPurpose, Database};

/// How long the lease lasts without renewal.
const TTL: Duration = Duration::from_secs(2);
/// How often the leader renews it.
const RENEW_EVERY: Duration = Duration::from_millis(400);
/// How often a standby asks for it.
const TRY_EVERY: Duration = Duration::from_millis(200);
/// Longest a lease call may take before the connection counts as gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

const TRY_LEAD: &str = "select cqrs.try_lead($1, $2::text::interval, $3)";

/// Who asks for which lease.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// This process's name on the lease: host, pid and a random part (a restarted process may
    /// reuse a pid).
    holder: String,
    /// The projection group whose lease it asks for.
    group: String,
}

impl Candidate {
    pub fn new(group: &str) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Self {
            holder: format!(
                "{}:{}:{:08x}",
                host.trim(),
                std::process::id(),
                rand::random::<u32>()
            ),
            group: group.to_owned(),
        }
    }
}

/// Until when the lease is certainly this sidecar's: [`TTL`] after the last call that took or
/// renewed it was *sent* (PostgreSQL counts the TTL from when it ran the call, later, so this
/// errs early). Past it another sidecar may hold the lease before this one has heard of it — a
/// stalled process learns it only from its next renewal — so whatever says "this sidecar leads"
/// (the `cqrs_leader` gauge, `/readyz`) asks this first.
#[derive(Clone, Debug)]
pub struct LeaseExpiry(Arc<Mutex<Instant>>);

impl LeaseExpiry {
    fn taken(sent: Instant) -> Self {
        Self(Arc::new(Mutex::new(sent + TTL)))
    }

    pub(crate) fn renewed(&self, sent: Instant) {
        let mut until = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *until = (*until).max(sent + TTL);
    }

    /// Whether the lease may no longer be this sidecar's.
    pub fn passed(&self) -> bool {
        let until = *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Instant::now() >= until
    }

    /// A lease that is certainly this sidecar's until `until` (tests of what reads it).
    #[cfg(test)]
    pub(crate) fn until(until: Instant) -> Self {
        Self(Arc::new(Mutex::new(until)))
    }
}

/// The lease, held while this value lives.
pub struct Leadership {
    client: Arc<Client>,
    candidate: Candidate,
    token: i64,
    expiry: LeaseExpiry,
    lost: watch::Receiver<bool>,
    monitor: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// The fencing token every batch carries.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// Until when the lease is certainly still this sidecar's.
    pub fn expiry(&self) -> LeaseExpiry {
        self.expiry.clone()
    }

    /// Becomes true when the lease may have been lost.
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Gives the lease up (on shutdown or failure), so that a standby takes it at once;
    /// dropping the connection would too.
    pub async fn release(self) {
        self.monitor.abort();
        let released = tokio::time::timeout(
            CALL_TIMEOUT,
            self.client.execute(
                "select cqrs.release_lead($1, $2)",
                &[&self.candidate.holder, &self.candidate.group],
            ),
        )
        .await;
        if !matches!(released, Ok(Ok(_))) {
            tracing::warn!("could not release the projector lease cleanly; it goes with the connection");
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // no renewal once the leadership is given up, whichever way
        self.monitor.abort();
    }
}

/// The connection the lease is taken and renewed on, kept across a standby's attempts.
struct LeaseConnection {
    client: Arc<Client>,
    lost_tx: watch::Sender<bool>,
    lost: watch::Receiver<bool>,
}

async fn open(db: &Database) -> Result<LeaseConnection, tokio_postgres::Error> {
    let config = db.config_for(ConnectionPurpose::Lease);
    let (client, connection) = config.connect(db.connector()).await?;
    let (lost_tx, lost) = watch::channel(false);
    let driver_lost = lost_tx.clone();
    tokio::spawn(async move {
        if let Err(err) = crate::postgres::drive(connection, ConnectionPurpose::Lease).await {
            tracing::warn!(error = %err, "the lease connection failed");
        }
        let _ = driver_lost.send(true);
    });
    Ok(LeaseConnection {
        client: Arc::new(client),
        lost_tx,
        lost,
    })
}

fn ttl_text() -> String {
    format!("{} ms", TTL.as_millis())
}

/// Why a lease call failed.
#[derive(Debug, thiserror::Error)]
enum LeaseError {
    /// PostgreSQL answered with an error (a missing privilege, say): it is reachable.
    #[error("PostgreSQL refused the lease call: {0}")]
    Refused(tokio_postgres::Error),
    #[error("the lease connection failed: {0}")]
    Connection(tokio_postgres::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One `cqrs.try_lead` call: the token when this holder leads, `None` when another does.
async fn try_lead(client: &Client, candidate: &Candidate) -> Result<Option<i64>, LeaseError> {
    let ttl = ttl_text();
    let args: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&candidate.holder, &ttl, &candidate.group];
    match tokio::time::timeout(CALL_TIMEOUT, client.query_one(TRY_LEAD, &args)).await {
        Ok(Ok(row)) => Ok(row.get(0)),
        Ok(Err(err)) if err.as_db_error().is_some() => Err(LeaseError::Refused(err)),
        Ok(Err(err)) => Err(LeaseError::Connection(err)),
        Err(_) => Err(LeaseError::Timeout(CALL_TIMEOUT)),
    }
}

impl LeaseConnection {
    /// Renews the lease (taken by a call sent at `sent`) while it is ours; signals `lost` when
    /// it may not be.
    fn lead(self, candidate: Candidate, token: i64, sent: Instant) -> Leadership {
        let client = Arc::clone(&self.client);
        let renewer = candidate.clone();
        let lost_tx = self.lost_tx;
        let expiry = LeaseExpiry::taken(sent);
        let renewed_until = expiry.clone();
        let monitor = tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let sent = Instant::now();
                match try_lead(&client, &renewer).await {
                    Ok(Some(renewed)) if renewed == token => renewed_until.renewed(sent),
                    Ok(other) => {
                        tracing::error!(token, now = ?other, "the projector lease was taken over; giving up leadership");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "renewing the projector lease failed; giving up leadership");
                        let _ = lost_tx.send(true);
                        return;
                    }
                }
            }
        });
        Leadership {
            client: self.client,
            candidate,
            token,
            expiry,
            lost: self.lost,
            monitor,
        }
    }
}

/// Waits until this sidecar holds the lease, standing by meanwhile; `None` on shutdown.
pub async fn acquire(
    db: &Database,
    candidate: &Candidate,
    shutdown: &mut watch::Receiver<bool>,
    health: &Health,
) -> Option<Leadership> {
    let mut announced = false;
    let mut connection: Option<LeaseConnection> = None;
    loop {
        if *shutdown.borrow() {
            return None;
        }
        if connection.as_ref().is_some_and(|c| *c.lost.borrow()) {
            connection = None;
        }
        if connection.is_none() {
            match open(db).await {
                Ok(opened) => connection = Some(opened),
                Err(err) => {
                    health.pg_reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %err, "cannot reach PostgreSQL to ask for the projector lease");
                }
            }
        }
        let mut pause = Duration::from_secs(1);
        if let Some(current) = connection.take() {
            let sent = Instant::now();
            match try_lead(&current.client, candidate).await {
                Ok(Some(token)) => {
                    health.pg_reachable.store(true, Ordering::Relaxed);
                    return Some(current.lead(candidate.clone(), token, sent));
                }
                Ok(None) => {
                    health.pg_reachable.store(true, Ordering::Relaxed);
                    health.set_role(Role::Standby);
                    if !announced {
                        tracing::info!("another sidecar holds the projector lease; standing by");
                        announced = true;
                    }
                    connection = Some(current);
                    pause = TRY_EVERY;
                }
                Err(err @ LeaseError::Refused(_)) => {
                    health.pg_reachable.store(true, Ordering::Relaxed);
                    health.set_role(Role::Standby);
                    tracing::error!(error = %err, "asking for the projector lease was refused (is this role a member of cqrs_projector?)");
                    connection = Some(current);
                }
                Err(err) => {
                    health.pg_reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %err, "asking for the projector lease failed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
    }
}
