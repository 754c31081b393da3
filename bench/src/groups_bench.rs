//! `cqrs-bench groups`: catch-up of a backlog with four projections in one projection group vs
//! two vs four, one sidecar leading each group, each group streaming its own slot.
//!
//! Each configuration gets a fresh stack (PostgreSQL with fsync, Redis): the four projections
//! (the two example ones and a copy of each) are spread over the groups, a slot per group is
//! created, the backlog is appended while the slots retain it, and the sidecars are started
//! together and timed until every projection's checkpoint is at the end of the log. What one
//! more slot costs the server — decoding the whole WAL again — is measured on its own: an extra
//! slot's `pg_logical_slot_peek_binary_changes` over the same backlog with the same publication.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::report::Table;
use crate::sidecar_bench::{append_backlog, events_behind, Backlog};
use crate::stack::Stack;

#[derive(clap::Args, Debug)]
pub struct GroupsArgs {
    #[command(flatten)]
    backlog: Backlog,
    /// The numbers of groups to compare (the first is the baseline).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    groups: Vec<usize>,
}

const SLOT: &str = "cqrs_sidecar";
const PUBLICATION: &str = "cqrs_command_log";
/// The slot only decoded by hand, for the cost of one more slot.
const DECODE_SLOT: &str = "cqrs_decode_cost";
const PROJECTIONS: [&str; 4] = [
    "order_summary",
    "order_summary_2",
    "user_order_stats",
    "user_order_stats_2",
];

/// The group names for `n` groups: `default` and `g1` … (the default group keeps --slot).
fn group_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i == 0 {
                "default".to_owned()
            } else {
                format!("g{i}")
            }
        })
        .collect()
}

struct Run {
    groups: usize,
    seconds: f64,
    events: i64,
    decode_seconds: Option<f64>,
}

pub async fn run(args: GroupsArgs) -> Result<()> {
    if args.groups.is_empty() || args.groups.iter().any(|&n| n == 0 || n > PROJECTIONS.len()) {
        bail!("--groups takes numbers from 1 to {}", PROJECTIONS.len());
    }
    let mut runs = Vec::new();
    for (i, &n) in args.groups.iter().enumerate() {
        runs.push(one_configuration(&args, n, i == 0).await?);
    }
    let base = runs[0].events as f64 / runs[0].seconds;
    println!(
        "\n▶ catch-up of a backlog of {} commands, four projections ({})",
        args.backlog.backlog,
        PROJECTIONS.join(", ")
    );
    let mut table = Table::new(&["groups (sidecars, slots)", "seconds", "events/s", "ratio"]);
    for run in &runs {
        let rate = run.events as f64 / run.seconds;
        table.row(vec![
            run.groups.to_string(),
            format!("{:.1}", run.seconds),
            format!("{rate:.0}"),
            format!("{:.2}x", rate / base),
        ]);
    }
    table.print();
    if let Some(decode) = runs.iter().find_map(|r| r.decode_seconds) {
        println!(
            "one more slot: decoding the backlog's WAL once more took {decode:.1} s of one backend \
             ({:.0} events/s; {:.0} % of the one-group catch-up's time)",
            runs[0].events as f64 / decode,
            100.0 * decode / runs[0].seconds
        );
    }
    println!(
        "PostgreSQL, Redis, the sidecars and this tool share the machine's {} cores.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}

async fn one_configuration(args: &GroupsArgs, n: usize, measure_decode: bool) -> Result<Run> {
    println!("▶ {n} group(s): starting PostgreSQL 15 (fsync on), redis-server, four projections …");
    let mut stack = Stack::start(args.backlog.edition, true).await?;
    let client = stack.client().await?;
    copy_projections(&client).await?;
    let groups = group_names(n);
    for (i, projection) in PROJECTIONS.iter().enumerate() {
        let group = &groups[i % n];
        client
            .query(
                "select count(*) from cqrs.move_projection($1, $2)",
                &[projection, group],
            )
            .await?;
    }
    client
        .execute("select cqrs.ensure_publication($1)", &[&PUBLICATION])
        .await?;
    let mut slots: Vec<String> = groups
        .iter()
        .map(|g| {
            if g == "default" {
                SLOT.to_owned()
            } else {
                format!("{SLOT}_{g}")
            }
        })
        .collect();
    if measure_decode {
        slots.push(DECODE_SLOT.to_owned());
    }
    for slot in &slots {
        client
            .execute(
                "select pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await?;
    }
    println!(
        "  appending a backlog of {} commands while {} slot(s) retain it …",
        args.backlog.backlog,
        slots.len()
    );
    append_backlog(
        &stack.owner_url,
        args.backlog.backlog,
        args.backlog.per_transaction,
    )
    .await?;
    client.batch_execute("checkpoint").await?;
    let decode_seconds = if measure_decode {
        Some(decode_cost(&client).await?)
    } else {
        None
    };
    let events = events_behind(&client).await?;
    let started = Instant::now();
    for group in &groups {
        stack.add_sidecar_in_group(group)?;
    }
    let mut last_report = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let behind = events_behind(&client).await?;
        if behind <= 0 {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            println!(
                "  t={:>3.0}s  {behind} events to go",
                started.elapsed().as_secs_f64()
            );
        }
        if started.elapsed() > Duration::from_secs(1200) {
            bail!("not caught up after 20 minutes ({behind} behind)");
        }
        if let Some(dead) = stack.sidecars.iter_mut().position(|s| !s.is_running()) {
            bail!(
                "sidecar {dead} exited during the catch-up; log:\n{}",
                stack.sidecars[dead].log()
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "  caught up on {events} events in {seconds:.1} s ({:.0} events/s, start-up included)",
        events as f64 / seconds
    );
    Ok(Run {
        groups: n,
        seconds,
        events,
        decode_seconds,
    })
}

/// A second order_summary and user_order_stats: the same tables and handlers under other names.
async fn copy_projections(client: &Client) -> Result<()> {
    client
        .batch_execute(
            "create table shop.order_summary_2 (like shop.order_summary including all);
             create table shop.user_order_stats_2 (like shop.user_order_stats including all);
             select cqrs.create_projection(p.name || '_2', (p.target::text || '_2')::regclass, p.key_column::text, p.handlers)
               from cqrs.projection p order by p.name;",
        )
        .await?;
    Ok(())
}

/// Seconds one slot takes to decode the whole backlog (peeked: nothing is consumed).
async fn decode_cost(client: &Client) -> Result<f64> {
    println!("  decoding the backlog once more with slot {DECODE_SLOT} (the cost of one more slot) …");
    let started = Instant::now();
    let row = client
        .query_one(
            "select count(*) from pg_catalog.pg_logical_slot_peek_binary_changes($1, null, null,
                 'proto_version', '1', 'publication_names', $2)",
            &[&DECODE_SLOT, &PUBLICATION],
        )
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    println!("  {} messages in {seconds:.1} s", row.get::<_, i64>(0));
    client
        .execute("select pg_catalog.pg_drop_replication_slot($1)", &[&DECODE_SLOT])
        .await?;
    Ok(seconds)
}
