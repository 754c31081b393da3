//! Hostile and random input through every door — `cqrs.append`, `cqrs.append_batch`,
//! `cqrs.create_projection`, `cqrs.project_batch`, `cqrs.catch_up` and the sidecar — and what must
//! stay true whatever comes in:
//!
//! - every refusal is an error with a SQLSTATE, never a lost connection (a crashed backend);
//! - no projection is stalled by another's input: a canary projection that handles only
//!   well-formed commands has applied every one of them, while the hostile commands halted or
//!   dead-lettered only the projections that handle them;
//! - nothing is lost: every command the database accepted is in the log exactly once, and every
//!   one a projection handles is applied to it, dead-lettered, or the event it halted on.
//!
//! The seed is printed (`CQRS_ABUSE_SEED` replays a run); `CQRS_ABUSE_CASES` sets the size.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use cqrs_e2e::cache_check;
use cqrs_e2e::rig::{Rig, PREFIX};
use cqrs_e2e::{connect, eventually};
use cqrs_harness::{ClusterOptions, PgCluster};
use cqrs_sidecar::metrics;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

fn seed() -> u64 {
    let seed = std::env::var("CQRS_ABUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("CQRS_ABUSE_SEED={seed}");
    seed
}

fn cases() -> usize {
    std::env::var("CQRS_ABUSE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400)
}

/// Read models of every column type a number, string or document can be pushed into.
const SCHEMA: &str = r#"
create table public.canary (stream text primary key, n integer not null default 0, rev bigint not null default 0);
create table public.typed (stream text primary key, i integer, small numeric(5,2), at timestamptz, id uuid,
                           doc jsonb, label varchar(8), flag boolean, rev bigint not null default 0);
create table public.counted (stream text primary key, total numeric(12,2) not null default 0,
                             n bigint not null default 0, rev bigint not null default 0);
-- the canary handles only CANARY, which this test always writes well-formed: nothing done to
-- the other projections may keep it from applying every one
select cqrs.create_projection('canary', 'public.canary', 'stream', '{"CANARY": {"action": "upsert", "add": {"n": {"const": 1}}}}');
select cqrs.create_projection('typed_halt', 'public.typed', 'stream', '{
    "HOSTILE": {"action": "upsert", "set": {"i": "$.i", "small": "$.small", "at": "$.at", "id": "$.id", "doc": "$.doc",
                                            "label": "$.label", "flag": "$.flag"}}}');
select cqrs.create_projection('counted_dead', 'public.counted', 'stream', '{
    "HOSTILE": {"action": "upsert", "add": {"total": "$.small", "n": "$.i"}},
    "CANARY":  {"action": "upsert", "add": {"n": {"const": 1}}}}', on_error => 'dead_letter');
"#;

/// A hostile JSON value, at most `depth` levels deep.
fn hostile_value(rng: &mut StdRng, depth: usize) -> Value {
    match rng.random_range(0..16) {
        0 if depth > 0 => {
            // nested objects and arrays, up to twice the default limit
            let levels = rng.random_range(1..=depth.min(140));
            let mut value = json!(1);
            for level in 0..levels {
                value = if level % 2 == 0 {
                    json!({"a": value})
                } else {
                    json!([value])
                };
            }
            value
        }
        1 => Value::Array((0..rng.random_range(1_000..20_000)).map(Value::from).collect()),
        // large strings; one in ten over the 4 MiB payload limit on its own
        2 if rng.random_ratio(1, 10) => Value::String("x".repeat(4_200_000)),
        2 => Value::String("x".repeat(rng.random_range(1..200_000))),
        3 => json!("\u{202e}\u{0301}\u{1F600}\u{FEFF}\u{10FFFF}"),
        4 => json!("control \u{0001}\u{001f} and quotes \" \\ '"),
        5 => serde_json::from_str("123456789012345678901234567890123456789").unwrap_or(Value::Null),
        6 => serde_json::from_str("1e308").unwrap_or(Value::Null),
        7 => serde_json::from_str("-0.000000000000000000000000001").unwrap_or(Value::Null),
        8 => json!(i64::MIN),
        9 => json!(u64::MAX),
        10 => json!("NaN"),
        11 => json!("Infinity"),
        12 => json!("2026-13-45T99:99:99Z"),
        13 => json!(null),
        14 => json!(true),
        _ => json!(rng.random_range(-1_000..1_000)),
    }
}

/// A payload: usually an object of hostile values under the keys the handlers read.
fn hostile_payload(rng: &mut StdRng) -> String {
    if rng.random_ratio(1, 20) {
        // not even JSON, or JSON PostgreSQL refuses (a NUL, a lone surrogate)
        return [
            "{",
            r#"{"a": "\u0000"}"#,
            r#"{"a": "\ud800"}"#,
            "[]",
            "\"text\"",
            "1e999999",
            "",
        ][rng.random_range(0..7)]
        .to_owned();
    }
    let mut payload = serde_json::Map::new();
    for key in ["i", "small", "at", "id", "doc", "label", "flag"] {
        if rng.random_bool(0.7) {
            payload.insert(key.to_owned(), hostile_value(rng, 130));
        }
    }
    Value::Object(payload).to_string()
}

fn hostile_stream(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0 => String::new(),
        1 => "s".repeat(rng.random_range(250..300)),
        2 => "é".repeat(rng.random_range(120..140)),
        3 => "\u{202e}evil".to_owned(),
        4 => "with\u{0}nul".to_owned(),
        _ => format!("h-{}", rng.random_range(0..50)),
    }
}

fn hostile_type(rng: &mut StdRng) -> String {
    match rng.random_range(0..12) {
        0 => String::new(),
        1 => "T".repeat(rng.random_range(120..140)),
        2 => "\u{0}".to_owned(),
        3 => "CANARY".to_owned(),
        _ => "HOSTILE".to_owned(),
    }
}

/// The outcome of one call: `Ok`, or the SQLSTATE it was refused with. Anything else — the
/// connection lost, a protocol error — is what the test exists to catch.
async fn call(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Result<(), String>> {
    match client.query(sql, params).await {
        Ok(_) => Ok(Ok(())),
        Err(err) => match err.code() {
            Some(code) => Ok(Err(code.code().to_owned())),
            None if client.is_closed() => bail!("the backend went away on {sql}: {err}"),
            None => bail!("{sql} failed without a SQLSTATE: {err}"),
        },
    }
}

/// Counts outcomes, so that a run shows what it exercised.
#[derive(Default)]
struct Tally(BTreeMap<String, usize>);

impl Tally {
    fn add(&mut self, door: &str, outcome: &Result<(), String>) {
        let key = match outcome {
            Ok(()) => format!("{door} ok"),
            Err(code) => format!("{door} {code}"),
        };
        *self.0.entry(key).or_default() += 1;
    }
}

/// Appends `cases` hostile commands and a well-formed CANARY after each; returns the canary
/// commands appended.
async fn append_hostile(client: &Client, rng: &mut StdRng, cases: usize, tally: &mut Tally) -> Result<u64> {
    let mut canaries = 0u64;
    for case in 0..cases {
        let (stream, command_type, payload) = (hostile_stream(rng), hostile_type(rng), hostile_payload(rng));
        let metadata = if rng.random_ratio(1, 5) {
            hostile_payload(rng)
        } else {
            "{}".to_owned()
        };
        let id = Uuid::now_v7();
        let outcome = if rng.random_ratio(1, 4) {
            let batch = format!(
                r#"[{{"command_id": "{id}", "stream": {}, "command_type": {}, "payload": {payload}, "metadata": {metadata}}}]"#,
                Value::from(stream.clone()),
                Value::from(command_type.clone())
            );
            call(
                client,
                "select 1 from cqrs.append_batch($1::text::jsonb)",
                &[&batch],
            )
            .await?
        } else {
            call(
                client,
                "select 1 from cqrs.append($1, $2, $3, $4::text::jsonb, null, $5::text::jsonb)",
                &[&id, &stream, &command_type, &payload, &metadata],
            )
            .await?
        };
        tally.add("append", &outcome);
        let canary = call(
            client,
            "select 1 from cqrs.append($1, $2, 'CANARY', '{}')",
            &[&Uuid::now_v7(), &format!("c-{}", case % 40)],
        )
        .await?;
        ensure!(
            canary.is_ok(),
            "a well-formed CANARY command was refused: {canary:?}"
        );
        canaries += 1;
    }
    Ok(canaries)
}

/// Hostile handler definitions: refused with a SQLSTATE, or registered and harmless.
async fn define_hostile(client: &Client, rng: &mut StdRng, tally: &mut Tally) -> Result<()> {
    client
        .batch_execute(
            "create table public.scratch (stream text primary key, v integer, rev bigint not null default 0)",
        )
        .await?;
    for i in 0..60 {
        let handlers = match rng.random_range(0..8) {
            0 => hostile_payload(rng),
            1 => json!({"HOSTILE": {"action": "upsert", "set": {hostile_stream(rng): "$.i"}}}).to_string(),
            2 => json!({"HOSTILE": {"function": format!("{}; drop table public.canary; --", hostile_stream(rng))}}).to_string(),
            3 => json!({"HOSTILE": {"action": "upsert", "set": {"v": {"const": hostile_value(rng, 20)}}}}).to_string(),
            4 => json!({"HOSTILE": {"action": "upsert", "key": format!("$.{}", hostile_stream(rng)), "set": {"v": "$.i"}}}).to_string(),
            5 => json!({"HOSTILE": {"action": "upsert", "set": {"v": {"field": hostile_stream(rng)}}}}).to_string(),
            6 => json!({hostile_type(rng): {"action": "delete"}}).to_string(),
            _ => json!({"HOSTILE": [{"action": "upsert", "set": {"v": "$.i"}}, {"action": "delete", "key": "$.doc"}]}).to_string(),
        };
        let name = format!("hostile_{i}");
        let outcome = call(
            client,
            "select cqrs.create_projection($1, 'public.scratch', 'stream', $2::text::jsonb, on_error => 'dead_letter')",
            &[&name, &handlers],
        )
        .await?;
        tally.add("create_projection", &outcome);
        if outcome.is_ok() {
            // one table is one read model: make room for the next definition
            client
                .execute("select cqrs.drop_projection($1)", &[&name])
                .await?;
        }
    }
    let canary_table: bool = client
        .query_one("select to_regclass('public.canary') is not null", &[])
        .await?
        .get(0);
    ensure!(canary_table, "a handler definition dropped a table");
    Ok(())
}

/// Hostile batches straight into project_batch (what a confused or compromised projector
/// could send): refused with a SQLSTATE, never a crash, and the canary unharmed.
async fn batch_hostile(client: &Client, rng: &mut StdRng, tally: &mut Tally) -> Result<()> {
    for _ in 0..80 {
        let batch = match rng.random_range(0..6) {
            0 => hostile_payload(rng),
            1 => json!([hostile_value(rng, 130)]).to_string(),
            2 => json!([{"position": hostile_value(rng, 3), "command_id": "x", "stream": hostile_stream(rng), "seq": hostile_value(rng, 2),
                         "command_type": "HOSTILE", "payload": {}, "created_at": "now"}])
            .to_string(),
            3 => json!([{"position": 1, "command_id": Uuid::now_v7().to_string(), "stream": "b", "seq": i64::MAX,
                         "command_type": "HOSTILE", "payload": serde_json::from_str::<Value>(&hostile_payload(rng)).unwrap_or(json!({})),
                         "metadata": {}, "created_at": "2026-01-01 00:00:00+00"}])
            .to_string(),
            4 => format!("[{}]", (0..rng.random_range(1..2_000)).map(|_| "{}").collect::<Vec<_>>().join(",")),
            _ => "[]".to_owned(),
        };
        // no lsn and no fence: these batches must not move any checkpoint past the real log
        let outcome = call(
            client,
            "select 1 from cqrs.project_batch($1::text::jsonb)",
            &[&batch],
        )
        .await?;
        tally.add("project_batch", &outcome);
    }
    Ok(())
}

/// The verdict: the log holds every accepted command once, the canary has applied every canary
/// What the canary projection applied, and how many CANARY commands the log holds.
async fn canary_counts(client: &Client) -> Result<(i64, i64)> {
    let row = client
        .query_one(
            "select (select coalesce(sum(n), 0)::bigint from public.canary),
                    (select count(*) from cqrs.command_log where command_type = 'CANARY')",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// command, and every HOSTILE command is accounted for in each projection that handles it.
async fn assert_nothing_lost_and_nobody_stalled(client: &Client, canaries: u64) -> Result<()> {
    let duplicates: i64 = client
        .query_one(
            "select count(*) - count(distinct command_id) from cqrs.command_log",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        duplicates == 0,
        "{duplicates} command ids appear twice in the log"
    );
    let gaps: i64 = client
        .query_one(
            "select count(*) from (select stream from cqrs.command_log group by stream having max(seq) <> count(*)) g",
            &[],
        )
        .await?
        .get(0);
    ensure!(gaps == 0, "{gaps} streams have gaps in their seqs");
    // every CANARY command the log holds: the well-formed ones this test wrote, and hostile
    // ones that happened to take the type (the canary reads nothing from the payload)
    let (canary, logged) = canary_counts(client).await?;
    ensure!(
        logged >= canaries as i64,
        "the log holds {logged} CANARY commands, {canaries} were appended"
    );
    ensure!(
        canary == logged,
        "the canary applied {canary} of {logged} commands"
    );
    let canary_state = client
        .query_one(
            "select halted, events_behind, parked from cqrs.status() where projection = 'canary'",
            &[],
        )
        .await?;
    ensure!(!canary_state.get::<_, bool>(0), "the canary projection halted");
    // counted_dead dead-letters what it cannot apply and goes on: nothing behind, nothing lost
    let row = client
        .query_one(
            "select (select count(*) from cqrs.command_log where command_type in ('HOSTILE', 'CANARY')),
                    (select applied + dead_lettered from cqrs.projection_state where name = 'counted_dead'),
                    (select events_behind from cqrs.status() where projection = 'counted_dead')",
            &[],
        )
        .await?;
    let (handled, accounted, behind): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    ensure!(behind == 0, "counted_dead is {behind} events behind");
    ensure!(
        accounted >= handled,
        "counted_dead accounted for {accounted} of {handled} commands"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_sqlstates_and_stalls_or_loses_nothing() -> Result<()> {
    let cluster = PgCluster::start(ClusterOptions::default())?;
    let client = connect(&cluster.url()).await?;
    client.batch_execute(SCHEMA).await?;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut tally = Tally::default();

    let canaries = append_hostile(&client, &mut rng, cases(), &mut tally).await?;
    define_hostile(&client, &mut rng, &mut tally).await?;
    batch_hostile(&client, &mut rng, &mut tally).await?;
    // project the whole log the way the sidecar does, then the way a DBA does
    let rows = call(
        &client,
        "select 1 from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l))",
        &[],
    )
    .await?;
    ensure!(rows.is_ok(), "projecting the log failed for everyone: {rows:?}");
    let caught = call(&client, "select 1 from cqrs.catch_up()", &[]).await?;
    ensure!(caught.is_ok(), "catch_up failed: {caught:?}");
    assert_nothing_lost_and_nobody_stalled(&client, canaries).await?;

    let crashes = std::fs::read_to_string(cluster.log_path()).unwrap_or_default();
    ensure!(
        !crashes.contains("was terminated by signal") && !crashes.contains("server process"),
        "a backend crashed:\n{crashes}"
    );
    eprintln!("{:#?}", tally.0);
    for door in ["append 54000", "append ok", "append 22P02"] {
        ensure!(
            tally.0.contains_key(door),
            "the run never produced {door}: {:?}",
            tally.0
        );
    }
    Ok(())
}

/// The same hostile commands while a sidecar streams: it keeps projecting the canary, does not
/// crash-loop, and the cache follows the canary's read model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_keeps_projecting_through_hostile_commands() -> Result<()> {
    let mut rig = Rig::start().await?;
    let client = rig.client().await?;
    client.batch_execute(SCHEMA).await?;
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut tally = Tally::default();
    let canaries = append_hostile(&client, &mut rng, cases() / 2, &mut tally).await?;
    eventually(
        Duration::from_secs(60),
        "the sidecar projected every canary command",
        || async {
            let (applied, logged) = canary_counts(&client).await?;
            ensure!(
                applied == logged && logged >= canaries as i64,
                "{applied} of {logged}"
            );
            Ok(())
        },
    )
    .await
    .with_context(|| rig.logs())?;
    assert_nothing_lost_and_nobody_stalled(&client, canaries).await?;
    ensure!(rig.sidecars[0].is_running(), "the sidecar died:\n{}", rig.logs());
    ensure!(
        rig.sidecars[0].readiness() == Some(200),
        "the sidecar is not ready:\n{}",
        rig.logs()
    );
    let failures = rig.sidecars[0].metric(metrics::BATCH_FAILURES_TOTAL)?;
    ensure!(
        failures == 0.0,
        "{failures} batches failed and were retried:\n{}",
        rig.logs()
    );
    // a halted projection stays behind on purpose; every cached row still equals its read-model row
    let redis_url = rig.redis.url();
    eventually(
        Duration::from_secs(60),
        "the cache equals the read models",
        || cache_check::check(&client, &redis_url, PREFIX),
    )
    .await
    .with_context(|| rig.logs())?;
    Ok(())
}
