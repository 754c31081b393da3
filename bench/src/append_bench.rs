//! `cqrs-bench append`: pgbench against a private cluster (fsync on), comparing `cqrs.append` of
//! both editions (the extension, and the portable PL/pgSQL edition in a second database of the
//! same cluster) with two baselines on equivalent tables: the plain `insert … on conflict
//! (command_id) do nothing`, which keeps no per-stream sequence, and the cheapest correct
//! sequenced append — the stream row's update and the insert, one statement, one round trip —
//! which any gap-free per-stream sequence needs — on a plain table and on a table partitioned as
//! the log is (the cheapest correct sequenced append on a log that retention can shorten).
//! The partitioned log of 0.3.0 (retention) is measured against 0.2.0's unpartitioned one, each
//! in a database of its own (`create extension pg_cqrs` and `… version '0.2.0'`; the same library
//! serves both) that only these variants append to, so that both logs hold the same commands of
//! the same kinds: a random id's index insert costs more in a bigger index, and an earlier
//! version of this benchmark compared a log that two variants filled with random ids against one
//! filled by one. Random (v4) and time-ordered (v7) command ids.
//! Rounds are interleaved so that drift of this (shared, noisy) machine hits every variant alike;
//! every run starts right after a checkpoint (so each pays the same full-page images), the two
//! logs of a comparison run back to back in an order that alternates by round, and the medians,
//! their ratios and the ratio of each round are printed.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use cqrs_harness::{ClusterOptions, Durability, PgCluster};

use crate::report::{median, Table};

#[derive(clap::Args, Debug)]
pub struct AppendArgs {
    /// Client counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    clients: Vec<u32>,
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Interleaved rounds; the median of each variant is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Distinct streams the commands are spread over.
    #[arg(long, default_value_t = 10_000)]
    streams: u32,
}

struct Variant {
    name: &'static str,
    script: String,
    database: Database,
}

/// Where a variant runs.
#[derive(Clone, Copy, PartialEq)]
enum Database {
    /// the extension, 0.3.0 (the cluster's own database)
    Extension,
    /// the extension, 0.3.0, appended to only by the comparison with 0.2.0's log
    Partitioned,
    /// the portable edition
    Portable,
    /// the extension, installed as 0.2.0 (an unpartitioned log)
    Unpartitioned,
}

/// The second baseline: the statement pair any gap-free per-stream sequence needs.
const SEQUENCED_PAIR: &str = "baseline: stream update + insert";
/// The third: the same pair into a table partitioned as cqrs.command_log is (same bounds, same
/// keys in each partition, the same `on conflict do nothing`).
const SEQUENCED_PAIR_PARTITIONED: &str = "baseline: the pair, partitioned log";

/// The database of the same cluster that holds the portable edition.
const PORTABLE_DB: &str = "portable";

/// The database of the same cluster that holds the extension as release 0.2.0.
const UNPARTITIONED_DB: &str = "unpartitioned";

/// The database of the same cluster that holds the extension's partitioned log, for the
/// comparison with [`UNPARTITIONED_DB`] only.
const PARTITIONED_DB: &str = "partitioned";

/// The variants compared for the cost of the partitioned log.
const APPEND: &str = "cqrs.append";
const APPEND_PARTITIONED: &str = "cqrs.append, 0.3.0's partitioned log";
const APPEND_UNPARTITIONED: &str = "cqrs.append, 0.2.0's unpartitioned log";
const APPEND_V7: &str = "cqrs.append, UUIDv7 ids, 0.3.0's log";
const APPEND_V7_UNPARTITIONED: &str = "cqrs.append, UUIDv7 ids, 0.2.0's log";

const PAYLOAD: &str = r#"{"user_id": "u-42", "currency": "EUR", "note": "benchmark order"}"#;

const SCHEMA: &str = r#"{"type": "object", "required": ["user_id", "currency"],
  "properties": {"user_id": {"type": "string", "minLength": 1},
                 "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                 "note": {"type": "string", "maxLength": 200}},
  "additionalProperties": false}"#;

/// The schema issue 21 measures the portable validator with: ten properties, two formats, one
/// if/then.
const RICH_SCHEMA: &str = r#"{"type": "object", "required": ["order_id", "user_id", "currency", "total"],
  "properties": {"order_id": {"type": "string", "format": "uuid"},
                 "user_id": {"type": "string", "minLength": 1, "maxLength": 64},
                 "currency": {"enum": ["EUR", "USD", "GBP"]},
                 "total": {"type": "number", "minimum": 0},
                 "email": {"type": "string", "format": "email"},
                 "channel": {"type": "string", "pattern": "^[a-z]+$"},
                 "items": {"type": "integer", "minimum": 1},
                 "gift": {"type": "boolean"},
                 "coupon": {"type": ["string", "null"]},
                 "note": {"type": "string", "maxLength": 200}},
  "if": {"properties": {"gift": {"const": true}}, "required": ["gift"]},
  "then": {"required": ["note"]},
  "additionalProperties": false}"#;

const RICH_PAYLOAD: &str = r#"{"order_id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "user_id": "u-42", "currency": "EUR", "total": 12.5, "email": "buyer@example.com", "channel": "web", "items": 2, "gift": true, "coupon": null, "note": "benchmark order"}"#;

fn variants(streams: u32) -> Vec<Variant> {
    let header = format!("\\set sid random(1, {streams})\n");
    vec![
        Variant {
            name: "baseline insert",
            script: format!(
                "{header}insert into bench.command_log (command_id, stream, seq, command_type, payload, metadata) \
                 values (gen_random_uuid(), 'order-' || :sid, nextval('bench.seq'), 'CREATE_ORDER', '{PAYLOAD}', '{{}}') \
                 on conflict (command_id) do nothing;\n"
            ),
            database: Database::Extension,
        },
        Variant {
            name: SEQUENCED_PAIR,
            script: format!(
                "{header}with s as (update bench.stream set last_seq = last_seq + 1 where stream = 'order-' || :sid returning stream, last_seq) \
                 insert into bench.sequenced_log (command_id, stream, seq, command_type, payload, metadata) \
                 select gen_random_uuid(), s.stream, s.last_seq, 'CREATE_ORDER', '{PAYLOAD}', '{{}}' from s \
                 on conflict (command_id) do nothing;\n"
            ),
            database: Database::Extension,
        },
        Variant {
            name: SEQUENCED_PAIR_PARTITIONED,
            script: format!(
                "{header}with s as (update bench.partitioned_stream set last_seq = last_seq + 1 where stream = 'order-' || :sid returning stream, last_seq) \
                 insert into bench.partitioned_log (command_id, stream, seq, command_type, payload, metadata, id_time) \
                 select gen_random_uuid(), s.stream, s.last_seq, 'CREATE_ORDER', '{PAYLOAD}', '{{}}', '-infinity' from s \
                 on conflict do nothing;\n"
            ),
            database: Database::Extension,
        },
        Variant {
            name: APPEND,
            script: format!(
                "{header}select * from cqrs.append(gen_random_uuid(), 'order-' || :sid, 'CREATE_ORDER', '{PAYLOAD}');\n"
            ),
            database: Database::Extension,
        },
        Variant {
            name: APPEND_PARTITIONED,
            script: format!(
                "{header}select * from cqrs.append(gen_random_uuid(), 'order-' || :sid, 'CREATE_ORDER', '{PAYLOAD}');\n"
            ),
            database: Database::Partitioned,
        },
        Variant {
            name: APPEND_UNPARTITIONED,
            script: format!(
                "{header}select * from cqrs.append(gen_random_uuid(), 'order-' || :sid, 'CREATE_ORDER', '{PAYLOAD}');\n"
            ),
            database: Database::Unpartitioned,
        },
        Variant {
            name: APPEND_V7,
            script: format!(
                "{header}select * from cqrs.append(cqrs.uuid_v7(), 'order-' || :sid, 'CREATE_ORDER', '{PAYLOAD}');\n"
            ),
            database: Database::Partitioned,
        },
        Variant {
            name: APPEND_V7_UNPARTITIONED,
            script: format!(
                "{header}select * from cqrs.append(cqrs.uuid_v7(), 'order-' || :sid, 'CREATE_ORDER', '{PAYLOAD}');\n"
            ),
            database: Database::Unpartitioned,
        },
        Variant {
            name: "cqrs.append + schema",
            script: format!(
                "{header}select * from cqrs.append(gen_random_uuid(), 'order-' || :sid, 'CREATE_ORDER_V', '{PAYLOAD}');\n"
            ),
            database: Database::Extension,
        },
        Variant {
            name: "portable append",
            script: format!(
                "{header}select * from cqrs.append(gen_random_uuid(), 'order-' || :sid, 'CREATE_ORDER', '{PAYLOAD}');\n"
            ),
            database: Database::Portable,
        },
        Variant {
            name: "portable append + schema",
            script: format!(
                "{header}select * from cqrs.append(gen_random_uuid(), 'order-' || :sid, 'CREATE_ORDER_V', '{PAYLOAD}');\n"
            ),
            database: Database::Portable,
        },
        Variant {
            name: "portable append, rich payload",
            script: format!(
                "{header}select * from cqrs.append(gen_random_uuid(), 'order-' || :sid, 'CREATE_ORDER', '{RICH_PAYLOAD}');\n"
            ),
            database: Database::Portable,
        },
        Variant {
            name: "portable append, rich payload + rich schema",
            script: format!(
                "{header}select * from cqrs.append(gen_random_uuid(), 'order-' || :sid, 'CREATE_ORDER_R', '{RICH_PAYLOAD}');\n"
            ),
            database: Database::Portable,
        },
    ]
}

fn setup(cluster: &PgCluster, streams: u32) -> Result<()> {
    cluster.psql_in("postgres", &format!("create database {PORTABLE_DB}"))?;
    cqrs_harness::edition::install_portable(cluster, "postgres", PORTABLE_DB)?;
    cluster.psql_in(
        PORTABLE_DB,
        &format!(
            "select cqrs.register_command_type('CREATE_ORDER_V', '{SCHEMA}');
             select cqrs.register_command_type('CREATE_ORDER_R', '{RICH_SCHEMA}');
             select cqrs.append(gen_random_uuid(), 'order-' || g, 'WARMUP', '{{}}') from generate_series(1, {streams}) g;"
        ),
    )?;
    // the two logs of the retention comparison: the same streams, the same warm-up commands
    for (database, install) in [
        (
            PARTITIONED_DB,
            "create extension pg_cqrs; select count(*) from cqrs.maintain();",
        ),
        (UNPARTITIONED_DB, "create extension pg_cqrs version '0.2.0';"),
    ] {
        cluster.psql_in("postgres", &format!("create database {database}"))?;
        cluster.psql_in(
            database,
            &format!(
                "{install}
                 select cqrs.append(gen_random_uuid(), 'order-' || g, 'WARMUP', '{{}}') from generate_series(1, {streams}) g;"
            ),
        )?;
    }
    cluster.psql(&format!(
        "create schema bench;
         -- the columns, defaults, constraints and indexes of an unpartitioned command log (0.2.0's)
         create table bench.command_log (
             position     bigint      generated always as identity primary key,
             command_id   uuid        not null unique,
             stream       text        not null,
             seq          bigint      not null,
             command_type text        not null,
             payload      jsonb       not null,
             metadata     jsonb       not null default '{{}}',
             created_at   timestamptz not null default now(),
             unique (stream, seq),
             check (seq > 0));
         create sequence bench.seq;
         -- the sequenced baseline's own log: its (stream, seq) must not meet the plain one's
         create table bench.sequenced_log (like bench.command_log including all);
         create table bench.stream (like cqrs.stream including all) with (fillfactor = 70);
         insert into bench.stream select 'order-' || g, 0 from generate_series(1, {streams}) g;
         -- the log's partitioning: its bounds (made now: a new install has none before its first
         -- append), and in each partition the keys cqrs's have
         select count(*) from cqrs.maintain();
         create table bench.partitioned_log (like cqrs.command_log including defaults including constraints including identity)
             partition by range (id_time);
         do $do$
         declare
             p record;
             n int := 0;
         begin
             for p in select * from cqrs.log_partitions() loop
                 n := n + 1;
                 execute format('create table bench.partitioned_log_%s (like bench.partitioned_log including defaults including constraints)', n);
                 execute format('alter table bench.partitioned_log_%s add primary key (position), add unique (command_id), add unique (stream, seq)', n);
                 execute format('alter table bench.partitioned_log attach partition bench.partitioned_log_%s for values from (%s) to (%s)', n,
                                case when p.lower_bound = '-infinity' then 'minvalue' else quote_literal(p.lower_bound::text) end,
                                case when p.upper_bound = 'infinity' then 'maxvalue' else quote_literal(p.upper_bound::text) end);
             end loop;
         end
         $do$;
         create table bench.partitioned_stream (like cqrs.stream including all) with (fillfactor = 70);
         insert into bench.partitioned_stream select 'order-' || g, 0 from generate_series(1, {streams}) g;
         select cqrs.register_command_type('CREATE_ORDER_V', '{SCHEMA}');
         -- every stream exists already, as in a running system (first appends create them)
         select cqrs.append(gen_random_uuid(), 'order-' || g, 'WARMUP', '{{}}') from generate_series(1, {streams}) g;
         checkpoint;"
    ))?;
    Ok(())
}

fn pgbench(cluster: &PgCluster, database: &str, script: &Path, clients: u32, seconds: u32) -> Result<f64> {
    let out = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(cluster.port().to_string())
        .arg("-c")
        .arg(clients.to_string())
        .args(["-j", "2"])
        .arg("-T")
        .arg(seconds.to_string())
        .arg("-f")
        .arg(script)
        .arg(database)
        .output()
        .context("running pgbench (apt-get install postgresql-client-15)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("error") {
        bail!("pgbench failed:\n{stdout}{stderr}");
    }
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .with_context(|| format!("no tps in pgbench output:\n{stdout}"))
}

pub fn run(args: AppendArgs) -> Result<()> {
    println!("starting a private PostgreSQL 15 cluster (fsync on, synchronous_commit on) …");
    let cluster = PgCluster::start(ClusterOptions {
        durability: Durability::Fsync,
        ..Default::default()
    })?;
    setup(&cluster, args.streams)?;
    let dir = cqrs_harness::postgres::tempdir("pg_cqrs-bench")?;
    let variants = variants(args.streams);
    let mut scripts = Vec::new();
    for (i, variant) in variants.iter().enumerate() {
        let path = dir.join(format!("variant{i}.sql"));
        std::fs::write(&path, &variant.script)?;
        scripts.push(path);
    }

    // the comparisons of the partitioned log with 0.2.0's: (0.3.0's variant, 0.2.0's variant)
    let position = |name: &str| variants.iter().position(|v| v.name == name);
    let comparisons: Vec<(usize, usize)> = [
        (APPEND_PARTITIONED, APPEND_UNPARTITIONED),
        (APPEND_V7, APPEND_V7_UNPARTITIONED),
    ]
    .into_iter()
    .filter_map(|(new, old)| Some((position(new)?, position(old)?)))
    .collect();

    // results[client_index][variant_index] = tps per round
    let mut results = vec![vec![Vec::new(); variants.len()]; args.clients.len()];
    for round in 1..=args.rounds {
        // the two sides of a comparison run back to back, 0.2.0's first in every other round
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if round % 2 == 0 {
            for &(new, old) in &comparisons {
                if let (Some(a), Some(b)) = (
                    order.iter().position(|&v| v == new),
                    order.iter().position(|&v| v == old),
                ) {
                    order.swap(a, b);
                }
            }
        }
        for (ci, &clients) in args.clients.iter().enumerate() {
            for &vi in &order {
                let variant = &variants[vi];
                let database = match variant.database {
                    Database::Extension => cluster.database(),
                    Database::Partitioned => PARTITIONED_DB,
                    Database::Portable => PORTABLE_DB,
                    Database::Unpartitioned => UNPARTITIONED_DB,
                };
                // each run pays the full-page images of a fresh checkpoint, none pays another's
                cluster.psql("checkpoint")?;
                let tps = pgbench(&cluster, database, &scripts[vi], clients, args.seconds)?;
                println!(
                    "  round {round}/{}  {clients:>3} clients  {:<26} {tps:>9.0} tps",
                    args.rounds, variant.name
                );
                results[ci][vi].push(tps);
            }
        }
    }

    let pair = variants
        .iter()
        .position(|v| v.name == SEQUENCED_PAIR)
        .context("the sequenced baseline")?;
    let partitioned_pair = variants
        .iter()
        .position(|v| v.name == SEQUENCED_PAIR_PARTITIONED)
        .context("the partitioned sequenced baseline")?;
    let mut table = Table::new(&[
        "clients",
        "variant",
        "median tps",
        "vs plain insert",
        "vs stream update + insert",
        "vs the pair, partitioned",
    ]);
    for (ci, &clients) in args.clients.iter().enumerate() {
        let baseline = median(&results[ci][0]);
        let sequenced = median(&results[ci][pair]);
        let partitioned = median(&results[ci][partitioned_pair]);
        for (vi, variant) in variants.iter().enumerate() {
            let tps = median(&results[ci][vi]);
            table.row(vec![
                clients.to_string(),
                variant.name.to_owned(),
                format!("{tps:.0}"),
                format!("{:.2}x", tps / baseline),
                format!("{:.2}x", tps / sequenced),
                format!("{:.2}x", tps / partitioned),
            ]);
        }
    }
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "\ncqrs.append (extension and portable editions) vs plain insert … on conflict do nothing, vs the stream row's update + that insert in one statement, and vs that pair into a table partitioned as the log is — {} rounds × {} s, {} streams, fsync on",
        args.rounds, args.seconds, args.streams
    );
    print!("{summary}");
    table.print();
    // issue 21's target: the portable validator on a rich schema at >= 0.5x the same append
    // without a schema
    if let (Some(plain), Some(rich)) = (
        position("portable append, rich payload"),
        position("portable append, rich payload + rich schema"),
    ) {
        for (ci, &clients) in args.clients.iter().enumerate() {
            println!(
                "{clients} client(s): portable append with the rich schema at {:.2}x of the same append without a schema",
                median(&results[ci][rich]) / median(&results[ci][plain])
            );
        }
    }
    // issue 24's target: the partitioned log's append within 5 % of the unpartitioned one's
    for &(new, old) in &comparisons {
        for (ci, &clients) in args.clients.iter().enumerate() {
            let rounds: Vec<String> = results[ci][new]
                .iter()
                .zip(&results[ci][old])
                .map(|(n, o)| format!("{:.2}x", n / o))
                .collect();
            println!(
                "{clients} client(s): {} at {:.2}x of {} (medians; round by round {})",
                variants[new].name,
                median(&results[ci][new]) / median(&results[ci][old]),
                variants[old].name,
                rounds.join(", ")
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
