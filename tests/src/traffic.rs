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
    /// about `rate` commands per second in total (`None`: as fast as they can).
    pub fn start(url: &str, commands: Vec<Command>, clients: usize, rate: Option<f64>) -> Self {
        let commands = Arc::new(commands);
        let next = Arc::new(AtomicUsize::new(0));
        let appended = Arc::new(AtomicU64::new(0));
        let retries = Arc::new(AtomicU64::new(0));
        let clients = clients.max(1);
        let pause = rate.map(|rate| Duration::from_secs_f64(clients as f64 / rate.max(1.0)));
        let writers = (0..clients)
            .map(|_| {
                let (url, commands, next) = (url.to_owned(), Arc::clone(&commands), Arc::clone(&next));
                let (appended, retries) = (Arc::clone(&appended), Arc::clone(&retries));
                tokio::spawn(async move {
                    let mut client = None;
                    let mut tick = pause.map(tokio::time::interval);
                    loop {
                        let at = next.fetch_add(1, Ordering::Relaxed);
                        let Some(command) = commands.get(at) else {
                            return Ok(());
                        };
                        if let Some(tick) = tick.as_mut() {
                            tick.tick().await;
                        }
                        let id = Uuid::now_v7();
                        let mut attempts = 0;
                        loop {
                            attempts += 1;
                            if client.is_none() {
                                client = connect(&url).await.ok();
                            }
                            let result = match client.as_ref() {
                                Some(c) => c
                                    .execute(
                                        "select cqrs.append($1, $2, $3, $4)",
                                        &[&id, &command.stream, &command.command_type, &command.payload],
                                    )
                                    .await
                                    .map_err(anyhow::Error::from),
                                None => Err(anyhow::anyhow!("not connected")),
                            };
                            match result {
                                Ok(_) => break,
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
                        appended.fetch_add(1, Ordering::Relaxed);
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
