//! Leader election: one sidecar per slot leads, holding a session advisory lock on a connection
//! of its own; the others stand by, each waiting for the lock in PostgreSQL one second at a
//! time (so a dead leader's lock passes on at once, and a standby still reports its health and
//! hears a shutdown every second). A leader whose lock connection
//! dies — or stops answering — learns it at once and stops streaming: the lock may already be
//! someone else's. (Fencing does not rely on this alone: batches carry the lease token and the
//! checkpoint LSN.)

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::http::{Health, Role};
use crate::postgres::Database;

/// Advisory lock class of the sidecar leader ("CQRL", apart from the "CQRS" class of
/// cqrs.wait_for); the second key is `hashtext(slot)`.
const LOCK_CLASS: i32 = 0x4351_524C;
/// How long one wait for the lock lasts (`lock_timeout` of the lock connection); also the pause
/// after a failed attempt.
const WAIT_AT_MOST: Duration = Duration::from_secs(1);
/// `lock_not_available`: the wait ran out, someone else leads.
const LOCK_NOT_AVAILABLE: &str = "55P03";
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// The lock, held while this value lives.
pub struct Leadership {
    client: Arc<Client>,
    lost: watch::Receiver<bool>,
    monitor: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Becomes true when the lock may have been lost.
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Gives the lock back (on shutdown); dropping the connection would too.
    pub async fn release(self, slot: &str) {
        self.monitor.abort();
        let unlocked = tokio::time::timeout(
            Duration::from_secs(2),
            self.client.execute(
                "select pg_catalog.pg_advisory_unlock($1, pg_catalog.hashtext($2))",
                &[&LOCK_CLASS, &slot],
            ),
        )
        .await;
        if !matches!(unlocked, Ok(Ok(_))) {
            tracing::warn!("could not release the leader lock cleanly; it goes with the connection");
        }
    }
}

/// The connection the lock is taken on, kept across a standby's attempts.
struct LockConnection {
    client: Arc<Client>,
    driver: tokio::task::JoinHandle<()>,
    lost_tx: watch::Sender<bool>,
    lost: watch::Receiver<bool>,
}

async fn open(db: &Database) -> Result<LockConnection, tokio_postgres::Error> {
    let (client, connection) = db.config.connect(db.connector()).await?;
    let wait = format!("{}ms", WAIT_AT_MOST.as_millis());
    let (lost_tx, lost) = watch::channel(false);
    let driver_lost = lost_tx.clone();
    let driver = tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "the leader lock connection failed");
        }
        let _ = driver_lost.send(true);
    });
    client
        .execute(
            "select pg_catalog.set_config('lock_timeout', $1, false)",
            &[&wait],
        )
        .await?;
    Ok(LockConnection {
        client: Arc::new(client),
        driver,
        lost_tx,
        lost,
    })
}

impl LockConnection {
    /// Waits for the lock (at most `WAIT_AT_MOST`): true once held, false when it ran out.
    async fn wait_for_lock(&self, slot: &str) -> Result<bool, tokio_postgres::Error> {
        let waited = self
            .client
            .execute(
                "select pg_catalog.pg_advisory_lock($1, pg_catalog.hashtext($2))",
                &[&LOCK_CLASS, &slot],
            )
            .await;
        match waited {
            Ok(_) => Ok(true),
            Err(err) if err.code().is_some_and(|c| c.code() == LOCK_NOT_AVAILABLE) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Watches the connection of the lock now held.
    fn lead(self) -> Leadership {
        let heartbeat_client = Arc::clone(&self.client);
        let (driver, lost_tx) = (self.driver, self.lost_tx);
        let monitor = tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT_EVERY).await;
                let alive =
                    tokio::time::timeout(HEARTBEAT_TIMEOUT, heartbeat_client.simple_query("select 1")).await;
                if !matches!(alive, Ok(Ok(_))) || driver.is_finished() {
                    tracing::error!("the leader lock connection stopped answering; giving up leadership");
                    let _ = lost_tx.send(true);
                    return;
                }
            }
        });
        Leadership {
            client: self.client,
            lost: self.lost,
            monitor,
        }
    }
}

/// Waits until this sidecar holds the lock, standing by meanwhile; `None` on shutdown.
pub async fn acquire(
    db: &Database,
    slot: &str,
    shutdown: &mut watch::Receiver<bool>,
    health: &Health,
) -> Option<Leadership> {
    let mut announced = false;
    let mut connection: Option<LockConnection> = None;
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
                    tracing::warn!(error = %err, "cannot reach PostgreSQL to try the leader lock");
                }
            }
        }
        if let Some(current) = connection.take() {
            let waited = tokio::select! {
                waited = current.wait_for_lock(slot) => waited,
                // dropping the connection ends the wait in PostgreSQL (or gives back a lock
                // granted in the meantime)
                _ = shutdown.changed() => return None,
            };
            match waited {
                Ok(true) => {
                    health.pg_reachable.store(true, Ordering::Relaxed);
                    return Some(current.lead());
                }
                Ok(false) => {
                    health.pg_reachable.store(true, Ordering::Relaxed);
                    health.set_role(Role::Standby);
                    if !announced {
                        tracing::info!(slot, "another sidecar leads; standing by");
                        announced = true;
                    }
                    // the wait itself was the pause: wait again at once
                    connection = Some(current);
                    continue;
                }
                Err(err) => {
                    health.pg_reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %err, "waiting for the leader lock failed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(WAIT_AT_MOST) => {}
            _ = shutdown.changed() => {}
        }
    }
}
