//! `cqrs-bench load`: the design's load test. Writes go through `cqrs.append`, reads through the
//! sidecar's read API, keys chosen with a Zipf distribution; a live progress line and a final
//! table (achieved rates, latency percentiles, projection lag, cache hit ratio, errors), then
//! read-your-writes waits against the lag, and the naive read (folding the command-side rows
//! at query time) against the read API.
//!
//! Phases: a preload (orders for the readers to read), reads only (what Redis serves), then
//! writes and reads together.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Distribution, Zipf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::lag::LagProbe;
use crate::report::{percentile, Table};
use crate::sidecar_bench::{append_backlog, events_behind};
use crate::stack::{authorization_header, Stack};
use crate::writers::{WriteStats, WriterOptions, Writers, Written};
use cqrs_harness::connect;

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Which edition of pg_cqrs to run on: `extension` (CREATE EXTENSION, a superuser) or
    /// `portable` (the PL/pgSQL edition installed by the database owner, as on managed PostgreSQL).
    #[arg(long, default_value = "extension", value_parser = crate::stack::parse_edition)]
    edition: cqrs_harness::edition::Edition,
    /// Commands per second through cqrs.append in the mixed phase.
    #[arg(long, default_value_t = 5_000.0)]
    write_rate: f64,
    /// Reads per second through the read API.
    #[arg(long, default_value_t = 10_000.0)]
    read_rate: f64,
    /// Seconds of writes and reads together.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds of reads only, before (0 skips it).
    #[arg(long, default_value_t = 15)]
    read_only_seconds: u64,
    /// Commands appended before the run, so that readers have orders to read.
    #[arg(long, default_value_t = 50_000)]
    preload: u64,
    /// Zipf exponent of the key distribution (higher: hotter hot keys).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Concurrent reader tasks (HTTP keep-alive connections).
    #[arg(long, default_value_t = 32)]
    readers: usize,
    /// Concurrent writer sessions (0: one per 150 commands/s, at most 32).
    #[arg(long, default_value_t = 0)]
    writers: usize,
    /// Reads of each kind for the naive-vs-read-API comparison.
    #[arg(long, default_value_t = 2_000)]
    compare: usize,
    /// Extra sidecar settings, e.g. --sidecar-env CQRS_BATCH_MAX_WAIT=10ms (repeatable).
    #[arg(long = "sidecar-env", value_parser = crate::sidecar_bench::parse_setting)]
    sidecar_env: Vec<(String, String)>,
}

/// How a read was answered.
#[derive(Default)]
struct ReadStats {
    from_cache: AtomicU64,
    from_postgres: AtomicU64,
    not_found: AtomicU64,
    errors: AtomicU64,
    window: Mutex<Vec<f64>>,
    all: Mutex<Vec<f64>>,
}

impl ReadStats {
    fn record(&self, took_ms: f64) {
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(took_ms);
        self.all.lock().unwrap_or_else(|p| p.into_inner()).push(took_ms);
    }

    fn answered(&self) -> u64 {
        self.from_cache.load(Ordering::Relaxed) + self.from_postgres.load(Ordering::Relaxed)
    }

    fn hit_ratio(&self) -> f64 {
        let answered = self.answered();
        if answered == 0 {
            return 0.0;
        }
        self.from_cache.load(Ordering::Relaxed) as f64 / answered as f64
    }

    fn failed(&self) -> u64 {
        self.not_found.load(Ordering::Relaxed) + self.errors.load(Ordering::Relaxed)
    }
}

/// Picks the keys readers read: half from the preloaded orders, half from the orders the
/// writers created that the projection has reached (the most recent hottest), each by Zipf
/// rank — so every read is of a key the projector has written.
struct KeyChooser {
    preloaded: Vec<String>,
    writes: Option<Arc<WriteStats>>,
    /// order_summary's checkpoint position, kept current by `follow_checkpoint`
    projected: Arc<AtomicI64>,
    zipf: f64,
}

impl KeyChooser {
    fn pick(&self, rng: &mut impl Rng) -> Option<String> {
        if let Some(writes) = self.writes.as_ref().filter(|_| rng.random_bool(0.5)) {
            let settled = writes.orders_up_to(self.projected.load(Ordering::Relaxed));
            if settled > 0 {
                let rank = zipf_rank(settled, self.zipf, rng);
                return writes.settled_order(settled - 1 - rank);
            }
        }
        if self.preloaded.is_empty() {
            return None;
        }
        let rank = zipf_rank(self.preloaded.len(), self.zipf, rng);
        Some(self.preloaded[rank].clone())
    }
}

/// Keeps `projected` at order_summary's checkpoint position, every 100 ms, until `stop`.
async fn follow_checkpoint(
    url: &str,
    projected: Arc<AtomicI64>,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    let client = connect(url).await?;
    Ok(tokio::spawn(async move {
        loop {
            if let Ok(row) = client
                .query_one(
                    "select coalesce(checkpoint_position, 0) from cqrs.projection_state where name = 'order_summary'",
                    &[],
                )
                .await
            {
                projected.store(row.get(0), Ordering::Relaxed);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }))
}

/// A rank in 0..n, rank 0 the most likely.
fn zipf_rank(n: usize, s: f64, rng: &mut impl Rng) -> usize {
    match Zipf::new(n as f64, s) {
        Ok(zipf) => (zipf.sample(rng) as usize).clamp(1, n) - 1,
        Err(_) => 0,
    }
}

struct Readers {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Readers {
    fn start(
        base: &str,
        authorization: &str,
        rate: f64,
        tasks: usize,
        keys: Arc<KeyChooser>,
        stats: Arc<ReadStats>,
    ) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(tasks)
            .default_headers(authorization_header(authorization)?)
            .build()?;
        let (stop, stopped) = watch::channel(false);
        let tasks = tasks.max(1);
        let period = Duration::from_secs_f64(tasks as f64 / rate.max(0.001));
        let handles = (0..tasks)
            .map(|task| {
                let (http, keys, stats, mut stopped) = (
                    http.clone(),
                    Arc::clone(&keys),
                    Arc::clone(&stats),
                    stopped.clone(),
                );
                let base = format!("{base}/v1/projections/order_summary/");
                tokio::spawn(async move {
                    tokio::time::sleep(period.mul_f64(task as f64 / tasks as f64)).await;
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    loop {
                        tokio::select! {
                            _ = tick.tick() => {}
                            _ = stopped.wait_for(|s| *s) => return,
                        }
                        let Some(key) = keys.pick(&mut rand::rng()) else {
                            continue;
                        };
                        let started = Instant::now();
                        let response = http.get(format!("{base}{key}")).send().await;
                        match response {
                            Ok(response) => {
                                let status = response.status().as_u16();
                                let source = response
                                    .headers()
                                    .get("x-cqrs-source")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_owned();
                                // the body is part of the read
                                let body = response.bytes().await;
                                stats.record(started.elapsed().as_secs_f64() * 1000.0);
                                let counter = match (status, body.is_ok(), source.as_str()) {
                                    (200, true, "cache") => &stats.from_cache,
                                    (200, true, _) => &stats.from_postgres,
                                    (404, _, _) => &stats.not_found,
                                    _ => &stats.errors,
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                stats.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Ok(Self { stop, tasks: handles })
    }

    async fn finish(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Read-your-writes: for sampled appends, `GET …?after=stream:seq` right after the append
/// returned; the time until the answer is the wait an application sees.
fn read_your_writes(
    base: &str,
    http: reqwest::Client,
    mut written: mpsc::Receiver<Written>,
) -> JoinHandle<(Vec<f64>, u64)> {
    let base = format!("{base}/v1/projections/order_summary/");
    tokio::spawn(async move {
        let waits = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(AtomicU64::new(0));
        let mut inflight = Vec::new();
        while let Some(sample) = written.recv().await {
            let (http, waits, failures) = (http.clone(), Arc::clone(&waits), Arc::clone(&failures));
            let url = format!(
                "{base}{}?after={}:{}&timeout_ms=2000",
                sample.stream, sample.stream, sample.seq
            );
            inflight.push(tokio::spawn(async move {
                let ok = match http.get(url).send().await {
                    Ok(response) => response.status() == 200 && response.bytes().await.is_ok(),
                    Err(_) => false,
                };
                let waited = sample.committed.elapsed().as_secs_f64() * 1000.0;
                if ok {
                    waits.lock().unwrap_or_else(|p| p.into_inner()).push(waited);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for task in inflight {
            let _ = task.await;
        }
        let waits = std::mem::take(&mut *waits.lock().unwrap_or_else(|p| p.into_inner()));
        (waits, failures.load(Ordering::Relaxed))
    })
}

/// One phase's figures.
struct Phase {
    name: &'static str,
    seconds: f64,
    writes: u64,
    write_errors: u64,
    write_latencies: Vec<f64>,
    reads: Arc<ReadStats>,
    lags: Vec<f64>,
    lag_timeouts: u64,
}

// A script read top to bottom: preload, the phases, the naive comparison, the report.
pub async fn run(args: LoadArgs) -> Result<()> {
    println!("▶ starting PostgreSQL 15 (fsync on), redis-server, the order projections and a sidecar …");
    let mut stack = Stack::start(args.edition, true).await?;
    for (key, value) in &args.sidecar_env {
        stack.set(key, value);
    }
    stack.add_sidecar()?;
    let leader = stack.wait_for_leader(Duration::from_secs(30))?;
    let base = stack.http(leader);
    let url = stack.owner_url.clone();
    let client = stack.client().await?;

    println!("▶ preloading {} commands …", args.preload);
    append_backlog(&url, args.preload, 50).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while events_behind(&client).await? > 0 {
        if Instant::now() > deadline {
            bail!("the projections did not catch up with the preload in 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut preloaded: Vec<String> = client
        .query("select order_id from shop.order_summary", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // hot keys anywhere in the key space, not the first orders created
    preloaded.shuffle(&mut rand::rng());
    println!(
        "  {} orders projected; Redis holds {} entries",
        preloaded.len(),
        stack.cache_entries()
    );
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let mut phases = Vec::new();
    if args.read_only_seconds > 0 {
        println!(
            "▶ reads only: {:.0} reads/s for {} s, Zipf(s = {}) over {} orders …",
            args.read_rate,
            args.read_only_seconds,
            args.zipf,
            preloaded.len()
        );
        let keys = Arc::new(KeyChooser {
            preloaded: preloaded.clone(),
            writes: None,
            projected: Arc::new(AtomicI64::new(0)),
            zipf: args.zipf,
        });
        phases.push(phase(&stack, "reads only", &args, args.read_only_seconds, keys, None).await?);
    }
    println!(
        "▶ writes and reads: {:.0} commands/s and {:.0} reads/s for {} s …",
        args.write_rate, args.read_rate, args.seconds
    );
    let writes = Arc::new(WriteStats::default());
    let projected = Arc::new(AtomicI64::new(0));
    let (stop_following, stopped) = watch::channel(false);
    let follower = follow_checkpoint(&url, Arc::clone(&projected), stopped).await?;
    let keys = Arc::new(KeyChooser {
        preloaded: preloaded.clone(),
        writes: Some(Arc::clone(&writes)),
        projected,
        zipf: args.zipf,
    });
    let (written_tx, written_rx) = mpsc::channel(1024);
    let ryw = read_your_writes(&base, stack.read_client(reqwest::Client::builder())?, written_rx);
    phases.push(
        phase(
            &stack,
            "writes + reads",
            &args,
            args.seconds,
            keys,
            Some((writes, written_tx)),
        )
        .await?,
    );
    let _ = stop_following.send(true);
    let _ = follower.await;
    let (ryw_waits, ryw_failures) = ryw.await.context("the read-your-writes task failed")?;

    println!(
        "▶ the naive read vs the read API, {} reads each, idle …",
        args.compare
    );
    let compare = naive_vs_read_api(&stack, &base, &preloaded, &args).await?;

    println!(
        "\n▶ results — PostgreSQL, Redis, the sidecar and this load generator all share this \
         machine's {cores} cores"
    );
    let mut table = Table::new(&[
        "phase",
        "writes/s",
        "write p50/p95/p99 ms",
        "reads/s",
        "read p50/p95/p99 ms",
        "lag p50/p99/max ms",
        "hit ratio",
        "errors",
    ]);
    for p in &phases {
        let reads = p.reads.all.lock().unwrap_or_else(|e| e.into_inner()).clone();
        table.row(vec![
            p.name.to_owned(),
            format!("{:.0}", p.writes as f64 / p.seconds),
            triple(&p.write_latencies, &[50.0, 95.0, 99.0]),
            format!("{:.0}", reads.len() as f64 / p.seconds),
            triple(&reads, &[50.0, 95.0, 99.0]),
            if p.lags.is_empty() {
                "-".into()
            } else {
                format!(
                    "{}{}",
                    triple(&p.lags, &[50.0, 99.0, 100.0]),
                    if p.lag_timeouts > 0 {
                        format!(" ({} timed out)", p.lag_timeouts)
                    } else {
                        String::new()
                    }
                )
            },
            format!("{:.2} %", p.reads.hit_ratio() * 100.0),
            format!(
                "{} writes, {} reads, {} not found",
                p.write_errors,
                p.reads.errors.load(Ordering::Relaxed),
                p.reads.not_found.load(Ordering::Relaxed)
            ),
        ]);
    }
    table.print();
    let lag_p50 = phases.last().map_or(0.0, |p| percentile(&p.lags, 50.0));
    println!(
        "read-your-writes (GET ?after=stream:seq right after the append): {} samples, wait p50 {:.1} ms, p99 {:.1} ms, {} failed — lag p50 {:.1} ms",
        ryw_waits.len(),
        percentile(&ryw_waits, 50.0),
        percentile(&ryw_waits, 99.0),
        ryw_failures,
        lag_p50
    );
    Comparison::print(&compare);
    Ok(())
}

fn triple(values: &[f64], ps: &[f64; 3]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    format!(
        "{:.2} / {:.2} / {:.2}",
        percentile(values, ps[0]),
        percentile(values, ps[1]),
        percentile(values, ps[2])
    )
}

/// Runs readers (and writers, with `writes`) for `seconds` with a progress line each second.
// One piece: the tasks it starts and the per-second line share the counters it reports.
async fn phase(
    stack: &Stack,
    name: &'static str,
    args: &LoadArgs,
    seconds: u64,
    keys: Arc<KeyChooser>,
    writes: Option<(Arc<WriteStats>, mpsc::Sender<Written>)>,
) -> Result<Phase> {
    let url = stack.owner_url.clone();
    let reads = Arc::new(ReadStats::default());
    let leader = stack.sidecars.iter().position(|_| true).unwrap_or(0);
    let readers = Readers::start(
        &stack.http(leader),
        stack.authorization(),
        args.read_rate,
        args.readers,
        keys,
        Arc::clone(&reads),
    )?;
    let (writers, stats) = match writes {
        Some((stats, written)) => {
            let sessions = if args.writers > 0 {
                args.writers
            } else {
                ((args.write_rate / 150.0).ceil() as usize).clamp(2, 32)
            };
            let writers = Writers::start(
                &url,
                WriterOptions {
                    rate: args.write_rate,
                    sessions,
                    first_order: 300_000_000,
                    users: 5_000,
                    // ~20 read-your-writes checks per second
                    // each session samples every n-th of its own appends
                    sample_every: (args.write_rate / 20.0).max(1.0) as u64,
                },
                Arc::clone(&stats),
                Some(written),
            )
            .await?;
            (Some(writers), Some(stats))
        }
        None => (None, None),
    };
    let probe = match writers {
        Some(_) => Some(LagProbe::start(&url, 4, Duration::from_millis(200)).await?),
        None => None,
    };
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let (mut last_reads, mut last_writes, mut last_hits, mut last_answered) = (0u64, 0u64, 0u64, 0u64);
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        let read_window = std::mem::take(&mut *reads.window.lock().unwrap_or_else(|p| p.into_inner()));
        let total_reads = last_reads + read_window.len() as u64;
        let appended = stats.as_ref().map_or(0, |s| s.appended.load(Ordering::Relaxed));
        let write_window = stats.as_ref().map(|s| s.take_window()).unwrap_or_default();
        let (hits, answered) = (reads.from_cache.load(Ordering::Relaxed), reads.answered());
        let hit_ratio = if answered > last_answered {
            (hits - last_hits) as f64 / (answered - last_answered) as f64 * 100.0
        } else {
            0.0
        };
        let lag = match &probe {
            Some(probe) => {
                let lags = probe.window();
                format!(
                    "  lag p50 {:>6.1} p99 {:>6.1} ms",
                    percentile(&lags, 50.0),
                    percentile(&lags, 99.0)
                )
            }
            None => String::new(),
        };
        let write = if stats.is_some() {
            format!(
                "  writes {:>5}/s p99 {:>6.1} ms",
                appended - last_writes,
                percentile(&write_window, 99.0)
            )
        } else {
            String::new()
        };
        println!(
            "  t={:>3}s{write}  reads {:>6}/s p99 {:>6.2} ms  hits {hit_ratio:>6.2} %{lag}  errors {}",
            started.elapsed().as_secs(),
            read_window.len(),
            percentile(&read_window, 99.0),
            reads.failed() + stats.as_ref().map_or(0, |s| s.errors.load(Ordering::Relaxed))
        );
        (last_reads, last_writes, last_hits, last_answered) = (total_reads, appended, hits, answered);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let appended = stats.as_ref().map_or(0, |s| s.appended.load(Ordering::Relaxed));
    readers.finish().await;
    if let Some(writers) = writers {
        writers.finish().await?;
    }
    let (lags, lag_timeouts) = match probe {
        Some(probe) => probe.finish().await?,
        None => (Vec::new(), 0),
    };
    Ok(Phase {
        name,
        seconds: elapsed,
        writes: appended,
        write_errors: stats.as_ref().map_or(0, |s| s.errors.load(Ordering::Relaxed)),
        write_latencies: stats.map(|s| s.latencies()).unwrap_or_default(),
        reads,
        lags,
        lag_timeouts,
    })
}

/// What an application without read models runs to show an order: the order's command-side
/// rows, joined with its stream and folded at query time.
const NAIVE_ORDER_SUMMARY: &str = "
select s.stream, s.last_seq,
       min(l.payload->>'user_id') filter (where l.command_type = 'CREATE_ORDER') as user_id,
       min(l.payload->>'currency') filter (where l.command_type = 'CREATE_ORDER') as currency,
       case when bool_or(l.command_type = 'CANCEL_ORDER') then 'cancelled'
            when bool_or(l.command_type = 'SHIP_ORDER') then 'shipped' else 'open' end as status,
       coalesce(sum((l.payload->>'qty')::int) filter (where l.command_type = 'ADD_ITEM'), 0) as item_count,
       coalesce(sum((l.payload->>'amount')::numeric) filter (where l.command_type = 'ADD_ITEM'), 0) as total,
       min(l.created_at) as opened_at
  from cqrs.stream s
  join cqrs.command_log l on l.stream = s.stream
 where s.stream = $1
 group by s.stream, s.last_seq";

/// The same question asked of the command side: a user's order statistics, folded from every
/// order stream of that user at query time (no index can serve `payload ->> 'user_id'`).
const NAIVE_USER_STATS: &str = "
select l.payload->>'user_id' as user_id,
       count(*) filter (where l.command_type = 'CREATE_ORDER') as orders,
       count(distinct s.stream) as streams,
       coalesce(sum((l.payload->>'qty')::int) filter (where l.command_type = 'ADD_ITEM'), 0) as items,
       coalesce(sum((l.payload->>'amount')::numeric) filter (where l.command_type = 'ADD_ITEM'), 0) as spent,
       max(l.created_at) as last_command_at
  from cqrs.command_log l
  join cqrs.stream s on s.stream = l.stream
 where l.payload->>'user_id' = $1
 group by 1";

/// One read model read both ways.
struct Comparison {
    what: &'static str,
    naive: Vec<f64>,
    api: Vec<f64>,
}

impl Comparison {
    fn print(comparisons: &[Comparison]) {
        let mut table = Table::new(&["read", "samples", "p50 ms", "p95 ms", "p99 ms"]);
        for c in comparisons {
            for (how, values) in [
                (
                    "naive: folded from command_log rows at query time (SQL)",
                    &c.naive,
                ),
                ("read API (sidecar → Redis)", &c.api),
            ] {
                table.row(vec![
                    format!("{} — {how}", c.what),
                    values.len().to_string(),
                    format!("{:.3}", percentile(values, 50.0)),
                    format!("{:.3}", percentile(values, 95.0)),
                    format!("{:.3}", percentile(values, 99.0)),
                ]);
            }
        }
        table.print();
    }
}

/// `samples` Zipf-chosen keys of `projection` read both ways, one at a time from one client.
async fn compare(
    stack: &Stack,
    client: &tokio_postgres::Client,
    base: &str,
    (what, projection, naive_sql): (&'static str, &str, &str),
    keys: &[String],
    samples: usize,
    zipf: f64,
) -> Result<Comparison> {
    let naive = client.prepare(naive_sql).await?;
    let http = reqwest::Client::new();
    // a user's statistics are that user's: read each with a token of its own subject
    let authorization = |key: &str| -> Result<String> {
        Ok(if projection == "user_order_stats" {
            format!("Bearer {}", stack.token(key, &[projection])?)
        } else {
            stack.authorization().to_owned()
        })
    };
    let mut rng = rand::rng();
    let sample: Vec<&String> = (0..samples)
        .filter_map(|_| keys.get(zipf_rank(keys.len(), zipf, &mut rng)))
        .collect();
    let (mut naive_ms, mut api_ms) = (Vec::new(), Vec::new());
    for key in sample {
        let started = Instant::now();
        let rows = client.query(&naive, &[key]).await?;
        naive_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        if rows.is_empty() {
            bail!("the naive query found nothing for {key}");
        }
        let authorization = authorization(key)?;
        let started = Instant::now();
        let response = http
            .get(format!("{base}/v1/projections/{projection}/{key}"))
            .header(reqwest::header::AUTHORIZATION, authorization)
            .send()
            .await?;
        let status = response.status();
        response.bytes().await?;
        api_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        if status != 200 {
            bail!("the read API answered {status} for {projection}/{key}");
        }
    }
    Ok(Comparison {
        what,
        naive: naive_ms,
        api: api_ms,
    })
}

/// An order's summary (one stream) and a user's statistics (many streams), each read the naive
/// way and through the read API.
async fn naive_vs_read_api(
    stack: &Stack,
    base: &str,
    orders: &[String],
    args: &LoadArgs,
) -> Result<Vec<Comparison>> {
    let client = connect(&stack.owner_url).await?;
    let mut users: Vec<String> = client
        .query(
            "select user_id from shop.user_order_stats order by orders desc",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // the busiest users are not necessarily the hottest keys
    users.shuffle(&mut rand::rng());
    Ok(vec![
        compare(
            stack,
            &client,
            base,
            ("order summary (1 stream)", "order_summary", NAIVE_ORDER_SUMMARY),
            orders,
            args.compare,
            args.zipf,
        )
        .await?,
        // the naive user query scans the log: fewer samples
        compare(
            stack,
            &client,
            base,
            (
                "user order stats (many streams)",
                "user_order_stats",
                NAIVE_USER_STATS,
            ),
            &users,
            (args.compare / 10).max(1),
            args.zipf,
        )
        .await?,
    ])
}
