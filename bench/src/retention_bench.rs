//! `cqrs-bench retention`: what a year of daily log partitions costs appends and catch-up
//! (issue 24: "a year of partitions with append and catch-up speed unchanged"), against the same
//! commands in one partition, measured in the same run, both editions.
//!
//! Each database holds `--commands` commands with UUIDv7 ids whose times spread over the last
//! 365 days, in streams of ten commands either short-lived (a stream's commands minutes apart)
//! or living all year (each stream's commands spread across the year, so its id-time range spans
//! every partition). The log is 0.2.0's unpartitioned one (the baseline: `create extension
//! pg_cqrs version '0.2.0'`, or the portable edition's frozen 0.2.0 script), one partition
//! (everything before today) or 365 daily ones. A projection counts each stream's commands;
//! `cqrs.catch_up` is timed from nothing applied (a new projection) and from each stream's last
//! five commands not applied (a sidecar that was down), and the sidecar's `cqrs._project_batch`
//! of the whole log in batches of 10,000 (each event looked up in the log by id and position),
//! `--rounds` times, interleaved; the fold is checked after each.

use std::time::Instant;

use anyhow::{ensure, Result};
use cqrs_harness::{ClusterOptions, PgCluster};

use crate::report::{median, Table};

#[derive(clap::Args, Debug)]
pub struct RetentionArgs {
    /// Commands in each database's log (ten per stream).
    #[arg(long, default_value_t = 100_000)]
    commands: u32,
    /// Interleaved rounds of each catch-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

#[derive(Clone, Copy, PartialEq)]
enum Edition {
    Extension,
    Portable,
}

impl Edition {
    fn name(self) -> &'static str {
        match self {
            Self::Extension => "extension",
            Self::Portable => "portable",
        }
    }
}

/// How long each stream lives.
#[derive(Clone, Copy, PartialEq)]
enum Streams {
    /// a stream's ten commands are consecutive in the log (minutes apart)
    ShortLived,
    /// a stream's ten commands are spread over the whole year
    YearLong,
}

impl Streams {
    fn name(self) -> &'static str {
        match self {
            Self::ShortLived => "short-lived streams",
            Self::YearLong => "streams living all year",
        }
    }
}

/// How the log is laid out.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// 0.2.0's log: one table, not partitioned (the baseline)
    Unpartitioned,
    /// this release's partitioned log with one partition holding every command
    OnePartition,
    /// this release's partitioned log, a partition a day
    Daily,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Self::Unpartitioned => "0.2.0 (unpartitioned)",
            Self::OnePartition => "one partition",
            Self::Daily => "365 partitions",
        }
    }
}

struct Log {
    edition: Edition,
    streams: Streams,
    layout: Layout,
    database: String,
    append_seconds: f64,
    fresh: Vec<f64>,
    behind: Vec<f64>,
    batches: Vec<f64>,
}

/// The projection every database catches up.
const PROJECTION: &str = "counts";

/// Commands per stream.
const PER_STREAM: u32 = 10;

/// Commands per stream left unapplied for the "sidecar was down" catch-up.
const LEFT_BEHIND: u32 = 5;

fn setup(cluster: &PgCluster, log: &mut Log, commands: u32) -> Result<()> {
    cluster.psql_in("postgres", &format!("create database {}", log.database))?;
    match (log.edition, log.layout) {
        (Edition::Extension, Layout::Unpartitioned) => {
            cluster.psql_in(&log.database, "create extension pg_cqrs version '0.2.0'")?;
        }
        (Edition::Extension, _) => {
            cluster.psql_in(&log.database, "create extension pg_cqrs")?;
        }
        (Edition::Portable, Layout::Unpartitioned) => {
            let frozen = crate::repo_file("sql/portable/releases/pg_cqrs--0.2.0.sql");
            let (ok, output) = cqrs_harness::edition::psql_file(
                cluster,
                "postgres",
                &log.database,
                &frozen.to_string_lossy(),
            )?;
            ensure!(ok, "installing the portable edition's 0.2.0 failed:\n{output}");
        }
        (Edition::Portable, _) => {
            cqrs_harness::edition::install_portable(cluster, "postgres", &log.database)?;
        }
    }
    if log.layout != Layout::Unpartitioned {
        // the first partition ends a year ago (or after every command's time, for one
        // partition), then one a day
        let first_ends = if log.layout == Layout::Daily {
            "now() - interval '365 days'"
        } else {
            "now() + interval '1 day'"
        };
        cluster.psql_in(
            &log.database,
            &format!(
                "do $$ declare p regclass; begin
                     for p in select l.partition from cqrs.log_partitions() l loop
                         perform cqrs._disown_log_partition(p); execute format('drop table %s', p);
                     end loop; end $$;
                 select cqrs._create_log_partition('command_log_start', '-infinity', date_bin('1 day', {first_ends}, '2000-01-01'));
                 select count(*) from cqrs.maintain();"
            ),
        )?;
    }
    cluster.psql_in(
        &log.database,
        &format!(
            "create table public.{PROJECTION} (stream text primary key, n int not null default 0, rev bigint not null default 0);
             select cqrs.create_projection('{PROJECTION}', 'public.{PROJECTION}', 'stream',
                                           '{{\"T\": {{\"action\": \"upsert\", \"add\": {{\"n\": {{\"const\": 1}}}}}}}}', backfill => false);"
        ),
    )?;
    let streams = commands / PER_STREAM;
    let stream = match log.streams {
        Streams::ShortLived => format!("g / {PER_STREAM}"),
        Streams::YearLong => format!("g % {streams}"),
    };
    let seconds_apart = 365.0 * 86_400.0 / f64::from(commands);
    let started = Instant::now();
    cluster.psql_in(
        &log.database,
        &format!(
            "create function pg_temp.v7(t timestamptz) returns uuid language sql as $$
                 select (lpad(to_hex((extract(epoch from t) * 1000)::bigint), 12, '0') || '7'
                         || substr(replace(gen_random_uuid()::text, '-', ''), 14))::uuid $$;
             select count(*) from generate_series(0, {commands} - 1) g,
               lateral cqrs.append(pg_temp.v7(now() - interval '1 hour' - ({commands} - g) * interval '{seconds_apart} seconds'),
                                   's-' || ({stream}), 'T', '{{}}') a;"
        ),
    )?;
    log.append_seconds = started.elapsed().as_secs_f64();
    cluster.psql_in(&log.database, "vacuum analyze")?;
    let partitions = cluster.psql_in(
        &log.database,
        "select count(distinct tableoid) from cqrs.command_log",
    )?;
    println!(
        "  {:<9} {:<24} {:<21} {:>3} table(s) used: {commands} commands appended in {:.1} s",
        log.edition.name(),
        log.streams.name(),
        log.layout.name(),
        partitions,
        log.append_seconds
    );
    Ok(())
}

/// Times `cqrs.catch_up` from the projection's current progress; checks the fold after it.
fn catch_up(cluster: &PgCluster, log: &Log, commands: u32) -> Result<f64> {
    let started = Instant::now();
    cluster.psql_in(
        &log.database,
        &format!("select count(*) from cqrs.catch_up('{PROJECTION}')"),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let folded = cluster.psql_in(
        &log.database,
        &format!("select coalesce(sum(n), 0) from public.{PROJECTION}"),
    )?;
    ensure!(
        folded == commands.to_string(),
        "{}: the read model counts {folded} commands after the catch-up, not {commands}",
        log.database
    );
    Ok(seconds)
}

/// Times the sidecar's `cqrs._project_batch` of the whole log, 10,000 events a batch, from
/// nothing applied (the batches made beforehand, not timed); checks the fold after it.
fn project_batches(cluster: &PgCluster, log: &Log, commands: u32) -> Result<f64> {
    forget_all(cluster, log)?;
    // 0.2.0's has no projection group
    let call = if log.layout == Layout::Unpartitioned {
        "cqrs._project_batch(b.events, null, null)"
    } else {
        "cqrs._project_batch(b.events, null, null, 'default')"
    };
    let out = cluster.psql_in(
        &log.database,
        &format!(
            "create temp table batches as
                 select (l.position - 1) / 10000 as n,
                        jsonb_agg(jsonb_build_object('position', l.position, 'command_id', l.command_id, 'stream', l.stream,
                                                     'seq', l.seq, 'command_type', l.command_type, 'payload', l.payload,
                                                     'metadata', l.metadata, 'created_at', l.created_at) order by l.position) as events
                   from cqrs.command_log l group by 1;
             create temp table started as select clock_timestamp() as at;
             select count(*) from batches b, lateral {call} x;
             select extract(epoch from clock_timestamp() - s.at) from started s;"
        ),
    )?;
    let seconds: f64 = out
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{}: no time in {out:?}", log.database))?;
    let folded = cluster.psql_in(
        &log.database,
        &format!("select coalesce(sum(n), 0) from public.{PROJECTION}"),
    )?;
    ensure!(
        folded == commands.to_string(),
        "{}: the read model counts {folded} commands after project_batch, not {commands}",
        log.database
    );
    Ok(seconds)
}

/// Forgets everything the projection applied.
fn forget_all(cluster: &PgCluster, log: &Log) -> Result<()> {
    cluster.psql_in(
        &log.database,
        &format!(
            "delete from cqrs.projection_stream where projection = '{PROJECTION}';
             truncate public.{PROJECTION};"
        ),
    )?;
    Ok(())
}

/// Forgets each stream's last commands, as if the sidecar had stopped before them.
fn forget_last(cluster: &PgCluster, log: &Log) -> Result<()> {
    cluster.psql_in(
        &log.database,
        &format!(
            "update cqrs.projection_stream set last_seq = last_seq - {LEFT_BEHIND} where projection = '{PROJECTION}';
             update public.{PROJECTION} set n = n - {LEFT_BEHIND};"
        ),
    )?;
    Ok(())
}

pub fn run(args: RetentionArgs) -> Result<()> {
    ensure!(
        args.commands >= PER_STREAM * 10,
        "--commands must be at least {}",
        PER_STREAM * 10
    );
    println!("starting a private PostgreSQL cluster …");
    let cluster = PgCluster::start(ClusterOptions::default())?;
    let mut logs = Vec::new();
    for edition in [Edition::Extension, Edition::Portable] {
        for streams in [Streams::ShortLived, Streams::YearLong] {
            for layout in [Layout::Unpartitioned, Layout::OnePartition, Layout::Daily] {
                logs.push(Log {
                    edition,
                    streams,
                    layout,
                    database: format!("log{}", logs.len()),
                    append_seconds: 0.0,
                    fresh: Vec::new(),
                    behind: Vec::new(),
                    batches: Vec::new(),
                });
            }
        }
    }
    for log in &mut logs {
        setup(&cluster, log, args.commands)?;
    }
    for round in 1..=args.rounds {
        for log in &mut logs {
            forget_all(&cluster, log)?;
            let fresh = catch_up(&cluster, log, args.commands)?;
            forget_last(&cluster, log)?;
            let behind = catch_up(&cluster, log, args.commands)?;
            let batches = project_batches(&cluster, log, args.commands)?;
            println!(
                "  round {round}/{}  {:<9} {:<24} {:<21} new projection {fresh:>6.2} s, last {LEFT_BEHIND} of each stream {behind:>6.2} s, project_batch {batches:>6.2} s",
                args.rounds,
                log.edition.name(),
                log.streams.name(),
                log.layout.name(),
            );
            log.fresh.push(fresh);
            log.behind.push(behind);
            log.batches.push(batches);
        }
    }

    let mut table = Table::new(&[
        "edition",
        "streams",
        "what",
        "0.2.0, s",
        "one partition, s",
        "365 partitions, s",
        "365 vs 0.2.0",
        "365 vs one",
    ]);
    let mut worst = f64::INFINITY;
    for group in logs.chunks(3) {
        let [old, one, daily] = group else {
            continue;
        };
        let rows: [(&str, [f64; 3]); 4] = [
            (
                "append (one session)",
                [old.append_seconds, one.append_seconds, daily.append_seconds],
            ),
            (
                "catch-up, new projection",
                [median(&old.fresh), median(&one.fresh), median(&daily.fresh)],
            ),
            (
                "catch-up, last 5 of each stream",
                [median(&old.behind), median(&one.behind), median(&daily.behind)],
            ),
            (
                "project_batch, batches of 10,000",
                [median(&old.batches), median(&one.batches), median(&daily.batches)],
            ),
        ];
        for (what, [old_s, one_s, daily_s]) in rows {
            let speed = |base: f64| base / daily_s.max(f64::EPSILON);
            if what.starts_with("catch-up") {
                worst = worst.min(speed(old_s));
            }
            table.row(vec![
                old.edition.name().to_owned(),
                old.streams.name().to_owned(),
                what.to_owned(),
                format!("{old_s:.2}"),
                format!("{one_s:.2}"),
                format!("{daily_s:.2}"),
                format!("{:.2}x", speed(old_s)),
                format!("{:.2}x", speed(one_s)),
            ]);
        }
    }
    println!(
        "\n{} commands in streams of {PER_STREAM}, ids over the last 365 days; medians of {} rounds (append: one run); \
         \"365 vs …\" is speed (above 1.00x: faster on 365 partitions)",
        args.commands, args.rounds
    );
    table.print();
    println!("slowest catch-up on 365 partitions: {worst:.2}x of 0.2.0's unpartitioned log");
    drop(cluster);
    Ok(())
}
