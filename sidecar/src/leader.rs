//! Leader election: one sidecar per slot leads, holding a session advisory lock on a connection
//! of its own; the others stand by, trying the lock every second. A leader whose lock connection
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
const RETRY_EVERY: Duration = Duration::from_secs(1);
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
    let (lost_tx, lost) = watch::channel(false);
    let driver_lost = lost_tx.clone();
    let driver = tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "the leader lock connection failed");
        }
        let _ = driver_lost.send(true);
    });
    Ok(LockConnection {
        client: Arc::new(client),
        driver,
        lost_tx,
        lost,
    })
}

impl LockConnection {
    async fn try_lock(&self, slot: &str) -> Result<bool, tokio_postgres::Error> {
        Ok(self
            .client
            .query_one(
                "select pg_catalog.pg_try_advisory_lock($1, pg_catalog.hashtext($2))",
                &[&LOCK_CLASS, &slot],
            )
            .await?
            .get(0))
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
            match current.try_lock(slot).await {
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
                    connection = Some(current);
                }
                Err(err) => {
                    health.pg_reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %err, "trying the leader lock failed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_EVERY) => {}
            _ = shutdown.changed() => {}
        }
    }
}
