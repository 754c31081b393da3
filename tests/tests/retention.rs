//! Retention of the command log (sql/core/retention.sql) with the sidecar projecting and writers
//! appending, in both editions: a month of history in daily partitions, `keep = 7 days`, and the
//! sidecar's own `cqrs.maintain()` removes what is older while the traffic runs. Nothing is lost
//! or doubled, the read models and the cache equal the fold of every command ever appended,
//! a retry inside the horizon is a duplicate and one outside it is refused.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cqrs_e2e::edition::{self, Edition};
use cqrs_e2e::orders::{fold, random_log, read_models, seed_commands, Command};
use cqrs_e2e::rig::{Rig, PREFIX};
use cqrs_e2e::{cache_check, caught_up, connect, eventually};
use cqrs_harness::ClusterOptions;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::{NoContext, Timestamp, Uuid};

/// Days of history, and how many the log keeps.
const HISTORY_DAYS: u64 = 30;
const KEEP_DAYS: u64 = 7;
const DAY: u64 = 86_400;

/// A UUIDv7 of `seconds_ago` (what a client's clock made then).
fn v7_ago(now: u64, seconds_ago: u64) -> Uuid {
    Uuid::new_v7(Timestamp::from_unix(NoContext, now - seconds_ago, 0))
}

/// The log as (position, command_id, stream, command_type, payload), in log order.
async fn log(client: &Client) -> Result<Vec<(i64, Uuid, String, String, Value)>> {
    Ok(client
        .query(
            "select position, command_id, stream, command_type, payload from cqrs.command_log order by position",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect())
}

fn static_type(command_type: &str) -> &'static str {
    match command_type {
        "CREATE_ORDER" => "CREATE_ORDER",
        "ADD_ITEM" => "ADD_ITEM",
        "SHIP_ORDER" => "SHIP_ORDER",
        "CANCEL_ORDER" => "CANCEL_ORDER",
        _ => "OTHER",
    }
}

/// Appends `commands` with ids of the times `ages` (seconds ago), in that order.
async fn append_history(client: &Client, now: u64, commands: &[(u64, Command)]) -> Result<()> {
    for chunk in commands.chunks(200) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|(ago, c)| {
                json!({"command_id": v7_ago(now, *ago).to_string(), "stream": c.stream,
                       "command_type": c.command_type, "payload": c.payload})
            })
            .collect();
        client
            .query("select 1 from cqrs.append_batch($1)", &[&Value::Array(batch)])
            .await?;
    }
    Ok(())
}

async fn retention_under_load(edition: Edition) -> Result<()> {
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let owner = connect(&edition::owner_url(&rig.pg, edition)).await?;
    let client = rig.client().await?;
    // a month of daily partitions: the first ends 30 days ago (what a month of maintain() made)
    owner
        .batch_execute(
            "do $$ declare p regclass; begin
                 for p in select l.partition from cqrs.log_partitions() l loop
                     perform cqrs._disown_log_partition(p);
                     execute format('drop table %s', p);
                 end loop;
             end $$;
             select cqrs._create_log_partition('command_log_start', '-infinity',
                        date_bin('1 day', now() - interval '30 days', '2000-01-01 00:00:00+00'));
             select count(*) from cqrs.maintain();",
        )
        .await?;

    // the history: every user's first order 30 days ago, then 3,000 commands spread over the month
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut rng = StdRng::seed_from_u64(24);
    let mut history: Vec<(u64, Command)> = seed_commands(50)
        .into_iter()
        .map(|c| (HISTORY_DAYS * DAY - 3_600, c))
        .collect();
    let spread = random_log(&mut rng, 3_000, 1_000, 50);
    let count = spread.len() as u64;
    history.extend(
        spread
            .into_iter()
            .enumerate()
            .map(|(i, c)| ((HISTORY_DAYS * DAY - 7_200) * (count - i as u64) / count + 60, c)),
    );
    append_history(&client, now, &history).await?;
    let history_log = log(&client).await?;
    ensure!(
        history_log.len() == history.len(),
        "{} of {} history commands in the log",
        history_log.len(),
        history.len()
    );
    let days_used: i64 = client
        .query_one("select count(distinct tableoid) from cqrs.command_log", &[])
        .await?
        .get(0);
    ensure!(
        days_used >= 29,
        "the history fills {days_used} partitions, not a month's"
    );

    // the sidecar projects and writers append; then keep a week, which the sidecar's
    // cqrs.maintain() (every second here) applies while they go on
    rig.set("CQRS_MAINTAIN_INTERVAL", "1s");
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let traffic = cqrs_e2e::traffic::Traffic::start(
        &rig.pg.url(),
        random_log(&mut rng, 4_000, 1_000, 50),
        2,
        Some(300.0),
    );
    eventually(Duration::from_secs(30), "the writers append", || async {
        ensure!(traffic.appended() >= 300, "{} appended", traffic.appended());
        Ok(())
    })
    .await?;
    owner
        .batch_execute(&format!(
            "update cqrs.retention set keep = interval '{KEEP_DAYS} days'"
        ))
        .await?;
    let horizon_is_a_week = || async {
        let row = client
            .query_one(
                "select cqrs.idempotency_horizon() = date_bin('1 day', now() - interval '7 days', '2000-01-01 00:00:00+00'),
                        cqrs.idempotency_horizon()::text
                   from cqrs.retention",
                &[],
            )
            .await?;
        ensure!(
            row.get::<_, bool>(0),
            "the horizon is {}",
            row.get::<_, String>(1)
        );
        Ok(())
    };
    eventually(
        Duration::from_secs(90),
        "the sidecar's cqrs.maintain() keeps a week",
        horizon_is_a_week,
    )
    .await
    .with_context(|| rig.logs())?;
    let appended_by_then = traffic.appended();
    let appended = traffic.finish().await?;
    ensure!(
        appended > appended_by_then,
        "the writers had finished ({appended}) before retention was done"
    );

    // nothing lost, nothing doubled: the log is what was appended, less a prefix of the history
    eventually(Duration::from_secs(120), "projections caught up", || {
        caught_up(&client)
    })
    .await
    .with_context(|| rig.logs())?;
    let kept = log(&client).await?;
    let first_kept = kept.first().map(|row| row.0).unwrap_or(i64::MAX);
    let removed: Vec<_> = history_log.iter().filter(|row| row.0 < first_kept).collect();
    ensure!(!removed.is_empty(), "retention removed nothing");
    ensure!(
        kept.len() as u64 + removed.len() as u64 == history.len() as u64 + appended,
        "{} kept + {} removed, but {} + {appended} appended",
        kept.len(),
        removed.len(),
        history.len()
    );
    let week_ago = now - KEEP_DAYS * DAY;
    for (_, id, ..) in &removed {
        let seconds = id.get_timestamp().map(|t| t.to_unix().0).unwrap_or(0);
        ensure!(
            seconds < week_ago,
            "command {id} of less than a week ago was removed"
        );
    }

    // the read models and the cache equal the fold of every command ever appended
    let whole: Vec<(String, &'static str, Value)> = removed
        .iter()
        .map(|row| (*row).clone())
        .chain(kept.iter().cloned())
        .map(|(_, _, stream, command_type, payload)| (stream, static_type(&command_type), payload))
        .collect();
    let expected = fold(&whole);
    let actual = read_models(&client).await?;
    ensure!(
        actual.0 == expected.0,
        "order_summary differs from the fold of everything appended"
    );
    ensure!(
        actual.1 == expected.1,
        "user_order_stats differs from the fold of everything appended"
    );
    let redis_url = rig.cache_target();
    eventually(Duration::from_secs(60), "cache equals the read models", || {
        cache_check::check(&client, &redis_url, PREFIX)
    })
    .await
    .with_context(|| rig.logs())?;

    // a retry inside the horizon is a duplicate; one from before it is refused, not appended
    let (position, id, stream, command_type, payload) = kept[0].clone();
    let row = client
        .query_one(
            "select position, duplicate from cqrs.append($1, $2, $3, $4)",
            &[&id, &stream, &command_type, &payload],
        )
        .await?;
    ensure!(
        row.get::<_, bool>(1) && row.get::<_, i64>(0) == position,
        "a retry inside the horizon was not answered as the duplicate it is"
    );
    let (_, old_id, old_stream, old_type, old_payload) = removed[0].clone();
    let refused = client
        .query(
            "select position from cqrs.append($1, $2, $3, $4)",
            &[&old_id, &old_stream, &old_type, &old_payload],
        )
        .await
        .err()
        .and_then(|e| e.code().map(|c| c.code().to_owned()));
    ensure!(
        refused.as_deref() == Some("55000"),
        "a retry from before the horizon: {refused:?}"
    );
    let again: i64 = client
        .query_one(
            "select count(*) from cqrs.command_log where command_id = $1",
            &[&old_id],
        )
        .await?
        .get(0);
    ensure!(again == 0, "the refused retry was appended");

    // the sidecar says what it did
    let metrics = rig.sidecars[0].metrics()?;
    ensure!(
        metrics.contains("cqrs_log_maintenance_total{action=\"dropped\"}"),
        "no dropped partitions in /metrics"
    );
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("cqrs_log_horizon_seconds ") && !l.ends_with(" 0")),
        "cqrs_log_horizon_seconds is not set"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_under_load_with_the_extension() -> Result<()> {
    retention_under_load(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_under_load_with_the_portable_edition() -> Result<()> {
    retention_under_load(Edition::Portable).await
}
