//! `cqrs-bench sidecar`: what the sidecar adds on top of the database.
//!
//! 1. A backlog of commands is appended (through `cqrs.append_batch`, many small transactions)
//!    while a pgoutput slot retains them.
//! 2. The in-database limit: `cqrs.project_batch` called directly on the same backlog (a copy of
//!    the database, in batches of the sidecar's maximum size, pre-built on the client).
//! 3. Catch-up: a release cqrs-sidecar started on the backlog, timed until every projection's
//!    checkpoint reaches the end of the log, its memory sampled all along.
//! 4. Live lag at chosen command rates: paced writers plus lag probes (commit → `cqrs.wait_for`
//!    says the read model has it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::cpu;
use crate::lag::LagProbe;
use crate::report::{percentile, Table};
use crate::stack::{memory_kib, Stack};
use crate::workload::OrderGenerator;
use crate::writers::{WriteStats, WriterOptions, Writers};
use cqrs_harness::connect;

/// The backlog a catch-up benchmark starts from, shared by `cqrs-bench sidecar` and `groups`.
#[derive(clap::Args, Debug)]
pub struct Backlog {
    /// Which edition of pg_cqrs to run on: `extension` (CREATE EXTENSION, a superuser) or
    /// `portable` (the PL/pgSQL edition installed by the database owner, as on managed PostgreSQL).
    #[arg(long, default_value = "extension", value_parser = crate::stack::parse_edition)]
    pub edition: cqrs_harness::edition::Edition,
    /// Commands in the backlog caught up on.
    #[arg(long, default_value_t = 500_000)]
    pub backlog: u64,
    /// Commands per cqrs.append_batch transaction while writing the backlog.
    #[arg(long, default_value_t = 50)]
    pub per_transaction: usize,
}

#[derive(clap::Args, Debug)]
pub struct SidecarArgs {
    #[command(flatten)]
    backlog: Backlog,
    /// Live command rates (commands/s) to measure lag at.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000")]
    rates: Vec<f64>,
    /// Seconds per live rate.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Extra sidecar settings, e.g. --sidecar-env CQRS_BATCH_MAX_WAIT=10ms (repeatable).
    #[arg(long = "sidecar-env", value_parser = parse_setting)]
    sidecar_env: Vec<(String, String)>,
}

pub(crate) fn parse_setting(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if key.starts_with("CQRS_") => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected CQRS_NAME=value, got {text:?}")),
    }
}

/// The sidecar's default `CQRS_BATCH_MAX_EVENTS`: the in-database limit is measured with
/// batches of the size the sidecar reaches on a backlog.
const SIDECAR_MAX_BATCH: usize = 5000;
const SLOT: &str = "cqrs_sidecar";
const PUBLICATION: &str = "cqrs_command_log";

// A script read top to bottom: backlog, in-database limit, sidecar catch-up, live rates, report.
pub async fn run(args: SidecarArgs) -> Result<()> {
    println!("▶ starting PostgreSQL 15 (fsync on), redis-server, the example order projections …");
    let mut stack = Stack::start(args.backlog.edition, true).await?;
    for (key, value) in &args.sidecar_env {
        stack.set(key, value);
    }
    {
        let client = stack.client().await?;
        retain_slot(&client).await?;
        println!(
            "▶ appending a backlog of {} commands ({} per transaction) while slot {SLOT} retains them …",
            args.backlog.backlog, args.backlog.per_transaction
        );
        let started = Instant::now();
        append_backlog(
            &stack.owner_url,
            args.backlog.backlog,
            args.backlog.per_transaction,
        )
        .await?;
        println!(
            "  {:.1} s ({:.0} commands/s)",
            started.elapsed().as_secs_f64(),
            args.backlog.backlog as f64 / started.elapsed().as_secs_f64()
        );
        client.batch_execute("checkpoint").await?;
    }

    let in_db = in_database_limit(&stack).await?;
    let catch_up = catch_up(&mut stack, args.backlog.backlog).await?;

    // the catch-up left autovacuum work on the big tables behind it; do it now so that the live
    // runs measure a steady state, not a vacuum that happens to start during one of them
    // (and a checkpoint, so that its writes do not land in the first live run)
    println!("▶ vacuum analyze and checkpoint after the catch-up …");
    let client = stack.client().await?;
    // separate statements: VACUUM cannot run in the implicit transaction of a batch
    client.batch_execute("vacuum analyze").await?;
    client.batch_execute("checkpoint").await?;

    let mut live = Vec::new();
    for &rate in &args.rates {
        live.push(live_lag(&stack, rate, args.seconds).await?);
    }
    let leader = stack.wait_for_leader(Duration::from_secs(10))?;
    // anything the sidecar found worth a warning during the run, so odd figures can be explained
    let log = stack.sidecars[leader].log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR") || line.contains("resync"))
        .collect();
    for line in warnings.iter().take(10) {
        println!("  sidecar: {line}");
    }
    let live_peak = stack.sidecars[leader]
        .pid()
        .and_then(memory_kib)
        .map(|(peak, _)| peak)
        .unwrap_or(0);

    println!(
        "\n▶ catch-up from a backlog of {} commands (order_summary + user_order_stats, Redis on)",
        args.backlog.backlog
    );
    let mut table = Table::new(&["path", "events/s", "ratio", "peak RSS"]);
    table.row(vec![
        format!("cqrs.project_batch directly, batches of {SIDECAR_MAX_BATCH} (in-database limit)"),
        format!("{:.0}", in_db),
        "1.00x".into(),
        "-".into(),
    ]);
    table.row(vec![
        "cqrs-sidecar: slot → project_batch → Redis".into(),
        format!("{:.0}", catch_up.events_per_second),
        format!("{:.2}x", catch_up.events_per_second / in_db),
        format!("{:.1} MiB", catch_up.peak_kib as f64 / 1024.0),
    ]);
    table.print();
    println!(
        "\n▶ live projection lag (commit → visible in order_summary via cqrs.wait_for), {} s per rate",
        args.seconds
    );
    let mut table = Table::new(&[
        "target cmd/s",
        "achieved cmd/s",
        "append p50 ms",
        "lag p50 ms",
        "lag p99 ms",
        "lag max ms",
        "probes",
    ]);
    for run in &live {
        table.row(vec![
            format!("{:.0}", run.target),
            format!("{:.0}", run.achieved),
            format!("{:.1}", run.append_p50),
            format!("{:.1}", percentile(&run.lags, 50.0)),
            format!("{:.1}", percentile(&run.lags, 99.0)),
            format!("{:.1}", percentile(&run.lags, 100.0)),
            format!(
                "{}{}",
                run.lags.len(),
                if run.timeouts > 0 {
                    format!(" ({} timed out)", run.timeouts)
                } else {
                    String::new()
                }
            ),
        ]);
    }
    table.print();
    println!("\n▶ CPU per 1,000 commands (ms; user + system, every thread; a core is 1,000 ms per second)");
    let mut header = vec!["phase"];
    header.extend(cpu::PROCESSES);
    let mut table = Table::new(&header);
    let mut row = |phase: String, cpu: &[Option<f64>; 4]| {
        let mut cells = vec![phase];
        cells.extend(cpu.iter().map(|value| cpu::cell(*value)));
        table.row(cells);
    };
    row("catch-up".into(), &catch_up.cpu);
    for run in &live {
        row(format!("live {:.0} cmd/s", run.target), &run.cpu);
    }
    table.print();
    println!(
        "sidecar peak RSS over the whole run: {:.1} MiB. PostgreSQL, Redis, the sidecar and this \
         load generator share the machine's {} cores.",
        live_peak as f64 / 1024.0,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}

/// The publication and the sidecar's slot, made before a backlog is appended so that the slot
/// retains it (the sidecar then streams the backlog rather than catching up from the log).
pub(crate) async fn retain_slot(client: &Client) -> Result<()> {
    client
        .execute("select cqrs.ensure_publication($1)", &[&PUBLICATION])
        .await?;
    client
        .execute(
            "select pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&SLOT],
        )
        .await?;
    Ok(())
}

/// Appends `count` order commands in transactions of `per_transaction`, from two sessions.
pub(crate) async fn append_backlog(url: &str, count: u64, per_transaction: usize) -> Result<()> {
    let sessions = 2u64;
    let mut tasks = Vec::new();
    for session in 0..sessions {
        let client = connect(url).await?;
        let share = count / sessions + u64::from(session < count % sessions);
        tasks.push(tokio::spawn(async move {
            let mut generator = OrderGenerator::new(session + 21, 1 + session * 50_000_000, 20_000, 1000);
            let statement = client
                .prepare("select count(*) from cqrs.append_batch($1)")
                .await?;
            let mut left = share;
            while left > 0 {
                let n = left.min(per_transaction as u64);
                let batch: Vec<Value> = (0..n)
                    .map(|_| {
                        let c = generator.next_command();
                        json!({"command_id": uuid::Uuid::now_v7().to_string(), "stream": c.stream,
                               "command_type": c.command_type, "payload": c.payload})
                    })
                    .collect();
                client.query_one(&statement, &[&Value::Array(batch)]).await?;
                left -= n;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// `cqrs.project_batch` on a copy of the database with the backlog (the slot stays with the
/// original), in batches pre-built on the client: events/s.
async fn in_database_limit(stack: &Stack) -> Result<f64> {
    let copy = format!("{}_limit", stack.pg.database());
    let admin = connect(&stack.pg.url_for("postgres")).await?;
    // CREATE DATABASE … TEMPLATE needs the original without sessions; ours close asynchronously
    let create = format!(
        "create database {} template {}",
        cqrs_harness::postgres::quote_ident(&copy),
        cqrs_harness::postgres::quote_ident(stack.pg.database())
    );
    let mut attempts = 0;
    while let Err(err) = admin.batch_execute(&create).await {
        attempts += 1;
        if attempts > 50 {
            return Err(err).context("copying the database for the in-database limit");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = connect(&stack.pg.url_for(&copy)).await?;
    println!("▶ in-database limit: building {SIDECAR_MAX_BATCH}-event batches of the backlog …");
    let batches = crate::projection_bench::log_batches(&client, SIDECAR_MAX_BATCH).await?;
    let events: usize = batches.iter().map(|b| b.as_array().map_or(0, Vec::len)).sum();
    let statement = client
        .prepare("select count(*) from cqrs.project_batch($1)")
        .await?;
    let started = Instant::now();
    for batch in &batches {
        client.query_one(&statement, &[batch]).await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    check_caught_up(&client).await?;
    println!(
        "  cqrs.project_batch: {events} events in {elapsed:.1} s ({:.0} events/s)",
        events as f64 / elapsed
    );
    drop(client);
    // the copy's files are large; drop it before the sidecar runs (retry: the session closes
    // asynchronously)
    let drop_copy = format!("drop database {}", cqrs_harness::postgres::quote_ident(&copy));
    for _ in 0..50 {
        if admin.batch_execute(&drop_copy).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(events as f64 / elapsed)
}

/// Fails unless every projection's checkpoint is at the end of the log.
async fn check_caught_up(client: &Client) -> Result<()> {
    let behind = events_behind(client).await?;
    if behind > 0 {
        bail!("a projection is {behind} events behind the log after the measurement");
    }
    Ok(())
}

/// Events between the least advanced projection's checkpoint and the end of the log (cheap: no
/// cqrs.status(), which counts per stream).
pub(crate) async fn events_behind(client: &Client) -> Result<i64> {
    Ok(client
        .query_one(
            "select coalesce((select max(position) from cqrs.command_log), 0)
                    - coalesce((select min(coalesce(checkpoint_position, 0)) from cqrs.projection_state), 0)",
            &[],
        )
        .await?
        .get(0))
}

struct CatchUp {
    events_per_second: f64,
    peak_kib: u64,
    /// CPU ms per 1,000 commands of each of [`cpu::PROCESSES`], from the first batch on
    cpu: [Option<f64>; 4],
}

/// Starts a sidecar on the backlog and times it until the projections reach the end of the log.
async fn catch_up(stack: &mut Stack, backlog: u64) -> Result<CatchUp> {
    println!("▶ catch-up: starting cqrs-sidecar on the backlog …");
    let client = stack.client().await?;
    let before = events_behind(&client).await?;
    if before < backlog as i64 {
        bail!("expected a backlog of {backlog} events, the projections are {before} behind");
    }
    let started = Instant::now();
    let sidecar = stack.add_sidecar()?;
    let pid = stack.sidecars[sidecar].pid().context("the sidecar has no pid")?;
    // metered from its first batch: the walsender and the projecting backend exist from then
    let mut meter = None;
    let mut peak = 0u64;
    let mut last_report = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some((hwm, _)) = memory_kib(pid) {
            peak = peak.max(hwm);
        }
        let behind = events_behind(&client).await?;
        if meter.is_none() && behind < before {
            meter = Some((
                cpu::Meter::start(&client, Some(pid), stack.redis.pid()).await?,
                behind,
            ));
        }
        if behind <= 0 {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            println!(
                "  t={:>3.0}s  {behind} events to go  sidecar RSS peak {:.1} MiB",
                started.elapsed().as_secs_f64(),
                peak as f64 / 1024.0
            );
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "the sidecar has not caught up after 10 minutes ({behind} behind); log:\n{}",
                stack.sidecars[sidecar].log()
            );
        }
        if !stack.sidecars[sidecar].is_running() {
            bail!(
                "the sidecar exited during catch-up; log:\n{}",
                stack.sidecars[sidecar].log()
            );
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some((hwm, _)) = memory_kib(pid) {
        peak = peak.max(hwm);
    }
    println!(
        "  caught up on {before} events in {elapsed:.1} s ({:.0} events/s, start-up included); \
         Redis holds {} entries",
        before as f64 / elapsed,
        stack.cache_entries()
    );
    Ok(CatchUp {
        events_per_second: before as f64 / elapsed,
        peak_kib: peak,
        cpu: meter.map_or([None; 4], |(meter, behind)| {
            meter.per_thousand(behind.max(1) as u64)
        }),
    })
}

struct LiveRun {
    target: f64,
    achieved: f64,
    append_p50: f64,
    lags: Vec<f64>,
    timeouts: u64,
    /// CPU ms per 1,000 commands of each of [`cpu::PROCESSES`]
    cpu: [Option<f64>; 4],
}

/// A CPU meter of the leading sidecar, its walsender and projecting backend, and redis-server.
async fn meter(stack: &Stack) -> Result<cpu::Meter> {
    let leader = stack.wait_for_leader(Duration::from_secs(10))?;
    let client = stack.client().await?;
    cpu::Meter::start(&client, stack.sidecars[leader].pid(), stack.redis.pid()).await
}

/// Paced writers at `rate` for `seconds`, with lag probes (40 per second) alongside.
async fn live_lag(stack: &Stack, rate: f64, seconds: u64) -> Result<LiveRun> {
    println!("▶ live: {rate:.0} commands/s for {seconds} s …");
    let url = stack.owner_url.clone();
    let stats = Arc::new(WriteStats::default());
    let meter = meter(stack).await?;
    // an append takes ~1–4 ms with fsync: enough sessions that pacing, not latency, sets the rate
    let sessions = ((rate / 150.0).ceil() as usize).clamp(2, 32);
    let writers = Writers::start(
        &url,
        WriterOptions {
            rate,
            sessions,
            first_order: 200_000_000 + rate as u64 * 1_000_000,
            users: 2_000,
            sample_every: 0,
        },
        Arc::clone(&stats),
        None,
    )
    .await?;
    let probe = LagProbe::start(&url, 4, Duration::from_millis(100)).await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let appended = stats.appended.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    writers.finish().await?;
    let (lags, timeouts) = probe.finish().await?;
    let client = stack.client().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while events_behind(&client).await? > 0 {
        if Instant::now() > deadline {
            bail!("the projections did not catch up within 60 s after the {rate} commands/s run");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let errors = stats.errors.load(Ordering::Relaxed);
    if errors > 0 {
        println!("  {errors} appends failed");
    }
    let run = LiveRun {
        target: rate,
        achieved: appended as f64 / elapsed,
        append_p50: percentile(&stats.latencies(), 50.0),
        lags,
        timeouts,
        cpu: meter.per_thousand(stats.appended.load(Ordering::Relaxed)),
    };
    println!(
        "  {:.0} commands/s achieved; lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        run.achieved,
        percentile(&run.lags, 50.0),
        percentile(&run.lags, 99.0),
        percentile(&run.lags, 100.0)
    );
    Ok(run)
}
