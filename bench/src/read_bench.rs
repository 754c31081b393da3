//! `cqrs-bench read`: what securing the read API costs, and what it does under overload.
//!
//! 1. **Authentication and row ownership vs none**, in one run: two sidecars over the same data,
//!    one serving every projection to anyone, one wanting a JWT and serving a user's
//!    `user_order_stats` row only to that user; paced reads of random users' rows at the same
//!    rate against each, in interleaved rounds; p50/p95/p99 of each and their ratios.
//! 2. **Load shedding**: the open sidecar's capacity (closed-loop readers as fast as they go),
//!    its unloaded latency (at a fifth of the paced rate), then an open-loop offered load of
//!    twice the capacity: the p99 of the reads admitted against the unloaded p99, and how many
//!    were shed with 503 instead of queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rand::seq::IndexedRandom;

use crate::report::{percentile, Table};
use crate::sidecar_bench::{append_backlog, events_behind};
use crate::stack::{Stack, READ_EXPOSURE};
use cqrs_harness::connect;

/// The shape of a paced read comparison, shared by `cqrs-bench read` and `cqrs-bench scale`.
#[derive(clap::Args, Debug)]
pub struct PacedReads {
    /// Reads per second of the comparison.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    /// Seconds per round and variant.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Interleaved rounds (medians of the rounds' percentiles are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Commands appended first, so that there are rows to read.
    #[arg(long, default_value_t = 20_000)]
    pub preload: u64,
}

#[derive(clap::Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    paced: PacedReads,
    /// Seconds of the overload (0 skips the shedding part).
    #[arg(long, default_value_t = 10)]
    overload_seconds: u64,
    /// `--read-max-concurrency` of the sidecar that is overloaded.
    #[arg(long, default_value_t = 8)]
    shed_concurrency: usize,
    /// `--read-queue-timeout` of the sidecar that is overloaded.
    #[arg(long, default_value = "2ms")]
    shed_queue_timeout: String,
    /// Which overloads to run: misses, hits, or both.
    #[arg(long, value_enum, default_value_t = Overloads::Both)]
    overload: Overloads,
    /// Overload over HTTP/2 (one connection, prior knowledge) instead of HTTP/1.1 keep-alive
    /// connections.
    #[arg(long)]
    http2: bool,
    /// `--read-max-connections` of the sidecar that is overloaded.
    #[arg(long, default_value_t = 64)]
    shed_connections: usize,
    /// `--read-pool-size` (PostgreSQL connections) of the sidecar that is overloaded.
    #[arg(long, default_value_t = 3)]
    shed_pg_pool: usize,
    /// CPU of the sidecar that is overloaded, in cores (a cgroup CPU quota, as a container limit
    /// would set): small enough that one core of generator can offer twice its capacity.
    #[arg(long, default_value_t = 0.25)]
    shed_cpu: f64,
}

/// A cgroup (v1 `cpu` controller) that limits the overloaded sidecar's CPU; removed on drop.
struct CpuLimit {
    dir: std::path::PathBuf,
}

const PERIOD_US: u64 = 4000;
const MIN_QUOTA_US: u64 = 1000;

impl CpuLimit {
    /// Quota per 4 ms period, so a throttled sidecar pauses for a few milliseconds at a time
    /// rather than for most of the default 100 ms period (the kernel's smallest quota is 1 ms).
    fn apply(pid: u32, cores: f64) -> Result<Self> {
        let dir = std::path::PathBuf::from(format!("/sys/fs/cgroup/cpu/cqrs_bench_{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|err| {
            anyhow::anyhow!(
                "cannot create {} (needs root and cgroup v1 cpu): {err}",
                dir.display()
            )
        })?;
        let limit = Self { dir };
        std::fs::write(limit.dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
        std::fs::write(
            limit.dir.join("cpu.cfs_quota_us"),
            ((cores * PERIOD_US as f64).round() as u64)
                .max(MIN_QUOTA_US)
                .to_string(),
        )?;
        std::fs::write(limit.dir.join("cgroup.procs"), pid.to_string())?;
        Ok(limit)
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // the sidecar has exited by now, which empties the group
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Gives the sidecar under overload one core and this generator the other (`taskset`): on two
/// shared cores a generator offering twice the sidecar's capacity starves the sidecar it
/// measures, and what it shows is the generator, not shedding.
fn split_cores(sidecar_pid: u32) -> Result<()> {
    for (core, pid) in [("1", sidecar_pid), ("0", std::process::id())] {
        let status = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", core, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            bail!("taskset -a -p -c {core} {pid} failed: {status}");
        }
    }
    Ok(())
}

/// What a run reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reads {
    /// a random user's stats, cached, without credentials
    Stats,
    /// a random user's stats with that user's token
    OwnStats,
    /// an order that does not exist, a new one each time: every read misses the cache and
    /// asks PostgreSQL (answered 404), so capacity is PostgreSQL's, not the sidecar's
    Absent,
}

/// The answers of one run of reads.
#[derive(Default)]
pub(crate) struct Outcome {
    ok_ms: Mutex<Vec<f64>>,
    pub(crate) shed: AtomicU64,
    pub(crate) other: AtomicU64,
}

impl Outcome {
    pub(crate) fn latencies(&self) -> Vec<f64> {
        self.ok_ms.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// One read of what `reads` says, of a random user.
pub(crate) async fn read_one(
    http: &reqwest::Client,
    base: &str,
    users: &[(String, String)],
    reads: Reads,
    outcome: &Outcome,
) {
    let Some((user, token)) = users.choose(&mut rand::rng()) else {
        return;
    };
    let request = match reads {
        Reads::Stats => http.get(format!("{base}/v1/projections/user_order_stats/{user}")),
        Reads::OwnStats => http
            .get(format!("{base}/v1/projections/user_order_stats/{user}"))
            .header(reqwest::header::AUTHORIZATION, token.as_str()),
        Reads::Absent => http.get(format!(
            "{base}/v1/projections/order_summary/absent-{}",
            rand::random::<u64>()
        )),
    };
    let answered = if reads == Reads::Absent { 404 } else { 200 };
    let started = Instant::now();
    let status = match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }
        Err(_) => 0,
    };
    match status {
        status if status == answered => {
            if let Ok(mut ok) = outcome.ok_ms.lock() {
                ok.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        503 => {
            outcome.shed.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            outcome.other.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Open-loop reads: `rate` per second for `seconds`, started on schedule whether or not the
/// earlier ones were answered (at most 4,096 in flight).
pub(crate) async fn paced(
    http: &reqwest::Client,
    base: &str,
    users: &Arc<Vec<(String, String)>>,
    reads: Reads,
    rate: f64,
    seconds: u64,
) -> Arc<Outcome> {
    let outcome = Arc::new(Outcome::default());
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            sent += 1;
            let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                outcome.other.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (http, base, users, outcome) = (
                http.clone(),
                base.to_owned(),
                Arc::clone(users),
                Arc::clone(&outcome),
            );
            tokio::spawn(async move {
                read_one(&http, &base, &users, reads, &outcome).await;
                drop(permit);
            });
        }
    }
    // let the last ones finish
    let _ = tokio::time::timeout(Duration::from_secs(10), in_flight.acquire_many(4096)).await;
    outcome
}

/// Closed-loop: `tasks` readers as fast as they are answered, for `seconds`; reads per second.
pub(crate) async fn capacity(
    http: &reqwest::Client,
    base: &str,
    users: &Arc<Vec<(String, String)>>,
    reads: Reads,
    tasks: usize,
    seconds: u64,
) -> f64 {
    let outcome = closed_loop(http, base, users, reads, tasks, seconds).await;
    outcome.latencies().len() as f64 / seconds as f64
}

/// `tasks` readers, each sending its next read when its last is answered, for `seconds`.
async fn closed_loop(
    http: &reqwest::Client,
    base: &str,
    users: &Arc<Vec<(String, String)>>,
    reads: Reads,
    tasks: usize,
    seconds: u64,
) -> Arc<Outcome> {
    let outcome = Arc::new(Outcome::default());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (http, base, users, outcome) = (
                http.clone(),
                base.to_owned(),
                Arc::clone(users),
                Arc::clone(&outcome),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    read_one(&http, &base, &users, reads, &outcome).await;
                }
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.await;
    }
    outcome
}

fn ms(value: f64) -> String {
    format!("{value:.2}")
}

// A script read top to bottom: set-up, the interleaved comparison, capacity, overload, report.
pub async fn run(args: ReadArgs) -> Result<()> {
    println!("▶ starting PostgreSQL 15 (fsync on), redis-server, the order projections and two sidecars …");
    let mut stack = Stack::start(cqrs_harness::Edition::Extension, true).await?;
    stack.set("CQRS_EXPOSE", "*");
    stack.set("CQRS_READ_AUTH", "none");
    let open = stack.add_sidecar()?;
    stack.wait_for_leader(Duration::from_secs(30))?;
    stack.set("CQRS_EXPOSE", READ_EXPOSURE);
    stack.set("CQRS_READ_AUTH", "jwt");
    let secured = stack.add_sidecar()?;
    stack.sidecars[secured].wait_ready(Duration::from_secs(30))?;

    println!("▶ appending {} order commands …", args.paced.preload);
    append_backlog(&stack.owner_url, args.paced.preload, 50).await?;
    let client = connect(&stack.owner_url).await?;
    while events_behind(&client).await? > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let users: Vec<(String, String)> = client
        .query("select user_id from shop.user_order_stats", &[])
        .await?
        .iter()
        .map(|row| {
            let user: String = row.get(0);
            let token = stack
                .token(&user, &["user_order_stats"])
                .map(|t| format!("Bearer {t}"));
            token.map(|t| (user, t))
        })
        .collect::<Result<_>>()?;
    if users.is_empty() {
        bail!("no users to read");
    }
    let users = Arc::new(users);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(4096)
        .build()?;
    // every row once from each sidecar: both answer from the cache from here on
    for (sidecar, reads) in [(open, Reads::Stats), (secured, Reads::OwnStats)] {
        let warm = Outcome::default();
        for (user, token) in users.iter() {
            read_one(
                &http,
                &stack.http(sidecar),
                &[(user.clone(), token.clone())],
                reads,
                &warm,
            )
            .await;
        }
        if warm.other.load(Ordering::Relaxed) > 0 {
            bail!(
                "{} reads of sidecar {sidecar} were refused or failed",
                warm.other.load(Ordering::Relaxed)
            );
        }
    }

    if args.paced.rounds > 0 {
        compare_auth(&stack, &http, &users, &args, open, secured).await;
    }
    if args.overload_seconds > 0 {
        stack.set("CQRS_EXPOSE", "*");
        stack.set("CQRS_READ_AUTH", "none");
        stack.set("CQRS_READ_MAX_CONCURRENCY", &args.shed_concurrency.to_string());
        stack.set("CQRS_READ_MAX_CONNECTIONS", &args.shed_connections.to_string());
        stack.set("CQRS_READ_QUEUE_TIMEOUT", &args.shed_queue_timeout);
        stack.set("CQRS_READ_PG_QUEUE_TIMEOUT", &args.shed_queue_timeout);
        stack.set("CQRS_READ_POOL_SIZE", &args.shed_pg_pool.to_string());
        let http = if args.http2 {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .http2_prior_knowledge()
                .build()?
        } else {
            http
        };
        if args.overload != Overloads::Hits {
            overload(&mut stack, &http, &users, &args, Overload::Misses).await?;
        }
        if args.overload != Overloads::Misses {
            overload(&mut stack, &http, &users, &args, Overload::CpuBoundHits).await?;
        }
    }
    stack.stop_sidecars();
    Ok(())
}

/// No authentication against JWT + row ownership: paced reads, the two variants interleaved.
async fn compare_auth(
    stack: &Stack,
    http: &reqwest::Client,
    users: &Arc<Vec<(String, String)>>,
    args: &ReadArgs,
    open: usize,
    secured: usize,
) {
    println!(
        "▶ {} rounds × {} s at {:.0} reads/s of user_order_stats ({} users): no auth vs JWT + row ownership",
        args.paced.rounds,
        args.paced.seconds,
        args.paced.rate,
        users.len()
    );
    let mut results: Vec<(&str, Vec<[f64; 3]>, u64)> = vec![
        ("no authentication (--read-auth none)", Vec::new(), 0),
        ("JWT (HS256) + row ownership (user_id = sub)", Vec::new(), 0),
    ];
    for round in 1..=args.paced.rounds {
        for (variant, (sidecar, reads)) in [(open, Reads::Stats), (secured, Reads::OwnStats)]
            .into_iter()
            .enumerate()
        {
            let outcome = paced(
                http,
                &stack.http(sidecar),
                users,
                reads,
                args.paced.rate,
                args.paced.seconds,
            )
            .await;
            let latencies = outcome.latencies();
            let p = [
                percentile(&latencies, 50.0),
                percentile(&latencies, 95.0),
                percentile(&latencies, 99.0),
            ];
            let failed = outcome.shed.load(Ordering::Relaxed) + outcome.other.load(Ordering::Relaxed);
            println!(
                "  round {round}/{}  {:<44} {:>6} ok  p50 {} ms  p95 {} ms  p99 {} ms  {failed} not ok",
                args.paced.rounds,
                results[variant].0,
                latencies.len(),
                ms(p[0]),
                ms(p[1]),
                ms(p[2])
            );
            results[variant].1.push(p);
            results[variant].2 += failed;
        }
    }
    let medians: Vec<[f64; 3]> = results
        .iter()
        .map(|(_, rounds, _)| {
            let column = |i: usize| crate::report::median(&rounds.iter().map(|p| p[i]).collect::<Vec<_>>());
            [column(0), column(1), column(2)]
        })
        .collect();
    let mut table = Table::new(&[
        "variant",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "not ok",
        "p50 vs no auth",
        "p99 vs no auth",
    ]);
    for (i, (name, _, failed)) in results.iter().enumerate() {
        table.row(vec![
            (*name).to_owned(),
            ms(medians[i][0]),
            ms(medians[i][1]),
            ms(medians[i][2]),
            failed.to_string(),
            format!("{:.2}x", medians[i][0] / medians[0][0].max(1e-9)),
            format!("{:.2}x", medians[i][2] / medians[0][2].max(1e-9)),
        ]);
    }
    println!(
        "\nread API at {:.0} reads/s, medians of {} rounds × {} s:\n{}",
        args.paced.rate,
        args.paced.rounds,
        args.paced.seconds,
        table.render()
    );
}

/// `--overload`: which of the overload runs to make.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Overloads {
    Misses,
    Hits,
    Both,
}

/// What is overloaded, and by what.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Overload {
    /// reads that all miss the cache: PostgreSQL (the read pool) is what runs out
    Misses,
    /// cache hits on a sidecar held to `--shed-cpu` of one core: its own CPU runs out
    CpuBoundHits,
}

/// A fresh sidecar with the shedding settings: unloaded p99, capacity, then twice the capacity
/// offered open-loop; prints what was answered, how fast, and what was shed.
async fn overload(
    stack: &mut Stack,
    http: &reqwest::Client,
    users: &Arc<Vec<(String, String)>>,
    args: &ReadArgs,
    what: Overload,
) -> Result<()> {
    // a sidecar held to a fraction of a core runs one runtime thread, as it should be configured
    stack.set(
        "CQRS_WORKER_THREADS",
        if what == Overload::CpuBoundHits { "1" } else { "2" },
    );
    let shedding = stack.add_sidecar()?;
    stack.sidecars[shedding].wait_ready(Duration::from_secs(30))?;
    let (reads, answered, title) = match what {
        Overload::Misses => (
            Reads::Absent,
            "answered 404",
            "cache misses, PostgreSQL-bound (no CPU split)".to_owned(),
        ),
        Overload::CpuBoundHits => (
            Reads::Stats,
            "answered 200",
            format!(
                "cache hits, sidecar held to {} of core 1, generator on core 0",
                args.shed_cpu
            ),
        ),
    };
    let cpu_limit = if what == Overload::CpuBoundHits {
        let pid = stack.sidecars[shedding]
            .pid()
            .ok_or_else(|| anyhow::anyhow!("the shedding sidecar has no pid"))?;
        split_cores(pid)?;
        Some(CpuLimit::apply(pid, args.shed_cpu)?)
    } else {
        None
    };
    let base = stack.http(shedding);
    let calm_rate = args.paced.rate / 5.0;
    let calm = paced(http, &base, users, reads, calm_rate, args.paced.seconds).await;
    let calm_p99 = percentile(&calm.latencies(), 99.0);
    // as many closed-loop readers as the sidecar admits at once: more would be shed, and the
    // 503s would take the CPU whose capacity this measures
    let capacity = capacity(http, &base, users, reads, args.shed_concurrency, 5).await;
    let offered = 2.0 * capacity;
    {
        // what a 503 costs against an answer: closed-loop readers, four per slot, on keep-alive
        // connections, so that most are shed
        let probe = closed_loop(http, &base, users, reads, 4 * args.shed_concurrency, 5).await;
        println!(
            "▶ {} closed-loop readers: {:.0} answered/s + {:.0} shed/s",
            4 * args.shed_concurrency,
            probe.latencies().len() as f64 / 5.0,
            probe.shed.load(Ordering::Relaxed) as f64 / 5.0
        );
    }
    println!(
        "▶ {title}: capacity ({} closed-loop readers) {capacity:.0} reads/s; offering {offered:.0} reads/s for {} s …",
        args.shed_concurrency, args.overload_seconds
    );
    let loaded = paced(http, &base, users, reads, offered, args.overload_seconds).await;
    let mut table = Table::new(&[
        "load",
        &format!("reads/s {answered}"),
        "p50 ms",
        "p99 ms",
        "p99 vs unloaded",
        "shed (503)",
        "other",
    ]);
    for (load, outcome, seconds) in [
        (format!("unloaded ({calm_rate:.0}/s)"), &calm, args.paced.seconds),
        (
            format!("2× capacity ({offered:.0}/s offered)"),
            &loaded,
            args.overload_seconds,
        ),
    ] {
        let latencies = outcome.latencies();
        table.row(vec![
            load,
            format!("{:.0}", latencies.len() as f64 / seconds as f64),
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 99.0)),
            format!("{:.2}x", percentile(&latencies, 99.0) / calm_p99.max(1e-9)),
            outcome.shed.load(Ordering::Relaxed).to_string(),
            outcome.other.load(Ordering::Relaxed).to_string(),
        ]);
    }
    println!(
        "\nload shedding, {title} (--read-max-connections {}, --read-max-concurrency {}, --read-pool-size {}, --read-queue-timeout and --read-pg-queue-timeout {}):\n{}",
        args.shed_connections,
        args.shed_concurrency,
        args.shed_pg_pool,
        args.shed_queue_timeout,
        table.render()
    );
    let _ = stack.sidecars[shedding].terminate(Duration::from_secs(10));
    // the group is empty once the sidecar has exited
    drop(cpu_limit);
    Ok(())
}
