//! `cqrs-bench scale`: what the scale-out pieces cost or give, in one run, as ratios.
//!
//! 1. **Reads on a Redis Cluster vs one Redis**: two sidecars over the same data, one caching in
//!    a single redis-server, one in a local six-node cluster (three masters); paced cache-hit
//!    reads at the same rate against each, interleaved rounds; p50/p99 and their ratios.
//! 2. **Cache writes (the projector's) on both**: the sidecar's own cache client writing batches
//!    of rows through the revision-guarded script — one pipeline to one server, concurrent
//!    per-node sends to the cluster; rows per second and the ratio.
//! 3. **Cache misses with and without a read replica**: closed-loop reads that all miss (absent
//!    rows) against a sidecar reading the primary and one reading a streaming replica.
//!
//! Everything runs on this machine: a cluster's three masters and a replica share its cores
//! with the primary and the sidecars, so the figures say what the pieces cost here, not what
//! they give on machines of their own (see the README's "Scaling out").

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cqrs_harness::RedisCluster;
use cqrs_sidecar::cache::{Cache, Entry, Ttls, Write};

use crate::read_bench::{capacity, paced, read_one, Outcome, PacedReads, Reads};
use crate::report::{median, percentile, Table};
use crate::sidecar_bench::{append_backlog, events_behind};
use crate::stack::Stack;

#[derive(clap::Args, Debug)]
pub struct ScaleArgs {
    #[command(flatten)]
    paced: PacedReads,
    /// Rows written per round of the cache-write comparison.
    #[arg(long, default_value_t = 50_000)]
    write_rows: usize,
    /// Rows per batch of the cache-write comparison (the projector's batch).
    #[arg(long, default_value_t = 2_000)]
    write_batch: usize,
    /// Closed-loop readers of the cache-miss comparison.
    #[arg(long, default_value_t = 16)]
    miss_readers: usize,
}

fn ms(value: f64) -> String {
    format!("{value:.2}")
}

/// Rows per second `cache` takes in batches of `batch` (revisions above anything written before).
async fn write_rate(cache: &Cache, rows: usize, batch: usize, base_rev: i64) -> Result<f64> {
    let started = Instant::now();
    let mut written = 0;
    while written < rows {
        let writes: Vec<Write> = (written..(written + batch).min(rows))
            .map(|i| Write {
                projection: "bench_scale".to_owned(),
                key: format!("row-{}", i % 10_000),
                rev: base_rev + i as i64,
                entry: Entry::Row(format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(120))),
            })
            .collect();
        let applied = cache.write_all(&writes, &[]).await?;
        if applied != writes.len() {
            bail!("{} of {} cache writes took effect", applied, writes.len());
        }
        written += writes.len();
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

// A script read top to bottom: set-up, reads, writes, misses, report.
pub async fn run(args: ScaleArgs) -> Result<()> {
    println!("▶ starting PostgreSQL 15 (fsync on), redis-server, a six-node Redis Cluster and a streaming replica …");
    let mut stack = Stack::start(cqrs_harness::Edition::Extension, true).await?;
    let cluster = tokio::task::spawn_blocking(RedisCluster::start).await??;
    let replica = {
        let primary = &stack.pg;
        primary.start_replica()?
    };
    stack.set("CQRS_EXPOSE", "*");
    stack.set("CQRS_READ_AUTH", "none");
    let single = stack.add_sidecar()?;
    stack.wait_for_leader(Duration::from_secs(30))?;
    stack.set("CQRS_REDIS_CLUSTER_NODES", &cluster.seeds());
    let clustered = stack.add_sidecar()?;
    stack.unset("CQRS_REDIS_CLUSTER_NODES");
    stack.set("CQRS_READ_REPLICA_URLS", &replica.url());
    stack.set("CQRS_READ_REPLICA_MAX_STALENESS", "5s");
    let replicated = stack.add_sidecar()?;
    stack.unset("CQRS_READ_REPLICA_URLS");
    for sidecar in [clustered, replicated] {
        stack.sidecars[sidecar].wait_ready(Duration::from_secs(30))?;
    }

    println!("▶ appending {} order commands …", args.paced.preload);
    append_backlog(&stack.owner_url, args.paced.preload, 50).await?;
    let client = stack.client().await?;
    while events_behind(&client).await? > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let users: Vec<(String, String)> = client
        .query("select user_id from shop.user_order_stats", &[])
        .await?
        .iter()
        .map(|row| (row.get(0), String::new()))
        .collect();
    if users.is_empty() {
        bail!("no users to read");
    }
    let users = Arc::new(users);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(4096)
        .build()?;
    // every row once through each: both caches hold every row from here on
    for sidecar in [single, clustered] {
        let warm = Outcome::default();
        for user in users.iter() {
            read_one(
                &http,
                &stack.http(sidecar),
                std::slice::from_ref(user),
                Reads::Stats,
                &warm,
            )
            .await;
        }
    }

    println!(
        "▶ {} rounds × {} s at {:.0} cache-hit reads/s: one Redis vs a Redis Cluster",
        args.paced.rounds, args.paced.seconds, args.paced.rate
    );
    let mut reads: Vec<(&str, Vec<[f64; 2]>, u64)> = vec![
        ("one redis-server", Vec::new(), 0),
        ("Redis Cluster, 3 masters", Vec::new(), 0),
    ];
    for round in 1..=args.paced.rounds {
        for (variant, sidecar) in [single, clustered].into_iter().enumerate() {
            let outcome = paced(
                &http,
                &stack.http(sidecar),
                &users,
                Reads::Stats,
                args.paced.rate,
                args.paced.seconds,
            )
            .await;
            let latencies = outcome.latencies();
            let p = [percentile(&latencies, 50.0), percentile(&latencies, 99.0)];
            let failed = outcome.shed.load(std::sync::atomic::Ordering::Relaxed)
                + outcome.other.load(std::sync::atomic::Ordering::Relaxed);
            println!(
                "  round {round}/{}  {:<26} {:>6} ok  p50 {} ms  p99 {} ms  {failed} not ok",
                args.paced.rounds,
                reads[variant].0,
                latencies.len(),
                ms(p[0]),
                ms(p[1])
            );
            reads[variant].1.push(p);
            reads[variant].2 += failed;
        }
    }

    println!(
        "▶ {} rounds: {} cache writes in batches of {} through the sidecar's cache client",
        args.paced.rounds, args.write_rows, args.write_batch
    );
    let ttls = Ttls {
        row: Duration::from_secs(600),
        tombstone: Duration::from_secs(60),
        missing: Duration::from_secs(2),
    };
    let one = Cache::new(&stack.redis.url(), "bench", ttls)?;
    let seeds = cqrs_sidecar::cache::cluster_seed_urls("redis://127.0.0.1/", &cluster.seeds())?;
    let many = Cache::cluster(&seeds, None, "bench", ttls)?;
    let mut writes: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..args.paced.rounds {
        for (variant, cache) in [&one, &many].into_iter().enumerate() {
            let base = (round * args.write_rows) as i64 + 1;
            let rate = write_rate(cache, args.write_rows, args.write_batch, base).await?;
            println!(
                "  round {}/{}  {:<26} {:>9.0} rows/s",
                round + 1,
                args.paced.rounds,
                reads[variant].0,
                rate
            );
            writes[variant].push(rate);
        }
    }

    println!(
        "▶ {} rounds × {} s of {} closed-loop readers whose reads all miss: primary vs replica",
        args.paced.rounds, args.paced.seconds, args.miss_readers
    );
    let mut misses: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=args.paced.rounds {
        for (variant, sidecar) in [single, replicated].into_iter().enumerate() {
            let rate = capacity(
                &http,
                &stack.http(sidecar),
                &users,
                Reads::Absent,
                args.miss_readers,
                args.paced.seconds,
            )
            .await;
            let name = ["the primary", "a streaming replica"][variant];
            println!(
                "  round {round}/{}  misses read from {name:<20} {rate:>8.0} reads/s",
                args.paced.rounds
            );
            misses[variant].push(rate);
        }
    }
    let replica_queries = cqrs_harness::http_get(
        stack.sidecars[replicated].admin_port(),
        "/metrics",
        Duration::from_secs(5),
    )
    .map(|(_, body)| {
        body.lines()
            .filter(|l| l.starts_with(cqrs_sidecar::metrics::READ_REPLICA_QUERIES_TOTAL))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    })
    .unwrap_or(0.0);

    let column = |rounds: &[[f64; 2]], i: usize| median(&rounds.iter().map(|p| p[i]).collect::<Vec<_>>());
    let mut table = Table::new(&[
        "reads at the paced rate",
        "p50 ms",
        "p99 ms",
        "not ok",
        "p50 ratio",
        "p99 ratio",
    ]);
    let base = [column(&reads[0].1, 0), column(&reads[0].1, 1)];
    for (name, rounds, failed) in &reads {
        let p = [column(rounds, 0), column(rounds, 1)];
        table.row(vec![
            (*name).to_owned(),
            ms(p[0]),
            ms(p[1]),
            failed.to_string(),
            format!("{:.2}x", p[0] / base[0].max(1e-9)),
            format!("{:.2}x", p[1] / base[1].max(1e-9)),
        ]);
    }
    println!("\nmedians of {} rounds:\n{}", args.paced.rounds, table.render());
    let mut table = Table::new(&["", "one Redis", "Redis Cluster", "ratio"]);
    let (w1, w2) = (median(&writes[0]), median(&writes[1]));
    table.row(vec![
        "cache writes, rows/s".to_owned(),
        format!("{w1:.0}"),
        format!("{w2:.0}"),
        format!("{:.2}x", w2 / w1.max(1e-9)),
    ]);
    table.print();
    let mut table = Table::new(&["", "primary", "replica", "ratio"]);
    let (m1, m2) = (median(&misses[0]), median(&misses[1]));
    table.row(vec![
        "cache misses, reads/s".to_owned(),
        format!("{m1:.0}"),
        format!("{m2:.0}"),
        format!("{:.2}x", m2 / m1.max(1e-9)),
    ]);
    table.print();
    println!("(the replica answered {replica_queries:.0} misses; the rest went to the primary)");
    stack.stop_sidecars();
    drop(replica);
    drop(cluster);
    Ok(())
}
