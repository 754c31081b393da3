//! The projection engine against a real PostgreSQL: read models equal an independent fold of
//! the log however the log is delivered; wait_for wakes promptly; a rebuild loses nothing
//! committed while it runs.

use std::time::{Duration, Instant};

use cqrs_e2e::edition::{self, Edition};
use cqrs_e2e::orders::{fold, random_log, read_models, seed_commands, Command};
use cqrs_e2e::{connect, repo_root};
use cqrs_harness::{ClusterOptions, PgCluster};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

/// A cluster with `edition` and the example projections (created by the tables' owner); the
/// client is the superuser's.
async fn with_examples(edition: Edition) -> anyhow::Result<(PgCluster, Client)> {
    let cluster = edition::cluster(edition, ClusterOptions::default())?;
    connect(&edition::owner_url(&cluster, edition))
        .await?
        .batch_execute(&std::fs::read_to_string(
            repo_root().join("sql/examples/orders.sql"),
        )?)
        .await?;
    let client = connect(&cluster.url()).await?;
    Ok((cluster, client))
}

/// Random logs, delivered in random batches — some twice, some shuffled, some held back and
/// delivered later (so streams have gaps that must park and release) — project to exactly the
/// read models an independent one-by-one fold of the log gives.
///
/// Only the order within a stream is guaranteed across batches, so the comparison must not
/// depend on the order between streams: per-order rows are fed by one stream, and every user's
/// stats row is created first (its own stream, delivered first), after which all that touches
/// it adds up, whatever the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_equal_the_fold_of_the_log_however_it_is_delivered() -> anyhow::Result<()> {
    folds_equal(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_equal_the_fold_of_the_log_however_it_is_delivered_portable() -> anyhow::Result<()> {
    folds_equal(Edition::Portable).await
}

async fn folds_equal(edition: Edition) -> anyhow::Result<()> {
    let (_cluster, client) = with_examples(edition).await?;
    let seed: u64 = std::env::var("CQRS_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cases: u64 = std::env::var("CQRS_PROPERTY_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for case in 0..cases {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(case));
        client
            .batch_execute(
                "truncate shop.order_summary, shop.user_order_stats, cqrs.command_log, cqrs.stream, cqrs.projection_stream, cqrs.parked;
                 update cqrs.projection_state set checkpoint_lsn = null, parked = 0;",
            )
            .await?;
        let commands = rng.random_range(1..400);
        let (orders, users) = (rng.random_range(1..40), rng.random_range(1..10));
        let mut log: Vec<Command> = seed_commands(users);
        log.extend(random_log(&mut rng, commands, orders, users));
        append_all(&client, &log).await?;
        let rows: Vec<Value> = client
            .query(
                "select to_jsonb(l) from cqrs.command_log l order by l.position",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();

        // the seed commands first, then the rest cut, duplicated, shuffled, held back
        let mut batches: Vec<Vec<Value>> = Vec::new();
        let project = client
            .prepare("select count(*) from cqrs.project_batch($1)")
            .await?;
        client
            .query_one(&project, &[&Value::Array(rows[..users].to_vec())])
            .await?;
        let mut start = users;
        while start < rows.len() {
            let end = (start + rng.random_range(1..60)).min(rows.len());
            batches.push(rows[start..end].to_vec());
            start = end;
        }
        let mut deliveries: Vec<Vec<Value>> = Vec::new();
        let mut held: Vec<Vec<Value>> = Vec::new();
        for mut batch in batches {
            if rng.random_bool(0.3) {
                batch.shuffle(&mut rng);
            }
            if rng.random_bool(0.15) {
                held.push(batch);
                continue;
            }
            if rng.random_bool(0.2) {
                deliveries.push(batch.clone());
            }
            deliveries.push(batch);
            if !held.is_empty() && rng.random_bool(0.3) {
                deliveries.push(held.remove(0));
            }
        }
        deliveries.extend(held);
        for batch in &deliveries {
            client
                .query_one(&project, &[&Value::Array(batch.clone())])
                .await?;
        }

        // appended one at a time by one session: the log order is the order of `log`
        let ordered: Vec<(String, &'static str, Value)> = log
            .iter()
            .map(|c| (c.stream.clone(), c.command_type, c.payload.clone()))
            .collect();
        let expected = fold(&ordered);
        let actual = read_models(&client).await?;
        assert_eq!(
            actual.0,
            expected.0,
            "order_summary differs (seed {seed}, case {case}, {} deliveries)",
            deliveries.len()
        );
        assert_eq!(
            actual.1, expected.1,
            "user_order_stats differs (seed {seed}, case {case})"
        );
        let status = client
            .query(
                "select projection, events_behind, parked, halted from cqrs.status()",
                &[],
            )
            .await?;
        for row in status {
            let (name, behind, parked, halted): (String, i64, i64, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            assert_eq!(
                (behind, parked, halted),
                (0, 0, false),
                "{name} not caught up (seed {seed}, case {case})"
            );
        }
    }
    Ok(())
}

/// A session waiting in cqrs.wait_for wakes within 50 ms of the commit that projects its
/// command (it sleeps on its latch; the committing projector sets it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_wakes_within_50_ms_of_the_projecting_commit() -> anyhow::Result<()> {
    wakes_promptly(Edition::Extension).await
}

/// The portable edition polls every 10 ms instead of sleeping on a latch: within 50 ms too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_wakes_within_50_ms_of_the_projecting_commit_portable() -> anyhow::Result<()> {
    wakes_promptly(Edition::Portable).await
}

async fn wakes_promptly(edition: Edition) -> anyhow::Result<()> {
    let (cluster, projector) = with_examples(edition).await?;
    let waiter = connect(&cluster.url()).await?;
    let mut worst = Duration::ZERO;
    for round in 1..=8i64 {
        let stream = format!("order-w{round}");
        projector
            .execute("select cqrs.append(cqrs.uuid_v7(), $1, 'CREATE_ORDER', '{\"user_id\": \"u\", \"currency\": \"EUR\"}')", &[&stream])
            .await?;
        let wait = {
            let stream = stream.clone();
            let waiter = &waiter;
            async move {
                let row = waiter
                    .query_one("select cqrs.wait_for($1, 1, 'order_summary', '5 s')", &[&stream])
                    .await?;
                anyhow::Ok((row.get::<_, bool>(0), Instant::now()))
            }
        };
        let project = async {
            // let the waiter block first
            tokio::time::sleep(Duration::from_millis(150)).await;
            projector
                .query("select * from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.stream = $1))", &[&stream])
                .await?;
            anyhow::Ok(Instant::now())
        };
        let (waited, committed) = tokio::join!(wait, project);
        let ((applied, woke), committed) = (waited?, committed?);
        assert!(applied, "wait_for must answer true once the command is projected");
        let delay = woke.saturating_duration_since(committed);
        worst = worst.max(delay);
        assert!(
            delay < Duration::from_millis(50),
            "round {round}: woke {delay:?} after the commit"
        );
    }
    eprintln!("wait_for woke at worst {worst:?} after the projecting commit");
    Ok(())
}

/// Commands appended while a rebuild runs are all in the read model once the rebuild and the
/// next catch-up are done: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_loses_nothing_committed_while_it_runs() -> anyhow::Result<()> {
    rebuild_loses_nothing(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_loses_nothing_committed_while_it_runs_portable() -> anyhow::Result<()> {
    rebuild_loses_nothing(Edition::Portable).await
}

async fn rebuild_loses_nothing(edition: Edition) -> anyhow::Result<()> {
    let (cluster, client) = with_examples(edition).await?;
    let mut rng = StdRng::seed_from_u64(7);
    let log = random_log(&mut rng, 3000, 300, 40);
    append_all(&client, &log[..2000]).await?;
    let writer = connect(&cluster.url()).await?;
    let late = log[2000..].to_vec();
    let appending = tokio::spawn(async move {
        append_all(&writer, &late).await?;
        anyhow::Ok(())
    });
    let rebuilder = connect(&cluster.url()).await?;
    // small chunks so that the rebuild takes a while and overlaps the appends
    rebuilder
        .query("select * from cqrs.rebuild('order_summary', chunk => 50)", &[])
        .await?;
    rebuilder
        .query("select * from cqrs.rebuild('user_order_stats', chunk => 50)", &[])
        .await?;
    appending.await??;
    client.query("select * from cqrs.catch_up()", &[]).await?;

    let ordered = cqrs_e2e::orders::log_from_db(&client).await?;
    assert_eq!(ordered.len(), 3000);
    let expected = fold(&ordered);
    let actual = read_models(&client).await?;
    assert_eq!(actual.0, expected.0, "order_summary after rebuild + catch-up");
    assert_eq!(actual.1, expected.1, "user_order_stats after rebuild + catch-up");
    Ok(())
}

/// A catch-up that walks the log in position order (cqrs._catch_up_from chose it: nothing was
/// applied yet) while three writers append applies each command once and each stream in order:
/// what commits behind the walk is the next call's, and after it the read models are the fold
/// of the whole log with nothing left parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_walking_the_log_under_appends_applies_each_command_once() -> anyhow::Result<()> {
    walk_under_appends(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_walking_the_log_under_appends_applies_each_command_once_portable() -> anyhow::Result<()> {
    walk_under_appends(Edition::Portable).await
}

async fn walk_under_appends(edition: Edition) -> anyhow::Result<()> {
    let (cluster, client) = with_examples(edition).await?;
    let mut rng = StdRng::seed_from_u64(11);
    let log = random_log(&mut rng, 4000, 300, 40);
    append_all(&client, &log[..2000]).await?;
    let walk_after: Option<i64> = client
        .query_one("select cqrs._catch_up_from('order_summary', null, 50)", &[])
        .await?
        .get(0);
    assert_eq!(
        walk_after,
        Some(0),
        "a projection that applied nothing walks the log from its start"
    );

    // three writers, each with its own streams' commands (a stream's order is its writer's)
    let mut shares: Vec<Vec<Command>> = vec![Vec::new(); 3];
    for command in &log[2000..] {
        let writer = command.stream.bytes().map(usize::from).sum::<usize>() % 3;
        shares[writer].push(command.clone());
    }
    let mut writers = Vec::new();
    for share in shares {
        let writer = connect(&cluster.url()).await?;
        writers.push(tokio::spawn(async move {
            append_all(&writer, &share).await?;
            anyhow::Ok(())
        }));
    }
    let projector = connect(&cluster.url()).await?;
    let mut logged_at_start = Vec::new();
    while !writers.iter().all(|w| w.is_finished()) {
        let logged: i64 = projector
            .query_one("select count(*) from cqrs.command_log", &[])
            .await?
            .get(0);
        logged_at_start.push(logged);
        // small chunks: each call walks for a while beside the writers
        projector
            .query("select * from cqrs.catch_up(null, 50)", &[])
            .await?;
    }
    for writer in writers {
        writer.await??;
    }
    client.query("select * from cqrs.catch_up()", &[]).await?;
    assert!(
        logged_at_start.first().is_some_and(|&n| n < 4000),
        "the catch-ups ran beside the writers (the log at each start: {logged_at_start:?})"
    );

    let ordered = cqrs_e2e::orders::log_from_db(&client).await?;
    assert_eq!(ordered.len(), 4000);
    let expected = fold(&ordered);
    let actual = read_models(&client).await?;
    assert_eq!(actual.0, expected.0, "order_summary after walking catch-ups");
    assert_eq!(actual.1, expected.1, "user_order_stats after walking catch-ups");
    let left: i64 = client
        .query_one(
            "select coalesce(sum(events_behind + parked + dead_letters), 0)::bigint from cqrs.status()",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(left, 0, "nothing behind, parked or dead-lettered");
    Ok(())
}

/// Appends `commands` in order, each with a new UUIDv7 id.
async fn append_all(client: &Client, commands: &[Command]) -> anyhow::Result<()> {
    let append = client.prepare("select cqrs.append($1, $2, $3, $4)").await?;
    for command in commands {
        client
            .execute(
                &append,
                &[
                    &Uuid::now_v7(),
                    &command.stream,
                    &command.command_type,
                    &command.payload,
                ],
            )
            .await?;
    }
    Ok(())
}
