//! `cqrs-bench demo`: a private PostgreSQL with pg_cqrs, the example order command types, and a
//! workload of concurrent sessions appending commands — including, on purpose, client retries,
//! stale `expected_seq`s, payloads that break their schema and reused command ids — then a
//! summary of what the database accepted and refused, and why.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cqrs_harness::{ClusterOptions, Durability, PgCluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use crate::workload::{OrderCommand, OrderGenerator, COMMAND_TYPES};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Commands to append in all.
    #[arg(long, default_value_t = 5_000)]
    commands: u64,
    /// Concurrent database sessions.
    #[arg(long, default_value_t = 8)]
    sessions: u64,
    /// Keep the cluster running after the summary until Ctrl-C (to look around with psql).
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

pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

struct Sent {
    id: Uuid,
    command: OrderCommand,
}

async fn session(url: String, index: u64, commands: u64, tally: Arc<Mutex<Tally>>) -> Result<()> {
    let client = connect(&url).await?;
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
    println!("▶ starting a private PostgreSQL 15 cluster (wal_level=logical, fsync on) …");
    let cluster = tokio::task::spawn_blocking(|| {
        PgCluster::start(ClusterOptions {
            durability: Durability::Fsync,
            ..Default::default()
        })
    })
    .await??;
    println!("  port {}, data {}", cluster.port(), cluster.data_dir().display());
    println!("▶ CREATE EXTENSION pg_cqrs; registering the order command types");
    let admin = connect(&cluster.url()).await?;
    for (name, schema) in COMMAND_TYPES {
        let schema: Value = serde_json::from_str(schema)?;
        admin
            .execute("select cqrs.register_command_type($1, $2)", &[name, &schema])
            .await?;
        println!("  {name}");
    }

    println!(
        "▶ appending {} commands from {} concurrent sessions …",
        args.commands, args.sessions
    );
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let per_session = args.commands / args.sessions.max(1);
    let mut tasks = Vec::new();
    for index in 0..args.sessions {
        tasks.push(tokio::spawn(session(
            cluster.url(),
            index,
            per_session,
            Arc::clone(&tally),
        )));
    }
    let progress = {
        let tally = Arc::clone(&tally);
        let total = per_session * args.sessions;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let t = tally.lock().await;
                let done: u64 = t.intents.values().sum();
                println!("  … {done}/{total} sent, {} accepted", t.accepted);
                if done >= total {
                    break;
                }
            }
        })
    };
    for task in tasks {
        task.await??;
    }
    progress.abort();
    let elapsed = started.elapsed();

    let tally = tally.lock().await;
    let sent: u64 = tally.intents.values().sum();
    println!();
    println!(
        "▶ {sent} commands in {:.1} s ({:.0}/s)",
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
        "▶ cqrs.command_log: {rows} commands in {streams} streams; every stream gap-free (seq 1..n): {}",
        if broken == 0 { "yes" } else { "NO" }
    );
    if rows as u64 != tally.accepted {
        anyhow::bail!(
            "the log holds {rows} commands but {} were accepted",
            tally.accepted
        );
    }
    if args.keep {
        println!(
            "▶ cluster kept running: psql -h 127.0.0.1 -p {} -U postgres {}   (Ctrl-C to stop)",
            cluster.port(),
            cluster.database()
        );
        tokio::signal::ctrl_c().await?;
    }
    println!("▶ stopping the cluster");
    drop(cluster);
    Ok(())
}
