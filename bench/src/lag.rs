//! Projection lag as an application sees it: the time from a command's commit (its append
//! returned) until `cqrs.wait_for` says the read model has it. Probes append a `CREATE_ORDER`
//! to a stream of their own at a steady pace and wait for it in `order_summary`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use cqrs_harness::connect;

/// Longest a probe waits; a probe that times out is recorded at this value.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Samples {
    /// milliseconds, since the last `window()`
    window: Vec<f64>,
    all: Vec<f64>,
    timeouts: u64,
}

pub struct LagProbe {
    samples: Arc<Mutex<Samples>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<()>>>,
}

impl LagProbe {
    /// `probes` connections, each probing every `every`.
    pub async fn start(url: &str, probes: usize, every: Duration) -> Result<Self> {
        let samples = Arc::new(Mutex::new(Samples::default()));
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        for probe in 0..probes {
            let client = connect(url).await?;
            let (samples, mut stopped) = (Arc::clone(&samples), stopped.clone());
            let append = client
                .prepare("select seq from cqrs.append(cqrs.uuid_v7(), $1, 'CREATE_ORDER', '{\"user_id\": \"probe\", \"currency\": \"EUR\"}')")
                .await?;
            let wait = client
                .prepare("select cqrs.wait_for($1, $2, 'order_summary', $3::float8 * interval '1 second')")
                .await?;
            tasks.push(tokio::spawn(async move {
                // probes start spread over one period
                tokio::time::sleep(every.mul_f64(probe as f64 / probes as f64)).await;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let run = format!("{:08x}", rand::random::<u32>());
                for n in 0u64.. {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stopped.wait_for(|s| *s) => return Ok(()),
                    }
                    let stream = format!("probe-{run}-{probe}-{n}");
                    let seq: i64 = client.query_one(&append, &[&stream]).await?.get(0);
                    let committed = Instant::now();
                    let applied: bool = client
                        .query_one(&wait, &[&stream, &seq, &PROBE_TIMEOUT.as_secs_f64()])
                        .await?
                        .get(0);
                    let lag = committed.elapsed().as_secs_f64() * 1000.0;
                    let mut samples = samples.lock().unwrap_or_else(|p| p.into_inner());
                    samples.window.push(lag);
                    samples.all.push(lag);
                    samples.timeouts += u64::from(!applied);
                }
                Ok(())
            }));
        }
        Ok(Self { samples, stop, tasks })
    }

    /// Samples (ms) since the last call.
    pub fn window(&self) -> Vec<f64> {
        std::mem::take(&mut self.samples.lock().unwrap_or_else(|p| p.into_inner()).window)
    }

    /// Stops probing; returns every sample (ms) and how many timed out.
    pub async fn finish(self) -> Result<(Vec<f64>, u64)> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.await??;
        }
        let samples = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()));
        Ok((samples.all, samples.timeouts))
    }
}
