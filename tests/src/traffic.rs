//! Background writers that append a planned list of commands through `cqrs.append`, surviving
//! whatever the test does to the server meanwhile: a failed append is retried with the same
//! command id until it is known to be in the log (idempotency makes the retry safe), so when
//! `finish` returns every planned command is in the log exactly once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::connect;
use crate::orders::Command;

pub struct Traffic {
    appended: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
    writers: Vec<JoinHandle<Result<()>>>,
}

impl Traffic {
    /// Starts `clients` writers that append `commands` in order (spread over the writers) at
    /// about `rate` commands per second in total (`None`: as fast as they can), one command per
    /// transaction (`cqrs.append`).
    pub fn start(url: &str, commands: Vec<Command>, clients: usize, rate: Option<f64>) -> Self {
        Self::start_batched(url, commands, clients, rate, 1)
    }

    /// Like [`Traffic::start`], appending up to `per_transaction` consecutive commands in one
    /// transaction (`cqrs.append_batch`) — transactions larger than a sidecar batch are cut.
    pub fn start_batched(
        url: &str,
        commands: Vec<Command>,
        clients: usize,
        rate: Option<f64>,
        per_transaction: usize,
    ) -> Self {
        let commands = Arc::new(commands);
        let per_transaction = per_transaction.max(1);
        let next = Arc::new(AtomicUsize::new(0));
        let appended = Arc::new(AtomicU64::new(0));
        let retries = Arc::new(AtomicU64::new(0));
        let clients = clients.max(1);
        let pause =
            rate.map(|rate| Duration::from_secs_f64(clients as f64 * per_transaction as f64 / rate.max(1.0)));
        let writers = (0..clients)
            .map(|_| {
                let (url, commands, next) = (url.to_owned(), Arc::clone(&commands), Arc::clone(&next));
                let (appended, retries) = (Arc::clone(&appended), Arc::clone(&retries));
                tokio::spawn(async move {
                    let mut client = None;
                    let mut tick = pause.map(tokio::time::interval);
                    loop {
                        let at = next.fetch_add(per_transaction, Ordering::Relaxed);
                        let Some(chunk) = commands.get(at..(at + per_transaction).min(commands.len())) else {
                            return Ok(());
                        };
                        if chunk.is_empty() {
                            return Ok(());
                        }
                        if let Some(tick) = tick.as_mut() {
                            tick.tick().await;
                        }
                        // the same ids on every attempt: a retry of what did commit is a duplicate
                        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
                        let mut attempts = 0;
                        loop {
                            attempts += 1;
                            if client.is_none() {
                                client = connect(&url).await.ok();
                            }
                            let result = match client.as_ref() {
                                Some(c) => append(c, &ids, chunk).await,
                                None => Err(anyhow::anyhow!("not connected")),
                            };
                            match result {
                                Ok(()) => break,
                                Err(err) if attempts > 600 => bail!("appending kept failing: {err:#}"),
                                Err(_) => {
                                    retries.fetch_add(1, Ordering::Relaxed);
                                    if client.as_ref().is_some_and(|c| c.is_closed()) {
                                        client = None;
                                    }
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                        appended.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Self {
            appended,
            retries,
            writers,
        }
    }

    /// Commands appended so far.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    /// Appends that failed and were retried.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Waits until every planned command is in the log.
    pub async fn finish(self) -> Result<u64> {
        for writer in self.writers {
            writer.await??;
        }
        Ok(self.appended.load(Ordering::Relaxed))
    }
}

/// One command through `cqrs.append`, several through `cqrs.append_batch` (one transaction).
async fn append(client: &tokio_postgres::Client, ids: &[Uuid], commands: &[Command]) -> Result<()> {
    if let ([id], [command]) = (ids, commands) {
        client
            .execute(
                "select cqrs.append($1, $2, $3, $4)",
                &[id, &command.stream, &command.command_type, &command.payload],
            )
            .await?;
        return Ok(());
    }
    let batch: Vec<serde_json::Value> = ids
        .iter()
        .zip(commands)
        .map(|(id, c)| {
            serde_json::json!({
                "command_id": id.to_string(),
                "stream": c.stream,
                "command_type": c.command_type,
                "payload": c.payload,
            })
        })
        .collect();
    client
        .execute(
            "select count(*) from cqrs.append_batch($1)",
            &[&serde_json::Value::Array(batch)],
        )
        .await?;
    Ok(())
}
