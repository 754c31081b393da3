//! Paced writers: sessions appending order commands through `cqrs.append` at a chosen total
//! rate, recording each append's latency, the orders created (for readers to read) and,
//! for a sample of appends, what a read-your-writes check needs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::workload::OrderGenerator;
use cqrs_harness::connect;

/// An append to check with a read-your-writes read.
pub struct Written {
    pub stream: String,
    pub seq: i64,
    pub committed: Instant,
}

#[derive(Default)]
pub struct WriteStats {
    pub appended: AtomicU64,
    pub errors: AtomicU64,
    /// append latencies (ms) since the last `take_window`
    window: Mutex<Vec<f64>>,
    all: Mutex<Vec<f64>>,
    /// order streams in creation order, with the log position of their CREATE_ORDER
    pub orders: RwLock<Vec<(i64, String)>>,
}

impl WriteStats {
    pub fn take_window(&self) -> Vec<f64> {
        std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn latencies(&self) -> Vec<f64> {
        self.all.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many order streams were created at or below log position `position` (the first
    /// ones in the list; commits out of position order blur the boundary by a few).
    pub fn orders_up_to(&self, position: i64) -> usize {
        let orders = self.orders.read().unwrap_or_else(|p| p.into_inner());
        orders.partition_point(|(at, _)| *at <= position)
    }

    /// The `index`-th order stream created.
    pub fn settled_order(&self, index: usize) -> Option<String> {
        let orders = self.orders.read().unwrap_or_else(|p| p.into_inner());
        orders.get(index).map(|(_, stream)| stream.clone())
    }
}

pub struct Writers {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<()>>>,
}

pub struct WriterOptions {
    pub rate: f64,
    pub sessions: usize,
    /// first order number (keeps runs and phases apart)
    pub first_order: u64,
    pub users: u64,
    /// every n-th append (0: none) is sent to `written`
    pub sample_every: u64,
}

impl Writers {
    pub async fn start(
        url: &str,
        options: WriterOptions,
        stats: Arc<WriteStats>,
        written: Option<mpsc::Sender<Written>>,
    ) -> Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let sessions = options.sessions.max(1);
        let period = Duration::from_secs_f64(sessions as f64 / options.rate.max(0.001));
        let mut tasks = Vec::new();
        for session in 0..sessions as u64 {
            let client = connect(url).await?;
            let append = client
                .prepare("select seq, position from cqrs.append($1, $2, $3, $4)")
                .await?;
            let (stats, mut stopped, written) = (Arc::clone(&stats), stopped.clone(), written.clone());
            let mut generator = OrderGenerator::new(
                options.first_order + session,
                options.first_order + session * 10_000_000,
                options.users,
                50,
            );
            let sample_every = options.sample_every;
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(period.mul_f64(session as f64 / sessions as f64)).await;
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                for n in 1u64.. {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stopped.wait_for(|s| *s) => return Ok(()),
                    }
                    let command = generator.next_command();
                    let started = Instant::now();
                    let result = client
                        .query_one(
                            &append,
                            &[
                                &Uuid::now_v7(),
                                &command.stream,
                                &command.command_type,
                                &command.payload,
                            ],
                        )
                        .await;
                    let took = started.elapsed().as_secs_f64() * 1000.0;
                    match result {
                        Ok(row) => {
                            let committed = Instant::now();
                            stats.appended.fetch_add(1, Ordering::Relaxed);
                            stats.window.lock().unwrap_or_else(|p| p.into_inner()).push(took);
                            stats.all.lock().unwrap_or_else(|p| p.into_inner()).push(took);
                            if command.command_type == "CREATE_ORDER" {
                                let mut orders = stats.orders.write().unwrap_or_else(|p| p.into_inner());
                                orders.push((row.get(1), command.stream.clone()));
                            }
                            if let Some(written) = written
                                .as_ref()
                                .filter(|_| sample_every > 0 && n % sample_every == 0)
                            {
                                // a full channel drops the sample rather than slow the writer
                                let _ = written.try_send(Written {
                                    stream: command.stream,
                                    seq: row.get(0),
                                    committed,
                                });
                            }
                        }
                        Err(_) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(())
            }));
        }
        Ok(Self { stop, tasks })
    }

    pub async fn finish(self) -> Result<()> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}
