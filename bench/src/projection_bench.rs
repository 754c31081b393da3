//! `cqrs-bench project`: `cqrs.project_batch` of both editions (the extension, and the portable
//! PL/pgSQL edition in a second database of the same cluster, with the same log) on the example
//! projections against the plain baseline a hand-rolled projector would use — one
//! `insert … select … from jsonb_array_elements($1) on conflict (…) do update` per read-model
//! table per batch — for batches of 100, 1,000 and 10,000 events; then `cqrs.rebuild` of a large
//! log in both, and the peak memory of a backend projecting a 10,000-event batch.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cqrs_harness::{ClusterOptions, Durability, PgCluster};
use futures_util::SinkExt;
use serde_json::Value;
use tokio_postgres::Client;

use crate::report::{median, Table};
use crate::workload::OrderGenerator;
use cqrs_harness::connect;

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
    /// Leave the portable edition out.
    #[arg(long)]
    no_portable: bool,
}

/// The database of the same cluster that holds the portable edition.
const PORTABLE_DB: &str = "portable";

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
/// benchmark measures projecting, not appending. The rows go through a staging table, from which
/// each gets the partition its id names (id_time), as an append gives it.
pub async fn load_log(client: &Client, count: u64, seed: u64, first_order: u64) -> Result<()> {
    let mut generator = OrderGenerator::new(seed, first_order, (count / 20).max(100), 1000);
    client
        .batch_execute(
            "create temp table if not exists log_staging
                 (command_id uuid, stream text, seq bigint, command_type text, payload jsonb);
             truncate log_staging;",
        )
        .await?;
    let sink = client
        .copy_in("copy log_staging (command_id, stream, seq, command_type, payload) from stdin")
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
            "insert into cqrs.command_log (command_id, stream, seq, command_type, payload, id_time)
             select s.command_id, s.stream, s.seq, s.command_type, s.payload, cqrs.command_time(s.command_id)
               from log_staging s;
             truncate log_staging;
             insert into cqrs.stream (stream, last_seq, min_id_time, max_id_time)
             select stream, max(seq), min(id_time), max(id_time) from cqrs.command_log group by stream
               on conflict (stream) do update set last_seq = excluded.last_seq,
                   min_id_time = least(cqrs.stream.min_id_time, excluded.min_id_time),
                   max_id_time = greatest(cqrs.stream.max_id_time, excluded.max_id_time);
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
             truncate cqrs.projection_stream, cqrs.parked;
             update cqrs.projection_state set checkpoint_lsn = null, checkpoint_position = null;",
        )
        .await?;
    // a statement of its own: VACUUM cannot run in the implicit transaction of a batch. The
    // progress is truncated, as the baseline's tables are: deleted, its dead rows (the last
    // round's, never vacuumed within a run) were each round's to step over, not the baseline's.
    client.batch_execute("vacuum analyze shop.order_summary, shop.user_order_stats, bench.order_summary, bench.user_order_stats, cqrs.projection_state").await?;
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

/// The portable edition in its own database of `cluster`, with the example projections and the
/// same kind of log; a client on it.
async fn portable_database(cluster: &PgCluster, events: u64) -> Result<Client> {
    cluster.psql_in("postgres", &format!("create database {PORTABLE_DB}"))?;
    cqrs_harness::edition::install_portable(cluster, "postgres", PORTABLE_DB)?;
    let client = connect(&cluster.url_for(PORTABLE_DB)).await?;
    client
        .batch_execute(&std::fs::read_to_string(crate::repo_file(
            "sql/examples/orders.sql",
        ))?)
        .await?;
    client.batch_execute(BASELINE_TABLES).await?;
    load_log(&client, events, 11, 1).await?;
    Ok(client)
}

async fn rebuild(client: &Client, label: &str) -> Result<()> {
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
    println!("{label}: cqrs.rebuild('order_summary') of {total} commands: {events} events in {seconds:.1} s ({:.0} events/s; {wall:.1} s wall)", events as f64 / seconds);
    Ok(())
}

// A script read top to bottom: set-up, interleaved rounds, memory, rebuild, report.
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
    let portable = if args.no_portable {
        None
    } else {
        println!("installing the portable edition in database {PORTABLE_DB} with the same log …");
        Some(portable_database(&cluster, args.events).await?)
    };

    // per batch size: baseline, extension, portable events/s per round
    let mut results: Vec<(usize, [Vec<f64>; 3])> = Vec::new();
    let mut prepared = Vec::new();
    for &size in &args.batches {
        prepared.push((size, log_batches(&client, size).await?));
        results.push((size, [Vec::new(), Vec::new(), Vec::new()]));
    }
    for round in 1..=args.rounds {
        for (i, (size, batches)) in prepared.iter().enumerate() {
            reset(&client).await?;
            let baseline = run_baseline(&client, batches).await?;
            let ours = run_ours(&client, batches).await?;
            let rate = |took: Duration| args.events as f64 / took.as_secs_f64();
            let (b, o) = (rate(baseline), rate(ours));
            results[i].1[0].push(b);
            results[i].1[1].push(o);
            let mut line = format!("  round {round}/{}  batch {size:>6}  baseline {b:>9.0} events/s   project_batch {o:>9.0} events/s", args.rounds);
            if let Some(portable) = &portable {
                reset(portable).await?;
                // the portable database's own log: its batches carry its own positions
                let own = log_batches(portable, *size).await?;
                let p = rate(run_ours(portable, &own).await?);
                results[i].1[2].push(p);
                line.push_str(&format!("   portable {p:>9.0} events/s"));
            }
            println!("{line}");
        }
    }
    // sanity: what we measured must be the right read model
    for (label, client) in
        std::iter::once(("extension", &client)).chain(portable.iter().map(|p| ("portable", p)))
    {
        let row = client.query_one("select (select count(*) from shop.order_summary), (select count(*) from shop.user_order_stats), (select count(distinct stream) from cqrs.command_log)", &[]).await?;
        let (orders, users, expected): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if orders != expected || users == 0 {
            bail!("{label}: read model incomplete after the benchmark: {orders} orders (expected {expected}), {users} users");
        }
    }

    // peak memory of a fresh backend projecting one 10,000-event batch
    reset(&client).await?;
    let fresh = connect(&cluster.url()).await?;
    let big: Vec<Value> = log_batches(&fresh, 10_000).await?.into_iter().take(1).collect();
    let before = backend_peak_kib(&fresh).await?;
    run_ours(&fresh, &big).await?;
    let after = backend_peak_kib(&fresh).await?;

    let mut table = Table::new(&[
        "batch",
        "baseline events/s",
        "extension events/s",
        "extension / baseline",
        "portable events/s",
        "portable / baseline",
        "portable / extension",
    ]);
    for (size, [baseline, ours, portable]) in &results {
        let (b, o) = (median(baseline), median(ours));
        let p = if portable.is_empty() {
            f64::NAN
        } else {
            median(portable)
        };
        table.row(vec![
            size.to_string(),
            format!("{b:.0}"),
            format!("{o:.0}"),
            format!("{:.2}x", o / b),
            format!("{p:.0}"),
            format!("{:.2}x", p / b),
            format!("{:.2}x", p / o),
        ]);
    }
    println!("\nproject_batch (order_summary + user_order_stats) vs one insert … on conflict per table per batch — {} events, {} rounds, fsync on", args.events, args.rounds);
    table.print();
    println!(
        "peak backend memory projecting a 10,000-event batch (extension): {:.1} MiB (VmHWM {} → {} KiB)",
        (after.saturating_sub(before)) as f64 / 1024.0,
        before,
        after
    );

    if args.rebuild_commands > 0 {
        let more = args.rebuild_commands.saturating_sub(args.events);
        println!("\nwriting {more} more commands for the rebuild …");
        load_log(&client, more, 12, 100_000_000).await?;
        rebuild(&client, "extension").await?;
        if let Some(portable) = &portable {
            load_log(portable, more, 12, 100_000_000).await?;
            rebuild(portable, "portable").await?;
        }
    }
    drop(cluster);
    Ok(())
}
