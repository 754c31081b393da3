//! Retention of the command log (sql/core/retention.sql) with the sidecar projecting and writers
//! appending, in both editions: a month of history in daily partitions, `keep = 7 days`, and the
//! sidecar's own `cqrs.maintain()` removes what is older while the traffic runs. Nothing is lost
//! or doubled, the read models and the cache equal the fold of every command ever appended,
//! a retry inside the horizon is a duplicate and one outside it is refused.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// A command of the log: (position, command_id, stream, command_type, payload).
type LogRow = (i64, Uuid, String, String, Value);

/// The log, in log order.
async fn log(client: &Client) -> Result<Vec<LogRow>> {
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

/// Drops every partition of the log, leaving it without any (as a new install is).
async fn drop_every_partition(owner: &Client) -> Result<()> {
    owner
        .batch_execute(
            "do $$ declare p regclass; begin
                 for p in select l.partition from cqrs.log_partitions() l loop
                     perform cqrs._disown_log_partition(p);
                     execute format('drop table %s', p);
                 end loop;
             end $$;",
        )
        .await?;
    Ok(())
}

/// A month of daily partitions: the first ends 30 days ago (what a month of maintain() made).
async fn month_of_partitions(owner: &Client) -> Result<()> {
    drop_every_partition(owner).await?;
    owner
        .batch_execute(
            "select cqrs._create_log_partition('command_log_start', '-infinity',
                        date_bin('1 day', now() - interval '30 days', '2000-01-01 00:00:00+00'));
             select count(*) from cqrs.maintain();",
        )
        .await?;
    Ok(())
}

/// Now, in Unix seconds.
fn unix_now() -> Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs())
}

/// A month of history: every one of `users` users' first order 30 days ago, then `commands`
/// random commands on `orders` orders spread evenly over the month, each with its age in seconds.
fn month_history(rng: &mut StdRng, commands: usize, orders: usize, users: usize) -> Vec<(u64, Command)> {
    let mut history: Vec<(u64, Command)> = seed_commands(users)
        .into_iter()
        .map(|c| (HISTORY_DAYS * DAY - 3_600, c))
        .collect();
    let spread = random_log(rng, commands, orders, users);
    let count = spread.len() as u64;
    history.extend(
        spread
            .into_iter()
            .enumerate()
            .map(|(i, c)| ((HISTORY_DAYS * DAY - 7_200) * (count - i as u64) / count + 60, c)),
    );
    history
}

/// One seed command a day through the month (the newest a day ago), every projection caught up
/// with them, and a log consumer `cdc` that has read them all.
async fn a_command_a_day(owner: &Client, client: &Client, now: u64) -> Result<()> {
    let history: Vec<(u64, Command)> = seed_commands(20)
        .into_iter()
        .enumerate()
        .map(|(i, c)| ((HISTORY_DAYS - 1 - i as u64) * DAY, c))
        .collect();
    append_history(client, now, &history).await?;
    owner
        .batch_execute(
            "select cqrs.catch_up(p.name) from cqrs.projection_state p;
             select cqrs.hold_log('cdc', (select max(position) from cqrs.command_log))",
        )
        .await?;
    Ok(())
}

/// The rows of `before` that are no longer in the log `kept` (retention removes a prefix).
fn removed_from(before: &[LogRow], kept: &[LogRow]) -> Vec<LogRow> {
    let first_kept = kept.first().map(|row| row.0).unwrap_or(i64::MAX);
    before.iter().filter(|row| row.0 < first_kept).cloned().collect()
}

/// The read models equal the fold of every command ever appended (`removed`, then `kept`), and
/// the cache equals the read models.
async fn assert_fold_of_everything(
    rig: &Rig,
    client: &Client,
    removed: &[LogRow],
    kept: &[LogRow],
) -> Result<()> {
    let whole: Vec<(String, &'static str, Value)> = removed
        .iter()
        .chain(kept)
        .cloned()
        .map(|(_, _, stream, command_type, payload)| (stream, static_type(&command_type), payload))
        .collect();
    let expected = fold(&whole);
    let actual = read_models(client).await?;
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
        cache_check::check(client, &redis_url, PREFIX)
    })
    .await
    .with_context(|| rig.logs())
}

/// A retry of `kept` is the duplicate it is; one of `removed` (older than the horizon) is
/// refused with 55000. `when` says when, for the messages.
async fn assert_retries(client: &Client, kept: &LogRow, removed: &LogRow, when: &str) -> Result<()> {
    let (position, id, stream, command_type, payload) = kept;
    let row = client
        .query_one(
            "select position, duplicate from cqrs.append($1, $2, $3, $4)",
            &[id, stream, command_type, payload],
        )
        .await?;
    ensure!(
        row.get::<_, bool>(1) && row.get::<_, i64>(0) == *position,
        "a retry of a kept command {when} was not answered as the duplicate it is"
    );
    let (_, id, stream, command_type, payload) = removed;
    let refused = client
        .query(
            "select position from cqrs.append($1, $2, $3, $4)",
            &[id, stream, command_type, payload],
        )
        .await
        .err()
        .and_then(|e| e.code().map(|c| c.code().to_owned()));
    ensure!(
        refused.as_deref() == Some("55000"),
        "a retry of a removed command {when}: {refused:?}"
    );
    Ok(())
}

async fn retention_under_load(edition: Edition) -> Result<()> {
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let owner = connect(&edition::owner_url(&rig.pg, edition)).await?;
    let client = rig.client().await?;
    // a month of daily partitions: the first ends 30 days ago (what a month of maintain() made)
    month_of_partitions(&owner).await?;

    // the history: every user's first order 30 days ago, then 3,000 commands spread over the month
    let now = unix_now()?;
    let mut rng = StdRng::seed_from_u64(24);
    let history = month_history(&mut rng, 3_000, 1_000, 50);
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
    let removed = removed_from(&history_log, &kept);
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
    assert_fold_of_everything(&rig, &client, &removed, &kept).await?;

    // a retry inside the horizon is a duplicate; one from before it is refused, not appended
    assert_retries(&client, &kept[0], &removed[0], "under load").await?;
    let old_id = removed[0].1;
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
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("cqrs_log_partitions_ahead_seconds ")
                && l.split(' ')
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)),
        "cqrs_log_partitions_ahead_seconds is not above 0"
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

/// The next partition boundary after now: the start of tomorrow (UTC), in Unix milliseconds.
fn next_midnight_ms(now_ms: u64) -> u64 {
    (now_ms / (DAY * 1_000) + 1) * DAY * 1_000
}

/// Writers whose command ids cross a partition boundary under load (their clocks pass midnight
/// while they append), the sidecar projecting; meanwhile the log's owner removes a week-old
/// history with `cqrs.archive_before_concurrently` through psql's `\gexec`, first held back by a
/// log consumer and then let go. Every command lands in the partition of its id's time, each
/// stream's sequence runs on across the boundary, nothing is lost or doubled, and the read
/// models and the cache equal the fold of everything ever appended.
async fn boundary_and_concurrent_archive(edition: Edition) -> Result<()> {
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let owner = connect(&edition::owner_url(&rig.pg, edition)).await?;
    let owner_role = match edition {
        Edition::Extension => "postgres",
        Edition::Portable => edition::ADMIN,
    };
    let client = rig.client().await?;
    month_of_partitions(&owner).await?;
    let now = unix_now()?;
    let mut rng = StdRng::seed_from_u64(2424);
    let history = month_history(&mut rng, 1_000, 300, 50);
    append_history(&client, now, &history).await?;
    let history_log = log(&client).await?;
    // a reader of the log of its own, which has read nothing yet
    owner.batch_execute("select cqrs.hold_log('cdc', 0)").await?;

    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    // four writers append 2,000 commands whose ids' times run from a second before midnight to a
    // second after it (the partitions of today and tomorrow), one command a transaction
    let planned = Arc::new(random_log(&mut rng, 2_000, 300, 50));
    let boundary = next_midnight_ms(now * 1_000);
    let next = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (planned, next) = (Arc::clone(&planned), Arc::clone(&next));
        let writer = connect(&rig.pg.url()).await?;
        writers.push(tokio::spawn(async move {
            loop {
                let at = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = planned.get(at) else {
                    return anyhow::Ok(());
                };
                let ms = boundary - 1_000 + at as u64 * 2_000 / planned.len() as u64;
                let id = Uuid::new_v7(Timestamp::from_unix(
                    NoContext,
                    ms / 1_000,
                    (ms % 1_000) as u32 * 1_000_000,
                ));
                writer
                    .query_one(
                        "select position from cqrs.append($1, $2, $3, $4)",
                        &[&id, &c.stream, &c.command_type, &c.payload],
                    )
                    .await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    // the owner removes what is older than a week while they append: held back by the consumer
    // first (the statements stop before the first partition it holds), then let go
    let archive = format!(
        "select * from cqrs.archive_before_concurrently(now() - interval '{KEEP_DAYS} days') \\gexec\n"
    );
    // (psql runs while the writers go on: block_in_place leaves them the other workers)
    let (ok, held) = tokio::task::block_in_place(|| edition::psql_script(&rig.pg, owner_role, &archive))?;
    ensure!(ok, "archive_before_concurrently failed:\n{held}");
    ensure!(
        held.contains("log consumer cdc has not checkpointed past position"),
        "the log consumer did not hold retention back:\n{held}"
    );
    owner
        .batch_execute("select cqrs.hold_log('cdc', (select max(position) from cqrs.command_log))")
        .await?;
    let (ok, removed_output) =
        tokio::task::block_in_place(|| edition::psql_script(&rig.pg, owner_role, &archive))?;
    ensure!(ok, "archive_before_concurrently failed:\n{removed_output}");
    ensure!(
        removed_output.contains("| dropped |"),
        "archive_before_concurrently removed nothing:\n{removed_output}"
    );
    let writing = next.load(Ordering::Relaxed);
    for writer in writers {
        writer.await??;
    }
    ensure!(
        writing < planned.len(),
        "the writers had finished before the removal was done"
    );

    // every command in the partition of its id's time, on both sides of the boundary
    let row = client
        .query_one(
            "select count(*) filter (where l.id_time <> cqrs.command_time(l.command_id)
                                        or not l.id_time >= p.lower_bound or not l.id_time < p.upper_bound),
                    count(*) filter (where l.id_time < to_timestamp($1::float8 / 1000)),
                    count(*) filter (where l.id_time >= to_timestamp($1::float8 / 1000))
               from cqrs.command_log l join cqrs.log_partitions() p on p.partition = l.tableoid",
            &[&(boundary as f64)],
        )
        .await?;
    let (misplaced, before_midnight, after_midnight): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    ensure!(misplaced == 0, "{misplaced} commands outside their partition");
    ensure!(
        after_midnight == 1_000 && before_midnight > 1_000,
        "{before_midnight} commands before midnight, {after_midnight} after"
    );
    // each stream's sequence runs on without a gap from its first kept command
    let gaps: i64 = client
        .query_one(
            "select count(*) from (select l.seq - lag(l.seq) over (partition by l.stream order by l.seq) as step
                                     from cqrs.command_log l) s
              where s.step <> 1",
            &[],
        )
        .await?
        .get(0);
    ensure!(gaps == 0, "{gaps} gaps in streams' sequences");

    // nothing lost or doubled; the read models and the cache are the fold of everything
    eventually(Duration::from_secs(120), "projections caught up", || {
        caught_up(&client)
    })
    .await
    .with_context(|| rig.logs())?;
    let kept = log(&client).await?;
    let removed = removed_from(&history_log, &kept);
    ensure!(!removed.is_empty(), "retention removed nothing");
    ensure!(
        kept.len() + removed.len() == history.len() + planned.len(),
        "{} kept + {} removed, but {} + {} appended",
        kept.len(),
        removed.len(),
        history.len(),
        planned.len()
    );
    assert_fold_of_everything(&rig, &client, &removed, &kept).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_boundary_crossed_under_load_and_a_concurrent_archive_with_the_extension() -> Result<()> {
    boundary_and_concurrent_archive(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_boundary_crossed_under_load_and_a_concurrent_archive_with_the_portable_edition() -> Result<()> {
    boundary_and_concurrent_archive(Edition::Portable).await
}

/// A removal never interleaves with what reads the whole log. A long reader (a rebuild) makes a
/// removal give way after `lock_wait` and say so; a removal waiting for a rebuild's lock, or
/// committed before it, makes the rebuild refuse (`55000`), never read a cut log; a command
/// that a late retry put into a partition while its removal waited is seen under the lock and
/// the partition kept.
async fn removal_meets_readers_and_late_retries(edition: Edition) -> Result<()> {
    let rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let owner_url = edition::owner_url(&rig.pg, edition);
    let owner = connect(&owner_url).await?;
    let client = rig.client().await?;
    month_of_partitions(&owner).await?;
    let now = unix_now()?;
    a_command_a_day(&owner, &client, now).await?;
    let removal = |lock_wait: &'static str| {
        let url = owner_url.clone();
        tokio::spawn(async move {
            let owner = connect(&url).await?;
            let rows = owner
                .query(
                    &format!(
                        "select action, coalesce(reason, '') from cqrs.archive_before(now() - interval '{KEEP_DAYS} days', '{lock_wait}')"
                    ),
                    &[],
                )
                .await?;
            anyhow::Ok(
                rows.iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>(),
            )
        })
    };

    // a late retry of a command older than the month, appended while a removal waits for its
    // lock: the first partition, looked at before, is looked at again under the lock and kept
    let mut late = connect(&rig.pg.url()).await?;
    let late_tx = late.transaction().await?;
    late_tx
        .query_one(
            "select position from cqrs.append($1, 'order-late', 'CREATE_ORDER', '{\"user_id\": \"user-1\", \"currency\": \"EUR\"}')",
            &[&v7_ago(now, (HISTORY_DAYS + 2) * DAY)],
        )
        .await?;
    let waiting = removal("30 seconds");
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        !waiting.is_finished(),
        "the removal did not wait for the late append"
    );
    late_tx.commit().await?;
    let report = waiting.await??;
    ensure!(
        report.len() == 1
            && report[0].0 == "kept"
            && report[0].1.contains("has not checkpointed past position"),
        "a partition with a late command was not kept: {report:?}"
    );
    let late_count: i64 = client
        .query_one(
            "select count(*) from cqrs.command_log where stream = 'order-late'",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        late_count == 1,
        "the late command is not in the log ({late_count})"
    );
    owner
        .batch_execute(
            "select cqrs.catch_up(p.name) from cqrs.projection_state p;
             select cqrs.hold_log('cdc', (select max(position) from cqrs.command_log))",
        )
        .await?;

    // a rebuild under way: the removal gives way after lock_wait and says why
    let mut rebuilder = connect(&owner_url).await?;
    let rebuild = rebuilder.transaction().await?;
    rebuild
        .query("select * from cqrs.rebuild('order_summary')", &[])
        .await?;
    let report = removal("300 milliseconds").await??;
    ensure!(
        report.len() == 1 && report[0].0 == "kept" && report[0].1.contains("in use longer than lock_wait"),
        "a removal during a rebuild: {report:?}"
    );
    rebuild.commit().await?;

    // a removal under way: a rebuild waits for it, then refuses (the log is cut)
    let mut remover = connect(&owner_url).await?;
    let removing = remover.transaction().await?;
    let removed = removing
        .query(
            &format!("select action from cqrs.archive_before(now() - interval '{KEEP_DAYS} days') where action <> 'kept'"),
            &[],
        )
        .await?;
    ensure!(!removed.is_empty(), "nothing was removed");
    let url = owner_url.clone();
    let rebuild = tokio::spawn(async move {
        let owner = connect(&url).await?;
        let refused = owner
            .query("select * from cqrs.rebuild('order_summary')", &[])
            .await
            .err()
            .and_then(|e| e.code().map(|c| c.code().to_owned()));
        anyhow::Ok(refused)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(!rebuild.is_finished(), "the rebuild did not wait for the removal");
    removing.commit().await?;
    let refused = rebuild.await??;
    ensure!(
        refused.as_deref() == Some("55000"),
        "a rebuild after a removal: {refused:?}"
    );
    // and every projection is still caught up and not halted after the refused rebuild
    eventually(Duration::from_secs(30), "projections caught up", || {
        caught_up(&client)
    })
    .await
}

/// A command that a late retry put into a partition while its removal waited, with no reader
/// holding the log back: removed with the partition and counted — by its position, under the
/// detach's lock, where counting the whole partition again would hold every append that long.
/// The removal is shared SQL (sql/core/retention.sql): one edition is enough.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_command_no_reader_holds_is_removed_and_counted() -> Result<()> {
    let edition = Edition::Extension;
    let rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let owner_url = edition::owner_url(&rig.pg, edition);
    let owner = connect(&owner_url).await?;
    let client = rig.client().await?;
    month_of_partitions(&owner).await?;
    owner
        .batch_execute("select cqrs.drop_projection(p.name) from cqrs.projection p")
        .await?;
    let readers: i64 = owner
        .query_one(
            "select (select count(*) from cqrs.projection_state) + (select count(*) from cqrs.sink)
                    + (select count(*) from cqrs.log_consumer)",
            &[],
        )
        .await?
        .get(0);
    ensure!(readers == 0, "{readers} readers hold the log");
    let now = unix_now()?;
    let append = "select position from cqrs.append($1, $2, 'CREATE_ORDER', '{\"user_id\": \"user-1\", \"currency\": \"EUR\"}')";
    client
        .query_one(append, &[&v7_ago(now, (HISTORY_DAYS + 2) * DAY), &"order-old"])
        .await?;
    let mut late = connect(&rig.pg.url()).await?;
    let late_tx = late.transaction().await?;
    late_tx
        .query_one(append, &[&v7_ago(now, (HISTORY_DAYS + 1) * DAY), &"order-late"])
        .await?;
    let removal = tokio::spawn(async move {
        let owner = connect(&owner_url).await?;
        let rows = owner
            .query(
                &format!(
                    "select partition, action, commands from cqrs.archive_before(now() - interval '{KEEP_DAYS} days', '30 seconds')"
                ),
                &[],
            )
            .await?;
        anyhow::Ok(
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, i64>(2)))
                .collect::<Vec<_>>(),
        )
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        !removal.is_finished(),
        "the removal did not wait for the late append"
    );
    late_tx.commit().await?;
    let report = removal.await??;
    ensure!(
        report.first().is_some_and(|(partition, action, commands)| {
            partition.ends_with("command_log_start") && action == "dropped" && *commands == 2
        }) && report.iter().skip(1).all(|(_, action, commands)| action == "dropped" && *commands == 0),
        "the first partition, with the late command, should be dropped and both its commands counted: {report:?}"
    );
    let left: i64 = client
        .query_one(
            "select count(*) from cqrs.command_log where stream in ('order-old', 'order-late')",
            &[],
        )
        .await?
        .get(0);
    ensure!(left == 0, "{left} of the two old commands are still in the log");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn removal_meets_readers_and_late_retries_with_the_extension() -> Result<()> {
    removal_meets_readers_and_late_retries(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread")]
async fn removal_meets_readers_and_late_retries_with_the_portable_edition() -> Result<()> {
    removal_meets_readers_and_late_retries(Edition::Portable).await
}

/// Everything a dump must carry, as one text: the log's rows, its partitions and their bounds,
/// the retention settings and readers, the streams' heads and the projections' checkpoints.
async fn log_fingerprint(client: &Client) -> Result<String> {
    Ok(client
        .query_one(
            "select concat_ws(' / ',
                 (select count(*) || ' ' || md5(string_agg(l::text, ',' order by l.position)) from cqrs.command_log l),
                 (select string_agg(p.partition::text || ' ' || p.lower_bound || ' ' || p.upper_bound, ', ' order by p.lower_bound)
                    from cqrs.log_partitions() p),
                 (select r::text from cqrs.retention r),
                 (select string_agg(c.name || ' ' || c.checkpoint_position, ', ' order by c.name) from cqrs.log_consumer c),
                 (select md5(string_agg(s::text, ',' order by s.stream)) from cqrs.stream s),
                 (select string_agg(p.name || ' ' || p.checkpoint_position, ', ' order by p.name) from cqrs.projection_state p))",
            &[],
        )
        .await?
        .get(0))
}

/// `pg_dump` of a database whose log retention has cut, restored with `psql -1 -v ON_ERROR_STOP=1`
/// into a new database (the whole restore without one error), and again from a dump made with
/// `--enable-row-security`: the same log, partitions, bounds, settings, readers and heads;
/// appends go on after it, a retry of a kept command is a
/// duplicate and one of a removed command refused.
async fn dump_and_restore(edition: Edition) -> Result<()> {
    let rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let owner = connect(&edition::owner_url(&rig.pg, edition)).await?;
    let client = rig.client().await?;
    month_of_partitions(&owner).await?;
    let now = unix_now()?;
    let mut rng = StdRng::seed_from_u64(2425);
    let history = month_history(&mut rng, 600, 100, 20);
    append_history(&client, now, &history).await?;
    let before = log(&client).await?;
    owner
        .batch_execute(&format!(
            "select cqrs.catch_up(p.name) from cqrs.projection_state p;
             select cqrs.hold_log('cdc', (select max(position) from cqrs.command_log));
             update cqrs.retention set keep = interval '{KEEP_DAYS} days', premake = 20;
             select count(*) from cqrs.maintain();"
        ))
        .await?;
    let removed = removed_from(&before, &log(&client).await?);
    ensure!(!removed.is_empty(), "retention removed nothing before the dump");
    let dumped = log_fingerprint(&client).await?;

    // a dump made with --enable-row-security too: it leaves row_security on in the restore, as in
    // any session, and the restore must not meet partitions CREATE EXTENSION made (it makes none)
    let dir = cqrs_harness::postgres::tempdir("pg_cqrs-dump")?;
    for (database, options) in [
        ("restored", &[][..]),
        ("restored_rls", &["--enable-row-security"][..]),
    ] {
        let file = dir.join(format!("{database}.sql"));
        rig.pg.dump(rig.pg.database(), &file, options)?;
        rig.pg.psql(&format!("create database {database}"))?;
        let restore = file.to_str().context("the dump's path is not UTF-8")?.to_owned();
        let (ok, output) = edition::psql_file(&rig.pg, "postgres", database, &restore)?;
        ensure!(ok, "restoring the dump {options:?} failed: {output}");
        let restored = connect(&rig.pg.url_for(database)).await?;
        let again = log_fingerprint(&restored).await?;
        ensure!(
            again == dumped,
            "the database restored from the dump {options:?} differs:\n{again}\nwas\n{dumped}"
        );
        let members: i64 = restored
            .query_one(
                "select count(*) from cqrs.log_partitions() p join pg_depend d on d.objid = p.partition and d.deptype = 'e'",
                &[],
            )
            .await?
            .get(0);
        ensure!(members == 0, "{members} partitions are members of the extension");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let restored = connect(&rig.pg.url_for("restored")).await?;

    // appends go on: the position after the dumped one, a kept command's retry a duplicate, a
    // removed one's refused
    let newest: i64 = restored
        .query_one("select max(position) from cqrs.command_log", &[])
        .await?
        .get(0);
    let position: i64 = restored
        .query_one(
            "select position from cqrs.append(cqrs.uuid_v7(), 'order-after', 'CREATE_ORDER', '{\"user_id\": \"u\", \"currency\": \"EUR\"}')",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        position == newest + 1,
        "the first append after the restore got position {position}, after {newest}"
    );
    assert_retries(
        &restored,
        &log(&restored).await?[0],
        &removed[0],
        "after the restore",
    )
    .await?;
    restored
        .batch_execute("select count(*) from cqrs.maintain()")
        .await?;
    projections_go_on_after_the_restore(&restored, edition, position).await
}

/// The projections apply the first command appended after a restore: the extension's at once;
/// the portable edition's writers name their tables by oid, which a restore changes, so they
/// halt (55000, the detail saying why) until a member of the owner rebinds them — then resumed,
/// they apply it.
async fn projections_go_on_after_the_restore(
    restored: &Client,
    edition: Edition,
    position: i64,
) -> Result<()> {
    let batch = format!(
        "select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.position = {position}))"
    );
    restored.batch_execute(&batch).await?;
    let halted: Vec<String> = restored
        .query(
            "select name || ' ' || last_error_sqlstate || ' ' || coalesce(last_error_detail, '')
               from cqrs.projection_state where halted order by name",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if edition == Edition::Portable {
        ensure!(
            halted.len() == 2
                && halted
                    .iter()
                    .all(|h| h.contains(" 55000 ") && h.contains("restored from a dump")),
            "after the restore the portable projections should halt on their writers, saying why: {halted:?}"
        );
        restored
            .batch_execute(
                "select cqrs_portable.rebind(name) from cqrs.projection;
                 select count(*) from cqrs.projection p, cqrs.resume(p.name);",
            )
            .await?;
    } else {
        ensure!(halted.is_empty(), "halted after the restore: {halted:?}");
    }
    let applied: i64 = restored
        .query_one(
            "select count(*) from shop.order_summary o join shop.user_order_stats u on u.user_id = o.user_id
              where o.order_id = 'order-after' and not exists (select from cqrs.projection_state where halted)",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        applied == 1,
        "the command appended after the restore is not in both read models"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dump_restores_the_whole_log_with_the_extension() -> Result<()> {
    dump_and_restore(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dump_restores_the_whole_log_with_the_portable_edition() -> Result<()> {
    dump_and_restore(Edition::Portable).await
}

/// A `DETACH … CONCURRENTLY` of `cqrs.archive_before_concurrently`'s statements that is
/// cancelled while it waits for an older reader leaves the partition "detach pending":
/// `cqrs.archive_detached` refuses it (`55000`) and names the `finalize` to run; after that it
/// drops the partition, and nothing else of the log moves.
async fn interrupted_concurrent_detach(edition: Edition) -> Result<()> {
    let rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let owner_url = edition::owner_url(&rig.pg, edition);
    let owner = connect(&owner_url).await?;
    let client = rig.client().await?;
    month_of_partitions(&owner).await?;
    let now = unix_now()?;
    a_command_a_day(&owner, &client, now).await?;
    let statements: Vec<String> = owner
        .query(
            &format!(
                "select statement from cqrs.archive_before_concurrently(now() - interval '{KEEP_DAYS} days')"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(statements.len() >= 4, "statements: {statements:?}");
    // the second partition's (the first, command_log_start, is empty and goes whole)
    let (detach, finish) = (&statements[2], &statements[3]);
    let partition = detach
        .split_whitespace()
        .nth(5)
        .context("the detach statement names no partition")?
        .to_owned();
    let commands_before: i64 = client
        .query_one("select count(*) from cqrs.command_log", &[])
        .await?
        .get(0);

    // an older reader holds the second phase of the detach; the detach is cancelled meanwhile
    let mut reader = connect(&rig.pg.url()).await?;
    let reading = reader.transaction().await?;
    reading
        .query("select count(*) from cqrs.command_log", &[])
        .await?;
    let detacher = connect(&owner_url).await?;
    let cancel = detacher.cancel_token();
    let statement = detach.clone();
    let detaching = tokio::spawn(async move { detacher.batch_execute(&statement).await });
    eventually(Duration::from_secs(10), "the detach is pending", || async {
        let pending: Option<bool> = client
            .query_opt(
                "select i.inhdetachpending from pg_inherits i where i.inhrelid = $1::text::regclass",
                &[&partition],
            )
            .await?
            .map(|r| r.get(0));
        ensure!(pending == Some(true), "detach pending: {pending:?}");
        Ok(())
    })
    .await?;
    ensure!(
        !detaching.is_finished(),
        "the detach did not wait for the older reader"
    );
    cancel.cancel_query(tokio_postgres::NoTls).await?;
    let cancelled = detaching.await?;
    ensure!(cancelled.is_err(), "the detach was not cancelled");
    reading.commit().await?;

    // the finish refuses it and says how to finish it; after the finalize it drops it
    let refused = owner
        .query(finish.as_str(), &[])
        .await
        .err()
        .context("the finish accepted a pending detach")?;
    let db_error = refused.as_db_error().context("not a database error")?;
    ensure!(
        db_error.code().code() == "55000"
            && db_error.message().contains("was interrupted")
            && db_error
                .hint()
                .is_some_and(|h| h.contains(&format!("detach partition {partition} finalize"))),
        "the finish of a pending detach: {db_error:?}"
    );
    owner
        .batch_execute(&format!(
            "alter table cqrs.command_log detach partition {partition} finalize"
        ))
        .await?;
    let rows = owner.query(finish.as_str(), &[]).await?;
    let action: String = rows.first().context("the finish said nothing")?.get("action");
    let commands: i64 = rows[0].get("commands");
    ensure!(action == "dropped", "the finish after the finalize: {action}");
    let commands_after: i64 = client
        .query_one("select count(*) from cqrs.command_log", &[])
        .await?
        .get(0);
    ensure!(
        commands_after == commands_before - commands,
        "{commands_after} commands left of {commands_before}, {commands} dropped"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_concurrent_detach_is_finished_by_hand_with_the_extension() -> Result<()> {
    interrupted_concurrent_detach(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_concurrent_detach_is_finished_by_hand_with_the_portable_edition() -> Result<()> {
    interrupted_concurrent_detach(Edition::Portable).await
}

/// The major Debian packages pg_partman for (`postgresql-15-partman`, scripts/setup.sh).
const PARTMAN_MAJOR: u32 = 15;

/// pg_partman, created by a superuser in schema `partman`.
const CREATE_PARTMAN: &str = "create schema partman; create extension pg_partman schema partman;";

/// Whether this PostgreSQL is the one pg_partman is installed for; says SKIPPED when not.
fn partman_is_installed() -> Result<bool> {
    let major = cqrs_harness::postgres::pg_major()?;
    if major != PARTMAN_MAJOR {
        eprintln!("SKIPPED on PostgreSQL {major}: pg_partman is installed for PostgreSQL {PARTMAN_MAJOR} (postgresql-15-partman)");
    }
    Ok(major == PARTMAN_MAJOR)
}

/// A rig of `edition` with pg_partman created by a superuser: the rig, the installer's and the
/// superuser's connections; `None` (said SKIPPED) where pg_partman is not installed.
async fn beside_partman(edition: Edition) -> Result<Option<(Rig, Client, Client)>> {
    if !partman_is_installed()? {
        return Ok(None);
    }
    let rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let owner = connect(&edition::owner_url(&rig.pg, edition)).await?;
    let superuser = connect(&rig.pg.url()).await?;
    superuser.batch_execute(CREATE_PARTMAN).await?;
    Ok(Some((rig, owner, superuser)))
}

/// pg_partman keeping the log beside pg_cqrs (README, Retention: beside pg_partman). Its
/// `create_parent` makes a default partition — refused by `cqrs.maintain()`, `55000` — and,
/// without a template, partitions without the unique index on `command_id` that idempotency
/// stands on: `cqrs.maintain()` adds pg_cqrs's keys to each (so a retry is a duplicate, not a
/// second command), makes no partitions itself while pg_partman keeps the log (pg_partman's
/// maintenance makes them), removes old ones under its own guards, and refuses pg_partman's
/// retention of the log. The SQL is shared by both editions: one is enough.
#[tokio::test(flavor = "multi_thread")]
async fn pg_partman_keeps_the_log_and_pg_cqrs_its_keys_and_retention() -> Result<()> {
    let Some((rig, owner, superuser)) = beside_partman(Edition::Extension).await? else {
        return Ok(());
    };
    let client = rig.client().await?;
    drop_every_partition(&owner).await?;
    superuser
        .batch_execute(
            "select partman.create_parent('cqrs.command_log', 'id_time', 'native', 'daily', p_premake => 3)",
        )
        .await
        .context("pg_partman's create_parent on the log (apt-get install postgresql-15-partman)")?;
    let maintain = "select partition, action from cqrs.maintain()";
    let refused = owner.query(maintain, &[]).await.err();
    let code = refused
        .as_ref()
        .and_then(|e| e.code())
        .map(|c| c.code().to_owned());
    ensure!(
        code.as_deref() == Some("55000")
            && refused.is_some_and(|e| format!("{e:?}").contains("default partition")),
        "maintain() beside pg_partman's default partition: {code:?}"
    );
    superuser
        .batch_execute("drop table cqrs.command_log_default")
        .await?;
    let actions = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, String)> {
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let made: i64 = owner
        .query_one("select count(*) from cqrs.log_partitions()", &[])
        .await?
        .get(0);
    // an append to a partition without pg_cqrs's keys: the extension's append cannot name
    // command_id's index as its only arbiter there, and goes through the log instead (42P10
    // otherwise); once maintain() has keyed the partition, its retry is a duplicate
    let append = "select duplicate from cqrs.append($1, 'order-partman', 'CREATE_ORDER', '{\"user_id\": \"user-1\", \"currency\": \"EUR\"}')";
    let unkeyed = Uuid::now_v7();
    let first: bool = client
        .query_one(append, &[&unkeyed])
        .await
        .context("an append to pg_partman's partition before maintain() keys it")?
        .get(0);
    ensure!(!first, "the first append to an unkeyed partition was a duplicate");
    let report = actions(owner.query(maintain, &[]).await?);
    ensure!(
        report.len() as i64 == made && report.iter().all(|(_, action)| action == "keyed"),
        "maintain() should key each of pg_partman's {made} partitions and make none: {report:?}"
    );
    let retry: bool = client.query_one(append, &[&unkeyed]).await?.get(0);
    ensure!(retry, "a retry after the keys were added was not a duplicate");

    // a retry is a duplicate in pg_partman's partition of today
    let id = Uuid::now_v7();
    let first: bool = client.query_one(append, &[&id]).await?.get(0);
    let retry: bool = client.query_one(append, &[&id]).await?.get(0);
    ensure!(
        !first && retry,
        "append then retry beside pg_partman: duplicate {first}, then {retry}"
    );

    // pg_partman makes the next partitions (without keys: no template), pg_cqrs keys them. How
    // many it makes depends on the time of day (pg_partman 4 rounds the days left ahead), so
    // they are counted in the catalog
    let before = leaf_partitions(&superuser).await?;
    superuser
        .batch_execute(
            "update partman.part_config set premake = 5, infinite_time_partitions = true
              where parent_table = 'cqrs.command_log';
             select partman.run_maintenance('cqrs.command_log');",
        )
        .await?;
    let made = leaf_partitions(&superuser).await? - before;
    let report = actions(owner.query(maintain, &[]).await?);
    ensure!(
        made > 0 && report.len() as i64 == made && report.iter().all(|(_, action)| action == "keyed"),
        "after pg_partman made {made} more, maintain() should key those: {report:?}"
    );
    let recorded: bool = owner
        .query_one(
            "select log_to = (select max(upper_bound) from cqrs.log_partitions()) from cqrs.retention",
            &[],
        )
        .await?
        .get(0);
    ensure!(recorded, "the log's bounds are not pg_partman's partitions'");

    // pg_cqrs's retention removes pg_partman's old partitions, under its guards
    owner
        .batch_execute("update cqrs.retention set keep = interval '1 day'")
        .await?;
    let report = actions(owner.query(maintain, &[]).await?);
    ensure!(
        !report.is_empty() && report.iter().all(|(_, action)| action == "dropped"),
        "maintain() with keep should drop pg_partman's partitions older than a day: {report:?}"
    );
    let retry: bool = client.query_one(append, &[&id]).await?.get(0);
    ensure!(retry, "a retry after the removal is not a duplicate");

    // pg_partman's own retention of the log: refused, saying why
    superuser
        .batch_execute(
            "update partman.part_config set retention = '30 days' where parent_table = 'cqrs.command_log'",
        )
        .await?;
    let refused = owner.query(maintain, &[]).await.err();
    let code = refused
        .as_ref()
        .and_then(|e| e.code())
        .map(|c| c.code().to_owned());
    ensure!(
        code.as_deref() == Some("55000")
            && refused.is_some_and(
                |e| format!("{e:?}").contains("pg_partman keeps cqrs.command_log with a retention")
            ),
        "maintain() beside pg_partman's retention of the log: {code:?}"
    );
    Ok(())
}

/// pg_partman installed by a superuser in a schema the portable edition's installer may not use
/// (as on managed services, for other tables): `cqrs.maintain()` goes on, as without it — it
/// failed with "permission denied for schema partman" when looking for pg_partman's config.
#[tokio::test(flavor = "multi_thread")]
async fn pg_partman_in_a_schema_the_portable_installer_may_not_use_leaves_maintain_working() -> Result<()> {
    let Some((_rig, owner, _superuser)) = beside_partman(Edition::Portable).await? else {
        return Ok(());
    };
    let may_use: bool = owner
        .query_one("select has_schema_privilege('partman', 'usage')", &[])
        .await?
        .get(0);
    ensure!(
        !may_use,
        "the installer may use pg_partman's schema: the test means nothing"
    );
    owner
        .query("select * from cqrs.maintain()", &[])
        .await
        .context("cqrs.maintain() beside a pg_partman the installer may not see")?;
    Ok(())
}

/// The README's way of letting pg_partman make the log's partitions beside the portable edition:
/// a template with pg_cqrs's keys, no default partition, and a look at `part_config` for the
/// installer (not a superuser). `cqrs.maintain()` then has nothing to key and makes no partition
/// — before and after pg_partman makes more — and records pg_partman's bounds; a retry is a
/// duplicate.
#[tokio::test(flavor = "multi_thread")]
async fn pg_partman_with_the_template_keeps_the_portable_log() -> Result<()> {
    let Some((rig, owner, superuser)) = beside_partman(Edition::Portable).await? else {
        return Ok(());
    };
    let client = rig.client().await?;
    drop_every_partition(&owner).await?;
    superuser
        .batch_execute(&format!(
            "create table partman.template_cqrs_command_log (like cqrs.command_log);
             alter table partman.template_cqrs_command_log
                 add primary key (position), add unique (command_id), add unique (stream, seq);
             select partman.create_parent('cqrs.command_log', 'id_time', 'native', 'daily',
                                          p_template_table => 'partman.template_cqrs_command_log');
             drop table cqrs.command_log_default;
             update partman.part_config set infinite_time_partitions = true
              where parent_table = 'cqrs.command_log';
             grant usage on schema partman to {admin};
             grant select on partman.part_config to {admin};",
            admin = edition::ADMIN
        ))
        .await?;
    let maintain = "select partition || ' ' || action from cqrs.maintain()";
    let report: Vec<String> = owner
        .query(maintain, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(
        report.is_empty(),
        "maintain() beside pg_partman with the template: {report:?}"
    );

    let id = Uuid::now_v7();
    let append = "select duplicate from cqrs.append($1, 'order-partman', 'CREATE_ORDER', '{\"user_id\": \"user-1\", \"currency\": \"EUR\"}')";
    let first: bool = client.query_one(append, &[&id]).await?.get(0);
    let retry: bool = client.query_one(append, &[&id]).await?.get(0);
    ensure!(
        !first && retry,
        "append then retry: duplicate {first}, then {retry}"
    );

    let partitions = "select count(*) from cqrs.log_partitions()";
    let before: i64 = owner.query_one(partitions, &[]).await?.get(0);
    superuser
        .batch_execute(
            "update partman.part_config set premake = 6 where parent_table = 'cqrs.command_log';
             select partman.run_maintenance('cqrs.command_log');",
        )
        .await?;
    let report: Vec<String> = owner
        .query(maintain, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(
        report.is_empty(),
        "after pg_partman made more, maintain() should have nothing to do: {report:?}"
    );
    let after: i64 = owner.query_one(partitions, &[]).await?.get(0);
    let recorded: bool = owner
        .query_one(
            "select log_to = (select max(upper_bound) from cqrs.log_partitions()) from cqrs.retention",
            &[],
        )
        .await?
        .get(0);
    // how many pg_partman makes depends on the time of day (it rounds the days left ahead)
    let leaves = leaf_partitions(&superuser).await?;
    ensure!(
        after > before && after == leaves && recorded,
        "pg_partman should have made more partitions ({before} → {after}, {leaves} in the catalog), their bounds recorded ({recorded})"
    );
    Ok(())
}

/// The log's partitions in the catalog (not through pg_cqrs).
async fn leaf_partitions(client: &Client) -> Result<i64> {
    Ok(client
        .query_one(
            "select count(*) from pg_catalog.pg_partition_tree('cqrs.command_log') where isleaf",
            &[],
        )
        .await?
        .get(0))
}

/// A REPEATABLE READ transaction on `client`.
async fn repeatable_read(client: &mut Client) -> Result<tokio_postgres::Transaction<'_>> {
    Ok(client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?)
}

/// Two first appends to a log without partitions (`CREATE EXTENSION` makes none), each in a
/// REPEATABLE READ transaction whose snapshot predates the other's commit: the first makes the
/// partitions; the second, which waited for it, cannot see them and would make them again —
/// `42P07`, which no application retries. It gets `40001` instead, and its retry appends. The
/// log ends with one set of partitions and both commands.
async fn first_appends_in_repeatable_read(edition: Edition) -> Result<()> {
    let rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let owner = connect(&edition::owner_url(&rig.pg, edition)).await?;
    drop_every_partition(&owner).await?;
    // as CREATE EXTENSION leaves the log: no bounds, and (after an ANALYZE finds no partition)
    // no relhassubclass, which is what the extension's append looks at
    owner
        .batch_execute(
            "update cqrs.retention set log_from = '-infinity', log_to = '-infinity';
             analyze cqrs.command_log;",
        )
        .await?;
    let now = unix_now()?;
    // two streams: nothing but the partitions is shared between the two appends
    let append = "select duplicate from cqrs.append($1, $2, 'CREATE_ORDER', $3)";
    let payload = json!({"user_id": "u-1", "currency": "EUR"});
    let (first_id, second_id) = (v7_ago(now, 0), v7_ago(now, 1));

    let mut first = rig.client().await?;
    let mut second = rig.client().await?;
    let first_tx = repeatable_read(&mut first).await?;
    let second_tx = repeatable_read(&mut second).await?;
    // both snapshots are taken before either appends
    first_tx.query("select 1", &[]).await?;
    second_tx.query("select 1", &[]).await?;
    first_tx
        .query(append, &[&first_id, &"order-rr-1", &payload])
        .await?;
    let waiter = rig.client().await?;
    let second_stream = "order-rr-2";
    let second_args: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&second_id, &second_stream, &payload];
    let second_append = second_tx.query(append, &second_args);
    let (second_result, first_committed) = tokio::join!(second_append, async {
        // the second waits for the first maker; then the first commits
        let waited = eventually(Duration::from_secs(10), "the second append waits", || async {
            let waiting: i64 = waiter
                .query_one(
                    "select count(*) from pg_locks where locktype = 'advisory' and not granted",
                    &[],
                )
                .await?
                .get(0);
            ensure!(waiting == 1, "{waiting} waiting");
            Ok(())
        })
        .await;
        let committed = first_tx.commit().await;
        waited.and(committed.context("committing the first append"))
    });
    first_committed?;
    let refused = second_result
        .err()
        .context("the second first append made the partitions again")?;
    let db_error = refused.as_db_error().context("not a database error")?;
    ensure!(
        db_error.code().code() == "40001",
        "the second first append: {db_error:?}"
    );
    second_tx.rollback().await?;

    let retry = repeatable_read(&mut second).await?;
    let duplicate: bool = retry
        .query_one(append, &[&second_id, &"order-rr-2", &payload])
        .await?
        .get(0);
    retry.commit().await?;
    ensure!(!duplicate, "the retry was taken for a duplicate");
    let (commands, partitions): (i64, i64) = {
        let row = owner
            .query_one(
                "select (select count(*) from cqrs.command_log), (select count(*) from cqrs.log_partitions())",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    let premake: i32 = owner
        .query_one("select premake from cqrs.retention", &[])
        .await?
        .get(0);
    ensure!(commands == 2, "{commands} commands in the log");
    ensure!(
        partitions == i64::from(premake) + 2,
        "{partitions} partitions, premake {premake}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn first_appends_in_repeatable_read_retry_with_the_extension() -> Result<()> {
    first_appends_in_repeatable_read(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread")]
async fn first_appends_in_repeatable_read_retry_with_the_portable_edition() -> Result<()> {
    first_appends_in_repeatable_read(Edition::Portable).await
}
