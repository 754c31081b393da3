//! `cqrs-bench demo`, the README's main job, in two parts.
//!
//! 1. The command side: concurrent sessions append order commands — including, on purpose,
//!    client retries, stale `expected_seq`s, payloads that break their schema and reused
//!    command ids — and the demo sums up what the database accepted and refused, and why.
//! 2. Live: the example order projections, two sidecars (a leader and a standby) and Redis; a
//!    paced workload with a progress line (rate, projection lag, cache entries); the leader
//!    killed half-way so the standby takes over; then checks and a summary.
//!
//! Ctrl-C ends the live part early; everything the demo started is stopped either way.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use cqrs_harness::RedisCluster;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::lag::LagProbe;
use crate::report::percentile;
use crate::stack::Stack;
use crate::workload::{OrderCommand, OrderGenerator};
use crate::writers::{WriteStats, WriterOptions, Writers};
use cqrs_harness::edition::{self, Edition};
use cqrs_harness::otlp::{OtlpReceiver, OutgoingSpan, ReceivedSpan, SpanKind};
use cqrs_harness::outbox_check::{check, received};
use cqrs_harness::NatsServer;

/// The outbox sink of --nats-sink.
const NATS_SINK: &str = "orders";

/// The projection group user_order_stats moves to with --projection-groups.
const USERS_GROUP: &str = "users";

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Which edition of pg_cqrs to run on: `extension` (CREATE EXTENSION, a superuser) or
    /// `portable` (the PL/pgSQL edition installed by the database owner, as on managed PostgreSQL).
    #[arg(long, default_value = "extension", value_parser = crate::stack::parse_edition)]
    edition: cqrs_harness::edition::Edition,
    /// Commands to append in part 1 (the command side).
    #[arg(long, default_value_t = 4_000)]
    commands: u64,
    /// Concurrent database sessions in part 1.
    #[arg(long, default_value_t = 8)]
    sessions: u64,
    /// Commands per second in part 2 (live).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// How long part 2 runs (seconds); Ctrl-C ends it early.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Cache in a local six-node Redis Cluster (three masters, a replica each) instead of one
    /// redis-server; half-way through part 2 a master is killed with SIGKILL too.
    #[arg(long)]
    redis_cluster: bool,
    /// Two projection groups: user_order_stats moves to group `users`, projected by two
    /// sidecars of its own (one leads) from a slot of its own; half-way through part 2 the leader
    /// of each group is killed.
    #[arg(long)]
    projection_groups: bool,
    /// An outbox sink: a local NATS JetStream (nats-server -js) the leader delivers every command
    /// to; at the end a subscriber reads them back against what was appended.
    #[arg(long)]
    nats_sink: bool,
    /// Traces: the sidecars send spans over OTLP/HTTP to a receiver the demo runs (sampling 1 %
    /// of their own); at the end a few orders are placed and read back in an application's trace
    /// (the demo exports its own spans too), and each order's trace from append to cache and read
    /// is printed.
    #[arg(long)]
    traces: bool,
    /// Traces (as --traces), and every span the demo's receiver gets — the sidecars' and the
    /// demo's own — passed on to this OTLP/HTTP endpoint: a collector's base URL such as
    /// `http://localhost:4318` (Jaeger, Grafana Tempo, an OpenTelemetry Collector), or its full
    /// `…/v1/traces` URL.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Do not kill the leading sidecar half-way through part 2.
    #[arg(long)]
    no_failover: bool,
    /// Keep everything running after the summary until Ctrl-C (to look around with psql,
    /// redis-cli and curl).
    #[arg(long)]
    keep: bool,
}

/// What the workload does with one command, chosen at random.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Intent {
    /// A fresh command, with the stream's current seq as expected_seq.
    Fresh,
    /// The previous command sent again with the same command_id (a client retry).
    Retry,
    /// A payload that breaks the command type's JSON Schema.
    BadPayload,
    /// An expected_seq that another writer has already moved past.
    StaleExpectedSeq,
    /// A previous command_id reused for a different command.
    ReusedId,
}

impl Intent {
    fn pick(rng: &mut StdRng) -> Self {
        match rng.random_range(0..100) {
            0..=4 => Intent::Retry,
            5..=7 => Intent::BadPayload,
            8..=10 => Intent::StaleExpectedSeq,
            11 => Intent::ReusedId,
            _ => Intent::Fresh,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Intent::Fresh => "new commands",
            Intent::Retry => "client retries (same command_id)",
            Intent::BadPayload => "payloads breaking their schema",
            Intent::StaleExpectedSeq => "stale expected_seq",
            Intent::ReusedId => "command_id reused for another command",
        }
    }
}

#[derive(Default)]
struct Tally {
    accepted: u64,
    duplicates: u64,
    /// SQLSTATE → (count, an example message)
    rejected: BTreeMap<String, (u64, String)>,
    /// intent → (sent, outcome summary)
    intents: BTreeMap<Intent, u64>,
}

struct Sent {
    id: Uuid,
    command: OrderCommand,
}

async fn session(url: String, index: u64, commands: u64, tally: Arc<Mutex<Tally>>) -> Result<()> {
    let client = cqrs_harness::connect(&url).await?;
    let append = client
        .prepare("select seq, duplicate from cqrs.append($1, $2, $3, $4, $5)")
        .await?;
    let mut generator = OrderGenerator::new(index, index * 1_000_000 + 1, 200, 12);
    let mut rng = StdRng::seed_from_u64(index + 1000);
    let mut seqs: HashMap<String, i64> = HashMap::new();
    let mut previous: Option<Sent> = None;
    for _ in 0..commands {
        let intent = if previous.is_none() {
            Intent::Fresh
        } else {
            Intent::pick(&mut rng)
        };
        let (id, command, expected) = match (intent, previous.as_ref()) {
            (Intent::Retry, Some(p)) => (p.id, p.command.clone(), None),
            (Intent::ReusedId, Some(p)) => {
                let mut command = p.command.clone();
                command.payload["tampered"] = Value::Bool(true);
                (p.id, command, None)
            }
            (Intent::BadPayload, _) => {
                let mut command = generator.next_command();
                command.payload = serde_json::json!({"user_id": "", "qty": -1});
                let expected = seqs.get(&command.stream).copied().unwrap_or(0);
                (Uuid::now_v7(), command, Some(expected))
            }
            (Intent::StaleExpectedSeq, Some(p)) => {
                let mut command = generator.next_command();
                command.stream = p.command.stream.clone();
                command.command_type = "ADD_ITEM";
                command.payload =
                    serde_json::json!({"user_id": "user-1", "sku": "x", "qty": 1, "price": 1.0});
                let current = seqs.get(&command.stream).copied().unwrap_or(0);
                (Uuid::now_v7(), command, Some((current - 1).max(0)))
            }
            _ => {
                let command = generator.next_command();
                let expected = seqs.get(&command.stream).copied().unwrap_or(0);
                (Uuid::now_v7(), command, Some(expected))
            }
        };
        let result = client
            .query_one(
                &append,
                &[
                    &id,
                    &command.stream,
                    &command.command_type,
                    &command.payload,
                    &expected,
                ],
            )
            .await;
        let mut tally = tally.lock().await;
        *tally.intents.entry(intent).or_default() += 1;
        match result {
            Ok(row) => {
                let seq: i64 = row.get(0);
                if row.get::<_, bool>(1) {
                    tally.duplicates += 1;
                } else {
                    tally.accepted += 1;
                    seqs.insert(command.stream.clone(), seq);
                    previous = Some(Sent { id, command });
                }
            }
            Err(err) => {
                let (code, message) = match err.as_db_error() {
                    Some(db) => (db.code().code().to_owned(), db.message().to_owned()),
                    None => return Err(err).context("appending a command"),
                };
                let entry = tally.rejected.entry(code).or_insert((0, message));
                entry.0 += 1;
            }
        }
    }
    Ok(())
}

fn explain(code: &str) -> &'static str {
    match code {
        "22023" => "invalid payload (JSON Schema)",
        "40001" => "expected_seq conflict",
        "23505" => "command_id reused with different content",
        "42704" => "unregistered command type",
        _ => "other",
    }
}

pub async fn run(args: DemoArgs) -> Result<()> {
    println!("▶ starting a private PostgreSQL 15 cluster (wal_level=logical, fsync on) and redis-server …");
    let mut stack = Stack::start(args.edition, false).await?;
    println!(
        "  PostgreSQL port {}, data {}; Redis port {}",
        stack.pg.port(),
        stack.pg.data_dir().display(),
        stack.redis.port()
    );
    match stack.edition {
        Edition::Extension => println!(
            "  CREATE EXTENSION pg_cqrs; order command types registered with their JSON Schemas"
        ),
        Edition::Portable => println!(
            "  the portable edition installed with psql by the database owner {} (no superuser, as on managed PostgreSQL);\n  \
             sidecars log in as {} (REPLICATION, cqrs_projector); order command types registered with their JSON Schemas",
            edition::ADMIN,
            edition::SIDECAR_ROLE
        ),
    }
    let part_one = command_side(&stack, &args).await?;
    let mut cluster = if args.redis_cluster {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start).await??;
        println!(
            "  a Redis Cluster of six nodes for the cache: {}",
            cluster.seeds()
        );
        stack.set("CQRS_REDIS_CLUSTER_NODES", &cluster.seeds());
        // a replaced master is noticed by the status poll
        stack.set("CQRS_STATUS_INTERVAL", "1s");
        Some(cluster)
    } else {
        None
    };
    let receiver = if args.traces || args.otlp_endpoint.is_some() {
        let receiver = match &args.otlp_endpoint {
            Some(endpoint) => OtlpReceiver::start_forwarding(endpoint).await?,
            None => OtlpReceiver::start().await?,
        };
        stack.set("CQRS_OTLP_ENDPOINT", &receiver.endpoint());
        stack.set("CQRS_TRACE_SAMPLE_RATIO", "0.01");
        stack.set("OTEL_BSP_SCHEDULE_DELAY", "200");
        Some(receiver)
    } else {
        None
    };
    let interrupted = live(&mut stack, &args, cluster.as_mut(), part_one).await?;
    if let (Some(receiver), false) = (&receiver, interrupted) {
        traced_orders(&stack, receiver).await?;
    }
    drop(cluster);
    if args.keep && !interrupted {
        let leader = stack.wait_for_leader(Duration::from_secs(10)).unwrap_or(0);
        println!("▶ everything kept running (Ctrl-C to stop):");
        println!(
            "    psql -h 127.0.0.1 -p {} -U {} {}",
            stack.pg.port(),
            match stack.edition {
                Edition::Extension => "postgres",
                Edition::Portable => edition::ADMIN,
            },
            stack.pg.database()
        );
        println!(
            "    redis-cli -p {} hgetall cqrs:order_summary:order-100000000",
            stack.redis.port()
        );
        println!(
            "    curl -i -H 'authorization: {}' {}/v1/projections/order_summary/order-100000000",
            stack.authorization(),
            stack.http(leader)
        );
        println!("    curl {}/metrics", stack.admin(leader));
        tokio::signal::ctrl_c().await?;
    }
    println!("▶ stopping the sidecars (SIGTERM), redis-server and PostgreSQL");
    stack.stop_sidecars();
    drop(stack);
    Ok(())
}

/// Part 1: what the command side accepts and refuses. Returns the outcomes as the sessions saw
/// them when the database counted them too (see [`command_side_counts`]).
async fn command_side(stack: &Stack, args: &DemoArgs) -> Result<Option<Outcomes>> {
    let url = stack.owner_url.clone();
    println!(
        "\n▶ part 1 — the command side: {} commands from {} concurrent sessions, some wrong on purpose …",
        args.commands, args.sessions
    );
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let per_session = args.commands / args.sessions.max(1);
    let mut tasks = Vec::new();
    for index in 0..args.sessions {
        tasks.push(tokio::spawn(session(
            url.clone(),
            index,
            per_session,
            Arc::clone(&tally),
        )));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();

    let tally = tally.lock().await;
    let sent: u64 = tally.intents.values().sum();
    println!(
        "  {sent} commands in {:.1} s ({:.0}/s)",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64()
    );
    println!("  sent on purpose:");
    for (intent, count) in &tally.intents {
        println!("    {count:>6}  {}", intent.describe());
    }
    println!("  what the database did:");
    println!("    {:>6}  accepted", tally.accepted);
    println!(
        "    {:>6}  answered as duplicates (idempotent replay, nothing written)",
        tally.duplicates
    );
    for (code, (count, example)) in &tally.rejected {
        println!(
            "    {count:>6}  rejected {code} {}  e.g. \"{example}\"",
            explain(code)
        );
    }
    let admin = stack.client().await?;
    let row = admin
        .query_one(
            "select count(*), count(distinct stream),
                    (select count(*) from cqrs.stream s
                      where s.last_seq <> (select count(*) from cqrs.command_log l where l.stream = s.stream))
               from cqrs.command_log",
            &[],
        )
        .await?;
    let (rows, streams, broken): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    println!(
        "  cqrs.command_log: {rows} commands in {streams} streams; every stream gap-free (seq 1..n): {}",
        if broken == 0 { "yes" } else { "NO" }
    );
    if rows as u64 != tally.accepted || broken != 0 {
        anyhow::bail!(
            "the log holds {rows} commands but {} were accepted",
            tally.accepted
        );
    }
    command_side_counts(&admin, &tally).await
}

/// Appends by outcome, in the order of `cqrs.stats()`'s columns and of
/// `cqrs_sidecar::append_stats::outcome::ALL`: accepted, duplicate, expected-seq conflict,
/// invalid, other error.
type Outcomes = [u64; 5];

/// What `cqrs.stats()` counted (the extension, preloaded, counts every call of cqrs.append in
/// shared memory) against what the sessions saw, outcome by outcome; the outcomes, when the
/// database could count them.
async fn command_side_counts(admin: &tokio_postgres::Client, tally: &Tally) -> Result<Option<Outcomes>> {
    let counted = match admin
        .query_one(
            "select coalesce(sum(accepted), 0)::bigint, coalesce(sum(duplicate), 0)::bigint,
                    coalesce(sum(expected_seq_conflict), 0)::bigint, coalesce(sum(invalid), 0)::bigint,
                    coalesce(sum(error), 0)::bigint
               from cqrs.stats()",
            &[],
        )
        .await
    {
        Ok(row) => [0, 1, 2, 3, 4].map(|i| row.get::<_, i64>(i) as u64),
        Err(err) if err.code().is_some() => {
            // the portable edition (0A000) or an extension not preloaded (55000) cannot count
            println!(
                "  cqrs.stats(): not available here ({})",
                err.code().map_or("", |c| c.code())
            );
            return Ok(None);
        }
        Err(err) => return Err(err.into()),
    };
    let by_class = |wanted: &dyn Fn(&str) -> bool| -> u64 {
        tally
            .rejected
            .iter()
            .filter(|(code, _)| wanted(code))
            .map(|(_, (count, _))| count)
            .sum()
    };
    let invalid = |code: &str| code.starts_with("22") || code == "54000" || code == "42704";
    let seen = [
        tally.accepted,
        tally.duplicates,
        by_class(&|code| code == "40001"),
        by_class(&invalid),
        by_class(&|code| code != "40001" && !invalid(code)),
    ];
    println!(
        "  cqrs.stats() (counted inside the database, shared by every session): {} accepted, {} duplicates, \
         {} expected-seq conflicts, {} invalid, {} other errors — {}",
        counted[0],
        counted[1],
        counted[2],
        counted[3],
        counted[4],
        if counted == seen {
            "the same as the sessions saw"
        } else {
            "NOT what the sessions saw"
        }
    );
    if counted != seen {
        anyhow::bail!("cqrs.stats() counted {counted:?}, the sessions saw {seen:?}");
    }
    Ok(Some(seen))
}

/// `cqrs_appends_total` of a sidecar's `/metrics`, summed over command types, by outcome; `None`
/// before the sidecar's first poll of `cqrs.stats()` (no such line yet).
fn exported_outcomes(metrics: &str) -> Option<Outcomes> {
    use cqrs_sidecar::append_stats::{outcome, APPENDS_TOTAL, OUTCOME_LABEL};
    let mut sums = [0u64; 5];
    let mut seen = false;
    for line in metrics.lines() {
        let Some(labels) = line
            .strip_prefix(APPENDS_TOTAL)
            .and_then(|rest| rest.strip_prefix('{'))
        else {
            continue;
        };
        let Some((labels, value)) = labels.rsplit_once("} ") else {
            continue;
        };
        let Some(index) = outcome::ALL
            .iter()
            .position(|o| labels.contains(&format!("{OUTCOME_LABEL}=\"{o}\"")))
        else {
            continue;
        };
        seen = true;
        sums[index] += value.trim().parse::<f64>().unwrap_or(0.0) as u64;
    }
    seen.then_some(sums)
}

/// Part 1's outcomes as the first sidecar exports them (`cqrs_appends_total`, read from
/// `cqrs.stats()` by its status poll) against what the sessions saw; nothing has appended since.
fn metrics_match_part_one(stack: &Stack, sidecar: usize, seen: Outcomes) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let exported = loop {
        if let Some(exported) = stack.sidecars[sidecar]
            .metrics()
            .ok()
            .and_then(|m| exported_outcomes(&m))
        {
            break exported;
        }
        if Instant::now() > deadline {
            anyhow::bail!("sidecar-{} exported no cqrs_appends_total in 20 s", sidecar + 1);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "  /metrics of sidecar-{} (cqrs_appends_total by outcome): {} accepted, {} duplicates, {} expected-seq conflicts, \
         {} invalid, {} other errors — {}",
        sidecar + 1,
        exported[0],
        exported[1],
        exported[2],
        exported[3],
        exported[4],
        if exported == seen {
            "part 1 as the sessions saw it"
        } else {
            "NOT what the sessions saw"
        }
    );
    if exported != seen {
        anyhow::bail!("/metrics exported {exported:?}, part 1's sessions saw {seen:?}");
    }
    Ok(())
}

/// Part 2: projections, two sidecars and Redis under a paced workload. True when Ctrl-C ended
/// it.
// A script read top to bottom (start, run with progress lines, fail over, summarise), as the
// README shows its output.
/// Entries in the cache: the one Redis's, or every master's of the cluster.
fn cache_entries(stack: &Stack, cluster: Option<&RedisCluster>) -> u64 {
    let Some(cluster) = cluster else {
        return stack.cache_entries();
    };
    cluster
        .masters()
        .into_iter()
        .filter_map(|node| cluster.cli(node, &["DBSIZE"]).ok()?.parse::<u64>().ok())
        .sum()
}

async fn live(
    stack: &mut Stack,
    args: &DemoArgs,
    mut cluster: Option<&mut RedisCluster>,
    part_one: Option<Outcomes>,
) -> Result<bool> {
    println!("\n▶ part 2 — live: projections, sidecars and Redis");
    let started = Instant::now();
    stack.create_projections().await?;
    println!(
        "  created the order_summary and user_order_stats projections (sql/examples/orders.sql); \
         they projected part 1's log in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if args.projection_groups {
        stack
            .client()
            .await?
            .query(
                "select count(*) from cqrs.move_projection('user_order_stats', $1)",
                &[&USERS_GROUP],
            )
            .await?;
        println!(
            "  moved user_order_stats to projection group {USERS_GROUP} (cqrs.move_projection); order_summary stays in default"
        );
    }
    let nats = if args.nats_sink {
        let nats = tokio::task::spawn_blocking(NatsServer::start).await??;
        stack.set("CQRS_SINKS", &format!("{NATS_SINK}={}", nats.url()));
        println!(
            "  outbox sink {NATS_SINK}: every command to NATS JetStream at {} (stream {}, subjects cqrs.events.<type>)",
            nats.url(),
            cqrs_sidecar::outbox::spec::DEFAULT_JS_STREAM
        );
        Some(nats)
    } else {
        None
    };
    let first = stack.add_sidecar()?;
    stack.wait_for_leader(Duration::from_secs(30))?;
    if let Some(seen) = part_one {
        metrics_match_part_one(stack, first, seen)?;
    }
    let second = stack.add_sidecar()?;
    let mut started_sidecars = vec![first, second];
    if args.projection_groups {
        let third = stack.add_sidecar_in_group(USERS_GROUP)?;
        stack.wait_for_group_leader(USERS_GROUP, Duration::from_secs(30))?;
        started_sidecars.push(third);
        started_sidecars.push(stack.add_sidecar_in_group(USERS_GROUP)?);
    }
    for &sidecar in &started_sidecars {
        stack.sidecars[sidecar].keep_log();
    }
    println!(
        "  sidecar-1 leads (read API {}), sidecar-2 stands by (read API {}); logs: {} and {}",
        stack.http(first),
        stack.http(second),
        stack.sidecars[first].log_path().display(),
        stack.sidecars[second].log_path().display()
    );
    if args.projection_groups {
        println!(
            "  group {USERS_GROUP}: sidecar-3 leads, sidecar-4 stands by, streaming slot cqrs_sidecar_{USERS_GROUP}; logs: {} and {}",
            stack.sidecars[2].log_path().display(),
            stack.sidecars[3].log_path().display()
        );
    }
    println!(
        "  the read API wants a JWT (exposed: {}; a user's stats only to that user); this demo reads with\n    {}",
        crate::stack::READ_EXPOSURE,
        stack.authorization()
    );
    println!(
        "  appending {:.0} commands/s for {} s{} (Ctrl-C ends early) …",
        args.rate,
        args.seconds,
        if args.no_failover {
            ""
        } else {
            if args.projection_groups {
                "; the leader of each group is killed with SIGKILL half-way"
            } else {
                "; the leader is killed with SIGKILL half-way"
            }
        }
    );
    let url = stack.owner_url.clone();
    let stats = Arc::new(WriteStats::default());
    let writers = Writers::start(
        &url,
        WriterOptions {
            rate: args.rate,
            sessions: 4,
            first_order: 100_000_000,
            users: 500,
            sample_every: 0,
        },
        Arc::clone(&stats),
        None,
    )
    .await?;
    let probe = LagProbe::start(&url, 2, Duration::from_millis(100)).await?;
    let live_started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut last = 0u64;
    let mut failed_over = args.no_failover;
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while live_started.elapsed() < Duration::from_secs(args.seconds) {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut ctrl_c => {
                println!("\n  Ctrl-C: stopping the workload");
                interrupted = true;
                break;
            }
        }
        let appended = stats.appended.load(Ordering::Relaxed);
        let lags = probe.window();
        let leaders: Vec<String> = (0..stack.sidecars.len())
            .filter(|&i| stack.sidecars[i].is_leader())
            .map(|i| format!("sidecar-{}", i + 1))
            .collect();
        let leader = if leaders.is_empty() {
            "none".to_owned()
        } else {
            leaders.join(", ")
        };
        let lag = if lags.is_empty() {
            "lag (no probe finished)    ".to_owned()
        } else {
            format!(
                "lag p50 {:>6.1} ms  p99 {:>6.1} ms",
                percentile(&lags, 50.0),
                percentile(&lags, 99.0)
            )
        };
        println!(
            "  t={:>3}s  appended {appended:>7} ({:>5}/s)  {lag}  cache {:>7} entries  leader {leader}",
            live_started.elapsed().as_secs(),
            appended - last,
            cache_entries(stack, cluster.as_deref())
        );
        last = appended;
        if !failed_over && live_started.elapsed() >= Duration::from_secs(args.seconds / 2) {
            failed_over = true;
            let groups: &[&str] = if args.projection_groups {
                &["default", USERS_GROUP]
            } else {
                &["default"]
            };
            for &group in groups {
                let leader = stack.wait_for_group_leader(group, Duration::from_secs(10))?;
                stack.sidecars[leader].kill();
                let killed = Instant::now();
                let next = stack.wait_for_group_leader(group, Duration::from_secs(10))?;
                println!(
                    "  ✂ killed sidecar-{} (SIGKILL), leader of group {group}; sidecar-{} took over in {:.2} s",
                    leader + 1,
                    next + 1,
                    killed.elapsed().as_secs_f64()
                );
            }
            if let Some(cluster) = cluster.as_deref_mut() {
                let masters = cluster.masters();
                if let Some(&master) = masters.first() {
                    cluster.kill_node(master);
                    let killed = Instant::now();
                    // the failover runs while the workload goes on; waiting for it blocks this loop
                    let healthy = tokio::task::block_in_place(|| {
                        std::thread::sleep(cqrs_harness::redis_cluster::NODE_TIMEOUT);
                        cluster.wait_healthy(Duration::from_secs(30))
                    });
                    healthy?;
                    println!(
                        "  ✂ killed a Redis master (SIGKILL); its replica took over in {:.2} s; restarting the old one as a replica",
                        killed.elapsed().as_secs_f64()
                    );
                    tokio::task::block_in_place(|| cluster.start_node(master))?;
                }
            }
        }
    }
    writers.finish().await?;
    let (lags, timeouts) = probe.finish().await?;
    let elapsed = live_started.elapsed().as_secs_f64();

    // wait for the projections and the cache to have everything, then check
    let client = stack.client().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let behind: i64 = client
            .query_one(
                "select coalesce(sum(events_behind), 0)::bigint from cqrs.status()",
                &[],
            )
            .await?
            .get(0);
        if behind == 0 {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("the projections are still {behind} events behind");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let leader = stack.wait_for_leader(Duration::from_secs(10))?;
    let appended = stats.appended.load(Ordering::Relaxed);
    let writes = stats.latencies();
    println!("\n▶ summary of part 2");
    println!(
        "  {appended} commands in {elapsed:.1} s ({:.0}/s), {} append errors; append latency p50 {:.1} ms, p99 {:.1} ms",
        appended as f64 / elapsed,
        stats.errors.load(Ordering::Relaxed),
        percentile(&writes, 50.0),
        percentile(&writes, 99.0)
    );
    println!(
        "  projection lag (commit → visible in order_summary), {} probes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
        lags.len(),
        percentile(&lags, 50.0),
        percentile(&lags, 99.0),
        percentile(&lags, 100.0),
        if timeouts > 0 { format!(", {timeouts} timed out") } else { String::new() }
    );
    let row = client
        .query_one(
            "select (select count(*) from shop.order_summary), (select count(*) from shop.user_order_stats),
                    (select count(*) from cqrs.command_log)",
            &[],
        )
        .await?;
    let (orders, users, log): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    println!(
        "  read models: {orders} orders, {users} users from {log} commands; all projections caught up; Redis holds {} entries",
        cache_entries(stack, cluster.as_deref())
    );
    let sample = verify_cache(stack, leader).await?;
    println!("  all {sample} orders read through the read API equal their order_summary rows");
    if let Some(nats) = &nats {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let behind: i64 = client
                .query_one(
                    "select events_behind from cqrs.sink_status() where sink = $1",
                    &[&NATS_SINK],
                )
                .await?
                .get(0);
            if behind == 0 {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("the NATS sink is still {behind} events behind");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let messages = received(&nats.url(), cqrs_sidecar::outbox::spec::DEFAULT_JS_STREAM).await?;
        let count = check(&client, &messages, "").await?;
        println!(
            "  a NATS subscriber received {count} events, one per appended command (by command id), each stream's in seq order"
        );
    }
    let metrics = &stack.sidecars[leader];
    println!(
        "  leader sidecar-{}: {} events projected, {} batches; /metrics at {}/metrics",
        leader + 1,
        metrics.metric("cqrs_events_projected_total").unwrap_or(0.0),
        metrics
            .metric("cqrs_batch_flush_duration_seconds_count")
            .unwrap_or(0.0),
        stack.admin(leader)
    );
    Ok(interrupted)
}

/// Reads every order through the read API and compares it with the read model.
async fn verify_cache(stack: &Stack, sidecar: usize) -> Result<usize> {
    let client = stack.client().await?;
    let rows = client
        .query(
            "select order_id, rev, row_to_json(o)::text from shop.order_summary o",
            &[],
        )
        .await?;
    let http = stack.read_client(reqwest::Client::builder())?;
    for row in &rows {
        let (key, rev, doc): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        let response = http
            .get(format!(
                "{}/v1/projections/order_summary/{key}",
                stack.http(sidecar)
            ))
            .send()
            .await?;
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body: Value = response.json().await?;
        if etag != format!("\"{rev}\"") || body != serde_json::from_str::<Value>(&doc)? {
            anyhow::bail!(
                "{key}: the read API answered {body} (etag {etag}) but the read model has rev {rev}: {doc}"
            );
        }
    }
    Ok(rows.len())
}

/// The orders the demo places in an application's trace with `--traces`.
const TRACED_ORDERS: usize = 3;

/// One span of a printed trace at `depth`, with its duration and service; a command's span also
/// shows the batch it was projected in (one link away, in the batch's own trace) and its steps.
fn print_span(span: &ReceivedSpan, depth: usize, all: &[ReceivedSpan]) {
    const WIDTH: usize = 34;
    let line = |indent: &str, name: &str, millis: f64, service: &str, detail: &str| {
        let width = WIDTH.saturating_sub(indent.chars().count());
        let text = format!("    {indent}{name:<width$} {millis:>7.1} ms  {service:<12} {detail}");
        println!("{}", text.trim_end());
    };
    let indent = "  ".repeat(depth);
    let detail = match span.name.as_str() {
        "cqrs.project_command" => format!(
            "batch {}, seq {}",
            span.attribute("cqrs.batch.number").unwrap_or("?"),
            span.attribute("cqrs.seq").unwrap_or("?")
        ),
        "cqrs.read" => format!(
            "HTTP {}, {}, source {}",
            span.attribute("http.response.status_code").unwrap_or("?"),
            span.attribute("cqrs.read.outcome").unwrap_or("?"),
            span.attribute("cqrs.read.source").unwrap_or("?")
        ),
        _ => String::new(),
    };
    line(&indent, &span.name, span.millis(), &span.service, &detail);
    for (batch_trace, batch_span, _) in &span.links {
        let Some(batch) = all
            .iter()
            .find(|s| &s.trace_id == batch_trace && &s.span_id == batch_span)
        else {
            continue;
        };
        line(
            &format!("{indent}  ↳ "),
            &batch.name,
            batch.millis(),
            &batch.service,
            &format!(
                "its own trace, {} events",
                batch.attribute("events").unwrap_or("?")
            ),
        );
        let mut steps: Vec<&ReceivedSpan> =
            all.iter().filter(|s| s.parent_span_id == batch.span_id).collect();
        steps.sort_by_key(|s| s.start_unix_nano);
        for step in steps {
            line(
                &format!("{indent}      "),
                &step.name,
                step.millis(),
                &step.service,
                "",
            );
        }
    }
}

/// The service name of the demo's own spans (the application's).
const DEMO_SERVICE: &str = "cqrs-demo";

fn span_id() -> [u8; 8] {
    rand::random::<[u8; 8]>().map(|b| b | 1)
}

/// Places [`TRACED_ORDERS`] orders, each in an application's trace: a root span `place order`
/// with two children, the `cqrs.append` call (its span's `traceparent` in the command's
/// metadata) and the read of the order with `?after=` (its `traceparent` as the request's
/// header). The demo exports those spans itself, to the same receiver as the sidecars, then
/// prints each order's trace as the receiver got it: the application's spans, the sidecar's span
/// of the command, the batch it was projected in (one link away), and the read.
async fn traced_orders(stack: &Stack, receiver: &OtlpReceiver) -> Result<()> {
    println!(
        "\n▶ traces — {TRACED_ORDERS} orders placed and read back in an application's trace (OTLP receiver at {}{})",
        receiver.endpoint(),
        receiver
            .upstream()
            .map(|u| format!(", every span passed on to {u}"))
            .unwrap_or_default()
    );
    let client = cqrs_harness::connect(&stack.owner_url).await?;
    let leader = stack.wait_for_leader(Duration::from_secs(10))?;
    let http = stack.read_client(reqwest::Client::builder())?;
    let mut orders = Vec::new();
    for n in 0..TRACED_ORDERS {
        let trace = rand::random::<[u8; 16]>().map(|b| b | 1);
        let trace_id = hex::encode(trace);
        let (root, append_span, read_span) = (span_id(), span_id(), span_id());
        let stream = format!("order-traced-{n}-{}", &trace_id[..8]);
        let placed_at = SystemTime::now();
        let seq: i64 = client
            .query_one(
                "select seq from cqrs.append(cqrs.uuid_v7(), $1, 'CREATE_ORDER', $2, metadata => $3)",
                &[
                    &stream,
                    &serde_json::json!({"user_id": "user-1", "currency": "EUR"}),
                    &serde_json::json!({"traceparent": format!("00-{trace_id}-{}-01", hex::encode(append_span))}),
                ],
            )
            .await?
            .get(0);
        let appended_at = SystemTime::now();
        let response = http
            .get(format!(
                "{}/v1/projections/order_summary/{stream}?after={stream}:{seq}&timeout_ms=5000",
                stack.http(leader)
            ))
            .header(
                "traceparent",
                format!("00-{trace_id}-{}-01", hex::encode(read_span)),
            )
            .send()
            .await?;
        let status = response.status().as_u16();
        let read_at = SystemTime::now();
        let span =
            |span_id, parent, name: &str, kind, start, end, attributes: &[(&str, &str)]| OutgoingSpan {
                trace_id: trace,
                span_id,
                parent_span_id: parent,
                name: name.to_owned(),
                kind,
                start,
                end,
                attributes: attributes
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            };
        receiver
            .export(
                DEMO_SERVICE,
                &[
                    span(
                        root,
                        None,
                        "place order",
                        SpanKind::Internal,
                        placed_at,
                        read_at,
                        &[("order", &stream)],
                    ),
                    span(
                        append_span,
                        Some(root),
                        "cqrs.append",
                        SpanKind::Client,
                        placed_at,
                        appended_at,
                        &[("db.system.name", "postgresql"), ("cqrs.stream", &stream)],
                    ),
                    span(
                        read_span,
                        Some(root),
                        "GET order_summary",
                        SpanKind::Client,
                        appended_at,
                        read_at,
                        &[
                            ("http.request.method", "GET"),
                            ("http.response.status_code", &status.to_string()),
                        ],
                    ),
                ],
            )
            .await?;
        orders.push((stream, trace_id));
    }
    // the sidecars export every 200 ms
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = receiver.spans();
        let complete = orders.iter().all(|(_, trace)| {
            ["place order", "cqrs.project_command", "cqrs.read"]
                .iter()
                .all(|name| spans.iter().any(|s| &s.trace_id == trace && s.name == *name))
        });
        if complete || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (stream, trace_id) in &orders {
        println!("  {stream}  trace {trace_id}");
        let mut own: Vec<&ReceivedSpan> = spans.iter().filter(|s| &s.trace_id == trace_id).collect();
        own.sort_by_key(|s| s.start_unix_nano);
        if own.is_empty() {
            println!("    (no spans received for this trace)");
        }
        // the trace as a tree: each span under its parent, siblings in the order they started
        let roots = own
            .iter()
            .filter(|s| !own.iter().any(|p| p.span_id == s.parent_span_id));
        let mut stack: Vec<(&ReceivedSpan, usize)> = roots.rev().map(|s| (*s, 0)).collect();
        while let Some((span, depth)) = stack.pop() {
            print_span(span, depth, &spans);
            stack.extend(
                own.iter()
                    .rev()
                    .filter(|c| c.parent_span_id == span.span_id)
                    .map(|c| (*c, depth + 1)),
            );
        }
    }
    println!(
        "  {} spans received in all (the sidecars sample 1 % of their own traces; the orders' are sampled by the application)",
        receiver.spans().len()
    );
    if let Some(upstream) = receiver.upstream() {
        let forwarded = receiver.forwarded();
        println!(
            "  passed on to {upstream}: {} export requests accepted, {} refused or not delivered{}",
            forwarded.accepted,
            forwarded.refused,
            forwarded
                .last_refusal
                .map(|why| format!(" (the last: {why})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_exported_are_summed_over_types_by_outcome() {
        let metrics = r#"# TYPE cqrs_appends_total counter
cqrs_appends_total{command_type="CREATE_ORDER",outcome="accepted"} 7
cqrs_appends_total{command_type="CREATE_ORDER",outcome="duplicate"} 2
cqrs_appends_total{command_type="PAY_ORDER",outcome="accepted"} 3
cqrs_appends_total{command_type="PAY_ORDER",outcome="error"} 1
cqrs_appends_total{command_type="PAY_ORDER",outcome="invalid"} 4
cqrs_appends_total_other 9
cqrs_commands_total{command_type="PAY_ORDER"} 5
"#;
        assert_eq!(exported_outcomes(metrics), Some([10, 2, 0, 4, 1]));
        assert_eq!(exported_outcomes("cqrs_commands_total 1\n"), None);
    }
}
