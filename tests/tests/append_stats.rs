//! Command-side statistics (extension edition, pg_cqrs in `shared_preload_libraries`): a workload
//! with known outcomes, spread over several backends, is counted exactly by `cqrs.stats()` and
//! `cqrs.append_latency()`, and shown as such on a sidecar's `/metrics`; a crashed backend
//! (SIGKILL: PostgreSQL restarts and reinitialises shared memory, as it discards its own
//! statistics) starts the counts again from zero, and they are exact again after it. Without
//! the preload, and in the portable edition, the functions say why they cannot count.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cqrs_e2e::edition::Edition;
use cqrs_e2e::rig::Rig;
use cqrs_e2e::{connect, eventually};
use cqrs_harness::ClusterOptions;
use cqrs_sidecar::append_stats::{APPENDS_TOTAL, APPEND_DURATION_SECONDS};
use serde_json::json;
use tokio_postgres::Client;

const SCHEMA: &str = r#"{"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}"#;

/// What the workload did, per command type: [accepted, duplicate, conflict, invalid, error].
type Expected = BTreeMap<String, [i64; 5]>;

async fn stats(client: &Client) -> Result<Expected> {
    let mut out = Expected::new();
    for row in client
        .query(
            "select command_type, accepted, duplicate, expected_seq_conflict, invalid, error, calls
               from cqrs.stats()",
            &[],
        )
        .await?
    {
        let counts: [i64; 5] = [1, 2, 3, 4, 5].map(|i| row.get(i));
        ensure!(
            counts.iter().sum::<i64>() == row.get::<_, i64>(6),
            "calls is not the sum: {row:?}"
        );
        out.insert(row.get(0), counts);
    }
    Ok(out)
}

/// Runs a known workload from `sessions` connections (each its own backend): per session, for
/// `STATS_A`, 5 accepted, 2 replays, 1 expected-seq conflict, 3 invalid payloads and 1 reuse of
/// an id for another payload (23505); for `STATS_B`, 4 accepted (one in a transaction that
/// rolls back: a call is counted when it answers), and one append with a null stream (22004,
/// invalid). Returns what it did.
async fn workload(url: &str, sessions: usize) -> Result<Expected> {
    let mut tasks = Vec::new();
    for session in 0..sessions {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            let stream = format!("stats-{session}-{}", uuid::Uuid::new_v4().simple());
            let append = "select seq, duplicate from cqrs.append($1, $2, $3, $4, $5)";
            let mut ids = Vec::new();
            for n in 0..5i64 {
                let id = uuid::Uuid::now_v7();
                client
                    .query_one(
                        append,
                        &[&id, &stream, &"STATS_A", &json!({"n": n}), &None::<i64>],
                    )
                    .await?;
                ids.push((id, n));
            }
            for (id, n) in ids.iter().take(2) {
                let row = client
                    .query_one(append, &[id, &stream, &"STATS_A", &json!({"n": n}), &None::<i64>])
                    .await?;
                ensure!(row.get::<_, bool>(1), "a replay was not a duplicate");
            }
            let conflict = client
                .query_one(
                    append,
                    &[
                        &uuid::Uuid::now_v7(),
                        &stream,
                        &"STATS_A",
                        &json!({"n": 9}),
                        &Some(1i64),
                    ],
                )
                .await;
            // counting does not change what the caller gets: the same SQLSTATE and message
            let conflict = conflict.err().context("an expected_seq conflict was accepted")?;
            ensure!(
                conflict.code().map(|c| c.code()) == Some("40001")
                    && conflict
                        .as_db_error()
                        .is_some_and(|e| e.message().contains("expected 1")),
                "{conflict:?}"
            );
            for _ in 0..3 {
                let invalid = client
                    .query_one(
                        append,
                        &[
                            &uuid::Uuid::now_v7(),
                            &stream,
                            &"STATS_A",
                            &json!({"n": "x"}),
                            &None::<i64>,
                        ],
                    )
                    .await;
                ensure!(invalid.is_err(), "an invalid payload was accepted");
            }
            let reused = client
                .query_one(
                    append,
                    &[&ids[0].0, &stream, &"STATS_A", &json!({"n": 99}), &None::<i64>],
                )
                .await;
            let reused = reused.err().context("a reused id was accepted")?;
            ensure!(reused.code().map(|c| c.code()) == Some("23505"), "{reused:?}");
            let other = format!("{stream}-b");
            for n in 0..3i64 {
                client
                    .query_one(
                        append,
                        &[
                            &uuid::Uuid::now_v7(),
                            &other,
                            &"STATS_B",
                            &json!({"n": n}),
                            &None::<i64>,
                        ],
                    )
                    .await?;
            }
            client.batch_execute("begin").await?;
            client
                .query_one(
                    append,
                    &[
                        &uuid::Uuid::now_v7(),
                        &other,
                        &"STATS_B",
                        &json!({"n": 3}),
                        &None::<i64>,
                    ],
                )
                .await?;
            client.batch_execute("rollback").await?;
            let null_stream = client
                .query_one(
                    append,
                    &[
                        &uuid::Uuid::now_v7(),
                        &None::<String>,
                        &"STATS_B",
                        &json!({"n": 4}),
                        &None::<i64>,
                    ],
                )
                .await;
            ensure!(null_stream.is_err(), "a null stream was accepted");
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let n = sessions as i64;
    Ok(Expected::from([
        ("STATS_A".to_owned(), [5 * n, 2 * n, n, 3 * n, n]),
        ("STATS_B".to_owned(), [4 * n, 0, 0, n, 0]),
    ]))
}

/// The sidecar's `/metrics` value of `cqrs_appends_total{command_type, outcome}`.
fn exported(metrics: &str, command_type: &str, outcome: &str) -> Option<i64> {
    let prefix = format!("{APPENDS_TOTAL}{{command_type=\"{command_type}\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_counted_exactly_by_outcome_and_type_across_backends_and_a_crash() -> Result<()> {
    let mut rig = Rig::start_edition(
        Edition::Extension,
        ClusterOptions {
            settings: vec!["shared_preload_libraries = 'pg_cqrs'".to_owned()],
            ..ClusterOptions::default()
        },
    )
    .await?;
    let url = rig.pg.url();
    let client = rig.client().await?;
    client
        .execute(
            "select cqrs.register_command_type('STATS_A', $1::text::jsonb)",
            &[&SCHEMA],
        )
        .await?;
    client
        .execute(
            "select cqrs.register_command_type('STATS_B', $1::text::jsonb)",
            &[&SCHEMA],
        )
        .await?;
    let before = stats(&client).await?;
    ensure!(
        !before.contains_key("STATS_A"),
        "counted before anything was appended: {before:?}"
    );

    let expected = workload(&url, 4).await?;
    let counted = stats(&client).await?;
    for (command_type, counts) in &expected {
        ensure!(
            counted.get(command_type) == Some(counts),
            "{command_type}: counted {:?}, did {counts:?}",
            counted.get(command_type)
        );
    }
    // every call is in its type's latency histogram, whose last bucket counts them all
    let latency = client
        .query(
            "select command_type, le, calls from cqrs.append_latency() where command_type like 'STATS_%' order by 1, 2",
            &[],
        )
        .await?;
    for (command_type, counts) in &expected {
        let buckets: Vec<(f64, i64)> = latency
            .iter()
            .filter(|row| row.get::<_, String>(0) == *command_type)
            .map(|row| (row.get(1), row.get(2)))
            .collect();
        ensure!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "not cumulative: {buckets:?}"
        );
        ensure!(
            buckets.last() == Some(&(f64::INFINITY, counts.iter().sum())),
            "{command_type}: {buckets:?}"
        );
    }

    // a sidecar exports the database's figures as they are
    rig.set("CQRS_STATUS_INTERVAL", "200ms");
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    eventually(
        Duration::from_secs(20),
        "the sidecar exports cqrs.stats()",
        || {
            let metrics = rig.sidecars[0].metrics();
            let expected = expected.clone();
            async move {
                let metrics = metrics?;
                for (command_type, counts) in &expected {
                    for (outcome, count) in cqrs_sidecar::append_stats::outcome::ALL.iter().zip(counts) {
                        let value = exported(&metrics, command_type, outcome);
                        ensure!(
                            value == Some(*count),
                            "{command_type} {outcome}: {value:?}, expected {count}"
                        );
                    }
                }
                ensure!(
                    metrics.contains(&format!(
                        "{APPEND_DURATION_SECONDS}_count{{command_type=\"STATS_A\"}} {}",
                        expected["STATS_A"].iter().sum::<i64>()
                    )),
                    "no latency histogram of STATS_A"
                );
                Ok(())
            }
        },
    )
    .await
    .with_context(|| rig.logs())?;

    // a backend that crashes takes the server through a restart: the counts start again at zero
    // (as PostgreSQL's own statistics do) and are exact again after it
    let victim = connect(&url).await?;
    let pid: i32 = victim.query_one("select pg_backend_pid()", &[]).await?.get(0);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    ensure!(killed.success(), "could not kill backend {pid}");
    // `kill` returns before the postmaster has seen the crash: a connection made at once can
    // reach the old server and be cut by its restart, so wait for the counts of a new one
    let client = after_the_restart(&url).await?;
    let expected = workload(&url, 2).await?;
    let counted = stats(&client).await?;
    for (command_type, counts) in &expected {
        ensure!(
            counted.get(command_type) == Some(counts),
            "after the crash, {command_type}: counted {:?}, did {counts:?}",
            counted.get(command_type)
        );
    }
    Ok(())
}

/// A connection to the server restarted after the crash: its counts are empty (shared memory is
/// made anew). Counts that survive the restart fail this after 30 s.
async fn after_the_restart(url: &str) -> Result<Client> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let client = eventually_connected(url).await?;
        match stats(&client).await {
            Ok(counts) if !counts.contains_key("STATS_A") && !counts.contains_key("STATS_B") => {
                return Ok(client)
            }
            Ok(counts) if std::time::Instant::now() >= deadline => {
                anyhow::bail!("counts survived the crash restart: {counts:?}")
            }
            Err(err) if std::time::Instant::now() >= deadline => return Err(err),
            // counts still there (the restart has not begun), or cut by the restart
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn eventually_connected(url: &str) -> Result<Client> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // the server refuses connections while it restarts after the crash
        match connect(url).await {
            Ok(client) if client.query_one("select 1", &[]).await.is_ok() => return Ok(client),
            _ if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(_) => anyhow::bail!("the server did not come back after the crash"),
            Err(err) => return Err(err).context("the server did not come back after the crash"),
        }
    }
}

/// Without the preload the extension says what to do (55000); the portable edition says it
/// cannot count (0A000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_appends_cannot_be_counted_the_functions_say_why() -> Result<()> {
    for (edition, sqlstate) in [(Edition::Extension, "55000"), (Edition::Portable, "0A000")] {
        let rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
        let client = rig.client().await?;
        client
            .query_one("select seq from cqrs.append(cqrs.uuid_v7(), 's', 'T', '{}')", &[])
            .await?;
        for function in ["cqrs.stats()", "cqrs.append_latency()"] {
            let err = client
                .query(&format!("select * from {function}"), &[])
                .await
                .err()
                .with_context(|| format!("{function} answered in the {edition:?} edition"))?;
            let code = err.code().map(|c| c.code().to_owned());
            ensure!(
                code.as_deref() == Some(sqlstate),
                "{function}, {edition:?}: {err:?}"
            );
        }
    }
    Ok(())
}
