//! `cqrs-bench project`: `cqrs.project_batch` on the example projections against the plain
//! baseline a hand-rolled projector would use — one
//! `insert … select … from jsonb_array_elements($1) on conflict (…) do update` per read-model
//! table per batch — for batches of 100, 1,000 and 10,000 events; then `cqrs.rebuild` of a large
//! log, and the peak memory of a backend projecting a 10,000-event batch.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cqrs_harness::{ClusterOptions, Durability, PgCluster};
use futures_util::SinkExt;
use serde_json::Value;
use tokio_postgres::Client;

use crate::demo::connect;
use crate::report::{median, Table};
use crate::workload::OrderGenerator;

#[derive(clap::Args, Debug)]
pub struct ProjectArgs {
    /// Events projected per measurement.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    batches: Vec<usize>,
    /// Interleaved rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Commands in the log for the rebuild measurement (0 skips it).
    #[arg(long, default_value_t = 2_400_000)]
    rebuild_commands: u64,
}

const BASELINE_TABLES: &str = "
create schema bench;
create table bench.order_summary (like shop.order_summary including all);
create table bench.user_order_stats (like shop.user_order_stats including all);";

/// The statements a hand-rolled projector would run per batch: last write wins per key (it is
/// not even correct for counters when a key appears twice in a batch — that is what pg_cqrs's
/// per-key fold is for).
const BASELINE_ORDERS: &str = "
insert into bench.order_summary as t (order_id, user_id, currency, status, item_count, total, carrier, opened_at, closed_at)
select distinct on (e->>'stream') e->>'stream', e->'payload'->>'user_id', coalesce(e->'payload'->>'currency', 'EUR'),
       case e->>'command_type' when 'SHIP_ORDER' then 'shipped' when 'CANCEL_ORDER' then 'cancelled' else 'open' end,
       coalesce((e->'payload'->>'qty')::int, 0), coalesce((e->'payload'->>'amount')::numeric, 0),
       e->'payload'->>'carrier', (e->>'created_at')::timestamptz, null
  from jsonb_array_elements($1) e
 order by e->>'stream', (e->>'position')::bigint desc
on conflict (order_id) do update set status = excluded.status, item_count = t.item_count + excluded.item_count,
       total = t.total + excluded.total, carrier = excluded.carrier";

const BASELINE_USERS: &str = "
insert into bench.user_order_stats as t (user_id, orders, open_orders, items, spent, last_order_at)
select distinct on (e->'payload'->>'user_id') e->'payload'->>'user_id',
       (e->>'command_type' = 'CREATE_ORDER')::int, (e->>'command_type' = 'CREATE_ORDER')::int,
       coalesce((e->'payload'->>'qty')::int, 0), coalesce((e->'payload'->>'amount')::numeric, 0),
       (e->>'created_at')::timestamptz
  from jsonb_array_elements($1) e
 order by e->'payload'->>'user_id', (e->>'position')::bigint desc
on conflict (user_id) do update set orders = t.orders + excluded.orders, open_orders = t.open_orders + excluded.open_orders,
       items = t.items + excluded.items, spent = t.spent + excluded.spent, last_order_at = excluded.last_order_at";

/// Writes `count` order commands straight into the log with COPY (and sets cqrs.stream): the
/// benchmark measures projecting, not appending.
pub async fn load_log(client: &Client, count: u64, seed: u64, first_order: u64) -> Result<()> {
    let mut generator = OrderGenerator::new(seed, first_order, (count / 20).max(100), 1000);
    let sink = client
        .copy_in("copy cqrs.command_log (command_id, stream, seq, command_type, payload) from stdin")
        .await?;
    let mut sink = Box::pin(sink);
    let mut seqs: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut buffer = String::with_capacity(1 << 20);
    for _ in 0..count {
        let command = generator.next_command();
        let seq = seqs.entry(command.stream.clone()).or_insert(0);
        *seq += 1;
        // text COPY: tab-separated, backslashes escaped (the payloads hold no tabs or newlines)
        let payload = command.payload.to_string().replace('\\', "\\\\");
        buffer.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            uuid::Uuid::now_v7(),
            command.stream,
            seq,
            command.command_type,
            payload
        ));
        if buffer.len() > (1 << 20) {
            sink.send(bytes::Bytes::from(std::mem::take(&mut buffer))).await?;
        }
    }
    if !buffer.is_empty() {
        sink.send(bytes::Bytes::from(buffer)).await?;
    }
    sink.as_mut().finish().await?;
    client
        .batch_execute(
            "insert into cqrs.stream (stream, last_seq) select stream, max(seq) from cqrs.command_log group by stream
               on conflict (stream) do update set last_seq = excluded.last_seq;
             analyze cqrs.command_log; analyze cqrs.stream;",
        )
        .await?;
    Ok(())
}

/// The log as JSON batches of `size` rows, in position order.
pub async fn log_batches(client: &Client, size: usize) -> Result<Vec<Value>> {
    let rows = client
        .query(
            "select jsonb_agg(to_jsonb(l) order by l.position) from
               (select l.*, (row_number() over (order by position) - 1) / $1 as batch from cqrs.command_log l) l
             group by l.batch order by l.batch",
            &[&(size as i64)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, Value>(0)).collect())
}

/// Empties the read models (ours and the baseline's) and the projections' progress.
async fn reset(client: &Client) -> Result<()> {
    client
        .batch_execute(
            "truncate shop.order_summary, shop.user_order_stats, bench.order_summary, bench.user_order_stats;
             delete from cqrs.projection_stream; delete from cqrs.parked;
             update cqrs.projection_state set checkpoint_lsn = null, checkpoint_position = null;",
        )
        .await?;
    // a statement of its own: VACUUM cannot run in the implicit transaction of a batch
    client.batch_execute("vacuum analyze shop.order_summary, shop.user_order_stats, bench.order_summary, bench.user_order_stats").await?;
    Ok(())
}

async fn run_ours(client: &Client, batches: &[Value]) -> Result<Duration> {
    let statement = client
        .prepare("select count(*) from cqrs.project_batch($1, $2::text::pg_lsn)")
        .await?;
    let started = Instant::now();
    for (i, batch) in batches.iter().enumerate() {
        let lsn = format!("0/{:X}", (i + 1) * 16);
        client.query_one(&statement, &[batch, &lsn]).await?;
    }
    Ok(started.elapsed())
}

async fn run_baseline(client: &Client, batches: &[Value]) -> Result<Duration> {
    let orders = client.prepare(BASELINE_ORDERS).await?;
    let users = client.prepare(BASELINE_USERS).await?;
    let started = Instant::now();
    for batch in batches {
        client.execute(&orders, &[batch]).await?;
        client.execute(&users, &[batch]).await?;
    }
    Ok(started.elapsed())
}

/// Peak resident memory (VmHWM) of the backend serving `client`, in KiB.
async fn backend_peak_kib(client: &Client) -> Result<u64> {
    let pid: i32 = client.query_one("select pg_backend_pid()", &[]).await?.get(0);
    let pid = u32::try_from(pid).context("a negative backend pid")?;
    crate::stack::memory_kib(pid)
        .map(|(peak, _)| peak)
        .context("reading the backend's /proc status")
}

pub async fn run(args: ProjectArgs) -> Result<()> {
    println!("starting a private PostgreSQL 15 cluster (fsync on) …");
    let cluster = tokio::task::spawn_blocking(|| {
        PgCluster::start(ClusterOptions {
            durability: Durability::Fsync,
            ..Default::default()
        })
    })
    .await??;
    let client = connect(&cluster.url()).await?;
    let examples = std::fs::read_to_string(crate::repo_file("sql/examples/orders.sql"))?;
    client.batch_execute(&examples).await?;
    client.batch_execute(BASELINE_TABLES).await?;
    println!("writing {} order commands into the log …", args.events);
    load_log(&client, args.events, 11, 1).await?;

    let mut results: Vec<(usize, Vec<f64>, Vec<f64>)> = Vec::new();
    let mut prepared = Vec::new();
    for &size in &args.batches {
        prepared.push((size, log_batches(&client, size).await?));
    }
    for &(size, _) in &prepared {
        results.push((size, Vec::new(), Vec::new()));
    }
    for round in 1..=args.rounds {
        for (i, (size, batches)) in prepared.iter().enumerate() {
            reset(&client).await?;
            let baseline = run_baseline(&client, batches).await?;
            let ours = run_ours(&client, batches).await?;
            let (b, o) = (
                args.events as f64 / baseline.as_secs_f64(),
                args.events as f64 / ours.as_secs_f64(),
            );
            println!("  round {round}/{}  batch {size:>6}  baseline {b:>9.0} events/s   project_batch {o:>9.0} events/s", args.rounds);
            results[i].1.push(b);
            results[i].2.push(o);
        }
    }
    // sanity: what we measured must be the right read model
    let (orders, users): (i64, i64) = {
        let row = client.query_one("select (select count(*) from shop.order_summary), (select count(*) from shop.user_order_stats)", &[]).await?;
        (row.get(0), row.get(1))
    };
    let expected_orders: i64 = client
        .query_one("select count(distinct stream) from cqrs.command_log", &[])
        .await?
        .get(0);
    if orders != expected_orders || users == 0 {
        bail!("read model incomplete after the benchmark: {orders} orders (expected {expected_orders}), {users} users");
    }

    // peak memory of a fresh backend projecting one 10,000-event batch
    reset(&client).await?;
    let fresh = connect(&cluster.url()).await?;
    let big: Vec<Value> = log_batches(&fresh, 10_000).await?.into_iter().take(1).collect();
    let before = backend_peak_kib(&fresh).await?;
    run_ours(&fresh, &big).await?;
    let after = backend_peak_kib(&fresh).await?;

    let mut table = Table::new(&["batch", "baseline events/s", "project_batch events/s", "ratio"]);
    for (size, baseline, ours) in &results {
        let (b, o) = (median(baseline), median(ours));
        table.row(vec![
            size.to_string(),
            format!("{b:.0}"),
            format!("{o:.0}"),
            format!("{:.2}x", o / b),
        ]);
    }
    println!("\nproject_batch (order_summary + user_order_stats) vs one insert … on conflict per table per batch — {} events, {} rounds, fsync on", args.events, args.rounds);
    table.print();
    println!(
        "peak backend memory projecting a 10,000-event batch: {:.1} MiB (VmHWM {} → {} KiB)",
        (after.saturating_sub(before)) as f64 / 1024.0,
        before,
        after
    );

    if args.rebuild_commands > 0 {
        println!(
            "\nwriting {} more commands for the rebuild …",
            args.rebuild_commands.saturating_sub(args.events)
        );
        load_log(
            &client,
            args.rebuild_commands.saturating_sub(args.events),
            12,
            100_000_000,
        )
        .await?;
        let total: i64 = client
            .query_one("select count(*) from cqrs.command_log", &[])
            .await?
            .get(0);
        client.batch_execute("checkpoint").await?;
        let started = Instant::now();
        let row = client
            .query_one("select events, seconds from cqrs.rebuild('order_summary')", &[])
            .await?;
        let (events, seconds): (i64, f64) = (row.get(0), row.get(1));
        let wall = started.elapsed().as_secs_f64();
        println!("cqrs.rebuild('order_summary') of {total} commands: {events} events in {seconds:.1} s ({:.0} events/s; {wall:.1} s wall)", events as f64 / seconds);
    }
    drop(cluster);
    Ok(())
}
